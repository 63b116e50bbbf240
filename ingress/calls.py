"""Synchronous calls: enqueue a job, wait on its replies, answer (JSON or SSE).

One path serves ``/v1/chat/completions``, ``/v1/embeddings`` and
``/v1/messages``; a :class:`Renderer` writes the answer in the client's API
(OpenAI as the worker sent it, or Anthropic). Answers may come from the
response cache instead. A client that goes away before its answer has its job
cancelled: the worker holding it aborts the upstream call.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

import msgspec
import orjson
from aiohttp import web

from llm_broker.ingress import cache
from llm_broker.ingress.admission import redis_call, redis_failure, refused
from llm_broker.ingress.context import CONTEXT
from llm_broker.ingress.replies import Waiter
from llm_broker.ingress.state import State
from llm_broker.shared import messages as m
from llm_broker.shared.config import ModelRoute
from llm_broker.shared.errors import BrokerError, DeadlineExceeded
from llm_broker.shared.loop import Expiry
from llm_broker.shared.redisio import REDIS_DOWN
from llm_broker.shared.store import Refused
from llm_broker.shared.store.jobs import admission
from llm_broker.shared.store.records import Chunks, Failure, Reply, Result

log = logging.getLogger("llm_broker.ingress")

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
DONE = b"data: [DONE]\n\n"


class Renderer:
    """Writes answers in the OpenAI API: what the worker sent, as it is."""

    def result(self, data: bytes) -> bytes:
        return data

    def error(self, status: int, data: bytes) -> bytes:
        return data

    def chunks(self, data: bytes) -> bytes:
        return data

    def end(self, data: bytes) -> bytes:
        return data + DONE

    def stream_error(self, data: bytes) -> bytes:
        return b"data: " + data + b"\n\n"

    def replay(self, cached: bytes, include_usage: bool) -> tuple[bytes, bytes]:
        """A cached answer as a stream: (its frames, the closing ones)."""
        return cache.sse_replay(orjson.loads(cached), include_usage)


def run(
    request: web.Request, state: State, job: m.Job, route: ModelRoute, renderer: Renderer
) -> Awaitable[web.StreamResponse]:
    """Answer a synchronous request: from the cache, or by running ``job`` (in a span
    when tracing is on; else the run itself, awaited by the caller)."""
    if not state.tracing.enabled:
        return _run(request, state, job, route, renderer)
    return _traced(request, state, job, route, renderer)


async def _traced(
    request: web.Request, state: State, job: m.Job, route: ModelRoute, renderer: Renderer
) -> web.StreamResponse:
    attributes = {"llm_broker.model": job.model, "llm_broker.request_id": job.id}
    with state.tracing.span("llm_broker.request", job.traceparent, "server", attributes) as tp:
        job.traceparent = tp  # the worker's span continues this one
        return await _run(request, state, job, route, renderer)


async def _run(
    request: web.Request, state: State, job: m.Job, route: ModelRoute, renderer: Renderer
) -> web.StreamResponse:
    ctx = request[CONTEXT]
    plan = None
    # A chat request at a temperature other than 0 is not cached unless its route
    # says so: known from the decoded request, without parsing the body again.
    if state.config.cache.enabled and (
        job.kind in cache.DETERMINISTIC or route.cache_sampling or ctx.temperature == 0
    ):
        body = orjson.loads(job.body)
        plan = cache.plan(
            request, state.config.cache, state.keys, job.tenant, job.kind, body, route
        )
    if plan is not None:
        if plan.read:
            cached: bytes | None = await redis_call(
                state, "cache", job.provider, state.batcher.call("GET", plan.key)
            )
            ctx.cache = "hit" if cached else "miss"
            state.metrics.cache.labels(job.route or job.model, ctx.cache).inc()
            if cached:
                return await _cached(request, job, cached, renderer)
        else:
            ctx.cache = "miss"
            state.metrics.cache.labels(job.route or job.model, "miss").inc()
        job.cache_key, job.cache_ttl = plan.key, state.config.cache.ttl_s
    timeout = job.deadline - job.created
    loop_deadline = state.loop().time() + timeout
    if not state.replies.stream_exists:
        await redis_call(
            state,
            "replies",
            job.provider,
            state.replies.stream_ready(state.config.redis.command_timeout_s),
        )
    replies = state.replies.register(job.id)
    answered = False
    try:
        _admit(state, job, ctx.acct, replies)
        try:
            if job.stream:
                response = await _stream_reply(
                    request, state, job, replies, loop_deadline, renderer
                )
            else:
                reply = await _next_reply(state, job, replies, loop_deadline)
                if isinstance(reply, Result):
                    ctx.usage = reply.usage
                response = _reply(job, renderer, reply)
        except NotAdmitted as e:
            raise await e.error(state, job) from e.cause
        answered = True
        if response.status >= 400 and isinstance(response, web.Response):
            ctx.error_type = error_type(response.body)
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        if not answered:
            # The client went away (or ingress is shutting down): nobody waits.
            endpoint = request.match_info.route.resource
            state.metrics.client_disconnects.labels(
                endpoint.canonical if endpoint is not None else ""
            ).inc()
            _background(state, _cancel(state, job))
        raise
    finally:
        state.replies.unregister(job.id)


def error_type(body: object) -> str:
    """The type of an error body (OpenAI's or Anthropic's shape)."""
    try:
        found: Any = orjson.loads(body)  # type: ignore[arg-type]
        return str(found["error"]["type"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return "upstream_error"


async def _cached(
    request: web.Request, job: m.Job, cached: bytes, renderer: Renderer
) -> web.StreamResponse:
    headers = {"X-Request-Id": job.id, "X-Cache": "hit"}
    if not job.stream:
        return web.Response(
            body=renderer.result(cached), content_type="application/json", headers=headers
        )
    chunks, closing = renderer.replay(cached, job.include_usage)
    response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
    await response.prepare(request)
    await response.write(renderer.chunks(chunks) + renderer.end(closing))
    await response.write_eof()
    return response


class NotAdmitted(Exception):
    """A call's admission failed (``cause``: the Redis error) or was refused (``why``)."""

    def __init__(self, why: Refused | None, cause: BaseException | None, since: float) -> None:
        super().__init__(why or cause)
        self.why, self.cause, self.since = why, cause, since

    async def error(self, state: State, job: m.Job) -> BrokerError:
        """The client's error, as :func:`redis_call` or :func:`refused` gives it."""
        if self.why is not None:
            return refused(state, job, self.why)
        if isinstance(self.cause, REDIS_DOWN):
            return await redis_failure(
                state, "enqueue", job.provider, self.cause, job.id, self.since
            )
        raise self.cause or RuntimeError("admission failed")


def _admit(state: State, job: m.Job, acct: bytes, replies: Waiter) -> None:
    """Send the call's admission. Its answer wakes the call only when the call was
    not admitted (``replies`` then raises :class:`NotAdmitted`): an admitted call
    waits for its reply alone, one step of its task less a call."""
    pcfg = state.config.providers[job.provider]
    job.result_ttl = job.result_ttl or int(state.config.jobs.sync_result_ttl_s)
    ttl = int(job.deadline - job.created) + job.result_ttl
    call = state.store.enqueue_call(job, max_depth=pcfg.max_queue_depth, ttl_s=ttl, acct=acct)
    since = state.loop().time()

    def answered(fut: asyncio.Future[Any]) -> None:
        try:
            why = admission(fut.result())
        except BaseException as e:
            # Redis's error, an answer this version cannot read, or a cancel (which
            # no batcher makes): the call must not wait on to its deadline.
            replies.fail(NotAdmitted(None, e, since))
            return
        if why is not None:
            replies.fail(NotAdmitted(why, None, since))

    call.add_done_callback(answered)


def _reply(job: m.Job, renderer: Renderer, reply: Reply) -> web.Response:
    """A whole answer: a result, or an error before anything was sent."""
    headers = {"X-Request-Id": job.id}
    if job.cache_key:
        headers["X-Cache"] = "miss"
    data = reply.data or b""
    if isinstance(reply, Failure):
        if reply.retry_after:
            headers["Retry-After"] = reply.retry_after
        body, status = renderer.error(reply.status, data), reply.status
    else:
        body, status = renderer.result(data), 200
    return web.Response(body=body, status=status, content_type="application/json", headers=headers)


async def _next_reply(state: State, job: m.Job, replies: Waiter, loop_deadline: float) -> Reply:
    try:
        async with Expiry(state.loop.deadlines(), loop_deadline):
            return await replies.get()
    except TimeoutError:
        await _expire(state, job)
        raise DeadlineExceeded(
            f"no answer within the request deadline of {job.deadline - job.created:g}s"
        ) from None


async def _expire(state: State, job: m.Job) -> None:
    """Mark the job expired so that no worker starts it."""
    try:
        async with asyncio.timeout(state.config.redis.command_timeout_s):
            await state.store.expire(job)
    except REDIS_DOWN as e:
        log.warning("job %s: could not mark expired: %s", job.id, e)


async def _cancel(state: State, job: m.Job) -> None:
    """Cancel a job whose client went away; the worker running it aborts its call."""
    try:
        await state.store.cancel(job.id, job.tenant, result_ttl=job.result_ttl)
        log.info("job %s: client went away; cancelled", job.id)
    except REDIS_DOWN as e:
        log.warning("job %s: client went away, but the job could not be cancelled: %s", job.id, e)


def _background(state: State, coro: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def _stream_reply(
    request: web.Request,
    state: State,
    job: m.Job,
    replies: Waiter,
    loop_deadline: float,
    renderer: Renderer,
) -> web.StreamResponse:
    reply = await _next_reply(state, job, replies, loop_deadline)
    if isinstance(reply, Failure):
        # Nothing was sent yet: the client gets a plain HTTP error.
        return _reply(job, renderer, reply)
    headers = {**SSE_HEADERS, "X-Request-Id": job.id}
    if job.cache_key:
        headers["X-Cache"] = "miss"
    response = web.StreamResponse(headers=headers)
    await response.prepare(request)
    state.metrics.ttft_seconds.labels(job.provider).observe(time.time() - job.created)
    while True:
        match reply:
            case Chunks(data=data):
                await response.write(renderer.chunks(data))
            case Result(data=data, usage=usage):
                request[CONTEXT].usage = usage
                await response.write(renderer.end(data or b""))
                break
            case Failure(data=data):  # an error after the stream started: an error event
                await response.write(renderer.stream_error(data or b""))
                break
        try:
            reply = await _next_reply(state, job, replies, loop_deadline)
        except DeadlineExceeded as e:
            await response.write(renderer.stream_error(msgspec.json.encode(e.body())))
            break
    await response.write_eof()
    return response
