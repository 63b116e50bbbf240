"""The operator's console: ``/admin/`` in the browser, and the JSON it reads.

Who may use it: an operator logs in with an admin key (``auth.admin_keys``, or a
key created with ``"admin": true``) on a form; the answer sets an HttpOnly,
SameSite=Strict session cookie whose session lives in Redis for
``console.session_ttl_s`` (every ingress process knows it) and holds a CSRF token
that every action must send back in ``X-CSRF-Token``. An admin key in
``Authorization`` works too (scripts; no CSRF needed, nothing ambient). Without
either, every page answers 401 with the login form and every API path 401 or 403.
Pages come with a strict Content-Security-Policy; the assets ship in the package
(``ingress/console/``), nothing is fetched from elsewhere.

What it reads is cheap for Redis: per ingress process the overview is cached for
``OVERVIEW_CACHE_S`` and the hour's series for ``SERIES_CACHE_S``, so any number of
open consoles cost Redis what one does (see docs/operations.md for the measured rate).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import html
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import orjson
from aiohttp import web

from llm_broker.ingress.admission import redis_call
from llm_broker.ingress.auth import presented_key
from llm_broker.ingress.bodies import json_response
from llm_broker.ingress.jobs import admit_async
from llm_broker.ingress.state import STATE, State
from llm_broker.shared import messages as m
from llm_broker.shared.accounts import Principal
from llm_broker.shared.batches import IN_PROGRESS, VALIDATING, Batch, BatchStore, openai_object
from llm_broker.shared.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from llm_broker.shared.metrics import JOB_OUTCOMES, version
from llm_broker.shared.store.queues import backlog
from llm_broker.shared.store.records import JobRecord

log = logging.getLogger("llm_broker.ingress.console")

T = TypeVar("T")

COOKIE = "llm_broker_console"
ASSETS = Path(__file__).with_name("console")
#: The files served at /admin/static/ (public: they hold no data), and their types.
STATIC = {
    "console.js": "text/javascript; charset=utf-8",
    "theme.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # (no-referrer would make a browser send "Origin: null" with the login form)
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
SAFE_METHODS = frozenset(("GET", "HEAD"))
OVERVIEW_CACHE_S = 2.0
SERIES_CACHE_S = 2.0
#: The hour of per-minute counts the charts draw.
SERIES_MINUTES = 60
#: A job's request body is looked for among this many of its provider's newest
#: dead letters (only when an operator asks to see it).
PROMPT_SEARCH = 1000
MAX_LIST = 200


class Session(msgspec.Struct, frozen=True):
    actor: str
    csrf: str
    expires_at: float


#: The console session a request came with (set by :func:`operator`).
SESSION = web.RequestKey("console_session", Session)


def _digest(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


def _enabled(state: State) -> None:
    if not state.config.console.enabled:
        raise NotFound("the console is not enabled (console.enabled)")


async def _redis(state: State, call: Awaitable[T]) -> T:
    return await redis_call(state, "console", "", call)


async def session_of(request: web.Request, state: State) -> Session | None:
    sid = request.cookies.get(COOKIE)
    if not sid or len(sid) > 128:
        return None
    raw: dict[bytes, bytes] = await _redis(
        state, state.batcher.call("HGETALL", state.keys.console_session(_digest(sid)))
    )
    if not raw or b"csrf" not in raw:
        return None
    session = Session(
        raw[b"actor"].decode(), raw[b"csrf"].decode(), float(raw.get(b"expires_at", b"0"))
    )
    return session if session.expires_at > time.time() else None


def _same_origin(request: web.Request) -> bool:
    """A browser names the page a request comes from; it must be this host."""
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser, or a same-origin GET
        return True
    host = request.headers.get("Host", "")
    return origin in (f"http://{host}", f"https://{host}")


def _actor(principal: Principal) -> str:
    """An admin's name in the audit log."""
    return principal.key_id or f"config:{principal.name}"


async def operator(request: web.Request, state: State) -> str:
    """The operator behind an admin request, for the audit log: an admin key in
    ``Authorization`` (or ``x-api-key``), else a console session, whose actions
    (any method but GET) must carry its CSRF token and come from this origin."""
    if presented_key(request.headers) is not None:
        principal = await redis_call(state, "auth", "", state.auth.admin(request.headers))
        return _actor(principal)
    session = await session_of(request, state) if state.config.console.enabled else None
    if session is None:
        raise Unauthorized(
            "missing admin key: send 'Authorization: Bearer <key>', or log in at /admin/"
        )
    if request.method not in SAFE_METHODS:
        token = request.headers.get("X-CSRF-Token", "")
        if not hmac.compare_digest(token.encode(), session.csrf.encode()):
            raise Forbidden("missing or wrong X-CSRF-Token", code="csrf_failed")
        if not _same_origin(request):
            raise Forbidden("a cross-origin request", code="csrf_failed")
    request[SESSION] = session
    return session.actor


def _page(name: str, status: int, error: str = "") -> web.Response:
    page = (ASSETS / name).read_text()
    if error:
        alert = f'<p class="error" role="alert">{html.escape(error)}</p>'
        page = page.replace("<!--error-->", alert)
    return web.Response(
        text=page, status=status, content_type="text/html", headers=SECURITY_HEADERS
    )


# ------------------------------------------------------------------ pages


async def shell(request: web.Request) -> web.Response:
    """The console's page for an operator with a session; the login form (401) else."""
    state = request.app[STATE]
    _enabled(state)
    if request.path == "/admin":
        raise web.HTTPFound("/admin/")
    if await session_of(request, state) is None:
        return _page("login.html", 401)
    return _page("index.html", 200)


async def login_page(request: web.Request) -> web.Response:
    """The login form (200: the one console page anybody may see)."""
    state = request.app[STATE]
    _enabled(state)
    if await session_of(request, state) is not None:
        raise web.HTTPSeeOther("/admin/")
    return _page("login.html", 200)


async def static(request: web.Request) -> web.Response:
    _enabled(request.app[STATE])
    name = request.match_info["name"]
    kind = STATIC.get(name)
    if kind is None:
        raise NotFound(f"no console asset {name!r}")
    headers = {**SECURITY_HEADERS, "Cache-Control": "no-cache", "Content-Type": kind}
    return web.Response(body=(ASSETS / name).read_bytes(), headers=headers)


async def login(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _enabled(state)
    if not _same_origin(request):
        return _page("login.html", 403, "This form must be sent from the console's own page.")
    form = await request.post()
    key = form.get("key")
    if not isinstance(key, str) or not key or len(key) > 512:
        return _page("login.html", 401, "Enter an admin key.")
    try:
        principal = await redis_call(
            state, "auth", "", state.auth.admin({"Authorization": f"Bearer {key}"})
        )
    except (Unauthorized, Forbidden, BadRequest):
        return _page("login.html", 401, "That key is not an admin key.")
    actor = _actor(principal)
    sid = secrets.token_urlsafe(32)
    ttl = state.config.console.session_ttl_s
    session = Session(actor, secrets.token_urlsafe(32), time.time() + ttl)
    key_name = state.keys.console_session(_digest(sid))
    fields = ["actor", session.actor, "csrf", session.csrf, "expires_at", session.expires_at]
    await _redis(state, state.batcher.call("HSET", key_name, *fields))
    await _redis(state, state.batcher.call("EXPIRE", key_name, int(ttl)))
    await _redis(state, state.accounts.audit(actor, "console.login", actor, {}))
    response = web.Response(status=303, headers={**SECURITY_HEADERS, "Location": "/admin/"})
    secure = state.config.console.secure_cookie
    response.set_cookie(
        COOKIE,
        sid,
        max_age=int(ttl),
        path="/admin",
        httponly=True,
        samesite="Strict",
        secure=request.secure if secure is None else secure,
    )
    return response


async def logout(request: web.Request) -> web.Response:
    state = request.app[STATE]
    _enabled(state)
    actor = await operator(request, state)
    sid = request.cookies.get(COOKIE)
    if sid:
        key = state.keys.console_session(_digest(sid))
        await _redis(state, state.batcher.call("DEL", key))
        await _redis(state, state.accounts.audit(actor, "console.logout", actor, {}))
    response = web.Response(status=204, headers=SECURITY_HEADERS)
    response.del_cookie(COOKIE, path="/admin")
    return response


def _api(
    handler: Callable[[web.Request, State, str], Awaitable[Any]],
) -> Callable[[web.Request], Awaitable[web.Response]]:
    """An API handler: the operator checked first, the answer JSON, never cached."""

    async def handle(request: web.Request) -> web.Response:
        state = request.app[STATE]
        _enabled(state)
        actor = await operator(request, state)
        out = await handler(request, state, actor)
        return json_response(out, headers={"Cache-Control": "no-store"})

    return handle


async def session_info(request: web.Request, state: State, actor: str) -> dict[str, Any]:
    session: Session | None = request.get(SESSION)  # None: an admin key, no session
    return {
        "user": actor,
        "csrf": session.csrf if session is not None else None,
        "expires_at": session.expires_at if session is not None else None,
        "show_prompts": state.config.console.show_prompts,
        "version": version(),
    }


# ------------------------------------------------------------------ overview


class _Cached:
    """One value per ingress process, fresh for ``ttl`` seconds; concurrent readers
    share one computation."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._at = 0.0
        self._value: Any = None
        self._running: asyncio.Future[Any] | None = None

    async def get(self, make: Callable[[], Awaitable[Any]]) -> Any:
        if self._value is not None and time.monotonic() - self._at < self.ttl:
            return self._value
        if self._running is None:
            self._running = asyncio.ensure_future(make())
            running = self._running
            try:
                self._value = await running
                self._at = time.monotonic()
            finally:
                self._running = None
            return self._value
        return await asyncio.shield(self._running)


class _Memory:
    """What one ingress process keeps for its consoles."""

    def __init__(self) -> None:
        self.overview = _Cached(OVERVIEW_CACHE_S)
        self.series = _Cached(SERIES_CACHE_S)
        #: The counts of minutes that no heartbeat adds to any more.
        self.minutes: dict[int, dict[bytes, bytes]] = {}


MEMORY = web.AppKey("console_memory", _Memory)


async def live_workers(state: State) -> list[dict[str, Any]]:
    """The heartbeats of the worker processes alive now (workers/heartbeat.py)."""
    ids = await state.batcher.call(
        "ZRANGEBYSCORE", state.keys.live_workers(), f"{time.time():.3f}", "+inf"
    )
    records = await asyncio.gather(
        *(state.batcher.call("HGETALL", state.keys.worker(i.decode())) for i in ids)
    )
    out = []
    for raw in records:
        if not raw:
            continue  # lapsed between the two reads
        out.append(
            {
                "id": raw[b"id"].decode(),
                "host": raw.get(b"host", b"").decode(),
                "pid": int(raw.get(b"pid", b"0")),
                "version": raw.get(b"version", b"").decode(),
                "started_at": float(raw.get(b"started_at", b"0")),
                "beat_at": float(raw.get(b"beat_at", b"0")),
                "providers": orjson.loads(raw.get(b"providers", b"[]")),
                "circuits": orjson.loads(raw.get(b"circuits", b"{}")),
            }
        )
    out.sort(key=lambda w: (w["host"], w["pid"]))
    return out


def _pairs(reply: Any) -> dict[str, Any]:
    if isinstance(reply, dict):
        return {_text(k): v for k, v in reply.items()}
    return {_text(reply[i]): reply[i + 1] for i in range(0, len(reply), 2)}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _provider(state: State, provider: str) -> dict[str, Any]:
    found, dead = await asyncio.gather(
        backlog(state.batcher, state.keys, provider, time.time()),
        state.batcher.call("XLEN", state.keys.dead_letter(provider)),
    )
    classes = [
        {"priority": w.priority, "queued": w.count, "oldest_wait_s": w.oldest_s}
        for w in found.waiting
    ]
    return {
        "name": provider,
        "queued": sum(w.count for w in found.waiting) + found.lag,
        "in_flight": found.pending,
        "classes": classes,
        "dead_letters": int(dead),
    }


async def _redis_health(state: State) -> dict[str, Any]:
    began = time.perf_counter()
    try:
        async with asyncio.timeout(state.config.redis.command_timeout_s * 2):
            await state.batcher.call("PING")
            latency = (time.perf_counter() - began) * 1000
            info = await state.redis.info()
    except Exception as e:  # any failure is what the card shows
        return {"ok": False, "error": str(e)[:300]}
    return {
        "ok": True,
        "latency_ms": round(latency, 3),
        "used_memory": info.get("used_memory"),
        "used_memory_human": info.get("used_memory_human"),
        "maxmemory": info.get("maxmemory"),
        "connected_clients": info.get("connected_clients"),
        "version": info.get("redis_version"),
        "uptime_s": info.get("uptime_in_seconds"),
        "ops_per_sec": info.get("instantaneous_ops_per_sec"),
        "role": info.get("role"),
    }


async def _overview(state: State) -> dict[str, Any]:
    providers = list(state.config.providers)
    found, workers, health = await asyncio.gather(
        asyncio.gather(*(_provider(state, p) for p in providers)),
        live_workers(state),
        _redis_health(state),
    )
    circuits: dict[str, dict[str, Any]] = {}
    for p in found:
        p.update(workers=0, slots=0, free_slots=0)
    by_name = {p["name"]: p for p in found}
    for w in workers:
        for held in w["providers"]:
            p = by_name.get(held["name"])
            if p is not None:
                p["workers"] += 1
                p["slots"] += held["slots"]
                p["free_slots"] += held["free"]
        for name, circuit_state in w["circuits"].items():
            c = circuits.setdefault(
                name,
                {
                    "provider": name.partition("/")[0],
                    "deployment": name,
                    "state": "closed",
                    "open_in": 0,
                    "workers": 0,
                },
            )
            c["workers"] += 1
            if circuit_state != "closed":
                c["open_in"] += 1
                if c["state"] != "open":
                    c["state"] = circuit_state
    return {
        "now": time.time(),
        "providers": found,
        "circuits": sorted(circuits.values(), key=lambda c: (c["provider"], c["deployment"])),
        "redis": health,
    }


async def overview(request: web.Request, state: State, actor: str) -> Any:
    cache = request.app[MEMORY].overview
    return await cache.get(lambda: _redis(state, _overview(state)))


async def _series(state: State, known: dict[int, dict[bytes, bytes]]) -> dict[str, Any]:
    """The hour's per-minute outcome counts. A minute is read from Redis until the
    last heartbeat that may add to it is past, then kept here: a refresh reads the
    last minute or two (and each a console process has not seen)."""
    now = time.time()
    now_minute = int(now // 60) * 60
    start = now_minute - (SERIES_MINUTES - 1) * 60
    minutes = [start + 60 * i for i in range(SERIES_MINUTES)]
    settled = now - 60 - 2 * state.config.worker.heartbeat_s
    wanted = [t for t in minutes if t not in known]
    found = await asyncio.gather(
        *(state.batcher.call("HGETALL", state.keys.minute_counts(t)) for t in wanted)
    )
    for t, counts in zip(wanted, found, strict=True):
        if t < settled:
            known[t] = counts
    for t in [t for t in known if t < start]:
        del known[t]
    fresh = dict(zip(wanted, found, strict=True))
    providers: dict[str, dict[str, list[int]]] = {
        p: {o: [0] * SERIES_MINUTES for o in JOB_OUTCOMES} for p in state.config.providers
    }
    for i, t in enumerate(minutes):
        counts = fresh[t] if t in fresh else known[t]
        for field, value in counts.items():
            provider, _, outcome = field.decode().partition("|")
            series = providers.get(provider, {}).get(outcome)
            if series is not None:
                series[i] = int(value)
    return {"step_s": 60, "start": start, "points": SERIES_MINUTES, "providers": providers}


async def series(request: web.Request, state: State, actor: str) -> Any:
    memory = request.app[MEMORY]
    return await memory.series.get(lambda: _redis(state, _series(state, memory.minutes)))


async def workers(request: web.Request, state: State, actor: str) -> Any:
    found = await _redis(state, live_workers(state))
    ttl = state.config.worker.heartbeat_s * 3
    return {"now": time.time(), "ttl_s": ttl, "workers": found}


# ------------------------------------------------------------------ jobs


def _json(raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")


def _summary(job_id: str, rec: JobRecord) -> dict[str, Any]:
    return {
        "id": job_id,
        "tenant": rec.tenant,
        "status": rec.status,
        "model": rec.model,
        "provider": rec.provider,
        "priority": rec.priority,
        "created_at": rec.created_at,
        "completed_at": rec.completed_at,
        "attempts": rec.attempts,
        "http_status": rec.http_status,
    }


async def _tenants(state: State) -> list[str]:
    names = set(state.config.tenants)
    names.update(k.tenant for k in state.config.auth.keys)
    names.update(t.name for t in await state.accounts.list_tenants())
    return sorted(names)


async def list_jobs(request: web.Request, state: State, actor: str) -> Any:
    q = request.query
    tenant = q.get("tenant", "").strip()
    status = q.get("status", "").strip()
    if status and status not in m.STATUSES:
        raise BadRequest(f"unknown status {status[:40]!r}", param="status")
    try:
        limit = max(1, min(MAX_LIST, int(q.get("limit", "50"))))
    except ValueError:
        raise BadRequest("limit must be a number", param="limit") from None
    tenants = [tenant] if tenant else await _redis(state, _tenants(state))
    # A status filter looks further back (bounded) to find `limit` matches.
    depth = limit * 4 if status else limit
    pages = await _redis(
        state, asyncio.gather(*(state.store.tenant_page(t, None, depth) for t in tenants))
    )
    ids = [job_id for page in pages for job_id, _ in page]
    records = await _redis(state, state.store.records(ids)) if ids else []
    jobs = [
        _summary(i, rec)
        for i, rec in zip(ids, records, strict=True)
        if rec is not None and (not status or rec.status == status)
    ]
    jobs.sort(key=lambda j: j["created_at"], reverse=True)
    return {"jobs": jobs[:limit]}


async def job_detail(request: web.Request, state: State, actor: str) -> Any:
    job_id = request.match_info["job_id"]
    if not job_id or len(job_id) > 128:
        raise NotFound("no such job")
    rec = await _redis(state, state.store.record(job_id))
    if rec is None:
        raise NotFound(f"no job {job_id!r} (unknown, or its record expired)")
    out = _summary(job_id, rec)
    started, done = rec.started_at, rec.completed_at
    out.update(
        stream=rec.stream,
        started_at=started,
        deadline=rec.deadline,
        timings={
            "queued_s": round(started - rec.created_at, 6) if started else None,
            "run_s": round(done - started, 6) if started and done else None,
            "total_s": round(done - rec.created_at, 6) if done else None,
        },
        error=_json(rec.error),
        history=_json(rec.history) or [],
        result_bytes=len(rec.result or b""),
        metadata=_json(rec.metadata),
        webhook=(
            {
                "url": rec.webhook_url,
                "status": rec.webhook_status,
                "attempts": rec.webhook_attempts,
                "code": rec.webhook_code,
                "at": rec.webhook_at,
                "error": rec.webhook_error,
            }
            if rec.webhook_url
            else None
        ),
        prompt=None,
    )
    if request.query.get("prompt") == "1":
        _may_see_prompts(state)
        out["prompt"] = await _redis(state, _prompt(state, job_id, rec))
        await _redis(state, state.accounts.audit(actor, "console.prompt", job_id, {}))
    return out


def _may_see_prompts(state: State) -> None:
    if not state.config.console.show_prompts:
        raise Forbidden(
            "request bodies are not shown (console.show_prompts is false)",
            code="prompts_hidden",
        )


async def _prompt(state: State, job_id: str, rec: JobRecord) -> dict[str, Any]:
    """A job's request body where the broker still keeps it: its dead letter."""
    if rec.provider in state.config.providers:
        entries = await state.batcher.call(
            "XREVRANGE", state.keys.dead_letter(rec.provider), "+", "-", "COUNT", PROMPT_SEARCH
        )
        for _, fields in entries:
            fields = _pairs(fields)
            if fields.get("job") == job_id.encode() and "body" in fields:
                return {
                    "body": fields["body"].decode(errors="replace"),
                    "truncated": fields.get("body_truncated") == b"1",
                }
    return {
        "body": None,
        "truncated": False,
        "why": "the broker keeps a request body only while its job waits, and in its dead letter",
    }


# ------------------------------------------------------------------ dead letters


def _provider_param(state: State, name: str) -> str:
    if name not in state.config.providers:
        raise NotFound(f"no provider {name[:100]!r}")
    return name


def _entry_id(raw: str) -> str:
    stamp, _, seq = raw.partition("-")
    if not (stamp.isdigit() and seq.isdigit() and len(raw) <= 41):
        raise NotFound(f"no dead letter {raw[:60]!r}")
    return raw


def _letter(provider: str, entry_id: bytes, raw: Any, replayed: bytes | None) -> dict[str, Any]:
    f = _pairs(raw)

    def text(name: str) -> str:
        return _text(f.get(name, b""))

    error = _json(f.get("error"))
    if isinstance(error, dict):
        inner = error.get("error", error)
        error = inner.get("message", str(inner)) if isinstance(inner, dict) else str(inner)
    truncated = text("body_truncated") == "1"
    return {
        "provider": provider,
        "id": entry_id.decode(),
        "at": float(text("at") or 0),
        "job": text("job") or None,
        "tenant": text("tenant") or None,
        "model": text("model") or None,
        "kind": text("kind") or m.CHAT,
        "error": error if isinstance(error, str) else orjson.dumps(error).decode(),
        "body_bytes": int(text("body_bytes") or 0),
        "body_truncated": truncated,
        "replayable": bool(text("tenant") and f.get("body") and not truncated),
        "replayed_as": replayed.decode() if replayed else None,
    }


async def _letters(
    state: State, provider: str, before: str | None, count: int
) -> list[dict[str, Any]]:
    key = state.keys.dead_letter(provider)
    top = f"({before}" if before else "+"
    entries = await state.batcher.call("XREVRANGE", key, top, "-", "COUNT", count)
    if not entries:
        return []
    ids = [e[0] for e in entries]
    replays = await state.batcher.call("HMGET", state.keys.dead_letter_replays(provider), *ids)
    return [
        _letter(provider, entry_id, fields, replayed)
        for (entry_id, fields), replayed in zip(entries, replays, strict=True)
    ]


async def dead_letters(request: web.Request, state: State, actor: str) -> Any:
    q = request.query
    providers = list(state.config.providers)
    chosen = q.get("provider", "")
    before = _entry_id(q["before"]) if q.get("before") else None
    try:
        count = max(1, min(MAX_LIST, int(q.get("count", "50"))))
    except ValueError:
        raise BadRequest("count must be a number", param="count") from None
    scope = [_provider_param(state, chosen)] if chosen and chosen != "all" else providers
    found, totals = await _redis(
        state,
        asyncio.gather(
            asyncio.gather(*(_letters(state, p, before, count) for p in scope)),
            asyncio.gather(*(state.batcher.call("XLEN", state.keys.dead_letter(p)) for p in scope)),
        ),
    )
    entries = [e for page in found for e in page]
    entries.sort(key=lambda e: tuple(int(x) for x in e["id"].split("-")), reverse=True)
    entries = entries[:count]
    single = len(scope) == 1
    return {
        "providers": providers,
        "total": {p: int(n) for p, n in zip(scope, totals, strict=True)},
        "entries": entries,
        "next_before": entries[-1]["id"] if single and len(entries) == count else None,
    }


async def _one_letter(state: State, provider: str, entry: str) -> tuple[dict[str, Any], Any]:
    key = state.keys.dead_letter(provider)
    found = await _redis(state, state.batcher.call("XRANGE", key, entry, entry))
    if not found:
        raise NotFound(f"no dead letter {entry!r} for {provider!r}")
    replayed = await _redis(
        state, state.batcher.call("HGET", state.keys.dead_letter_replays(provider), entry)
    )
    return _letter(provider, found[0][0], found[0][1], replayed), found[0][1]


async def dead_letter(request: web.Request, state: State, actor: str) -> Any:
    provider = _provider_param(state, request.match_info["provider"])
    entry = _entry_id(request.match_info["entry"])
    letter, raw = await _one_letter(state, provider, entry)
    letter["body"] = None
    if request.query.get("prompt") == "1":
        _may_see_prompts(state)
        body = _pairs(raw).get("body")
        letter["body"] = body.decode(errors="replace") if body else None
        await _redis(
            state, state.accounts.audit(actor, "console.prompt", f"{provider}/{entry}", {})
        )
    return letter


async def replay(request: web.Request, state: State, actor: str) -> Any:
    """Queue a dead letter's request again, as a new async job of its tenant (its
    limits, budget, routing and usage apply as to any job); the entry remembers
    the new job's id, and a second replay is refused."""
    provider = _provider_param(state, request.match_info["provider"])
    entry = _entry_id(request.match_info["entry"])
    letter, raw = await _one_letter(state, provider, entry)
    if letter["replayed_as"]:
        raise Conflict(
            f"this dead letter was replayed already, as job {letter['replayed_as']}",
            code="already_replayed",
        )
    if not letter["replayable"]:
        raise Conflict(
            "this dead letter cannot be replayed: its request body was not kept whole "
            "(worker.dead_letter_body_bytes) or it names no tenant",
            code="not_replayable",
        )
    body: bytes = _pairs(raw)["body"]
    tenant = letter["tenant"]
    rec = await _redis(state, state.accounts.tenant(tenant))
    principal = Principal(
        tenant=tenant,
        name="console",
        tenant_limits=rec.limits if rec is not None else Principal(tenant=tenant).tenant_limits,
        tenant_budget=rec.budget if rec is not None else None,
    )
    metadata = {"replay_of": letter["job"] or "", "dead_letter": f"{provider}/{entry}"}
    job_id, job_rec, _ = await admit_async(
        request,
        state,
        principal,
        body,
        body,
        webhook_url=None,
        metadata=metadata,
        kind=letter["kind"],
    )
    replays = state.keys.dead_letter_replays(provider)
    await _redis(state, state.batcher.call("HSET", replays, entry, job_id))
    await _redis(
        state, state.batcher.call("EXPIRE", replays, int(state.config.worker.dead_letter_ttl_s))
    )
    await _redis(
        state,
        state.accounts.audit(
            actor, "dead_letter.replay", f"{provider}/{entry}", {"job": letter["job"], "as": job_id}
        ),
    )
    log.info("dead letter %s/%s replayed as job %s by %s", provider, entry, job_id, actor)
    return {"job_id": job_id, "status": job_rec.status}


async def purge(request: web.Request, state: State, actor: str) -> Any:
    provider = _provider_param(state, request.match_info["provider"])
    entry = _entry_id(request.match_info["entry"])
    purged = await _redis(
        state, state.batcher.call("XDEL", state.keys.dead_letter(provider), entry)
    )
    if not purged:
        raise NotFound(f"no dead letter {entry!r} for {provider!r}")
    await _redis(state, state.batcher.call("HDEL", state.keys.dead_letter_replays(provider), entry))
    await _redis(state, state.accounts.audit(actor, "dead_letter.purge", f"{provider}/{entry}", {}))
    return {"purged": int(purged)}


async def purge_all(request: web.Request, state: State, actor: str) -> Any:
    provider = _provider_param(state, request.match_info["provider"])
    key = state.keys.dead_letter(provider)
    count = await _redis(state, state.batcher.call("XLEN", key))
    await _redis(state, state.batcher.call("DEL", key, state.keys.dead_letter_replays(provider)))
    await _redis(
        state, state.accounts.audit(actor, "dead_letter.purge_all", provider, {"purged": count})
    )
    return {"purged": int(count)}


# ------------------------------------------------------------------ batches


def _batches(state: State) -> BatchStore:
    return BatchStore(state.redis, state.config.redis.key_prefix, state.config.files.retention_s)


def _batch_out(b: Batch) -> dict[str, Any]:
    out = openai_object(b)
    out.update(api=b.spec.api, tenant=b.spec.tenant)
    return out


async def list_batches(request: web.Request, state: State, actor: str) -> Any:
    store = _batches(state)

    async def running() -> list[Batch]:
        ids = await state.redis.zrange(store.k.active(), 0, MAX_LIST - 1)
        found = await asyncio.gather(*(store.get(i.decode()) for i in ids))
        return [b for b in found if b is not None]

    found = await _redis(state, running())
    found.sort(key=lambda b: b.spec.created_at, reverse=True)
    return {"batches": [_batch_out(b) for b in found]}


async def cancel_batch(request: web.Request, state: State, actor: str) -> Any:
    store = _batches(state)
    batch_id = request.match_info["batch_id"]
    batch = await _redis(state, store.get(batch_id)) if len(batch_id) <= 64 else None
    if batch is None:
        raise NotFound(f"no batch {batch_id[:64]!r}", code="batch_not_found")
    if batch.status not in (VALIDATING, IN_PROGRESS):
        raise Conflict(f"batch {batch_id} is {batch.status}: nothing to cancel", code="batch_ended")
    found = await _redis(state, store.cancel(batch_id, batch.spec.tenant))
    await _redis(state, state.accounts.audit(actor, "batch.cancel", batch_id, {}))
    return _batch_out(found or batch)


def is_console_path(path: str) -> bool:
    """The console's own routes (left out of the OpenAPI document: not a public API)."""
    return path in ("/admin", "/admin/") or path.startswith(
        ("/admin/api/", "/admin/login", "/admin/logout", "/admin/static/")
    )


def add_routes(app: web.Application) -> None:
    app[MEMORY] = _Memory()
    r = app.router
    r.add_get("/admin", shell)
    r.add_get("/admin/", shell)
    r.add_get("/admin/login", login_page)
    r.add_post("/admin/login", login)
    r.add_post("/admin/logout", logout)
    r.add_get("/admin/static/{name}", static)
    r.add_get("/admin/api/session", _api(session_info))
    r.add_get("/admin/api/overview", _api(overview))
    r.add_get("/admin/api/series", _api(series))
    r.add_get("/admin/api/workers", _api(workers))
    r.add_get("/admin/api/jobs", _api(list_jobs))
    r.add_get("/admin/api/jobs/{job_id}", _api(job_detail))
    r.add_get("/admin/api/dead-letters", _api(dead_letters))
    r.add_get("/admin/api/dead-letters/{provider}/{entry}", _api(dead_letter))
    r.add_post("/admin/api/dead-letters/{provider}/{entry}/replay", _api(replay))
    r.add_post("/admin/api/dead-letters/{provider}/{entry}/purge", _api(purge))
    r.add_post("/admin/api/dead-letters/{provider}/purge", _api(purge_all))
    r.add_get("/admin/api/batches", _api(list_batches))
    r.add_post("/admin/api/batches/{batch_id}/cancel", _api(cancel_batch))
