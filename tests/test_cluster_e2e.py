"""End to end on a Redis Cluster: three primaries made with ``redis-cli --cluster
create``, two providers whose keys are on different shards, real ingress, worker
and webhooks processes, the official OpenAI SDK and a webhook receiver.

The webhook delivery queue (arq) is on a Redis of its own (``webhooks.queue_url``,
the session's Redis here), as a Cluster needs.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from llm_broker.procs import Child
from llm_broker.shared.cluster import slot_of
from llm_broker.shared.config import new_key
from llm_broker.shared.keys import Keys
from tests.conftest import (
    Procs,
    Receiver,
    RedisCluster,
    RedisServer,
    chat,
    mock_stats,
    wait_in_flight,
    write_config,
)
from tests.helpers import admin_call, eventually, loopback_webhooks

PREFIX = "ce:"
ADMIN_KEY, ADMIN_SHA = new_key()
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@dataclass
class ClusterStack:
    cluster: RedisCluster
    procs: Procs
    config: Path
    url: str
    mock_a: str
    mock_b: str
    #: Two providers whose keys (queue, scheduler, job records, replies) are on
    #: different shards.
    a: str
    b: str
    worker: Child


def _two_shards(cluster: RedisCluster) -> tuple[str, str]:
    keys = Keys(PREFIX, cluster=True)
    names = [f"prov-{i}" for i in range(40)]
    owner = {n: cluster.owner(slot_of(keys.queue(n))) for n in names}
    first = names[0]
    return first, next(n for n in names if owner[n] != owner[first])


@pytest.fixture(scope="module")
def cstack(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterStack]:
    if redis_server.proc is None:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("cluster-stack")
    cluster = RedisCluster(tmp / "cluster")
    procs = Procs(tmp)
    try:
        cluster.start(cli=True)
        a, b = _two_shards(cluster)
        _, mock_a = procs.mock()
        _, mock_b = procs.mock()
        provider = {"type": "mock", "retry": {"max_retries": 0}, "circuit": {"failures": 10**6}}
        config = write_config(
            tmp,
            f"redis://127.0.0.1:{cluster.nodes[0].port}/0",
            PREFIX,
            mock_a,
            redis={"cluster": True, "nodes": cluster.seeds},
            accounts={"usage": False},
            providers={
                a: {**provider, "base_url": f"{mock_a}/v1"},
                b: {**provider, "base_url": f"{mock_b}/v1"},
            },
            models={
                "mock*": {"provider": a},
                "b-x": {"provider": b, "model": "mock"},
                "fb-x": {
                    "deployments": [
                        {"provider": a, "model": "mock", "weight": 1},
                        {"provider": b, "model": "mock", "weight": 0},
                    ]
                },
            },
            webhooks={**loopback_webhooks(tmp), "queue_url": redis_server.url},
            # (a key read is trusted a minute: changes reach ingress by pub/sub)
            auth={
                "open": True,
                "cache_s": 60,
                "admin_keys": [{"name": "ops", "sha256": ADMIN_SHA}],
            },
        )
        worker = procs.worker(config)
        procs.webhooks(config)
        _, url = procs.ingress(config)
        yield ClusterStack(cluster, procs, config, url, mock_a, mock_b, a, b, worker)
    finally:
        procs.stop_all()
        cluster.stop()


@pytest.fixture
async def sdk(cstack: ClusterStack) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{cstack.url}/v1", api_key="none", max_retries=0)
    yield client
    await client.close()


async def test_synchronous_calls_on_two_shards(
    cstack: ClusterStack, sdk: openai.AsyncOpenAI
) -> None:
    for model in ("mock", "b-x"):
        answer = await sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello there"}]
        )
        assert answer.choices[0].message.content
        assert answer.usage is not None and answer.usage.total_tokens > 0


async def test_a_stream_with_its_usage_chunk(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="b-x",
        messages=[{"role": "user", "content": "Tell me a story"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    assert text and usage is not None and usage.completion_tokens > 0


async def _submit(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/v1/jobs", json=body) as resp:
        return resp.status, await resp.json()


async def _job(http: aiohttp.ClientSession, url: str, job_id: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1/jobs/{job_id}") as resp:
        assert resp.status == 200
        job: dict[str, Any] = await resp.json()
        return job


async def test_an_async_job_completes_and_its_webhook_arrives(
    cstack: ClusterStack, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    body = {"request": chat("b-x", "Tell me about rivers"), "webhook_url": f"{receiver.url}/c"}
    status, job = await _submit(http, cstack.url, body)
    assert status == 202, job

    async def completed() -> dict[str, Any] | None:
        found = await _job(http, cstack.url, job["id"])
        return found if found["status"] == "completed" else None

    done = await eventually(completed, what="the async job")
    assert done["result"]["choices"][0]["message"]["content"]
    (delivery,) = await receiver.deliveries("c", 1)
    assert b'"completed"' in delivery.body and job["id"].encode() in delivery.body
    assert delivery.headers["webhook-signature"].startswith("v1,")


async def test_a_running_job_is_cancelled(
    cstack: ClusterStack, http: aiohttp.ClientSession
) -> None:
    status, job = await _submit(http, cstack.url, {"request": chat("mock-latency-5000")})
    assert status == 202, job
    await wait_in_flight(http, cstack.mock_a)
    async with http.post(f"{cstack.url}/v1/jobs/{job['id']}/cancel") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "cancelled"
    await wait_in_flight(http, cstack.mock_a, 0)  # the upstream call was aborted
    assert (await _job(http, cstack.url, job["id"]))["status"] == "cancelled"


async def test_a_fallback_goes_to_a_provider_on_another_shard(
    cstack: ClusterStack, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{cstack.mock_a}/mock/fail", json={"status": 500, "times": 1}) as r:
        assert r.status == 200
    before_b = int((await mock_stats(http, cstack.mock_b))["calls"])
    async with http.post(f"{cstack.url}/v1/chat/completions", json=chat("fb-x")) as resp:
        assert resp.status == 200, await resp.text()
        job_id = resp.headers["X-Request-Id"]
    assert int((await mock_stats(http, cstack.mock_b))["calls"]) == before_b + 1
    job = await _job(http, cstack.url, job_id)
    assert [h["deployment"] for h in job["history"]] == [f"{cstack.a}/mock", f"{cstack.b}/mock"]


async def test_a_resharded_providers_slot_is_followed(
    cstack: ClusterStack, sdk: openai.AsyncOpenAI
) -> None:
    """A provider's slot moves to another node while idle (as ``redis-cli --cluster
    reshard`` moves a slot): the processes follow it without a restart."""
    cluster = cstack.cluster
    slot = slot_of(Keys(PREFIX, cluster=True).queue(cstack.a))
    await asyncio.to_thread(cluster.move_slot, slot, (cluster.owner(slot) + 1) % 3)
    for _ in range(3):
        answer = await sdk.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "after the move"}]
        )
        assert answer.choices[0].message.content


@pytest.mark.chaos
async def test_a_killed_workers_job_is_run_by_another(
    cstack: ClusterStack, http: aiohttp.ClientSession
) -> None:
    status, job = await _submit(http, cstack.url, {"request": chat("mock-latency-1500")})
    assert status == 202, job
    await wait_in_flight(http, cstack.mock_a)
    cstack.worker.proc.send_signal(signal.SIGKILL)
    cstack.procs.worker(cstack.config)  # reclaims the entry once its lease lapses

    async def completed() -> bool:
        return bool((await _job(http, cstack.url, job["id"]))["status"] == "completed")

    await eventually(completed, timeout=30, what="the job to complete on the new worker")
    assert (await _job(http, cstack.url, job["id"]))["attempts"] == 2


async def test_an_idempotency_key_and_the_listing_span_the_shards(
    cstack: ClusterStack, http: aiohttp.ClientSession
) -> None:
    """A retried submission with the same Idempotency-Key gets the first job back;
    the same key with another request is refused; GET /v1/jobs lists the jobs of
    both providers (on two shards), newest first, page by page."""
    headers = {"Idempotency-Key": "order-7"}
    body = {"request": chat("b-x", "once only")}
    async with http.post(f"{cstack.url}/v1/jobs", json=body, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
        first = await resp.json()
    async with http.post(f"{cstack.url}/v1/jobs", json=body, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
        assert resp.headers["Idempotent-Replayed"] == "true"
        assert (await resp.json())["id"] == first["id"]
    other = {"request": chat("mock", "something else")}
    async with http.post(f"{cstack.url}/v1/jobs", json=other, headers=headers) as resp:
        assert resp.status == 422
        assert (await resp.json())["error"]["code"] == "idempotency_key_reused"
    # A key another request has just claimed (its job not admitted yet): retry shortly.
    node = cstack.cluster.nodes[0]
    client = RedisClusterClient(host="127.0.0.1", port=node.port)
    try:
        name = Keys(PREFIX, cluster=True).idempotency("default", "order-8")
        await client.set(name, f"h {Keys(PREFIX, cluster=True).job_id(cstack.a, 'f' * 32)} 9e9")
        async with http.post(
            f"{cstack.url}/v1/jobs", json=body, headers={"Idempotency-Key": "order-8"}
        ) as resp:
            assert resp.status == 409
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["code"] == "idempotency_key_in_use"
    finally:
        await client.aclose()

    ids = []
    for model in ("mock", "b-x", "mock", "b-x"):
        status, job = await _submit(http, cstack.url, {"request": chat(model)})
        assert status == 202, job
        ids.append(job["id"])
    listed: list[dict[str, Any]] = []
    after = ""
    for _ in range(20):
        async with http.get(f"{cstack.url}/v1/jobs?limit=3{after}") as resp:
            assert resp.status == 200, await resp.text()
            page = await resp.json()
        listed += page["data"]
        if not page["has_more"]:
            break
        after = f"&after={page['last_id']}"
    # (the module's earlier async jobs come after these, older)
    assert [j["id"] for j in listed[:4]] == ids[::-1]
    assert first["id"] in [j["id"] for j in listed]
    assert len({j["id"] for j in listed}) == len(listed)
    created = [j["created_at"] for j in listed]
    assert created == sorted(created, reverse=True)


async def _admin(
    http: aiohttp.ClientSession, method: str, url: str, body: object, status: int
) -> Any:
    return await admin_call(http, ADMIN, method, url, body, status)


async def test_keys_and_tenants_of_the_admin_api_serve_on_a_cluster(
    cstack: ClusterStack, http: aiohttp.ClientSession
) -> None:
    """A tenant and a key made with the admin API (their records on several
    slots, written without a transaction): the key calls with the OpenAI SDK as
    its tenant, a change to it reaches ingress (pub/sub on a node), and its
    revocation ends it."""
    url = cstack.url
    await _admin(http, "POST", f"{url}/admin/v1/tenants", {"name": "acme"}, 201)
    made = await _admin(http, "POST", f"{url}/admin/v1/keys", {"tenant": "acme", "name": "ci"}, 201)
    key = {"Authorization": f"Bearer {made['key']}"}
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=made["key"], max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model="b-x", messages=[{"role": "user", "content": "as acme"}]
        )
        assert answer.choices[0].message.content
    finally:
        await client.close()
    # Its async jobs are acme's: listed for the key, not for the default tenant.
    async with http.post(f"{url}/v1/jobs", json={"request": chat("mock")}, headers=key) as resp:
        assert resp.status == 202, await resp.text()
        job_id = (await resp.json())["id"]
    async with http.get(f"{url}/v1/jobs", headers=key) as resp:
        assert [j["id"] for j in (await resp.json())["data"]] == [job_id]
    async with http.get(f"{url}/v1/jobs?limit=100") as resp:
        assert job_id not in [j["id"] for j in (await resp.json())["data"]]

    # A change (a compare-and-set of the record) reaches ingress: b-x is not allowed now.
    patch = {"models": ["mock*"]}
    await _admin(http, "PATCH", f"{url}/admin/v1/keys/{made['id']}", patch, 200)

    async def not_allowed() -> bool:
        async with http.post(f"{url}/v1/chat/completions", json=chat("b-x"), headers=key) as r:
            return r.status == 403 and (await r.json())["error"]["code"] == "model_not_allowed"

    await eventually(not_allowed, 5, what="the key's new model list")
    await _admin(http, "POST", f"{url}/admin/v1/keys/{made['id']}/revoke", None, 200)

    async def revoked() -> bool:
        # (this gateway is open: a key that is not valid calls as the default tenant,
        # which b-x is allowed to)
        async with http.post(f"{url}/v1/chat/completions", json=chat("b-x"), headers=key) as r:
            return r.status == 200

    await eventually(revoked, 5, what="the revocation")
    listed = await _admin(http, "GET", f"{url}/admin/v1/keys?tenant=acme", None, 200)
    assert [k["status"] for k in listed["data"]] == ["revoked"]

    # Limits and budgets kept in Redis are not enforced on a Cluster yet: refused.
    budget = {"tenant": "acme", "budget": {"usd": 1, "period": "daily"}}
    capped = await _admin(http, "POST", f"{url}/admin/v1/keys", budget, 201)
    capped_key = {"Authorization": f"Bearer {capped['key']}"}
    async with http.post(f"{url}/v1/chat/completions", json=chat("mock"), headers=capped_key) as r:
        assert r.status == 501
        assert (await r.json())["error"]["code"] == "not_on_cluster"

    # The budgets are exported all the same (read from records on several slots).
    series = f'llm_broker_budget_usd{{name="{capped["id"]}",period="daily",scope="key"}} 1.0'

    async def exported() -> bool:
        async with http.get(f"{url}/metrics") as r:
            return series in await r.text()

    await eventually(exported, 10, what="the key's budget on /metrics")


async def test_what_a_cluster_does_not_do_yet_is_refused_clearly(
    cstack: ClusterStack, http: aiohttp.ClientSession
) -> None:
    for method, path in (("POST", "/v1/batches"), ("GET", "/v1/files"), ("GET", "/v1/batches/b")):
        async with http.request(method, f"{cstack.url}{path}", json={}) as resp:
            assert resp.status == 501, path
            assert (await resp.json())["error"]["code"] == "not_on_cluster"
