"""End-to-end benchmark of llm-broker against its mock upstream.

What it measures: the cost the broker (aiohttp ingress -> Redis Streams -> worker ->
upstream) adds on top of an upstream call. Scenarios A-D run twice with ``wrk -t1
--latency`` and the same request body: once straight against the mock upstream (the
baseline) and once through the broker. It reports req/s, p50/p99 latency and errors
(non-2xx responses, socket errors, incomplete streams) for both, the added p50 latency
and the broker/mock throughput ratio, the peak number of calls the mock saw in flight,
peak RSS (``VmHWM``) of every process and the CPU each process used during each run.

Scenarios (B and D run 10 s, C 30 s; each broker run follows a 2 s warm-up):

* A - 1 connection, model ``mock`` (answers at once): the added latency per request
  (10 s; 5 s with ``--quick``, which also runs C for 15 s and F for 8 s).
* B - 64 connections, model ``mock``: throughput of the whole path.
* C - 1000 connections, model ``mock-latency-1000`` (1 s upstream): concurrency;
  all 1000 calls must be in flight at the upstream at once, in bounded memory.
* D - 16 connections, model ``mock-chunks-20`` with ``"stream": true``: SSE streams/s.
* E - a noisy neighbour (bench/noisy.py): one tenant's synchronous calls, alone and
  while another tenant keeps a backlog of async jobs on the same provider; runs on a
  stack of its own (two API keys, 8 calls in flight).
* F - overload: 5000 connections, model ``mock-latency-1000``, more than two cores
  can serve; the broker must shed what it cannot take with 503 ``overloaded`` (never
  another 503) and keep its throughput. Four rows, each on a stack of its own whose
  provider allows 16384 calls in flight and 1,000,000 queued jobs, each measured for
  30 s (12 s with ``--quick``) after a 3 s warm-up at the same concurrency:
  (1) c=5000, one ingress and one worker process; (2) c=8000, the same; (3) c=5000
  with ``--processes 2`` for ingress and worker; (4) c=5000 with a CPU hog
  (``python -c "while True: pass"``) running beside the stack. Only the broker is
  measured (no mock baseline). Row 2 is compared with row 1 on the steady rate of
  completed calls (the mock's count from a third of the run to its last second).
  It reports responses/s, 2xx, non-2xx answers by
  status (with a sample body of each), socket errors, the CPU and peak RSS of each
  role (summed over its processes) and the mock's peak in-flight calls.

Scenarios A-D share one stack: its own ``redis-server`` (free port, temp dir, no
persistence), one mock upstream, ONE worker process and ONE ingress process, all on
127.0.0.1, stopped at the end; E and each row of F start a stack of their own. The
run reports; it does not gate: the exit status is 0 even when a target is missed, 1
when something broke (a process died, wrk failed, every request errored), 2 when a
prerequisite is missing.

Usage: ``python bench/run.py [--quick] [--only C] [--out FILE.md]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp
import noisy
import redis as redis_sync

from llm_broker.dev import free_port
from llm_broker.procs import Child, die_with_parent, python_cmd
from llm_broker.shared.keys import Keys

BENCH_DIR = Path(__file__).resolve().parent
LUA_SCRIPT = BENCH_DIR / "chat.lua"
CHAT_PATH = "/v1/chat/completions"
HOST = "127.0.0.1"
MB = 1024.0  # kB per MB (VmHWM / VmRSS are in kB)
PROCESS_NAMES = ("ingress", "worker", "mock", "redis")
WARMUP_S = 2  # wrk run against the broker before each measured broker run

# The targets the run reports PASS/FAIL for.
TARGET_A_ADDED_P50_MS = 2.0
TARGET_B_RPS = 1500.0
TARGET_C_RPS = 900.0
TARGET_C_P99_MS = 1200.0
TARGET_C_IN_FLIGHT = 1000
TARGET_C_RSS_MB = 250.0
TARGET_D_RPS = 400.0
#: F 8000's req/s divided by F 5000's at least this: throughput holds past the peak.
TARGET_F_RATIO = 0.9

# Scenario F: overload.
F_MODEL = "mock-latency-1000"
F_WARMUP_S = 3
F_TIMEOUT_S = 10
F_MAX_CONCURRENCY = 16384
F_MAX_QUEUE_DEPTH = 1_000_000
#: The roles whose CPU and peak RSS F reports, each summed over its processes.
F_ROLES = ("ingress", "worker", "redis", "mock")


class BenchBroken(Exception):
    """Something broke (not merely slow): the run cannot be trusted."""


class MissingPrerequisite(Exception):
    """A tool the benchmark needs is not installed."""


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    model: str
    connections: int
    duration_s: int
    stream: bool = False
    timeout_s: int = 5


def scenarios(quick: bool) -> list[Scenario]:
    """The four scenarios; ``quick`` shortens A and C.

    C runs 30 s: with 1 s calls, req/s counts whole 1 s rounds, so a run of d seconds
    tops out near 1000 * (d - 1) / d req/s (933 at 15 s, 967 at 30 s), and the first
    round, where wrk opens all 1000 connections at once, weighs less on p99.
    """
    return [
        Scenario("A", "latency, c=1, mock 0 ms", "mock", 1, 5 if quick else 10),
        Scenario("B", "throughput, c=64, mock 0 ms", "mock", 64, 10),
        Scenario(
            "C",
            "concurrency, c=1000, mock 1 s",
            "mock-latency-1000",
            1000,
            15 if quick else 30,
            timeout_s=10,
        ),
        Scenario("D", "streaming, c=16, 20 chunks", "mock-chunks-20", 16, 10, stream=True),
    ]


# --------------------------------------------------------------------------- wrk output

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_TIME = r"([0-9.]+)(us|ms|s|m|h)"
_RE_PERCENTILE = re.compile(rf"^\s*([0-9.]+)%\s+{_TIME}\s*$", re.MULTILINE)
_RE_REQUESTS = re.compile(rf"(\d+) requests in {_TIME}")
_RE_RPS = re.compile(r"Requests/sec:\s+([0-9.]+)")
_RE_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_RE_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_RE_LUA = re.compile(r"BENCH-LUA non2xx=(\d+) bad_stream=(\d+)(?: p50_us=(\d+) p99_us=(\d+))?")
_RE_STATUS = re.compile(r"^BENCH-STATUS\b(.*)$", re.MULTILINE)
_RE_STATUS_COUNT = re.compile(r"(\S+)=(\d+)")
_RE_SAMPLE = re.compile(r"^BENCH-SAMPLE (\S+) ?(.*)$", re.MULTILINE)


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    non2xx: int = 0
    bad_streams: int = 0
    socket_errors: Mapping[str, int] = field(default_factory=dict)
    #: Non-2xx responses by status, from chat.lua: "429", "503", ... and
    #: "503-overloaded" (a 503 whose body says the gateway is overloaded).
    statuses: Mapping[str, int] = field(default_factory=dict)
    #: The first body seen of each of those (at most 300 bytes).
    samples: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        """Good responses: 2xx (and, streaming, ended with ``data: [DONE]``)."""
        return max(0, self.requests - self.non2xx - self.bad_streams)

    @property
    def errors(self) -> int:
        return self.non2xx + self.bad_streams + sum(self.socket_errors.values())

    def status_detail(self) -> str:
        """Non-2xx responses by status, e.g. ``503 overloaded 1,204, 429 3``, or "0"."""
        parts = [f"{k.replace('-', ' ')} {v:,}" for k, v in sorted(self.statuses.items()) if v]
        return ", ".join(parts) if parts else f"{self.non2xx:,}"

    def socket_detail(self) -> str:
        """Socket errors by kind, e.g. ``read 12, timeout 40``, or "0"."""
        parts = [f"{k} {v:,}" for k, v in self.socket_errors.items() if v]
        return ", ".join(parts) if parts else "0"

    def error_detail(self) -> str:
        parts = [f"{k} {v}" for k, v in self.socket_errors.items() if v]
        if self.non2xx:
            by_status = f": {self.status_detail()}" if self.statuses else ""
            parts.insert(0, f"non-2xx {self.non2xx}{by_status}")
        if self.bad_streams:
            parts.append(f"bad stream {self.bad_streams}")
        return f"{self.errors} ({', '.join(parts)})" if parts else "0"


def to_ms(value: str, unit: str) -> float:
    """A wrk duration such as ``383.00us`` / ``1.02s`` in milliseconds."""
    return float(value) * _UNIT_MS[unit]


def parse_wrk(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output (plus the lines printed by ``chat.lua``'s done())."""
    found = _RE_REQUESTS.search(text)
    rps = _RE_RPS.search(text)
    if found is None or rps is None:
        raise BenchBroken(f"cannot parse wrk output:\n{text}")
    requests = int(found.group(1))
    percentiles = {float(p): to_ms(v, u) for p, v, u in _RE_PERCENTILE.findall(text)}
    lua = _RE_LUA.search(text)
    if lua and lua.group(3):  # exact values from chat.lua win over wrk's rounded text
        percentiles.update({50.0: int(lua.group(3)) / 1000.0, 99.0: int(lua.group(4)) / 1000.0})
    socket = _RE_SOCKET.search(text)
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, socket.groups()), strict=True))
        if socket
        else {}
    )
    non2xx = _RE_NON2XX.search(text)
    status = _RE_STATUS.search(text)
    statuses = {k: int(v) for k, v in _RE_STATUS_COUNT.findall(status.group(1))} if status else {}
    return WrkResult(
        requests=requests,
        duration_s=to_ms(found.group(2), found.group(3)) / 1000.0,
        rps=float(rps.group(1)),
        p50_ms=percentiles.get(50.0) if requests else None,
        p99_ms=percentiles.get(99.0) if requests else None,
        non2xx=max(int(non2xx.group(1)) if non2xx else 0, int(lua.group(1)) if lua else 0),
        bad_streams=int(lua.group(2)) if lua else 0,
        socket_errors=socket_errors,
        statuses=statuses,
        samples=dict(_RE_SAMPLE.findall(text)),
    )


def wrk_argv(url: str, sc: Scenario, duration_s: int) -> list[str]:
    argv = ["wrk", "-t1", f"-c{sc.connections}", f"-d{duration_s}s", "--latency"]
    argv += ["--timeout", f"{sc.timeout_s}s", "-s", str(LUA_SCRIPT), url, "--", sc.model]
    return [*argv, "stream"] if sc.stream else argv


def run_wrk(url: str, sc: Scenario, duration_s: int, strict: bool = True) -> WrkResult:
    """Run wrk once; raise :class:`BenchBroken` when it fails or (``strict``) every
    request errored. A warm-up is not strict: a 1 s run of 1 s calls completes none."""
    argv = wrk_argv(url, sc, duration_s)
    log(f"  $ {shlex.join(argv)}")
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration_s + sc.timeout_s + 60,
        check=False,
    )
    if done.returncode != 0:
        raise BenchBroken(f"wrk exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    result = parse_wrk(done.stdout)
    if strict and (result.requests == 0 or result.errors >= result.requests):
        raise BenchBroken(f"every request failed ({url}, {sc.model}):\n{done.stdout}")
    return result


# --------------------------------------------------------------------------- processes


@dataclass
class Stack:
    """The running processes and where to reach them."""

    children: dict[str, Child] = field(default_factory=dict)
    mock_url: str = ""
    broker_url: str = ""
    redis_url: str = ""
    #: Processes of each of ingress and worker (``--processes``); above 1 their
    #: children are supervisors, whose own children do the work.
    processes: int = 1

    def role_pids(self, name: str) -> list[int]:
        """The processes that do the work of ``name``: the child itself, or the
        children of its supervisor (``--processes`` above 1)."""
        child = self.children[name]
        if name in ("ingress", "worker") and self.processes > 1:
            return child_pids(child.pid)
        return [child.pid]

    def check_alive(self) -> None:
        for name, child in self.children.items():
            code = child.proc.poll()
            if code is not None:
                tail = "\n".join(child.output().splitlines()[-30:])
                raise BenchBroken(f"{name} (pid {child.pid}) exited with {code}:\n{tail}")

    def stop(self) -> None:
        for name in ("ingress", "worker", "mock", "redis"):
            child = self.children.get(name)
            if child is not None:
                child.stop(timeout=10)


def child_pids(ppid: int) -> list[int]:
    """The processes whose parent is ``ppid`` (field 4 of /proc/PID/stat)."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(fields[1]) == ppid:
            pids.append(int(entry.name))
    return sorted(pids)


def child_env(redis_url: str) -> dict[str, str]:
    """Our environment minus proxies and broker settings that would override the config."""
    drop = {"LLM_BROKER_CONFIG", "LLM_BROKER_POD"}
    env = {
        k: v for k, v in os.environ.items() if k not in drop and not k.lower().endswith("_proxy")
    }
    env.update(REDIS_URL=redis_url, PYTHONUNBUFFERED="1", NO_PROXY="*")
    return env


def broker_config(
    redis_url: str, mock_url: str, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The config of the benchmark's broker; ``overrides`` (scenarios E and F) sets API
    keys (``auth``), ingress settings and the provider's ``max_concurrency`` and
    ``max_queue_depth``."""
    more = dict(overrides or {})
    config: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": "bench:"},
        "auth": {"open": True},
        "providers": {
            "mock": {
                "type": "mock",
                "base_url": f"{mock_url}/v1",
                "max_concurrency": 1200,
                "max_queue_depth": 100_000,
            }
        },
        "models": {"mock*": {"provider": "mock"}},
        "ingress": {"host": HOST, "drain_s": 2, **more.pop("ingress", {})},
        "worker": {"coalesce_ms": 5, "grace_period_s": 2},
    }
    for name in ("max_concurrency", "max_queue_depth"):
        if name in more:
            config["providers"]["mock"][name] = more.pop(name)
    config.update(more)
    return config


def start_redis(stack: Stack, tmp: Path) -> str:
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", HOST, "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(tmp)]
    stack.children["redis"] = Child("redis", argv)
    stack.children["redis"].wait_for(r"Ready to accept connections", 15)
    return f"redis://{HOST}:{port}/0"


def start_stack(tmp: Path, overrides: Mapping[str, Any] | None = None, processes: int = 1) -> Stack:
    """Redis, the mock, a worker and an ingress (each run as ``processes`` processes
    under a supervisor when above 1); returns once all are ready."""
    stack = Stack(processes=processes)
    try:
        redis_url = stack.redis_url = start_redis(stack, tmp)
        env = child_env(redis_url)
        mock = Child("mock", python_cmd("mock-upstream", "--host", HOST, "--port", "0"), env)
        stack.children["mock"] = mock
        port = mock.wait_for(r"listening on http://[\d.]+:(\d+)", 30).group(1)
        stack.mock_url = f"http://{HOST}:{port}"
        cfg = tmp / "bench-config.yaml"  # JSON is valid YAML
        config = broker_config(redis_url, stack.mock_url, overrides)
        cfg.write_text(json.dumps(config, indent=2))
        more = ["--processes", str(processes)] if processes > 1 else []
        worker_argv = python_cmd("worker", "--all", "--config", str(cfg), *more)
        stack.children["worker"] = Child("worker", worker_argv, env)
        ingress_argv = python_cmd(
            "ingress", "--config", str(cfg), "--host", HOST, "--port", "0", *more
        )
        stack.children["ingress"] = Child("ingress", ingress_argv, env)
        # One line per process: wait for all of them.
        stack.children["worker"].wait_for(r"worker ready", 30, count=processes)
        found = stack.children["ingress"].wait_for(
            r"listening on http://[\d.]+:(\d+)", 30, count=processes
        )
        stack.broker_url = f"http://{HOST}:{found.group(1)}"
    except BaseException:
        stack.stop()
        raise
    return stack


# --------------------------------------------------------------------------- mock stats

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def mock_stats(mock_url: str) -> dict[str, int]:
    with _OPENER.open(f"{mock_url}/mock/stats", timeout=5) as resp:
        data = json.loads(resp.read())
    return {k: int(v) for k, v in data.items() if isinstance(v, int)}


def mock_reset(mock_url: str) -> None:
    req = urllib.request.Request(f"{mock_url}/mock/reset", data=b"", method="POST")
    with _OPENER.open(req, timeout=5) as resp:
        resp.read()


def wait_idle(mock_url: str, timeout_s: float = 20.0) -> None:
    """Poll the mock until no call is in flight (twice in a row), e.g. after a warm-up."""
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < 2:
        if time.monotonic() > deadline:
            raise BenchBroken(f"the mock still has calls in flight after {timeout_s:.0f}s")
        quiet = quiet + 1 if mock_stats(mock_url)["in_flight"] == 0 else 0
        time.sleep(0.2)


# --------------------------------------------------------------------------- memory

Memory = dict[str, tuple[int, int]]  # process -> (VmHWM kB, VmRSS kB)


def read_memory(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) of ``pid`` in kB from /proc/PID/status."""
    values = {"VmHWM:": 0, "VmRSS:": 0}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            parts = line.split()
            if parts and parts[0] in values:
                values[parts[0]] = int(parts[1])
    return values["VmHWM:"], values["VmRSS:"]


def snapshot_memory(stack: Stack) -> Memory:
    return {name: read_memory(child.pid) for name, child in stack.children.items()}


# --------------------------------------------------------------------------- cpu

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def read_cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine from the first line of /proc/stat."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq) / _CLK_TCK, steal / _CLK_TCK


def cpu_now(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of every child, of reaped children (wrk) as "wrk", and of the
    whole machine as "machine" (busy) and "steal" (taken by the hypervisor)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {name: read_cpu_s(child.pid) for name, child in stack.children.items()}
    cpu["wrk"] = usage.ru_utime + usage.ru_stime
    cpu["machine"], cpu["steal"] = machine_cpu_s()
    return cpu


def cpu_percent(
    before: Mapping[str, float], after: Mapping[str, float], wall_s: float
) -> dict[str, float]:
    """CPU used between two :func:`cpu_now` samples, in % of one core."""
    return {k: 100.0 * (after[k] - before[k]) / wall_s for k in before if wall_s > 0}


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Row:
    scenario: Scenario
    target: str  # "mock" or "broker"
    result: WrkResult
    peak_in_flight: int
    cpu: Mapping[str, float]  # process -> % of one core during the run
    #: Redis commands run during the run, by name (commands inside scripts counted
    #: under their own names as well); empty for the mock.
    redis_commands: Mapping[str, int] = field(default_factory=dict)


def redis_commands(redis_url: str) -> dict[str, int]:
    """Calls so far of every Redis command (``INFO commandstats``)."""
    client = redis_sync.Redis.from_url(redis_url)
    try:
        # The sync client's stubs type every reply as "Awaitable | Any".
        stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    memory: dict[str, Memory] = field(default_factory=dict)  # scenario key -> snapshot
    pids: dict[str, int] = field(default_factory=dict)
    broken: str | None = None
    noisy: noisy.NoisyResult | None = None
    overload: list[OverloadRow] = field(default_factory=list)

    def row(self, key: str, target: str) -> Row | None:
        return next((r for r in self.rows if r.scenario.key == key and r.target == target), None)


def measure(stack: Stack, url: str, sc: Scenario, target: str) -> Row:
    wait_idle(stack.mock_url)
    mock_reset(stack.mock_url)
    commands = redis_commands(stack.redis_url) if target == "broker" else {}
    before, started = cpu_now(stack), time.monotonic()
    result = run_wrk(url + CHAT_PATH, sc, sc.duration_s)
    cpu = cpu_percent(before, cpu_now(stack), time.monotonic() - started)
    if commands:
        after = redis_commands(stack.redis_url)
        commands = {k: n - commands.get(k, 0) for k, n in after.items() if n > commands.get(k, 0)}
        commands.pop("info", None)
    peak = mock_stats(stack.mock_url)["peak_in_flight"]
    stack.check_alive()
    log(
        f"  {target}: {result.rps:.0f} req/s, p50 {fmt_ms(result.p50_ms)}, "
        f"errors {result.errors}, peak in flight {peak}"
    )
    return Row(sc, target, result, peak, cpu, commands)


def run_scenario(stack: Stack, sc: Scenario, warmup_s: int, report: Report) -> None:
    log(f"scenario {sc.key}: {sc.title}, {sc.duration_s}s")
    report.rows.append(measure(stack, stack.mock_url, sc, "mock"))
    wait_idle(stack.mock_url)
    log(f"  warm-up {warmup_s}s")
    run_wrk(stack.broker_url + CHAT_PATH, sc, warmup_s, strict=False)
    stack.check_alive()
    if sc.connections > 64:
        prime(stack, sc)
    report.rows.append(measure(stack, stack.broker_url, sc, "broker"))
    report.memory[sc.key] = snapshot_memory(stack)


def prime(stack: Stack, sc: Scenario) -> None:
    """One round of ``sc.connections`` requests, each awaited to its end.

    wrk stops with every connection's last request unanswered; the broker
    cancels those jobs (their clients went away) and workers abort the
    upstream calls by closing their connections. Without this round, the
    measured run would start by opening that many upstream connections
    again: a cost of the warm-up's own ending, not of steady state.
    """
    wait_idle(stack.mock_url)
    body = {
        "model": sc.model,
        "messages": [{"role": "user", "content": "Hello there"}],
        "stream": sc.stream,
    }

    async def one(session: aiohttp.ClientSession) -> bool:
        try:
            async with session.post(stack.broker_url + CHAT_PATH, json=body) as resp:
                await resp.read()
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def round_() -> int:
        connector = aiohttp.TCPConnector(limit=sc.connections)
        timeout = aiohttp.ClientTimeout(total=sc.timeout_s * 3)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            done = await asyncio.gather(*(one(session) for _ in range(sc.connections)))
        return sum(done)

    ok = asyncio.run(round_())
    log(f"  priming round: {ok}/{sc.connections} answered")
    wait_idle(stack.mock_url)


def run_noisy(tmp: Path, report: Report) -> None:
    """Scenario E, on a stack of its own."""
    log(f"scenario E: noisy neighbour, capacity {noisy.CAPACITY}, mock {noisy.MODEL}")
    tmp.mkdir()
    tenant_keys = noisy.keys()
    stack = start_stack(tmp, noisy.config_overrides(tenant_keys))
    try:
        keys = Keys("bench:")
        report.noisy = noisy.run(stack.broker_url, stack.redis_url, keys, tenant_keys)
        stack.check_alive()
        log("  " + " / ".join(noisy.table(report.noisy)[-2:]))
    except (BenchBroken, OSError, subprocess.SubprocessError, aiohttp.ClientError) as e:
        report.broken = f"{type(e).__name__}: {e}"
        log(f"bench: BROKEN: {e}")
    finally:
        stack.stop()


# --------------------------------------------------------------------------- scenario F


@dataclass(frozen=True)
class OverloadCase:
    """One row of scenario F."""

    row: int
    connections: int
    processes: int = 1  # of each of ingress and worker
    hog: bool = False  # a CPU hog runs beside the stack

    @property
    def label(self) -> str:
        if self.hog:
            return f"{self.row}: CPU hog"
        if self.processes > 1:
            return f"{self.row}: --processes {self.processes}"
        return f"{self.row}: c={self.connections}"


def overload_cases() -> list[OverloadCase]:
    return [
        OverloadCase(1, 5000),
        OverloadCase(2, 8000),
        OverloadCase(3, 5000, processes=2),
        OverloadCase(4, 5000, hog=True),
    ]


def overload_scenario(case: OverloadCase, quick: bool) -> Scenario:
    return Scenario(
        "F",
        f"overload, {case.label}",
        F_MODEL,
        case.connections,
        12 if quick else 30,
        timeout_s=F_TIMEOUT_S,
    )


def overload_overrides() -> dict[str, Any]:
    """F's stack: the provider takes (nearly) every call at once and queues the rest."""
    return {"max_concurrency": F_MAX_CONCURRENCY, "max_queue_depth": F_MAX_QUEUE_DEPTH}


@dataclass(frozen=True)
class OverloadRow:
    case: OverloadCase
    result: WrkResult
    peak_in_flight: int
    #: Role (F_ROLES, "supervisors", "hog") or "wrk", "machine", "steal" -> % of one
    #: core during the measured run; a role's processes summed.
    cpu: Mapping[str, float]
    #: Role (F_ROLES) -> VmHWM summed over its processes, in kB.
    rss_kb: Mapping[str, int]
    notes: tuple[str, ...] = ()
    #: Calls the mock completed per second between a third of the run and its last
    #: second: the steady throughput, without the ramp-up from idle and the calls
    #: still in flight when wrk stops (at 5 s of latency, a large part of a short run).
    steady_rps: float = 0.0


def overload_pids(stack: Stack, hog: subprocess.Popen[bytes] | None) -> dict[str, list[int]]:
    """Role -> the processes that do its work (plus the supervisors, and the hog)."""
    pids = {role: stack.role_pids(role) for role in F_ROLES}
    if stack.processes > 1:
        pids["supervisors"] = [stack.children[n].pid for n in ("ingress", "worker")]
    if hog is not None:
        pids["hog"] = [hog.pid]
    return pids


CpuSample = tuple[dict[str, dict[int, float]], dict[str, float]]


def overload_cpu_now(pids: Mapping[str, Sequence[int]]) -> CpuSample:
    """CPU seconds so far of every process of every role (role -> pid -> s), and of
    reaped children ("wrk") and the machine ("machine" busy, "steal")."""
    per_pid: dict[str, dict[int, float]] = {}
    for role, role_pids in pids.items():
        per_pid[role] = {}
        for pid in role_pids:
            try:
                per_pid[role][pid] = read_cpu_s(pid)
            except OSError:
                pass  # exited meanwhile (a supervisor restarts it)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine, steal = machine_cpu_s()
    return per_pid, {"wrk": usage.ru_utime + usage.ru_stime, "machine": machine, "steal": steal}


def overload_cpu_percent(before: CpuSample, after: CpuSample, wall_s: float) -> dict[str, float]:
    """CPU used between two samples in % of one core, per role (summed over its
    processes; one that started in between counts from 0) and per scalar."""
    if wall_s <= 0:
        return {}
    out = {
        role: 100.0 * sum(s - before[0].get(role, {}).get(pid, 0.0) for pid, s in used.items())
        for role, used in after[0].items()
    }
    out.update({k: 100.0 * (v - before[1][k]) for k, v in after[1].items()})
    return {k: v / wall_s for k, v in out.items()}


def start_hog() -> subprocess.Popen[bytes]:
    """A process that keeps one core busy: the noisy neighbour on the node."""
    return subprocess.Popen(
        [sys.executable, "-c", "while True: pass"],
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )


def stop_hog(hog: subprocess.Popen[bytes]) -> None:
    if hog.poll() is None:
        hog.kill()
    hog.wait(10)


def measure_overload(
    stack: Stack, case: OverloadCase, sc: Scenario, hog: subprocess.Popen[bytes] | None
) -> OverloadRow:
    """Warm-up, then the measured run of one row of F.

    No priming round as in C: under overload the broker sheds nearly all of it
    (2 of 5000 answered in a trial run), so it would open no upstream connections.
    """
    url = stack.broker_url + CHAT_PATH
    log(f"  warm-up {F_WARMUP_S}s")
    run_wrk(url, sc, F_WARMUP_S, strict=False)
    stack.check_alive()
    wait_idle(stack.mock_url, 60)  # the jobs of the warm-up's last requests end
    mock_reset(stack.mock_url)
    pids = overload_pids(stack, hog)
    before, started = overload_cpu_now(pids), time.monotonic()
    steady = SteadyRate(stack.mock_url, sc.duration_s / 3, sc.duration_s - 1)
    steady.start()
    # Not strict: a run where every request was shed is a result of F, not a failure.
    result = run_wrk(url, sc, sc.duration_s, strict=False)
    steady.join()
    after_pids = overload_pids(stack, hog)
    cpu = overload_cpu_percent(before, overload_cpu_now(after_pids), time.monotonic() - started)
    if result.requests == 0:
        raise BenchBroken(f"F {case.label}: no request was answered at all")
    peak = mock_stats(stack.mock_url)["peak_in_flight"]
    rss: dict[str, int] = {}
    for role in F_ROLES:
        rss[role] = sum(read_memory(pid)[0] for pid in stack.role_pids(role))
    stack.check_alive()
    notes = []
    for role in ("ingress", "worker"):
        if pids[role] != after_pids[role] or len(after_pids[role]) != stack.processes:
            notes.append(
                f"{role} processes changed during the run: {pids[role]} -> {after_pids[role]}"
            )
    log(
        f"  broker: {result.rps:.0f} req/s, p50 {fmt_ms(result.p50_ms)}, "
        f"p99 {fmt_ms(result.p99_ms)}, 2xx {result.ok}, non-2xx {result.status_detail()}, "
        f"socket errors {result.socket_detail()}, peak in flight {peak}"
    )
    for note in notes:
        log(f"  note: {note}")
    log(f"  steady: {steady.rps:,.0f} completed calls/s")
    return OverloadRow(case, result, peak, cpu, rss, tuple(notes), steady.rps)


class SteadyRate(threading.Thread):
    """Samples the mock's count of completed calls at two moments of a run (seconds
    after its start): the rate between them."""

    def __init__(self, mock_url: str, first_s: float, last_s: float) -> None:
        super().__init__(daemon=True)
        self._url, self._first_s, self._last_s = mock_url, first_s, last_s
        self.rps = 0.0

    def run(self) -> None:
        started = time.monotonic()
        time.sleep(self._first_s)  # the sampling moments of the run
        first, first_at = mock_stats(self._url)["completed"], time.monotonic()
        time.sleep(max(0.0, self._last_s - (first_at - started)))
        last, last_at = mock_stats(self._url)["completed"], time.monotonic()
        self.rps = (last - first) / (last_at - first_at) if last_at > first_at else 0.0


def run_overload(tmp: Path, quick: bool, report: Report) -> None:
    """Scenario F: every row on a stack of its own."""
    tmp.mkdir()
    for case in overload_cases():
        sc = overload_scenario(case, quick)
        log(f"scenario F: {sc.title}, {sc.duration_s}s, model {sc.model}")
        case_tmp = tmp / f"row{case.row}"
        case_tmp.mkdir()
        hog: subprocess.Popen[bytes] | None = None
        stack: Stack | None = None
        try:
            stack = start_stack(case_tmp, overload_overrides(), processes=case.processes)
            if case.hog:
                hog = start_hog()
                log(f"  CPU hog: pid {hog.pid}")
            report.overload.append(measure_overload(stack, case, sc, hog))
        except (
            BenchBroken,
            OSError,  # TimeoutError (a process did not start) included
            RuntimeError,  # a process exited before it was ready
            subprocess.SubprocessError,
            aiohttp.ClientError,
        ) as e:
            report.broken = f"F {case.label}: {type(e).__name__}: {e}"
            log(f"bench: BROKEN: {report.broken}")
            return
        finally:
            if hog is not None:
                stop_hog(hog)
            if stack is not None:
                stack.stop()


def run_all(stack: Stack, quick: bool, report: Report, only: str = "") -> None:
    report.pids = {name: child.pid for name, child in stack.children.items()}
    for sc in scenarios(quick):
        if not only or sc.key in only:
            run_scenario(stack, sc, WARMUP_S, report)


# --------------------------------------------------------------------------- output


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} ms" if value < 1 else f"{value:.2f} ms"


def fmt_mb(kb: int) -> str:
    return f"{kb / MB:.1f}"


def results_table(report: Report) -> list[str]:
    lines = [
        "| scenario | target | conns | req/s | p50 | p99 | errors | added p50 | broker/mock "
        "| mock peak in-flight |",
        "|---|---|--:|--:|--:|--:|---|--:|--:|--:|",
    ]
    for row in report.rows:
        r, sc = row.result, row.scenario
        added, ratio = "", ""
        base = report.row(sc.key, "mock")
        if row.target == "broker" and base is not None:
            if r.p50_ms is not None and base.result.p50_ms is not None:
                added = f"{r.p50_ms - base.result.p50_ms:+.2f} ms"
            ratio = f"{r.rps / base.result.rps:.3f}" if base.result.rps else "-"
        lines.append(
            f"| {sc.key}: {sc.title} | {row.target} | {sc.connections} | {r.rps:,.0f} "
            f"| {fmt_ms(r.p50_ms)} | {fmt_ms(r.p99_ms)} | {r.error_detail()} | {added} "
            f"| {ratio} | {row.peak_in_flight} |"
        )
    return lines


def memory_table(report: Report) -> list[str]:
    keys = list(report.memory)
    head = " | ".join(f"VmHWM after {k}" for k in keys)
    lines = [
        f"| process | pid | {head} | peak (max) | VmRSS at end |",
        "|---|--:|" + "--:|" * (len(keys) + 2),
    ]
    for name in PROCESS_NAMES:
        snaps = [report.memory[k][name] for k in keys if name in report.memory[k]]
        if not snaps:
            continue
        cols = " | ".join(fmt_mb(hwm) for hwm, _ in snaps)
        peak = max(hwm for hwm, _ in snaps)
        lines.append(
            f"| {name} | {report.pids.get(name, '')} | {cols} | {fmt_mb(peak)} "
            f"| {fmt_mb(snaps[-1][1])} |"
        )
    return lines


def cpu_table(report: Report) -> list[str]:
    names = [*PROCESS_NAMES, "wrk"]
    lines = [
        f"| scenario | target | {' | '.join(names)} | ours | machine busy | steal |",
        "|---|---|" + "--:|" * (len(names) + 3),
    ]
    for row in report.rows:
        cols = " | ".join(f"{row.cpu.get(n, 0.0):.0f}" for n in names)
        ours = sum(row.cpu.get(n, 0.0) for n in names)
        lines.append(
            f"| {row.scenario.key} | {row.target} | {cols} | {ours:.0f} "
            f"| {row.cpu.get('machine', 0.0):.0f} | {row.cpu.get('steal', 0.0):.0f} |"
        )
    return lines


Check = tuple[str, bool | None, str]  # (target, passed or None if not measured, value)


def _rps_check(report: Report, key: str, label: str, minimum: float) -> Check:
    row = report.row(key, "broker")
    if row is None:
        return (label, None, "not measured")
    return (label, row.result.rps >= minimum, f"{row.result.rps:,.0f}/s")


def target_checks(report: Report) -> list[Check]:
    """PASS/FAIL of every target; ``None`` when the scenario did not run."""
    checks: list[Check] = []
    a_b, a_m = report.row("A", "broker"), report.row("A", "mock")
    label = f"A: added p50 <= {TARGET_A_ADDED_P50_MS:g} ms"
    if a_b and a_m and a_b.result.p50_ms is not None and a_m.result.p50_ms is not None:
        added = a_b.result.p50_ms - a_m.result.p50_ms
        checks.append((label, added <= TARGET_A_ADDED_P50_MS, f"{added:.2f} ms"))
    else:
        checks.append((label, None, "not measured"))
    checks.append(_rps_check(report, "B", f"B: >= {TARGET_B_RPS:,.0f} req/s", TARGET_B_RPS))
    checks.append(_rps_check(report, "C", f"C: >= {TARGET_C_RPS:,.0f} req/s", TARGET_C_RPS))
    checks.extend(c_checks(report))
    checks.append(_rps_check(report, "D", f"D: >= {TARGET_D_RPS:,.0f} streams/s", TARGET_D_RPS))
    checks.extend(f_checks(report))
    return checks


def c_checks(report: Report) -> list[Check]:
    row = report.row("C", "broker")
    labels = [
        f"C: p99 <= {TARGET_C_P99_MS:,.0f} ms",
        "C: no errors",
        f"C: all {TARGET_C_IN_FLIGHT} in flight at the mock at once",
        *(f"C: {p} peak RSS < {TARGET_C_RSS_MB:g} MB" for p in ("ingress", "worker")),
    ]
    mem = report.memory.get("C")
    if row is None or mem is None:
        return [(label, None, "not measured") for label in labels]
    r = row.result
    p99 = r.p99_ms if r.p99_ms is not None else float("inf")
    values: list[tuple[bool, str]] = [
        (p99 <= TARGET_C_P99_MS, fmt_ms(r.p99_ms)),
        (r.errors == 0, r.error_detail()),
        (row.peak_in_flight >= TARGET_C_IN_FLIGHT, f"peak {row.peak_in_flight}"),
        *(
            (mem[p][0] / MB < TARGET_C_RSS_MB, f"{fmt_mb(mem[p][0])} MB")
            for p in ("ingress", "worker")
        ),
    ]
    return [(label, ok, text) for label, (ok, text) in zip(labels, values, strict=True)]


def f_checks(report: Report) -> list[Check]:
    """F's targets: no 503 but ``overloaded`` in any row; row 2 keeps row 1's req/s."""
    rows = {row.case.row: row for row in report.overload}
    label_503 = "F: no 503 other than overloaded"
    label_ratio = f"F 8000: req/s within {100 * (1 - TARGET_F_RATIO):.0f} % of F 5000"
    if not rows:
        return [(label_503, None, "not measured"), (label_ratio, None, "not measured")]
    other = {n: row.result.statuses.get("503", 0) for n, row in rows.items()}
    checks: list[Check] = [
        (
            label_503,
            not any(other.values()),
            ", ".join(f"row {n}: {v:,}" for n, v in other.items()),
        )
    ]
    ratio = overload_ratio(report)
    if ratio is None:
        checks.append((label_ratio, None, "not measured"))
    else:
        first, second = rows[1].steady_rps, rows[2].steady_rps
        text = f"ratio {ratio:.2f} ({second:,.0f} / {first:,.0f} completed calls/s, steady)"
        checks.append((label_ratio, ratio >= TARGET_F_RATIO, text))
    return checks


def overload_ratio(report: Report) -> float | None:
    """F row 2's steady completion rate divided by row 1's (None unless both ran)."""
    rows = {row.case.row: row.steady_rps for row in report.overload}
    if 1 not in rows or 2 not in rows or not rows[1]:
        return None
    return rows[2] / rows[1]


def overload_table(report: Report) -> list[str]:
    """Scenario F: one row per stack, CPU and RSS per role (summed over its processes)."""
    lines = [
        "| row | conns | processes | req/s | steady 2xx/s | p50 | p99 | non-2xx by status "
        "| socket errors "
        "| ingress CPU % | worker CPU % | redis CPU % | ingress RSS MB | worker RSS MB "
        "| mock peak in-flight |",
        "|---|--:|--:|--:|--:|--:|--:|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    ratio = overload_ratio(report)
    for row in report.overload:
        r, case = row.result, row.case
        rps = f"{r.rps:,.0f}"
        steady = f"{row.steady_rps:,.0f}"
        if case.row == 2 and ratio is not None:
            steady += f" ({ratio:.2f} of row 1)"
        cpu = " | ".join(f"{row.cpu.get(n, 0.0):.0f}" for n in ("ingress", "worker", "redis"))
        rss = " | ".join(fmt_mb(row.rss_kb.get(n, 0)) for n in ("ingress", "worker"))
        lines.append(
            f"| {case.label} | {case.connections} | {case.processes} + {case.processes} "
            f"| {rps} | {steady} | {fmt_ms(r.p50_ms)} | {fmt_ms(r.p99_ms)} | {r.status_detail()} "
            f"| {r.socket_detail()} | {cpu} | {rss} | {row.peak_in_flight} |"
        )
    return lines


def overload_section(report: Report) -> list[str]:
    sc = overload_scenario(overload_cases()[0], quick=False)
    lines = [
        f"F: overload — model `{F_MODEL}`, wrk `--timeout {sc.timeout_s}s`, each row on a "
        f"stack of its own (provider `max_concurrency` {F_MAX_CONCURRENCY}, "
        f"`max_queue_depth` {F_MAX_QUEUE_DEPTH:,}), measured after a {F_WARMUP_S} s warm-up "
        "at the same concurrency. *req/s* counts every response (503s included; the 2xx "
        "are below the table); *steady 2xx/s*: calls the mock completed per second from a "
        "third of the run to its last second (what row 2 is compared on: a short run from "
        "idle at 5 s of latency counts its ramp-up and leaves thousands of calls "
        "unfinished); *processes*: ingress + worker; CPU (% of one core) and RSS "
        "(VmHWM, MB) summed over a role's processes.",
        "",
        *overload_table(report),
        "",
    ]
    for row in report.overload:
        cpu, r = row.cpu, row.result
        ours = sum(v for k, v in cpu.items() if k not in ("machine", "steal"))
        more = [f"mock {cpu.get('mock', 0.0):.0f}", f"wrk {cpu.get('wrk', 0.0):.0f}"]
        if "supervisors" in cpu:
            more.append(f"supervisors {cpu['supervisors']:.0f}")
        if "hog" in cpu:
            more.append(f"hog {cpu['hog']:.0f}")
        more += [f"all these {ours:.0f}", f"machine busy {cpu.get('machine', 0.0):.0f}"]
        more.append(f"steal {cpu.get('steal', 0.0):.0f}")
        ok_rate = r.ok / r.duration_s if r.duration_s else 0.0
        text = (
            f"- row {row.case.label}: {r.requests:,} responses in {r.duration_s:.1f} s, "
            f"2xx {r.ok:,} ({ok_rate:,.0f}/s); CPU % {', '.join(more)}; RSS MB redis "
            f"{fmt_mb(row.rss_kb.get('redis', 0))}, mock {fmt_mb(row.rss_kb.get('mock', 0))}"
        )
        samples = [
            f"{k}: `{v.replace('`', chr(39))}`"
            for k, v in sorted(r.samples.items())
            if k != "503-overloaded"
        ]
        if samples:
            text += "; first body of " + ", of ".join(samples)
        lines.append(text + "".join(f"; {note}" for note in row.notes))
    return lines


def targets_section(report: Report) -> list[str]:
    lines = []
    for label, ok, value in target_checks(report):
        verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"- {verdict} {label} (measured: {value})")
    return lines


def redis_table(report: Report) -> list[str]:
    """Redis commands per request of each broker run: calls of the job store's
    functions (FCALL) and scripts (EVALSHA), every command (those inside them
    included), and the most frequent."""
    lines = [
        "| scenario | functions and scripts | all commands | most frequent |",
        "|---|--:|--:|---|",
    ]
    for row in report.rows:
        done = row.result.requests
        if row.target != "broker" or not row.redis_commands or not done:
            continue
        calls = row.redis_commands
        top = sorted(calls.items(), key=lambda kv: -kv[1])[:6]
        functions = calls.get("fcall", 0) + calls.get("evalsha", 0)
        lines.append(
            f"| {row.scenario.key} | {functions / done:.2f} "
            f"| {sum(calls.values()) / done:.1f} "
            f"| {', '.join(f'{k} {n / done:.2f}' for k, n in top)} |"
        )
    return lines


def render_results(report: Report) -> str:
    parts: list[str] = []
    if report.rows:  # A-D
        parts += ["## Results", "", *results_table(report), "", "## Peak RSS (MB)", ""]
        parts += [*memory_table(report), "", "## CPU during each run (% of one core)", ""]
        parts += [*cpu_table(report), "", "## Redis commands per request", ""]
        parts += [*redis_table(report), ""]
    if report.noisy is not None:
        parts += ["## E: noisy neighbour", "", *noisy.table(report.noisy), ""]
    if report.overload:
        parts += ["## F: overload", "", *overload_section(report), ""]
    parts += ["## Targets", "", *targets_section(report)]
    if report.broken:
        parts += ["", f"**BROKEN**: {report.broken}"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------- setup


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def command_version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError as e:
        return f"unavailable ({e})"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(quick: bool) -> str:
    sc = scenarios(quick)
    durations = ", ".join(f"{s.key} {s.duration_s}s" for s in sc)
    f_duration = overload_scenario(overload_cases()[0], quick).duration_s
    durations += f", F {f_duration}s x {len(overload_cases())} rows"
    argv = shlex.join([sys.executable, *sys.argv])
    return "\n".join(
        [
            "# llm-broker benchmark",
            "",
            f"- command: `{argv}`",
            f"- date: {datetime.now(UTC).isoformat(timespec='seconds')}",
            f"- nproc: {len(os.sched_getaffinity(0))} (cpu_count {os.cpu_count()}), "
            f"cpu: {cpu_model()}, kernel: {platform.release()}, "
            f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
            f"- python: {platform.python_version()} ({sys.executable})",
            f"- redis-server: {command_version(['redis-server', '--version'])}",
            f"- wrk: {command_version(['wrk', '--version'])}",
            f"- mode: {'quick' if quick else 'default'}; durations: {durations}; "
            "processes: 1 ingress, 1 worker, 1 mock, 1 redis-server (F row 3: 2 ingress, "
            "2 worker); wrk -t1",
            "",
        ]
    )


def ensure_wrk() -> None:
    """Install wrk with apt-get when it is missing (needs root)."""
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        raise MissingPrerequisite("wrk is not installed; run: sudo apt-get install -y wrk")
    log("bench: wrk missing; installing it with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, env=env)
    if not shutil.which("wrk"):
        raise MissingPrerequisite("wrk still not found after apt-get install -y wrk")


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE := hard limit; wrk and the children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    most = max(case.connections for case in overload_cases())
    if hard < most + 200:
        log(f"bench: warning: fd hard limit {hard} is low for {most} connections (F)")


def check_prerequisites() -> None:
    if shutil.which("redis-server") is None:
        raise MissingPrerequisite(
            "redis-server not found on PATH; install it (apt-get install -y redis-server)"
        )
    ensure_wrk()
    raise_fd_limit()


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def benchmark(quick: bool, emit: Callable[[str], None], only: str = "") -> int:
    """Run every scenario (or those in ``only``); emit the report; return the exit status."""
    report = Report()
    with tempfile.TemporaryDirectory(prefix="llm-broker-bench-") as tmp:
        if not only or set(only) & set("ABCD"):
            stack = start_stack(Path(tmp))
            try:
                run_all(stack, quick, report, only)
            except (BenchBroken, OSError, subprocess.SubprocessError) as e:
                report.broken = f"{type(e).__name__}: {e}"
                log(f"bench: BROKEN: {e}")
            finally:
                stack.stop()
        if not report.broken and (not only or "E" in only):
            run_noisy(Path(tmp) / "e", report)
        if not report.broken and (not only or "F" in only):
            run_overload(Path(tmp) / "f", quick, report)
    emit(render_results(report))
    return 1 if report.broken else 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument(
        "--quick", action="store_true", help="run A for 5 s, C for 15 s and F's rows for 8 s"
    )
    ap.add_argument("--out", type=Path, help="also write the markdown report to this file")
    ap.add_argument(
        "--only", default="", help="run only these scenarios, e.g. C or AB (default: all)"
    )
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_prerequisites()
    except (MissingPrerequisite, subprocess.CalledProcessError) as e:
        log(f"bench: {e}")
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    text = header(args.quick)
    print(text, flush=True)
    out: Path | None = args.out

    def emit(results: str) -> None:
        print(results, flush=True)
        if out is not None:
            out.write_text(text + "\n" + results)

    try:
        return benchmark(args.quick, emit, args.only.upper())
    except (RuntimeError, TimeoutError) as e:  # a process did not start (Child.wait_for)
        log(f"bench: could not start the processes: {e}")
        return 1
    except KeyboardInterrupt:
        log("bench: interrupted; processes stopped")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
