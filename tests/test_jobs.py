"""Async jobs, polling, cancellation, idempotency and webhooks, end to end.

Real processes (mock upstream, worker, ingress, webhook delivery) on a real
Redis; webhooks go to a receiver in this process on 127.0.0.1 and are verified
with the ``standardwebhooks`` library.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from llm_broker.dev import free_port
from llm_broker.shared.accounts import AccountKeys
from llm_broker.shared.config import new_key, new_webhook_secret
from llm_broker.shared.keys import Keys
from tests.conftest import (
    ConfigFactory,
    Delivery,
    Procs,
    Receiver,
    RedisServer,
    chat,
    mock_stats,
    wait_in_flight,
    write_config,
)
from tests.helpers import eventually

KEY_A, HASH_A = new_key()
KEY_B, HASH_B = new_key()
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}


@dataclass
class Stack:
    url: str
    closed_url: str  # an ingress whose webhook allowlist is empty
    mock_url: str
    parked_mock_url: str
    prefix: str
    config: Path
    secret_a: Path
    procs: Procs
    webhooks_metrics: str


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Ingress, a worker for ``mock``, webhook delivery; ``parked*`` has no worker."""
    if redis_server.proc is None:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("jobs")
    procs = Procs(tmp)
    try:
        _, mock_url = procs.mock()
        _, parked_url = procs.mock()
        prefix = "jobs-shared:"
        secret_a = tmp / "secret-a"
        secret_a.write_text(new_webhook_secret())
        secret_all = tmp / "secret-all"
        secret_all.write_text(new_webhook_secret())
        common: dict[str, Any] = dict(
            auth={
                "keys": [
                    {"tenant": "alpha", "sha256": HASH_A},
                    {"tenant": "beta", "sha256": HASH_B},
                ]
            },
            providers={
                "mock": {"type": "mock", "base_url": f"{mock_url}/v1"},
                "parked": {"type": "mock", "base_url": f"{parked_url}/v1"},
            },
            models={
                "mock*": {"provider": "mock"},
                "gpt-4o-mini": {"provider": "mock", "model": "mock"},
                "parked*": {"provider": "parked", "model": "mock"},
            },
        )
        webhooks = {
            "secret_file": str(secret_all),
            "tenant_secret_files": {"alpha": str(secret_a)},
            "retry_schedule_s": [0, 0.2, 0.2],
            "poll_delay_s": 0.05,
            "allow_cidrs": ["127.0.0.0/8"],
            "allow_ports": ["1024-65535"],  # receivers listen on random ports
        }
        config = write_config(tmp, redis_server.url, prefix, mock_url, webhooks=webhooks, **common)
        closed = write_config(
            tmp,
            redis_server.url,
            prefix,
            mock_url,
            webhooks={**webhooks, "allow_cidrs": []},
            **common,
        )
        procs.worker(config, providers=["mock"])
        metrics_port = free_port()
        procs.webhooks(config, "--metrics-port", str(metrics_port))
        _, url = procs.ingress(config)
        _, closed_url = procs.ingress(closed)
        yield Stack(
            url,
            closed_url,
            mock_url,
            parked_url,
            prefix,
            config,
            secret_a,
            procs,
            f"http://127.0.0.1:{metrics_port}/metrics",
        )
    finally:
        procs.stop_all()


async def submit(
    http: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
    auth: dict[str, str] = AUTH_A,
) -> tuple[int, dict[str, Any], Any]:
    async with http.post(f"{url}/v1/jobs", json=body, headers={**auth, **(headers or {})}) as r:
        return r.status, await r.json(), r.headers


async def get_job(
    http: aiohttp.ClientSession, url: str, job_id: str, auth: dict[str, str] = AUTH_A
) -> tuple[int, dict[str, Any], Any]:
    async with http.get(f"{url}/v1/jobs/{job_id}", headers=auth) as r:
        return r.status, await r.json(), r.headers


async def wait_status(
    http: aiohttp.ClientSession, url: str, job_id: str, *statuses: str
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        status, job, _ = await get_job(http, url, job_id)
        assert status == 200, job
        return job if job["status"] in statuses else None

    return await eventually(reached, what=f"job {job_id} to be {'/'.join(statuses)}")


async def wait_webhook(
    http: aiohttp.ClientSession, url: str, job_id: str, *statuses: str
) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        _, job, _ = await get_job(http, url, job_id)
        return job if job["webhook"]["status"] in statuses else None

    return await eventually(reached, what=f"webhook of {job_id} to be {'/'.join(statuses)}")


# ------------------------------------------------------------------ submit and poll


async def test_submitted_job_completes_with_the_same_content_as_a_sync_call(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    body = chat("mock-latency-300", "Tell me about rivers")
    status, job, headers = await submit(
        http, stack.url, {"request": body, "metadata": {"batch": "b-1"}}
    )
    assert status == 202, job
    assert headers["Location"] == f"/v1/jobs/{job['id']}"
    assert int(headers["Retry-After"]) >= 1
    assert job["object"] == "job" and job["status"] == "queued"
    assert job["metadata"] == {"batch": "b-1"} and job["model"] == "mock-latency-300"
    assert len(bytes.fromhex(job["id"])) >= 16  # at least 128 random bits

    # A job on a provider without workers stays queued: polling it says when to ask again.
    _, waiting, _ = await submit(http, stack.url, {"request": chat("parked-poll")})
    status, queued, poll_headers = await get_job(http, stack.url, waiting["id"])
    assert status == 200 and queued["status"] == "queued"
    assert int(poll_headers["Retry-After"]) >= 1
    async with http.post(f"{stack.url}/v1/jobs/{waiting['id']}/cancel", headers=AUTH_A) as r:
        assert r.status == 200
    done = await wait_status(http, stack.url, job["id"], "completed")
    _, _, final_headers = await get_job(http, stack.url, job["id"])
    assert "Retry-After" not in final_headers
    async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers=AUTH_A) as r:
        sync = await r.json()
    result = done["result"]
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"] == sync["choices"][0]["message"]
    assert result["usage"] == sync["usage"]
    assert done["attempts"] == 1 and done["error"] is None and done["webhook"] is None
    assert done["created_at"] <= done["started_at"] <= done["completed_at"]


async def test_a_streaming_request_submitted_async_stores_the_whole_completion(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    body = chat("mock-chunks-12", "stream me", stream=True)
    _, job, _ = await submit(http, stack.url, {"request": body})
    done = await wait_status(http, stack.url, job["id"], "completed")
    async with http.post(
        f"{stack.url}/v1/chat/completions", json={**body, "stream": False}, headers=AUTH_A
    ) as r:
        sync = await r.json()
    assert done["result"]["object"] == "chat.completion"
    assert (
        done["result"]["choices"][0]["message"]["content"]
        == (sync["choices"][0]["message"]["content"])
    )


async def test_prefer_respond_async_through_the_openai_sdk_returns_202_and_a_job(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "later, please"}],
            extra_headers={"Prefer": "respond-async"},
        )
        plain = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "later, please"}]
        )
    finally:
        await client.close()
    assert raw.status_code == 202
    assert raw.headers["Preference-Applied"] == "respond-async"
    job = orjson.loads(raw.content)
    assert job["object"] == "job" and raw.headers["Location"] == f"/v1/jobs/{job['id']}"
    done = await wait_status(http, stack.url, job["id"], "completed")
    assert done["result"]["choices"][0]["message"]["content"] == plain.choices[0].message.content


async def test_a_job_survives_the_death_of_the_ingress_that_took_it(
    stack: Stack, http: aiohttp.ClientSession, procs: Procs
) -> None:
    other, other_url = procs.ingress(stack.config)
    _, job, _ = await submit(http, other_url, {"request": chat("mock-latency-500")})
    other.send_signal(signal.SIGKILL)
    done = await wait_status(http, stack.url, job["id"], "completed")
    assert done["result"]["object"] == "chat.completion"


# ------------------------------------------------------------------ cancellation


async def test_a_job_cancelled_while_queued_never_reaches_the_upstream(
    stack: Stack, http: aiohttp.ClientSession, procs: Procs, rclient: aioredis.Redis
) -> None:
    _, job, _ = await submit(http, stack.url, {"request": chat("parked-1")})
    async with http.post(f"{stack.url}/v1/jobs/{job['id']}/cancel", headers=AUTH_A) as r:
        assert r.status == 200
        cancelled = await r.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["error"]["error"]["code"] == "job_cancelled"
    async with http.post(f"{stack.url}/v1/jobs/{job['id']}/cancel", headers=AUTH_A) as r:
        assert r.status == 200 and (await r.json())["status"] == "cancelled"  # idempotent

    procs.worker(stack.config, providers=["parked"])
    queue = Keys(stack.prefix).queue("parked")

    async def drained() -> bool:
        return bool(await rclient.xlen(queue) == 0)

    await eventually(drained, what="the cancelled entry to be acknowledged")
    assert (await mock_stats(http, stack.parked_mock_url))["calls"] == 0
    assert (await get_job(http, stack.url, job["id"]))[1]["status"] == "cancelled"


async def test_cancelling_a_running_stream_closes_the_upstream_connection(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    before = await mock_stats(http, stack.mock_url)
    body = chat("mock-chunks-100-delay-100", "a long story", stream=True)
    _, job, _ = await submit(http, stack.url, {"request": body})
    await wait_in_flight(http, stack.mock_url, 1)
    started = time.monotonic()
    async with http.post(f"{stack.url}/v1/jobs/{job['id']}/cancel", headers=AUTH_A) as r:
        assert (await r.json())["status"] == "cancelled"

    async def closed() -> bool:
        stats = await mock_stats(http, stack.mock_url)
        return bool(stats["disconnects"] > before["disconnects"] and stats["in_flight"] == 0)

    await eventually(closed, timeout=5, what="the mock to see the connection closed")
    assert time.monotonic() - started < 2
    job_after = (await get_job(http, stack.url, job["id"]))[1]
    assert job_after["status"] == "cancelled" and job_after["result"] is None


async def test_cancelling_a_finished_job_leaves_it_as_it_is(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    _, job, _ = await submit(http, stack.url, {"request": chat()})
    await wait_status(http, stack.url, job["id"], "completed")
    async with http.post(f"{stack.url}/v1/jobs/{job['id']}/cancel", headers=AUTH_A) as r:
        assert r.status == 200
        after = await r.json()
    assert after["status"] == "completed" and after["result"] is not None


# ------------------------------------------------------------------ idempotency


async def test_an_idempotency_key_repeat_is_the_same_job_with_one_upstream_call(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    key = {"Idempotency-Key": secrets.token_hex(8)}
    body = {"request": chat("mock", "count me once " + secrets.token_hex(4))}
    before = (await mock_stats(http, stack.mock_url))["calls"]
    status1, first, _ = await submit(http, stack.url, body, key)
    done = await wait_status(http, stack.url, first["id"], "completed")
    status2, second, headers2 = await submit(http, stack.url, body, key)
    assert (status1, status2) == (202, 202)
    assert second["id"] == first["id"] and headers2["Idempotent-Replayed"] == "true"
    assert second["result"] == done["result"]
    assert (await mock_stats(http, stack.mock_url))["calls"] == before + 1

    status3, err, _ = await submit(http, stack.url, {"request": chat("mock", "other")}, key)
    assert status3 == 422 and err["error"]["code"] == "idempotency_key_reused"
    assert err["error"]["param"] == "Idempotency-Key"

    # The same key through Prefer: respond-async on the chat endpoint, and for
    # another tenant, names other jobs: keys are per tenant and per endpoint.
    status4, other_tenant, _ = await submit(http, stack.url, body, key, auth=AUTH_B)
    assert status4 == 202 and other_tenant["id"] != first["id"]


async def test_prefer_async_honours_an_idempotency_key(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    headers = {**AUTH_A, "Prefer": "respond-async", "Idempotency-Key": secrets.token_hex(8)}
    ids = []
    for _ in range(2):
        async with http.post(f"{stack.url}/v1/chat/completions", json=chat(), headers=headers) as r:
            assert r.status == 202
            ids.append((await r.json())["id"])
    assert ids[0] == ids[1]


# ------------------------------------------------------------------ tenancy and listing


async def test_another_tenant_gets_404_on_get_cancel_and_list(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    _, job, _ = await submit(http, stack.url, {"request": chat()})
    status, err, _ = await get_job(http, stack.url, job["id"], auth=AUTH_B)
    assert status == 404 and err["error"]["code"] == "job_not_found"
    async with http.post(f"{stack.url}/v1/jobs/{job['id']}/cancel", headers=AUTH_B) as r:
        assert r.status == 404
    async with http.get(f"{stack.url}/v1/jobs?limit=100", headers=AUTH_B) as r:
        listed = await r.json()
    assert job["id"] not in [j["id"] for j in listed["data"]]
    async with http.get(f"{stack.url}/v1/jobs?after={job['id']}", headers=AUTH_B) as r:
        assert r.status == 400
    assert (await wait_status(http, stack.url, job["id"], "completed"))["status"] == "completed"


async def test_listing_is_newest_first_with_cursor_pagination_and_a_status_filter(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    ids = []
    for i in range(5):
        _, job, _ = await submit(http, stack.url, {"request": chat("mock", f"n{i}")}, auth=AUTH_B)
        ids.append(job["id"])
    _, parked, _ = await submit(http, stack.url, {"request": chat("parked-2")}, auth=AUTH_B)
    for job_id in ids:
        await wait_status_for(http, stack.url, job_id, AUTH_B, "completed")

    async def page(query: str) -> dict[str, Any]:
        async with http.get(f"{stack.url}/v1/jobs?{query}", headers=AUTH_B) as r:
            assert r.status == 200
            result: dict[str, Any] = await r.json()
            return result

    first = await page("limit=2")
    assert [j["id"] for j in first["data"]] == [parked["id"], ids[4]]
    assert first["has_more"] and first["last_id"] == ids[4] and first["object"] == "list"
    second = await page(f"limit=2&after={first['last_id']}")
    assert [j["id"] for j in second["data"]] == [ids[3], ids[2]]
    queued = await page("status=queued&limit=100")
    assert parked["id"] in [j["id"] for j in queued["data"]]
    assert all(j["status"] == "queued" for j in queued["data"])
    completed = await page("status=completed&limit=3")
    assert [j["id"] for j in completed["data"]] == [ids[4], ids[3], ids[2]]
    async with http.post(f"{stack.url}/v1/jobs/{parked['id']}/cancel", headers=AUTH_B) as r:
        assert r.status == 200


async def wait_status_for(
    http: aiohttp.ClientSession, url: str, job_id: str, auth: dict[str, str], status: str
) -> None:
    async def reached() -> bool:
        _, job, _ = await get_job(http, url, job_id, auth)
        return bool(job["status"] == status)

    await eventually(reached, what=f"job {job_id} to be {status}")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"{not json", None),
        (b"[]", None),
        (b'{"webhook_url": "https://example.com/h"}', None),
        (b'{"request": {"model": "mock"}}', "messages"),
        (
            b'{"request": {"model": "nope", "messages": [{"role": "user", "content": "x"}]}}',
            "model",
        ),
        (b'{"request": {"model": "mock", "messages": []}, "surprise": 1}', None),
        (
            b'{"request": {"model": "mock", "messages": [{"role":"user","content":"x"}]},'
            b' "metadata": {"a": 1}}',
            None,
        ),
        (
            b'{"request": {"model": "mock", "messages": [{"role":"user","content":"x"}]},'
            b' "metadata": {' + b",".join(b'"k%d": "v"' % i for i in range(17)) + b"}}",
            "metadata",
        ),
        (
            b'{"request": {"model": "mock", "messages": [{"role":"user","content":"x"}]},'
            b' "webhook_url": "ftp://127.0.0.1/x"}',
            "webhook_url",
        ),
    ],
)
async def test_a_bad_job_submission_gets_a_clear_4xx_and_queues_nothing(
    stack: Stack,
    http: aiohttp.ClientSession,
    rclient: aioredis.Redis,
    body: bytes,
    param: str | None,
) -> None:
    queue = Keys(stack.prefix).queue("mock")
    depth = await rclient.xlen(queue)
    headers = {**AUTH_A, "Content-Type": "application/json"}
    async with http.post(f"{stack.url}/v1/jobs", data=body, headers=headers) as r:
        assert 400 <= r.status < 500
        err = await r.json()
    assert err["error"]["message"] and err["error"]["type"]
    if param is not None:
        assert err["error"]["param"] == param
    assert await rclient.xlen(queue) == depth


@pytest.mark.parametrize(
    ("query", "param"),
    [("status=done", "status"), ("limit=0", "limit"), ("limit=x", "limit"), ("limit=101", "limit")],
)
async def test_bad_list_parameters_get_400(
    stack: Stack, http: aiohttp.ClientSession, query: str, param: str
) -> None:
    async with http.get(f"{stack.url}/v1/jobs?{query}", headers=AUTH_A) as r:
        assert r.status == 400
        assert (await r.json())["error"]["param"] == param


async def test_unknown_jobs_and_bad_keys_get_clear_errors(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    assert (await get_job(http, stack.url, "0" * 32))[0] == 404
    async with http.post(f"{stack.url}/v1/jobs/{'0' * 32}/cancel", headers=AUTH_A) as r:
        assert r.status == 404
    async with http.get(f"{stack.url}/v1/jobs/x", headers={"Authorization": "Bearer no"}) as r:
        assert r.status == 401
    long_key = {"Idempotency-Key": "k" * 300}
    status, err, _ = await submit(http, stack.url, {"request": chat()}, long_key)
    assert status == 400 and err["error"]["param"] == "Idempotency-Key"


# ------------------------------------------------------------------ webhooks


def verify(secret: str, delivery: Delivery) -> dict[str, Any]:
    payload: dict[str, Any] = Webhook(secret).verify(delivery.body, delivery.headers)
    return payload


async def test_webhooks_are_signed_and_verify_through_a_secret_rotation(
    stack: Stack, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    old = stack.secret_a.read_text().strip()
    new = new_webhook_secret()
    hook = f"{receiver.url}/rotation"

    async def deliver_one(n: int) -> Delivery:
        _, job, _ = await submit(http, stack.url, {"request": chat(), "webhook_url": hook})
        delivery = (await receiver.deliveries("rotation", n))[n - 1]
        event = orjson.loads(delivery.body)
        assert event["type"] == "job.completed" and event["data"]["id"] == job["id"]
        assert event["data"]["result"]["object"] == "chat.completion"
        assert event["timestamp"].endswith("Z")
        assert delivery.headers["webhook-id"] == f"msg_{job['id']}"
        done = await wait_webhook(http, stack.url, job["id"], "delivered")
        assert done["webhook"]["attempts"] == 1 and done["webhook"]["last_status_code"] == 200
        return delivery

    try:
        first = await deliver_one(1)
        assert verify(old, first)["type"] == "job.completed"
        stack.secret_a.write_text(f"{new}\n{old}\n")  # rotating: both sign
        during = await deliver_one(2)
        assert len(during.headers["webhook-signature"].split(" ")) == 2
        verify(old, during)
        verify(new, during)
        stack.secret_a.write_text(new)  # the old secret is retired
        after = await deliver_one(3)
        verify(new, after)
        with pytest.raises(WebhookVerificationError):
            verify(old, after)
    finally:
        stack.secret_a.write_text(old)


async def test_a_failing_receiver_is_retried_with_the_same_webhook_id(
    stack: Stack, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.script["flaky"] = [(500, {}), (500, {})]
    hook = f"{receiver.url}/flaky"
    _, job, _ = await submit(http, stack.url, {"request": chat(), "webhook_url": hook})
    got = await receiver.deliveries("flaky", 3)
    assert len({d.headers["webhook-id"] for d in got}) == 1
    done = await wait_webhook(http, stack.url, job["id"], "delivered")
    assert done["webhook"]["attempts"] == 3
    secret = stack.secret_a.read_text().strip()
    for delivery in got:
        verify(secret, delivery)


async def test_410_disables_the_webhook_and_stops_retries(
    stack: Stack, http: aiohttp.ClientSession, receiver: Receiver, rclient: aioredis.Redis
) -> None:
    receiver.script["gone"] = [(410, {})]
    _, job, _ = await submit(
        http, stack.url, {"request": chat(), "webhook_url": f"{receiver.url}/gone"}
    )
    done = await wait_webhook(http, stack.url, job["id"], "disabled")
    assert done["webhook"]["attempts"] == 1 and done["webhook"]["last_status_code"] == 410
    # The next attempt would have been queued before the attempt was recorded.
    keys = Keys(stack.prefix)
    assert await rclient.zscore(keys.webhook_queue(), keys.webhook_attempt(job["id"], 2)) is None
    assert len(receiver.got["gone"]) == 1


async def test_retry_after_on_429_is_honoured(
    stack: Stack, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.script["busy"] = [(429, {"Retry-After": "1"})]
    _, job, _ = await submit(
        http, stack.url, {"request": chat(), "webhook_url": f"{receiver.url}/busy"}
    )
    first, second = await receiver.deliveries("busy", 2)
    assert second.at - first.at >= 1.0  # the schedule alone would wait 0.2 s
    await wait_webhook(http, stack.url, job["id"], "delivered")


async def test_a_receiver_that_keeps_failing_ends_failed_and_counted(
    stack: Stack, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.script["down"] = [(500, {})] * 3
    _, job, _ = await submit(
        http, stack.url, {"request": chat(), "webhook_url": f"{receiver.url}/down"}
    )
    done = await wait_webhook(http, stack.url, job["id"], "failed")
    assert done["webhook"]["attempts"] == 3 and done["webhook"]["last_status_code"] == 500
    async with http.get(stack.webhooks_metrics) as r:
        text = await r.text()
    assert 'llm_broker_webhook_deliveries_total{outcome="failed"}' in text


async def test_cancelled_jobs_send_a_job_cancelled_event(
    stack: Stack, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    hook = f"{receiver.url}/cancelled"
    _, job, _ = await submit(http, stack.url, {"request": chat("parked-3"), "webhook_url": hook})
    async with http.post(f"{stack.url}/v1/jobs/{job['id']}/cancel", headers=AUTH_A) as r:
        assert r.status == 200
    [delivery] = await receiver.deliveries("cancelled", 1)
    event = verify(stack.secret_a.read_text().strip(), delivery)
    assert event["type"] == "job.cancelled" and event["data"]["status"] == "cancelled"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/hook",
        "http://localhost:8080/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "file:///etc/passwd",
        "gopher://example.com/",
    ],
)
async def test_webhook_urls_to_internal_addresses_are_refused(
    stack: Stack, http: aiohttp.ClientSession, url: str
) -> None:
    status, err, _ = await submit(http, stack.closed_url, {"request": chat(), "webhook_url": url})
    assert status == 400
    assert err["error"]["param"] == "webhook_url"
    assert err["error"]["code"] == "invalid_webhook_url"


async def test_a_job_past_its_ttl_answers_404_and_leaves_no_keys(
    stack: Stack,
    http: aiohttp.ClientSession,
    procs: Procs,
    make_config: ConfigFactory,
    prefix: str,
    rclient: aioredis.Redis,
) -> None:
    config = make_config(stack.mock_url, jobs={"result_ttl_s": 1, "idempotency_ttl_s": 60})
    procs.worker(config)
    _, url = procs.ingress(config)
    headers = {"Idempotency-Key": "expiring", "X-Request-Timeout": "2"}
    async with http.post(f"{url}/v1/jobs", json={"request": chat()}, headers=headers) as r:
        assert r.status == 202
        job = await r.json()
    await wait_status(http, url, job["id"], "completed")

    async def gone() -> bool:
        async with http.get(f"{url}/v1/jobs/{job['id']}") as r:
            return r.status == 404

    await eventually(gone, what="the job to expire")
    keys = Keys(prefix)
    # What stays belongs to the processes, not to the job: the provider's queue,
    # its scheduler's state, the reply streams and the workers' heartbeats with
    # their per-minute counts; and the day's usage, which is kept for
    # accounts.usage_retention_days.
    provider = ("mock",)
    own = {
        f(*provider).encode() for f in (keys.queue, keys.scheduler, keys.capacity, keys.workers)
    } | {
        keys.reply("").encode(),
        AccountKeys(prefix).usage("").encode(),
        keys.worker("").encode(),
        f"{prefix}st:".encode(),
    }

    async def no_keys() -> list[bytes] | None:
        left = [k async for k in rclient.scan_iter(match=f"{prefix}*")]
        return None if [k for k in left if not k.startswith(tuple(own))] else left

    await eventually(no_keys, what="every key of the job to expire")
