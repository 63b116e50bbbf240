"""A provider's worker pool inside one process: its queue consumer, its call
policy and limits, its upstream, and the runs of the jobs it holds.

The consumer (:mod:`~llm_broker.workers.consumer`) hands each delivery to
:meth:`ProviderPool.handle`, which runs it as a :class:`~llm_broker.workers.run.JobRun`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

import redis.asyncio as aioredis

from llm_broker.shared import messages as m
from llm_broker.shared.config import Config
from llm_broker.shared.keys import Keys
from llm_broker.shared.metrics import JOB_OUTCOMES, FastCount, FastHistogram, WorkerMetrics
from llm_broker.shared.redisio import AnyBatcher
from llm_broker.shared.store import Delivery, JobStore, Outcome
from llm_broker.shared.tracing import Tracing
from llm_broker.workers import shaping
from llm_broker.workers.breaker import LatencyAverage
from llm_broker.workers.call import Pool
from llm_broker.workers.consumer import StreamConsumer
from llm_broker.workers.limits import Limits
from llm_broker.workers.policy import CallPolicy
from llm_broker.workers.run import JobRun, settle
from llm_broker.workers.upstream import Upstream

log = logging.getLogger("llm_broker.worker")

#: A deployment's latency average is written to Redis at most this often.
LATENCY_PUBLISH_S = 1.0


class ProviderPool:
    def __init__(
        self,
        *,
        provider: str,
        config: Config,
        upstream: Upstream,
        redis: aioredis.Redis,
        batcher: AnyBatcher,
        consumer: str,
        metrics: WorkerMetrics,
        tracing: Tracing,
    ) -> None:
        self.provider = provider
        self.upstream = upstream
        self._batcher = batcher
        self._latency_key = Keys(config.redis.key_prefix, cluster=config.redis.cluster).latency()
        self._result_ttl = int(config.jobs.result_ttl_s)
        self._outcomes = {o: FastCount(metrics.jobs.labels(provider, o)) for o in JOB_OUTCOMES}
        #: Latency averages of the deployments that a lowest-latency route may pick.
        self._latency = {
            f"{provider}/{d.model or name}": LatencyAverage()
            for name, route in config.models.items()
            if route.strategy == "lowest-latency"
            for d in route.all_deployments()
            if d.provider == provider
        }
        self._bookkeeping: set[asyncio.Future[Any]] = set()
        self.policy = CallPolicy(config.providers[provider], metrics)
        #: Jobs finished by outcome since the process started (the heartbeat's counts).
        self.counts: dict[str, int] = dict.fromkeys(JOB_OUTCOMES, 0)
        store = JobStore(config, batcher, redis, cluster=config.redis.cluster)
        self.limits = Limits(config, provider, batcher, metrics)
        self.consumer = StreamConsumer(
            provider=provider,
            config=config,
            queues=store.queues,
            consumer=consumer,
            metrics=metrics,
            handle=self.handle,
            renew=self._renew,
            upkeep=self._abort_finished,
            upkeep_every=self.limits.renew_every,
            register=functools.partial(store.register, provider, consumer),
        )
        self._pool = Pool(
            provider=provider,
            pcfg=config.providers[provider],
            max_deliveries=config.worker.max_deliveries,
            coalesce_s=config.worker.coalesce_ms / 1000,
            store=store,
            upstream=upstream,
            policy=self.policy,
            limits=self.limits,
            accounting=shaping.Accounting(config, provider, metrics),
            metrics=metrics,
            tracing=tracing,
            consumer=consumer,
            lease_holds=self.consumer.lease_holds,
            count=self._count,
            observe_latency=self._observe_latency,
            background=self._background,
            calls={},
            loop=asyncio.get_running_loop(),
            queue_wait=FastHistogram(metrics.queue_wait_seconds.labels(provider)),
            upstream_seconds=FastHistogram(metrics.upstream_seconds.labels(provider)),
        )

    # ------------------------------------------------------------ deliveries

    def handle(self, delivery: Delivery) -> Coroutine[Any, Any, None]:
        """The run of a delivery (an entry that holds no job is dead-lettered)."""
        if delivery.job is None:
            log.error(
                "provider %s: entry %s is not a job; dead-lettered",
                self.provider,
                delivery.entry_id,
            )
            return settle(self._pool, delivery, Outcome(dead_letter=True))
        return JobRun(self._pool, delivery, delivery.job, self._result_ttl).handle()

    def slots(self) -> tuple[int, int]:
        """This process's slots for the provider, and how many are free."""
        return self.consumer.capacity, self.consumer.free_slots

    def circuits(self) -> dict[str, str]:
        return self.policy.circuits()

    def cancel(self, job_id: str) -> bool:
        """Abort the upstream call of ``job_id`` if this pool runs it."""
        call = self._pool.calls.get(job_id)
        if call is None or call.done():
            return False
        call.abort()
        return True

    def abort_calls(self) -> None:
        """Abort every upstream call still running (shutdown, after the grace period:
        their entries stay pending for another worker)."""
        for call in list(self._pool.calls.values()):
            call.stop()

    async def _renew(self) -> None:
        """Keep the limit leases of running calls."""
        renew = self.limits.renew_commands()
        if renew:
            await asyncio.gather(*(self._batcher.call(*c) for c in renew))

    async def _abort_finished(self) -> None:
        """Abort the calls of jobs made final elsewhere (cancelled, expired):
        cancellations also arrive at once on a pub/sub channel; this catches those
        sent while this worker was not listening."""
        running = list(self._pool.calls)
        if not running:
            return
        statuses = await self._pool.store.statuses(running)
        for job_id, status in zip(running, statuses, strict=True):
            if status in (m.CANCELLED, m.EXPIRED) and self.cancel(job_id):
                log.info("job %s: %s elsewhere; aborting its call", job_id, status)

    # ------------------------------------------------------------ bookkeeping

    def _count(self, outcome: str) -> None:
        self._outcomes[outcome].inc(1)
        self.counts[outcome] += 1

    def _observe_latency(self, deployment: str, seconds: float) -> None:
        average = self._latency.get(deployment)
        if average is None:
            return  # no route picks this deployment by latency
        average.observe(seconds)
        now = time.monotonic()
        if now - average.published >= LATENCY_PUBLISH_S and average.value is not None:
            average.published = now
            self._background(
                self._batcher.call("HSET", self._latency_key, deployment, average.value)
            )

    def _background(self, aw: Awaitable[Any]) -> None:
        """Run a bookkeeping call (lease release, latency) without waiting for it."""
        task = asyncio.ensure_future(aw)
        self._bookkeeping.add(task)
        task.add_done_callback(self._bookkeeping_done)

    def _bookkeeping_done(self, task: asyncio.Future[Any]) -> None:
        self._bookkeeping.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("provider %s: bookkeeping call failed: %s", self.provider, task.exception())
