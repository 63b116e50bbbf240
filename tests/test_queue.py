"""Queue semantics against a real Redis server and real worker processes."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from llm_broker.shared.keys import GROUP, Keys
from tests.conftest import ConfigFactory, Procs, mock_stats, wait_in_flight
from tests.helpers import dispatched, enqueue, eventually, job_record, job_status, make_job


async def test_each_job_reaches_exactly_one_worker_and_leaves_the_stream(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url)
    procs.worker(config)
    procs.worker(config)
    jobs = [make_job("mock-latency-20", content=f"job {i}") for i in range(40)]
    for job in jobs:
        await enqueue(rclient, prefix, job)

    async def all_done() -> bool:
        statuses = [await job_status(rclient, prefix, j.id) for j in jobs]
        return all(s == "completed" for s in statuses)

    await eventually(all_done, what="all jobs completed")
    stats = await mock_stats(http, mock_url)
    assert stats["calls"] == len(jobs)
    for job in jobs:
        record = await job_record(rclient, prefix, job.id)
        assert record["attempts"] == "1"
        result = orjson.loads(record["result"])
        assert result["object"] == "chat.completion"
        assert result["model"] == "mock-latency-20"
    consumers = await rclient.xinfo_consumers(Keys(prefix).queue("mock"), GROUP)
    assert len(consumers) == 2
    assert sum(c["pending"] for c in consumers) == 0
    assert await rclient.xlen(Keys(prefix).queue("mock")) == 0


@pytest.mark.chaos
async def test_job_of_a_killed_worker_is_completed_by_another(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, worker={"lease_s": 1.0})
    doomed = procs.worker(config)
    job = make_job("mock-latency-3000")
    await enqueue(rclient, prefix, job)

    async def running() -> bool:
        stats = await mock_stats(http, mock_url)
        return await job_status(rclient, prefix, job.id) == "in_progress" and (
            stats["in_flight"] == 1
        )

    await eventually(running, what="the job running on the first worker")
    doomed.send_signal(signal.SIGKILL)
    doomed.proc.wait(5)
    procs.worker(config)

    async def completed() -> bool:
        return await job_status(rclient, prefix, job.id) == "completed"

    await eventually(completed, timeout=20, what="the job completed by the second worker")
    record = await job_record(rclient, prefix, job.id)
    assert record["attempts"] == "2"
    assert orjson.loads(record["result"])["choices"][0]["message"]["content"]
    assert await rclient.xlen(Keys(prefix).queue("mock")) == 0


async def test_long_job_is_not_stolen_while_its_worker_lives(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, worker={"lease_s": 0.5})
    procs.worker(config)
    procs.worker(config)
    job = make_job("mock-latency-2500")
    await enqueue(rclient, prefix, job)

    async def completed() -> bool:
        return await job_status(rclient, prefix, job.id) == "completed"

    await eventually(completed, what="the long job completed")
    stats = await mock_stats(http, mock_url)
    assert stats["calls"] == 1, "a live worker's job was reclaimed by another worker"
    assert (await job_record(rclient, prefix, job.id))["attempts"] == "1"


async def test_job_past_its_deadline_never_reaches_the_upstream(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url)
    expired = make_job("mock", timeout=0.2)
    await enqueue(rclient, prefix, expired)

    async def past_deadline() -> bool:
        return bool((await rclient.time())[0] > expired.deadline)

    await eventually(past_deadline, what="the deadline to pass")
    fresh = make_job("mock")
    procs.worker(config)
    await enqueue(rclient, prefix, fresh)

    async def both_settled() -> bool:
        return (
            await job_status(rclient, prefix, expired.id) == "expired"
            and await job_status(rclient, prefix, fresh.id) == "completed"
        )

    await eventually(both_settled, what="the expired job dropped and the fresh one completed")
    stats = await mock_stats(http, mock_url)
    assert stats["calls"] == 1
    assert await rclient.xlen(Keys(prefix).queue("mock")) == 0


async def test_poison_job_fails_after_max_deliveries_and_is_dead_lettered(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, worker={"lease_s": 0.3, "max_deliveries": 2})
    keys = Keys(prefix)
    queue = keys.queue("mock")
    await rclient.xgroup_create(queue, GROUP, id="0", mkstream=True)
    job = make_job("mock")
    entry = await dispatched(rclient, prefix, job)
    # Two consumers took the entry and died without acknowledging it.
    got = await rclient.xreadgroup(GROUP, "crashed-1", {queue: ">"}, count=1)
    assert got[0][1][0][0].decode() == entry
    await rclient.xclaim(queue, GROUP, "crashed-2", 0, [entry])
    procs.worker(config)

    async def failed() -> bool:
        return await job_status(rclient, prefix, job.id) == "failed"

    await eventually(failed, what="the poison job to fail")
    record = await job_record(rclient, prefix, job.id)
    error = orjson.loads(record["error"])["error"]
    assert error["code"] == "max_deliveries_exceeded"
    assert "3 times" in error["message"]
    dead = await rclient.xrange(keys.dead_letter("mock"))
    assert len(dead) == 1
    assert dead[0][1][b"entry"].decode() == entry
    assert await rclient.xlen(queue) == 0
    assert (await mock_stats(http, mock_url))["calls"] == 0


async def test_worker_pulls_only_as_many_jobs_as_it_has_slots(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, providers={"mock": {"max_concurrency": 3}})
    procs.worker(config)
    jobs = [make_job("mock-latency-300") for _ in range(12)]
    for job in jobs:
        await enqueue(rclient, prefix, job)
    queue = Keys(prefix).queue("mock")

    async def pending_now() -> int:
        info = await rclient.xpending(queue, GROUP)
        return int(info["pending"])

    peak = 0

    async def drained() -> bool:
        nonlocal peak
        peak = max(peak, await pending_now())
        return bool(await rclient.xlen(queue) == 0)

    await eventually(drained, timeout=20, what="the queue to drain")
    stats = await mock_stats(http, mock_url)
    assert stats["peak_in_flight"] == 3
    assert peak <= 3
    assert stats["calls"] == 12


async def test_reads_sent_together_never_bring_more_jobs_than_free_slots(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    """A worker's reads of a queue leave several at a time; with more entries
    already on the stream than it has slots (as when other workers' slots were
    free when they were dispatched), together they ask for its free slots only."""
    _, mock_url = procs.mock()
    jobs = [make_job("mock-latency-300") for _ in range(12)]
    for job in jobs:
        await dispatched(rclient, prefix, job)
    queue = Keys(prefix).queue("mock")
    assert await rclient.xlen(queue) == 12
    config = make_config(mock_url, providers={"mock": {"max_concurrency": 3}})
    procs.worker(config)

    async def drained() -> bool:
        return bool(await rclient.xlen(queue) == 0)

    await eventually(drained, timeout=20, what="the queue to drain")
    stats = await mock_stats(http, mock_url)
    assert stats["peak_in_flight"] == 3
    assert stats["calls"] == 12


async def test_sigterm_lets_in_flight_jobs_finish_and_exits_zero(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url)
    worker = procs.worker(config)
    job = make_job("mock-latency-1500")
    await enqueue(rclient, prefix, job)

    await wait_in_flight(http, mock_url)
    worker.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(worker.proc.wait, 15)
    assert code == 0
    assert await job_status(rclient, prefix, job.id) == "completed"


async def test_consumers_of_dead_workers_are_forgotten(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
) -> None:
    config = make_config(
        "http://127.0.0.1:9", worker={"lease_s": 0.3, "forget_consumers_after_s": 0.5}
    )
    queue = Keys(prefix).queue("mock")
    await rclient.xgroup_create(queue, GROUP, id="0", mkstream=True)
    await rclient.xgroup_createconsumer(queue, GROUP, "dead-worker")  # holds nothing
    procs.worker(config)

    async def dead_one_gone() -> bool:
        names = [c["name"] for c in await rclient.xinfo_consumers(queue, GROUP)]
        return b"dead-worker" not in names

    await eventually(dead_one_gone, what="the dead consumer to be removed")


@pytest.mark.chaos
async def test_stream_of_a_killed_worker_is_not_replayed_to_its_client(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
) -> None:
    """A stream that may have reached its client fails when its worker dies; the
    worker that reclaims it does not send the answer a second time."""
    _, mock_url = procs.mock()
    config = make_config(mock_url, worker={"lease_s": 1.0})
    doomed = procs.worker(config)
    _, url = procs.ingress(config)
    body = {
        "model": "mock-chunks-100-delay-100",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": True,
    }
    async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert first.startswith(b"data: {")
        doomed.send_signal(signal.SIGKILL)
        doomed.proc.wait(5)
        procs.worker(config)
        rest = (await resp.read()).decode()
    assert "upstream_stream_interrupted" in rest
    assert rest.count('"content"') < 100
    assert (await mock_stats(http, mock_url))["calls"] == 1
