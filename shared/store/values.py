"""The job store's arguments and results."""

from __future__ import annotations

import enum

import msgspec

from llm_broker.shared import messages as m
from llm_broker.shared.store.records import JobRecord, Reply, Usage


class Delivery(msgspec.Struct, kw_only=True):
    """One queue entry as a worker received it."""

    provider: str
    entry_id: str
    #: The job, or None when the entry holds no job this version can decode.
    job: m.Job | None
    #: The entry's packed job, as read (dead-lettered when it cannot run).
    raw: bytes
    #: How many times the entry was delivered, this time included.
    deliveries: int


class Verdict(enum.Enum):
    """The start script's verdict on a delivery."""

    RUN = "ok"
    #: The record expired: nothing to do.
    GONE = "gone"
    #: The deadline passed: the job is expired (the script made it so, or it was).
    EXPIRED = "expired"
    #: Delivered more often than allowed: to the dead-letter stream.
    POISON = "poison"
    #: Already final otherwise (completed, failed or cancelled).
    FINAL = "final"


class Outcome(msgspec.Struct, kw_only=True):
    """How a delivery ends, for :meth:`JobStore.settle`."""

    #: The final status to record; "" leaves the record as it is.
    status: str = ""
    #: The result (completed) or the error object (otherwise), JSON.
    payload: bytes = b""
    http_status: int = 200
    #: The reply for a waiting client (sent only if one waits).
    reply: Reply | None = None
    #: The deployments tried, when there was more than one try.
    history: list[m.Attempt] = []
    #: Dead-letter the entry (a bounded summary of it).
    dead_letter: bool = False
    #: Tokens the call used (None: unknown): the tenant's tpm windows and the job's
    #: account count them instead of the estimate.
    usage: Usage | None = None
    #: When the call began, for a delivery that ran without the start script (a
    #: synchronous call's first delivery): the settlement records it and counts the
    #: attempt.
    started_at: float | None = None


class AsyncFields(msgspec.Struct, kw_only=True):
    """What an async job's record holds beyond a synchronous call's."""

    metadata: dict[str, str] | None = None
    webhook_url: str | None = None
    #: A batch's line: the batch's stream of finished lines (shared/batches.py).
    batch_stream: str | None = None


class Idempotency(msgspec.Struct, kw_only=True):
    """An Idempotency-Key, the hash of the request it is bound to, and its TTL."""

    key: str
    request_hash: str
    ttl_s: int


class Admitted(msgspec.Struct, tag="admitted"):
    record: JobRecord


class Full(msgspec.Struct, tag="full"):
    pass


class Replayed(msgspec.Struct, tag="replayed"):
    """The Idempotency-Key was used before, by the same tenant."""

    job_id: str
    request_hash: str
    record: JobRecord


class KeyConflict(msgspec.Struct, tag="conflict"):
    """The key's job is gone, or another tenant's."""


class KeyInUse(msgspec.Struct, tag="key_in_use"):
    """On a Redis Cluster: another request with the Idempotency-Key is being
    admitted (its claim is a moment old and its job not there yet)."""


class TenantQueueFull(msgspec.Struct, tag="tenant_queue_full"):
    """The tenant has as many jobs waiting as its quota allows."""

    #: "provider": its quota on the job's provider; "all": its overall quota.
    scope: str


class TenantRateLimited(msgspec.Struct, tag="tenant_rate_limited"):
    """The tenant's requests or tokens per minute are used up."""

    scope: str
    #: Seconds until the request would fit.
    retry_after: float


#: Why admission refused a job.
class AccountLimited(msgspec.Struct, tag="account_limited"):
    """A limit of the key's or of its tenant's (kept in Redis) is reached."""

    #: "key" or "tenant".
    scope: str
    #: "rate" (rpm or tpm), "in_flight" or "queued".
    what: str
    retry_after: float


class BudgetExceeded(msgspec.Struct, tag="budget_exceeded"):
    """The key's or tenant's budget for the period is spent."""

    scope: str
    #: When the period ends (Unix time; 0: a total budget, which never resets).
    reset_at: float


class NotReplicated(msgspec.Struct, tag="not_replicated"):
    """The job was admitted on the primary, but fewer replicas than asked confirmed
    it in time (Redis WAIT): a failover now could lose it."""

    acked: int
    wanted: int


Refused = Full | TenantQueueFull | TenantRateLimited | AccountLimited | BudgetExceeded

Submitted = (
    Admitted
    | NotReplicated
    | Full
    | Replayed
    | KeyConflict
    | KeyInUse
    | TenantQueueFull
    | TenantRateLimited
    | AccountLimited
    | BudgetExceeded
)


class Cancelled(msgspec.Struct):
    #: True if this call cancelled the job (else it was final already).
    cancelled: bool
    record: JobRecord


#: Where a listing of a tenant's jobs goes on: the creation time (as Redis wrote
#: the score) and the id of the last job listed.
ListCursor = tuple[str, str]
