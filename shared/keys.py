"""Every Redis key and stream name, built in one place.

Provider keys carry a hash tag (``{provider}``) so that a provider's keys stay in
one Redis Cluster slot.
"""

from __future__ import annotations

#: Consumer group of every provider queue.
GROUP = "workers"
#: Consumer group of the webhook event stream.
WEBHOOK_GROUP = "webhooks"


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def queue(self, provider: str) -> str:
        """Stream of jobs for one provider; its length is the queue depth."""
        return f"{self.prefix}q:{{{provider}}}"

    # The scheduler's keys that Python reads; shared/store/scripts.py builds them, and
    # the rest, in Lua (docs/scheduling.md lists them all).

    def waiting(self, provider: str, priority: str, tenant: str) -> str:
        """List of a tenant's jobs of one class waiting for the provider's workers
        (each ``"<job id> <packed job>"``), oldest first."""
        return f"{self.prefix}w:{{{provider}}}:{priority}:{tenant}"

    def waiting_index(self, provider: str, priority: str) -> str:
        """Sorted set of the jobs of one class waiting for the provider (score:
        creation time): the class's depth and its oldest job."""
        return f"{self.prefix}wait:{{{provider}}}:{priority}"

    def capacity(self, provider: str) -> str:
        """The slots of the provider's live workers (what the queue may hold)."""
        return f"{self.prefix}cap:{{{provider}}}"

    def workers(self, provider: str) -> str:
        """Hash of the provider's live workers: consumer name → "slots expiry"."""
        return f"{self.prefix}workers:{{{provider}}}"

    def scheduler(self, provider: str) -> str:
        """Hash of the provider's scheduler state: each lower class's minimum share
        and credit, and ``entries``, the waiting lists' entries (five fields)."""
        return f"{self.prefix}sched:{{{provider}}}"

    def tenant_queued(self, provider: str) -> str:
        """Hash: tenant → its jobs waiting for the provider."""
        return f"{self.prefix}tq:{{{provider}}}"

    def dead_letter(self, provider: str) -> str:
        """Stream of jobs that failed after too many deliveries."""
        return f"{self.prefix}dlq:{{{provider}}}"

    def job(self, job_id: str) -> str:
        """Hash holding one job's status, timestamps, tenant, result or error."""
        return f"{self.prefix}job:{job_id}"

    def response(self, job_id: str) -> str:
        """A stored Responses job's request (without its input) and input items, for
        ``GET /v1/responses/{id}`` and ``previous_response_id``; expires with the job."""
        return f"{self.prefix}resp:{job_id}"

    def reply(self, pod: str) -> str:
        """Stream of replies for the jobs whose client waits on one ingress process."""
        return f"{self.prefix}r:{pod}"

    def idempotency(self, tenant: str, key: str) -> str:
        """String holding the job id (and request hash) for a tenant's Idempotency-Key.
        The tenant's length comes first: no two (tenant, key) pairs share a name,
        whatever characters either holds."""
        return f"{self.prefix}idem:{len(tenant)}:{tenant}:{key}"

    def tenant_jobs(self, tenant: str) -> str:
        """Sorted set of a tenant's async jobs, scored by creation time (for listing)."""
        return f"{self.prefix}jobs:{tenant}"

    def webhook_events(self) -> str:
        """Stream of finished jobs whose webhook is still to be delivered."""
        return f"{self.prefix}wh:events"

    def webhook_queue(self) -> str:
        """The arq queue (sorted set) of webhook delivery attempts."""
        return f"{self.prefix}wh:queue"

    def webhook_attempt(self, job_id: str, attempt: int) -> str:
        """arq job id of one delivery attempt; arq refuses a second job with the same id."""
        return f"{self.prefix}wh:{job_id}:{attempt}"

    def cancel_channel(self) -> str:
        """Pub/sub channel on which job cancellations reach the worker running the job."""
        return f"{self.prefix}cancel"

    def lease_set(self, provider: str, deployment: str = "") -> str:
        """Sorted set of in-flight call leases (member: lease id, score: expiry time)
        of a provider, or of one of its deployments."""
        return f"{self.prefix}sem:{{{provider}}}:{deployment}"

    def rate_log(self, provider: str, deployment: str, what: str) -> str:
        """Sorted set of admitted calls (``req``) or token costs (``tok``) in the
        rate window, and ``tok:sum``, the running total of the latter."""
        return f"{self.prefix}rl:{{{provider}}}:{deployment}:{what}"

    def latency(self) -> str:
        """Hash: deployment name → moving average of its call latency (seconds)."""
        return f"{self.prefix}lat"

    def worker(self, consumer: str) -> str:
        """Hash: one live worker process's heartbeat (host, pid, version, its
        providers' slots and jobs held, its circuits); expires three beats after."""
        return f"{self.prefix}wk:{consumer}"

    def live_workers(self) -> str:
        """Sorted set of worker processes (member: consumer name, score: when its
        heartbeat lapses)."""
        return f"{self.prefix}wk:live"

    def minute_counts(self, minute: int) -> str:
        """Hash of one minute's finished jobs (``<provider>|<outcome>`` → count), from
        the workers' heartbeats, kept two hours (the console's charts)."""
        return f"{self.prefix}st:{minute}"

    def console_session(self, digest: str) -> str:
        """Hash: a console login session (by the SHA-256 of its cookie)."""
        return f"{self.prefix}console:s:{digest}"

    def dead_letter_replays(self, provider: str) -> str:
        """Hash: dead-letter entry id → the job id its replay made."""
        return f"{self.prefix}dlq:{{{provider}}}:replayed"

    def cache(self, scope: str, digest: str) -> str:
        """A cached response, per tenant (or ``*`` when shared)."""
        return f"{self.prefix}cache:{scope}:{digest}"
