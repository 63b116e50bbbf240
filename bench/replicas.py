"""What ``redis.min_replicas_acked`` costs an async admission.

Starts a Redis primary and one replica (``--replicaof``) on 127.0.0.1, the mock
upstream, one worker and one ingress, and times ``POST /v1/jobs`` (202) from one
client in a row and from 16 at once, with ``min_replicas_acked`` 0 (no WAIT) and 1
(WAIT for the replica on the admission's connection), each on a stack of its own,
alternating. Reports p50/p99 of the admission and req/s, and the difference.

Usage: ``python bench/replicas.py [--requests 2000] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from run import HOST, Stack, broker_config, child_env, start_redis

from llm_broker.dev import free_port
from llm_broker.procs import Child, python_cmd

BODY = {"request": {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}}


def start(tmp: Path, acked: int) -> Stack:
    """A stack whose Redis primary has one replica."""
    stack = Stack()
    try:
        redis_url = stack.redis_url = start_redis(stack, tmp)
        primary_port = redis_url.rsplit(":", 1)[1].split("/")[0]
        port = free_port()
        argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", ""]
        argv += ["--appendonly", "no", "--replicaof", HOST, primary_port, "--dir", str(tmp)]
        stack.children["replica"] = Child("replica", argv)
        stack.children["replica"].wait_for(r"MASTER <-> REPLICA sync: Finished", 15)
        env = child_env(redis_url)
        mock = Child("mock", python_cmd("mock-upstream", "--host", HOST, "--port", "0"), env)
        stack.children["mock"] = mock
        found = mock.wait_for(r"listening on http://[\d.]+:(\d+)", 30)
        stack.mock_url = f"http://{HOST}:{found.group(1)}"
        config = broker_config(redis_url, stack.mock_url)
        config["redis"]["min_replicas_acked"] = acked
        cfg = tmp / f"replicas-{acked}.yaml"
        cfg.write_text(json.dumps(config))
        worker = Child("worker", python_cmd("worker", "--all", "--config", str(cfg)), env)
        stack.children["worker"] = worker
        argv = python_cmd("ingress", "--config", str(cfg), "--host", HOST, "--port", "0")
        stack.children["ingress"] = Child("ingress", argv, env)
        worker.wait_for(r"worker ready", 30)
        found = stack.children["ingress"].wait_for(r"listening on http://[\d.]+:(\d+)", 30)
        stack.broker_url = f"http://{HOST}:{found.group(1)}"
    except BaseException:
        stop(stack)
        raise
    return stack


def stop(stack: Stack) -> None:
    stack.stop()
    replica = stack.children.get("replica")
    if replica is not None:
        replica.stop(timeout=10)


async def admissions(url: str, requests: int, concurrency: int) -> tuple[list[float], float]:
    """Seconds of each admission, and the run's wall time."""
    times: list[float] = []
    left = requests

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            async with http.post(f"{url}/v1/jobs", json=BODY) as resp:
                await resp.read()
                if resp.status != 202:
                    raise SystemExit(f"POST /v1/jobs answered {resp.status}")
            times.append(time.perf_counter() - started)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(8)))  # warm-up: 8 connections
        times.clear()
        left = requests
        began = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        return times, time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    for _ in range(args.rounds):
        for acked in (0, 1):
            with tempfile.TemporaryDirectory(prefix="llmb-replicas-") as tmp:
                stack = start(Path(tmp), acked)
                try:
                    for concurrency in (1, 16):
                        times, wall = asyncio.run(
                            admissions(stack.broker_url, args.requests, concurrency)
                        )
                        times.sort()
                        p50 = statistics.median(times) * 1000
                        p99 = times[int(len(times) * 0.99)] * 1000
                        results.setdefault((acked, concurrency), []).append(
                            (p50, p99, len(times) / wall)
                        )
                finally:
                    stop(stack)
    print("| min_replicas_acked | clients | p50 ms | p99 ms | admissions/s |")
    print("|---|--:|--:|--:|--:|")
    for (acked, concurrency), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        rate = statistics.median(r[2] for r in runs)
        print(f"| {acked} | {concurrency} | {p50:.2f} | {p99:.2f} | {rate:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
