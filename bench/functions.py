"""Redis time of a synchronous call's two functions, with nothing else on the machine's
Redis: what the job store's Lua costs, apart from the noise of a loaded stack.

In ``bench/run.py`` the Redis CPU per call moves by several microseconds from one run
to the next, more than most changes to the functions are worth. Here the job store
itself, on its own ``redis-server`` (free port, temp dir, no persistence), admits
``--jobs`` synchronous calls as the ingress does (a job with its account, as a
request without a key in Redis has: the day's usage counted), a worker's registration
gives them slots, and each is read and settled as the worker settles a completed call
(its answer, its usage, a reply to the waiting ingress). ``INFO commandstats`` gives
the microseconds each ``enqueue`` and ``settle`` took inside Redis, and those of the
commands they call; the rest of a function's time is its Lua and the calls into
Redis from it. Each round starts from an empty Redis; the table gives the medians.

``--library FILE`` loads that text instead of the job store's library, under the job
store's names: an edited copy of ``LIBRARY.text`` (shared/store/scripts.py) to try a
change before making it, or an earlier version's to compare with. Its functions must
take the job store's arguments.

Usage: ``python bench/functions.py [--jobs 5000] [--rounds 7] [--library FILE]``
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis.asyncio as aioredis
import run as bench

from llm_broker.shared import accounts
from llm_broker.shared import messages as m
from llm_broker.shared.config import parse_config
from llm_broker.shared.redisio import Batcher
from llm_broker.shared.store import JobStore, Outcome
from llm_broker.shared.store.records import Result, Usage
from llm_broker.shared.store.scripts import LIBRARY

BODY = b'{"model":"mock","messages":[{"role":"user","content":"Hello there"}],"max_tokens":64}'
ANSWER = (
    b'{"id":"chatcmpl-x","object":"chat.completion","created":1796205033,"model":"mock",'
    b'"choices":[{"index":0,"message":{"role":"assistant","content":"lazy dog while bright '
    b'stars shine above quiet"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2,'
    b'"completion_tokens":8,"total_tokens":10}}'
)
REPLIES = "b:r:bench"
#: Calls in flight at once, as a busy ingress and worker have them.
CONCURRENCY = 64


def make_job() -> m.Job:
    now = time.time()
    return m.Job(
        id=secrets.token_hex(16),
        tenant="default",
        provider="mock",
        model="mock",
        route="mock*",
        upstream_model="mock",
        reply_to=REPLIES,
        deadline=now + 600,
        created=now,
        body=BODY,
    )


async def one_round(url: str, jobs: int, library: str | None) -> dict[str, dict[str, float]]:
    """Per function (``enqueue``, ``settle``): µs per call, in all and in its commands."""
    client = aioredis.Redis.from_url(url)
    await client.flushall()
    config = parse_config(
        {
            "redis": {"key_prefix": "b:"},
            "providers": {"mock": {"type": "mock", "base_url": "http://127.0.0.1:9/v1"}},
        }
    )
    if library is not None:
        await client.function_load(library, replace=True)
    batcher = Batcher(client, timeout=10)
    store = JobStore(config, batcher, client)
    akeys = accounts.AccountKeys("b:")
    principal = accounts.Principal(tenant="default")
    est = accounts.estimate(None, len(BODY), 64, 100_000)
    await store.queues.ensure_group("mock")
    await client.xadd(REPLIES, {"i": "start"})  # (the ingress's stream exists)
    await store.register("mock", "worker", jobs + 1, 600)
    found: dict[str, dict[str, float]] = {}
    gate = asyncio.Semaphore(CONCURRENCY)

    async def admit() -> None:
        async with gate:
            job = make_job()
            now = time.time()
            acct = accounts.account(
                principal, akeys, config.accounts, model="mock", price=None, est=est, now=now
            )
            await store.enqueue(job, max_depth=10**7, ttl_s=900, acct=acct)

    await client.config_resetstat()
    await asyncio.gather(*(admit() for _ in range(jobs)))
    found["enqueue"] = await _stats(client)
    await client.config_resetstat()
    while deliveries := await store.queues.read(
        batcher, "mock", "worker", count=CONCURRENCY, block_ms=100
    ):
        usage = Usage(2, 8)
        reply = Result(None, usage)
        await asyncio.gather(
            *(
                store.settle(
                    d,
                    Outcome(status=m.COMPLETED, payload=ANSWER, reply=reply, usage=usage),
                    consumer="worker",
                )
                for d in deliveries
            )
        )
    found["settle"] = await _stats(client)
    await batcher.close()
    await client.aclose()
    return found


async def _stats(client: aioredis.Redis) -> dict[str, float]:
    """µs per FCALL since the last reset: in all, and in the commands it called."""
    stats = await client.info("commandstats")
    calls = max(1, int(stats.get("cmdstat_fcall", {}).get("calls", 0)))
    total = int(stats.get("cmdstat_fcall", {}).get("usec", 0))
    inner = sum(
        int(v["usec"])
        for k, v in stats.items()
        if k != "cmdstat_fcall" and not k.startswith(("cmdstat_info", "cmdstat_config"))
    )
    return {"calls": calls, "total": total / calls, "commands": inner / calls}


def _as_current(text: str) -> str:
    """A library's text under the job store's names (its library's and its
    functions'), whatever version it was made from: it replaces the job store's."""
    text = re.sub(r"#!lua name=\S+", f"#!lua name={LIBRARY.name}", text, count=1)
    return re.sub(
        r"register_function\('([a-z_]+?)_[0-9a-f]{12}'",
        lambda found: f"register_function('{LIBRARY[found[1]].name}'",
        text,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--library", type=Path, help="a library's text to load instead")
    args = parser.parse_args(argv)
    library = _as_current(args.library.read_text()) if args.library else None
    with tempfile.TemporaryDirectory() as tmp:
        redis_only = bench.Stack()
        try:
            url = bench.start_redis(redis_only, Path(tmp))
            rounds = [asyncio.run(one_round(url, args.jobs, library)) for _ in range(args.rounds)]
        finally:
            redis_only.stop()
    print(f"# A synchronous call's functions ({args.jobs:,} calls, {args.rounds} rounds, medians)")
    print()
    print("| function | µs per call | in its commands | in Lua and calls into Redis |")
    print("|---|--:|--:|--:|")
    for name in ("enqueue", "settle"):
        total = statistics.median(r[name]["total"] for r in rounds)
        inner = statistics.median(r[name]["commands"] for r in rounds)
        print(f"| {name} | {total:.1f} | {inner:.1f} | {total - inner:.1f} |")
    both = statistics.median(r["enqueue"]["total"] + r["settle"]["total"] for r in rounds)
    print(f"| both | {both:.1f} | | |")


if __name__ == "__main__":
    main()
