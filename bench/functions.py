"""Redis time of a synchronous call's two functions, with nothing else on the machine's
Redis: what the job store's Lua costs, apart from the noise of a loaded stack.

In ``bench/run.py`` the Redis CPU per call moves by several microseconds from one run
to the next, more than most changes to the functions are worth. Here the job store
itself, on its own ``redis-server`` (free port, temp dir, no persistence), admits
``--jobs`` synchronous calls as the ingress does (a job with its account, as a
request without a key in Redis has: the day's usage counted), a worker's registration
gives them slots, and each is read and settled as the worker settles a completed call
(its answer, its usage, a reply to the waiting ingress). ``INFO commandstats`` gives
the microseconds ``enqueue`` and ``settle`` took inside Redis per job, and those of the
commands they call; the rest of a function's time is its Lua and the calls into
Redis from it. Each round starts from an empty Redis; the table gives the medians.

``--library FILE`` loads that text instead of the job store's library, under the job
store's names: an edited copy of ``LIBRARY.text`` (shared/store/scripts.py) to try a
change before making it, or an earlier version's to compare with. Its functions must
take the job store's arguments (an earlier version, without the batch forms, with
``--together 1``).

Calls leave ``--together`` at a time (6 by default: about what one write of the ingress
and of the worker carries at 64 connections), as one call of the function's batch form
(shared/redisio.py, ``Mergeable``); ``--together 1`` calls each function on its own.

Usage: ``python bench/functions.py [--jobs 5000] [--rounds 7] [--together 6]
[--library FILE]``
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
#: Calls that leave together by default: about what one write of the ingress's and of
#: the worker's carries at 64 connections in ``bench/run.py`` (scenario B).
TOGETHER = 6


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


async def one_round(
    url: str, jobs: int, together: int, library: str | None
) -> dict[str, dict[str, float]]:
    """Per function (``enqueue``, ``settle``): µs per job, in all and in its commands,
    and its calls per job."""
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

    async def admit() -> None:
        job = make_job()
        now = time.time()
        acct = accounts.account(
            principal, akeys, config.accounts, model="mock", price=None, est=est, now=now
        )
        await store.enqueue(job, max_depth=10**7, ttl_s=900, acct=acct)

    await client.config_resetstat()
    for start in range(0, jobs, together):
        await asyncio.gather(*(admit() for _ in range(min(together, jobs - start))))
    found["enqueue"] = await _stats(client, jobs)
    await client.config_resetstat()
    while deliveries := await store.queues.read(
        batcher, "mock", "worker", count=together, block_ms=100
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
    found["settle"] = await _stats(client, jobs)
    await batcher.close()
    await client.aclose()
    return found


async def _stats(client: aioredis.Redis, jobs: int) -> dict[str, float]:
    """µs per job since the last reset, in its function calls (several jobs' calls
    leave as one where they wait for the same write): in all, and in the commands
    they called; and function calls per job."""
    stats = await client.info("commandstats")
    calls = int(stats.get("cmdstat_fcall", {}).get("calls", 0))
    total = int(stats.get("cmdstat_fcall", {}).get("usec", 0))
    inner = sum(
        int(v["usec"])
        for k, v in stats.items()
        if k != "cmdstat_fcall" and not k.startswith(("cmdstat_info", "cmdstat_config"))
    )
    return {"calls": calls / jobs, "total": total / jobs, "commands": inner / jobs}


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
    parser.add_argument(
        "--together", type=int, default=TOGETHER, help="calls that leave in one write"
    )
    parser.add_argument("--library", type=Path, help="a library's text to load instead")
    args = parser.parse_args(argv)
    library = _as_current(args.library.read_text()) if args.library else None
    with tempfile.TemporaryDirectory() as tmp:
        redis_only = bench.Stack()
        try:
            url = bench.start_redis(redis_only, Path(tmp))
            rounds = [
                asyncio.run(one_round(url, args.jobs, args.together, library))
                for _ in range(args.rounds)
            ]
        finally:
            redis_only.stop()
    print(
        f"# A synchronous call's functions ({args.jobs:,} calls, {args.together} leaving "
        f"together, {args.rounds} rounds, medians)"
    )
    print()
    print(
        "| function | calls per job | µs per job | in its commands | in Lua and calls into Redis |"
    )
    print("|---|--:|--:|--:|--:|")
    for name in ("enqueue", "settle"):
        calls = statistics.median(r[name]["calls"] for r in rounds)
        total = statistics.median(r[name]["total"] for r in rounds)
        inner = statistics.median(r[name]["commands"] for r in rounds)
        print(f"| {name} | {calls:.2f} | {total:.1f} | {inner:.1f} | {total - inner:.1f} |")
    both = statistics.median(r["enqueue"]["total"] + r["settle"]["total"] for r in rounds)
    print(f"| both | {both:.1f} | | |")


if __name__ == "__main__":
    main()
