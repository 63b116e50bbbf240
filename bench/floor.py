"""The floor of the broker's topology: what the same path costs with none of its work.

The broker's synchronous call crosses four processes: client -> ingress -> Redis
stream -> worker -> upstream -> worker -> Redis reply stream -> ingress -> client.
This script runs that path with the leanest Python it can be written in, and the
broker beside it, in one run, so that a CPU or latency target can be set against
what the path itself costs on the machine.

The *floor* ingress and worker (``--role``) keep the path and drop everything else:
no auth, job records, accounting, limits, retries, metrics or logs.

- uvloop, and ``asyncio.Protocol`` everywhere: no framework.
- A minimal HTTP/1.1 reader (Content-Length bodies, keep-alive): enough for wrk.
- Redis spoken over its own protocol class with hiredis. Every command written in
  one loop iteration goes out in one write.
- Ingress: ``XADD`` per request; one reader task blocks on ``XREAD`` of the process's
  reply stream and writes each answer to its connection.
- Worker: ``XREADGROUP ... BLOCK``, then one upstream call per entry on a pool of
  keep-alive connections, then ``XADD`` (the reply) and ``XACK`` in one write.

The run starts its own redis-server and the project's mock upstream (as
``bench/run.py`` does), then measures with ``wrk`` at c=1 and c=64 (model ``mock``):
the mock directly, the floor, and the broker (the ``llm_broker`` installed in this
environment, started as ``bench/run.py`` starts it). Each row reports req/s, p50,
the p50 added to the mock's, and CPU per request of ingress, worker and Redis.

Usage: ``python bench/floor.py [--seconds 10] [--rounds 3] [--out FILE.md]``
(rows alternate over ``--rounds``; the table gives medians).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import run as bench

# --------------------------------------------------------------------------- the floor

ANSWER_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
CALL_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
)


def _pack(*args: bytes) -> bytes:
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Redis(asyncio.Protocol):
    """One Redis connection: commands written in one loop iteration go out together;
    replies resolve their futures in order."""

    def __init__(self) -> None:
        import hiredis

        self._reader = hiredis.Reader()
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._out: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def call(self, *args: bytes) -> asyncio.Future[Any]:
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(_pack(*args))
        future = self._loop.create_future()
        self._waiting.append(future)
        return future

    def _flush(self) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(self._out))
        self._out.clear()

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            future = self._waiting.popleft()
            if not future.done():
                future.set_result(reply)


async def _redis(port: int) -> Redis:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(Redis, bench.HOST, port)
    return protocol


def _fields(entry: list[Any]) -> dict[bytes, bytes]:
    values = entry[1]
    return dict(zip(values[::2], values[1::2], strict=True))


class HttpIn(asyncio.Protocol):
    """The floor ingress's side of a client connection."""

    def __init__(self, submit: Any) -> None:
        self._buf = b""
        self._submit = submit
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while (end := self._buf.find(b"\r\n\r\n")) >= 0:
            head = self._buf[:end].lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15 : head.find(b"\r\n", start)]) if start >= 0 else 0
            if len(self._buf) < end + 4 + length:
                return
            body = self._buf[end + 4 : end + 4 + length]
            self._buf = self._buf[end + 4 + length :]
            self._submit(self, body)

    def answer(self, body: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(ANSWER_HEAD % len(body) + body)


async def floor_ingress(redis_port: int, port: int) -> None:
    loop = asyncio.get_running_loop()
    commands, blocking = await _redis(redis_port), await _redis(redis_port)
    stream = b"floor:reply:%d" % os.getpid()
    ids = itertools.count()
    waiting: dict[bytes, HttpIn] = {}

    def submit(conn: HttpIn, body: bytes) -> None:
        job = b"%d" % next(ids)
        waiting[job] = conn
        commands.call(b"XADD", b"floor:q", b"*", b"id", job, b"r", stream, b"b", body)

    async def replies() -> None:
        last = b"$"
        while True:
            found = await blocking.call(b"XREAD", b"COUNT", b"1000", b"BLOCK", b"1000",
                                        b"STREAMS", stream, last)  # fmt: skip
            for _, entries in found or []:
                for entry in entries:
                    last, fields = entry[0], _fields(entry)
                    conn = waiting.pop(fields[b"id"], None)
                    if conn is not None:
                        conn.answer(fields[b"b"])

    reader = loop.create_task(replies())
    server = await loop.create_server(lambda: HttpIn(submit), bench.HOST, port, backlog=4096)
    print(f"listening on http://{bench.HOST}:{server.sockets[0].getsockname()[1]}", flush=True)
    try:
        await server.serve_forever()
    finally:
        reader.cancel()


class HttpOut(asyncio.Protocol):
    """A keep-alive connection to the upstream: one call at a time."""

    def __init__(self) -> None:
        self._buf = b""
        self.transport: asyncio.Transport | None = None
        self.future: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self._buf[:end].lower()
        start = head.find(b"content-length:")
        length = int(head[start + 15 : head.find(b"\r\n", start)])
        if len(self._buf) >= end + 4 + length and self.future is not None:
            body, self._buf = self._buf[end + 4 : end + 4 + length], b""
            self.future.set_result(body)


async def floor_worker(redis_port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    commands, blocking = await _redis(redis_port), await _redis(redis_port)
    host, _, port = upstream.removeprefix("http://").partition(":")
    idle: list[HttpOut] = []
    running: set[asyncio.Task[None]] = set()
    try:
        await blocking.call(b"XGROUP", b"CREATE", b"floor:q", b"g", b"$", b"MKSTREAM")
    except Exception:
        pass

    async def run(entry: list[Any]) -> None:
        fields = _fields(entry)
        if idle:
            conn = idle.pop()
        else:
            _, conn = await loop.create_connection(HttpOut, host, int(port))
        conn.future = loop.create_future()
        body = fields[b"b"]
        assert conn.transport is not None
        conn.transport.write(CALL_HEAD % (host.encode(), len(body)) + body)
        answer = await conn.future
        idle.append(conn)
        commands.call(b"XADD", fields[b"r"], b"*", b"id", fields[b"id"], b"b", answer)
        commands.call(b"XACK", b"floor:q", b"g", entry[0])

    print("worker ready", flush=True)
    while True:
        found = await blocking.call(b"XREADGROUP", b"GROUP", b"g", b"c", b"COUNT", b"1000",
                                    b"BLOCK", b"1000", b"STREAMS", b"floor:q", b">")  # fmt: skip
        for _, entries in found or []:
            for entry in entries:
                task = loop.create_task(run(entry))
                running.add(task)
                task.add_done_callback(running.discard)


# --------------------------------------------------------------------------- the run


def start_floor(stack: bench.Stack, redis_url: str) -> str:
    port = redis_url.rsplit(":", 1)[1].split("/")[0]
    me = [sys.executable, str(Path(__file__).resolve())]
    stack.children["worker"] = bench.Child(
        "worker", [*me, "--role", "worker", "--redis-port", port, "--upstream", stack.mock_url]
    )
    stack.children["ingress"] = bench.Child(
        "ingress", [*me, "--role", "ingress", "--redis-port", port]
    )
    stack.children["worker"].wait_for(r"worker ready", 30)
    found = stack.children["ingress"].wait_for(r"listening on http://[\d.]+:(\d+)", 30)
    return f"http://{bench.HOST}:{found.group(1)}"


def measure(stack: bench.Stack, url: str, connections: int, seconds: int) -> dict[str, float]:
    sc = bench.Scenario("X", "floor", "mock", connections, seconds)
    bench.wait_idle(stack.mock_url)
    before, started = bench.cpu_now(stack), time.monotonic()
    result = bench.run_wrk(url + bench.CHAT_PATH, sc, seconds)
    cpu = bench.cpu_percent(before, bench.cpu_now(stack), time.monotonic() - started)
    stack.check_alive()
    row = {"rps": result.rps, "p50": result.p50_ms or 0.0}
    for name in ("ingress", "worker", "redis"):
        row[name] = 10_000 * cpu.get(name, 0.0) / result.rps if result.rps else 0.0
    row["cpu"] = row["ingress"] + row["worker"] + row["redis"]
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--role", choices=("ingress", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--redis-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role is not None:
        import uvloop

        if args.role == "ingress":
            uvloop.run(floor_ingress(args.redis_port, 0))
        else:
            uvloop.run(floor_worker(args.redis_port, args.upstream))
        return 0
    bench.check_prerequisites()
    bench.raise_fd_limit()
    rows: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="llmb-floor-") as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "b").mkdir()
        (tmp / "f").mkdir()
        broker_stack = bench.start_stack(tmp / "b")
        floor_stack = bench.Stack()
        try:
            redis_url = floor_stack.redis_url = bench.start_redis(floor_stack, tmp / "f")
            floor_stack.children["mock"] = broker_stack.children["mock"]
            floor_stack.mock_url = broker_stack.mock_url
            floor_url = start_floor(floor_stack, redis_url)
            targets = {
                "mock": (broker_stack, broker_stack.mock_url),
                "floor": (floor_stack, floor_url),
                "broker": (broker_stack, broker_stack.broker_url),
            }
            for _, url in targets.values():  # warm up
                bench.run_wrk(url + bench.CHAT_PATH, bench.Scenario("W", "", "mock", 64, 2), 2)
            for round_ in range(args.rounds):
                for connections in (1, 64):
                    for name, (stack, url) in targets.items():
                        row = measure(stack, url, connections, args.seconds)
                        rows.setdefault((name, connections), []).append(row)
                        bench.log(
                            f"round {round_ + 1} c={connections} {name}: {row['rps']:,.0f} req/s, "
                            f"p50 {row['p50']:.3f} ms, CPU {row['cpu']:.0f} µs/request"
                        )
        finally:
            floor_stack.children.pop("mock", None)
            floor_stack.stop()
            broker_stack.stop()
    text = render(rows, args)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


def render(rows: dict[tuple[str, int], list[dict[str, float]]], args: argparse.Namespace) -> str:
    def med(name: str, c: int, key: str) -> float:
        return statistics.median(r[key] for r in rows[(name, c)])

    lines = [
        f"# The floor of the topology ({args.rounds} rounds of {args.seconds} s, medians)",
        "",
        "| target | conns | req/s | p50 | added p50 | CPU µs/request: ingress | worker "
        "| Redis | sum |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in (1, 64):
        for name in ("mock", "floor", "broker"):
            added = (
                "" if name == "mock" else f"{med(name, c, 'p50') - med('mock', c, 'p50'):.3f} ms"
            )
            cpu = (
                ["", "", "", ""]
                if name == "mock"
                else [f"{med(name, c, k):.0f}" for k in ("ingress", "worker", "redis", "cpu")]
            )
            lines.append(
                f"| {name} | {c} | {med(name, c, 'rps'):,.0f} | {med(name, c, 'p50'):.3f} ms "
                f"| {added} | " + " | ".join(cpu) + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
