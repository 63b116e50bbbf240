"""Every Redis key and stream name, built in one place.

Provider keys carry a hash tag (``{provider}``) so that a provider's keys stay in
one Redis Cluster slot.
"""

from __future__ import annotations

#: Consumer group of every provider queue.
GROUP = "workers"


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def queue(self, provider: str) -> str:
        """Stream of jobs for one provider; its length is the queue depth."""
        return f"{self.prefix}q:{{{provider}}}"

    def dead_letter(self, provider: str) -> str:
        """Stream of jobs that failed after too many deliveries."""
        return f"{self.prefix}dlq:{{{provider}}}"

    def job(self, job_id: str) -> str:
        """Hash holding one job's status, timestamps, tenant, result or error."""
        return f"{self.prefix}job:{job_id}"

    def reply(self, pod: str) -> str:
        """Stream of replies for the jobs whose client waits on one ingress process."""
        return f"{self.prefix}r:{pod}"
