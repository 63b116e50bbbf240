"""The scheduler's dispatch step alone, on a real Redis: the order in which waiting
jobs reach the provider's stream, and the counts that quotas rely on."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llm_broker.shared import messages as m
from llm_broker.shared.config import ConfigError, parse_config
from llm_broker.shared.redisio import Batcher, Library
from llm_broker.shared.store import (
    Delivery,
    JobStore,
    Outcome,
    TenantQueueFull,
    TenantRateLimited,
)
from llm_broker.shared.store.records import Usage
from tests.helpers import make_job, read_once

WORKER = "worker-a"


def store_for(rclient: aioredis.Redis, prefix: str, **sections: Any) -> JobStore:
    config = parse_config(
        {
            "redis": {"key_prefix": prefix},
            "providers": {
                p: {"type": "mock", "base_url": "http://127.0.0.1:9/v1"} for p in ("mock", "other")
            },
            **sections,
        }
    )
    return JobStore(config, Batcher(rclient, timeout=5.0), rclient)


@pytest.fixture
async def store(rclient: aioredis.Redis, prefix: str) -> AsyncIterator[JobStore]:
    found = store_for(
        rclient,
        prefix,
        tenants={"a": {"weight": 3}, "q": {"quotas": {"max_in_flight": 2}}},
        scheduling={"min_share": {"async": 0.25, "batch": 0.1}},
    )
    for provider in ("mock", "other"):
        await found.queues.ensure_group(provider)
    yield found


def job(tenant: str, priority: str = "async", **changes: Any) -> m.Job:
    return msgspec.structs.replace(make_job(), tenant=tenant, priority=priority, **changes)


async def admit(store: JobStore, *jobs: m.Job) -> None:
    for j in jobs:
        assert await store.enqueue(j, max_depth=10_000, ttl_s=600) is None


async def read(store: JobStore, rclient: aioredis.Redis, provider: str = "mock") -> list[Delivery]:
    return await read_once(
        rclient, lambda r: store.queues.read(r, provider, WORKER, count=1000, block_ms=10)
    )


async def run_all(store: JobStore, rclient: aioredis.Redis, slots: int) -> list[m.Job]:
    """Offer ``slots`` and complete every delivery as it comes: the jobs in the
    order they reached the stream."""
    await store.register("mock", WORKER, slots, 600)
    order: list[m.Job] = []
    while batch := await read(store, rclient):
        for delivery in batch:
            assert delivery.job is not None
            order.append(delivery.job)
            await store.settle(delivery, Outcome(status=m.COMPLETED), consumer=WORKER)
    return order


async def test_nothing_goes_to_the_stream_without_a_worker_slot(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    jobs = [job("a") for _ in range(3)]
    await admit(store, *jobs)
    assert await read(store, rclient) == []
    # A worker offers two slots: two go, the third waits for one to free.
    assert await store.register("mock", WORKER, 2, 600) == 2
    first = await read(store, rclient)
    assert [d.job for d in first] == jobs[:2]
    await store.settle(first[0], Outcome(status=m.COMPLETED), consumer=WORKER)
    assert [d.job for d in await read(store, rclient)] == jobs[2:]


async def test_weighted_round_robin_within_a_class(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    await admit(store, *(job("a") for _ in range(12)), *(job("b") for _ in range(4)))
    order = [j.tenant for j in await run_all(store, rclient, 1)]
    assert order == ["a", "a", "a", "b"] * 4


async def test_an_idle_tenant_banks_no_credit(store: JobStore, rclient: aioredis.Redis) -> None:
    await store.register("mock", WORKER, 1, 600)
    await admit(store, job("x"))  # straight to the free slot
    running = await read(store, rclient)
    # b waits alone for a long while, then a arrives: they alternate from there.
    await admit(store, *(job("b") for _ in range(4)), *(job("c") for _ in range(4)))
    await store.settle(running[0], Outcome(status=m.COMPLETED), consumer=WORKER)
    order = [j.tenant for j in await run_all(store, rclient, 1)]
    assert order == ["b", "c"] * 4


async def test_classes_go_in_order_and_lower_ones_keep_their_share(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    await admit(
        store,
        *(job("b", "batch") for _ in range(3)),
        *(job("s", "async") for _ in range(5)),
        *(job("i", "interactive") for _ in range(20)),
    )
    order = "".join(j.priority[0] for j in await run_all(store, rclient, 1))
    # Interactive goes first, but async is owed a quarter of the dispatches while
    # interactive waits (every fourth from the fifth on), and batch a tenth (the
    # eleventh, the twenty-second); once interactive is done, the rest by class.
    assert order == "iiiiaiiiaibiaiiiaiiiabiiiiib"


async def test_in_flight_quota_holds_back_only_that_tenant(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    await admit(store, *(job("q") for _ in range(4)), *(job("b") for _ in range(4)))
    await store.register("mock", WORKER, 6, 600)
    first = await read(store, rclient)
    assert sorted(d.job.tenant for d in first if d.job) == ["b", "b", "b", "b", "q", "q"]
    # A job of q's settles: the next of q's goes.
    done = next(d for d in first if d.job and d.job.tenant == "q")
    await store.settle(done, Outcome(status=m.COMPLETED), consumer=WORKER)
    assert [d.job.tenant for d in await read(store, rclient) if d.job] == ["q"]


async def test_settles_sent_together_free_quota_and_slots_as_one_by_one(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    """Every running job settled in one call of the batch form: q's two leave its
    in-flight quota, every entry is acknowledged and deleted, and the six freed
    slots take q's next two (its quota again) and b's four, as six settles one by
    one would."""
    await admit(store, *(job("q") for _ in range(4)), *(job("b") for _ in range(8)))
    await store.register("mock", WORKER, 6, 600)
    first = await read(store, rclient)
    assert sorted(d.job.tenant for d in first if d.job) == ["b", "b", "b", "b", "q", "q"]
    await rclient.config_resetstat()
    made = await asyncio.gather(
        *(store.settle(d, Outcome(status=m.COMPLETED), consumer=WORKER) for d in first)
    )
    assert made == [True] * 6
    assert (await rclient.info("commandstats"))["cmdstat_fcall"]["calls"] == 1
    queue = store.keys.queue("mock")
    assert [d.job.tenant for d in await read(store, rclient) if d.job].count("q") == 2
    assert await rclient.xlen(queue) == 6  # only what was just delivered
    assert int((await rclient.xpending(queue, "workers"))["pending"]) == 6


async def test_waiting_jobs_that_must_not_run_are_dropped_without_running(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    late, cancelled, fine = job("a"), job("a"), job("a")
    await admit(store, late, cancelled, fine)
    await rclient.hset(store.keys.job(late.id), "deadline", str(time.time() - 1))  # type: ignore[misc]
    found = await store.cancel(cancelled.id, "a", result_ttl=60)
    assert found is not None and found.cancelled
    # The cancelled job stopped counting at once.
    assert await rclient.zcard(store.keys.waiting_index("mock", "async")) == 2
    assert await store.register("mock", WORKER, 3, 600) == 1
    assert [d.job for d in await read(store, rclient)] == [fine]
    rec = await store.record(late.id)
    assert rec is not None and (rec.status, rec.http_status) == ("expired", 504)
    assert await rclient.zcard(store.keys.waiting_index("mock", "async")) == 0
    assert await rclient.hget(store.keys.scheduler("mock"), "entries") == b"0"  # type: ignore[misc]


async def test_a_tenants_queued_quota_counts_only_its_waiting_jobs(
    rclient: aioredis.Redis, prefix: str
) -> None:
    store = store_for(rclient, prefix, tenants={"a": {"providers": {"mock": {"max_queued": 2}}}})
    first, second = job("a"), job("a")
    await admit(store, first, second)
    assert await store.enqueue(job("a"), max_depth=100, ttl_s=60) == TenantQueueFull("provider")
    assert await store.enqueue(job("b"), max_depth=100, ttl_s=60) is None
    await store.cancel(first.id, "a", result_ttl=60)
    assert await store.enqueue(job("a"), max_depth=100, ttl_s=60) is None
    # Dispatched jobs no longer wait: the quota frees as they go to workers.
    await store.queues.ensure_group("mock")
    await store.register("mock", WORKER, 10, 600)
    assert await store.enqueue(job("a"), max_depth=100, ttl_s=60) is None
    assert await store.enqueue(job("a"), max_depth=100, ttl_s=60) is None


async def test_a_fallback_moves_once_keeping_class_and_tenant(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    await store.register("mock", WORKER, 1, 600)
    original = job("a", "batch")
    await admit(store, original)
    (delivery,) = await read(store, rclient)
    assert await store.start(delivery, result_ttl=60) is not None
    # The same entry, reclaimed by another worker while this one stalled: the
    # stalled worker's fallback moves nothing, and leaves the entry to its owner.
    _, (again,) = await store.queues.reclaim("mock", "worker-b", idle_ms=0, count=10)
    moved = msgspec.structs.replace(original, provider="other")
    assert await store.move(delivery, moved, consumer=WORKER) is False
    assert await rclient.xlen(store.keys.queue("mock")) == 1
    assert await store.move(again, moved, consumer="worker-b") is True
    assert await store.move(again, moved, consumer="worker-b") is False
    keys = store.keys
    assert await rclient.xlen(keys.queue("mock")) == 0
    assert await rclient.llen(keys.waiting("other", "batch", "a")) == 1  # type: ignore[misc]
    assert await rclient.hget(keys.tenant_queued("other"), "a") == b"1"  # type: ignore[misc]
    await store.register("other", WORKER, 5, 600)
    (there,) = await read(store, rclient, "other")
    assert there.job == moved
    assert await read(store, rclient, "other") == []
    assert await rclient.hget(keys.tenant_queued("other"), "a") is None  # type: ignore[misc]


async def test_a_tenants_tokens_per_minute_are_counted_on_its_estimates(
    rclient: aioredis.Redis, prefix: str
) -> None:
    store = store_for(
        rclient,
        prefix,
        tenants={"a": {"quotas": {"tpm": 1000}, "providers": {"other": {"rpm": 1}}}},
    )
    assert await store.enqueue(job("a", tokens=600), max_depth=100, ttl_s=60) is None
    refused = await store.enqueue(job("a", tokens=600), max_depth=100, ttl_s=60)
    assert isinstance(refused, TenantRateLimited) and refused.scope == "all"
    assert 59 <= refused.retry_after <= 60
    # Another tenant, and a smaller request of a's, still fit.
    assert await store.enqueue(job("b", tokens=600), max_depth=100, ttl_s=60) is None
    assert await store.enqueue(job("a", tokens=400), max_depth=100, ttl_s=60) is None
    # A provider's own quota is counted on its own (a's overall tokens are used up:
    # this request estimates none).
    elsewhere = msgspec.structs.replace(job("a"), provider="other")
    assert await store.enqueue(elsewhere, max_depth=100, ttl_s=60) is None
    refused = await store.enqueue(
        msgspec.structs.replace(job("a"), provider="other"), max_depth=100, ttl_s=60
    )
    assert isinstance(refused, TenantRateLimited) and refused.scope == "provider"


async def test_a_tenants_token_windows_count_the_real_usage_once_a_call_settles(
    rclient: aioredis.Redis, prefix: str
) -> None:
    store = store_for(
        rclient,
        prefix,
        tenants={"a": {"quotas": {"tpm": 1000}, "providers": {"mock": {"tpm": 1000}}}},
    )
    await store.queues.ensure_group("mock")
    await store.register("mock", WORKER, 10, 600)
    big = job("a", tokens=900)
    assert await store.enqueue(big, max_depth=100, ttl_s=60) is None
    refused = await store.enqueue(job("a", tokens=900), max_depth=100, ttl_s=60)
    assert isinstance(refused, TenantRateLimited)
    # The call used 150 tokens, not the 900 estimated: the windows now hold 150.
    (delivery,) = await read(store, rclient)
    await store.settle(delivery, Outcome(status=m.COMPLETED, usage=Usage(100, 50)), consumer=WORKER)
    assert await store.enqueue(job("a", tokens=800), max_depth=100, ttl_s=60) is None
    assert isinstance(
        await store.enqueue(job("a", tokens=100), max_depth=100, ttl_s=60), TenantRateLimited
    )


@pytest.mark.parametrize(
    ("tenants", "why"),
    [
        ({"a": {"weight": 0.5}}, "weight must be from 1 to 1000"),
        ({"a": {"max_priority": "urgent"}}, "max_priority"),
        ({"a b": {}}, "tenant name"),
        ({"a": {"providers": {"nowhere": {"rpm": 1}}}}, "unknown provider 'nowhere'"),
        ({"a": {"quotas": {"rpm": -1}}}, "quota rpm"),
    ],
)
def test_tenant_settings_are_checked(tenants: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_config({"tenants": tenants})


def test_a_minimum_share_left_out_keeps_its_default() -> None:
    shares = parse_config({"scheduling": {"min_share": {"async": 0.2}}}).scheduling.min_share
    assert (shares.async_, shares.batch) == (0.2, 0.05)
    with pytest.raises(ConfigError, match="min_share"):
        parse_config({"scheduling": {"min_share": {"interactive": 0.1}}})


async def test_a_lost_count_of_waiting_entries_is_rebuilt_by_a_registration(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    jobs = [job("a"), job("b"), job("a", "batch")]
    await admit(store, *jobs)
    # The scheduler's state is lost (deleted by hand, or evicted).
    await rclient.delete(store.keys.scheduler("mock"))
    assert await store.register("mock", WORKER, 10, 600) == 3
    assert sorted(d.job.id for d in await read(store, rclient) if d.job) == sorted(
        j.id for j in jobs
    )


async def test_the_function_library_is_loaded_again_when_redis_lost_it(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    await rclient.function_flush()  # type: ignore[misc]
    first, second = job("a"), job("a")
    # Both calls of one round trip miss the library: it is loaded once, both run.
    done = await asyncio.gather(
        store.enqueue(first, max_depth=100, ttl_s=60),
        store.enqueue(second, max_depth=100, ttl_s=60),
    )
    assert list(done) == [None, None]
    assert await rclient.zcard(store.keys.waiting_index("mock", "async")) == 2


async def test_a_library_redis_cannot_load_fails_its_calls_with_the_reason(
    rclient: aioredis.Redis,
) -> None:
    broken = Library("llmb_test", "local x = (", {"f": "return 1"})
    batcher = Batcher(rclient, timeout=5.0)
    with pytest.raises(ResponseError) as failed:
        await batcher.call(*broken["f"].command((), ()))
    assert str(failed.value).startswith("Error compiling function"), failed.value
    # Other commands of the same round trip are not affected.
    assert await batcher.call("PING") is True
