"""Scenario E of bench/run.py: a noisy neighbour.

Two tenants share one provider whose workers run 8 calls at a time against a mock
answering after 100 ms (80 calls/s). Tenant ``quiet`` makes ``CALLS`` synchronous
calls one after another, first alone, then while tenant ``flood`` keeps about
``BACKLOG`` async jobs waiting for the provider's workers (topped up every 50 ms).
The report gives quiet's latency in both runs: what one tenant's bulk work costs
another tenant's interactive calls.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from llm_broker.shared.config import new_key
from llm_broker.shared.keys import Keys

CAPACITY = 8
MODEL = "mock-latency-100"
BACKLOG = 160
CALLS = 10
#: A quiet call waits at most this long (the broker's deadline is set to it too).
CALL_TIMEOUT_S = 30
TENANTS = ("quiet", "flood")


@dataclass
class NoisyResult:
    #: Seconds per synchronous call of the quiet tenant, alone and under the flood.
    alone: list[float]
    flooded: list[float]
    #: Async jobs the flood submitted, and the queue depth seen while quiet called.
    submitted: int
    depth: list[int]
    failed: int


def keys() -> dict[str, tuple[str, str]]:
    """Tenant -> (API key, its SHA-256) for this run."""
    return {tenant: new_key() for tenant in TENANTS}


def config_overrides(tenant_keys: dict[str, tuple[str, str]]) -> dict[str, Any]:
    return {
        "auth": {"keys": [{"tenant": t, "sha256": k[1]} for t, k in tenant_keys.items()]},
        "ingress": {"max_request_timeout_s": CALL_TIMEOUT_S},
        "max_concurrency": CAPACITY,
    }


async def _quiet_calls(
    session: aiohttp.ClientSession, url: str, key: str, failures: list[int]
) -> list[float]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "quiet"}]}
    headers = {"Authorization": f"Bearer {key}", "X-Request-Timeout": str(CALL_TIMEOUT_S)}
    took = []
    for _ in range(CALLS):
        started = time.monotonic()
        async with session.post(url, json=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                failures.append(resp.status)
        took.append(time.monotonic() - started)
    return took


async def _flood(
    session: aiohttp.ClientSession,
    jobs_url: str,
    key: str,
    redis: aioredis.Redis,
    keys: Keys,
    stop: asyncio.Event,
    filled: asyncio.Event,
    depth: list[int],
) -> int:
    """Keep about BACKLOG jobs waiting until ``stop`` (``filled`` is set once half of
    them wait); returns how many were submitted."""
    body = {"request": {"model": MODEL, "messages": [{"role": "user", "content": "flood"}]}}
    headers = {"Authorization": f"Bearer {key}"}
    submitted = 0

    async def one() -> None:
        async with session.post(jobs_url, json=body, headers=headers) as resp:
            await resp.read()

    while not stop.is_set():
        # Jobs waiting for a slot: in the scheduler's list, or in the stream beyond
        # what the workers hold.
        listed, streamed = await asyncio.gather(
            redis.zcard(keys.waiting_index("mock", "async")), redis.xlen(keys.queue("mock"))
        )
        waiting = int(listed) + max(0, int(streamed) - CAPACITY)
        depth.append(max(waiting, 0))
        if waiting >= BACKLOG // 2:
            filled.set()
        missing = BACKLOG - waiting
        if missing > 0:
            await asyncio.gather(*(one() for _ in range(missing)))
            submitted += missing
        try:
            await asyncio.wait_for(stop.wait(), 0.05)  # the top-up period
        except TimeoutError:
            pass
    return submitted


async def _run(
    broker_url: str, redis_url: str, keys: Keys, tenant_keys: dict[str, Any]
) -> NoisyResult:
    url = f"{broker_url}/v1/chat/completions"
    failures: list[int] = []
    redis = aioredis.Redis.from_url(redis_url)
    timeout = aiohttp.ClientTimeout(total=CALL_TIMEOUT_S + 10)
    connector = aiohttp.TCPConnector(limit=64)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            alone = await _quiet_calls(session, url, tenant_keys["quiet"][0], failures)
            stop, filled = asyncio.Event(), asyncio.Event()
            depth: list[int] = []
            flood = asyncio.ensure_future(
                _flood(
                    session,
                    f"{broker_url}/v1/jobs",
                    tenant_keys["flood"][0],
                    redis,
                    keys,
                    stop,
                    filled,
                    depth,
                )
            )
            filling = asyncio.ensure_future(filled.wait())
            await asyncio.wait([flood, filling], return_when=asyncio.FIRST_COMPLETED)
            filling.cancel()
            if flood.done():
                flood.result()  # the flood ended early: its error, if any, is the bench's
            flooded = await _quiet_calls(session, url, tenant_keys["quiet"][0], failures)
            stop.set()
            submitted = await flood
    finally:
        await redis.aclose()
    return NoisyResult(alone, flooded, submitted, depth, len(failures))


def run(broker_url: str, redis_url: str, keys: Keys, tenant_keys: dict[str, Any]) -> NoisyResult:
    return asyncio.run(_run(broker_url, redis_url, keys, tenant_keys))


def table(result: NoisyResult) -> list[str]:
    def row(name: str, took: list[float]) -> str:
        ms = sorted(t * 1000 for t in took)
        return (
            f"| {name} | {len(ms)} | {statistics.median(ms):,.0f} ms | {ms[-1]:,.0f} ms |"
            f" {statistics.median(ms) / 100:.1f} x |"
        )

    waiting = statistics.median(result.depth) if result.depth else 0
    return [
        f"E: noisy neighbour — provider capacity {CAPACITY}, mock `{MODEL}`; tenant `quiet`"
        f" makes {CALLS} synchronous calls one after another, alone, then while tenant"
        f" `flood` keeps about {BACKLOG} async jobs waiting (median {waiting:.0f};"
        f" {result.submitted} submitted). Non-200 answers to quiet: {result.failed}.",
        "",
        "| quiet's calls | n | p50 | max | p50 / mock latency |",
        "|---|--:|--:|--:|--:|",
        row("alone", result.alone),
        row("during the flood", result.flooded),
    ]
