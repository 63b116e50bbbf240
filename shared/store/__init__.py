"""The job store: every Redis operation on jobs, queues, replies and records.

Ingress, workers and the webhook deliverer go through :class:`JobStore` (and
its :class:`Queues`) and their typed methods; none of them packs a script's
arguments or reads a record's bytes. A method makes one attempt: "Redis
unreachable" (:data:`~llm_broker.shared.redisio.REDIS_DOWN`) reaches the caller,
who knows whether to retry (a worker holding a lease) or to answer 503.

- :mod:`.jobs`: admission, transitions, records, replies (:class:`JobStore`);
- :mod:`.queues`: reading, reclaiming and leasing queue entries (:class:`Queues`);
- :mod:`.scripts`: the job-state Lua scripts;
- :mod:`.records`: the typed record, replies and usage, and their wire forms;
- :mod:`.values`: the store's arguments and results.
"""

from llm_broker.shared.store.jobs import JobStore
from llm_broker.shared.store.queues import Queues
from llm_broker.shared.store.values import (
    AccountLimited,
    Admitted,
    AsyncFields,
    BudgetExceeded,
    Cancelled,
    Delivery,
    Full,
    Idempotency,
    KeyConflict,
    KeyInUse,
    ListCursor,
    NotReplicated,
    Outcome,
    Refused,
    Replayed,
    Submitted,
    TenantQueueFull,
    TenantRateLimited,
    Verdict,
)

__all__ = [
    "AccountLimited",
    "Admitted",
    "AsyncFields",
    "BudgetExceeded",
    "Cancelled",
    "Delivery",
    "Full",
    "Idempotency",
    "JobStore",
    "KeyConflict",
    "KeyInUse",
    "ListCursor",
    "NotReplicated",
    "Outcome",
    "Queues",
    "Refused",
    "Replayed",
    "Submitted",
    "TenantQueueFull",
    "TenantRateLimited",
    "Verdict",
]
