"""The ingress aiohttp application: auth, validation, admission, reply routing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingress.auth import Authenticator
from ingress.common import (
    STATE,
    State,
    call_redis,
    json_response,
    new_job,
    queue_full,
    read_json_body,
    too_large,
)
from ingress.jobs import cancel_job, get_job, list_jobs, post_job, prefers_async, submit
from ingress.replies import Reply, ReplyRouter, Waiter
from shared import messages as m
from shared.config import Config, Router
from shared.errors import BrokerError, DeadlineExceeded, MethodNotAllowed, NotFound
from shared.keys import Keys
from shared.metrics import IngressMetrics
from shared.redisio import EXPIRE_JOB, REDIS_DOWN, Batcher, connect, enqueue_command
from shared.ssrf import networks

log = logging.getLogger("llm_broker.ingress")

_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_DONE = b"data: [DONE]\n\n"


def _error_response(err: BrokerError) -> web.Response:
    return json_response(err.body(), err.http_status, err.headers or None)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turns every error into an OpenAI error object and counts the request."""
    state = request.app[STATE]
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except BrokerError as e:
        status = e.http_status
        response = _error_response(e)
        if "job_id" in request:
            response.headers["X-Request-Id"] = request["job_id"]
        return response
    except web.HTTPException as e:
        status = e.status
        if e.status == 404:
            return _error_response(NotFound(f"no route for {request.method} {request.path}"))
        if e.status == 405:
            allowed = e.headers.get("Allow", "")
            return _error_response(
                MethodNotAllowed(
                    f"method {request.method} is not allowed on {request.path}"
                    + (f" (allowed: {allowed})" if allowed else "")
                )
            )
        if e.status == 413:
            return _error_response(too_large(state.config.ingress.max_body_bytes))
        raise
    finally:
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        provider = request.get("provider", "")
        state.metrics.observe_request(
            endpoint, request.get("model", ""), provider, status, time.perf_counter() - started
        )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    tenant = state.auth.tenant(request.headers.get("Authorization"))
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    if prefers_async(request):
        return await submit(request, state, tenant, raw, raw, webhook_url=None, metadata=None)
    job = new_job(request, state, tenant, raw, reply_to=state.replies.stream)
    timeout = job.deadline - job.created
    loop_deadline = asyncio.get_running_loop().time() + timeout
    replies = state.replies.register(job.id)
    try:
        await _enqueue(state, job)
        if job.stream:
            return await _stream_reply(request, state, job, replies, loop_deadline)
        _kind, data, status, retry_after = await _next_reply(state, job, replies, loop_deadline)
        return _reply_response(job, data, status, retry_after)
    finally:
        state.replies.unregister(job.id)


async def _enqueue(state: State, job: m.Job) -> None:
    pcfg = state.config.providers[job.provider]
    ttl = int(job.deadline - job.created + state.config.jobs.result_ttl_s)
    command = enqueue_command(state.keys, job, pcfg.max_queue_depth, ttl)
    if await call_redis(state, "enqueue", job.provider, *command) is None:
        raise queue_full(state, job.provider)


def _reply_response(job: m.Job, data: bytes, status: int, retry_after: str) -> web.Response:
    headers = {"X-Request-Id": job.id}
    if retry_after:
        headers["Retry-After"] = retry_after
    return web.Response(body=data, status=status, content_type="application/json", headers=headers)


async def _next_reply(state: State, job: m.Job, replies: Waiter, loop_deadline: float) -> Reply:
    try:
        async with asyncio.timeout_at(loop_deadline):
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
            await state.batcher.call(
                *EXPIRE_JOB.command(
                    (state.keys.job(job.id), state.keys.webhook_events()),
                    (time.time(), job.id, int(state.config.jobs.result_ttl_s)),
                )
            )
    except REDIS_DOWN as e:
        log.warning("job %s: could not mark expired: %s", job.id, e)


async def _stream_reply(
    request: web.Request,
    state: State,
    job: m.Job,
    replies: Waiter,
    loop_deadline: float,
) -> web.StreamResponse:
    kind, data, status, retry_after = await _next_reply(state, job, replies, loop_deadline)
    if kind == m.REPLY_ERROR:
        # Nothing was sent yet: the client gets a plain HTTP error.
        return _reply_response(job, data, status, retry_after)
    started = time.perf_counter()
    response = web.StreamResponse(headers={**_SSE_HEADERS, "X-Request-Id": job.id})
    await response.prepare(request)
    state.metrics.ttft_seconds.labels(job.provider).observe(time.time() - job.created)
    while True:
        if kind == m.REPLY_CHUNKS:
            await response.write(data)
        elif kind == m.REPLY_RESULT:
            await response.write(data + _DONE)
            break
        else:  # an error after the stream started: an error event, then the end
            await response.write(b"data: " + data + b"\n\n")
            break
        try:
            kind, data, _, _ = await _next_reply(state, job, replies, loop_deadline)
        except DeadlineExceeded as e:
            await response.write(b"data: " + msgspec.json.encode(e.body()) + b"\n\n")
            break
    await response.write_eof()
    log.debug("job %s streamed in %.3fs", job.id, time.perf_counter() - started)
    return response


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.auth.tenant(request.headers.get("Authorization"))
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": route.provider}
        for name, route in state.config.models.items()
        if not name.endswith("*")
    ]
    return json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return json_response({"status": "draining"}, 503)
    try:
        async with asyncio.timeout(state.config.redis.command_timeout_s):
            await state.batcher.call("PING")
    except REDIS_DOWN as e:
        return json_response({"status": "redis unreachable", "detail": str(e)}, 503)
    if not state.replies.healthy:
        return json_response({"status": "reply reader not connected"}, 503)
    return json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.active.set(state.replies.waiting)
    return web.Response(
        body=generate_latest(state.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    reader = asyncio.get_running_loop().create_task(state.replies.run())
    yield
    state.draining = True
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await state.batcher.close()
    await state.redis.aclose()


def create_app(config: Config, pod: str) -> web.Application:
    registry = CollectorRegistry()
    redis = connect(config.redis, max_connections=32)
    state = State(
        config=config,
        router=Router(config),
        auth=Authenticator(config.auth),
        keys=Keys(config.redis.key_prefix),
        redis=redis,
        batcher=Batcher(redis, timeout=config.redis.command_timeout_s),
        replies=ReplyRouter(config, pod),
        registry=registry,
        metrics=IngressMetrics(registry),
        webhook_allow=networks(config.webhooks.allow_cidrs),
    )
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=config.ingress.max_body_bytes
    )
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/jobs", post_job)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_post("/v1/jobs/{job_id}/cancel", cancel_job)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_lifecycle)
    return app
