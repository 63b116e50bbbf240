"""Redis Sentinel: the broker finds the primary through three sentinels and follows
a failover without restarting any process.

A primary, one replica (two with WAIT) and three sentinels (``redis-server
--sentinel``) on loopback, started by the test, with passwords read from files;
ingress, a worker and webhook delivery configured with ``redis.sentinel``, under
sync and async load; the primary SIGKILLed, then started again. With
``min_replicas_acked: 1`` no async job that got a 202 is lost; without it, a lost
job can only be one admitted in the last moment before the primary died
(docs/operations.md, "Redis failover").
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis

from llm_broker.dev import free_port
from llm_broker.shared.keys import Keys
from tests.conftest import Procs, Receiver, RedisServer, chat, start_sentinel, write_config
from tests.helpers import eventually, loopback_webhooks
from tests.test_chaos import DOCUMENTED_ERRORS, TENANT, Call, all_final, post

pytestmark = pytest.mark.chaos

SERVICE = "mymaster"
#: The data nodes' password and the sentinels' own, each read by the broker from a file.
NODE_PASSWORD = "node-secret-1"
SENTINEL_PASSWORD = "sentinel-secret-1"


class Sentinels:
    """Three ``redis-server --sentinel`` processes watching one primary."""

    def __init__(self, directory: Path, primary_port: int, count: int = 3) -> None:
        self.ports = [free_port() for _ in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for port in self.ports:
            settings = (
                f"requirepass {SENTINEL_PASSWORD}\n"
                f"sentinel sentinel-pass {SENTINEL_PASSWORD}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
                f"sentinel auth-pass {SERVICE} {NODE_PASSWORD}\n"
                f"sentinel down-after-milliseconds {SERVICE} 3000\n"
                f"sentinel failover-timeout {SERVICE} 4000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self.procs.append(start_sentinel(directory, port, settings))

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.ports]

    def primary_port(self) -> int | None:
        """The primary's port as the sentinels name it (None if none answers)."""
        for port in self.ports:
            try:
                with _sentinel(port) as client:
                    found = client.sentinel_get_master_addr_by_name(SERVICE)
            except redis.ConnectionError:
                continue
            if found:
                return int(found[1])
        return None

    def ready(self, replicas: int) -> bool:
        """Whether every sentinel sees the replicas and the other sentinels (a
        failover needs both)."""
        for port in self.ports:
            try:
                with _sentinel(port) as client:
                    state = client.sentinel_master(SERVICE)
            except (redis.ConnectionError, redis.ResponseError):
                return False
            if state["num-slaves"] < replicas or state["num-other-sentinels"] < len(self.ports) - 1:
                return False
        return True

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
        for proc in self.procs:
            proc.wait(10)


def _sentinel(port: int) -> redis.Redis:
    return redis.Redis(port=port, password=SENTINEL_PASSWORD, socket_timeout=0.5)


@dataclass
class Topology:
    primary: RedisServer
    replicas: list[RedisServer]
    sentinels: Sentinels


def start_topology(directory: Path, replicas: int) -> Topology:
    (directory / "primary").mkdir()
    auth = ("--requirepass", NODE_PASSWORD, "--masterauth", NODE_PASSWORD)
    primary = RedisServer(directory / "primary", auth)
    primary.start()
    topology = Topology(primary, [], Sentinels(directory, primary.port))
    for n in range(replicas):
        (directory / f"replica{n}").mkdir()
        replica = RedisServer(
            directory / f"replica{n}", (*auth, "--replicaof", "127.0.0.1", str(primary.port))
        )
        replica.start()
        topology.replicas.append(replica)
    deadline = time.monotonic() + 30
    while not topology.sentinels.ready(replicas):  # poll the sentinels' view, bounded
        assert time.monotonic() < deadline, "the sentinels did not see the replicas"
        time.sleep(0.1)
    return topology


def stop_topology(topology: Topology) -> None:
    topology.sentinels.stop()
    # Killed: a primary told to stop waits up to 10 s for lagging replicas, and
    # nothing they hold is needed any more.
    for server in (*topology.replicas, topology.primary):
        server.stop(signal.SIGKILL)


@dataclass
class Answer:
    at: float  # monotonic, when the answer came
    call: Call


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("acked", "replicas"),
    # WAIT for one replica wants two: after the failover one of them is the primary.
    [(1, 2), (0, 1)],
    ids=["min_replicas_acked=1", "no WAIT"],
)
async def test_the_broker_follows_a_sentinel_failover_without_a_restart(
    procs: Procs, tmp_path: Path, receiver: Receiver, acked: int, replicas: int
) -> None:
    topology = start_topology(tmp_path, replicas)
    try:
        await _failover(procs, topology, tmp_path, receiver, acked)
    finally:
        stop_topology(topology)


async def _failover(
    procs: Procs, topology: Topology, tmp_path: Path, receiver: Receiver, acked: int
) -> None:
    prefix = f"sentinel{acked}:"
    _, mock_url = procs.mock()
    config = write_config(
        tmp_path,
        # The URL's host is not used: the sentinels name the primary.
        "redis://127.0.0.1:1/0",
        prefix,
        mock_url,
        redis={
            "password_file": str(secret(tmp_path, "node-password", NODE_PASSWORD)),
            "sentinel": {
                "addresses": topology.sentinels.addresses,
                "service_name": SERVICE,
                "password_file": str(secret(tmp_path, "sentinel-password", SENTINEL_PASSWORD)),
            },
            "min_replicas_acked": acked,
        },
        **TENANT,
        worker={"lease_s": 3},
        webhooks=loopback_webhooks(tmp_path),
    )
    worker = procs.worker(config)
    relay = procs.webhooks(config)
    ingress, url = procs.ingress(config)
    pids = {worker.pid, relay.pid, ingress.pid}
    sync_answers: list[Answer] = []
    async_answers: list[Answer] = []
    stop = asyncio.Event()

    async with aiohttp.ClientSession() as http:

        async def sync_client(n: int) -> None:
            while not stop.is_set():
                call = await post(
                    http,
                    f"{url}/v1/chat/completions",
                    chat("mock-latency-100", f"sync {n}"),
                    20,
                    {"X-Request-Timeout": "15"},
                )
                sync_answers.append(Answer(time.monotonic(), call))

        async def async_client(n: int) -> None:
            while not stop.is_set():
                call = await post(
                    http, f"{url}/v1/jobs", {"request": chat("mock-latency-100", f"job {n}")}, 10
                )
                async_answers.append(Answer(time.monotonic(), call))

        clients = [asyncio.create_task(sync_client(n)) for n in range(4)]
        clients += [asyncio.create_task(async_client(n)) for n in range(4)]
        try:

            async def loaded() -> bool:
                return _accepted(async_answers, 0) >= 100 and _served(sync_answers, 0) >= 20

            await eventually(loaded, timeout=30, what="load before the failover")
            killed_at = time.monotonic()
            assert topology.primary.proc is not None
            topology.primary.proc.kill()
            topology.primary.proc.wait(10)
            topology.primary.proc = None

            async def promoted() -> int | None:
                port = await asyncio.to_thread(topology.sentinels.primary_port)
                return port if port in {r.port for r in topology.replicas} else None

            new_port = await eventually(promoted, timeout=30, what="a replica promoted")
            failed_over_at = time.monotonic()
            # The old primary comes back (as its pod would): the sentinels make it a
            # replica of the new one.
            topology.primary.start()

            async def serving() -> bool:
                return (
                    _accepted(async_answers, failed_over_at) >= 20
                    and _served(sync_answers, failed_over_at) >= 20
                )

            await eventually(serving, timeout=20, what="the broker to serve again")
            # Webhook delivery follows the new primary too. While the old primary rejoins
            # as a replica (a full sync), a WAIT can time out: that answer is a 503 that
            # names the job, which was admitted on the primary and still runs.
            for n in range(3):
                body = {
                    "request": chat("mock", f"hooked {n}"),
                    "webhook_url": f"{receiver.url}/after{n}",
                }
                call = await post(http, f"{url}/v1/jobs", body, 10)
                named = call.status == 503 and call.body["error"].get("job_id") == call.job_id
                assert call.status == 202 or (acked and named), call
            for n in range(3):
                await receiver.deliveries(f"after{n}", 1)
        finally:
            stop.set()
            await asyncio.gather(*clients)

    first_sync = min(a.at for a in sync_answers if a.at > failed_over_at and a.call.status == 200)
    first_async = min(a.at for a in async_answers if a.at > failed_over_at and a.call.status == 202)
    # No process was restarted.
    assert all(p.proc.poll() is None for p in (worker, relay, ingress))
    assert {worker.pid, relay.pid, ingress.pid} == pids
    # Every answer is a success or a documented error with a body.
    for a in sync_answers + async_answers:
        ok = a.call.status in (200, 202)
        assert ok or (a.call.status in DOCUMENTED_ERRORS and "error" in a.call.body), a
    accepted = [(a.at, str(a.call.body["id"])) for a in async_answers if a.call.status == 202]
    new_primary = aioredis.Redis(port=new_port, password=NODE_PASSWORD)
    try:
        found = await all_final_or_lost(new_primary, prefix, [j for _, j in accepted])
    finally:
        await new_primary.aclose()
    lost = [(at, j) for at, j in accepted if found[j] == "lost"]
    print(
        f"\nsentinel failover (min_replicas_acked={acked}): promoted "
        f"{failed_over_at - killed_at:.1f}s after the kill; first sync 200 "
        f"{first_sync - failed_over_at:.2f}s and first 202 {first_async - failed_over_at:.2f}s "
        f"after it; {len(accepted)} async jobs accepted, {len(lost)} lost; errors: "
        f"{_statuses(sync_answers)} sync, {_statuses(async_answers)} async"
    )
    assert first_sync - failed_over_at < 10
    assert first_async - failed_over_at < 10
    assert all(v == "completed" for v in found.values() if v != "lost"), found
    if acked:
        assert not lost, lost
    else:
        # Replication is asynchronous: only what the primary took in its last moment.
        assert all(killed_at - at < 1.0 for at, _ in lost), (killed_at, lost)


def secret(directory: Path, name: str, value: str) -> Path:
    path = directory / name
    path.write_text(value + "\n")
    return path


def _accepted(answers: list[Answer], since: float) -> int:
    return sum(1 for a in answers if a.at > since and a.call.status == 202)


def _served(answers: list[Answer], since: float) -> int:
    return sum(1 for a in answers if a.at > since and a.call.status == 200)


def _statuses(answers: list[Answer]) -> dict[int, int]:
    out: dict[int, int] = {}
    for a in answers:
        if a.call.status not in (200, 202):
            out[a.call.status] = out.get(a.call.status, 0) + 1
    return out


async def all_final_or_lost(
    client: aioredis.Redis, prefix: str, job_ids: list[str]
) -> dict[str, Any]:
    """job id -> its final status, or "lost" for a job whose record is gone."""
    keys = Keys(prefix)
    async with client.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(keys.job(job_id))
        exists = await pipe.execute()
    present = [j for j, e in zip(job_ids, exists, strict=True) if e]
    found = await all_final(client, prefix, present, timeout=60)
    return {j: found[j][0] if j in found else "lost" for j in job_ids}
