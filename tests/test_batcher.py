"""The Redis command batcher: pipelining under load, bounded waits when Redis hangs."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from llm_broker.shared.redisio import Batcher


class HeldRedis:
    """Stands in for a Redis client: records each round trip (one write of packed
    commands on a connection), holds its replies until released."""

    def __init__(self) -> None:
        self.response_callbacks: dict[str, Any] = {}
        self.round_trips: list[list[tuple[Any, ...]]] = []
        self.release = asyncio.Event()
        self.connection_pool = _Pool(self)


class _Pool:
    def __init__(self, owner: HeldRedis) -> None:
        self._owner = owner

    async def get_connection(self) -> _Connection:
        return _Connection(self._owner)

    async def release(self, _conn: _Connection) -> None:
        return None


class _Connection:
    def __init__(self, owner: HeldRedis) -> None:
        self._owner = owner
        self._replies: list[Any] = []

    def pack_commands(self, commands: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        return list(commands)

    async def send_packed_command(self, commands: list[tuple[Any, ...]], **_: Any) -> None:
        self._owner.round_trips.append(commands)
        self._replies = [c[1] for c in commands]  # "ECHO x" answers x

    async def read_response(self) -> Any:
        await self._owner.release.wait()
        return self._replies.pop(0)

    async def disconnect(self, nowait: bool = False) -> None:
        return None


async def test_commands_issued_during_a_round_trip_share_the_next_one() -> None:
    fake = HeldRedis()
    batcher = Batcher(cast(aioredis.Redis, fake), timeout=5)
    first = batcher.call("ECHO", "a")
    for _ in range(10):  # let the runner task take its first steps (no wall-clock wait)
        if fake.round_trips:
            break
        await asyncio.sleep(0)
    assert fake.round_trips == [[("ECHO", "a")]]  # "a" went out alone: nothing else waited
    later = [batcher.call("ECHO", str(i)) for i in range(50)]
    fake.release.set()
    assert await first == "a"
    assert await asyncio.gather(*later) == [str(i) for i in range(50)]
    assert len(fake.round_trips) == 2
    assert len(fake.round_trips[1]) == 50
    await batcher.close()


async def test_every_call_fails_within_its_timeout_when_redis_hangs() -> None:
    fake = HeldRedis()  # never released: Redis accepts commands and never answers
    batcher = Batcher(cast(aioredis.Redis, fake), timeout=0.3)
    started = time.monotonic()
    first = batcher.call("ECHO", "a")
    await asyncio.sleep(0.2)
    second = batcher.call("ECHO", "b")  # waits behind the hung round trip
    with pytest.raises(TimeoutError):
        await first
    with pytest.raises(TimeoutError):
        await second
    # The second call gave up 0.3 s after it was made, not 0.3 s after the first failed.
    assert time.monotonic() - started < 0.2 + 0.3 + 0.15
    await batcher.close()


async def test_a_late_event_loop_does_not_make_a_round_trip_time_out() -> None:
    """While the process's own event loop is late, a round trip past its timeout
    waits on (its reply may be sitting unread); once the loop is on time again, or
    after ten timeouts, it times out."""
    fake = HeldRedis()
    lag = {"s": 1.0}
    batcher = Batcher(cast(aioredis.Redis, fake), timeout=0.1, lag=lambda: lag["s"])
    call = batcher.call("ECHO", "a")
    loop = asyncio.get_running_loop()
    # Held well past its 0.1 s timeout while the loop says it is 1 s late.
    loop.call_later(0.35, fake.release.set)
    assert await call == "a"
    assert batcher.last_ok > 0

    hung = HeldRedis()  # never answers
    lag["s"] = 1.0
    batcher = Batcher(cast(aioredis.Redis, hung), timeout=0.1, lag=lambda: lag["s"])
    started = time.monotonic()
    call = batcher.call("ECHO", "b")
    loop.call_later(0.25, lag.update, {"s": 0.0})  # the loop catches up
    with pytest.raises(TimeoutError):
        await call
    assert 0.25 <= time.monotonic() - started < 0.25 + 0.1 + 0.15
    await batcher.close()
