"""Redis Cluster: commands reach the primary of their slot, through resharding.

Against three real ``redis-server --cluster-enabled yes`` primaries (see
``conftest.RedisCluster``); slots are moved by hand, as ``redis-cli --cluster
reshard`` moves them (``CLUSTER SETSLOT`` ... ``MIGRATE`` ... ``SETSLOT NODE``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from llm_broker.shared.cluster import ClusterBatcher, key_of, slot_of
from llm_broker.shared.keys import Keys
from llm_broker.shared.redisio import REDIS_DOWN
from llm_broker.shared.store.scripts import WEBHOOK_ATTEMPT
from tests.conftest import RedisCluster
from tests.helpers import eventually


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


def move_slot(cluster: RedisCluster, slot: int, to: int, *, finish: bool = True) -> int:
    """Move ``slot`` to node ``to`` as ``redis-cli --cluster reshard`` does; with
    ``finish=False`` the keys move but the slot stays migrating (the source
    answers ASK). Returns the source node's index."""
    src = cluster.owner(slot)
    assert src != to
    src_id, dst_id = cluster.node_id(src), cluster.node_id(to)
    with cluster.client(src) as s, cluster.client(to) as d:
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            s.execute_command(
                "MIGRATE", "127.0.0.1", cluster.nodes[to].port, "", 0, 5000, "KEYS", *keys
            )
        if finish:
            for c in (d, s):
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    return src


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
    move_slot(redis_cluster, slot, (src + 1) % 3)
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
    move_slot(redis_cluster, slot, (src + 1) % 3, finish=False)
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
    await asyncio.to_thread(move_slot, redis_cluster, moved, (redis_cluster.owner(moved) + 1) % 3)
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
        await asyncio.to_thread(move_slot, redis_cluster, slot, (redis_cluster.owner(slot) + 1) % 3)
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
