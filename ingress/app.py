"""The ingress aiohttp application: auth, validation, admission, reply routing."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ingress.auth import Authenticator
from ingress.ids import JobIds
from ingress.replies import Reply, ReplyRouter, Waiter
from shared import messages as m
from shared.config import Config, Router
from shared.errors import (
    BadRequest,
    BrokerError,
    DeadlineExceeded,
    MethodNotAllowed,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    QueueFull,
    Unavailable,
    UnsupportedMediaType,
)
from shared.keys import Keys
from shared.metrics import IngressMetrics
from shared.redisio import EXPIRE_JOB, REDIS_DOWN, Batcher, connect, enqueue_command

log = logging.getLogger("llm_broker.ingress")

_PARAM_RE = re.compile(r"at `\$\.?([^`]*)`")
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_DONE = b"data: [DONE]\n\n"


@dataclass
class State:
    config: Config
    router: Router
    auth: Authenticator
    keys: Keys
    redis: aioredis.Redis
    batcher: Batcher
    replies: ReplyRouter
    registry: CollectorRegistry
    metrics: IngressMetrics
    draining: bool = False
    ids: JobIds = field(default_factory=JobIds)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


STATE = web.AppKey("state", State)


def _json(obj: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _error_response(err: BrokerError) -> web.Response:
    return _json(err.body(), err.http_status, err.headers or None)


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
            return _error_response(_too_large(state.config.ingress.max_body_bytes))
        raise
    finally:
        route = request.match_info.route.resource
        endpoint = route.canonical if route is not None else "unmatched"
        provider = request.get("provider", "")
        state.metrics.observe_request(
            endpoint, request.get("model", ""), provider, status, time.perf_counter() - started
        )


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")


async def _read_json_body(request: web.Request, limit: int) -> bytes:
    ctype = request.headers.get("Content-Type")
    if ctype is not None and request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {request.content_type!r}"
        )
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise _too_large(limit) from e


def _decode_chat(raw: bytes) -> m.ChatRequest:
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        req = m.chat_request_decoder.decode(raw)
    except msgspec.ValidationError as e:
        text = str(e)
        found = _PARAM_RE.search(text)
        param = found.group(1) if found and found.group(1) else None
        if "missing required field `messages`" in text:
            param = "messages"
        elif "missing required field `model`" in text:
            param = "model"
        raise BadRequest(f"invalid request: {text}", param=param) from e
    except msgspec.DecodeError as e:
        raise BadRequest(f"malformed JSON body: {e}", code="invalid_json") from e
    if not req.messages:
        raise BadRequest("'messages' must contain at least one message", param="messages")
    return req


def _deadline(request: web.Request, state: State) -> float:
    cfg = state.config.ingress
    raw = request.headers.get("X-Request-Timeout")
    if raw is None:
        return cfg.request_timeout_s
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds <= cfg.max_request_timeout_s:
        raise BadRequest(
            f"X-Request-Timeout must be a number of seconds in (0, {cfg.max_request_timeout_s:g}]",
            param="X-Request-Timeout",
        )
    return seconds


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    tenant = state.auth.tenant(request.headers.get("Authorization"))
    raw = await _read_json_body(request, state.config.ingress.max_body_bytes)
    req = _decode_chat(raw)
    route = state.router.route(req.model)
    if route is None:
        raise ModelNotFound(f"the model {req.model!r} does not exist", param="model")
    # Only routed names become metric labels: unknown names cannot grow the series.
    request["model"] = req.model
    request["provider"] = route.provider
    timeout = _deadline(request, state)
    now = time.time()
    job = m.Job(
        id=state.ids.next(),
        tenant=tenant,
        provider=route.provider,
        model=req.model,
        upstream_model=route.upstream_model,
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        reply_to=state.replies.stream,
        deadline=now + timeout,
        created=now,
        body=raw,
        traceparent=request.headers.get("traceparent", ""),
    )
    request["job_id"] = job.id
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
    try:
        # The batcher bounds the call by redis.command_timeout_s.
        entry = await state.batcher.call(
            *enqueue_command(state.keys, job, pcfg.max_queue_depth, ttl)
        )
    except REDIS_DOWN as e:
        state.metrics.redis_errors.labels("enqueue").inc()
        state.metrics.rejected.labels(job.provider, "redis_unavailable").inc()
        raise Unavailable(
            "the queue is unavailable; retry shortly", headers={"Retry-After": "1"}
        ) from e
    if entry is None:
        state.metrics.rejected.labels(job.provider, "queue_full").inc()
        retry = str(state.config.ingress.queue_full_retry_after_s)
        raise QueueFull(
            f"the queue for provider {job.provider!r} is full; retry later",
            headers={"Retry-After": retry},
        )


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
            await state.batcher.call(*EXPIRE_JOB.command((state.keys.job(job.id),), (time.time(),)))
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
    return _json({"object": "list", "data": data})


async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return _json({"status": "draining"}, 503)
    try:
        async with asyncio.timeout(state.config.redis.command_timeout_s):
            await state.batcher.call("PING")
    except REDIS_DOWN as e:
        return _json({"status": "redis unreachable", "detail": str(e)}, 503)
    if not state.replies.healthy:
        return _json({"status": "reply reader not connected"}, 503)
    return _json({"status": "ready"})


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
    )
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=config.ingress.max_body_bytes
    )
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_lifecycle)
    return app
