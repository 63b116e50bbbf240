"""Global limits held in Redis: the in-flight cap across worker processes, its
leases when a worker dies, token windows, and failing closed without Redis."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
from prometheus_client import CollectorRegistry

from llm_broker.dev import free_port
from llm_broker.shared.config import Config, Target, parse_config
from llm_broker.shared.errors import DeadlineExceeded
from llm_broker.shared.metrics import WorkerMetrics
from llm_broker.shared.redisio import Batcher, connect
from llm_broker.workers.limits import Limits
from tests.conftest import ConfigFactory, Procs, RedisServer, chat, mock_stats, wait_in_flight


async def post(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: float = 60
) -> int:
    async with http.post(
        f"{url}/v1/chat/completions", json=body, headers={"X-Request-Timeout": str(timeout)}
    ) as resp:
        await resp.read()
        return resp.status


@pytest.mark.scale
async def test_global_cap_holds_across_three_workers(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock = procs.mock()
    config = make_config(mock, providers={"mock": {"global_max_concurrency": 5}})
    for _ in range(3):
        procs.worker(config)
    _, url = procs.ingress(config)
    codes = await asyncio.gather(*(post(http, url, chat("mock-latency-200")) for _ in range(100)))
    assert codes == [200] * 100
    stats = await mock_stats(http, mock)
    assert stats["calls"] == 100
    assert stats["peak_in_flight"] == 5


@pytest.mark.chaos
async def test_leases_of_a_killed_worker_free_after_the_lease(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    lease_s = 3.0
    _, mock = procs.mock()
    config = make_config(
        mock,
        providers={"mock": {"global_max_concurrency": 2}},
        limits={"lease_s": lease_s},
        worker={"lease_s": 60},  # the killed worker's entries stay with it meanwhile
    )
    first = procs.worker(config)
    _, url = procs.ingress(config)
    slow = [
        asyncio.ensure_future(post(http, url, chat("mock-latency-60000"), timeout=20))
        for _ in range(2)
    ]
    try:
        await wait_in_flight(http, mock, 2)
        first.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        procs.worker(config)
        assert await post(http, url, chat("mock")) == 200
        waited = time.monotonic() - killed
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)
    # Leases are renewed every lease_s / 3: the dead worker's last ones held the
    # cap for at least two thirds of a lease, and for no longer than one.
    assert lease_s * 2 / 3 - 0.3 <= waited <= lease_s + 2.5


@pytest.fixture
async def limits_config(redis_up: RedisServer, prefix: str) -> Config:
    return parse_config(
        {
            "redis": {"url": redis_up.url, "key_prefix": prefix},
            "providers": {
                "p": {"type": "mock", "base_url": "http://127.0.0.1:9/v1", "tpm": 100},
            },
            "models": {
                "m": {
                    "deployments": [{"provider": "p", "model": "solo", "global_max_concurrency": 1}]
                },
                "r": {"deployments": [{"provider": "p", "model": "paced", "rpm": 1}]},
                "any*": {"provider": "p"},
            },
            "limits": {"window_s": 60, "lease_s": 5},
        }
    )


@pytest.fixture
async def batcher(limits_config: Config) -> AsyncIterator[Batcher]:
    client = connect(limits_config.redis)
    batcher = Batcher(client, timeout=1.0)
    yield batcher
    await batcher.close()
    await client.aclose(close_connection_pool=True)


def _limits(config: Config, batcher: Batcher) -> Limits:
    return Limits(config, "p", batcher, WorkerMetrics(CollectorRegistry()))


async def test_token_window_is_corrected_by_real_usage(
    limits_config: Config, batcher: Batcher
) -> None:
    limits = _limits(limits_config, batcher)
    target = Target("p", "any-model")
    first = await limits.acquire("j1", target, 60, time.time() + 5)
    assert first is not None
    with pytest.raises(DeadlineExceeded):
        await limits.acquire("j2", target, 60, time.time() + 0.3)  # 60 + 60 > 100
    await limits.release(first, 20)  # it used fewer tokens than estimated
    second = await limits.acquire("j3", target, 60, time.time() + 1)  # 20 + 60 <= 100
    assert second is not None
    await limits.release(second, 95)  # and this one more: 20 + 95
    with pytest.raises(DeadlineExceeded):
        await limits.acquire("j4", target, 1, time.time() + 0.3)


async def test_deployment_cap_on_top_of_the_provider(
    limits_config: Config, batcher: Batcher
) -> None:
    limits = _limits(limits_config, batcher)
    solo = Target("p", "solo")
    held = await limits.acquire("j1", solo, 1, time.time() + 5)
    assert held is not None
    with pytest.raises(DeadlineExceeded):
        await limits.acquire("j2", solo, 1, time.time() + 0.3)
    waiting = asyncio.ensure_future(limits.acquire("j3", solo, 1, time.time() + 5))
    await limits.release(held, 1)
    assert await waiting is not None


async def test_deployment_rate_counts_in_the_provider_window_too(
    limits_config: Config, batcher: Batcher
) -> None:
    """``paced`` allows one call per window; the provider's token window still applies."""
    limits = _limits(limits_config, batcher)
    paced = Target("p", "paced")
    first = await limits.acquire("j1", paced, 70, time.time() + 5)
    assert first is not None
    with pytest.raises(DeadlineExceeded):
        await limits.acquire("j2", paced, 1, time.time() + 0.3)  # its own rpm
    with pytest.raises(DeadlineExceeded):
        await limits.acquire("j3", Target("p", "other"), 40, time.time() + 0.3)  # 70 + 40 > 100
    assert await limits.acquire("j4", Target("p", "other"), 30, time.time() + 1) is not None


async def test_limits_fail_closed_without_redis(limits_config: Config) -> None:
    """With Redis unreachable no call is admitted: there is no per-process fallback."""
    port = free_port()
    config = parse_config(
        {
            **msgspec.to_builtins(limits_config),
            "redis": {"url": f"redis://127.0.0.1:{port}/0", "connect_timeout_s": 0.1},
        }
    )
    client = connect(config.redis)
    batcher = Batcher(client, timeout=0.2)
    try:
        limits = _limits(config, batcher)
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await limits.acquire("j1", Target("p", "any"), 1, time.time() + 1.0)
        assert time.monotonic() - started >= 0.8
    finally:
        await batcher.close()
        await client.aclose(close_connection_pool=True)
