"""What the ingress handlers share: the app state, body decoding, deadlines."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CollectorRegistry

from llm_broker.ingress.access import AccessLog
from llm_broker.ingress.auth import Authenticator
from llm_broker.ingress.ids import JobIds
from llm_broker.ingress.replies import ReplyRouter
from llm_broker.ingress.routing import Chooser
from llm_broker.shared import body
from llm_broker.shared import messages as m
from llm_broker.shared.config import Config, ModelRoute, Router
from llm_broker.shared.errors import (
    BadRequest,
    ModelNotFound,
    PayloadTooLarge,
    QueueFull,
    Unavailable,
    UnsupportedMediaType,
)
from llm_broker.shared.keys import Keys
from llm_broker.shared.metrics import IngressMetrics
from llm_broker.shared.redisio import REDIS_DOWN, Batcher
from llm_broker.shared.ssrf import Network
from llm_broker.shared.tracing import Tracing, valid_traceparent

T = TypeVar("T")

_PARAM_RE = re.compile(r"at `\$\.?([^`]*)`")
_SECONDS_RE = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?", re.ASCII)


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
    chooser: Chooser
    tracing: Tracing
    access: AccessLog
    #: Networks webhook URLs may point to although they are not public.
    webhook_allow: tuple[Network, ...] = ()
    draining: bool = False
    #: Requests being handled, and an event set whenever that drops to 0.
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    ids: JobIds = field(default_factory=JobIds)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


STATE = web.AppKey("state", State)


def json_response(
    obj: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")


async def read_json_body(request: web.Request, limit: int) -> bytes:
    ctype = request.headers.get("Content-Type")
    if ctype is not None and request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {request.content_type!r}"
        )
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise too_large(limit) from e
    except RequestPayloadError as e:  # e.g. Content-Encoding: gzip on a plain body
        raise BadRequest(f"the request body cannot be read: {e}", code="invalid_body") from e


def load_json(raw: bytes) -> Any:
    """A request body decoded by the workers' own decoder (a body it would refuse
    is never queued); a 400 if it is empty or cannot be carried."""
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return body.load(raw)
    except body.InvalidBody as e:
        raise BadRequest(str(e), code="invalid_json") from e


def decode_body(
    decoder: msgspec.json.Decoder[T],
    raw: bytes,
    what: str = "request",
    required: tuple[str, ...] = (),
) -> T:
    """Decode a JSON request body; every way it can be wrong is a 400 naming the field."""
    load_json(raw)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as e:
        text = str(e)
        found = _PARAM_RE.search(text)
        param = found.group(1) if found and found.group(1) else None
        for name in required:
            if f"missing required field `{name}`" in text:
                param = name
        raise BadRequest(f"invalid {what}: {text}", param=param) from e
    except (msgspec.DecodeError, RecursionError) as e:
        raise BadRequest(f"malformed JSON body: {e}", code="invalid_json") from e


def decode_chat(raw: bytes) -> m.ChatRequest:
    req = decode_body(m.chat_request_decoder, raw, required=("model", "messages"))
    if not req.messages:
        raise BadRequest("'messages' must contain at least one message", param="messages")
    return req


def decode_embeddings(raw: bytes) -> m.EmbeddingsRequest:
    req = decode_body(m.embeddings_request_decoder, raw, required=("model", "input"))
    if req.input == "" or req.input == []:
        raise BadRequest("'input' must not be empty", param="input")
    return req


def request_timeout(request: web.Request, state: State) -> float:
    cfg = state.config.ingress
    raw = request.headers.get("X-Request-Timeout")
    if raw is None:
        return cfg.request_timeout_s
    # Plain decimal numbers only: float() would also take "1_0", "nan" or other digits.
    seconds = float(raw) if _SECONDS_RE.fullmatch(raw) else -1.0
    if not 0 < seconds <= cfg.max_request_timeout_s:
        raise BadRequest(
            f"X-Request-Timeout must be a number of seconds in (0, {cfg.max_request_timeout_s:g}]",
            param="X-Request-Timeout",
        )
    return seconds


async def new_job(
    request: web.Request,
    state: State,
    tenant: str,
    raw: bytes,
    *,
    reply_to: str,
    kind: str = m.CHAT,
) -> tuple[m.Job, ModelRoute]:
    """Validate a request body and make it a job for the deployment it routes to;
    the other deployments of its model become its fallbacks."""
    if kind == m.EMBEDDINGS:
        model, stream, include_usage = decode_embeddings(raw).model, False, False
    else:
        req = decode_chat(raw)
        model, stream = req.model, req.stream
        request["temperature"] = req.temperature
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
    candidates = state.router.candidates(model)
    if candidates is None:
        raise ModelNotFound(f"the model {model!r} does not exist", param="model")
    if kind == m.EMBEDDINGS:
        usable = tuple(
            t for t in candidates.targets if state.config.providers[t.provider].type != "anthropic"
        )
        if not usable:
            raise BadRequest(f"the model {model!r} has no embeddings API", param="model")
        if len(usable) < len(candidates.targets):
            weights = tuple(
                w
                for t, w in zip(candidates.targets, candidates.weights, strict=True)
                if t in usable
            )
            candidates = msgspec.structs.replace(candidates, targets=usable, weights=weights)
    if len(candidates.targets) == 1:
        targets = list(candidates.targets)
    else:
        targets = await state.chooser.order(candidates)
    first = targets[0]
    # Metric labels name the configured route (``mock*``), never the client's own
    # name, which a wildcard route would turn into a new series per request.
    request["model"] = candidates.name
    request["requested_model"] = model
    request["provider"] = first.provider
    request["tenant"] = tenant
    timeout = request_timeout(request, state)
    now = time.time()
    job = m.Job(
        id=state.ids.next(),
        tenant=tenant,
        provider=first.provider,
        model=model,
        route=candidates.name,
        upstream_model=first.model,
        stream=stream,
        include_usage=include_usage,
        reply_to=reply_to,
        deadline=now + timeout,
        created=now,
        body=raw,
        traceparent=valid_traceparent(request.headers.get("traceparent", "")),
        kind=kind,
        fallbacks=targets[1:] if candidates.route.fallback else [],
    )
    request["job_id"] = job.id
    return job, candidates.route


async def call_redis(state: State, what: str, provider: str, *command: Any) -> Any:
    """One command through the batcher; "Redis unreachable" becomes a 503."""
    try:
        # The batcher bounds the call by redis.command_timeout_s.
        return await state.batcher.call(*command)
    except REDIS_DOWN as e:
        state.metrics.redis_errors.labels(what).inc()
        if provider:
            state.metrics.rejected.labels(provider, "redis_unavailable").inc()
        raise Unavailable(
            "the queue is unavailable; retry shortly", headers={"Retry-After": "1"}
        ) from e


def queue_full(state: State, provider: str) -> QueueFull:
    state.metrics.rejected.labels(provider, "queue_full").inc()
    return QueueFull(
        f"the queue for provider {provider!r} is full; retry later",
        headers={"Retry-After": str(state.config.ingress.queue_full_retry_after_s)},
    )
