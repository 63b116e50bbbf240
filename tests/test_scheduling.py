"""Fair scheduling on a provider's queue, with real processes: priority classes,
weighted fair share across tenants, minimum shares, tenant quotas, and the
durability promises under a flood."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
import uuid
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from llm_broker.dev import free_port
from llm_broker.shared.config import new_key
from llm_broker.shared.keys import Keys
from tests.conftest import ConfigFactory, Procs, chat, mock_stats
from tests.helpers import eventually
from tests.test_observability import scrape, value

KEYS = {name: new_key() for name in ("a", "b")}
AUTH = {name: {"Authorization": f"Bearer {key}"} for name, (key, _) in KEYS.items()}


def tenants(**settings: dict[str, Any]) -> dict[str, Any]:
    """Config sections: one API key per tenant a and b, and their settings."""
    return {
        "auth": {"keys": [{"tenant": t, "sha256": h} for t, (_, h) in KEYS.items()]},
        "tenants": settings,
    }


async def submit_many(
    http: aiohttp.ClientSession,
    url: str,
    tenant: str,
    count: int,
    model: str,
    priority: str | None = None,
) -> list[str]:
    """``count`` async jobs of ``tenant``, 32 requests at a time; their ids. As the
    gateway tells a client to, a submission answered ``overloaded`` (a slow moment
    of Redis or of the box) is sent again after its Retry-After with the same
    Idempotency-Key, so that it is admitted once whatever the first try did."""
    body: dict[str, Any] = {"request": chat(model)}
    if priority is not None:
        body["priority"] = priority

    async def one() -> str:
        headers = {**AUTH[tenant], "Idempotency-Key": uuid.uuid4().hex}
        for _ in range(5):
            async with http.post(f"{url}/v1/jobs", json=body, headers=headers) as resp:
                job = await resp.json()
                if resp.status != 503:
                    assert resp.status == 202, job
                    return str(job["id"])
                assert job["error"]["code"] == "overloaded", job
                retry_after = float(resp.headers["Retry-After"])
            await asyncio.sleep(retry_after)
        raise AssertionError(f"a submission was shed five times in a row: {job}")

    ids: list[str] = []
    for start in range(0, count, 32):
        ids += await asyncio.gather(*(one() for _ in range(min(32, count - start))))
    return ids


async def sync_call(http: aiohttp.ClientSession, url: str, tenant: str, model: str) -> float:
    """One synchronous call of ``tenant``; its end-to-end seconds."""
    started = time.perf_counter()
    async with http.post(
        f"{url}/v1/chat/completions", json=chat(model), headers=AUTH[tenant]
    ) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
    return time.perf_counter() - started


async def completed_at(rclient: aioredis.Redis, prefix: str, ids: list[str]) -> dict[str, float]:
    """When each of ``ids`` completed (the completed ones only)."""
    keys = Keys(prefix)
    async with rclient.pipeline(transaction=False) as pipe:
        for i in ids:
            pipe.hmget(keys.job(i), ["status", "completed_at"])
        found = await pipe.execute()
    return {
        i: float(at) for i, (status, at) in zip(ids, found, strict=True) if status == b"completed"
    }


@pytest.mark.parametrize(
    "kill",
    [
        pytest.param(False, id="flood", marks=pytest.mark.scale),
        pytest.param(True, id="worker-killed-during-the-flood", marks=pytest.mark.chaos),
    ],
)
async def test_a_flood_of_async_jobs_does_not_hold_up_another_tenants_calls(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    rclient: aioredis.Redis,
    prefix: str,
    kill: bool,
) -> None:
    """Provider capacity 8 (two workers of 4), mock latency 200 ms. Tenant a
    submits 2,000 async jobs; then tenant b makes 50 synchronous calls one after
    another: b's median stays under 3x the mock latency. With ``kill``, one
    worker is SIGKILLed halfway through b's calls and started again, four more
    join, and every job of a's then completes once."""
    _, mock_url = procs.mock()
    config = make_config(
        mock_url,
        providers={"mock": {"max_concurrency": 4}},
        worker={"lease_s": 2.0, "max_deliveries": 10},
        **tenants(),
    )
    metrics_port = free_port()
    workers = [procs.worker(config, "--metrics-port", str(metrics_port)), procs.worker(config)]
    _, url = procs.ingress(config)
    flood = await submit_many(http, url, "a", 2000, "mock-latency-200")

    async def backlog_exported() -> bool:
        samples, _ = await scrape(http, f"http://127.0.0.1:{metrics_port}/metrics")
        waiting = value(samples, "llm_broker_queue_waiting", provider="mock", priority="async")
        oldest = value(
            samples, "llm_broker_queue_oldest_age_seconds", provider="mock", priority="async"
        )
        depth = value(samples, "llm_broker_queue_depth", provider="mock")
        # The oldest job waited since the flood began, a minute ago at most.
        return waiting > 1000 and 0 < oldest < 60 and depth >= waiting

    # Autoscaling sees the whole backlog, not only what workers hold.
    await eventually(backlog_exported, timeout=15, what="the backlog in the worker's gauges")
    latencies = []
    for n in range(50):
        if kill and n == 25:
            workers[1].send_signal(signal.SIGKILL)
            await asyncio.to_thread(workers[1].proc.wait, 5)
            workers[1] = await asyncio.to_thread(procs.worker, config)
        latencies.append(await sync_call(http, url, "b", "mock-latency-200"))
    median = statistics.median(latencies)
    print(f"noisy neighbour: b's median {median * 1000:.0f} ms")
    # The flood was still waiting when b's last call ended.
    still = await rclient.zcard(Keys(prefix).waiting_index("mock", "async"))
    assert still > 100, still
    assert median < 0.6, f"b's median {median * 1000:.0f} ms behind a's backlog"
    if not kill:
        return
    # Scale out, as an autoscaler would on this backlog: new workers' slots take
    # waiting jobs at once.
    for _ in range(4):
        workers.append(await asyncio.to_thread(procs.worker, config))

    async def flood_done() -> bool:
        return len(await completed_at(rclient, prefix, flood)) == len(flood)

    await eventually(flood_done, timeout=120, what="every job of the flood to complete")
    stats = await mock_stats(http, mock_url)
    # Only what the killed worker held (4 slots) may have run upstream twice.
    assert len(flood) + 50 <= stats["calls"] <= len(flood) + 50 + 4, stats


async def test_backlogged_tenants_share_capacity_by_weight(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    rclient: aioredis.Redis,
    prefix: str,
) -> None:
    """a (weight 3) and b (weight 1) each have 500 jobs queued: of the first 400
    to complete, 75 % ± 7 % are a's."""
    _, mock_url = procs.mock()
    config = make_config(
        mock_url,
        providers={"mock": {"max_concurrency": 8}},
        **tenants(a={"weight": 3}, b={"weight": 1}),
    )
    _, url = procs.ingress(config)
    # No worker yet: every job waits.
    jobs = {
        t: await submit_many(http, url, t, 500, "mock-latency-20", priority="batch")
        for t in ("a", "b")
    }
    procs.worker(config)
    every = jobs["a"] + jobs["b"]

    async def four_hundred() -> dict[str, float] | None:
        done = await completed_at(rclient, prefix, every)
        return done if len(done) >= 400 else None

    done = await eventually(four_hundred, timeout=60, what="400 completions")
    first = sorted(done, key=done.__getitem__)[:400]
    share = len(set(first) & set(jobs["a"])) / 400
    print(f"weights 3:1: a's share of the first 400 {share:.1%}")
    assert 0.68 <= share <= 0.82, share


async def test_a_lower_class_keeps_its_minimum_share_under_saturation(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    rclient: aioredis.Redis,
    prefix: str,
) -> None:
    """Interactive calls keep the provider saturated while batch jobs wait: batch
    still gets its minimum share (20 %) of the dispatches."""
    _, mock_url = procs.mock()
    config = make_config(
        mock_url,
        providers={"mock": {"max_concurrency": 4}},
        scheduling={"min_share": {"async": 0.1, "batch": 0.2}},
        **tenants(),
    )
    _, url = procs.ingress(config)
    batch = await submit_many(http, url, "a", 30, "mock-latency-50", priority="batch")
    stop = asyncio.Event()
    interactive: list[float] = []  # when each interactive call ended

    async def client() -> None:
        while not stop.is_set():
            await sync_call(http, url, "b", "mock-latency-50")
            interactive.append(time.time())

    # Twelve clients on four slots: interactive work always waits.
    clients = [asyncio.create_task(client()) for _ in range(12)]
    try:
        procs.worker(config)

        async def batch_done() -> dict[str, float] | None:
            done = await completed_at(rclient, prefix, batch)
            return done if len(done) == len(batch) else None

        done = await eventually(batch_done, timeout=60, what="the batch jobs to complete")
    finally:
        stop.set()
        await asyncio.gather(*clients)
    last = max(done.values())
    before = sum(1 for t in interactive if t <= last)
    # Interactive calls went on the whole time: the batch was never alone.
    assert any(t > last for t in interactive)
    share = len(batch) / (len(batch) + before)
    print(f"minimum share 20 %: batch got {share:.1%}")
    assert share >= 0.16, f"batch got {share:.0%} of the dispatches"


async def test_tenant_quotas_refuse_only_that_tenant(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    prefix: str,
) -> None:
    """a's queued-jobs quota (5) and its requests per minute (7) answer 429 with
    the quota's code and Retry-After, to a only; b goes on."""
    _, mock_url = procs.mock()
    config = make_config(
        mock_url,
        **tenants(a={"quotas": {"max_queued": 5, "rpm": 7}}),
    )
    _, url = procs.ingress(config)  # no worker: jobs wait
    queued = await submit_many(http, url, "a", 5, "mock")

    async def post(tenant: str) -> tuple[int, dict[str, Any], str | None]:
        async with http.post(
            f"{url}/v1/jobs", json={"request": chat("mock")}, headers=AUTH[tenant]
        ) as resp:
            return resp.status, await resp.json(), resp.headers.get("Retry-After")

    async def cancel(job_id: str) -> None:
        async with http.post(f"{url}/v1/jobs/{job_id}/cancel", headers=AUTH["a"]) as resp:
            assert resp.status == 200

    status, body, retry_after = await post("a")
    assert (status, body["error"]["code"], body["error"]["type"]) == (
        429,
        "tenant_queue_full",
        "rate_limit_error",
    )
    assert retry_after is not None and int(retry_after) >= 1
    status, body, _ = await post("b")
    assert status == 202, body
    # A waiting job cancelled stops counting at once: a may queue one more, twice.
    for job_id in queued[:2]:
        await cancel(job_id)
        status, body, _ = await post("a")
        assert status == 202, body
    # Seven requests admitted this minute (a refusal does not count): no eighth.
    await cancel(queued[2])
    status, body, retry_after = await post("a")
    assert (status, body["error"]["code"]) == (429, "tenant_rate_limited"), body
    assert retry_after is not None and 1 <= int(retry_after) <= 60
    # A synchronous call of a's is refused the same way; b's goes on.
    async with http.post(
        f"{url}/v1/chat/completions", json=chat("mock"), headers=AUTH["a"]
    ) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "tenant_rate_limited"
    status, body, _ = await post("b")
    assert status == 202, body


@pytest.mark.scale
async def test_the_in_flight_quota_holds_across_three_workers(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    rclient: aioredis.Redis,
    prefix: str,
) -> None:
    """a may have 3 jobs in flight; three workers with 4 slots each never run
    more of a's at once, and b's jobs use the other slots."""
    _, mock_url = procs.mock()
    config = make_config(
        mock_url,
        providers={"mock": {"max_concurrency": 4}},
        **tenants(a={"quotas": {"max_in_flight": 3}}),
    )
    for _ in range(3):
        procs.worker(config)
    _, url = procs.ingress(config)
    mine = await submit_many(http, url, "a", 30, "mock-latency-200")

    async def all_done() -> bool:
        return len(await completed_at(rclient, prefix, mine)) == len(mine)

    await eventually(all_done, timeout=60, what="a's jobs to complete")
    stats = await mock_stats(http, mock_url)
    assert stats["peak_in_flight"] == 3, stats
    assert stats["calls"] == 30


async def test_priority_is_lowered_to_the_tenants_ceiling_and_checked(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, **tenants(a={"max_priority": "async"}))
    procs.worker(config)
    _, url = procs.ingress(config)
    body = {"request": chat("mock"), "priority": "interactive"}
    async with http.post(f"{url}/v1/jobs", json=body, headers=AUTH["a"]) as resp:
        job = await resp.json()
        assert resp.status == 202 and job["priority"] == "async", job
    async with http.post(
        f"{url}/v1/jobs",
        json={"request": chat("mock")},
        headers={**AUTH["b"], "X-Priority": "batch"},
    ) as resp:
        job = await resp.json()
        assert resp.status == 202 and job["priority"] == "batch", job
    for headers, sent, param in (
        ({"X-Priority": "urgent"}, {"request": chat("mock")}, "X-Priority"),
        ({}, {"request": chat("mock"), "priority": "urgent"}, "priority"),
    ):
        async with http.post(f"{url}/v1/jobs", json=sent, headers={**AUTH["b"], **headers}) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 400 and error["param"] == param, error
    # A synchronous call of a's runs at its ceiling, and answers as usual.
    assert await sync_call(http, url, "a", "mock") < 10


async def test_a_tenants_tpm_counts_the_tokens_calls_used(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
) -> None:
    """Each call is admitted on its estimate (about 270 tokens here: no max_tokens),
    then counts what it used (a few dozen): ten calls in a row fit in 600 tokens a
    minute, where the estimates alone would refuse the third."""
    _, mock_url = procs.mock()
    config = make_config(mock_url, **tenants(a={"quotas": {"tpm": 600}}))
    procs.worker(config)
    _, url = procs.ingress(config)
    for _ in range(10):
        await sync_call(http, url, "a", "mock")
