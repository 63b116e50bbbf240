"""The model API's calls served without aiohttp's request and response objects.

aiohttp's request path (its protocol's loop, the request, the router, the
response and its writer) cost as much CPU per call as the rest of the ingress
did. A :class:`Connection` reads HTTP with httptools instead. A request to one
of the data plane's endpoints (``POST /v1/chat/completions``, ``/v1/embeddings``
and ``/v1/messages``, as HTTP/1.1 without a query string) is served here: the
app's middleware and the route's handler run on a :class:`FastRequest`, the
part of ``web.Request`` they use, and a whole answer is written in one piece
(a stream is written by aiohttp's own response and writer, as before).

Everything else goes to aiohttp, unchanged: the connection is handed to
aiohttp's protocol with the bytes read so far and stays with it. That is every
other request, and a data-plane request that is not plain: ``Expect``,
``Content-Encoding``, ``Prefer`` (an async job), an upgrade, a head or body
over the limits (aiohttp answers 413 or 400), a malformed request (its JSON
error object). Handing over needs the request to begin at the start of a read,
which a request sent after the previous answer does. A client that pipelines
(sends the next request before the answer, which RFC 9112 tells clients not to
do after a POST) has its pipelined data-plane requests answered in order; a
pipelined request that would need aiohttp ends the connection once the answers
before it are written, unanswered (the client sends it again on a new one).

``ingress.fast_path: false`` serves every request through aiohttp.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, cast

import httptools
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.web_urldispatcher import UrlMappingMatchInfo
from multidict import CIMultiDict, CIMultiDictProxy

from llm_broker.ingress.server import MAX_HEADER_BYTES

log = logging.getLogger("llm_broker.ingress")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The endpoints served here (POST, HTTP/1.1, no query string).
PATHS = ("/v1/chat/completions", "/v1/embeddings", "/v1/messages")
#: Request headers that send a request to aiohttp: what only it handles
#: (``Expect: 100-continue``, compressed bodies, upgrades) and async jobs.
AIOHTTP_HEADERS = ("Expect", "Content-Encoding", "Prefer", "Upgrade")
#: A connection stops reading while it holds this many requests unanswered.
MAX_QUEUED = 16
#: An idle connection closes after this long (aiohttp's default keep-alive).
KEEPALIVE_S = 3630.0


@dataclass(frozen=True)
class Route:
    path: str
    handler: Handler  # the route's handler inside the app's middleware
    match_info: UrlMappingMatchInfo


class FastRequest:
    """A data-plane request: the part of ``web.Request`` that the middleware, the
    handlers, the response cache, the access log and a streamed response use."""

    __slots__ = (
        "_body",
        "_conn",
        "_items",
        "app",
        "content_length",
        "headers",
        "keep_alive",
        "match_info",
        "path",
    )
    method = "POST"
    version = HttpVersion11

    def __init__(
        self,
        app: web.Application,
        route: Route,
        headers: CIMultiDictProxy[str],
        body: bytes,
        keep_alive: bool,
        conn: Connection,
    ) -> None:
        self.app = app
        self.path = route.path
        self.match_info = route.match_info
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = len(body)
        self._body = body
        self._items: dict[Any, Any] = {}
        self._conn = conn

    @property
    def content_type(self) -> str:
        raw = self.headers.get("Content-Type")
        if raw is None:
            return "application/octet-stream"
        return raw.split(";", 1)[0].strip().lower()

    async def read(self) -> bytes:
        return self._body

    def __getitem__(self, key: Any) -> Any:
        return self._items[key]

    def __setitem__(self, key: Any, value: Any) -> None:
        self._items[key] = value

    def get(self, key: Any, default: Any = None) -> Any:
        return self._items.get(key, default)

    # What web.StreamResponse.prepare() asks of a request: a stream is written by
    # aiohttp's own response and writer on this connection.
    @property
    def _payload_writer(self) -> StreamWriter:
        return StreamWriter(self._conn, self._conn._loop)

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        if self.app.on_response_prepare:
            await self.app.on_response_prepare.send(cast(web.Request, self), response)


class DataPlane:
    """What the connections of one listening socket share."""

    def __init__(
        self, runner: web.BaseRunner, app: web.Application, paths: Iterable[str] = PATHS
    ) -> None:
        assert runner.server is not None, "the runner is set up"
        self.server = runner.server
        self.app = app
        self.limit = app._client_max_size
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.closing = False
        #: Routes by their request line.
        self.routes: dict[bytes, Route] = {}
        for path in paths:
            route = _post_route(app, path)
            if route is not None:
                self.routes[f"POST {path} HTTP/1.1".encode()] = route

    def route(self, method: bytes, url: bytes, version: str) -> Route | None:
        if version != "1.1":
            return None
        return self.routes.get(b"%s %s HTTP/1.1" % (method, url))

    def __call__(self) -> Connection:
        return Connection(self)

    def close(self) -> None:
        """Stop: idle connections close now, busy ones after their answers."""
        self.closing = True
        for conn in list(self.connections):
            conn.close_when_idle()


def _post_route(app: web.Application, path: str) -> Route | None:
    for resource in app.router.resources():
        if resource.canonical != path:
            continue
        for route in resource:
            if route.method == "POST":
                handler: Handler = route.handler
                for middleware in reversed(app.middlewares):
                    handler = functools.partial(middleware, handler=handler)
                match_info = UrlMappingMatchInfo({}, route)
                match_info.add_app(app)
                return Route(path, handler, match_info)
    return None


class Connection(BaseProtocol):
    """One client connection while it is served here (see the module's text)."""

    def __init__(self, plane: DataPlane) -> None:
        super().__init__(plane.loop)
        self._plane = plane
        self._http = httptools.HttpRequestParser(self)
        #: The request being read: its URL, head size, headers, body, route.
        self._url = b""
        self._head = 0
        self._header_list: list[tuple[str, str]] = []
        self._headers: CIMultiDictProxy[str] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._route: Route | None = None
        self._reading = False
        #: The bytes of the request being read, when it began a read (else None):
        #: what aiohttp gets if the request goes to it.
        self._raw: list[bytes] | None = None
        #: The request being read goes elsewhere (set in a parser callback).
        self._bail = False
        #: Requests read and not yet answered, and the task answering them.
        self._queue: deque[tuple[FastRequest, Handler]] = deque()
        self._task: asyncio.Task[None] | None = None
        #: Bytes for aiohttp, waiting for the answers before them to be written.
        self._handover: list[bytes] | None = None
        #: Close once the answers in hand are written; read nothing more.
        self._end = False
        #: The keep-alive timer (one at a time, moved on rather than made again for
        #: each request: see :meth:`_arm_idle`) and when the connection last fell idle.
        self._idle: asyncio.TimerHandle | None = None
        self._idle_at = 0.0
        #: Reading was paused here (requests queued, or a hand-over waiting).
        self._read_paused = False

    # ------------------------------------------------------------ the transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._plane.connections.add(self)
        if self._plane.closing:
            self._end = True
            self.transport.close()  # type: ignore[union-attr]
            return
        self._arm_idle()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._plane.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self._task is not None:
            self._task.cancel()  # the client went away: its call is cancelled

    def data_received(self, data: bytes) -> None:
        if self._end:
            return
        if self._handover is not None:
            self._handover.append(data)
            return
        if not self._reading:
            # A read that begins a request: served here only on a data-plane route.
            end = data.find(b"\r\n")
            if end < 0 or data[:end] not in self._plane.routes:
                self._to_aiohttp([data])
                return
            self._raw = [data]
        elif self._raw is not None:
            self._raw.append(data)
        try:
            self._http.feed_data(data)
        except (httptools.HttpParserUpgrade, httptools.HttpParserError):
            self._bail = True  # aiohttp takes it (an upgrade; a malformed request's error object)
        if self._bail:
            self._give_up()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._handover is not None and self._task is None:
            self._to_aiohttp(self._handover)

    def _pause_reading(self) -> None:
        if self.transport is not None and not self._read_paused:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and self._read_paused:
            self._read_paused = False
            self.transport.resume_reading()

    def close_when_idle(self) -> None:
        self._end = True
        if self._task is None and self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        """The connection falls idle: it closes :data:`KEEPALIVE_S` from now unless a
        request comes first. A timer made and cancelled for each request cost as
        much as a tenth of the request's parsing: the timer is made once and, when
        it fires on a connection used since, set for the new time."""
        self._idle_at = now = self._loop.time()
        if self._idle is None:
            self._idle = self._loop.call_at(now + KEEPALIVE_S, self._idle_close)

    def _idle_close(self) -> None:
        self._idle = None
        if self.transport is None:
            return
        if self._task is not None or self._reading:  # in use: idle again later
            self._idle = self._loop.call_later(KEEPALIVE_S, self._idle_close)
            return
        due = self._idle_at + KEEPALIVE_S
        if self._loop.time() < due:
            self._idle = self._loop.call_at(due, self._idle_close)
        else:
            self.transport.close()

    # ------------------------------------------------------------ to aiohttp

    def _give_up(self) -> None:
        """The request being read is not served here: aiohttp gets it if it began
        a read, else the connection ends after the answers before it."""
        raw, self._raw = self._raw, None
        self._reading = False
        if raw is None:
            self._end = True
            self._pause_reading()
            if self._task is None and self.transport is not None:
                self.transport.close()
            return
        self._to_aiohttp(raw)

    def _to_aiohttp(self, chunks: list[bytes]) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._task is not None or self.writing_paused:
            # Answers before it are still being written: hand over after them.
            if self._handover is None:
                self._handover = chunks
                self._pause_reading()
            return
        self._handover = None
        self._end = True
        self._plane.connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        handler = self._plane.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        self._resume_reading()
        data = b"".join(chunks)
        if data:
            handler.data_received(data)

    # ------------------------------------------------------------ parser callbacks

    def on_message_begin(self) -> None:
        if self._bail:
            return
        self._reading = True
        self._url = b""
        self._head = 0
        self._header_list = []
        self._body = []
        self._size = 0

    def on_url(self, url: bytes) -> None:
        if self._bail:
            return
        self._url += url
        self._head += len(url)
        if self._head > MAX_HEADER_BYTES:
            self._bail = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._bail:
            return
        self._head += len(name) + len(value)
        if self._head > MAX_HEADER_BYTES:
            self._bail = True
            return
        self._header_list.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        if self._bail:
            return
        parser = self._http
        route = self._plane.route(parser.get_method(), self._url, parser.get_http_version())
        headers = CIMultiDictProxy(CIMultiDict(self._header_list))
        length = headers.get("Content-Length")
        if (
            route is None
            or any(name in headers for name in AIOHTTP_HEADERS)
            or (length is not None and (not length.isdigit() or int(length) > self._plane.limit))
        ):
            self._bail = True
            return
        self._route = route
        self._headers = headers

    def on_body(self, body: bytes) -> None:
        if self._bail:
            return
        self._size += len(body)
        if self._size > self._plane.limit:
            self._bail = True  # aiohttp answers 413
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        if self._bail:
            return
        route, headers = self._route, self._headers
        assert route is not None and headers is not None
        keep_alive = self._http.should_keep_alive()
        body = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        request = FastRequest(self._plane.app, route, headers, body, keep_alive, self)
        self._reading = False
        self._raw = None
        self._route = self._headers = None
        self._queue.append((request, route.handler))
        if not keep_alive:
            self._end = True  # nothing after it is read
        if self._task is None:
            self._task = self._loop.create_task(self._serve())
        elif len(self._queue) >= MAX_QUEUED:
            self._pause_reading()

    # ------------------------------------------------------------ answers

    async def _serve(self) -> None:
        try:
            while self._queue:
                request, handler = self._queue.popleft()
                if self._read_paused and self._handover is None and not self._end:
                    self._resume_reading()
                response = await handler(cast(web.Request, request))
                if self.transport is None:
                    return
                await self._answer(request, response)
                if not request.keep_alive:
                    self._end = True
                    break
        except Exception:  # a defect in answering: the connection cannot go on
            log.exception("answering a request failed")
            self._end = True
        finally:
            self._task = None
            transport = self.transport
            if transport is not None:
                if self._handover is not None and not self._end:
                    self._to_aiohttp(self._handover)
                elif self._end or self._plane.closing:
                    transport.close()
                elif not self._reading:
                    self._arm_idle()

    async def _answer(self, request: FastRequest, response: web.StreamResponse) -> None:
        if response.prepared:  # a stream the handler wrote
            await response.write_eof()
            return
        body = response.body if isinstance(response, web.Response) else None
        headers = response.headers
        if type(response) is not web.Response or type(body) is not bytes or not headers:
            await response.prepare(cast(web.Request, request))
            await response.write_eof()
            return
        lines = [f"HTTP/1.1 {response.status} {response.reason}\r\n"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value:
                raise ValueError(f"a line break in the value of header {name}")
            lines.append(f"{name}: {value}\r\n")
        lines.append(f"Content-Length: {len(body)}\r\nDate: {rfc822_formatted_time()}\r\n")
        lines.append(f"Server: {SERVER_SOFTWARE}\r\n")
        if not request.keep_alive or self._end or self._plane.closing:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        assert self.transport is not None
        self.transport.write("".join(lines).encode("latin-1") + body)


class DataPlaneSite(web.TCPSite):
    """A TCP site whose connections are :class:`Connection`\\ s: the data plane's
    calls are served by them, everything else by the runner's aiohttp server."""

    _plane: DataPlane | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        self._plane = DataPlane(self._runner, cast(web.AppRunner, self._runner).app)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._plane,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port

    async def stop(self) -> None:
        await super().stop()
        if self._plane is not None:
            self._plane.close()
