"""Redis's share of each kind of request: the numbers behind the capacity model.

Starts the benchmark's stack (bench/run.py: its own ``redis-server``, the mock
upstream, one worker, one ingress) and sends, one kind at a time, a bounded number of

* ``sync``: ``POST /v1/chat/completions`` (model ``mock``);
* ``stream``: the same with ``"stream": true`` and 20 chunks (``mock-chunks-20``);
* ``async``: ``POST /v1/jobs``, then ``GET /v1/jobs/{id}`` every 0.5 s until it is
  done (the polls per job are reported);
* ``batch``: the lines of OpenAI batches (``/v1/files`` + ``/v1/batches``), per line;

from 16 clients at once, and reads Redis's own counters before and after each kind:
``INFO commandstats`` (commands, those run inside functions included under their
own names), ``INFO stats`` (bytes in and out) and ``INFO cpu`` (Redis's CPU time).
The background (worker leases, the reply reader, batch drivers) is measured while
idle and subtracted. Prints a table per request, and what one Redis core sustains
at that cost.

Usage: ``python bench/capacity.py [--requests 4000] [--batch-lines 2000]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import redis as redis_sync
from run import Stack, start_stack

CLIENTS = 16
IDLE_S = 5.0
#: Redis commands that are the function calls themselves, not work inside them.
CALLS = {"fcall", "evalsha", "eval"}


@dataclass
class Counters:
    at: float
    commands: dict[str, int]
    cpu_s: float
    bytes_in: int
    bytes_out: int


def read(client: redis_sync.Redis) -> Counters:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    cpu: dict[str, Any] = client.info("cpu")  # type: ignore[assignment]
    net: dict[str, Any] = client.info("stats")  # type: ignore[assignment]
    return Counters(
        time.monotonic(),
        {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
        float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        int(net["total_net_input_bytes"]),
        int(net["total_net_output_bytes"]),
    )


@dataclass
class Cost:
    kind: str
    requests: int
    calls: float  # function calls (FCALL/EVALSHA) per request
    commands: float  # every other command per request, those inside functions included
    top: list[tuple[str, float]]
    cpu_us: float
    bytes_in: float
    bytes_out: float


@dataclass
class Rates:
    """The background's rates per second while nothing is sent."""

    commands: dict[str, float]
    cpu_s: float
    bytes_in: float
    bytes_out: float


def cost(kind: str, n: int, before: Counters, after: Counters, idle: Rates) -> Cost:
    """Per request: the difference less the idle rate over the same time."""
    span = after.at - before.at
    delta = {
        k: v - before.commands.get(k, 0) - idle.commands.get(k, 0.0) * span
        for k, v in after.commands.items()
        if k != "info"
    }
    calls = sum(v for k, v in delta.items() if k in CALLS) / n
    others = {k: v / n for k, v in delta.items() if k not in CALLS and v / n >= 0.05}
    return Cost(
        kind,
        n,
        calls,
        sum(others.values()),
        sorted(others.items(), key=lambda kv: -kv[1])[:8],
        (after.cpu_s - before.cpu_s - idle.cpu_s * span) / n * 1e6,
        (after.bytes_in - before.bytes_in - idle.bytes_in * span) / n,
        (after.bytes_out - before.bytes_out - idle.bytes_out * span) / n,
    )


def measure_idle(client: redis_sync.Redis) -> Rates:
    """The background's rates while nothing is sent, over ``IDLE_S``."""
    before = read(client)
    time.sleep(IDLE_S)  # the idle period measured
    after = read(client)
    span = after.at - before.at
    return Rates(
        {k: (v - before.commands.get(k, 0)) / span for k, v in after.commands.items()},
        (after.cpu_s - before.cpu_s) / span,
        (after.bytes_in - before.bytes_in) / span,
        (after.bytes_out - before.bytes_out) / span,
    )


async def in_parallel(n: int, one: Callable[[aiohttp.ClientSession, int], Awaitable[None]]) -> None:
    left = iter(range(n))

    async def client(http: aiohttp.ClientSession) -> None:
        for i in left:
            await one(http, i)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(CLIENTS)))


def chat(model: str, text: str, **more: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}], **more}


async def expect(resp: aiohttp.ClientResponse, status: int) -> bytes:
    body = await resp.read()
    if resp.status != status:
        raise SystemExit(f"{resp.method} {resp.url} answered {resp.status}: {body[:300]!r}")
    return body


def sync_kind(url: str, n: int) -> None:
    async def one(http: aiohttp.ClientSession, i: int) -> None:
        async with http.post(f"{url}/v1/chat/completions", json=chat("mock", f"hi {i}")) as r:
            await expect(r, 200)

    asyncio.run(in_parallel(n, one))


def stream_kind(url: str, n: int) -> None:
    async def one(http: aiohttp.ClientSession, i: int) -> None:
        body = chat("mock-chunks-20", f"hi {i}", stream=True)
        async with http.post(f"{url}/v1/chat/completions", json=body) as r:
            raw = await expect(r, 200)
            if b"[DONE]" not in raw:
                raise SystemExit("a stream ended without [DONE]")

    asyncio.run(in_parallel(n, one))


POLLS = [0]


def async_kind(url: str, n: int) -> None:
    async def one(http: aiohttp.ClientSession, i: int) -> None:
        body = {"request": chat("mock", f"job {i}")}
        async with http.post(f"{url}/v1/jobs", json=body) as r:
            job_id = json.loads(await expect(r, 202))["id"]
        while True:  # bounded by the job's deadline: it ends
            POLLS[0] += 1
            async with http.get(f"{url}/v1/jobs/{job_id}") as r:
                if json.loads(await expect(r, 200))["status"] == "completed":
                    return
            await asyncio.sleep(0.5)  # the poll interval a client would use

    asyncio.run(in_parallel(n, one))


def batch_kind(url: str, lines: int) -> None:
    per_batch = 500

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            ids = []
            for start in range(0, lines, per_batch):
                text = "".join(
                    json.dumps(
                        {
                            "custom_id": f"line-{i}",
                            "method": "POST",
                            "url": "/v1/chat/completions",
                            "body": chat("mock", f"line {i}"),
                        }
                    )
                    + "\n"
                    for i in range(start, min(lines, start + per_batch))
                )
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", text.encode(), filename="in.jsonl")
                async with http.post(f"{url}/v1/files", data=form) as r:
                    file_id = json.loads(await expect(r, 200))["id"]
                body = {
                    "input_file_id": file_id,
                    "endpoint": "/v1/chat/completions",
                    "completion_window": "24h",
                }
                async with http.post(f"{url}/v1/batches", json=body) as r:
                    ids.append(json.loads(await expect(r, 200))["id"])
            for batch_id in ids:
                while True:  # bounded: a batch ends within its window
                    async with http.get(f"{url}/v1/batches/{batch_id}") as r:
                        status = json.loads(await expect(r, 200))["status"]
                    if status in ("completed", "failed", "expired", "cancelled"):
                        if status != "completed":
                            raise SystemExit(f"batch {batch_id} ended {status}")
                        break
                    await asyncio.sleep(0.5)  # poll interval

    asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--batch-lines", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmb-capacity-") as tmp:
        overrides = {"files": {"dir": str(Path(tmp) / "files")}}
        stack: Stack = start_stack(Path(tmp), overrides)
        try:
            client = redis_sync.Redis.from_url(stack.redis_url)
            url = stack.broker_url
            sync_kind(url, 200)  # warm-up: connections, the function library
            idle = measure_idle(client)
            costs = []
            kinds: list[tuple[str, Callable[[str, int], None], int]] = [
                ("sync", sync_kind, args.requests),
                ("stream, 20 chunks", stream_kind, args.requests // 4),
                ("async", async_kind, args.requests // 2),
                ("batch line", batch_kind, args.batch_lines),
            ]
            for name, run_kind, n in kinds:
                before = read(client)
                started = time.monotonic()
                run_kind(url, n)
                wall = time.monotonic() - started
                costs.append(cost(name, n, before, read(client), idle))
                print(f"{name}: {n} in {wall:.1f}s", file=sys.stderr)
            stack.check_alive()
        finally:
            stack.stop()
    polls = POLLS[0] / (args.requests // 2)
    costs[2].kind = f"async (submit, {polls:.2f} polls)"
    print("| request | function calls | other commands | Redis CPU µs | bytes in | bytes out |")
    print("|---|--:|--:|--:|--:|--:|")
    for c in costs:
        print(
            f"| {c.kind} | {c.calls:.2f} | {c.commands:.1f} | {c.cpu_us:.0f} | "
            f"{c.bytes_in:,.0f} | {c.bytes_out:,.0f} |"
        )
    print()
    for c in costs:
        top = ", ".join(f"{k} {v:.2f}" for k, v in c.top)
        print(f"- {c.kind}: {top}; one Redis core at this cost: {1e6 / c.cpu_us:,.0f}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
