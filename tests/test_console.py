"""The operator's console (ingress/console.py) over HTTP: who may use it, sessions
and CSRF, and what its pages read (workers, overview, jobs, dead letters,
batches), against real Redis, ingress, worker and mock processes. The browser
test is tests/test_console_browser.py."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from llm_broker.shared.config import new_key
from llm_broker.shared.keys import GROUP, Keys
from tests.conftest import ConfigFactory, Procs, chat
from tests.helpers import dispatched, eventually, make_job, wait_status

ADMIN_KEY, ADMIN_SHA = new_key()
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
USER_KEY, USER_SHA = new_key()
USER = {"Authorization": f"Bearer {USER_KEY}"}

#: Every console API path, with the method that reaches it.
API_PATHS = [
    ("GET", "/admin/api/session"),
    ("GET", "/admin/api/overview"),
    ("GET", "/admin/api/series"),
    ("GET", "/admin/api/workers"),
    ("GET", "/admin/api/jobs"),
    ("GET", "/admin/api/jobs/0123456789abcdef"),
    ("GET", "/admin/api/dead-letters"),
    ("GET", "/admin/api/dead-letters/mock/1-0"),
    ("POST", "/admin/api/dead-letters/mock/1-0/replay"),
    ("POST", "/admin/api/dead-letters/mock/1-0/purge"),
    ("POST", "/admin/api/dead-letters/mock/purge"),
    ("GET", "/admin/api/batches"),
    ("POST", "/admin/api/batches/batch_x/cancel"),
    ("POST", "/admin/logout"),
    ("GET", "/admin/v1/tenants"),
    ("POST", "/admin/v1/keys"),
    ("GET", "/admin/no/such/page"),
]


def _config(make_config: ConfigFactory, mock_url: str, **sections: Any) -> Path:
    return make_config(
        mock_url,
        auth={
            "open": False,
            "keys": [{"tenant": "acme", "sha256": USER_SHA}],
            "admin_keys": [{"name": "ops", "sha256": ADMIN_SHA}],
        },
        **sections,
    )


def _browser() -> aiohttp.ClientSession:
    """A client that keeps cookies for 127.0.0.1 as a browser does."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def _login(http: aiohttp.ClientSession, url: str, key: str = ADMIN_KEY) -> str:
    """Log in on the form; the session's CSRF token."""
    async with http.post(f"{url}/admin/login", data={"key": key}, allow_redirects=False) as r:
        assert r.status == 303, await r.text()
    async with http.get(f"{url}/admin/api/session") as r:
        assert r.status == 200
        csrf: str = (await r.json())["csrf"]
        return csrf


async def test_without_an_admin_session_or_key_every_console_path_is_refused(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    _, url = procs.ingress(_config(make_config, mock_url))
    for method, path in API_PATHS:
        async with http.request(method, f"{url}{path}", json={}) as r:
            body = await r.json()
            assert r.status == 401, (method, path, body)
            assert body["error"]["type"] == "authentication_error"
        # An ordinary API key is not an admin key.
        async with http.request(method, f"{url}{path}", json={}, headers=USER) as r:
            assert r.status == 403, (method, path, await r.text())
    # The page itself answers 401 with the login form, under a strict policy.
    async with http.get(f"{url}/admin/") as r:
        page = await r.text()
        assert r.status == 401
        assert 'action="/admin/login"' in page and 'name="key"' in page
        assert "script-src 'self'" in r.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    # The assets hold no data: served to the login page.
    async with http.get(f"{url}/admin/static/console.css") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/css")
    async with http.get(f"{url}/admin/static/../../etc/passwd") as r:
        assert r.status in (401, 404)
    # A wrong key on the form: the form again, with the reason, and no cookie.
    async with http.post(f"{url}/admin/login", data={"key": USER_KEY}) as r:
        assert r.status == 401 and "not an admin key" in await r.text()
        assert "Set-Cookie" not in r.headers


async def test_a_login_session_is_a_strict_cookie_and_every_action_needs_its_csrf_token(
    procs: Procs, make_config: ConfigFactory
) -> None:
    _, mock_url = procs.mock()
    _, url = procs.ingress(_config(make_config, mock_url))
    async with _browser() as http:
        async with http.post(
            f"{url}/admin/login", data={"key": ADMIN_KEY}, allow_redirects=False
        ) as r:
            assert r.status == 303 and r.headers["Location"] == "/admin/"
            cookie = r.headers["Set-Cookie"]
        attributes = {a.strip().lower() for a in cookie.split(";")}
        assert {"httponly", "samesite=strict", "path=/admin"} <= attributes, cookie
        async with http.get(f"{url}/admin/") as r:
            assert r.status == 200 and "/admin/static/console.js" in await r.text()
            assert r.headers["Content-Security-Policy"].startswith("default-src 'none'")
        async with http.get(f"{url}/admin/api/session") as r:
            session = await r.json()
        assert session["user"] == "config:ops" and len(session["csrf"]) >= 32
        csrf = session["csrf"]
        new_tenant = {"name": "from-console"}
        # An action without the token, with a wrong one, or from another origin: 403.
        for headers in (
            {},
            {"X-CSRF-Token": "x" * 43},
            {"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
        ):
            async with http.post(f"{url}/admin/v1/tenants", json=new_tenant, headers=headers) as r:
                body = await r.json()
                assert r.status == 403 and body["error"]["code"] == "csrf_failed", body
            async with http.post(
                f"{url}/admin/api/dead-letters/mock/purge", json={}, headers=headers
            ) as r:
                assert r.status == 403
        async with http.get(f"{url}/admin/v1/tenants") as r:
            assert (await r.json())["data"] == []  # nothing was created
        # With it, the admin API works from the console, audited as the operator.
        async with http.post(
            f"{url}/admin/v1/tenants",
            json=new_tenant,
            headers={"X-CSRF-Token": csrf, "Origin": url},
        ) as r:
            assert r.status == 201, await r.text()
        async with http.get(f"{url}/admin/v1/audit") as r:
            audit = (await r.json())["data"]
        assert [a["action"] for a in audit[:2]] == ["tenant.create", "console.login"]
        assert all(a["actor"] == "config:ops" for a in audit[:2])
        # Logging out ends the session on every ingress.
        async with http.post(f"{url}/admin/logout", headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 204
        async with http.get(f"{url}/admin/api/session") as r:
            assert r.status == 401


async def test_a_session_expires(procs: Procs, make_config: ConfigFactory) -> None:
    _, mock_url = procs.mock()
    _, url = procs.ingress(_config(make_config, mock_url, console={"session_ttl_s": 2}))
    async with _browser() as http:
        await _login(http, url)

        async def expired() -> bool:
            async with http.get(f"{url}/admin/api/overview") as r:
                return r.status == 401

        await eventually(expired, timeout=10, what="the session to expire")
        async with http.get(f"{url}/admin/") as r:
            assert r.status == 401 and 'name="key"' in await r.text()


@pytest.mark.chaos
async def test_workers_appear_with_their_slots_and_a_dead_one_disappears_within_its_ttl(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, worker={"heartbeat_s": 0.5})
    kept = procs.worker(config)
    doomed = procs.worker(config)
    _, url = procs.ingress(config)

    async def workers() -> list[dict[str, Any]]:
        async with http.get(f"{url}/admin/api/workers", headers=ADMIN) as r:
            assert r.status == 200
            found: list[dict[str, Any]] = (await r.json())["workers"]
            return found

    async def both() -> list[dict[str, Any]] | None:
        found = await workers()
        return found if len(found) == 2 else None

    listed = await eventually(both, what="two live workers")
    assert {w["pid"] for w in listed} == {kept.proc.pid, doomed.proc.pid}
    for w in listed:
        assert w["providers"] == [{"name": "mock", "slots": 64, "free": 64, "held": 0}]
        assert w["version"] and w["started_at"] <= w["beat_at"]
    # Traffic: the overview and the hour's series count it.
    request_ids = []
    for n in range(5):
        async with http.post(
            f"{url}/v1/chat/completions", json=chat("mock", f"n{n}"), headers=USER
        ) as r:
            assert r.status == 200
            request_ids.append(r.headers["X-Request-Id"])
    # A synchronous call is found by its X-Request-Id.
    async with http.get(f"{url}/admin/api/jobs/{request_ids[0]}", headers=ADMIN) as r:
        call = await r.json()
    assert call["status"] == "completed" and call["tenant"] == "acme"
    assert call["priority"] == "interactive" and call["http_status"] == 200
    assert call["timings"]["total_s"] is not None and call["prompt"] is None

    async def counted() -> dict[str, Any] | None:
        async with http.get(f"{url}/admin/api/series", headers=ADMIN) as r:
            series = await r.json()
        done = sum(series["providers"]["mock"]["completed"])
        return series if done == 5 else None

    series = await eventually(counted, timeout=10, what="the five calls in the series")
    os.kill(doomed.proc.pid, signal.SIGKILL)
    doomed.proc.wait(10)

    async def one_left() -> bool:
        return [w["pid"] for w in await workers()] == [kept.proc.pid]

    # Three heartbeats (1.5 s) and the list forgets it.
    await eventually(one_left, timeout=5, what="the killed worker to drop off")

    assert series["points"] == 60 and series["step_s"] == 60
    async with http.get(f"{url}/admin/api/overview", headers=ADMIN) as r:
        overview = await r.json()
    (mock,) = overview["providers"]
    assert mock["name"] == "mock" and mock["workers"] == 1 and mock["slots"] == 64
    assert [c["priority"] for c in mock["classes"]] == ["interactive", "async", "batch"]
    assert overview["redis"]["ok"] and overview["redis"]["connected_clients"] > 0
    assert overview["circuits"] == [
        {
            "provider": "mock",
            "deployment": "mock/mock*",
            "state": "closed",
            "open_in": 0,
            "workers": 1,
        }
    ]


async def _poison(
    rclient: aioredis.Redis, prefix: str, content: str, tenant: str = "acme"
) -> tuple[str, str]:
    """A job a worker took and died holding: the next delivery is one too many
    (``max_deliveries: 1``), so it is dead-lettered. Its id and its entry's."""
    queue = Keys(prefix).queue("mock")
    if not await rclient.exists(queue):
        await rclient.xgroup_create(queue, GROUP, id="0", mkstream=True)
    job = make_job("mock", content=content)
    job.tenant = tenant
    entry = await dispatched(rclient, prefix, job)
    delivered = await rclient.xreadgroup(GROUP, "crashed", {queue: ">"}, count=1)
    assert delivered[0][1][0][0].decode() == entry
    return job.id, entry


async def test_a_dead_letter_is_inspected_replayed_once_and_purged_with_an_audit_trail(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    rclient: aioredis.Redis,
    prefix: str,
) -> None:
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, worker={"lease_s": 0.3, "max_deliveries": 1})
    poisoned = [await _poison(rclient, prefix, f"poison {n}") for n in range(2)]
    procs.worker(config)
    _, url = procs.ingress(config)
    for job_id, _ in poisoned:
        await wait_status(rclient, prefix, job_id, "failed")

    async def api(method: str, path: str, status: int = 200) -> Any:
        async with http.request(method, f"{url}{path}", json={}, headers=ADMIN) as r:
            body = await r.json()
            assert r.status == status, (path, body)
            return body

    listed = await api("GET", "/admin/api/dead-letters?provider=mock")
    assert listed["total"] == {"mock": 2}
    by_job = {e["job"]: e for e in listed["entries"]}
    job_id, _ = poisoned[0]
    letter = by_job[job_id]
    assert letter["tenant"] == "acme" and letter["replayable"]
    assert "max_deliveries" in letter["error"] or "delivered" in letter["error"]
    one = await api("GET", f"/admin/api/dead-letters/mock/{letter['id']}")
    assert one["body"] is None  # never the prompt unasked
    hidden = await api("GET", f"/admin/api/dead-letters/mock/{letter['id']}?prompt=1", 403)
    assert hidden["error"]["code"] == "prompts_hidden"
    # The job's page: its attempts and error, never its prompt.
    detail = await api("GET", f"/admin/api/jobs/{job_id}")
    assert detail["status"] == "failed" and detail["prompt"] is None
    assert detail["error"]["error"]["code"] == "max_deliveries_exceeded"

    replayed = await api("POST", f"/admin/api/dead-letters/mock/{letter['id']}/replay")
    new_id = replayed["job_id"]
    assert new_id != job_id
    await wait_status(rclient, prefix, new_id, "completed")
    again = await api("POST", f"/admin/api/dead-letters/mock/{letter['id']}/replay", 409)
    assert again["error"]["code"] == "already_replayed" and new_id in again["error"]["message"]
    new_job = await api("GET", f"/admin/api/jobs/{new_id}")
    assert new_job["tenant"] == "acme" and new_job["status"] == "completed"
    assert new_job["metadata"]["replay_of"] == job_id
    listed = await api("GET", "/admin/api/dead-letters?provider=mock")
    assert {e["job"]: e["replayed_as"] for e in listed["entries"]}[job_id] == new_id
    # The tenant's jobs, filtered by status.
    completed = await api("GET", "/admin/api/jobs?tenant=acme&status=completed")
    assert [j["id"] for j in completed["jobs"]] == [new_id]

    purged = await api("POST", f"/admin/api/dead-letters/mock/{letter['id']}/purge")
    assert purged == {"purged": 1}
    await api("POST", f"/admin/api/dead-letters/mock/{letter['id']}/purge", 404)
    assert (await api("POST", "/admin/api/dead-letters/mock/purge")) == {"purged": 1}
    assert (await api("GET", "/admin/api/dead-letters"))["entries"] == []
    audit = (await api("GET", "/admin/v1/audit"))["data"]
    actions = [(a["action"], a["actor"]) for a in audit[:3]]
    assert actions == [
        ("dead_letter.purge_all", "config:ops"),
        ("dead_letter.purge", "config:ops"),
        ("dead_letter.replay", "config:ops"),
    ]


async def test_an_operator_may_see_a_dead_letters_prompt_when_the_config_allows(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    rclient: aioredis.Redis,
    prefix: str,
) -> None:
    _, mock_url = procs.mock()
    config = _config(
        make_config,
        mock_url,
        worker={"lease_s": 0.3, "max_deliveries": 1},
        console={"show_prompts": True},
    )
    job_id, _ = await _poison(rclient, prefix, "the secret prompt")
    procs.worker(config)
    _, url = procs.ingress(config)
    await wait_status(rclient, prefix, job_id, "failed")
    async with http.get(f"{url}/admin/api/jobs/{job_id}", headers=ADMIN) as r:
        assert (await r.json())["prompt"] is None
    async with http.get(f"{url}/admin/api/jobs/{job_id}?prompt=1", headers=ADMIN) as r:
        prompt = (await r.json())["prompt"]
    assert "the secret prompt" in orjson.loads(prompt["body"])["messages"][0]["content"]
    async with http.get(f"{url}/admin/v1/audit", headers=ADMIN) as r:
        (first, *_) = (await r.json())["data"]
    assert first["action"] == "console.prompt" and first["target"] == job_id


async def test_the_console_can_be_turned_off(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    _, url = procs.ingress(_config(make_config, mock_url, console={"enabled": False}))
    async with http.get(f"{url}/admin/") as r:
        assert r.status == 404
    async with http.post(f"{url}/admin/login", data={"key": ADMIN_KEY}) as r:
        assert r.status == 404
    # The admin API stays.
    async with http.get(f"{url}/admin/v1/tenants", headers=ADMIN) as r:
        assert r.status == 200


async def test_a_running_batch_shows_its_progress_and_an_operator_cancels_it(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    _, mock_url = procs.mock()
    config = _config(make_config, mock_url, files={"dir": str(tmp_path / "files"), "window": 4})
    procs.worker(config)
    _, url = procs.ingress(config)
    lines = b"".join(
        orjson.dumps(
            {
                "custom_id": f"s{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": chat("mock-latency-400", f"slow {i}"),
            }
        )
        + b"\n"
        for i in range(40)
    )
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", lines, filename="s.jsonl")
    async with http.post(f"{url}/v1/files", data=form, headers=USER) as r:
        file_id = (await r.json())["id"]
    body = {
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    async with http.post(f"{url}/v1/batches", json=body, headers=USER) as r:
        batch_id = (await r.json())["id"]

    async def progressing() -> dict[str, Any] | None:
        async with http.get(f"{url}/admin/api/batches", headers=ADMIN) as r:
            found = {b["id"]: b for b in (await r.json())["batches"]}
        b = found.get(batch_id)
        return b if b is not None and b["request_counts"]["completed"] >= 4 else None

    shown = await eventually(progressing, timeout=30, what="the batch to make progress")
    assert shown["tenant"] == "acme" and shown["status"] == "in_progress"
    assert shown["request_counts"]["total"] == 40
    async with http.post(f"{url}/admin/api/batches/{batch_id}/cancel", headers=ADMIN) as r:
        cancelled = await r.json()
        assert r.status == 200, cancelled
    assert cancelled["status"] == "cancelling"

    async def ended() -> dict[str, Any] | None:
        async with http.get(f"{url}/v1/batches/{batch_id}", headers=USER) as r:
            b: dict[str, Any] = await r.json()
        return b if b["status"] == "cancelled" else None

    done = await eventually(ended, timeout=30, what="the cancelled batch to end")
    assert 4 <= done["request_counts"]["completed"] < 40
    async with http.post(f"{url}/admin/api/batches/{batch_id}/cancel", headers=ADMIN) as r:
        assert r.status == 409 and (await r.json())["error"]["code"] == "batch_ended"
    async with http.get(f"{url}/admin/v1/audit", headers=ADMIN) as r:
        (first, *_) = (await r.json())["data"]
    assert (first["action"], first["target"]) == ("batch.cancel", batch_id)
