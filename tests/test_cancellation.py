"""A loop that runs until cancelled stops even when a cancellation is lost inside
a Redis call (Python 3.11's asyncio.timeout and redis-py can turn one into a
timeout or swallow it): otherwise a shutdown waits for it forever."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from llm_broker.ingress.replies import ReplyRouter
from llm_broker.shared.config import parse_config
from llm_broker.shared.store import JobStore
from tests.conftest import RedisServer


async def test_the_reply_reader_stops_when_a_cancellation_is_swallowed(
    redis_up: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    swallowed = asyncio.Event()
    reading = asyncio.Event()

    async def swallowing(
        client: aioredis.Redis, stream: str, after: bytes, *, block_ms: int
    ) -> list[object]:
        """A blocking read that loses the cancellation and returns as if timed out."""
        reading.set()
        try:
            await asyncio.sleep(block_ms / 1000)  # stands for XREAD ... BLOCK
        except asyncio.CancelledError:
            swallowed.set()
        return []

    monkeypatch.setattr(JobStore, "read_replies", staticmethod(swallowing))
    config = parse_config({"redis": {"url": redis_up.url, "key_prefix": prefix}})
    router = ReplyRouter(config, "pod")
    reader = asyncio.get_running_loop().create_task(router.run())
    async with asyncio.timeout(10):
        await reading.wait()
    reader.cancel()
    async with asyncio.timeout(5):
        await asyncio.wait([reader])
    assert swallowed.is_set()
    assert reader.cancelled()
