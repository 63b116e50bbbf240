"""``llm-broker dev``: one command runs the whole system and stops cleanly."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llm_broker.dev import free_port
from llm_broker.procs import Child, python_cmd
from tests.conftest import chat
from tests.helpers import eventually


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, whatever its process group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(address)
    return found


async def _run_dev(env: dict[str, str], http: aiohttp.ClientSession, concurrent: int = 0) -> str:
    port = free_port()
    dev = Child("dev", python_cmd("dev", "--port", str(port)), env)
    try:
        dev.wait_for(r"Ctrl-C stops everything", 60)
        # Without --host, the gateway (open: no keys) listens on loopback only.
        assert _listening(port) == {"0100007F"}
        url = f"http://127.0.0.1:{port}"
        async with http.post(f"{url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["choices"][0]["message"]["content"]
        async with http.post(f"{url}/v1/jobs", json={"request": chat()}) as resp:
            assert resp.status == 202
            job_id = (await resp.json())["id"]

        async def completed() -> dict[str, Any] | None:
            async with http.get(f"{url}/v1/jobs/{job_id}") as resp:
                job: dict[str, Any] = await resp.json()
            return job if job["status"] == "completed" else None

        job = await eventually(completed, what="the async job to complete")
        assert job["result"]["choices"][0]["message"] == body["choices"][0]["message"]
        if concurrent:
            await _burst(url, concurrent)
        spawned = _descendants(dev.pid)
        assert len(spawned) >= 3  # mock, worker, ingress (and redis-server when installed)
        dev.send_signal(signal.SIGINT)
        assert dev.proc.wait(30) == 0
        left = [pid for pid in spawned if _alive(pid)]
        assert left == [], f"processes left behind: {left}"
        output = dev.output()
        assert "curl http://127.0.0.1" in output
        assert "llm-broker dev stopped" in output
        return output
    except BaseException:
        print(dev.output())  # shown by pytest for a failed test
        raise
    finally:
        dev.stop()


async def _burst(url: str, n: int) -> None:
    """``n`` requests at once, each held 500 ms by the upstream: none is refused."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            async with session.post(
                f"{url}/v1/chat/completions", json=chat("mock-latency-500", f"request {i}")
            ) as resp:
                await resp.read()
                return resp.status

        statuses = await asyncio.gather(*(one(i) for i in range(n)))
    assert statuses == [200] * n


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "LLM_BROKER_CONFIG")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


async def test_dev_runs_everything_and_stops_cleanly_on_sigint(
    http: aiohttp.ClientSession,
) -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    output = await _run_dev(_env(), http, concurrent=300)
    assert "redis-server on port" in output
    assert "webhooks: delivered by an arq worker (signing secret in" in output


async def test_dev_without_redis_server_uses_the_embedded_one(
    http: aiohttp.ClientSession,
    tmp_path: Path,
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    output = await _run_dev(_env(PATH=str(bin_dir)), http)
    assert "embedded Redis" in output
