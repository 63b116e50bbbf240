"""The worker's upstream HTTP client against real local servers (plain and TLS)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from llm_broker.workers.http import (
    ConnectError,
    ConnectionPool,
    Origin,
    ResponseInterrupted,
    build_request,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Server:
    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self.disconnects = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, handler: Handler, ssl_context: ssl.SSLContext | None = None) -> None:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            if peer is not None:
                self.peers.append(peer)
            try:
                return await handler(request)
            except (asyncio.CancelledError, ConnectionResetError):
                self.disconnects += 1
                raise

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", wrapped)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    s = Server()
    yield s
    await s.stop()


def _request(pool: ConnectionPool, body: bytes = b"{}") -> bytes:
    return build_request(pool.origin, "/chat", body, {"Content-Type": "application/json"})


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {"path": request.path, "length": len(body), "host": request.headers["Host"]}
    )


def test_origin_parsing() -> None:
    o = Origin.parse("https://api.example.com/v1/")
    assert (o.scheme, o.host, o.port, o.path, o.host_header) == (
        "https",
        "api.example.com",
        443,
        "/v1",
        "api.example.com",
    )
    assert Origin.parse("http://127.0.0.1:8080").host_header == "127.0.0.1:8080"
    with pytest.raises(ValueError, match="not an http"):
        Origin.parse("ftp://example.com")


async def test_keep_alive_reuses_one_connection(server: Server) -> None:
    await server.start(echo)
    pool = ConnectionPool(Origin.parse(f"http://127.0.0.1:{server.port}/v1"), connect_timeout=2)
    try:
        for i in range(5):
            resp = await pool.request(_request(pool, b"x" * i))
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("application/json")
            body = await resp.read()
            assert f'"length": {i}'.encode() in body or f'"length":{i}'.encode() in body
            assert b"/v1/chat" in body
        assert len(set(server.peers)) == 1
    finally:
        pool.close()


async def test_chunked_stream_arrives_in_pieces(server: Server) -> None:
    release = asyncio.Event()

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"data: one\n\n")
        await release.wait()
        await resp.write(b"data: two\n\n")
        await resp.write_eof()
        return resp

    await server.start(stream)
    pool = ConnectionPool(Origin.parse(f"http://127.0.0.1:{server.port}"), connect_timeout=2)
    try:
        resp = await pool.request(_request(pool))
        chunks = resp.chunks()
        assert await anext(chunks) == b"data: one\n\n"  # before the server sends the rest
        release.set()
        rest = b"".join([c async for c in chunks])
        assert rest == b"data: two\n\n"
        resp2 = await pool.request(_request(pool))  # the connection went back to the pool
        await resp2.read()
        assert len(set(server.peers)) == 1
    finally:
        pool.close()


async def test_connection_refused_is_a_connect_error() -> None:
    from llm_broker.dev import free_port

    port = free_port()
    pool = ConnectionPool(Origin.parse(f"http://127.0.0.1:{port}"), connect_timeout=2)
    with pytest.raises(ConnectError, match=f"cannot connect to 127.0.0.1:{port}") as caught:
        await pool.request(_request(pool))
    # The message (for logs) says where; the reason (for clients) only what.
    assert caught.value.reason == "connection refused"


async def test_server_closing_mid_body_is_interrupted(server: Server) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"partial")
        assert request.transport is not None
        request.transport.close()
        return resp

    await server.start(cut)
    pool = ConnectionPool(Origin.parse(f"http://127.0.0.1:{server.port}"), connect_timeout=2)
    resp = await pool.request(_request(pool))
    with pytest.raises(ResponseInterrupted):
        await resp.read()


async def test_stale_pooled_connection_is_retried_on_a_new_one(server: Server) -> None:
    async def close_after(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"Connection": "keep-alive"})

    await server.start(close_after)
    pool = ConnectionPool(Origin.parse(f"http://127.0.0.1:{server.port}"), connect_timeout=2)
    try:
        await (await pool.request(_request(pool))).read()
        # The server restarts: the pooled connection is dead, the request still succeeds.
        await server.stop()
        await server.start(close_after)
        pool.origin = Origin.parse(f"http://127.0.0.1:{server.port}")
        resp = await pool.request(_request(pool))
        assert await resp.read() == b"ok"
    finally:
        pool.close()


async def test_cancelling_a_call_closes_its_connection(server: Server) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="late")

    await server.start(slow)
    pool = ConnectionPool(Origin.parse(f"http://127.0.0.1:{server.port}"), connect_timeout=2)
    call = asyncio.ensure_future(pool.request(_request(pool)))
    for _ in range(200):  # bounded wait for the server to receive the request
        if server.peers:
            break
        await asyncio.sleep(0.01)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(200):  # bounded wait for the server to notice the disconnect
        if server.disconnects:
            break
        await asyncio.sleep(0.01)
    assert server.disconnects == 1


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@needs_openssl
async def test_tls(server: Server, tmp_path: Path) -> None:
    cert, key = await asyncio.to_thread(_self_signed, tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    await server.start(echo, ssl_context=server_ctx)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    pool = ConnectionPool(
        Origin.parse(f"https://localhost:{server.port}/v1"),
        connect_timeout=2,
        ssl_context=client_ctx,
    )
    try:
        resp = await pool.request(_request(pool, b"hello"))
        assert resp.status == 200
        assert b"localhost:" in await resp.read()
        untrusting = ConnectionPool(pool.origin, connect_timeout=2)
        with pytest.raises(ConnectError):
            await untrusting.request(_request(untrusting))
    finally:
        pool.close()


class ConnectProxy:
    """A minimal HTTP CONNECT proxy that relays bytes and records what it was asked."""

    def __init__(self, require_auth: str | None = None) -> None:
        self.require_auth = require_auth
        self.targets: list[str] = []
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in self._writers:
                writer.close()
            await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        target = head.split("\r\n", 1)[0].split(" ", 2)[1]
        self.targets.append(target)
        if self.require_auth and f"Proxy-Authorization: {self.require_auth}" not in head:
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
            writer.close()
            return
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self._writers.append(up_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


@pytest.fixture
async def proxy() -> AsyncIterator[ConnectProxy]:
    p = ConnectProxy(require_auth="Basic dXNlcjpwQHNz")  # user:p@ss
    await p.start()
    yield p
    await p.stop()


async def test_plain_upstream_through_a_connect_proxy(server: Server, proxy: ConnectProxy) -> None:
    await server.start(echo)
    pool = ConnectionPool(
        Origin.parse(f"http://127.0.0.1:{server.port}/v1"),
        connect_timeout=2,
        proxy_url=f"http://user:p%40ss@127.0.0.1:{proxy.port}",
    )
    try:
        for _ in range(3):
            resp = await pool.request(_request(pool, b"abc"))
            assert resp.status == 200
            assert b"/v1/chat" in await resp.read()
        assert proxy.targets == [f"127.0.0.1:{server.port}"]  # one tunnel, kept alive
    finally:
        pool.close()


async def test_proxy_refusal_is_a_connect_error(server: Server, proxy: ConnectProxy) -> None:
    await server.start(echo)
    pool = ConnectionPool(
        Origin.parse(f"http://127.0.0.1:{server.port}"),
        connect_timeout=2,
        proxy_url=f"http://127.0.0.1:{proxy.port}",  # no credentials
    )
    with pytest.raises(ConnectError, match="HTTP 407") as caught:
        await pool.request(_request(pool))
    assert caught.value.reason == "the proxy refused the tunnel (HTTP 407)"


@needs_openssl
async def test_tls_through_a_connect_proxy(
    server: Server, proxy: ConnectProxy, tmp_path: Path
) -> None:
    cert, key = await asyncio.to_thread(_self_signed, tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    await server.start(echo, ssl_context=server_ctx)
    pool = ConnectionPool(
        Origin.parse(f"https://localhost:{server.port}/v1"),
        connect_timeout=2,
        ssl_context=ssl.create_default_context(cafile=str(cert)),
        proxy_url=f"http://user:p%40ss@127.0.0.1:{proxy.port}",
    )
    try:
        resp = await pool.request(_request(pool, b"secret"))
        assert resp.status == 200
        assert b"localhost:" in await resp.read()
        assert proxy.targets == [f"localhost:{server.port}"]
    finally:
        pool.close()
