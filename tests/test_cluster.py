"""Redis Cluster: commands reach the primary of their slot, through resharding.

Against three real ``redis-server --cluster-enabled yes`` primaries (see
``conftest.RedisCluster``); slots are moved by hand, as ``redis-cli --cluster
reshard`` moves them (``CLUSTER SETSLOT`` ... ``MIGRATE`` ... ``SETSLOT NODE``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as RedisClusterClient

from llm_broker.shared import messages as m
from llm_broker.shared.cluster import ClusterBatcher, key_of, slot_of
from llm_broker.shared.config import ConfigError, parse_config
from llm_broker.shared.keys import Keys
from llm_broker.shared.redisio import REDIS_DOWN
from llm_broker.shared.store import JobStore
from llm_broker.shared.store.records import Result
from llm_broker.shared.store.scripts import WEBHOOK_ATTEMPT
from llm_broker.shared.store.values import (
    Admitted,
    AsyncFields,
    Full,
    Idempotency,
    KeyInUse,
    Outcome,
    Replayed,
    Verdict,
)
from tests.conftest import RedisCluster
from tests.helpers import eventually, make_job


def _node_client(host: str, port: int) -> aioredis.Redis:
    return aioredis.Redis(host=host, port=port)


@pytest.fixture
async def batcher(redis_cluster: RedisCluster) -> AsyncIterator[ClusterBatcher]:
    b = ClusterBatcher(redis_cluster.seeds[:1], _node_client, timeout=2.0)
    yield b
    await b.close()


def _keys_on_every_node(cluster: RedisCluster, count: int = 30) -> list[str]:
    keys = [f"k:{i}" for i in range(count)]
    assert {cluster.owner(slot_of(k)) for k in keys} == {0, 1, 2}
    return keys


@pytest.mark.parametrize(
    ("sections", "why"),
    [
        ({}, "accounts.usage"),
        ({"tenants": {"t": {"quotas": {"max_in_flight": 2}}}}, "across providers"),
        ({"redis": {"sentinel": {"addresses": ["127.0.0.1:26379"]}}}, "exclude each other"),
        ({"redis": {"min_replicas_acked": 1}}, "min_replicas_acked"),
    ],
)
def test_a_cluster_config_refuses_what_a_cluster_cannot_do_yet(
    sections: dict[str, Any], why: str
) -> None:
    data: dict[str, Any] = {"accounts": {"usage": False}, **sections}
    data["redis"] = {"cluster": True, **sections.get("redis", {})}
    if not sections:
        data["accounts"] = {"usage": True}
    with pytest.raises(ConfigError, match=why):
        parse_config(data)


def test_a_commands_key_decides_its_node() -> None:
    keys = Keys("p:")
    assert key_of(("GET", "a")) == "a"
    assert key_of(("FCALL", "llmb_x_settle", 4, "job:1", "q")) == "job:1"
    assert key_of(("FCALL", "llmb_x_register", 0, "p:", "openai")) is None
    assert key_of(("XREADGROUP", "GROUP", "g", "c", "BLOCK", 5, "STREAMS", "s1", ">")) == "s1"
    assert key_of(("XREAD", "COUNT", 10, "STREAMS", "r:pod", "0-0")) == "r:pod"
    assert key_of(("XINFO GROUPS", "q")) == "q"
    assert key_of(("PING",)) is None
    # A provider's keys share its slot, whatever else the name holds.
    tag = {slot_of(keys.queue("openai")), slot_of(keys.scheduler("openai"))}
    assert tag == {slot_of("{openai}")}


async def test_commands_run_on_the_node_of_their_slot(
    batcher: ClusterBatcher, redis_cluster: RedisCluster
) -> None:
    keys = _keys_on_every_node(redis_cluster)
    # Called together, as many callers in one loop turn: each node gets its share.
    assert await asyncio.gather(*(batcher.call("SET", k, k.upper()) for k in keys)) == [True] * 30
    for k in keys:
        with redis_cluster.client(redis_cluster.owner(slot_of(k))) as owner:
            assert owner.get(k) == k.upper().encode()
    assert await asyncio.gather(*(batcher.call("GET", k) for k in keys)) == [
        k.upper().encode() for k in keys
    ]
    assert await batcher.call("PING") is True


async def test_a_function_library_is_loaded_on_every_node_that_runs_it(
    batcher: ClusterBatcher, redis_cluster: RedisCluster
) -> None:
    # webhook_attempt touches only its job's record: one slot.
    jobs = [f"p:job:{i}" for i in range(30)]
    assert {redis_cluster.owner(slot_of(j)) for j in jobs} == {0, 1, 2}
    for j in jobs:
        await batcher.call("HSET", j, "status", "completed")
    done = await asyncio.gather(
        *(batcher.call(*WEBHOOK_ATTEMPT.command([j], [0, "webhook_attempts", 1])) for j in jobs)
    )
    assert done == [1] * 30
    for j in jobs:
        assert await batcher.call("HGET", j, "webhook_attempts") == b"1"


async def test_a_moved_slot_is_followed_without_an_error(
    batcher: ClusterBatcher, redis_cluster: RedisCluster
) -> None:
    key = "moving"
    slot = slot_of(key)
    await batcher.call("SET", key, "1")
    src = redis_cluster.owner(slot)
    redis_cluster.move_slot(slot, (src + 1) % 3)
    # The batcher's map still names the old node: it answers MOVED, the batcher
    # follows it, and learns the new map.
    assert await batcher.call("INCR", key) == 2
    assert batcher.address_of(("GET", key)) == redis_cluster.seeds[(src + 1) % 3]
    with redis_cluster.client((src + 1) % 3) as owner:
        assert owner.get(key) == b"2"


async def test_a_key_of_a_slot_being_migrated_is_asked_for_on_the_target(
    batcher: ClusterBatcher, redis_cluster: RedisCluster
) -> None:
    key = "migrating"
    slot = slot_of(key)
    await batcher.call("SET", key, "1")
    src = redis_cluster.owner(slot)
    redis_cluster.move_slot(slot, (src + 1) % 3, finish=False)
    # The key is on the target; the source answers ASK, and still serves the slot.
    assert await batcher.call("INCR", key) == 2
    assert batcher.address_of(("GET", key)) == redis_cluster.seeds[src]
    with redis_cluster.client((src + 1) % 3) as target:
        assert target.execute_command("ASKING")
        assert target.get(key) == b"2"


async def test_load_goes_on_while_a_slot_moves(
    batcher: ClusterBatcher, redis_cluster: RedisCluster
) -> None:
    keys = _keys_on_every_node(redis_cluster, 60)
    moved = slot_of(keys[0])
    rounds = 0
    moving = True

    async def load() -> None:
        nonlocal rounds
        # Rounds until the move is over and five more (bounded: 2,000 in all).
        after = 0
        while after < 5 and rounds < 2000:
            got = await asyncio.gather(*(batcher.call("INCR", k) for k in keys))
            rounds += 1
            assert got == [rounds] * 60
            after += 0 if moving else 1

    running = asyncio.ensure_future(load())
    await eventually(_after(lambda: rounds >= 5), what="load under way")
    before = rounds
    await asyncio.to_thread(redis_cluster.move_slot, moved, (redis_cluster.owner(moved) + 1) % 3)
    during = rounds - before
    moving = False
    await running
    assert during > 0  # the slot moved under load
    values = await asyncio.gather(*(batcher.call("GET", k) for k in keys))
    assert values == [str(rounds).encode()] * 60


async def test_a_blocking_reader_follows_its_stream_to_another_node(
    redis_cluster: RedisCluster,
) -> None:
    reader = ClusterBatcher(redis_cluster.seeds, _node_client, timeout=2.0)
    writer = ClusterBatcher(redis_cluster.seeds, _node_client, timeout=2.0)
    stream = "p:r:{pod-1}"
    seen: list[str] = []
    last = "0-0"

    def next_read() -> tuple[Any, ...] | None:
        return ("XREAD", "COUNT", 10, "BLOCK", 200, "STREAMS", stream, last)

    def handle(result: Any) -> None:
        nonlocal last
        for _, entries in result or []:
            for entry_id, fields in entries:
                last = entry_id
                seen.append(fields[b"n"].decode())

    try:
        await writer.call("XADD", stream, "*", "n", "0")
        reads = reader.reads(next_read, handle)
        await eventually(_after(lambda: seen == ["0"]), what="the first entry")
        slot = slot_of(stream)
        await asyncio.to_thread(redis_cluster.move_slot, slot, (redis_cluster.owner(slot) + 1) % 3)
        await writer.call("XADD", stream, "*", "n", "1")
        await eventually(_after(lambda: seen == ["0", "1"]), what="the entry after the move")
        assert not reads.done()
        reads.cancel()
    finally:
        await reader.close(wait=False)
        await writer.close()


async def test_a_dead_node_is_an_error_for_its_slots_only(
    batcher: ClusterBatcher, redis_cluster: RedisCluster
) -> None:
    keys = _keys_on_every_node(redis_cluster)
    await asyncio.gather(*(batcher.call("SET", k, "v") for k in keys))
    redis_cluster.nodes[2].stop()
    results = await asyncio.wait_for(
        asyncio.gather(*(batcher.call("GET", k) for k in keys), return_exceptions=True), 10
    )
    for k, r in zip(keys, results, strict=True):
        if redis_cluster.owner(slot_of(k)) == 2:
            assert isinstance(r, REDIS_DOWN), r
        else:
            assert r == b"v"


def _after(check: Any) -> Any:
    async def poll() -> bool:
        return bool(check())

    return poll


# The job store on a Cluster -------------------------------------------------------


def _providers_on_two_nodes(cluster: RedisCluster) -> tuple[str, str]:
    """Two provider names whose keys land on different nodes."""
    keys = Keys("c:", cluster=True)
    names = [f"prov{i}" for i in range(20)]
    first = names[0]
    home = cluster.owner(slot_of(keys.queue(first)))
    second = next(n for n in names if cluster.owner(slot_of(keys.queue(n))) != home)
    return first, second


@pytest.fixture
async def cluster_store(
    redis_cluster: RedisCluster,
) -> AsyncIterator[tuple[JobStore, ClusterBatcher, tuple[str, str]]]:
    a, b = _providers_on_two_nodes(redis_cluster)
    mock = {"type": "mock", "base_url": "http://127.0.0.1:9/v1"}
    config = parse_config({"redis": {"key_prefix": "c:"}, "providers": {a: mock, b: mock}})
    client = RedisClusterClient(host="127.0.0.1", port=redis_cluster.nodes[0].port)
    batcher = ClusterBatcher(redis_cluster.seeds, _node_client, timeout=5.0)
    reader = ClusterBatcher(redis_cluster.seeds, _node_client, timeout=5.0)
    store = JobStore(config, batcher, client, cluster=True)
    yield store, reader, (a, b)
    await batcher.close()
    await reader.close(wait=False)
    await client.aclose()


def _job(store: JobStore, provider: str, **changes: Any) -> m.Job:
    job = make_job(provider=provider, model=provider, **changes)
    return msgspec.structs.replace(job, id=store.keys.job_id(provider, job.id))


async def test_a_synchronous_call_runs_on_its_providers_shard(
    cluster_store: tuple[JobStore, ClusterBatcher, tuple[str, str]],
    redis_cluster: RedisCluster,
) -> None:
    store, reader, providers = cluster_store
    nodes = set()
    for provider in providers:
        await store.queues.ensure_group(provider)
        assert await store.register(provider, "w1", 4, 60) == 0
        job = msgspec.structs.replace(_job(store, provider), reply_to="pod-1")
        # The record, the queue and the reply stream share the provider's slot.
        slot = slot_of(store.keys.queue(provider))
        assert slot_of(store.keys.job(job.id)) == slot_of(store.keys.reply("pod-1", provider))
        assert slot_of(store.keys.job(job.id)) == slot
        nodes.add(redis_cluster.owner(slot))
        # The ingress process makes its reply stream before it waits (replies.py).
        stream = store.keys.reply("pod-1", provider)
        opened = await batcher_call(store, "XADD", stream, "*", "opened", "1")
        assert await store.enqueue(job, max_depth=100, ttl_s=600) is None
        (delivery,) = await store.queues.read(reader, provider, "w1", count=10, block_ms=100)
        assert delivery.job == job
        outcome = Outcome(
            status=m.COMPLETED, payload=b'{"ok":1}', reply=Result(), started_at=time.time()
        )
        assert await store.settle(delivery, outcome, consumer="w1") is True
        replies = await store.read_replies(reader, stream, opened, block_ms=100)
        assert [(i, r) for _, i, r in replies] == [(job.id.encode(), Result(b'{"ok":1}'))]
        rec = await store.record(job.id)
        assert rec is not None and (rec.status, rec.attempts) == ("completed", 1)
        assert await batcher_call(store, "XLEN", store.keys.queue(provider)) == 0
    assert len(nodes) == 2  # two shards served one call each


async def test_jobs_wait_and_are_cancelled_or_expire_on_a_cluster(
    cluster_store: tuple[JobStore, ClusterBatcher, tuple[str, str]],
) -> None:
    store, reader, (provider, _) = cluster_store
    await store.queues.ensure_group(provider)
    waiting, cancelled, late = (_job(store, provider) for _ in range(3))
    for job in (waiting, cancelled, late):  # no worker yet: they wait
        assert await store.enqueue(job, max_depth=100, ttl_s=600) is None
    index = store.keys.waiting_index(provider, waiting.priority)
    assert await batcher_call(store, "ZCARD", index) == 3
    found = await store.cancel(cancelled.id, cancelled.tenant, result_ttl=60)
    assert found is not None and found.cancelled
    assert await store.expire(late) is True
    # A worker's slots: only the job still wanted reaches the stream.
    assert await store.register(provider, "w1", 4, 60) == 1
    deliveries = await store.queues.read(reader, provider, "w1", count=10, block_ms=100)
    assert [d.job.id for d in deliveries if d.job] == [waiting.id]
    assert await store.start(deliveries[0], result_ttl=60) is Verdict.RUN
    statuses = await store.statuses([waiting.id, cancelled.id, late.id])
    assert statuses == ["in_progress", "cancelled", "expired"]


async def test_an_async_job_is_submitted_and_listed_on_a_cluster(
    cluster_store: tuple[JobStore, ClusterBatcher, tuple[str, str]],
) -> None:
    store, _, (provider, _) = cluster_store
    job = _job(store, provider)
    admitted = await store.submit(
        job, max_depth=100, ttl_s=600, extra=AsyncFields(), idempotency=None
    )
    assert isinstance(admitted, Admitted)
    index = store.keys.tenant_jobs(job.tenant, provider)
    assert slot_of(index) == slot_of(store.keys.job(job.id))
    assert await batcher_call(store, "ZRANGE", index, 0, -1) == [job.id.encode()]


async def test_a_tenants_jobs_are_listed_across_shards_newest_first(
    cluster_store: tuple[JobStore, ClusterBatcher, tuple[str, str]],
) -> None:
    """The tenant's index is one sorted set per provider (beside the records); a
    listing merges them, newest first, and pages with a cursor, jobs created in
    the same microsecond included."""
    store, _, providers = cluster_store
    now = time.time()
    jobs = []
    for n in range(7):
        provider = providers[n % 2]
        created = now + (n // 2 * 2 if n < 6 else 2)  # the last one ties with two others
        jobs.append(msgspec.structs.replace(_job(store, provider), created=created))
    for job in jobs:
        admitted = await store.submit(
            job, max_depth=100, ttl_s=600, extra=AsyncFields(), idempotency=None
        )
        assert isinstance(admitted, Admitted)
    newest_first = [j.id for j in sorted(jobs, key=lambda j: (j.created, j.id), reverse=True)]
    pages, cursor = [], None
    while True:
        page = await store.tenant_page("default", cursor, 2)
        if not page:
            break
        pages.append([i for i, _ in page])
        cursor = page[-1][1]
    assert [i for p in pages for i in p] == newest_first
    assert all(len(p) == 2 for p in pages[:-1])
    # A listing may start after any of them, and forgets expired ones on their shard.
    start = await store.tenant_cursor("default", newest_first[2])
    assert [i for i, _ in await store.tenant_page("default", start, 10)] == newest_first[3:]
    await store.forget("default", newest_first[:2])
    assert [i for i, _ in await store.tenant_page("default", None, 10)] == newest_first[2:]


async def test_an_idempotency_key_is_claimed_before_its_job_is_admitted(
    cluster_store: tuple[JobStore, ClusterBatcher, tuple[str, str]],
) -> None:
    """On a Cluster the key is on a slot of its own: claimed, then the job admitted.
    A retry gets the first job back, on whichever provider it lands; a refused job
    gives its claim up; a claim whose job never came is taken over once old."""
    store, _, (a, b) = cluster_store
    key = Idempotency(key="k-1", request_hash="h1", ttl_s=600)
    first = _job(store, a)
    extra = AsyncFields()
    admitted = await store.submit(first, max_depth=100, ttl_s=600, extra=extra, idempotency=key)
    assert isinstance(admitted, Admitted)
    again = await store.submit(
        _job(store, b), max_depth=100, ttl_s=600, extra=extra, idempotency=key
    )
    assert isinstance(again, Replayed)
    assert (again.job_id, again.request_hash, again.record.status) == (first.id, "h1", "queued")
    listed = await store.tenant_page("default", None, 10)
    assert [i for i, _ in listed] == [first.id]  # the retry made no job

    # A refused job does not keep its key.
    other = Idempotency(key="k-2", request_hash="h2", ttl_s=600)
    refused = await store.submit(
        _job(store, a), max_depth=0, ttl_s=600, extra=extra, idempotency=other
    )
    assert refused == Full()
    name = store.keys.idempotency("default", "k-2")
    assert await batcher_call(store, "GET", name) is None

    # A claim left by a request whose admission never ran: young, it makes the
    # retry wait (409 at the API); old, the retry takes it over and is admitted.
    lost = _job(store, a)
    await batcher_call(store, "SET", name, f"h2 {lost.id} {time.time():.6f}")
    retry = _job(store, b)
    assert await store.submit(retry, max_depth=100, ttl_s=600, extra=extra, idempotency=other) == (
        KeyInUse()
    )
    await batcher_call(store, "SET", name, f"h2 {lost.id} {time.time() - 60:.6f}")
    taken = await store.submit(retry, max_depth=100, ttl_s=600, extra=extra, idempotency=other)
    assert isinstance(taken, Admitted)
    replay = await store.submit(
        _job(store, a), max_depth=100, ttl_s=600, extra=extra, idempotency=other
    )
    assert isinstance(replay, Replayed) and replay.job_id == retry.id


async def test_a_fallback_moves_a_job_to_a_provider_on_another_shard(
    cluster_store: tuple[JobStore, ClusterBatcher, tuple[str, str]],
) -> None:
    store, reader, (a, b) = cluster_store
    for provider in (a, b):
        await store.queues.ensure_group(provider)
        await store.register(provider, "w1", 4, 60)
    job = msgspec.structs.replace(_job(store, a), reply_to="pod-1")
    stream = store.keys.job_reply("pod-1", job.id)  # beside the record, on a's shard
    opened = await batcher_call(store, "XADD", stream, "*", "opened", "1")
    assert await store.enqueue(job, max_depth=100, ttl_s=600) is None
    (first,) = await store.queues.read(reader, a, "w1", count=10, block_ms=100)
    # Another worker does not hold the entry: it cannot move the job.
    moved = msgspec.structs.replace(job, provider=b, upstream_model=b)
    assert await store.move(first, moved, consumer="w2") is False
    assert await store.move(first, moved, consumer="w1") is True
    assert await batcher_call(store, "XLEN", store.keys.queue(a)) == 0
    (second,) = await store.queues.read(reader, b, "w1", count=10, block_ms=100)
    assert second.job == moved
    assert await store.start(second, result_ttl=60) is Verdict.RUN
    outcome = Outcome(status=m.COMPLETED, payload=b'{"ok":2}', reply=Result())
    assert await store.settle(second, outcome, consumer="w1") is True
    replies = await store.read_replies(reader, stream, opened, block_ms=100)
    assert [(i, r) for _, i, r in replies] == [(job.id.encode(), Result(b'{"ok":2}'))]
    rec = await store.record(job.id)
    assert rec is not None and (rec.status, rec.provider) == ("completed", b)
    assert await batcher_call(store, "XLEN", store.keys.queue(b)) == 0


async def test_a_delivery_left_behind_by_a_fallback_is_dropped(
    cluster_store: tuple[JobStore, ClusterBatcher, tuple[str, str]],
) -> None:
    """A worker that dies between a fallback's steps leaves its entry pending on the
    first provider: the record says the job is the next provider's, so its
    redelivery does not run it."""
    store, reader, (a, b) = cluster_store
    await store.queues.ensure_group(a)
    await store.register(a, "w1", 4, 60)
    job = _job(store, a)
    assert await store.enqueue(job, max_depth=100, ttl_s=600) is None
    (_first,) = await store.queues.read(reader, a, "w1", count=10, block_ms=100)
    fn = store._fn
    found = await batcher_call(
        store, *fn.move_record.command((store.keys.job(job.id),), (b, b"[]", job.priority))
    )
    assert found[0] == 1  # the record moved; the process died before the rest
    _, (again,) = await store.queues.reclaim(a, "w2", idle_ms=0, count=10)
    assert again.deliveries == 2
    assert await store.start(again, result_ttl=60) is Verdict.FINAL


async def test_a_job_cancelled_after_a_fallback_never_starts(
    cluster_store: tuple[JobStore, ClusterBatcher, tuple[str, str]],
) -> None:
    store, reader, (a, b) = cluster_store
    await store.queues.ensure_group(a)
    await store.queues.ensure_group(b)
    await store.register(a, "w1", 4, 60)
    job = _job(store, a)
    assert await store.enqueue(job, max_depth=100, ttl_s=600) is None
    (first,) = await store.queues.read(reader, a, "w1", count=10, block_ms=100)
    moved = msgspec.structs.replace(job, provider=b)
    assert await store.move(first, moved, consumer="w1") is True  # b has no worker: it waits
    found = await store.cancel(job.id, job.tenant, result_ttl=60)
    assert found is not None and found.cancelled
    assert await store.register(b, "w1", 4, 60) == 1  # still counted on b: it goes...
    (delivery,) = await store.queues.read(reader, b, "w1", count=10, block_ms=100)
    assert await store.start(delivery, result_ttl=60) is Verdict.FINAL  # ...and stops there
    assert await store.statuses([job.id]) == ["cancelled"]


async def batcher_call(store: JobStore, *command: Any) -> Any:
    return await store._batcher.call(*command)
