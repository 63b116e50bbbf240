"""A provider's worker pool inside one process.

The pool reads its provider's stream with the consumer group, pulling only as
many entries as it has free slots, runs each job against the upstream, writes
the result to ``job:{id}``, sends it to the waiting ingress process, then
acknowledges the entry (XACK + XDEL in one script). Entries left pending by a
dead worker are reclaimed once idle past the lease; the pool keeps its own
entries' idle time fresh so a long call is never stolen.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable
from typing import Any

import msgspec
import orjson
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llm_broker.shared import body as json_body
from llm_broker.shared import messages as m
from llm_broker.shared.config import Config, Price
from llm_broker.shared.errors import (
    BadRequest,
    BrokerError,
    CircuitOpen,
    DeadlineExceeded,
    UpstreamError,
)
from llm_broker.shared.keys import GROUP, Keys
from llm_broker.shared.metrics import WorkerMetrics
from llm_broker.shared.redisio import (
    MOVE,
    REDIS_DOWN,
    SETTLE,
    START,
    Batcher,
    connect,
    ensure_group,
)
from llm_broker.shared.tracing import Tracing, valid_traceparent
from llm_broker.workers.accumulate import StreamAccumulator
from llm_broker.workers.breaker import Breaker, LatencyAverage
from llm_broker.workers.limits import Limits, estimate_tokens
from llm_broker.workers.upstream import Upstream

log = logging.getLogger("llm_broker.worker")

REPLY_MAXLEN = 100_000
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
        batcher: Batcher,
        consumer: str,
        metrics: WorkerMetrics,
        tracing: Tracing,
    ) -> None:
        self.provider = provider
        self.cfg = config
        self.pcfg = config.providers[provider]
        self.wcfg = config.worker
        self.keys = Keys(config.redis.key_prefix)
        self.queue = self.keys.queue(provider)
        self.upstream = upstream
        self.redis = redis
        self.batcher = batcher
        self.consumer = consumer
        self.metrics = metrics
        self.tracing = tracing
        self.result_ttl = int(config.jobs.result_ttl_s)
        self._jobs: dict[str, asyncio.Task[None]] = {}
        #: Upstream calls in progress, by job id (cancellation aborts them).
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._in_flight = metrics.in_flight.labels(provider)
        self._outcomes = {
            outcome: metrics.jobs.labels(provider, outcome)
            for outcome in (
                "completed",
                "failed",
                "expired",
                "cancelled",
                "dead_lettered",
                "fell_back",
            )
        }
        self.limits = Limits(config, provider, batcher, metrics)
        self._breakers: dict[str, Breaker] = {}
        #: Latency averages of the deployments that a lowest-latency route may pick.
        self._latency = {
            f"{provider}/{d.model or name}": LatencyAverage()
            for name, route in config.models.items()
            if route.strategy == "lowest-latency"
            for d in route.all_deployments()
            if d.provider == provider
        }
        self._bookkeeping: set[asyncio.Future[Any]] = set()
        #: When this pool's entries last had their leases refreshed (monotonic).
        self._refreshed_at = 0.0
        self._accounts: dict[str, tuple[Any, Any, Any, Any, Price | None]] = {}
        self._queue_wait = metrics.queue_wait_seconds.labels(provider)
        self._upstream_seconds = metrics.upstream_seconds.labels(provider)

    # ------------------------------------------------------------ lifecycle

    @property
    def free_slots(self) -> int:
        return self.pcfg.max_concurrency - len(self._jobs)

    def stop_reading(self) -> None:
        self._stopping.set()
        self._slot_freed.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for in-flight jobs; True if all finished within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._jobs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait(list(self._jobs.values()), timeout=remaining)
        return True

    async def abandon(self) -> None:
        """Cancel what is still running; its entries stay pending for another worker."""
        for task in self._jobs.values():
            task.cancel()
        await asyncio.gather(*self._jobs.values(), return_exceptions=True)

    async def read_loop(self) -> None:
        """Pull entries while there are free slots, until told to stop."""
        reader = connect(
            self.cfg.redis,
            max_connections=1,
            socket_timeout=self.wcfg.block_ms / 1000 + self.cfg.redis.command_timeout_s,
        )
        backoff = 0.1
        need_group = True
        try:
            while not self._stopping.is_set():
                free = self.free_slots
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                try:
                    if need_group:
                        await self._ensure_group()
                        need_group = False
                    batches = await reader.xreadgroup(
                        GROUP,
                        self.consumer,
                        {self.queue: ">"},
                        count=free,
                        block=self.wcfg.block_ms,
                    )
                    backoff = 0.1
                except ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    need_group = True  # Redis lost the group (restarted empty)
                    continue
                except REDIS_DOWN as e:
                    self.metrics.redis_errors.labels("read").inc()
                    log.warning(
                        "provider %s: cannot read the queue (%s); retrying in %.1fs",
                        self.provider,
                        e,
                        backoff,
                    )
                    await asyncio.sleep(backoff)  # back off while Redis is unreachable
                    backoff = min(backoff * 2, 2.0)
                    continue
                for _stream, entries in batches or ():
                    for entry_id, fields in entries:
                        self._spawn(entry_id.decode(), fields, 1)
        finally:
            await reader.aclose()

    async def maintain_loop(self) -> None:
        """Reclaim stale entries of dead workers and keep this pool's leases fresh."""
        interval = min(max(0.05, self.wcfg.lease_s / 3), self.limits.renew_every)
        next_forget = 0.0
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(self.cfg.redis.command_timeout_s * 4):
                    began = time.monotonic()
                    await self._refresh_leases()
                    self._refreshed_at = began
                    await self._abort_finished()
                    await self._reclaim()
                    if time.monotonic() >= next_forget:
                        await self._forget_dead_consumers()
                        next_forget = time.monotonic() + min(
                            600.0, self.wcfg.forget_consumers_after_s / 2
                        )
            except REDIS_DOWN as e:
                self.metrics.redis_errors.labels("maintain").inc()
                log.warning("provider %s: lease maintenance failed: %s", self.provider, e)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                await self._ensure_group()
            try:
                await asyncio.wait_for(self._stopping.wait(), interval)
            except TimeoutError:
                pass
        # Keep leases fresh while in-flight jobs finish during shutdown.
        while self._jobs:
            try:
                async with asyncio.timeout(self.cfg.redis.command_timeout_s * 4):
                    began = time.monotonic()
                    await self._refresh_leases()
                    self._refreshed_at = began
            except (*REDIS_DOWN, ResponseError) as e:  # type: ignore[misc]
                log.warning("provider %s: lease refresh failed: %s", self.provider, e)
            await asyncio.sleep(interval)  # periodic timer, not synchronisation

    async def _ensure_group(self) -> None:
        async with asyncio.timeout(self.cfg.redis.command_timeout_s * 4):
            await ensure_group(self.redis, self.queue, GROUP)

    async def _refresh_leases(self) -> None:
        """Reset the idle time of the entries this consumer still owns, and push
        forward the expiry of the global-limit leases it holds.

        Only entries still owned are touched: XCLAIM would otherwise take back
        an entry that another worker reclaimed while this one was stalled.
        """
        renew = self.limits.renew_commands()
        if renew:
            await asyncio.gather(*(self.batcher.call(*c) for c in renew))
        if not self._jobs:
            return
        owned = await self.redis.xpending_range(
            # Entries left pending without a running job (Redis was down when
            # they started or settled) come first: look past them.
            self.queue,
            GROUP,
            "-",
            "+",
            len(self._jobs) + 1000,
            consumername=self.consumer,
        )
        ids = [p["message_id"] for p in owned if p["message_id"].decode() in self._jobs]
        if ids:
            await self.redis.xclaim(self.queue, GROUP, self.consumer, 0, ids, justid=True)

    async def _abort_finished(self) -> None:
        """Abort calls whose job was made final elsewhere (cancelled, expired).

        Cancellations also arrive on a pub/sub channel at once; this catches
        those sent while this worker was not subscribed.
        """
        running = list(self._runs)
        if not running:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in running:
                pipe.hget(self.keys.job(job_id), "status")
            statuses = await pipe.execute()
        for job_id, status in zip(running, statuses, strict=True):
            if status is not None and status.decode() in (m.CANCELLED, m.EXPIRED):
                if self.cancel(job_id):
                    log.info("job %s: %s elsewhere; aborting its call", job_id, status.decode())

    async def _forget_dead_consumers(self) -> None:
        """Remove consumers of dead workers once they hold nothing and sat idle long enough.

        Every worker process joins the group under a new name, so without this
        the group's consumer list grows with every restart. Removing a live but
        idle consumer that holds nothing is harmless: its next read re-creates it.
        """
        idle_ms = self.wcfg.forget_consumers_after_s * 1000
        for consumer in await self.redis.xinfo_consumers(self.queue, GROUP):
            name = consumer["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != self.consumer and consumer["pending"] == 0 and consumer["idle"] > idle_ms:
                await self.redis.xgroup_delconsumer(self.queue, GROUP, name)
                log.info("provider %s: removed idle consumer %s", self.provider, name)

    async def _reclaim(self) -> None:
        free = self.free_slots
        if free <= 0:
            return
        lease_ms = int(self.wcfg.lease_s * 1000)
        _next, claimed, _deleted = await self.redis.xautoclaim(
            self.queue, GROUP, self.consumer, lease_ms, "0-0", count=free
        )
        if not claimed:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in claimed:
                pipe.xpending_range(self.queue, GROUP, entry_id, entry_id, 1)
            pending = await pipe.execute()
        for (entry_id, fields), info in zip(claimed, pending, strict=True):
            deliveries = info[0]["times_delivered"] if info else self.wcfg.max_deliveries + 1
            self.metrics.reclaimed.labels(self.provider).inc()
            log.info(
                "provider %s: reclaimed %s (delivery %d)",
                self.provider,
                entry_id.decode(),
                deliveries,
            )
            self._spawn(entry_id.decode(), fields or {}, deliveries)

    def _spawn(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        if entry_id in self._jobs:
            return
        task = asyncio.get_running_loop().create_task(self._handle(entry_id, fields, deliveries))
        self._jobs[entry_id] = task
        self._in_flight.inc()
        task.add_done_callback(lambda _t: self._done(entry_id))

    def _done(self, entry_id: str) -> None:
        self._jobs.pop(entry_id, None)
        self._in_flight.dec()
        self._slot_freed.set()

    # ------------------------------------------------------------ one job

    async def _handle(self, entry_id: str, fields: dict[bytes, bytes], deliveries: int) -> None:
        try:
            await self._handle_entry(entry_id, fields, deliveries)
        except asyncio.CancelledError:
            raise
        except Exception:  # the task boundary: log once, the entry stays pending
            log.exception("provider %s: entry %s failed unexpectedly", self.provider, entry_id)

    async def _handle_entry(
        self, entry_id: str, fields: dict[bytes, bytes], deliveries: int
    ) -> None:
        raw = fields.get(b"j", b"")
        try:
            job = m.job_decoder.decode(raw)
        except msgspec.DecodeError:
            log.error("provider %s: entry %s is not a job; dead-lettered", self.provider, entry_id)
            await self._settle(None, entry_id, dead_letter=raw)
            return
        start = asyncio.ensure_future(self._start(job, deliveries))
        # A first delivery of a job whose client waits, within its deadline, starts
        # its upstream call while the start script runs: one Redis round trip less
        # on every request. The call is aborted if the script says the job must not
        # run (cancelled, expired). A job nobody waits on (async) starts only after
        # the script said so: a job cancelled while queued never reaches the upstream.
        run: asyncio.Task[None] | None = None
        if deliveries == 1 and job.reply_to and job.deadline > time.time():
            run = self._start_run(job, entry_id, start)
        try:
            verdict = await start
        except REDIS_DOWN as e:
            # The entry stays pending and is reclaimed once Redis answers again.
            log.warning("job %s: cannot start (%s); left pending", job.id, _reason(e))
            if run is not None:
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
            return
        if verdict == b"ok" and run is None and deliveries > 1 and job.stream and job.reply_to:
            # The worker that had this stream stopped; its client may hold part of
            # the answer already, and a second run would send it all again.
            err = UpstreamError(
                502,
                "the worker running this stream stopped before it ended; a stream "
                "that may have reached the client is not run again",
                code="upstream_stream_interrupted",
            )
            self._outcomes["failed"].inc()
            log.info("job %s: stream redelivered; failed rather than replayed", job.id)
            await self._fail(job, entry_id, err)
            return
        if verdict == b"ok":
            if run is None:
                run = self._start_run(job, entry_id, start)
            try:
                await run
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                # Only the upstream call was cancelled: the job was cancelled (or
                # made final elsewhere); its record says so already. Close the entry.
                self._outcomes["cancelled"].inc()
                self.metrics.aborted.labels(self.provider).inc()
                log.info("job %s: cancelled; upstream call aborted", job.id)
                await self._settle(job, entry_id)
            return
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        match verdict:
            case b"poison":
                err = UpstreamError(
                    500,
                    f"job was delivered {deliveries} times without finishing "
                    f"(limit {self.wcfg.max_deliveries}); moved to the dead-letter queue",
                    type="server_error",
                    code="max_deliveries_exceeded",
                )
                self.metrics.dead_lettered.labels(self.provider).inc()
                self._outcomes["dead_lettered"].inc()
                log.error("job %s: %s", job.id, err.message)
                await self._fail(job, entry_id, err, dead_letter=raw)
            case b"expired":
                self._outcomes["expired"].inc()
                await self._settle(
                    job,
                    entry_id,
                    http_status=504,
                    reply_kind=m.REPLY_ERROR,
                    reply_data=m.DEADLINE_ERROR,
                )
            case _:  # already final, or its record expired: nothing to do
                await self._settle(job, entry_id)

    async def _start(self, job: m.Job, deliveries: int) -> Any:
        """The START script's verdict on a job; tried again while Redis is unreachable,
        as long as this worker's lease on the entry holds."""
        command = START.command(
            (self.keys.job(job.id), self.keys.webhook_events()),
            (
                time.time(),
                self.wcfg.max_deliveries,
                deliveries,
                job.id,
                job.result_ttl or self.result_ttl,
            ),
        )
        began = time.monotonic()
        backoff = 0.05
        while True:
            try:
                return await self.batcher.call(*command)
            except REDIS_DOWN:
                if not self._lease_holds(began, backoff):
                    raise
                await asyncio.sleep(backoff)  # back off while Redis is unreachable
                backoff = min(backoff * 2, 1.0)

    def _lease_holds(self, since: float, wait: float) -> bool:
        """Whether an entry this worker has held since ``since`` (monotonic) is still
        surely its own ``wait`` seconds from now: no other worker reclaims it before
        ``lease_s`` passed without a refresh."""
        last = max(since, self._refreshed_at)
        return time.monotonic() + wait < last + self.wcfg.lease_s

    def _start_run(
        self, job: m.Job, entry_id: str, start: asyncio.Future[Any]
    ) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._run(job, entry_id, start))
        self._runs[job.id] = task
        task.add_done_callback(
            lambda t: self._runs.pop(job.id) if self._runs.get(job.id) is t else None
        )
        return task

    def cancel(self, job_id: str) -> bool:
        """Abort the upstream call of ``job_id`` if this pool runs it."""
        run = self._runs.get(job_id)
        if run is None or run.done():
            return False
        run.cancel()
        return True

    async def _run(self, job: m.Job, entry_id: str, start: asyncio.Future[Any]) -> None:
        """Call the upstream, with retries; record and send the outcome, or move the
        job on to its next deployment, once ``start`` said "ok"."""
        self._queue_wait.observe(max(0.0, time.time() - job.created))
        if job.deadline <= time.time():
            if await asyncio.shield(start) == b"ok":
                self._outcomes["expired"].inc()
                await self._settle(
                    job,
                    entry_id,
                    status=m.EXPIRED,
                    field="error",
                    payload=m.DEADLINE_ERROR,
                    http_status=504,
                    reply_kind=m.REPLY_ERROR,
                )
            return
        traceparent = valid_traceparent(job.traceparent)
        headers = {"traceparent": traceparent} if traceparent else None
        tries = _Tries(time.time())
        try:
            try:
                body = json_body.decode(job.body)
            except json_body.InvalidBody as e:
                # Ingress checks with the same decoder; a job from elsewhere (or an
                # older ingress) that fails it, or that cannot be encoded again for the
                # upstream (json_body.dump), fails at once, never a redelivery loop.
                raise BadRequest(str(e), code="invalid_json") from e
            if not isinstance(body, dict):
                raise BadRequest("invalid request: expected a JSON object", code="invalid_json")
            if self.tracing.enabled:
                attributes = {"llm_broker.provider": self.provider, "llm_broker.model": job.model}
                with self.tracing.span(
                    "llm_broker.upstream", traceparent, "client", attributes
                ) as child:
                    payload, reply, tokens = await self._attempts(
                        job, body, {"traceparent": child}, start, tries
                    )
            else:
                payload, reply, tokens = await self._attempts(job, body, headers, start, tries)
        except BrokerError as e:
            if await asyncio.shield(start) != b"ok":
                return
            attempt = tries.attempt(job, e.http_status, e.error_code or "")
            if self._may_fall_back(job, e, tries) and await self._fall_back(job, entry_id, attempt):
                return
            self._outcomes["failed"].inc()
            log.info("job %s: upstream error %d: %s", job.id, e.http_status, e.message)
            await self._fail(
                job, entry_id, e, history=tries.history(job, e.http_status, e.error_code or "")
            )
            return
        except Exception as e:
            if isinstance(e, REDIS_DOWN):
                raise  # the entry stays pending; it is reclaimed once Redis answers
            # A defect that the same job would hit on every delivery: fail it once
            # instead of redelivering it until it is dead-lettered.
            if await asyncio.shield(start) != b"ok":
                return
            log.exception("job %s: could not be run", job.id)
            self._outcomes["failed"].inc()
            await self._fail(
                job,
                entry_id,
                UpstreamError(
                    500,
                    "the broker could not run this request",
                    type="server_error",
                    code="internal_error",
                ),
            )
            return
        if await asyncio.shield(start) == b"ok":
            self._outcomes["completed"].inc()
            if tokens is not None:
                self._account(job, *tokens)
            await self._settle(
                job,
                entry_id,
                status=m.COMPLETED,
                field="result",
                payload=payload,
                reply_kind=m.REPLY_RESULT,
                reply_data=reply,
                history=tries.history(job, 200, ""),
                usage=b"%d %d" % tokens if tokens is not None else b"",
            )

    async def _attempts(
        self,
        job: m.Job,
        body: dict[str, Any],
        headers: dict[str, str] | None,
        start: asyncio.Future[Any],
        tries: _Tries,
    ) -> tuple[bytes, bytes | None, tuple[int, int] | None]:
        """Try this deployment, retrying what is worth it; raises the last error.
        Returns the payload, the reply and the (input, output) tokens used."""
        target = job.target
        name = self._deployment(job)
        breaker = self._breakers.get(name) or self._breaker(name)
        limited = self.limits.rule(target) is not None
        cost = estimate_tokens(body, len(job.body), self.pcfg.max_call_tokens) if limited else 0
        refused = f"deployment {name} failed repeatedly; its circuit is open"
        while True:
            if breaker.refusing():
                raise CircuitOpen(refused)
            lease = None
            if limited:
                lease = await self.limits.acquire(job.id, target, cost, job.deadline)
            # Only now, with the limits passed, may this call be a half-open probe.
            if not breaker.allow():
                if lease is not None:
                    self._background(self.limits.release(lease, 0))
                raise CircuitOpen(refused)
            timeout = min(self.pcfg.timeout_s, job.deadline - time.time())
            started = time.monotonic()
            try:
                if timeout <= 0:
                    raise DeadlineExceeded("the request deadline passed before the call")
                payload, reply, usage = await self._call(job, body, timeout, headers, start, tries)
            except UpstreamError as e:
                if lease is not None:
                    # An error before any part of the answer came (refused, 5xx,
                    # timeout, never reached) spent no tokens: the estimate is given
                    # back. A stream cut after some chunks keeps it.
                    spent = None if e.error_code == "upstream_stream_interrupted" else 0
                    self._background(self.limits.release(lease, spent))
                if e.error_code == "upstream_timeout" and timeout < self.pcfg.timeout_s:
                    # The client's deadline ran out, not the upstream's patience:
                    # no verdict on the deployment, nothing left to retry.
                    breaker.abandon()
                    raise DeadlineExceeded(
                        f"no answer within the request deadline of {job.deadline - job.created:g}s"
                    ) from e
                self.metrics.upstream_errors.labels(self.provider, str(e.http_status)).inc()
                if e.retryable or e.error_code == "upstream_auth_failed":
                    breaker.failure()
                else:
                    breaker.success()  # the upstream is up; the request was bad
                delay = self._retry_delay(job, e, tries)
                if delay is None:
                    raise
                tries.retries += 1
                self.metrics.retries.labels(self.provider, str(e.http_status)).inc()
                log.info(
                    "job %s: %s answered %d; retry %d in %.2fs",
                    job.id,
                    name,
                    e.http_status,
                    tries.retries,
                    delay,
                )
                await asyncio.sleep(delay)  # backoff before the retry
                continue
            except BaseException:
                breaker.abandon()
                if lease is not None:
                    self._background(self.limits.release(lease, None))
                raise
            finally:
                self._upstream_seconds.observe(time.monotonic() - started)
            breaker.success()
            if self._latency:
                self._observe_latency(name, time.monotonic() - started)
            tokens = _tokens(usage)
            if lease is not None:
                self._background(self.limits.release(lease, sum(tokens) if tokens else None))
            return payload, reply, tokens

    def _retry_delay(self, job: m.Job, e: UpstreamError, tries: _Tries) -> float | None:
        """How long to wait before retrying after ``e``; None: no retry."""
        rcfg = self.pcfg.retry
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

    async def _call(
        self,
        job: m.Job,
        body: dict[str, Any],
        timeout: float,
        headers: dict[str, str] | None,
        start: asyncio.Future[Any],
        tries: _Tries,
    ) -> tuple[bytes, bytes | None, dict[str, Any] | None]:
        """One upstream call: the job's payload, the reply to send (None: the
        payload itself) and its usage (if the upstream said)."""
        model = job.upstream_model
        if job.kind == m.EMBEDDINGS:
            result = await self.upstream.embed(body, model, timeout, headers)
            result["model"] = job.model
            return orjson.dumps(result), None, _usage(result)
        if not job.stream:
            result = await self.upstream.complete(body, model, timeout, headers)
            result["id"] = _response_id(job)
            result["model"] = job.model
            result["created"] = result.get("created") or int(job.created)
            return orjson.dumps(result), None, _usage(result)
        result = await self._stream(job, body, timeout, headers, start, tries)
        reply = b""
        if job.include_usage and result.get("usage"):
            reply = _frame(
                {
                    "id": result["id"],
                    "object": "chat.completion.chunk",
                    "created": result["created"],
                    "model": job.model,
                    "choices": [],
                    "usage": result["usage"],
                }
            )
        return orjson.dumps(result), reply, _usage(result)

    async def _stream(
        self,
        job: m.Job,
        body: dict[str, Any],
        timeout: float,
        headers: dict[str, str] | None,
        start: asyncio.Future[Any],
        tries: _Tries,
    ) -> dict[str, Any]:
        acc = StreamAccumulator()
        sender = _ChunkSender(self, job)
        response_id = _response_id(job)
        try:
            async for chunk in self.upstream.stream(body, job.upstream_model, timeout, headers):
                if not start.done():
                    # No chunk reaches the client before the job has started. The
                    # start result is shared: a cancel of this call must not cancel it.
                    await asyncio.shield(start)
                acc.add(chunk)
                if not chunk.get("choices") and chunk.get("usage"):
                    continue  # usage is sent at the end, if the client asked for it
                chunk["id"] = response_id
                chunk["model"] = job.model
                chunk["created"] = chunk.get("created") or int(job.created)
                sender.add(_frame(chunk))
                tries.sent = tries.sent or bool(job.reply_to)
        finally:
            await sender.drain()
        return acc.result(response_id, job.model, int(job.created))

    def _may_fall_back(self, job: m.Job, e: BrokerError, tries: _Tries) -> bool:
        if not job.fallbacks or tries.sent or job.deadline <= time.time():
            return False
        if isinstance(e, CircuitOpen):
            return True
        return isinstance(e, UpstreamError) and (
            e.retryable or e.error_code == "upstream_auth_failed"
        )

    async def _fall_back(self, job: m.Job, entry_id: str, attempt: m.Attempt) -> bool:
        """Move the job on to its next deployment; False if it cannot."""
        nxt, rest = job.fallbacks[0], job.fallbacks[1:]
        history = [*job.attempts, attempt]
        moved = msgspec.structs.replace(
            job, provider=nxt.provider, upstream_model=nxt.model, fallbacks=rest, attempts=history
        )
        command = MOVE.command(
            (self.keys.job(job.id), self.queue, self.keys.queue(nxt.provider)),
            (
                GROUP,
                entry_id,
                m.job_encoder.encode(moved),
                nxt.provider,
                msgspec.json.encode(history),
            ),
        )
        try:
            await self.batcher.call(*command)
        except REDIS_DOWN as e:
            # The entry stays pending; it is reclaimed and tried again later.
            log.warning("job %s: could not move on to %s: %s", job.id, nxt.name, e)
            return True
        except ResponseError as e:
            log.warning("job %s: could not move on to %s: %s", job.id, nxt.name, e)
            return False
        self.metrics.fallbacks.labels(self.provider, nxt.provider).inc()
        self._outcomes["fell_back"].inc()
        log.info(
            "job %s: %s failed (%d %s); moved on to %s",
            job.id,
            attempt.deployment,
            attempt.status,
            attempt.error,
            nxt.name,
        )
        return True

    def _account(self, job: m.Job, input_tokens: int, output_tokens: int) -> None:
        """Count a completed call's tokens and cost (per route, children looked up once);
        priced as the client's model name, else as the route."""
        model = job.route or job.model
        found = self._accounts.get(model)
        if found is None:
            tokens = self.metrics.tokens
            found = (
                tokens.labels(model, self.provider, "input"),
                tokens.labels(model, self.provider, "output"),
                tokens.labels(model, self.provider, "total"),
                self.metrics.cost.labels(model, self.provider),
                self.cfg.pricing.get(model),
            )
            self._accounts[model] = found
        found[0].inc(input_tokens)
        found[1].inc(output_tokens)
        found[2].inc(input_tokens + output_tokens)
        price = self.cfg.pricing.get(job.model) or found[4]
        if price is not None:
            found[3].inc(price.cost(input_tokens, output_tokens))

    def _deployment(self, job: m.Job) -> str:
        """The name of the job's deployment in labels and per-deployment state: its
        ``provider/model``, or ``provider/route`` when a wildcard route sends the
        client's own model name upstream (one breaker and series, not one per name)."""
        if job.route.endswith("*") and job.upstream_model == job.model:
            return f"{job.provider}/{job.route}"
        return job.target.name

    def _breaker(self, deployment: str) -> Breaker:
        breaker = Breaker(
            self.pcfg.circuit,
            self.metrics.circuit_state.labels(deployment),
            self.metrics.circuit_opened.labels(deployment),
        )
        self._breakers[deployment] = breaker
        return breaker

    def _observe_latency(self, deployment: str, seconds: float) -> None:
        average = self._latency.get(deployment)
        if average is None:
            return  # no route picks this deployment by latency
        average.observe(seconds)
        now = time.monotonic()
        if now - average.published >= LATENCY_PUBLISH_S and average.value is not None:
            average.published = now
            self._background(
                self.batcher.call("HSET", self.keys.latency(), deployment, average.value)
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

    async def _fail(
        self,
        job: m.Job,
        entry_id: str,
        err: BrokerError,
        dead_letter: bytes | None = None,
        history: bytes = b"",
    ) -> None:
        await self._settle(
            job,
            entry_id,
            status=m.FAILED,
            field="error",
            payload=msgspec.json.encode(err.body()),
            http_status=err.http_status,
            reply_kind=m.REPLY_ERROR,
            retry_after=err.headers.get("Retry-After", ""),
            dead_letter=dead_letter,
            history=history,
        )

    def reply_command(self, job: m.Job, data: bytes) -> tuple[Any, ...] | None:
        """The command sending stream chunks to the waiting ingress process."""
        if not job.reply_to:
            return None
        return (
            "XADD",
            job.reply_to,
            "NOMKSTREAM",
            "MAXLEN",
            "~",
            REPLY_MAXLEN,
            "*",
            "i",
            job.id,
            "k",
            m.REPLY_CHUNKS,
            "d",
            data,
            "s",
            200,
        )

    async def _settle(
        self,
        job: m.Job | None,
        entry_id: str,
        *,
        status: str = "",
        field: str = "",
        payload: bytes = b"",
        http_status: int = 200,
        reply_kind: bytes = b"",
        reply_data: bytes | None = None,
        retry_after: str = "",
        dead_letter: bytes | None = None,
        history: bytes = b"",
        usage: bytes = b"",
    ) -> None:
        """Close one entry: the job's final state first, then the reply, then the ack.

        One script call (plus the dead-letter entry, if any) in one round trip;
        retried while Redis is unreachable, for up to one lease: after that
        another worker may own the entry, and the job state check makes the
        duplicate harmless.
        """
        job_key = self.keys.job(job.id) if job else self.queue
        reply_to = job.reply_to if job and job.reply_to else self.queue
        settle = SETTLE.command(
            (job_key, self.queue, reply_to, self.keys.webhook_events()),
            (
                GROUP,
                entry_id,
                job.id if job else "",
                status,
                time.time(),
                field,
                payload,
                http_status,
                (job.result_ttl if job else 0) or self.result_ttl,
                reply_kind if job and job.reply_to else b"",
                b"" if reply_data is None else reply_data,
                "1" if reply_data is None else "0",
                retry_after,
                REPLY_MAXLEN,
                history,
                usage,
            ),
        )
        commands: list[tuple[Any, ...]] = []
        if job is not None and job.cache_key and status == m.COMPLETED:
            commands.append(("SET", job.cache_key, payload, "EX", job.cache_ttl))
        if dead_letter is not None:
            commands.extend(self._dead_letter_commands(job, entry_id, dead_letter, payload))
        commands.append(settle)
        began = time.monotonic()
        backoff = 0.05
        while True:
            futures = [self.batcher.call(*c) for c in commands]
            try:
                await asyncio.gather(*futures)
                return
            except ResponseError as e:
                await asyncio.gather(*futures, return_exceptions=True)
                log.warning("job %s: %s while settling", job.id if job else entry_id, e)
                return
            except REDIS_DOWN as e:
                await asyncio.gather(*futures, return_exceptions=True)
                self.metrics.redis_errors.labels("settle").inc()
                # The outcome is kept and recorded once Redis answers, while this
                # worker's lease on the entry holds: no other worker runs it again.
                if not self._lease_holds(began, backoff):
                    log.error(
                        "job %s: could not record the result (%s); left pending",
                        job.id if job else entry_id,
                        _reason(e),
                    )
                    return
                await asyncio.sleep(backoff)  # back off while Redis is unreachable
                backoff = min(backoff * 2, 1.0)

    def _dead_letter_commands(
        self, job: m.Job | None, entry_id: str, raw: bytes, error: bytes
    ) -> list[tuple[Any, ...]]:
        """A bounded summary of a dead-lettered entry, in a stream bounded in length
        and age: the job's id, tenant, model and error, its sizes, and at most
        ``worker.dead_letter_body_bytes`` of its request body."""
        key = self.keys.dead_letter(self.provider)
        limit = self.wcfg.dead_letter_body_bytes
        body = job.body if job is not None else raw
        fields: list[Any] = ["entry", entry_id, "consumer", self.consumer, "at", time.time()]
        if job is not None:
            fields += ["job", job.id, "tenant", job.tenant, "model", job.model]
        fields += ["error", error[:2048], "entry_bytes", len(raw), "body_bytes", len(body)]
        fields += ["body", body[:limit], "body_truncated", int(len(body) > limit)]
        ttl = int(self.wcfg.dead_letter_ttl_s)
        oldest = int((time.time() - ttl) * 1000)
        return [
            ("XADD", key, "MAXLEN", "~", self.wcfg.dead_letter_maxlen, "*", *fields),
            ("XTRIM", key, "MINID", "~", f"{oldest}-0"),
            ("EXPIRE", key, ttl),
        ]


class _ChunkSender:
    """Sends a stream's chunks to the waiting ingress process, coalesced.

    The first chunk goes at once; later ones are gathered for at most
    ``coalesce_ms`` so that throughput is not bound by one Redis write per token.
    Writes are chained, so the client sees chunks in order.
    """

    def __init__(self, pool: ProviderPool, job: m.Job) -> None:
        self._pool = pool
        self._job = job
        self._buf: list[bytes] = []
        self._last = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._prev: asyncio.Future[Any] | None = None
        self._interval = pool.wcfg.coalesce_ms / 1000
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
        cmd = self._pool.reply_command(self._job, data)
        if cmd is not None:
            try:
                await self._pool.batcher.call(*cmd)
            except REDIS_DOWN as e:
                log.warning("job %s: lost stream chunks: %s", self._job.id, e)

    async def drain(self) -> None:
        self.flush()
        if self._prev is not None:
            await asyncio.gather(self._prev, return_exceptions=True)


class _Tries:
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

    def history(self, job: m.Job, status: int, error: str) -> bytes:
        """The attempt history for the job record, ending with this deployment's
        outcome; empty when there is nothing to tell (one deployment, no retry)."""
        if not job.attempts and not self.retries:
            return b""
        return msgspec.json.encode([*job.attempts, self.attempt(job, status, error)])


def _reason(e: BaseException) -> str:
    """An exception for a log line: its type too, since some have no message."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _usage(result: dict[str, Any]) -> dict[str, Any] | None:
    usage = result.get("usage")
    return usage if isinstance(usage, dict) else None


def _tokens(usage: dict[str, Any] | None) -> tuple[int, int] | None:
    """(input, output) tokens of an OpenAI usage object (embeddings: output 0)."""
    if usage is None:
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def _response_id(job: m.Job) -> str:
    return f"chatcmpl-{job.id}"


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
