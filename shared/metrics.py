"""Prometheus metrics, named ``llm_broker_*`` with units in the names.

Buckets resolve p50/p95/p99 from 5 ms to 10 minutes.
"""

from __future__ import annotations

import os
from bisect import bisect_left
from collections.abc import Callable
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.values import MutexValue

# fmt: off
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.35, 0.5, 0.75,
    1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0,
    60.0, 90.0, 120.0, 180.0, 300.0, 450.0, 600.0,
)
REDIS_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)
# fmt: on


#: Set for the processes of ``--processes N`` (llm_broker/supervise.py): their metric
#: values live in files there (prometheus_client reads it when first imported), and
#: every exposition adds up those of all the pod's processes.
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition(registry: CollectorRegistry) -> bytes:
    """The text exposition of ``registry``; under ``--processes N``, that of every
    process of the pod together."""
    if MULTIPROCESS_DIR is None:
        return generate_latest(registry)
    together = CollectorRegistry()
    MultiProcessCollector(together, MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
    return generate_latest(together)


def _adder(value: object) -> Callable[[float], None]:
    """What adds to a metric child's value: its own ``inc`` (a file's under
    ``--processes N``, whose lock guards the file), or in one process an add to the
    float without the lock. The hot path's updates are made on the event loop's
    thread only, and the lock's enter and exit were two of the three calls of every
    update."""
    if type(value) is MutexValue:
        return _Add(value)
    inc: Callable[[float], None] = value.inc  # type: ignore[attr-defined]
    return inc


class _Add:
    __slots__ = ("_value",)

    def __init__(self, value: MutexValue) -> None:
        self._value = value

    def __call__(self, amount: float) -> None:
        self._value._value += amount


class FastCount:
    """A labelled counter's (or gauge's) child, added to without prometheus_client's
    checks on every call (that the metric is labelled, that the amount is not
    negative): the hot path's counts, made on every job, pass amounts that are never
    negative to children made once (an upstream's token counts pass through
    ``Usage.reported``). It adds to the child's own value (:func:`_adder`), so
    expositions see no difference."""

    __slots__ = ("inc",)

    def __init__(self, child: Counter | Gauge) -> None:
        self.inc: Callable[[float], None] = _adder(child._value)

    def dec(self, amount: float = 1.0) -> None:
        self.inc(-amount)


class FastHistogram:
    """A labelled histogram's child observed as :class:`FastCount` adds: the bucket
    found by bisection (C) instead of a loop over the bounds, no per-call checks.
    The same buckets and sum as ``observe`` (a NaN counts in the sum only)."""

    __slots__ = ("_bounds", "_buckets", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._sum = _adder(child._sum)
        self._buckets = [_adder(b) for b in child._buckets]
        self._bounds: list[float] = list(child._upper_bounds)

    def observe(self, amount: float) -> None:
        self._sum(amount)
        i = bisect_left(self._bounds, amount)
        if i < len(self._bounds) and amount <= self._bounds[i]:
            self._buckets[i](1)


def redis_round_trips(registry: CollectorRegistry) -> Histogram:
    return Histogram(
        "llm_broker_redis_command_duration_seconds",
        "Duration of Redis round trips (a pipeline of batched commands)",
        ["role"],
        buckets=REDIS_BUCKETS,
        registry=registry,
    )


def redis_errors(registry: CollectorRegistry) -> Counter:
    return Counter(
        "llm_broker_redis_errors", "Redis commands that failed", ["role"], registry=registry
    )


def loop_lag(registry: CollectorRegistry) -> Gauge:
    return Gauge(
        "llm_broker_event_loop_lag_seconds",
        "How late the event loop last woke a timer (the worst of a pod's processes)",
        ["role"],
        registry=registry,
        multiprocess_mode="livemax",
    )


class BudgetMetrics:
    """Spend against budget of each tenant and key with a budget (kept in Redis),
    exported by every ingress process (the series are the same: take the max)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.spent = Gauge(
            "llm_broker_budget_spent_usd",
            "What a budget's current period has spent (with the estimates of requests "
            "in flight), US dollars",
            ["scope", "name", "period"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.budget = Gauge(
            "llm_broker_budget_usd",
            "A tenant's or key's budget per period, US dollars",
            ["scope", "name", "period"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.ratio = Gauge(
            "llm_broker_budget_used_ratio",
            "Spent over budget in the current period (1: spent)",
            ["scope", "name", "period"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.alert_fraction = Gauge(
            "llm_broker_budget_alert_fraction",
            "The fraction of a budget at which LLMBrokerBudgetNearlySpent fires "
            "(accounts.budget_alert_fraction)",
            registry=registry,
            multiprocess_mode="livemax",
        )


class IngressMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.budgets = BudgetMetrics(registry)
        self.requests = Counter(
            "llm_broker_requests",
            "HTTP requests answered by ingress",
            ["endpoint", "model", "provider", "status"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            "llm_broker_request_duration_seconds",
            "End-to-end request latency at ingress",
            ["endpoint", "provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft_seconds = Histogram(
            "llm_broker_time_to_first_token_seconds",
            "Time from request to first streamed chunk",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.active = Gauge(
            "llm_broker_active_requests",
            "Client requests being handled",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.shed = Counter(
            "llm_broker_shed_requests",
            "API requests shed with 503 overloaded before any work, by signal "
            "(in_flight: the process's bound on requests in flight; lag: event-loop lag)",
            ["reason"],
            registry=registry,
        )
        self.loop_lag = loop_lag(registry).labels("ingress")
        self.rejected = Counter(
            "llm_broker_admission_rejections",
            "Requests refused at admission",
            ["provider", "reason"],
            registry=registry,
        )
        self.redis_errors = redis_errors(registry)
        self.cache = Counter(
            "llm_broker_cache_requests",
            "Response cache lookups by result (hit, miss)",
            ["model", "result"],
            registry=registry,
        )
        self.errors = Counter(
            "llm_broker_errors",
            "Error answers to clients, by error type and provider",
            ["type", "provider"],
            registry=registry,
        )
        self.redis_seconds = redis_round_trips(registry)
        self.client_disconnects = Counter(
            "llm_broker_client_disconnects",
            "Clients that went away before their answer; their jobs are cancelled",
            ["endpoint"],
            registry=registry,
        )
        self._children: dict[tuple[str, str, str, int], tuple[FastCount, FastHistogram]] = {}

    def observe_request(
        self, endpoint: str, model: str, provider: str, status: int, seconds: float
    ) -> None:
        """Count one answered request; the labelled children are looked up once."""
        key = (endpoint, model, provider, status)
        children = self._children.get(key)
        if children is None:
            children = (
                FastCount(self.requests.labels(endpoint, model, provider, str(status))),
                FastHistogram(self.request_seconds.labels(endpoint, provider)),
            )
            self._children[key] = children
        children[0].inc(1)
        children[1].observe(seconds)


class BatchMetrics:
    """The batch driver's (workers/batches.py); a batch's waiting lines are
    llm_broker_queue_waiting{priority="batch"}."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.batches = Counter(
            "llm_broker_batches",
            "Batches that ended, by final status",
            ["api", "status"],
            registry=registry,
        )
        self.lines = Counter(
            "llm_broker_batch_lines",
            "Batch lines taken into a batch's results, by outcome (completed, failed, "
            "expired, cancelled)",
            ["outcome"],
            registry=registry,
        )
        self.running = Gauge(
            "llm_broker_batches_running",
            "Batches not ended (validating, in progress, cancelling), as the driver sees them",
            registry=registry,
            multiprocess_mode="livemax",
        )


#: How a worker's job ends: the ``outcome`` label of ``llm_broker_worker_jobs`` and
#: the fields of the workers' per-minute counts (workers/heartbeat.py).
JOB_OUTCOMES = ("completed", "failed", "expired", "cancelled", "dead_lettered", "fell_back")


def version() -> str:
    """The installed llm-broker's version (``unknown`` in a source tree not installed)."""
    try:
        return metadata.version("llm-broker")
    except metadata.PackageNotFoundError:
        return "unknown"


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.batch = BatchMetrics(registry)
        self.jobs = Counter(
            "llm_broker_worker_jobs",
            "Jobs finished by workers",
            ["provider", "outcome"],
            registry=registry,
        )
        self.upstream_seconds = Histogram(
            "llm_broker_upstream_duration_seconds",
            "Duration of upstream calls",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait_seconds = Histogram(
            "llm_broker_queue_wait_seconds",
            "Time a job waited in the queue",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "llm_broker_upstream_in_flight",
            "Upstream calls in flight in this process",
            ["provider"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.reclaimed = Counter(
            "llm_broker_reclaimed_jobs",
            "Jobs reclaimed from a dead or stalled worker",
            ["provider"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            "llm_broker_dead_lettered_jobs",
            "Jobs moved to the dead-letter stream",
            ["provider"],
            registry=registry,
        )
        self.redis_errors = redis_errors(registry)
        self.redis_seconds = redis_round_trips(registry)
        self.tokens = Counter(
            "llm_broker_tokens",
            "Tokens used by upstream calls (type: input, output, total)",
            ["model", "provider", "type"],
            registry=registry,
        )
        self.cost = Counter(
            "llm_broker_cost_usd",
            "Cost of upstream calls in US dollars, from the config's pricing table "
            "(tenant: a tenant listed in the config's tenants section, else 'other')",
            ["model", "provider", "tenant"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "llm_broker_upstream_errors",
            "Error answers from providers (and failed calls), by the status the client sees",
            ["provider", "status"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "llm_broker_queue_depth",
            "Jobs of a provider waiting or in flight (its waiting lists and its stream); "
            "every worker exports it for its providers: aggregate with max, not sum",
            ["provider"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.queue_waiting = Gauge(
            "llm_broker_queue_waiting",
            "Jobs of one priority class waiting for a provider's workers (aggregate with max)",
            ["provider", "priority"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.queue_oldest_age = Gauge(
            "llm_broker_queue_oldest_age_seconds",
            "Age of the oldest job of one priority class waiting for a provider's workers "
            "(0: none waits; aggregate with max)",
            ["provider", "priority"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.queue_pending = Gauge(
            "llm_broker_queue_pending",
            "Jobs delivered to workers and not yet acknowledged (aggregate with max)",
            ["provider"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.queue_lag = Gauge(
            "llm_broker_queue_lag",
            "Jobs not yet delivered to any worker (aggregate with max)",
            ["provider"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.retries = Counter(
            "llm_broker_upstream_retries",
            "Upstream calls tried again after a retryable error",
            ["provider", "reason"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "llm_broker_fallbacks",
            "Jobs moved on to their next deployment",
            ["from_provider", "to_provider"],
            registry=registry,
        )
        self.aborted = Counter(
            "llm_broker_upstream_aborted",
            "Upstream calls aborted before they finished (job cancelled, client gone, expired)",
            ["provider"],
            registry=registry,
        )
        self.circuit_state = Gauge(
            "llm_broker_circuit_state",
            "Circuit breaker per deployment in this process: 0 closed, 1 open, 2 half-open",
            ["deployment"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.circuit_opened = Counter(
            "llm_broker_circuit_opened",
            "Times a deployment's circuit opened",
            ["deployment"],
            registry=registry,
        )
        self.limit_wait_seconds = Histogram(
            "llm_broker_limit_wait_seconds",
            "Time a call waited for the global concurrency cap or rate limits",
            ["provider"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            "llm_broker_webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, retrying, failed, disabled)",
            ["outcome"],
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "llm_broker_webhook_delivery_duration_seconds",
            "Duration of webhook delivery attempts",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            "llm_broker_webhook_events",
            "Finished jobs handed to webhook delivery",
            registry=registry,
        )
        self.redis_errors = redis_errors(registry)
