"""The reply reader: a loop that runs until cancelled stops even when a
cancellation is lost inside a Redis call (Python 3.11's asyncio.timeout and
redis-py can turn one into a timeout or swallow it), no call waits on a reply
stream that does not exist yet, and no reply is lost with a read's connection."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp.test_utils import TestClient, TestServer
from redis.exceptions import ConnectionError as RedisConnectionError

from llm_broker.ingress.app import create_app
from llm_broker.ingress.replies import ReplyRouter, _Stream
from llm_broker.shared.config import parse_config
from llm_broker.shared.redisio import Commands
from llm_broker.shared.store.records import Result, reply_fields
from tests.conftest import ConfigFactory, Procs, RedisServer, chat, mock_stats
from tests.helpers import eventually


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


@pytest.mark.parametrize("how", ["answer-lost", "stream-emptied"])
async def test_a_reply_that_a_lost_read_took_is_read_again(
    redis_up: RedisServer,
    rclient: aioredis.Redis,
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    """Reads of the reply stream leave before the answers to those before them,
    so the stream's group, not the reader, keeps where they are: a read that Redis
    answered but whose answer was lost with its connection has moved the group past
    its replies. The reader sets the group back to the last entry it read, and the
    call gets its reply. And when Redis loses the stream and its group while
    connected (emptied), the reader makes both again and goes on reading."""
    route = _Stream._route
    lost: list[bytes] = []

    def losing(self: _Stream, batches: object) -> None:
        if how == "answer-lost" and not lost and b"job-1" in repr(batches).encode():
            lost.append(b"job-1")  # Redis delivered it: the connection drops first
            raise RedisConnectionError("Connection closed by server.")
        route(self, batches)

    monkeypatch.setattr(_Stream, "_route", losing)
    config = parse_config({"redis": {"url": redis_up.url, "key_prefix": prefix}})
    router = ReplyRouter(config, "pod")
    reader = asyncio.get_running_loop().create_task(router.run())
    try:
        await router.stream_ready(10)
        if how == "stream-emptied":
            await rclient.delete(router.reply_to)
        waiter = router.register("job-1")
        fields = reply_fields("job-1", Result(b'{"answer": 1}'))
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))

        async def replied() -> bool:  # once the reader has made the stream again
            return bool(await rclient.xadd(router.reply_to, pairs, nomkstream=True))

        await eventually(replied, timeout=10, what="the reply stream")
        reply = await asyncio.wait_for(waiter.get(), 10)
    finally:
        reader.cancel()
        await asyncio.wait([reader])
    assert reply == Result(b'{"answer": 1}')
    assert lost == ([b"job-1"] if how == "answer-lost" else [])
