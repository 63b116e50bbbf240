"""Admission: a validated request becomes a job for the deployment it routes to,
and Redis errors on the way become answers."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Awaitable
from typing import TypeVar

import msgspec
from aiohttp import web

from llm_broker.ingress.bodies import (
    decode_chat,
    decode_count_tokens,
    decode_embeddings,
    decode_messages,
    decode_responses,
    untranslatable,
)
from llm_broker.ingress.context import CONTEXT
from llm_broker.ingress.state import State
from llm_broker.shared import accounts
from llm_broker.shared import messages as m
from llm_broker.shared.accounts import Principal
from llm_broker.shared.body import estimate_tokens
from llm_broker.shared.config import (
    NATIVE_KINDS,
    PRIORITIES,
    Candidates,
    ModelRoute,
    Priority,
    Target,
)
from llm_broker.shared.errors import (
    BadRequest,
    BrokerError,
    BudgetExceeded,
    KeyLimited,
    ModelNotAllowed,
    ModelNotFound,
    Overloaded,
    QueueFull,
    Unavailable,
)
from llm_broker.shared.errors import TenantQueueFull as TenantQueueFullError
from llm_broker.shared.errors import TenantRateLimited as TenantRateLimitedError
from llm_broker.shared.redisio import REDIS_DOWN, maybe_ran
from llm_broker.shared.store import (
    AccountLimited,
    Refused,
    TenantQueueFull,
    TenantRateLimited,
)
from llm_broker.shared.store import BudgetExceeded as BudgetSpent
from llm_broker.shared.tracing import valid_traceparent

T = TypeVar("T")

_SECONDS_RE = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,9})?", re.ASCII)


async def identify(request: web.Request, state: State) -> Principal:
    """Who sends a model API request (a key's lookup in Redis may fail with 503)."""
    principal = state.auth.known(request.headers)
    if principal is None:
        principal = await redis_call(state, "auth", "", state.auth.identify(request.headers))
    request[CONTEXT].tenant = principal.tenant
    return principal


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
    principal: Principal,
    raw: bytes,
    *,
    reply_to: str,
    kind: str = m.CHAT,
    priority: str | None = None,
    context: bytes = b"",
) -> tuple[m.Job, ModelRoute]:
    """Validate a request body and make it a job for the deployment it routes to;
    the other deployments of its model become its fallbacks. ``priority``: the
    class the body asks for (the ``X-Priority`` header otherwise); ``context``: a
    Responses request's earlier turns (``previous_response_id``). The job's account
    (limits, budgets and usage of the key and its tenant) goes to ``ctx.acct``."""
    ctx = request[CONTEXT]
    tenant = principal.tenant
    out: object = 0
    include_usage = False
    headers: dict[str, str] = {}
    if kind == m.CHAT:
        req = decode_chat(raw)
        model, stream = req.model, req.stream
        ctx.temperature = req.temperature
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        out = req.max_completion_tokens or req.max_tokens
    elif kind == m.EMBEDDINGS:
        model, stream = decode_embeddings(raw).model, False
    elif kind == m.RESPONSES:
        head = decode_responses(raw)
        model, stream, out = head.model, head.stream, head.max_output_tokens
        ctx.temperature = head.temperature
    else:
        if kind == m.MESSAGES:
            msg = decode_messages(raw)
            model, stream, out = msg.model, msg.stream, msg.max_tokens
            ctx.temperature = msg.temperature
        else:
            model, stream = decode_count_tokens(raw).model, False
        headers = {k: v for k in _ANTHROPIC_HEADERS if (v := request.headers.get(k)) is not None}
    if not principal.allows(model):
        raise ModelNotAllowed(f"this API key may not use the model {model[:256]!r}", param="model")
    tcfg = state.config.tenant(tenant)
    ceiling = principal.ceiling(tcfg.max_priority)
    default = m.INTERACTIVE if reply_to else m.ASYNC
    if priority is not None:
        job_priority = _priority(ceiling, priority, "priority")
    else:
        asked = request.headers.get("X-Priority", default)
        job_priority = _priority(ceiling, asked, "X-Priority")
    candidates = _candidates(state, model, kind, raw, context)
    if len(candidates.targets) == 1:
        targets = list(candidates.targets)
    else:
        targets = await state.chooser.order(candidates)
    first = targets[0]
    # Metric labels name the configured route (``mock*``), never the client's own
    # name, which a wildcard route would turn into a new series per request.
    ctx.route = candidates.name
    ctx.requested_model = model
    ctx.provider = first.provider
    ctx.tenant = tenant
    timeout = request_timeout(request, state)
    now = time.time()
    job = m.Job(
        id=state.keys.job_id(first.provider, state.ids.next()),
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
        priority=job_priority,
        headers=headers,
        context=context,
    )
    ctx.job_id = job.id
    quota = tcfg.providers.get(first.provider)
    cap = state.config.providers[first.provider].max_call_tokens
    if tcfg.quotas.tpm or (quota is not None and quota.tpm):
        job.tokens = estimate_tokens({"max_tokens": out}, len(raw), cap)
    pricing = state.config.pricing
    price = pricing.get(model) or pricing.get(candidates.name)
    ctx.acct = state.account_json(
        principal,
        model=model,
        price=price,
        est=accounts.estimate(price, len(raw), out, cap),
        now=now,
    )
    return job, candidates.route


def _priority(ceiling: Priority, asked: str, param: str) -> str:
    """The class asked for, lowered to the tenant's ceiling."""
    if asked not in PRIORITIES:
        raise BadRequest(
            f"{param} must be one of {', '.join(PRIORITIES)}; got {asked[:64]!r}", param=param
        )
    return PRIORITIES[max(PRIORITIES.index(asked), PRIORITIES.index(ceiling))]


#: Client headers an Anthropic deployment gets with a Messages request.
_ANTHROPIC_HEADERS = ("anthropic-beta", "anthropic-version")


def _candidates(state: State, model: str, kind: str, raw: bytes, context: bytes) -> Candidates:
    """The deployments that may serve ``model`` a request of ``kind``: embeddings and
    token counts need a deployment with that API; a Messages or Responses request
    goes to a deployment of another API only if it can be translated for it (the
    translation's error names the field when no deployment is left)."""
    candidates = state.router.candidates(model)
    if candidates is None:
        raise ModelNotFound(f"the model {model!r} does not exist", param="model")
    if kind == m.CHAT:
        return candidates
    providers = state.config.providers

    def native(t: Target) -> bool:
        return kind in NATIVE_KINDS[providers[t.provider].type]

    if kind in (m.EMBEDDINGS, m.COUNT_TOKENS):
        usable = tuple(t for t in candidates.targets if native(t))
        if not usable:
            what = "an embeddings API" if kind == m.EMBEDDINGS else "a token count API (anthropic)"
            raise BadRequest(f"the model {model!r} has no deployment with {what}", param="model")
    else:
        if all(native(t) for t in candidates.targets):
            return candidates
        problem = untranslatable(kind, raw, context)
        if problem is None:
            return candidates
        usable = tuple(t for t in candidates.targets if native(t))
        if not usable:
            other = providers[candidates.targets[0].provider].type
            raise BadRequest(
                f"{problem} (the model {model!r} is served by a {other} deployment, for "
                "which the request must be translated)",
                param=problem.param,
                code="untranslatable",
            )
    if len(usable) == len(candidates.targets):
        return candidates
    weights = tuple(
        w for t, w in zip(candidates.targets, candidates.weights, strict=True) if t in usable
    )
    return msgspec.structs.replace(candidates, targets=usable, weights=weights)


async def redis_call(
    state: State, what: str, provider: str, call: Awaitable[T], *, job_id: str | None = None
) -> T:
    """A job store call (bounded by ``redis.command_timeout_s``) whose failure
    becomes a 503: ``overloaded`` while Redis answers a PING (this process could not
    keep up), ``service_unavailable`` when it does not. ``job_id``: the job the call
    admits; when the call may have run on Redis all the same, the error names it."""
    since = state.loop().time()
    try:
        return await call
    except REDIS_DOWN as e:
        raise await redis_failure(state, what, provider, e, job_id, since) from e


async def redis_failure(
    state: State,
    what: str,
    provider: str,
    error: BaseException,
    job_id: str | None,
    since: float,
) -> BrokerError:
    """The error of a job store call sent at ``since`` (loop time) that failed with
    ``error`` (one of ``REDIS_DOWN``), as :func:`redis_call` gives it, counted."""
    state.metrics.redis_errors.labels(what).inc()
    return await _redis_error(state, provider, error, job_id, since)


async def _redis_error(
    state: State, provider: str, error: BaseException, job_id: str | None, since: float
) -> BrokerError:
    answers = await state.probe.answers(since)
    if provider:
        state.metrics.rejected.labels(
            provider, "overloaded" if answers else "redis_unavailable"
        ).inc()
    if answers:
        message = "the gateway is overloaded: a queue operation did not finish in time"
    else:
        message = "the queue is unavailable"
    admitted = job_id is not None and maybe_ran(error)
    if admitted:
        message += (
            f"; the request may have been admitted as job {job_id}: GET /v1/jobs/{job_id} "
            "gives its status and result (404: it was not admitted)"
        )
    else:
        message += "; the request was not admitted; retry shortly"
    kind = Overloaded if answers else Unavailable
    err = kind(message, headers={"Retry-After": "1"})
    err.job_id = job_id if admitted else None
    return err


def _quota_scope(scope: str, provider: str) -> str:
    return f"on provider {provider!r}" if scope == "provider" else "overall"


def refused(state: State, job: m.Job, why: Refused) -> BrokerError:
    """The answer to a job that admission refused; only its tenant gets the
    tenant quotas' errors."""
    retry_after = {"Retry-After": str(state.config.ingress.queue_full_retry_after_s)}
    provider = job.provider
    match why:
        case TenantQueueFull(scope=scope):
            where = _quota_scope(scope, provider)
            state.metrics.rejected.labels(provider, "tenant_queue_full").inc()
            return TenantQueueFullError(
                f"tenant {job.tenant!r} has as many jobs queued {where} as its quota "
                "allows; retry later",
                headers=retry_after,
            )
        case TenantRateLimited(scope=scope, retry_after=seconds):
            where = _quota_scope(scope, provider)
            state.metrics.rejected.labels(provider, "tenant_rate_limited").inc()
            return TenantRateLimitedError(
                f"tenant {job.tenant!r} reached its requests or tokens per minute {where}; "
                "retry later",
                headers={"Retry-After": str(max(1, math.ceil(seconds)))},
            )
        case AccountLimited(scope=scope, what=what, retry_after=seconds):
            state.metrics.rejected.labels(provider, f"{scope}_limited").inc()
            whose = "this API key" if scope == "key" else f"tenant {job.tenant!r}"
            reached = {
                "rate": "its requests or tokens per minute",
                "in_flight": "as many requests in flight as its limit allows",
                "queued": "as many requests queued as its limit allows",
            }[what]
            return KeyLimited(
                f"{whose} reached {reached}; retry later",
                code=f"{scope}_{'rate_limited' if what == 'rate' else what + '_limit'}",
                headers={"Retry-After": str(max(1, math.ceil(seconds)))},
            )
        case BudgetSpent(scope=scope, reset_at=reset_at):
            state.metrics.rejected.labels(provider, "budget_exceeded").inc()
            whose = "this API key" if scope == "key" else f"tenant {job.tenant!r}"
            headers = {}
            message = f"{whose} has spent its budget"
            if reset_at:
                headers["Retry-After"] = str(max(1, math.ceil(reset_at - time.time())))
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reset_at))
                message += f" for this period; it resets at {when}"
                headers["X-Budget-Reset"] = when
            else:
                message += " (a total budget: it does not reset)"
            return BudgetExceeded(message, headers=headers)
        case _:
            state.metrics.rejected.labels(provider, "queue_full").inc()
            return QueueFull(
                f"the queue for provider {provider!r} is full; retry later", headers=retry_after
            )
