"""Fixtures: a real Redis server per session, the broker's processes, configs.

The Redis server runs on a free port in a temporary directory so that tests can
stop and restart it and concurrent runs never collide. Each test gets its own
key prefix instead of a flushed database.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from llm_broker.dev import free_port
from llm_broker.procs import Child, python_cmd
from tests.helpers import eventually

_prefixes = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fuzz-examples",
        type=int,
        default=200,
        help="valid requests per API operation in the fuzz test (invalid ones: half that)",
    )
    parser.addoption(
        "--processes",
        type=int,
        default=1,
        help="run every ingress and worker the tests start with --processes N",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The fuzz test's time grows with --fuzz-examples: about 1.6 s per example of
    # every operation together here on a slow day, mostly the fuzzer's own drawing
    # of cases; more than 2 s on a day this machine ran Python at a third of its
    # usual speed. The budget stops a hang, not a slow machine.
    budget = 60 + 4 * config.getoption("--fuzz-examples")
    for item in items:
        if item.get_closest_marker("fuzz") is not None:
            item.add_marker(pytest.mark.timeout(budget))


class RedisServer:
    """A ``redis-server`` process that tests may stop, kill and restart."""

    def __init__(self, workdir: Path, args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.binary = binary
        self.port = free_port()
        self.dir = workdir
        #: More options, after the defaults (e.g. ``--replicaof``).
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--logfile",
                str(self.dir / "redis.log"),
                *self.args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        password = None
        if "--requirepass" in self.args:
            password = self.args[self.args.index("--requirepass") + 1]
        answering(self.port, "PING", password=password)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_up(redis_server: RedisServer) -> RedisServer:
    """The session's Redis, started again if an earlier test left it stopped."""
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    return redis_server


@pytest.fixture
def prefix() -> str:
    return f"t{os.getpid()}-{next(_prefixes)}:"


@pytest.fixture
async def rclient(redis_up: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_up.url)
    yield client
    await client.aclose()


class RedisCluster:
    """A Redis Cluster of ``redis-server --cluster-enabled yes`` primaries on free
    ports, the slots split evenly."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.nodes = [RedisServer(workdir / f"node-{i}") for i in range(size)]
        # Every node's port and cluster bus port (by default its port + 10000, maybe
        # past 65535) told apart: free_port may name a port twice (it is free until a
        # server binds it), and a PING sent to a bus port is answered with a reset.
        ports: list[int] = []
        while len(ports) < 2 * size:
            port = free_port()
            if port not in ports:
                ports.append(port)
        for node, port in zip(self.nodes, ports, strict=False):
            node.port = port
        self.bus_ports = ports[size:]
        for node, bus in zip(self.nodes, self.bus_ports, strict=True):
            node.dir.mkdir(parents=True)
            node.args = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node.dir / "nodes.conf"),
                "--cluster-port",
                str(bus),
                "--cluster-node-timeout",
                "2000",
                "--appendonly",
                "no",
            )

    @property
    def seeds(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def start(self, cli: bool = False) -> None:
        """Start the nodes and join them: each takes an even share of the slots and
        meets the others, as ``redis-cli --cluster create`` does (``cli``: with it,
        which polls once a second)."""
        for node in self.nodes:
            node.start()
        if cli:
            binary = shutil.which("redis-cli")
            if binary is None:
                pytest.fail("redis-cli is not installed (apt-get install redis-tools)")
            create = [binary, "--cluster", "create", *self.seeds, "--cluster-replicas", "0"]
            subprocess.run(
                [*create, "--cluster-yes"],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                timeout=60,
            )
        else:
            self._join()
        for node in self.nodes:
            answering(node.port, "CLUSTER", "INFO", ready=lambda info: b"cluster_state:ok" in info)

    def _join(self) -> None:
        share = 16384 // len(self.nodes)
        for i in range(len(self.nodes)):
            last = 16383 if i == len(self.nodes) - 1 else (i + 1) * share - 1
            with self.client(i) as c:
                c.execute_command("CLUSTER", "ADDSLOTSRANGE", i * share, last)
                for j in range(i):
                    c.execute_command(
                        "CLUSTER", "MEET", "127.0.0.1", self.nodes[j].port, self.bus_ports[j]
                    )

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(signal.SIGKILL)

    def client(self, index: int) -> redis.Redis:
        """A plain (not cluster-aware) client of one node."""
        return redis.Redis(port=self.nodes[index].port)

    def owner(self, slot: int) -> int:
        """The index of the node that serves ``slot``."""
        with self.client(0) as c:
            for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(i for i, n in enumerate(self.nodes) if n.port == primary[1])
        raise AssertionError(f"no node serves slot {slot}")

    def move_slot(self, slot: int, to: int, *, finish: bool = True) -> int:
        """Move ``slot`` to node ``to`` as ``redis-cli --cluster reshard`` moves each
        slot (``SETSLOT IMPORTING``/``MIGRATING``, ``MIGRATE`` of its keys, ``SETSLOT
        NODE``); with ``finish=False`` the keys move but the slot stays migrating
        (its old node answers ASK). Returns the index of the node it left."""
        src = self.owner(slot)
        assert src != to
        src_id, dst_id = self.node_id(src), self.node_id(to)
        with self.client(src) as s, self.client(to) as d:
            d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while keys := s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                s.execute_command(
                    "MIGRATE", "127.0.0.1", self.nodes[to].port, "", 0, 5000, "KEYS", *keys
                )
            if finish:
                for c in (d, s):
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return src

    def node_id(self, index: int) -> str:
        with self.client(index) as c:
            return str(c.execute_command("CLUSTER", "MYID").decode())


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """Three primaries, made for one test (tests move slots and kill nodes)."""
    cluster = RedisCluster(tmp_path / "cluster")
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def answering(
    port: int,
    *command: Any,
    password: str | None = None,
    ready: Callable[[Any], bool] = bool,
) -> None:
    """Return once the server on ``port`` answers ``command`` with what ``ready``
    accepts (within 10 s)."""
    client = redis.Redis(port=port, password=password, socket_connect_timeout=0.2)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                if ready(client.execute_command(*command)):  # type: ignore[no-untyped-call]
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"port {port} did not answer {command} as expected")
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.02)  # poll until the server accepts connections
    finally:
        client.close()


def start_sentinel(directory: Path, port: int, settings: str) -> subprocess.Popen[bytes]:
    """A ``redis-server --sentinel`` on ``port``, its home under ``directory``,
    with ``settings`` (sentinel.conf lines) after its address."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    home = directory / f"sentinel-{port}"
    home.mkdir()
    conf = home / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {home}\nlogfile {home / 'sentinel.log'}\n{settings}"
    )
    return subprocess.Popen(
        [binary, str(conf), "--sentinel"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class Procs:
    """Starts the broker's processes and stops every one at the end of the test.

    ``processes``: ingress and workers run with ``--processes N`` (pytest's
    ``--processes`` option); they are ready once every process is."""

    def __init__(self, tmp: Path, processes: int = 1) -> None:
        self.tmp = tmp
        self.processes = processes
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: list[str],
        ready: str,
        env: dict[str, str] | None = None,
        timeout: float = 30,
        count: int = 1,
    ) -> tuple[Child, Any]:
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("LLM_BROKER_CONFIG", None)
        child = Child(name, argv, full_env)
        self.children.append(child)
        return child, child.wait_for(ready, timeout, count)

    def mock(self, *args: str) -> tuple[Child, str]:
        child, found = self.start(
            "mock", python_cmd("mock-upstream", "--port", "0", *args), r"listening on (http://\S+)"
        )
        return child, found.group(1)

    def worker(
        self,
        config: Path,
        *args: str,
        providers: list[str] | None = None,
        processes: int | None = None,
    ) -> Child:
        which = [f"--provider={p}" for p in providers] if providers else ["--all"]
        n = processes or self.processes
        many = ["--processes", str(n)] if n > 1 else []
        argv = python_cmd("worker", *which, "--config", str(config), *many, *args)
        child, _ = self.start("worker", argv, r"worker ready", count=n)
        return child

    def webhooks(self, config: Path, *args: str) -> Child:
        child, _ = self.start(
            "webhooks", python_cmd("webhooks", "--config", str(config), *args), r"webhooks ready"
        )
        return child

    def ingress(self, config: Path, processes: int | None = None) -> tuple[Child, str]:
        n = processes or self.processes
        many = ["--processes", str(n)] if n > 1 else []
        child, found = self.start(
            "ingress",
            python_cmd("ingress", "--config", str(config), "--port", "0", *many),
            r"listening on (http://\S+)",
            count=n,
        )
        return child, found.group(1)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop(timeout=10)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keeps each phase's report on the test, so that ``procs`` knows it failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def procs(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Procs]:
    p = Procs(tmp_path, request.config.getoption("--processes"))
    yield p
    p.stop_all()
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:  # what the processes said, for the failure
        for child in p.children:
            tail = list(child.lines)[-80:]
            print(f"\n----- {child.name} (pid {child.pid}), last {len(tail)} lines -----")
            print("\n".join(tail))


ConfigFactory = Callable[..., Path]
_configs = itertools.count()


def write_config(
    directory: Path, redis_url: str, prefix: str, mock_url: str, **sections: Any
) -> Path:
    """Write a config file routing ``mock*`` and ``gpt-4o-mini`` to the mock at ``mock_url``.

    ``sections`` are merged two levels deep into the defaults. The mock provider
    neither retries nor trips its circuit breaker, so that an upstream error
    reaches the client as it is; the tests of retries and breakers set their own.
    """
    cfg: dict[str, Any] = {
        "redis": {"url": redis_url, "key_prefix": prefix},
        "auth": {"open": True},
        "providers": {
            "mock": {
                "type": "mock",
                "base_url": f"{mock_url}/v1",
                "max_concurrency": 64,
                "retry": {"max_retries": 0},
                "circuit": {"failures": 1_000_000},
            }
        },
        "models": {
            "mock*": {"provider": "mock"},
            "gpt-4o-mini": {"provider": "mock", "model": "mock"},
        },
        "ingress": {"drain_s": 5},
        "worker": {"grace_period_s": 10, "lease_s": 5},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            merged = dict(cfg[key])
            for k, v in value.items():
                if isinstance(v, dict) and isinstance(merged.get(k), dict):
                    merged[k] = {**merged[k], **v}
                else:
                    merged[k] = v
            cfg[key] = merged
        else:
            cfg[key] = value
    path = directory / f"config-{next(_configs)}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def make_config(tmp_path: Path, redis_up: RedisServer, prefix: str) -> ConfigFactory:
    def make(mock_url: str, **sections: Any) -> Path:
        return write_config(tmp_path, redis_up.url, prefix, mock_url, **sections)

    return make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def mock_stats(http: aiohttp.ClientSession, mock_url: str) -> dict[str, Any]:
    async with http.get(f"{mock_url}/mock/stats") as resp:
        stats: dict[str, Any] = await resp.json()
        return stats


async def wait_in_flight(http: aiohttp.ClientSession, mock_url: str, count: int = 1) -> None:
    """Wait (bounded) until the mock holds ``count`` calls in flight."""

    async def reached() -> bool:
        return bool((await mock_stats(http, mock_url))["in_flight"] == count)

    await eventually(reached, what=f"{count} upstream call(s) in flight")


def chat(model: str = "gpt-4o-mini", content: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """A webhook receiver: answers each path with scripted statuses, then 200."""

    url: str = ""
    script: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    got: dict[str, list[Delivery]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.read()
        self.got.setdefault(name, []).append(Delivery(dict(request.headers), body, time.time()))
        planned = self.script.get(name)
        status, headers = planned.pop(0) if planned else (200, {})
        return web.Response(status=status, headers=headers)

    async def deliveries(self, name: str, count: int) -> list[Delivery]:
        async def arrived() -> list[Delivery] | None:
            got = self.got.get(name, [])
            return got if len(got) >= count else None

        return await eventually(arrived, what=f"{count} webhook deliveries to {name}")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    app = web.Application()
    rec = Receiver()
    app.router.add_post("/hook/{name}", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    await runner.cleanup()
