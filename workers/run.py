"""One delivery of a job, from its start to its settlement.

A :class:`JobRun` holds the delivery, the job's start (the start script's
verdict, awaited by whatever must not happen before it), its body and its tries
on the current deployment. It calls the deployment
(:class:`~llm_broker.workers.call.DeploymentCall`) and ends the delivery one way:
completed, failed, expired, moved on to the next deployment (fallback), or
closed because the job was made final elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from llm_broker.shared import body as json_body
from llm_broker.shared import messages as m
from llm_broker.shared.errors import (
    BadRequest,
    BrokerError,
    UpstreamError,
)
from llm_broker.shared.redisio import REDIS_DOWN
from llm_broker.shared.store import Delivery, Outcome, Verdict
from llm_broker.shared.store.records import Failure, Result
from llm_broker.shared.tracing import valid_traceparent
from llm_broker.workers.call import Answer, DeploymentCall, Pool
from llm_broker.workers.policy import CallPolicy, Tries

log = logging.getLogger("llm_broker.worker")

#: The error of a stream whose worker stopped: it is not run again.
_STREAM_INTERRUPTED = (
    "the worker running this stream stopped before it ended; a stream "
    "that may have reached the client is not run again"
)


class JobRun:
    def __init__(self, pool: Pool, delivery: Delivery, job: m.Job, result_ttl: int) -> None:
        self.pool = pool
        self.delivery = delivery
        self.job = job
        self.result_ttl = job.result_ttl or result_ttl
        began = time.time()
        self.tries = Tries(began)
        #: A first delivery of a job whose client waits, within its deadline, runs
        #: without the start function (see :meth:`handle`); on a Redis Cluster, not
        #: one that fell back from another provider (dispatch there cannot read its
        #: record: start says whether it was cancelled meanwhile).
        self.early = (
            delivery.deliveries == 1
            and bool(job.reply_to)
            and job.deadline > began
            and not (job.attempts and pool.store.keys.cluster)
        )
        self.began = began
        self.start: asyncio.Future[Verdict]
        #: The upstream call's own task, once started (a delivery that waited for
        #: the start function): cancelled to abort the call.
        self.call: asyncio.Task[None] | None = None
        #: An early call runs in the delivery's task itself (one task a job, not
        #: two), set as its run begins; ``aborted`` says that a cancel of it was
        #: the job's (abort: the entry is closed), not the worker's (stop: it
        #: stays pending).
        self._task: asyncio.Task[Any] | None = None
        self._aborted = False
        if self.early:
            self.start = pool.loop.create_future()
            self.start.set_result(Verdict.RUN)
            pool.calls[job.id] = self
        else:
            self.start = asyncio.ensure_future(self._start())

    # ------------------------------------------------------------ start

    async def _start(self) -> Verdict:
        """The start script's verdict; tried again while Redis is unreachable, as
        long as this worker's lease on the entry holds."""
        began = time.monotonic()
        backoff = 0.05
        while True:
            try:
                return await self.pool.store.start(self.delivery, result_ttl=self.result_ttl)
            except REDIS_DOWN:
                if not self.pool.lease_holds(began, backoff):
                    raise
                await asyncio.sleep(backoff)  # back off while Redis is unreachable
                backoff = min(backoff * 2, 1.0)

    def verdict(self) -> asyncio.Future[Verdict]:
        """The start script's verdict, shielded: a cancel of the call must not cancel
        the shared start."""
        return asyncio.shield(self.start)

    # ------------------------------------------------------------ the delivery

    async def handle(self) -> None:
        """Start the job, run it if the start says so, and close the delivery."""
        if self.early:
            await self._run_early()
            return
        job, pool = self.job, self.pool
        # A first delivery of a job whose client waits, within its deadline, calls
        # the upstream at once, without the start function: two Redis round trips
        # (one on its path) less on every synchronous call. Its settlement records
        # when it started and counts the attempt, and records nothing over a job made
        # final meanwhile (its client went away, its deadline passed); a cancel
        # aborts the call as it does any other. A cancelled or expired job is
        # dropped before it reaches the stream (dispatch skips it), and the stream
        # holds only what free slots take at once, so the window in which a job is
        # cancelled after dispatch and before this delivery is that of one read.
        # Every other delivery (async jobs, redeliveries) waits for the start
        # function: a job cancelled while queued never reaches the upstream.
        try:
            verdict = await self.start
        except REDIS_DOWN as e:
            # The entry stays pending and is reclaimed once Redis answers again.
            log.warning("job %s: cannot start (%s); left pending", job.id, reason(e))
            await self._abort_call()
            return
        if verdict is not Verdict.RUN:
            await self._abort_call()
            await self._not_run(verdict)
            return
        if self.call is None and self.delivery.deliveries > 1 and job.stream and job.reply_to:
            # The worker that had this stream stopped; its client may hold part of
            # the answer already, and a second run would send it all again.
            pool.count("failed")
            log.info("job %s: stream redelivered; failed rather than replayed", job.id)
            await self.fail(stream_interrupted())
            return
        call = self.call or self._begin_call()
        try:
            await call
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
            # Only the upstream call was cancelled: the job was cancelled (or made
            # final elsewhere); its record says so already. Close the entry.
            await self._closed_by_cancel()

    async def _run_early(self) -> None:
        """An early call, in the delivery's task: the upstream request is written in
        this task's first step, as the delivery is read."""
        job_id, calls = self.job.id, self.pool.calls
        self._task = task = asyncio.current_task(self.pool.loop)
        try:
            if not self._aborted:
                try:
                    await self.run()
                    return
                except asyncio.CancelledError:
                    assert task is not None
                    if not self._aborted or task.uncancel():
                        raise  # the worker stops (too): the entry stays pending
            await self._closed_by_cancel()
        finally:
            if calls.get(job_id) is self:
                del calls[job_id]

    async def _closed_by_cancel(self) -> None:
        pool = self.pool
        pool.count("cancelled")
        pool.metrics.aborted.labels(pool.provider).inc()
        log.info("job %s: cancelled; upstream call aborted", self.job.id)
        await self.settle(Outcome())

    # ------------------------------------------------------------ the call's handle

    def done(self) -> bool:
        """Whether the call is over, or aborted already (the worker's cancel and
        abort ask first)."""
        task = self.call or self._task
        return (self.call is None and self._aborted) or (task is not None and task.done())

    def abort(self) -> None:
        """The job was made final elsewhere: abort the call, and close the entry."""
        if self.call is not None:
            self.call.cancel()  # handle closes the entry
        elif not self._aborted:  # (once: a second cancel would cut the closing short)
            self._aborted = True
            if self._task is not None:
                self._task.cancel()

    def stop(self) -> None:
        """The worker stops: abort the call; the entry stays pending."""
        task = self.call or self._task
        if task is not None:
            task.cancel()

    async def _not_run(self, verdict: Verdict) -> None:
        pool, job = self.pool, self.job
        match verdict:
            case Verdict.POISON:
                err = UpstreamError(
                    500,
                    f"job was delivered {self.delivery.deliveries} times without finishing "
                    f"(limit {pool.max_deliveries}); moved to the dead-letter queue",
                    type="server_error",
                    code="max_deliveries_exceeded",
                )
                pool.metrics.dead_lettered.labels(pool.provider).inc()
                pool.count("dead_lettered")
                log.error("job %s: %s", job.id, err.message)
                await self.fail(err, dead_letter=True)
            case Verdict.EXPIRED:  # the start script made it expired
                pool.count("expired")
                reply = Failure(504, m.DEADLINE_ERROR)
                await self.settle(Outcome(http_status=504, reply=reply))
            case _:  # already final, or its record expired: nothing to do
                await self.settle(Outcome())

    def _begin_call(self) -> asyncio.Task[None]:
        job_id, calls = self.job.id, self.pool.calls
        self.call = task = self.pool.loop.create_task(self.run())
        calls[job_id] = self
        task.add_done_callback(lambda _t: calls.pop(job_id) if calls.get(job_id) is self else None)
        return task

    async def _abort_call(self) -> None:
        if self.call is not None:
            self.call.cancel()
            await asyncio.gather(self.call, return_exceptions=True)

    # ------------------------------------------------------------ settlement

    def settle(self, outcome: Outcome) -> Coroutine[Any, Any, None]:
        """Close the delivery (:func:`settle`)."""
        if self.early and outcome.status:
            outcome.started_at = self.began
        return settle(self.pool, self.delivery, outcome)

    async def may_record(self) -> bool:
        """Whether the call's outcome may be recorded: the start function said
        "run", or there was none (an early call: the settle function records nothing
        over a job made final meanwhile)."""
        return self.early or await self.verdict() is Verdict.RUN

    async def fail(
        self,
        err: BrokerError,
        *,
        dead_letter: bool = False,
        history: list[m.Attempt] | None = None,
    ) -> None:
        payload = msgspec.json.encode(err.body())
        await self.settle(
            Outcome(
                status=m.FAILED,
                payload=payload,
                http_status=err.http_status,
                reply=Failure(err.http_status, retry_after=err.headers.get("Retry-After", "")),
                history=history or [],
                dead_letter=dead_letter,
            )
        )

    # ------------------------------------------------------------ the call

    async def run(self) -> None:
        """Call the upstream, with retries; record and send the outcome, or move the
        job on to its next deployment, once the start said "run"."""
        pool, job = self.pool, self.job
        now = time.time()
        waited = max(0.0, now - job.created)
        try:
            await self._run(now)
        finally:  # off the path of the reply
            pool.queue_wait.observe(waited)

    async def _run(self, now: float) -> None:
        pool, job = self.pool, self.job
        if job.deadline <= now:
            if await self.may_record():
                pool.count("expired")
                await self.settle(
                    Outcome(
                        status=m.EXPIRED,
                        payload=m.DEADLINE_ERROR,
                        http_status=504,
                        reply=Failure(504),
                    )
                )
            return
        try:
            payload, closing, usage = await self._traced()
        except BrokerError as e:
            await self._failed(e)
            return
        except Exception as e:
            if isinstance(e, REDIS_DOWN):
                raise  # the entry stays pending; it is reclaimed once Redis answers
            # A defect that the same job would hit on every delivery: fail it once
            # instead of redelivering it until it is dead-lettered.
            if not await self.may_record():
                return
            log.exception("job %s: could not be run", job.id)
            pool.count("failed")
            await self.fail(
                UpstreamError(
                    500,
                    "the broker could not run this request",
                    type="server_error",
                    code="internal_error",
                )
            )
            return
        if await self.may_record():
            await self.settle(
                Outcome(
                    status=m.COMPLETED,
                    payload=payload,
                    reply=Result(closing, usage),
                    history=self.tries.history(job, 200, ""),
                    usage=usage,
                )
            )
            # Counted once the reply is on its way.
            pool.count("completed")
            if usage is not None:
                pool.accounting.count(job, usage)

    def _traced(self) -> Awaitable[Answer]:
        """The job's body decoded, then its attempts, in a span when tracing is on
        (else the call itself, awaited by the caller: one coroutine less a job)."""
        job, pool = self.job, self.pool
        traceparent = valid_traceparent(job.traceparent)
        try:
            body = json_body.decode(job.body)
        except json_body.InvalidBody as e:
            # Ingress checks with the same decoder; a job from elsewhere (or an older
            # ingress) that fails it, or that cannot be encoded again for the upstream
            # (json_body.dump), fails at once, never a redelivery loop.
            raise BadRequest(str(e), code="invalid_json") from e
        if not isinstance(body, dict):
            raise BadRequest("invalid request: expected a JSON object", code="invalid_json")
        call = DeploymentCall(pool, job, self.tries, self.start)
        if not pool.tracing.enabled:
            return call.run(body, {"traceparent": traceparent} if traceparent else None)
        return self._in_span(call, body, traceparent)

    async def _in_span(
        self, call: DeploymentCall, body: dict[str, Any], traceparent: str
    ) -> Answer:
        pool, job = self.pool, self.job
        attributes = {"llm_broker.provider": pool.provider, "llm_broker.model": job.model}
        with pool.tracing.span("llm_broker.upstream", traceparent, "client", attributes) as child:
            return await call.run(body, {"traceparent": child})

    async def _failed(self, e: BrokerError) -> None:
        """The deployment failed the job: fall back to the next one, or fail it."""
        job, pool = self.job, self.pool
        if not await self.may_record():
            return
        code = e.error_code or ""
        attempt = self.tries.attempt(job, e.http_status, code)
        if CallPolicy.may_fall_back(job, e, self.tries) and await self._fall_back(attempt):
            return
        pool.count("failed")
        log.info("job %s: upstream error %d: %s", job.id, e.http_status, e.message)
        await self.fail(e, history=self.tries.history(job, e.http_status, code))

    async def _fall_back(self, attempt: m.Attempt) -> bool:
        """Move the job on to its next deployment; False if it cannot."""
        job, pool = self.job, self.pool
        nxt, rest = job.fallbacks[0], job.fallbacks[1:]
        moved = msgspec.structs.replace(
            job,
            provider=nxt.provider,
            upstream_model=nxt.model,
            fallbacks=rest,
            attempts=[*job.attempts, attempt],
        )
        try:
            await pool.store.move(self.delivery, moved, consumer=pool.consumer)
        except REDIS_DOWN as e:
            # The entry stays pending; it is reclaimed and tried again later.
            log.warning("job %s: could not move on to %s: %s", job.id, nxt.name, e)
            return True
        except ResponseError as e:
            log.warning("job %s: could not move on to %s: %s", job.id, nxt.name, e)
            return False
        pool.metrics.fallbacks.labels(pool.provider, nxt.provider).inc()
        pool.count("fell_back")
        log.info(
            "job %s: %s failed (%d %s); moved on to %s",
            job.id,
            attempt.deployment,
            attempt.status,
            attempt.error,
            nxt.name,
        )
        return True


async def settle(pool: Pool, delivery: Delivery, outcome: Outcome) -> None:
    """Close a delivery: retried while Redis is unreachable, for as long as the lease
    holds (after that another worker may own the entry, and the job state check
    makes the duplicate harmless). Also for deliveries that hold no job."""
    began = time.monotonic()
    backoff = 0.05
    what = delivery.job.id if delivery.job is not None else delivery.entry_id
    while True:
        try:
            await pool.store.settle(delivery, outcome, consumer=pool.consumer)
            return
        except ResponseError as e:
            log.warning("job %s: %s while settling", what, e)
            return
        except REDIS_DOWN as e:
            pool.metrics.redis_errors.labels("settle").inc()
            # The outcome is kept and recorded once Redis answers, while this
            # worker's lease on the entry holds: no other worker runs it again.
            if not pool.lease_holds(began, backoff):
                log.error("job %s: could not record the result (%s); left pending", what, reason(e))
                return
            await asyncio.sleep(backoff)  # back off while Redis is unreachable
            backoff = min(backoff * 2, 1.0)


def stream_interrupted() -> UpstreamError:
    return UpstreamError(502, _STREAM_INTERRUPTED, code="upstream_stream_interrupted")


def reason(e: BaseException) -> str:
    """An exception for a log line: its type too, since some have no message."""
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
