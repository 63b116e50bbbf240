"""Redis cost of the scheduler with a backlog: N jobs waiting on one provider, from
as many tenants as asked (one job each) or from one, then dispatched as slots free.

Starts its own ``redis-server`` (free port, temp dir, no persistence) and talks to
it through the job store alone: admission with every slot taken, a worker's
registration filling 64 slots, then settles that each dispatch the next waiting
job. Prints the function time per call (``INFO commandstats``) and Redis memory
per waiting job.

Usage: ``python bench/backlog.py [--jobs 10000] [--tenants 10000]``
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis
import run as bench

from llm_broker.shared import messages as m
from llm_broker.shared.config import parse_config
from llm_broker.shared.redisio import Batcher
from llm_broker.shared.store import JobStore, Outcome

BODY = b'{"model":"mock","messages":[{"role":"user","content":"' + b"x" * 200 + b'"}]}'
SLOTS = 64


def make_job(tenant: str) -> m.Job:
    now = time.time()
    return m.Job(
        id=secrets.token_hex(16),
        tenant=tenant,
        provider="mock",
        model="mock",
        upstream_model="mock",
        deadline=now + 600,
        created=now,
        body=BODY,
        priority=m.ASYNC,
    )


async def function_time(client: aioredis.Redis) -> tuple[int, int]:
    """Microseconds spent in FCALL and its calls since the last reset."""
    stats = (await client.info("commandstats")).get("cmdstat_fcall", {})
    return int(stats.get("usec", 0)), int(stats.get("calls", 0))


async def run(jobs: int, tenants: int, url: str) -> None:
    client = aioredis.Redis.from_url(url)
    config = parse_config(
        {
            "redis": {"key_prefix": "b:"},
            "providers": {"mock": {"type": "mock", "base_url": "http://127.0.0.1:9/v1"}},
        }
    )
    batcher = Batcher(client, timeout=10)
    store = JobStore(config, batcher, client)
    await store.queues.ensure_group("mock")
    await store.enqueue(make_job("warm-up"), max_depth=10**7, ttl_s=600)
    before = (await client.info("memory"))["used_memory"]
    await client.config_resetstat()
    for start in range(0, jobs, 500):
        batch = range(start, min(jobs, start + 500))
        await asyncio.gather(
            *(store.enqueue(make_job(f"t{i % tenants}"), max_depth=10**7, ttl_s=600) for i in batch)
        )
    usec, calls = await function_time(client)
    memory = (await client.info("memory"))["used_memory"] - before
    print(
        f"admission with every slot taken ({jobs:,} jobs of {tenants:,} tenants waiting): "
        f"{usec / calls:.1f} µs per call; {memory / jobs:,.0f} bytes of Redis memory per "
        f"waiting job (a {len(m.job_encoder.encode(make_job('t')))}-byte packed job)"
    )
    await client.config_resetstat()
    moved = await store.register("mock", "worker", SLOTS, 600)
    usec, _ = await function_time(client)
    print(f"a worker's registration filling {moved} slots: {usec / max(moved, 1):.1f} µs per job")
    await client.config_resetstat()
    while deliveries := await store.queues.read(
        batcher, "mock", "worker", count=SLOTS, block_ms=100
    ):
        await asyncio.gather(
            *(store.settle(d, Outcome(status=m.COMPLETED), consumer="worker") for d in deliveries)
        )
    usec, calls = await function_time(client)
    print(f"settle, each dispatching the next waiting job: {usec / calls:.1f} µs per call")
    await batcher.close()
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_only = bench.Stack()
        try:
            url = bench.start_redis(redis_only, Path(tmp))
            asyncio.run(run(args.jobs, args.tenants, url))
        finally:
            redis_only.stop()


if __name__ == "__main__":
    main()
