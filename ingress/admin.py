"""The admin API (``/admin/v1``): tenants and API keys kept in Redis, the audit
log, spend and usage; and ``GET /v1/usage``, a key's own usage.

Only admin keys (``auth.admin_keys`` in the config, or keys created with
``"admin": true``) may call it; an ordinary key gets 403. Every change is
audited (who, what, when; never a key) and announced to every ingress process.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from redis.exceptions import ResponseError

from llm_broker.ingress import console
from llm_broker.ingress.admission import identify, redis_call
from llm_broker.ingress.bodies import decode_body, json_response, limit_query, read_json_body
from llm_broker.ingress.state import STATE, State
from llm_broker.shared.accounts import (
    AccountError,
    Budget,
    KeyInput,
    KeyPatch,
    KeyRecord,
    Principal,
    Rotation,
    TenantInput,
    TenantPatch,
    TenantRecord,
    tenant_public,
)
from llm_broker.shared.errors import BadRequest, BrokerError, Conflict, Forbidden, NotFound
from llm_broker.shared.redisio import REDIS_DOWN, raise_if_cancelling

T = TypeVar("T")

log = logging.getLogger("llm_broker.ingress.admin")

_TENANT_INPUT = msgspec.json.Decoder(TenantInput)
_TENANT_PATCH = msgspec.json.Decoder(TenantPatch)
_KEY_INPUT = msgspec.json.Decoder(KeyInput)
_KEY_PATCH = msgspec.json.Decoder(KeyPatch)
_ROTATION = msgspec.json.Decoder(Rotation)

GROUPS = ("day", "tenant", "key", "model")
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")


def _failed(e: AccountError) -> BrokerError:
    kind: type[BrokerError] = {400: BadRequest, 403: Forbidden, 404: NotFound, 409: Conflict}.get(
        e.status, BadRequest
    )
    return kind(e.message, code=e.code)


async def _call(state: State, call: Awaitable[T]) -> T:
    try:
        return await redis_call(state, "admin", "", call)
    except AccountError as e:
        raise _failed(e) from e


async def _admin(request: web.Request) -> tuple[State, str]:
    """The state and the calling admin's name for the audit log: an admin key, or
    a console session (whose changes carry its CSRF token)."""
    state = request.app[STATE]
    return state, await console.operator(request, state)


async def _body(request: web.Request, state: State, decoder: msgspec.json.Decoder[T]) -> T:
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    return decode_body(decoder, raw, "admin request")


async def _with_spend(
    state: State, out: dict[str, Any], scope: str, name: str, budget: Budget | None
) -> dict[str, Any]:
    if budget is not None:
        spent, reset = await _call(state, state.accounts.spent(scope, name, budget))
        out["spend"] = {
            "usd": round(spent, 9),
            "remaining_usd": round(max(0.0, budget.usd - spent), 9),
            "resets_at": reset or None,
        }
    return out


async def _key_out(state: State, key: KeyRecord) -> dict[str, Any]:
    return await _with_spend(state, key.public(time.time()), "k", key.id, key.budget)


async def _tenant_out(state: State, rec: TenantRecord) -> dict[str, Any]:
    return await _with_spend(state, tenant_public(rec), "t", rec.name, rec.budget)


def _list(data: list[dict[str, Any]]) -> web.Response:
    return json_response({"object": "list", "data": data})


# ------------------------------------------------------------------ tenants


async def create_tenant(request: web.Request) -> web.Response:
    state, actor = await _admin(request)
    spec = await _body(request, state, _TENANT_INPUT)
    rec = await _call(state, state.accounts.create_tenant(actor, spec))
    return json_response(await _tenant_out(state, rec), 201)


async def list_tenants(request: web.Request) -> web.Response:
    state, _ = await _admin(request)
    found = await _call(state, state.accounts.list_tenants())
    return _list([await _tenant_out(state, rec) for rec in found])


async def get_tenant(request: web.Request) -> web.Response:
    state, _ = await _admin(request)
    name = request.match_info["name"]
    rec = await _call(state, state.accounts.tenant(name))
    if rec is None:
        raise NotFound(f"no tenant {name!r}")
    return json_response(await _tenant_out(state, rec))


async def update_tenant(request: web.Request) -> web.Response:
    state, actor = await _admin(request)
    patch = await _body(request, state, _TENANT_PATCH)
    name = request.match_info["name"]
    rec = await _call(state, state.accounts.update_tenant(actor, name, patch))
    return json_response(await _tenant_out(state, rec))


async def delete_tenant(request: web.Request) -> web.Response:
    state, actor = await _admin(request)
    name = request.match_info["name"]
    await _call(state, state.accounts.delete_tenant(actor, name))
    return json_response({"object": "tenant", "name": name, "deleted": True})


# ------------------------------------------------------------------ keys


async def create_key(request: web.Request) -> web.Response:
    state, actor = await _admin(request)
    spec = await _body(request, state, _KEY_INPUT)
    secret, rec = await _call(state, state.accounts.create_key(actor, spec))
    out = await _key_out(state, rec)
    out["key"] = secret  # shown this once
    return json_response(out, 201)


async def list_keys(request: web.Request) -> web.Response:
    state, _ = await _admin(request)
    tenant = request.query.get("tenant")
    found = await _call(state, state.accounts.list_keys(tenant))
    return _list([await _key_out(state, key) for key in found])


async def _key(state: State, key_id: str) -> KeyRecord:
    rec = await _call(state, state.accounts.key(key_id))
    if rec is None:
        raise NotFound(f"no key {key_id!r}")
    return rec


async def get_key(request: web.Request) -> web.Response:
    state, _ = await _admin(request)
    return json_response(await _key_out(state, await _key(state, request.match_info["key_id"])))


async def update_key(request: web.Request) -> web.Response:
    state, actor = await _admin(request)
    patch = await _body(request, state, _KEY_PATCH)
    rec = await _call(state, state.accounts.update_key(actor, request.match_info["key_id"], patch))
    return json_response(await _key_out(state, rec))


async def revoke_key(request: web.Request) -> web.Response:
    state, actor = await _admin(request)
    rec = await _call(state, state.accounts.revoke_key(actor, request.match_info["key_id"]))
    return json_response(await _key_out(state, rec))


async def rotate_key(request: web.Request) -> web.Response:
    state, actor = await _admin(request)
    raw = (
        await read_json_body(request, state.config.ingress.max_body_bytes)
        if (request.can_read_body)
        else b"{}"
    )
    rotation = decode_body(_ROTATION, raw or b"{}", "admin request")
    grace = rotation.grace_s
    if grace is None:
        grace = state.config.accounts.rotation_grace_s
    key_id = request.match_info["key_id"]
    secret, rec = await _call(state, state.accounts.rotate_key(actor, key_id, grace))
    out = await _key_out(state, rec)
    out["key"] = secret
    return json_response(out)


# ------------------------------------------------------------------ audit, usage


async def audit_log(request: web.Request) -> web.Response:
    state, _ = await _admin(request)
    limit = limit_query(request, 100, 1000)
    after = request.query.get("after")
    if after is not None and not _ENTRY_ID.fullmatch(after):
        raise BadRequest("after is an audit event id", param="after")
    events = await _call(state, state.accounts.audit_log(after, limit))
    return json_response(
        {
            "object": "list",
            "data": events,
            "has_more": len(events) == limit,
            "last_id": events[-1]["id"] if events else None,
        }
    )


def _usage_window(request: web.Request) -> tuple[str, str, tuple[str, ...]]:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    start = request.query.get("from", today)
    end = request.query.get("to", today)
    raw = request.query.get("group_by", "day")
    groups = tuple(g for g in raw.split(",") if g)
    if not groups or any(g not in GROUPS for g in groups) or len(set(groups)) != len(groups):
        raise BadRequest(
            f"group_by is a comma-separated list of {', '.join(GROUPS)}", param="group_by"
        )
    return start, end, groups


async def usage(request: web.Request) -> web.Response:
    """``GET /admin/v1/usage?tenant=&key=&model=&from=&to=&group_by=``."""
    state, _ = await _admin(request)
    start, end, groups = _usage_window(request)
    rows = await _call(
        state,
        state.accounts.usage(
            start=start,
            end=end,
            tenant=request.query.get("tenant"),
            key=request.query.get("key"),
            model=request.query.get("model"),
            group_by=groups,
        ),
    )
    return json_response({"object": "list", "data": rows, "from": start, "to": end})


async def own_usage(request: web.Request) -> web.Response:
    """``GET /v1/usage``: the calling key's own usage (a key from the config sees
    its tenant's requests made with config keys)."""
    state = request.app[STATE]
    principal: Principal = await identify(request, state)
    start, end, groups = _usage_window(request)
    if "tenant" in groups or "key" in groups:
        raise BadRequest("group_by may hold day and model here", param="group_by")
    rows = await _call(
        state,
        state.accounts.usage(
            start=start,
            end=end,
            tenant=principal.tenant,
            key=principal.key_id,
            model=request.query.get("model"),
            group_by=groups,
        ),
    )
    out: dict[str, Any] = {"object": "list", "data": rows, "from": start, "to": end}
    if principal.key_budget is not None:
        out = await _with_spend(state, out, "k", principal.key_id, principal.key_budget)
    return json_response(out)


async def check_admin(request: web.Request) -> None:
    """For a path under /admin that has no route: 401 or 403 before 404, so the admin
    API's shape is not visible without an admin key."""
    await _admin(request)


#: How often ingress exports the budgets' spend (seconds).
BUDGET_EXPORT_S = 15.0


async def export_budgets(state: State) -> None:
    """Export spend against budget for every budgeted tenant and key, every
    ``BUDGET_EXPORT_S`` and whenever one changes, until cancelled (the alert
    LLMBrokerBudgetNearlySpent reads it)."""
    gauges = state.metrics.budgets
    gauges.alert_fraction.set(state.config.accounts.budget_alert_fraction)
    while True:
        try:
            found = await asyncio.wait_for(
                state.accounts.budgets(), state.config.redis.command_timeout_s * 4
            )
        except (*REDIS_DOWN, ResponseError) as e:  # type: ignore[misc]
            raise_if_cancelling()
            log.debug("budget export: %s", e)
        else:
            for gauge in (gauges.spent, gauges.budget, gauges.ratio):
                gauge.clear()  # a budget removed since the last round goes
            for scope, name, budget, spent in found:
                labels = (scope, name, budget.period)
                gauges.spent.labels(*labels).set(spent)
                gauges.budget.labels(*labels).set(budget.usd)
                ratio = spent / budget.usd if budget.usd else (1.0 if spent else 0.0)
                gauges.ratio.labels(*labels).set(ratio)
        # The next round: the export period, or sooner when a tenant or key changed.
        state.auth.changed.clear()
        try:
            await asyncio.wait_for(state.auth.changed.wait(), BUDGET_EXPORT_S)
        except TimeoutError:
            pass


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/usage", own_usage)
    r.add_post("/admin/v1/tenants", create_tenant)
    r.add_get("/admin/v1/tenants", list_tenants)
    r.add_get("/admin/v1/tenants/{name}", get_tenant)
    r.add_patch("/admin/v1/tenants/{name}", update_tenant)
    r.add_delete("/admin/v1/tenants/{name}", delete_tenant)
    r.add_post("/admin/v1/keys", create_key)
    r.add_get("/admin/v1/keys", list_keys)
    r.add_get("/admin/v1/keys/{key_id}", get_key)
    r.add_patch("/admin/v1/keys/{key_id}", update_key)
    r.add_post("/admin/v1/keys/{key_id}/revoke", revoke_key)
    r.add_post("/admin/v1/keys/{key_id}/rotate", rotate_key)
    r.add_get("/admin/v1/audit", audit_log)
    r.add_get("/admin/v1/usage", usage)
