"""Every Redis key and stream name, built in one place.

Provider keys carry a hash tag (``{provider}``) so that a provider's keys stay in
one Redis Cluster slot. On a Cluster (``cluster=True``, docs/cluster.md) the tag
is the provider's code instead, the first four hex digits of the SHA-1 of its
name, and a job's id begins with the code of the provider that admitted it: its
record, its reply stream and its webhook events share that provider's slot.
"""

from __future__ import annotations

import hashlib

#: Consumer group of every provider queue.
GROUP = "workers"
#: Consumer group of the webhook event stream.
WEBHOOK_GROUP = "webhooks"


def provider_code(provider: str) -> str:
    """A provider's hash tag on a Cluster (``provider_tag`` in the job functions)."""
    return hashlib.sha1(provider.encode()).hexdigest()[:4]


class Keys:
    def __init__(self, prefix: str, *, cluster: bool = False) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self._codes: dict[str, str] = {}

    def tag(self, provider: str) -> str:
        """What a provider's keys carry in braces: its name, or on a Cluster its code."""
        if not self.cluster:
            return provider
        code = self._codes.get(provider)
        if code is None:
            code = self._codes[provider] = provider_code(provider)
        return code

    def job_id(self, provider: str, random_hex: str) -> str:
        """A new job's id from 32 random hex digits: on a Cluster its first four are
        the provider's code (112 random bits stay)."""
        return self.tag(provider) + random_hex[4:] if self.cluster else random_hex

    def queue(self, provider: str) -> str:
        """Stream of jobs for one provider; its length is the queue depth."""
        return f"{self.prefix}q:{{{self.tag(provider)}}}"

    # The scheduler's keys that Python reads; shared/store/scripts.py builds them, and
    # the rest, in Lua (docs/scheduling.md lists them all).

    def waiting(self, provider: str, priority: str, tenant: str) -> str:
        """List of a tenant's jobs of one class waiting for the provider's workers
        (each ``"<job id> <packed job>"``), oldest first."""
        return f"{self.prefix}w:{{{self.tag(provider)}}}:{priority}:{tenant}"

    def waiting_index(self, provider: str, priority: str) -> str:
        """Sorted set of the jobs of one class waiting for the provider (score:
        creation time): the class's depth and its oldest job."""
        return f"{self.prefix}wait:{{{self.tag(provider)}}}:{priority}"

    def capacity(self, provider: str) -> str:
        """The slots of the provider's live workers (what the queue may hold)."""
        return f"{self.prefix}cap:{{{self.tag(provider)}}}"

    def workers(self, provider: str) -> str:
        """Hash of the provider's live workers: consumer name → "slots expiry"."""
        return f"{self.prefix}workers:{{{self.tag(provider)}}}"

    def scheduler(self, provider: str) -> str:
        """Hash of the provider's scheduler state: each lower class's minimum share
        and credit, and ``entries``, the waiting lists' entries (five fields)."""
        return f"{self.prefix}sched:{{{self.tag(provider)}}}"

    def tenant_queued(self, provider: str) -> str:
        """Hash: tenant → its jobs waiting for the provider."""
        return f"{self.prefix}tq:{{{self.tag(provider)}}}"

    def dead_letter(self, provider: str) -> str:
        """Stream of jobs that failed after too many deliveries."""
        return f"{self.prefix}dlq:{{{self.tag(provider)}}}"

    def job(self, job_id: str) -> str:
        """Hash holding one job's status, timestamps, tenant, result or error."""
        if self.cluster:
            return f"{self.prefix}job:{{{job_id[:4]}}}{job_id}"
        return f"{self.prefix}job:{job_id}"

    def response(self, job_id: str) -> str:
        """A stored Responses job's request (without its input) and input items, for
        ``GET /v1/responses/{id}`` and ``previous_response_id``; expires with the job."""
        return f"{self.prefix}resp:{job_id}"

    def reply(self, pod: str, provider: str = "") -> str:
        """Stream of replies for the jobs whose client waits on one ingress process
        (on a Cluster, one per provider: that of the provider that admitted the job,
        see :meth:`job_reply`)."""
        if self.cluster:
            return f"{self.prefix}r:{{{self.tag(provider)}}}:{pod}"
        return f"{self.prefix}r:{pod}"

    def job_reply(self, pod: str, job_id: str) -> str:
        """On a Cluster, the reply stream of ingress process ``pod`` beside the job's
        record."""
        return f"{self.prefix}r:{{{job_id[:4]}}}:{pod}"

    def idempotency(self, tenant: str, key: str) -> str:
        """String holding the job id (and request hash) for a tenant's Idempotency-Key.
        The tenant's length comes first: no two (tenant, key) pairs share a name,
        whatever characters either holds."""
        return f"{self.prefix}idem:{len(tenant)}:{tenant}:{key}"

    def tenant_jobs(self, tenant: str, provider: str = "") -> str:
        """Sorted set of a tenant's async jobs, scored by creation time (for listing;
        on a Cluster, one per provider)."""
        if self.cluster:
            return f"{self.prefix}jobs:{{{self.tag(provider)}}}:{tenant}"
        return f"{self.prefix}jobs:{tenant}"

    def tenant_jobs_beside(self, tenant: str, job_id: str) -> str:
        """On a Cluster, the tenant's index beside the job's record (that of the
        provider that admitted it)."""
        return f"{self.prefix}jobs:{{{job_id[:4]}}}:{tenant}"

    def webhook_events(self, provider: str = "") -> str:
        """Stream of finished jobs whose webhook is still to be delivered (on a
        Cluster, one per provider)."""
        if self.cluster:
            return f"{self.prefix}wh:events:{{{self.tag(provider)}}}"
        return f"{self.prefix}wh:events"

    def webhook_queue(self) -> str:
        """The arq queue (sorted set) of webhook delivery attempts."""
        return f"{self.prefix}wh:queue"

    def job_events(self, job_id: str) -> str:
        """The webhook event stream that a job's end is written to: on a Cluster,
        that of the provider whose slot holds its record."""
        if self.cluster:
            return f"{self.prefix}wh:events:{{{job_id[:4]}}}"
        return f"{self.prefix}wh:events"

    def webhook_attempt(self, job_id: str, attempt: int) -> str:
        """arq job id of one delivery attempt; arq refuses a second job with the same id."""
        return f"{self.prefix}wh:{job_id}:{attempt}"

    def cancel_channel(self) -> str:
        """Pub/sub channel on which job cancellations reach the worker running the job."""
        return f"{self.prefix}cancel"

    def lease_set(self, provider: str, deployment: str = "") -> str:
        """Sorted set of in-flight call leases (member: lease id, score: expiry time)
        of a provider, or of one of its deployments."""
        return f"{self.prefix}sem:{{{self.tag(provider)}}}:{deployment}"

    def rate_log(self, provider: str, deployment: str, what: str) -> str:
        """Sorted set of admitted calls (``req``) or token costs (``tok``) in the
        rate window, and ``tok:sum``, the running total of the latter."""
        return f"{self.prefix}rl:{{{self.tag(provider)}}}:{deployment}:{what}"

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
        return f"{self.prefix}dlq:{{{self.tag(provider)}}}:replayed"

    def cache(self, scope: str, digest: str) -> str:
        """A cached response, per tenant (or ``*`` when shared)."""
        return f"{self.prefix}cache:{scope}:{digest}"
