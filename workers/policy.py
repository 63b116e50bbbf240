"""The call policy of one provider's pool: when to retry a failed call, what a
failure says about the deployment (its circuit), what a failed call spent, and
when a job moves on to its next deployment. Decided on error types and their
attributes; no Redis here."""

from __future__ import annotations

import random
import time

from llm_broker.shared import messages as m
from llm_broker.shared.config import ProviderConfig
from llm_broker.shared.errors import (
    BrokerError,
    CircuitOpen,
    DeadlineExceeded,
    UpstreamError,
    UpstreamStreamInterrupted,
    UpstreamTimeout,
)
from llm_broker.shared.metrics import WorkerMetrics
from llm_broker.workers.breaker import STATE_NAMES, Breaker


class Tries:
    """What happened so far on a job's current deployment."""

    __slots__ = ("began", "retries", "sent")

    def __init__(self, began: float) -> None:
        self.began = began
        self.retries = 0
        #: A chunk of the answer reached the client: no retry, no fallback.
        self.sent = False

    def attempt(self, job: m.Job, status: int, error: str) -> m.Attempt:
        return m.Attempt(
            deployment=job.target.name,
            status=status,
            error=error,
            retries=self.retries,
            started=self.began,
            seconds=round(time.time() - self.began, 6),
        )

    def history(self, job: m.Job, status: int, error: str) -> list[m.Attempt]:
        """The attempt history for the job record, ending with this deployment's
        outcome; empty when there is nothing to tell (one deployment, no retry)."""
        if not job.attempts and not self.retries:
            return []
        return [*job.attempts, self.attempt(job, status, error)]


class CallPolicy:
    def __init__(self, pcfg: ProviderConfig, metrics: WorkerMetrics) -> None:
        self._pcfg = pcfg
        self._metrics = metrics
        self._breakers: dict[str, Breaker] = {}

    def breaker(self, deployment: str) -> Breaker:
        found = self._breakers.get(deployment)
        if found is None:
            found = self._breakers[deployment] = Breaker(
                self._pcfg.circuit,
                self._metrics.circuit_state.labels(deployment),
                self._metrics.circuit_opened.labels(deployment),
            )
        return found

    def circuits(self) -> dict[str, str]:
        """Each deployment this process has called, and its circuit's state here."""
        return {name: STATE_NAMES[b.state] for name, b in self._breakers.items()}

    def call_timeout(self, job: m.Job) -> float:
        """The call's timeout: the provider's, or what is left of the job's deadline."""
        return min(self._pcfg.timeout_s, job.deadline - time.time())

    @staticmethod
    def spent(e: UpstreamError) -> int | None:
        """Tokens a failed call spent, for its rate lease: none before any part of the
        answer came (refused, 5xx, timeout, never reached); a stream cut after some
        chunks keeps the estimate (None)."""
        return None if isinstance(e, UpstreamStreamInterrupted) else 0

    def verdict(
        self, job: m.Job, e: UpstreamError, timeout: float, breaker: Breaker
    ) -> BrokerError:
        """Record what a failed call says about the deployment; returns the error to go
        on with (the client's deadline, not the upstream, ran out: a deadline error,
        and no verdict on the deployment)."""
        if isinstance(e, UpstreamTimeout) and timeout < self._pcfg.timeout_s:
            breaker.abandon()
            return DeadlineExceeded(
                f"no answer within the request deadline of {job.deadline - job.created:g}s"
            )
        if e.deployment_fault:
            breaker.failure()
        else:
            breaker.success()  # the upstream is up; the request was bad
        return e

    def retry_delay(self, job: m.Job, e: UpstreamError, tries: Tries) -> float | None:
        """How long to wait before retrying after ``e``; None: no retry."""
        rcfg = self._pcfg.retry
        if not e.retryable or tries.sent or tries.retries >= rcfg.max_retries:
            return None
        ceiling = min(rcfg.max_s, rcfg.base_s * 2**tries.retries)
        delay = random.uniform(ceiling / 2, ceiling)
        if e.retry_after_s is not None:
            if e.retry_after_s > rcfg.max_retry_after_s:
                return None
            delay = max(delay, e.retry_after_s)
        if time.time() + delay >= job.deadline:
            return None
        return delay

    @staticmethod
    def may_fall_back(job: m.Job, e: BrokerError, tries: Tries) -> bool:
        """Whether the job moves on to its next deployment after ``e``."""
        if not job.fallbacks or tries.sent or job.deadline <= time.time():
            return False
        if isinstance(e, CircuitOpen) or e.error_code == "untranslatable":
            return True  # a deployment of another API may take what this one cannot
        return isinstance(e, UpstreamError) and e.deployment_fault


def deployment_name(job: m.Job) -> str:
    """The name of the job's deployment in labels and per-deployment state: its
    ``provider/model``, or ``provider/route`` when a wildcard route sends the
    client's own model name upstream (one breaker and series, not one per name)."""
    if job.route.endswith("*") and job.upstream_model == job.model:
        return f"{job.provider}/{job.route}"
    return job.target.name
