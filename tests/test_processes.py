"""``--processes N``: one ingress or worker pod using N cores (real processes on
loopback): connections spread over the processes, metrics add up across them, and
SIGTERM drains every one."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from llm_broker.dev import free_port
from tests.conftest import ConfigFactory, Procs, chat, mock_stats, wait_in_flight
from tests.test_observability import scrape, value


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _fresh() -> aiohttp.ClientSession:
    """A client opening a new connection per request (the kernel picks the process)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def test_two_processes_share_the_port_and_their_metrics_add_up(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, providers={"mock": {"max_concurrency": 1}})
    metrics_port = free_port()
    procs.worker(config, "--metrics-port", str(metrics_port), processes=2)
    _, url = procs.ingress(config, processes=2)
    async with _fresh() as client:
        pids = set()
        for _ in range(40):
            async with client.get(f"{url}/health") as resp:
                pids.add((await resp.json())["pid"])
        assert len(pids) == 2  # both ingress processes accept connections

        # One slot per worker process: two slow calls at once need both processes.
        slow = [
            client.post(f"{url}/v1/chat/completions", json=chat("mock-latency-1000"))
            for _ in range(2)
        ]
        for resp in await asyncio.gather(*slow):
            assert resp.status == 200
            resp.release()
        assert (await mock_stats(http, mock_url))["peak_in_flight"] == 2

        answers = await asyncio.gather(
            *(client.post(f"{url}/v1/chat/completions", json=chat()) for _ in range(30))
        )
        for resp in answers:
            assert resp.status == 200
            resp.release()
        ingress, _ = await scrape(client, f"{url}/metrics")  # whichever process answers
    chat_ok = {"endpoint": "/v1/chat/completions", "status": "200"}
    assert value(ingress, "llm_broker_requests_total", **chat_ok) == 32
    assert value(ingress, "llm_broker_requests_total", endpoint="/health") == 40
    worker, _ = await scrape(http, f"http://127.0.0.1:{metrics_port}/metrics")
    done = {"provider": "mock", "outcome": "completed"}
    assert value(worker, "llm_broker_worker_jobs_total", **done) == 32
    assert value(worker, "llm_broker_upstream_in_flight", provider="mock") == 0


@pytest.mark.chaos
async def test_sigterm_drains_every_process(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url)
    worker = procs.worker(config, processes=2)
    ingress, url = procs.ingress(config, processes=2)
    tree = {
        name: _children(child.pid) for name, child in (("ingress", ingress), ("worker", worker))
    }
    assert all(len(pids) == 2 for pids in tree.values()), tree
    async with _fresh() as client:
        calls = [
            asyncio.ensure_future(
                client.post(f"{url}/v1/chat/completions", json=chat("mock-latency-1500"))
            )
            for _ in range(6)
        ]
        await wait_in_flight(http, mock_url, 6)
        ingress.send_signal(signal.SIGTERM)
        worker.send_signal(signal.SIGTERM)
        for call in calls:
            async with await call as resp:
                assert resp.status == 200  # every process finished what it held
    assert ingress.proc.wait(15) == 0
    assert worker.proc.wait(15) == 0
    assert not any(_running(pid) for pid in tree["ingress"] + tree["worker"])
