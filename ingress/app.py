"""The ingress aiohttp application: auth, validation, admission, reply routing."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from llm_broker.ingress import admin, batches, calls, console, openapi
from llm_broker.ingress import files as files_api
from llm_broker.ingress import messages as messages_api
from llm_broker.ingress import responses as responses_api
from llm_broker.ingress.access import AccessLog
from llm_broker.ingress.admission import identify, new_job
from llm_broker.ingress.auth import Authenticator
from llm_broker.ingress.bodies import json_response, read_json_body, too_large
from llm_broker.ingress.context import CONTEXT, RequestContext
from llm_broker.ingress.dataplane import FastRequest
from llm_broker.ingress.jobs import cancel_job, get_job, list_jobs, post_job, prefers_async, submit
from llm_broker.ingress.overload import LoadMonitor, RedisProbe
from llm_broker.ingress.replies import ReplyRouter
from llm_broker.ingress.routing import Chooser
from llm_broker.ingress.state import STATE, State
from llm_broker.shared import anthropic
from llm_broker.shared import messages as m
from llm_broker.shared.accounts import AccountJson, AccountStore
from llm_broker.shared.config import Config, Router
from llm_broker.shared.errors import BrokerError, MethodNotAllowed, NotFound, NotOnCluster
from llm_broker.shared.files import Files, open_store
from llm_broker.shared.keys import Keys
from llm_broker.shared.metrics import MULTIPROCESS_DIR, FastHistogram, IngressMetrics, exposition
from llm_broker.shared.redisio import REDIS_DOWN, batcher_for, connect, subscriber
from llm_broker.shared.ssrf import networks
from llm_broker.shared.store import JobStore
from llm_broker.shared.tracing import Tracing

log = logging.getLogger("llm_broker.ingress")

OPENAI = calls.Renderer()


def _error_response(err: BrokerError, ctx: RequestContext | None = None) -> web.Response:
    if ctx is not None and ctx.api == "anthropic":
        body: object = anthropic.error_object(err.http_status, err.message)
    else:
        body = err.body()
    return json_response(body, err.http_status, err.headers or None)


@web.middleware
async def errors_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Turns every error into an OpenAI error object and counts the request."""
    state = request.app[STATE]
    if request.match_info.handler in SHEDDABLE:
        reason = state.load.reason(state.in_flight)
        if reason is not None:
            return _shed(request, state, reason)
    started = time.perf_counter()
    status = 500
    ctx = request[CONTEXT] = RequestContext()
    state.in_flight += 1
    state.idle.clear()
    try:
        response = await handler(request)
        status = response.status
        return response
    except BrokerError as e:
        status = e.http_status
        ctx.error_type = e.body().error.type
        response = _error_response(e, ctx)
        if ctx.job_id is not None:
            response.headers["X-Request-Id"] = ctx.job_id
        return response
    except web.HTTPException as e:
        status = e.status
        ctx.error_type = "invalid_request_error"
        if e.status in (404, 405) and request.path.startswith("/admin"):
            try:  # 401/403 first: the admin API stays unseen without an admin key
                await admin.check_admin(request)
            except BrokerError as denied:
                status = denied.http_status
                return _error_response(denied)
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
            return _error_response(too_large(state.config.ingress.max_body_bytes), ctx)
        raise
    except Exception:  # a defect: logged once, answered with an error object
        log.exception("%s %s failed", request.method, request.path)
        ctx.error_type = "server_error"
        return _error_response(BrokerError("the server could not handle the request"), ctx)
    finally:
        state.in_flight -= 1
        if not state.in_flight:
            state.idle.set()
        # Counted and logged once the response is written (aiohttp writes it after
        # this returns; the callback runs before the loop reads more requests).
        elapsed = time.perf_counter() - started
        state.loop().call_soon(_counted, state, request, ctx, status, elapsed)


def _counted(
    state: State, request: web.Request, ctx: RequestContext, status: int, elapsed: float
) -> None:
    """A request's metrics and log line."""
    endpoint = _endpoint(request)
    provider = ctx.provider
    state.metrics.observe_request(endpoint, ctx.route, provider, status, elapsed)
    if status >= 400:
        state.metrics.errors.labels(ctx.error_type or "server_error", provider).inc()
    if state.access.enabled:
        state.access.log(request, endpoint, status, elapsed)


def _shed(request: web.Request, state: State, reason: str) -> web.Response:
    """Answer 503 overloaded without doing any of the request's work."""
    state.metrics.shed.labels(reason).inc()
    api = "anthropic" if request.path.startswith("/v1/messages") else "openai"
    response = state.load.shed(api)
    state.metrics.observe_request(_endpoint(request), "", "", response.status, 0.0)
    return response


def _endpoint(request: web.Request) -> str:
    """The route a request matched, as metric labels and the access log name it (a
    data-plane request's path is its route's, without three lookups through aiohttp's
    route objects)."""
    if isinstance(request, FastRequest):  # (cast to web.Request where it is passed)
        return request.path
    route = request.match_info.route.resource
    return route.canonical if route is not None else "unmatched"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    principal = await identify(request, state)
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    if prefers_async(request):
        return await submit(request, state, principal, raw, raw, webhook_url=None, metadata=None)
    job, route = await new_job(request, state, principal, raw, reply_to=state.replies.reply_to)
    return await calls.run(request, state, job, route, OPENAI)


async def embeddings(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    principal = await identify(request, state)
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    job, route = await new_job(
        request, state, principal, raw, reply_to=state.replies.reply_to, kind=m.EMBEDDINGS
    )
    return await calls.run(request, state, job, route, OPENAI)


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    principal = await identify(request, state)
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            "owned_by": route.all_deployments()[0].provider,
        }
        for name, route in state.config.models.items()
        if not name.endswith("*") and principal.allows(name)
    ]
    return json_response({"object": "list", "data": data})


async def not_on_cluster(request: web.Request) -> web.Response:
    raise NotOnCluster(f"{request.path} is not available on this deployment's Redis Cluster yet")


async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok", "pid": os.getpid()})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.draining:
        return json_response({"status": "draining"}, 503)
    reason = state.load.overloaded(state.in_flight - 1)  # not counting this request
    if reason is not None:
        lag_ms = round(state.load.lag.now_s() * 1000, 1)
        return json_response({"status": "overloaded", "reason": reason, "lag_ms": lag_ms}, 503)
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
        body=exposition(state.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _export_active(state: State) -> None:
    """Under ``--processes N`` a scrape reaches one process: each keeps its own
    share of ``llm_broker_active_requests`` fresh."""
    while True:
        state.metrics.active.set(state.replies.waiting)
        await asyncio.sleep(1.0)  # export period


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    loop = asyncio.get_running_loop()
    reader = loop.create_task(state.replies.run())
    loops = [
        loop.create_task(state.load.lag.run()),
        loop.create_task(state.auth.listen()),
        loop.create_task(admin.export_budgets(state)),
    ]
    if MULTIPROCESS_DIR is not None:
        loops.append(loop.create_task(_export_active(state)))
    yield
    state.draining = True
    reader.cancel()
    for task in loops:
        task.cancel()
    await asyncio.gather(reader, *loops, *state.tasks, return_exceptions=True)
    await state.batcher.close()
    await state.files.store.close()
    await state.redis.aclose()
    if state.accounts.pubsub is not state.redis:
        await state.accounts.pubsub.aclose()
    state.tracing.shutdown()
    state.access.flush()


def create_app(config: Config, pod: str) -> web.Application:
    registry = CollectorRegistry()
    redis = connect(config.redis, max_connections=32)
    counters = IngressMetrics(registry)
    load = LoadMonitor(config.ingress.overload, counters.loop_lag)
    cluster = config.redis.cluster
    accounts = AccountStore(
        redis,
        config.redis.key_prefix,
        config.accounts,
        cluster=cluster,
        # (one connection listens for changes, one announces them)
        pubsub=subscriber(config.redis, connections=2) if cluster else None,
    )
    batcher = batcher_for(
        config.redis,
        redis,
        timeout=config.redis.command_timeout_s,
        round_trip=FastHistogram(counters.redis_seconds.labels("ingress")),
        lag=load.lag.now_s,
    )
    state = State(
        config=config,
        router=Router(config),
        auth=Authenticator(config.auth, accounts, timeout=config.redis.command_timeout_s),
        keys=Keys(config.redis.key_prefix, cluster=config.redis.cluster),
        redis=redis,
        batcher=batcher,
        store=JobStore(config, batcher, redis, cluster=config.redis.cluster),
        replies=ReplyRouter(config, pod, cluster=config.redis.cluster),
        registry=registry,
        metrics=counters,
        chooser=Chooser(Keys(config.redis.key_prefix, cluster=config.redis.cluster), batcher),
        tracing=Tracing(config.tracing, "ingress"),
        access=AccessLog(config.pricing),
        load=load,
        probe=RedisProbe(redis, batcher, max(2.0, 2 * config.redis.command_timeout_s)),
        webhook_allow=networks(config.webhooks.allow_cidrs),
        accounts=accounts,
        account_json=AccountJson(accounts.k, config.accounts),
        files=Files(redis, config.redis.key_prefix, open_store(config.files), config.files),
    )
    # One call in hand: its Redis commands leave at once, not a loop turn later.
    batcher.quiet = lambda: state.in_flight <= 1
    app = web.Application(
        middlewares=[errors_middleware], client_max_size=config.ingress.max_body_bytes
    )
    app[STATE] = state
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/messages", messages_api.create_message)
    app.router.add_post("/v1/messages/count_tokens", messages_api.count_tokens)
    responses_api.add_routes(app)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/jobs", post_job)
    app.router.add_get("/v1/jobs", list_jobs)
    app.router.add_get("/v1/jobs/{job_id}", get_job)
    app.router.add_post("/v1/jobs/{job_id}/cancel", cancel_job)
    admin.add_routes(app)
    console.add_routes(app)
    if config.redis.cluster:  # (not on a Cluster yet: docs/cluster.md)
        for path in (*files_api.PATHS, *batches.PATHS):
            app.router.add_route("*", path, not_on_cluster)
    else:
        files_api.add_routes(app)
        batches.add_routes(app)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    # /metrics is served on its own port when ingress.metrics_port is set (ingress/main.py).
    metrics_here = config.ingress.metrics_port is None
    app.router.add_get("/openapi.json", openapi.handler(metrics=metrics_here))
    if metrics_here:
        app.router.add_get("/metrics", metrics)
    app.cleanup_ctx.append(_lifecycle)
    return app


#: The handlers whose requests are shed when the process is overloaded: those that
#: admit work. Reads (a job's status, /health, /ready, /metrics) are always answered.
SHEDDABLE = frozenset((chat_completions, embeddings, messages_api.create_message, post_job))
