"""A job's calls to its current deployment: the circuit, the limits across
workers, retries with backoff, and the answer shaped for the client (a stream's
chunks sent to the waiting ingress process as they come)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from llm_broker.shared import messages as m
from llm_broker.shared.body import estimate_tokens
from llm_broker.shared.config import ProviderConfig
from llm_broker.shared.errors import CircuitOpen, DeadlineExceeded, UpstreamError
from llm_broker.shared.metrics import WorkerMetrics
from llm_broker.shared.redisio import REDIS_DOWN, Observer
from llm_broker.shared.store import JobStore, Verdict
from llm_broker.shared.store.records import Chunks, Usage
from llm_broker.shared.tracing import Tracing
from llm_broker.workers import native, shaping
from llm_broker.workers.accumulate import StreamAccumulator
from llm_broker.workers.limits import Lease, Limits
from llm_broker.workers.policy import CallPolicy, Tries, deployment_name
from llm_broker.workers.upstream import Upstream

log = logging.getLogger("llm_broker.worker")

#: A call's answer: the job's payload, the closing reply (None: the payload
#: itself) and the usage (if the upstream said).
Answer = tuple[bytes, bytes | None, Usage | None]


class Call(Protocol):
    """A job's upstream call in progress (:class:`~llm_broker.workers.run.JobRun`),
    as the pool's cancellations reach it."""

    def done(self) -> bool: ...

    def abort(self) -> None:
        """The job was made final elsewhere: the call is aborted, the entry closed."""

    def stop(self) -> None:
        """The worker stops: the call is aborted, the entry stays pending."""


@dataclass(frozen=True)
class Pool:
    """What a run uses of its provider's pool."""

    provider: str
    pcfg: ProviderConfig
    max_deliveries: int
    coalesce_s: float
    store: JobStore
    upstream: Upstream
    policy: CallPolicy
    limits: Limits
    accounting: shaping.Accounting
    metrics: WorkerMetrics
    tracing: Tracing
    consumer: str
    #: Whether the entry held since a time (monotonic) is still surely this worker's
    #: a number of seconds from now.
    lease_holds: Callable[[float, float], bool]
    #: Counts a delivery's outcome (completed, failed, …).
    count: Callable[[str], None]
    #: Observes a deployment's call latency (seconds).
    observe_latency: Callable[[str, float], None]
    #: Runs a bookkeeping call (a lease release) without waiting for it.
    background: Callable[[Any], None]
    #: The provider's children of the queue wait and upstream call histograms.
    queue_wait: Observer
    upstream_seconds: Observer
    #: The upstream calls in progress, by job id (a cancellation aborts them).
    calls: dict[str, Call]
    #: The event loop (on Python 3.11 asking for the running loop is a system call).
    loop: asyncio.AbstractEventLoop


class DeploymentCall:
    """Tries the job's current deployment until it answers, or raises the error
    that ends its tries (to fall back on, or to fail the job with)."""

    def __init__(
        self, pool: Pool, job: m.Job, tries: Tries, start: asyncio.Future[Verdict]
    ) -> None:
        self.pool = pool
        self.job = job
        self.tries = tries
        self.start = start
        self.name = deployment_name(job)
        self.breaker = pool.policy.breaker(self.name)

    async def run(self, body: dict[str, Any], headers: dict[str, str] | None) -> Answer:
        job, pool = self.job, self.pool
        limited = pool.limits.rule(job.target) is not None
        cost = estimate_tokens(body, len(job.body), pool.pcfg.max_call_tokens) if limited else 0
        while True:
            self._check_circuit()
            lease = None
            if limited:
                lease = await pool.limits.acquire(job.id, job.target, cost, job.deadline)
            # Only now, with the limits passed, may this call be a half-open probe.
            if not self.breaker.allow():
                if lease is not None:
                    pool.background(pool.limits.release(lease, 0))
                self._check_circuit(refusing=True)
            timeout = pool.policy.call_timeout(job)
            started = time.monotonic()
            try:
                if timeout <= 0:
                    raise DeadlineExceeded("the request deadline passed before the call")
                answer = await self._once(body, timeout, headers)
            except UpstreamError as e:
                delay = self._after_error(e, lease, timeout)
                await asyncio.sleep(delay)  # backoff before the retry
                continue
            except BaseException:
                self.breaker.abandon()
                if lease is not None:
                    pool.background(pool.limits.release(lease, None))
                raise
            finally:
                pool.upstream_seconds.observe(time.monotonic() - started)
            self.breaker.success()
            pool.observe_latency(self.name, time.monotonic() - started)
            if lease is not None:
                usage = answer[2]
                pool.background(pool.limits.release(lease, usage.total if usage else None))
            return answer

    def _check_circuit(self, *, refusing: bool = False) -> None:
        if refusing or self.breaker.refusing():
            raise CircuitOpen(f"deployment {self.name} failed repeatedly; its circuit is open")

    def _after_error(self, e: UpstreamError, lease: Lease | None, timeout: float) -> float:
        """The verdict on a failed call; returns the delay before the retry, or raises
        the error that ends the tries."""
        job, pool = self.job, self.pool
        if lease is not None:
            pool.background(pool.limits.release(lease, CallPolicy.spent(e)))
        err = pool.policy.verdict(job, e, timeout, self.breaker)
        if err is not e:
            raise err from e
        pool.metrics.upstream_errors.labels(pool.provider, str(e.http_status)).inc()
        delay = pool.policy.retry_delay(job, e, self.tries)
        if delay is None:
            raise e
        self.tries.retries += 1
        pool.metrics.retries.labels(pool.provider, str(e.http_status)).inc()
        log.info(
            "job %s: %s answered %d; retry %d in %.2fs",
            job.id,
            self.name,
            e.http_status,
            self.tries.retries,
            delay,
        )
        return delay

    async def _once(
        self, body: dict[str, Any], timeout: float, headers: dict[str, str] | None
    ) -> tuple[bytes, bytes | None, Usage | None]:
        """One upstream call: the job's payload, the closing reply (None: the payload
        itself) and its usage (if the upstream said)."""
        job, upstream = self.job, self.pool.upstream
        model = job.upstream_model
        if job.kind == m.EMBEDDINGS:
            result = shaping.embeddings(job, await upstream.embed(body, model, timeout, headers))
            return orjson.dumps(result), None, shaping.usage_of(result)
        if job.kind != m.CHAT:
            return await native.answer(self, body, timeout, headers)
        if not job.stream:
            result = shaping.completion(job, await upstream.complete(body, model, timeout, headers))
            return orjson.dumps(result), None, shaping.usage_of(result)
        result = await self._stream(body, timeout, headers)
        return orjson.dumps(result), shaping.stream_end(job, result), shaping.usage_of(result)

    async def _stream(
        self, body: dict[str, Any], timeout: float, headers: dict[str, str] | None
    ) -> dict[str, Any]:
        job = self.job
        rid = shaping.response_id(job)
        acc = StreamAccumulator()

        async def frames() -> AsyncIterator[bytes]:
            async for found in self.pool.upstream.stream(
                body, job.upstream_model, timeout, headers
            ):
                acc.add(found)
                framed = shaping.chunk(job, found, rid)
                if framed is not None:
                    yield framed

        await self.relay(frames())
        return acc.result(rid, job.model, int(job.created))

    async def relay(self, frames: AsyncIterator[bytes]) -> None:
        """Send a stream's frames to the waiting client as they come."""
        job = self.job
        sender = ChunkSender(self.pool.store, job, self.pool.coalesce_s)
        try:
            async for framed in frames:
                if not self.start.done():
                    # No chunk reaches the client before the job has started.
                    await asyncio.shield(self.start)
                sender.add(framed)
                self.tries.sent = self.tries.sent or bool(job.reply_to)
        finally:
            await sender.drain()


class ChunkSender:
    """Sends a stream's chunks to the waiting ingress process, coalesced.

    The first chunk goes at once; later ones are gathered for at most
    ``interval`` seconds so that throughput is not bound by one Redis write per
    token. Writes are chained, so the client sees chunks in order.
    """

    def __init__(self, store: JobStore, job: m.Job, interval: float) -> None:
        self._store = store
        self._job = job
        self._buf: list[bytes] = []
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._prev: asyncio.Future[Any] | None = None
        self._interval = interval
        self._loop = asyncio.get_running_loop()

    def add(self, frame: bytes) -> None:
        if not self._job.reply_to:
            return
        self._buf.append(frame)
        if self._timer is None:
            delay = self._last + self._interval - self._loop.time()
            if delay <= 0:
                self.flush()
            else:
                self._timer = self._loop.call_later(delay, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buf:
            return
        data = b"".join(self._buf)
        self._buf.clear()
        self._last = self._loop.time()
        self._prev = asyncio.ensure_future(self._send(self._prev, data))

    async def _send(self, prev: asyncio.Future[Any] | None, data: bytes) -> None:
        if prev is not None:
            await asyncio.gather(prev, return_exceptions=True)
        try:
            await self._store.send(self._job, Chunks(data))
        except REDIS_DOWN as e:
            log.warning("job %s: lost stream chunks: %s", self._job.id, e)

    async def drain(self) -> None:
        self.flush()
        if self._prev is not None:
            await asyncio.gather(self._prev, return_exceptions=True)
