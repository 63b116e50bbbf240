"""The reply reader: a loop that runs until cancelled stops even when a
cancellation is lost inside a Redis call (Python 3.11's asyncio.timeout and
redis-py can turn one into a timeout or swallow it), and no call waits on a reply
stream that does not exist yet."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from llm_broker.ingress.app import create_app
from llm_broker.ingress.replies import ReplyRouter, _Stream
from llm_broker.shared.config import parse_config
from llm_broker.shared.redisio import Commands
from tests.conftest import ConfigFactory, Procs, RedisServer, chat, mock_stats


async def test_the_reply_reader_stops_when_a_cancellation_is_swallowed(
    redis_up: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    swallowed = asyncio.Event()
    reading = asyncio.Event()
    create = _Stream.ensure

    async def swallowing(self: _Stream, reader: Commands, ttl_s: int) -> None:
        """A Redis call that loses the cancellation and returns as if it had run."""
        reading.set()
        try:
            await asyncio.sleep(1.0)  # stands for a Redis call that hangs
        except asyncio.CancelledError:
            swallowed.set()
        await create(self, reader, ttl_s)

    monkeypatch.setattr(_Stream, "ensure", swallowing)
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


async def test_a_sync_call_waits_for_the_reply_stream_instead_of_losing_its_reply(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers drop a reply to a reply stream that does not exist (yet): ingress
    creates it first thing, and until it has, a synchronous call is not admitted
    (a fast 503 that says so) instead of running and then waiting out its deadline."""
    _, mock_url = procs.mock()
    path = make_config(mock_url)
    config = parse_config(yaml.safe_load(path.read_text()), {})
    procs.worker(path)
    gate = asyncio.Event()
    create = _Stream.ensure

    async def gated(self: _Stream, reader: Commands, ttl_s: int) -> None:
        await gate.wait()  # the reply stream is not there yet
        await create(self, reader, ttl_s)

    monkeypatch.setattr(_Stream, "ensure", gated)
    app = create_app(config, "gated")
    async with TestClient(TestServer(app)) as client:
        body = chat("mock", "hello")
        started = time.monotonic()
        resp = await client.post(
            "/v1/chat/completions", json=body, headers={"X-Request-Timeout": "5"}
        )
        refused = await resp.json()
        assert resp.status == 503, refused
        assert "was not admitted" in refused["error"]["message"]
        assert time.monotonic() - started < 2 * config.redis.command_timeout_s + 1
        assert (await mock_stats(http, mock_url))["calls"] == 0  # it never ran
        gate.set()
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200, await resp.text()
