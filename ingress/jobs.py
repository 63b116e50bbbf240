"""The jobs API: async submission, polling, listing and cancellation.

An async job is an ordinary queued job without a waiting client: its result
lands in its record, which the owner polls (``GET /v1/jobs/{id}``) or receives
by webhook. A job belongs to its tenant; every other tenant gets 404.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from llm_broker.ingress.admission import identify, new_job, redis_call, refused
from llm_broker.ingress.bodies import decode_body, json_response, read_json_body
from llm_broker.ingress.context import CONTEXT
from llm_broker.ingress.state import STATE, State
from llm_broker.shared import messages as m
from llm_broker.shared.accounts import Principal
from llm_broker.shared.errors import (
    BadRequest,
    IdempotencyKeyInUse,
    IdempotencyMismatch,
    NotFound,
    Unavailable,
)
from llm_broker.shared.jobs import job_object
from llm_broker.shared.ssrf import BlockedURL, Ports, check_url
from llm_broker.shared.store import (
    AccountLimited,
    Admitted,
    AsyncFields,
    BudgetExceeded,
    Full,
    Idempotency,
    KeyInUse,
    ListCursor,
    NotReplicated,
    Replayed,
    TenantQueueFull,
    TenantRateLimited,
)
from llm_broker.shared.store.records import JobRecord

MAX_IDEMPOTENCY_KEY = 255
MAX_METADATA_KEYS = 16
MAX_METADATA_VALUE = 512
MAX_LIST_LIMIT = 100
_MAX_LIST_PAGES = 10


def prefers_async(request: web.Request) -> bool:
    """True if the ``Prefer`` header asks for ``respond-async`` (RFC 7240)."""
    for header in request.headers.getall("Prefer", ()):
        for pref in header.split(","):
            if pref.split(";", 1)[0].strip().lower() == "respond-async":
                return True
    return False


async def post_job(request: web.Request) -> web.Response:
    """``POST /v1/jobs``: ``{"request": <chat body>, "webhook_url"?, "metadata"?}``."""
    state = request.app[STATE]
    principal = await identify(request, state)
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    sub = decode_body(m.job_submission_decoder, raw, "job", required=("request",))
    return await submit(
        request,
        state,
        principal,
        bytes(sub.request),
        raw,
        webhook_url=sub.webhook_url,
        metadata=sub.metadata,
        priority=sub.priority,
    )


def _check_metadata(metadata: dict[str, str]) -> None:
    if len(metadata) > MAX_METADATA_KEYS:
        raise BadRequest(f"metadata holds at most {MAX_METADATA_KEYS} keys", param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or len(value) > MAX_METADATA_VALUE:
            raise BadRequest(
                f"metadata keys are at most 64 characters and values at most "
                f"{MAX_METADATA_VALUE}; {key[:64]!r} is longer",
                param="metadata",
            )


async def check_webhook(state: State, tenant: str, url: str) -> None:
    if state.config.webhooks.secret_file_for(tenant) is None:
        raise BadRequest(
            "webhooks are not configured: no signing secret (webhooks.secret_file)",
            param="webhook_url",
        )
    try:
        ports = Ports(state.config.webhooks.allow_ports)
        await check_url(url, state.webhook_allow, ports=ports)
    except BlockedURL as e:
        raise BadRequest(str(e), param="webhook_url", code="invalid_webhook_url") from e
    except UnicodeError as e:  # an empty or over-long DNS label (IDNA encoding)
        raise BadRequest(
            "webhook_url: the host name is not a valid DNS name",
            param="webhook_url",
            code="invalid_webhook_url",
        ) from e


def _idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 0 < len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable characters",
            param="Idempotency-Key",
        )
    return key


def _request_hash(request: web.Request, raw: bytes) -> str:
    """A hash of what was asked: the endpoint and the body, key order ignored."""
    canonical = orjson.dumps(orjson.loads(raw), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(request.path.encode() + b"\n" + canonical).hexdigest()


def _accepted(
    state: State, request: web.Request, job_id: str, rec: JobRecord, replayed: bool = False
) -> web.Response:
    headers = {
        "Location": f"/v1/jobs/{job_id}",
        "X-Request-Id": job_id,
        "Retry-After": str(state.config.jobs.poll_after_s),
    }
    if prefers_async(request) and request.path in ("/v1/chat/completions", "/v1/messages"):
        headers["Preference-Applied"] = "respond-async"
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return json_response(job_object(job_id, rec), 202, headers)


async def submit(
    request: web.Request,
    state: State,
    principal: Principal,
    chat_body: bytes,
    raw: bytes,
    *,
    webhook_url: str | None,
    metadata: dict[str, str] | None,
    priority: str | None = None,
    kind: str = m.CHAT,
) -> web.Response:
    """Queue ``chat_body`` as an async job and answer 202 with the job object.

    ``raw`` is the whole request body, which an Idempotency-Key is bound to.
    """
    job_id, rec, replayed = await admit_async(
        request,
        state,
        principal,
        chat_body,
        raw,
        webhook_url=webhook_url,
        metadata=metadata,
        priority=priority,
        kind=kind,
    )
    return _accepted(state, request, job_id, rec, replayed)


async def admit_async(
    request: web.Request,
    state: State,
    principal: Principal,
    body: bytes,
    raw: bytes,
    *,
    webhook_url: str | None,
    metadata: dict[str, str] | None,
    priority: str | None = None,
    kind: str = m.CHAT,
    context: bytes = b"",
    before: Callable[[m.Job], Awaitable[None]] | None = None,
) -> tuple[str, JobRecord, bool]:
    """Queue ``body`` as an async job of ``kind``: its id, its record and whether an
    Idempotency-Key replayed an earlier job. ``before`` runs once the job is made,
    before it is queued."""
    job, _route = await new_job(
        request, state, principal, body, reply_to="", priority=priority, kind=kind, context=context
    )
    if before is not None:
        await before(job)
    tenant = principal.tenant
    idem = _idempotency_key(request)
    if metadata:
        _check_metadata(metadata)
    if webhook_url is not None:
        await check_webhook(state, tenant, webhook_url)
    jobs_cfg = state.config.jobs
    job.result_ttl = int(jobs_cfg.result_ttl_s)
    idempotency = None
    if idem is not None:
        idempotency = Idempotency(
            key=idem,
            request_hash=_request_hash(request, raw),
            ttl_s=int(jobs_cfg.idempotency_ttl_s),
        )
    admit = state.store.submit(
        job,
        max_depth=state.config.providers[job.provider].max_queue_depth,
        ttl_s=int(job.deadline - job.created) + job.result_ttl,
        extra=AsyncFields(metadata=metadata or None, webhook_url=webhook_url),
        idempotency=idempotency,
        acct=request[CONTEXT].acct,
        replicas=state.config.redis.min_replicas_acked,
    )
    match await redis_call(state, "enqueue", job.provider, admit, job_id=job.id):
        case Admitted(record=rec):
            return job.id, rec, False
        case NotReplicated(acked=acked, wanted=wanted):
            state.metrics.redis_errors.labels("replicate").inc()
            err = Unavailable(
                f"the job was admitted but only {acked} of {wanted} Redis replicas confirmed it "
                f"in time, so a failover could lose it; it may still run as job {job.id}: "
                f"GET /v1/jobs/{job.id} gives its status and result (404: it was lost)",
                headers={"Retry-After": "1"},
            )
            err.job_id = job.id
            raise err
        case (
            Full() | TenantQueueFull() | TenantRateLimited() | AccountLimited() | BudgetExceeded()
        ) as why:
            raise refused(state, job, why)
        case Replayed(job_id=seen_id, request_hash=seen_hash, record=rec):
            if idempotency is None or seen_hash != idempotency.request_hash:
                raise _key_reused()
            request[CONTEXT].job_id = seen_id
            return seen_id, rec, True
        case KeyInUse():
            raise IdempotencyKeyInUse(
                "a request with this Idempotency-Key is being admitted; retry it shortly",
                param="Idempotency-Key",
                headers={"Retry-After": "1"},
            )
        case _:  # the key's job is gone, or another tenant's
            raise _key_reused()


def _key_reused() -> IdempotencyMismatch:
    return IdempotencyMismatch(
        "this Idempotency-Key was used with a different request; use a new key for a new request",
        param="Idempotency-Key",
    )


async def owned_record(state: State, tenant: str, job_id: str) -> JobRecord:
    """The record of the caller's job ``job_id``; 404 for a missing or foreign job."""
    rec = await redis_call(state, "jobs", "", state.store.record(job_id))
    if rec is None or rec.tenant != tenant:
        raise NotFound(f"no job with id {job_id!r}", code="job_not_found")
    return rec


def _job_response(state: State, job_id: str, rec: JobRecord) -> web.Response:
    headers = {} if rec.final else {"Retry-After": str(state.config.jobs.poll_after_s)}
    return json_response(job_object(job_id, rec), headers=headers)


async def get_job(request: web.Request) -> web.Response:
    state = request.app[STATE]
    tenant = (await identify(request, state)).tenant
    job_id = request.match_info["job_id"]
    return _job_response(state, job_id, await owned_record(state, tenant, job_id))


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a job that is not final yet; a final job is returned as it is."""
    state = request.app[STATE]
    tenant = (await identify(request, state)).tenant
    job_id = request.match_info["job_id"]
    cancel = state.store.cancel(job_id, tenant, result_ttl=int(state.config.jobs.result_ttl_s))
    found = await redis_call(state, "jobs", "", cancel)
    if found is None:
        raise NotFound(f"no job with id {job_id!r}", code="job_not_found")
    return _job_response(state, job_id, found.record)


def _list_params(request: web.Request) -> tuple[str | None, int, str | None]:
    query = request.query
    status = query.get("status") or None
    if status is not None and status not in m.STATUSES:
        raise BadRequest(f"status must be one of {', '.join(m.STATUSES)}", param="status")
    try:
        limit = int(query.get("limit", "20"))
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIST_LIMIT:
        raise BadRequest(f"limit must be an integer from 1 to {MAX_LIST_LIMIT}", param="limit")
    return status, limit, query.get("after") or None


async def list_jobs(request: web.Request) -> web.Response:
    """The caller's async jobs, newest first; ``after`` is the last id of the previous page."""
    state = request.app[STATE]
    tenant = (await identify(request, state)).tenant
    status, limit, after = _list_params(request)
    store = state.store
    cursor: ListCursor | None = None
    if after is not None:
        cursor = await redis_call(state, "jobs", "", store.tenant_cursor(tenant, after))
        if cursor is None:
            raise BadRequest(f"after: no job with id {after!r}", param="after")
    data: list[dict[str, Any]] = []
    # One more than asked tells whether there is a next page. A status filter
    # may skip many jobs: it scans a bounded number of pages.
    page = limit + 1 if status is None else MAX_LIST_LIMIT
    exhausted = False
    for _ in range(_MAX_LIST_PAGES):
        found = await redis_call(state, "jobs", "", store.tenant_page(tenant, cursor, page))
        exhausted = len(found) < page
        ids = [job_id for job_id, _ in found]
        records = await redis_call(state, "jobs", "", store.records(ids))
        gone = []
        for (job_id, after_it), rec in zip(found, records, strict=True):
            cursor = after_it  # the next page starts after the last job looked at
            if rec is None:  # expired: dropped from the index below
                gone.append(job_id)
                continue
            if status is None or rec.status == status:
                data.append(job_object(job_id, rec))
                if len(data) > limit:
                    break
        if gone:
            await redis_call(state, "jobs", "", store.forget(tenant, gone))
        if exhausted or len(data) > limit:
            break
    has_more = len(data) > limit or not exhausted
    data = data[:limit]
    return json_response(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )
