"""Keys and tenants kept in Redis (the admin API), their limits and budgets, spend
and usage: real Redis, real ingress and worker processes, two ingress processes
wherever it matters that every process sees a change."""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from llm_broker.shared.config import new_key
from tests.conftest import ConfigFactory, Procs, chat, mock_stats
from tests.helpers import admin_call, eventually
from tests.test_observability import scrape, value

ADMIN_KEY, ADMIN_SHA = new_key()
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CONFIG_KEY, CONFIG_SHA = new_key()

#: 8 output tokens (the mock's answer) cost $0.001; input tokens are free, so a
#: request with max_tokens 8 is estimated at exactly its cost.
PRICING = {
    "gpt-4o-mini": {"input_usd_per_million": 0.0, "output_usd_per_million": 125.0},
    "mock": {"input_usd_per_million": 10.0, "output_usd_per_million": 30.0},
    # Every other mock-* model is priced as its route.
    "mock*": {"input_usd_per_million": 0.0, "output_usd_per_million": 125.0},
}


def _config(make_config: ConfigFactory, mock_url: str, **sections: Any) -> Path:
    return make_config(
        mock_url,
        auth={
            "open": False,
            "keys": [{"tenant": "static", "sha256": CONFIG_SHA}],
            "admin_keys": [{"name": "ops", "sha256": ADMIN_SHA}],
        },
        pricing=PRICING,
        **sections,
    )


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _admin(
    http: aiohttp.ClientSession, method: str, url: str, body: object = None, status: int = 200
) -> Any:
    return await admin_call(http, ADMIN, method, url, body, status)


async def _chat(
    http: aiohttp.ClientSession, url: str, key: str, model: str = "gpt-4o-mini", **extra: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{url}/v1/chat/completions", json=chat(model, **extra), headers=_auth(key)
    ) as r:
        return r.status, await r.json()


def _start(procs: Procs, config: Path, ingresses: int = 2, workers: int = 1) -> list[str]:
    for _ in range(workers):
        procs.worker(config)
    return [procs.ingress(config)[1] for _ in range(ingresses)]


async def test_a_key_works_on_every_ingress_and_its_revocation_reaches_them_within_1s(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    one, two = _start(procs, _config(make_config, mock_url))
    await _admin(http, "POST", f"{one}/admin/v1/tenants", {"name": "acme"}, 201)
    created = await _admin(
        http, "POST", f"{one}/admin/v1/keys", {"tenant": "acme", "name": "ci"}, 201
    )
    key = created["key"]
    assert key.startswith("sk-llmb-") and created["status"] == "active"
    for url in (one, two):
        status, body = await _chat(http, url, key)
        assert status == 200, body
    # Shown once: a read of the key never shows it (nor its hash).
    shown = await _admin(http, "GET", f"{two}/admin/v1/keys/{created['id']}")
    assert "key" not in shown and key not in orjson.dumps(shown).decode()

    await _admin(http, "POST", f"{two}/admin/v1/keys/{created['id']}/revoke")
    revoked_at = time.monotonic()

    async def refused(url: str) -> float | None:
        status, body = await _chat(http, url, key)
        if status == 200:
            return None
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body
        return time.monotonic() - revoked_at

    waited = await asyncio.gather(
        *(eventually(functools.partial(refused, u), 3) for u in (one, two))
    )
    assert max(waited) <= 1.0, waited
    # A key from the config works as before, beside the keys in Redis.
    assert (await _chat(http, one, CONFIG_KEY))[0] == 200


async def test_expired_and_rotated_keys(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    one, two = _start(procs, _config(make_config, mock_url))
    await _admin(http, "POST", f"{one}/admin/v1/tenants", {"name": "acme"}, 201)
    expires = time.time() + 1.5
    short = await _admin(
        http, "POST", f"{one}/admin/v1/keys", {"tenant": "acme", "expires_at": expires}, 201
    )
    assert (await _chat(http, two, short["key"]))[0] == 200

    async def expired() -> bool:
        return (await _chat(http, two, short["key"]))[0] == 401

    await eventually(expired, 5, what="the key to expire")
    assert time.time() >= expires
    listed = await _admin(http, "GET", f"{one}/admin/v1/keys?tenant=acme")
    assert [k["status"] for k in listed["data"]] == ["expired"]

    # A rotation returns a new key; the old one stays valid for its grace period.
    rotating = await _admin(http, "POST", f"{one}/admin/v1/keys", {"tenant": "acme"}, 201)
    old = rotating["key"]
    rotated = await _admin(
        http, "POST", f"{one}/admin/v1/keys/{rotating['id']}/rotate", {"grace_s": 2}
    )
    new = rotated["key"]
    assert new != old and rotated["id"] == rotating["id"]
    grace_end = rotated["previous_secret_valid_until"]
    for url in (one, two):
        assert (await _chat(http, url, new))[0] == 200
        assert (await _chat(http, url, old))[0] == 200

    async def old_refused() -> bool:
        return (await _chat(http, two, old))[0] == 401

    await eventually(old_refused, 6, what="the rotated-out key to stop working")
    assert time.time() >= grace_end
    assert (await _chat(http, two, new))[0] == 200


async def test_ordinary_keys_get_403_on_the_admin_api_and_the_audit_log_names_no_key(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    (url,) = _start(procs, _config(make_config, mock_url), ingresses=1)
    await _admin(http, "POST", f"{url}/admin/v1/tenants", {"name": "acme"}, 201)
    created = await _admin(http, "POST", f"{url}/admin/v1/keys", {"tenant": "acme"}, 201)
    key = created["key"]
    await _admin(http, "PATCH", f"{url}/admin/v1/keys/{created['id']}", {"limits": {"rpm": 100}})
    rotated = await _admin(http, "POST", f"{url}/admin/v1/keys/{created['id']}/rotate", {})
    await _admin(http, "POST", f"{url}/admin/v1/keys/{created['id']}/revoke")

    paths = [
        ("GET", "/admin/v1/keys"),
        ("POST", "/admin/v1/keys"),
        ("GET", "/admin/v1/tenants/acme"),
        ("GET", "/admin/v1/audit"),
        ("GET", "/admin/v1/usage"),
        ("GET", "/admin/v1/no-such-thing"),
    ]
    for ordinary in (CONFIG_KEY, rotated["key"]):
        for method, path in paths:
            async with http.request(method, url + path, headers=_auth(ordinary), json={}) as r:
                body = await r.json()
                # The rotated key is revoked now (401); the config key is a valid
                # key that may not administer (403).
                expected = 403 if ordinary == CONFIG_KEY else 401
                assert r.status == expected, (path, body)
    for method, path in paths:
        async with http.request(method, url + path, json={}) as r:
            assert r.status == 401
    # An admin key is for the admin API only.
    async with http.post(f"{url}/v1/chat/completions", json=chat(), headers=ADMIN) as r:
        assert r.status == 403

    audit = await _admin(http, "GET", f"{url}/admin/v1/audit")
    actions = [e["action"] for e in reversed(audit["data"])]
    assert actions == ["tenant.create", "key.create", "key.update", "key.rotate", "key.revoke"]
    assert {e["actor"] for e in audit["data"]} == {"config:ops"}
    text = orjson.dumps(audit).decode()
    for secret in (key, rotated["key"], ADMIN_KEY):
        assert secret not in text and secret[:20] not in text
    page = await _admin(http, "GET", f"{url}/admin/v1/audit?limit=2")
    assert len(page["data"]) == 2 and page["has_more"]
    for bad in ("limit=%C2%B2", "limit=0", "after=%C2%B2-1", "after=x"):
        async with http.get(f"{url}/admin/v1/audit?{bad}", headers=ADMIN) as r:
            assert r.status == 400, bad
    rest = await _admin(http, "GET", f"{url}/admin/v1/audit?after={page['last_id']}")
    assert [e["action"] for e in rest["data"]] == ["key.update", "key.create", "tenant.create"]


async def test_a_key_may_use_only_its_models_and_its_priority_ceiling(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    (url,) = _start(procs, _config(make_config, mock_url), ingresses=1)
    await _admin(http, "POST", f"{url}/admin/v1/tenants", {"name": "acme"}, 201)
    created = await _admin(
        http,
        "POST",
        f"{url}/admin/v1/keys",
        {"tenant": "acme", "models": ["gpt-4o-mini"], "max_priority": "batch"},
        201,
    )
    key = created["key"]
    assert (await _chat(http, url, key))[0] == 200
    status, body = await _chat(http, url, key, model="mock-fast")
    assert status == 403 and body["error"]["code"] == "model_not_allowed", body
    async with http.post(
        f"{url}/v1/jobs", json={"request": chat()}, headers={**_auth(key), "X-Priority": "async"}
    ) as r:
        job = await r.json()
        assert r.status == 202 and job["priority"] == "batch", job


async def test_budget_race_across_two_ingress_processes(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    """200 concurrent requests of about $0.001 each against a $0.05 budget: the spend
    ends within the budget plus the estimates in flight, and the rest get 429."""
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, providers={"mock": {"max_concurrency": 64}})
    one, two = _start(procs, config)
    await _admin(
        http,
        "POST",
        f"{one}/admin/v1/tenants",
        {"name": "acme", "budget": {"usd": 0.05, "period": "daily"}},
        201,
    )
    key = (await _admin(http, "POST", f"{one}/admin/v1/keys", {"tenant": "acme"}, 201))["key"]
    before = await mock_stats(http, mock_url)

    async def client(url: str) -> list[tuple[int, dict[str, Any]]]:
        async with aiohttp.ClientSession() as own:
            return await asyncio.gather(
                *(_chat(own, url, key, model="mock-latency-50", max_tokens=8) for _ in range(50))
            )

    answers = [
        a
        for found in await asyncio.gather(client(one), client(two), client(one), client(two))
        for a in found
    ]
    ok = [body for status, body in answers if status == 200]
    refused = [body for status, body in answers if status != 200]
    assert all(b["error"]["code"] == "budget_exceeded" for b in refused), refused[:3]
    after = await mock_stats(http, mock_url)
    calls = after["completed"] - before["completed"]
    assert calls == len(ok)
    spent = (after["completion_tokens"] - before["completion_tokens"]) * 125.0 / 1e6
    # Each admission sees what the others reserved: at most one estimate ($0.001) over.
    assert 0.049 <= spent <= 0.05 + 0.001 + 1e-9, (spent, len(ok))
    tenant = await _admin(http, "GET", f"{two}/admin/v1/tenants/acme")
    assert abs(tenant["spend"]["usd"] - spent) < 1e-9
    assert tenant["spend"]["remaining_usd"] == 0 or spent < 0.05
    # Every request from now on is refused, with the period's end.
    async with http.post(
        f"{two}/v1/chat/completions", json=chat(max_tokens=8), headers=_auth(key)
    ) as r:
        body = await r.json()
        assert r.status == 429 and body["error"]["code"] == "budget_exceeded"
        reset = int(r.headers["Retry-After"])
        assert 0 < reset <= 86400 and "resets at" in body["error"]["message"]
    # The budget raised, requests are admitted again (every ingress process).
    await _admin(
        http, "PATCH", f"{one}/admin/v1/tenants/acme", {"budget": {"usd": 1, "period": "daily"}}
    )

    async def admitted() -> bool:
        return (await _chat(http, two, key, max_tokens=8))[0] == 200

    await eventually(admitted, 2, what="the raised budget to take effect")

    # Every ingress process exports the spend against the budget (the alert's input),
    # at once after a change.
    labels = {("scope", "tenant"), ("name", "acme"), ("period", "daily")}

    async def exported() -> dict[str, float] | None:
        samples, _ = await scrape(http, f"{two}/metrics")
        found = {
            n: sum(
                v
                for (metric, ls), v in samples.items()
                if metric == f"llm_broker_budget_{n}" and labels <= ls
            )
            for n in ("spent_usd", "usd", "used_ratio")
        }
        return found if found["usd"] == 1 else None

    gauges = await eventually(exported, 5, what="the budget's gauges")
    assert spent <= gauges["spent_usd"] <= spent + 0.002  # and what was admitted since
    assert gauges["used_ratio"] == gauges["spent_usd"]
    samples, _ = await scrape(http, f"{one}/metrics")
    assert value(samples, "llm_broker_budget_alert_fraction") == 0.8


@pytest.mark.scale
async def test_per_key_rpm_is_exact_across_two_ingress_and_three_workers(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    one, two = _start(procs, _config(make_config, mock_url), workers=3)
    await _admin(http, "POST", f"{one}/admin/v1/tenants", {"name": "acme"}, 201)
    limited = await _admin(
        http, "POST", f"{one}/admin/v1/keys", {"tenant": "acme", "limits": {"rpm": 12}}, 201
    )
    key = limited["key"]
    answers = await asyncio.gather(
        *(_chat(http, url, key) for url in (one, two) for _ in range(20))
    )
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 12 + [429] * 28
    codes = {b["error"]["code"] for s, b in answers if s == 429}
    assert codes == {"key_rate_limited"}
    # Another key of the same tenant has its own window.
    other = await _admin(http, "POST", f"{one}/admin/v1/keys", {"tenant": "acme"}, 201)
    assert (await _chat(http, two, other["key"]))[0] == 200


async def test_key_in_flight_limit(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    (url,) = _start(procs, _config(make_config, mock_url), ingresses=1)
    await _admin(http, "POST", f"{url}/admin/v1/tenants", {"name": "acme"}, 201)
    created = await _admin(
        http,
        "POST",
        f"{url}/admin/v1/keys",
        {"tenant": "acme", "limits": {"max_in_flight": 2}},
        201,
    )
    answers = await asyncio.gather(
        *(_chat(http, url, created["key"], model="mock-latency-1000") for _ in range(5))
    )
    statuses = sorted(s for s, _ in answers)
    assert statuses == [200, 200, 429, 429, 429]
    assert {b["error"]["code"] for s, b in answers if s == 429} == {"key_in_flight_limit"}
    # Finished requests leave the count: the key may send again.
    assert (await _chat(http, url, created["key"]))[0] == 200


async def test_usage_equals_the_mock_tokens_times_pricing_per_model_and_day(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    one, two = _start(procs, _config(make_config, mock_url))
    await _admin(http, "POST", f"{one}/admin/v1/tenants", {"name": "acme"}, 201)
    key_a = await _admin(http, "POST", f"{one}/admin/v1/keys", {"tenant": "acme"}, 201)
    key_b = await _admin(http, "POST", f"{one}/admin/v1/keys", {"tenant": "acme"}, 201)
    tokens: dict[str, tuple[int, int]] = {}
    start = await mock_stats(http, mock_url)
    for model, count in (("gpt-4o-mini", 7), ("mock", 5)):
        answers = await asyncio.gather(
            *(
                _chat(
                    http,
                    (one, two)[i % 2],
                    (key_a, key_b)[i % 2]["key"],
                    model=model,
                    content="one two three " * (i + 1),
                )
                for i in range(count)
            )
        )
        assert all(s == 200 for s, _ in answers)
        end = await mock_stats(http, mock_url)
        tokens[model] = (
            end["prompt_tokens"] - start["prompt_tokens"],
            end["completion_tokens"] - start["completion_tokens"],
        )
        start = end
    today = time.strftime("%Y-%m-%d", time.gmtime())

    async def rows() -> list[dict[str, Any]] | None:
        found = await _admin(
            http,
            "GET",
            f"{two}/admin/v1/usage?tenant=acme&from={today}&to={today}&group_by=day,model",
        )
        data: list[dict[str, Any]] = found["data"]
        return data if sum(r["requests"] for r in data) == 12 else None

    by_model = {r["model"]: r for r in await eventually(rows, 5, what="the usage")}
    assert set(by_model) == {"gpt-4o-mini", "mock"}
    for model, (prompt, completion) in tokens.items():
        row = by_model[model]
        price = PRICING[model]
        cost = (
            prompt * price["input_usd_per_million"] + completion * price["output_usd_per_million"]
        ) / 1e6
        assert (row["input_tokens"], row["output_tokens"]) == (prompt, completion)
        assert abs(row["cost_usd"] - cost) < 1e-8, (row, cost)
        assert row["day"] == today and row["errors"] == 0
    by_key = await _admin(http, "GET", f"{one}/admin/v1/usage?tenant=acme&group_by=key")
    assert {r["key"]: r["requests"] for r in by_key["data"]} == {
        key_a["id"]: 4 + 3,
        key_b["id"]: 3 + 2,
    }
    # A key sees its own usage only.
    async with http.get(f"{one}/v1/usage?group_by=model", headers=_auth(key_b["key"])) as r:
        own = await r.json()
        assert r.status == 200, own
    assert {row["model"]: row["requests"] for row in own["data"]} == {"gpt-4o-mini": 3, "mock": 2}


async def test_tenant_limits_and_admin_keys_kept_in_redis(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    (url,) = _start(procs, _config(make_config, mock_url), ingresses=1)
    # An admin key made with the admin API administers, and cannot call models.
    made = await _admin(http, "POST", f"{url}/admin/v1/keys", {"admin": True, "name": "ci"}, 201)
    second_admin = _auth(made["key"])
    async with http.post(
        f"{url}/admin/v1/tenants",
        json={"name": "acme", "limits": {"rpm": 3}, "metadata": {"team": "search"}},
        headers=second_admin,
    ) as r:
        tenant = await r.json()
        assert r.status == 201 and tenant["metadata"] == {"team": "search"}, tenant
    async with http.post(f"{url}/v1/chat/completions", json=chat(), headers=second_admin) as r:
        assert r.status == 403
    audit = await _admin(http, "GET", f"{url}/admin/v1/audit?limit=1")
    assert audit["data"][0]["actor"] == made["id"]

    # The tenant's rpm holds across its keys; a key limited to one model lists it alone.
    one = await _admin(
        http, "POST", f"{url}/admin/v1/keys", {"tenant": "acme", "models": ["gpt-4o-mini"]}, 201
    )
    two = await _admin(http, "POST", f"{url}/admin/v1/keys", {"tenant": "acme"}, 201)
    statuses = [(await _chat(http, url, k["key"]))[0] for k in (one, two, one, two)]
    assert statuses == [200, 200, 200, 429]
    status, body = await _chat(http, url, one["key"])
    assert status == 429 and body["error"]["code"] == "tenant_rate_limited", body
    async with http.get(f"{url}/v1/models", headers=_auth(one["key"])) as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["gpt-4o-mini"]
