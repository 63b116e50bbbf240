"""Fast, deterministic, OpenAI-compatible mock LLM upstream.

Built directly on asyncio protocols (uvloop when available) and ``httptools`` so that
it can serve tens of thousands of requests per second on a single core; benchmarks
then measure the gateway rather than the mock.

Behaviour of ``POST /v1/chat/completions`` is controlled (in increasing priority) by
the server defaults, by tokens in the model name and by an optional ``"mock"`` body
field::

    mock                      defaults
    mock-slow                 latency_ms = 2000
    mock-latency-1000         latency_ms = 1000   (also ``lat``)
    mock-chunks-20-delay-50   20 words, 50 ms between stream chunks
    mock-error-429            HTTP 429 (+ Retry-After) after latency_ms
    mock-failafter-3          stream: close the connection after 3 content chunks

    {"mock": {"latency_ms": .., "chunks": .., "chunk_delay_ms": .., "error": ..,
              "fail_after": .., "retry_after": ..}}

Content is deterministic: ``seed = zlib.crc32(text of the last message)`` (text parts of
a multi-part content are joined with single spaces) and word ``k`` is
``WORDS[(seed + k) % len(WORDS)]``. Usage counts whitespace-separated words.

Run standalone: ``python -m llm_broker.mock_upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import http
import itertools
import signal
import sys
import time
import zlib
from dataclasses import dataclass
from typing import Any, cast

import httptools
import orjson

__all__ = ["WORDS", "MockDefaults", "MockState", "main", "run", "start_server"]

WORDS: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy",
    "dog", "while", "bright", "stars", "shine", "above", "quiet", "hills",
    "and", "gentle", "rivers", "flow", "past", "old", "stone", "bridges",
    "under", "soft", "silver", "light", "of", "early", "morning", "sun",
)  # fmt: skip
_NWORDS = len(WORDS)

_AUTH_HISTORY = 100
_MODEL_CACHE_MAX = 4096
_MAX_CHUNKS = 100_000


@dataclass(frozen=True)
class MockDefaults:
    latency_ms: float = 0.0  # delay before the first byte of the response
    chunks: int = 8  # number of content words / stream chunks
    chunk_delay_ms: float = 0.0  # delay between stream chunks


class MockState:
    """Per-server counters (exposed as JSON by ``GET /mock/stats``)."""

    __slots__ = ("auth_seen", "calls", "completed", "disconnects", "in_flight", "peak_in_flight")

    def __init__(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.completed = 0
        self.disconnects = 0
        self.auth_seen: collections.deque[str] = collections.deque(maxlen=_AUTH_HISTORY)

    def snapshot(self) -> dict[str, object]:
        return {
            "calls": self.calls,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "completed": self.completed,
            "disconnects": self.disconnects,
            "auth_seen": list(self.auth_seen),
        }

    def reset(self) -> None:
        """Zero the counters. ``in_flight`` is a live gauge and is kept (peak := current)."""
        self.calls = 0
        self.completed = 0
        self.disconnects = 0
        self.peak_in_flight = self.in_flight
        self.auth_seen.clear()


# --------------------------------------------------------------------------- constants

_CRLF = b"\r\n"
_JSON_CT = b"application/json"
_CLOSE_HDR = b"Connection: close\r\n"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
)
_CHUNKED_END = b"0\r\n\r\n"
_DONE_EVENT = b"data: [DONE]\n\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_AUTH_HEADERS = frozenset((b"authorization", b"x-api-key", b"api-key"))

_MODELS_BODY = orjson.dumps(
    {
        "object": "list",
        "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "mock"}],
    }
)
_HEALTH_BODY = b'{"status":"ok"}'
_EMPTY_BODY = b"{}"

_CHAT_PATHS = frozenset((b"/v1/chat/completions", b"/chat/completions"))
_EMBED_PATHS = frozenset((b"/v1/embeddings", b"/embeddings"))

# Stream deltas for each word, first position (no leading space) and later positions.
_DELTA_FIRST: tuple[bytes, ...] = tuple(orjson.dumps({"content": w}) for w in WORDS)
_DELTA_REST: tuple[bytes, ...] = tuple(orjson.dumps({"content": " " + w}) for w in WORDS)
_DELTA_ROLE = b'{"role":"assistant","content":""}'
_FINISH_NULL = b',"finish_reason":null}]}\n\n'
_FINISH_STOP = b'{},"finish_reason":"stop"}]}\n\n'
_FINISH_LENGTH = b'{},"finish_reason":"length"}]}\n\n'

_status_lines: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _status_lines.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        line = b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))
        _status_lines[status] = line
    return line


def _response(
    status: int, body: bytes, keep_alive: bool, ctype: bytes = _JSON_CT, extra: bytes = b""
) -> bytes:
    return b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
        _status_line(status),
        ctype,
        len(body),
        extra,
        b"" if keep_alive else _CLOSE_HDR,
        body,
    )


def _error_type(status: int) -> str:
    if status == 400:
        return "invalid_request_error"
    if status == 429:
        return "rate_limit_error"
    if 500 <= status <= 599:
        return "server_error"
    return "api_error"


def _error_body(status: int, message: str) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": _error_type(status), "param": None, "code": None}}
    )


def _error_response(
    status: int, message: str, keep_alive: bool, retry_after: str | None = None
) -> bytes:
    extra = b""
    if status in (429, 503):
        extra = b"Retry-After: %s\r\n" % (retry_after or "1").encode("latin-1")
    return _response(status, _error_body(status, message), keep_alive, extra=extra)


# --------------------------------------------------------------------------- parameters


class _Params:
    """Resolved behaviour of one request."""

    __slots__ = ("chunk_delay_ms", "chunks", "error", "fail_after", "latency_ms", "retry_after")

    def __init__(self, d: MockDefaults) -> None:
        self.latency_ms: float = d.latency_ms
        self.chunks: int = d.chunks
        self.chunk_delay_ms: float = d.chunk_delay_ms
        self.error: int | None = None
        self.fail_after: int | None = None
        self.retry_after: str | None = None


# Per-model-name overrides: (latency_ms, chunks, chunk_delay_ms, error, fail_after, retry_after)
_ModelOverrides = tuple[float | None, int | None, float | None, int | None, int | None, str | None]
_NO_OVERRIDES: _ModelOverrides = (None, None, None, None, None, None)
_model_cache: dict[str, _ModelOverrides] = {}


def _num(tok: str) -> float | None:
    try:
        v = float(tok)
    except ValueError:
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def _parse_model(model: str) -> _ModelOverrides:
    cached = _model_cache.get(model)
    if cached is not None:
        return cached
    latency: float | None = None
    chunks: int | None = None
    delay: float | None = None
    error: int | None = None
    fail_after: int | None = None
    retry_after: str | None = None
    toks = model.lower().split("-")[1:]
    i = 0
    n = len(toks)
    while i < n:
        tok = toks[i]
        if tok == "slow":
            latency = 2000.0
            i += 1
            continue
        if tok in ("latency", "lat", "chunks", "delay", "error", "failafter", "retryafter"):
            v = _num(toks[i + 1]) if i + 1 < n else None
            if v is not None:
                if tok in ("latency", "lat"):
                    latency = max(v, 0.0)
                elif tok == "chunks":
                    chunks = min(max(int(v), 0), _MAX_CHUNKS)
                elif tok == "delay":
                    delay = max(v, 0.0)
                elif tok == "error":
                    error = int(v)
                elif tok == "failafter":
                    fail_after = max(int(v), 0)
                else:
                    retry_after = str(int(v))
                i += 2
                continue
        i += 1
    result: _ModelOverrides = (latency, chunks, delay, error, fail_after, retry_after)
    if result == _NO_OVERRIDES:
        result = _NO_OVERRIDES
    if len(_model_cache) >= _MODEL_CACHE_MAX:
        _model_cache.clear()
    _model_cache[model] = result
    return result


def _as_number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def _resolve(defaults: MockDefaults, model: str, body: dict[str, Any]) -> _Params:
    p = _Params(defaults)
    ov = _parse_model(model)
    if ov is not _NO_OVERRIDES:
        latency, chunks, delay, error, fail_after, retry_after = ov
        if latency is not None:
            p.latency_ms = latency
        if chunks is not None:
            p.chunks = chunks
        if delay is not None:
            p.chunk_delay_ms = delay
        if error is not None:
            p.error = error
        if fail_after is not None:
            p.fail_after = fail_after
        if retry_after is not None:
            p.retry_after = retry_after
    mock = body.get("mock")
    if isinstance(mock, dict):
        v = _as_number(mock.get("latency_ms"))
        if v is not None:
            p.latency_ms = max(v, 0.0)
        v = _as_number(mock.get("chunks"))
        if v is not None:
            p.chunks = min(max(int(v), 0), _MAX_CHUNKS)
        v = _as_number(mock.get("chunk_delay_ms"))
        if v is not None:
            p.chunk_delay_ms = max(v, 0.0)
        v = _as_number(mock.get("error"))
        if v is not None:
            p.error = int(v)
        v = _as_number(mock.get("fail_after"))
        if v is not None:
            p.fail_after = max(int(v), 0)
        ra = mock.get("retry_after")
        if isinstance(ra, str) and ra:
            p.retry_after = ra
        else:
            v = _as_number(ra)
            if v is not None:
                p.retry_after = str(int(v))
    if p.error is not None and not 400 <= p.error <= 599:
        p.error = None
    return p


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ]
        return parts[0] if len(parts) == 1 else " ".join(parts)
    return ""


def _word_count(text: str) -> int:
    return len(text.split())


# --------------------------------------------------------------------------- plans


class _Plan:
    """What to send for one request; executed synchronously or in a task."""

    __slots__ = ("abort", "counted", "delay", "events", "head", "latency", "tail")

    def __init__(
        self,
        head: bytes,
        *,
        counted: bool = True,
        latency: float = 0.0,
        events: list[bytes] | None = None,
        tail: bytes = b"",
        delay: float = 0.0,
        abort: bool = False,
    ) -> None:
        self.head = head  # full response, or status line + headers for streams
        self.counted = counted  # chat/embeddings request: tracked by in_flight/completed
        self.latency = latency  # seconds before the first byte
        self.events = events  # stream: chunk-framed events written one by one
        self.tail = tail  # stream: chunk-framed final events + terminator
        self.delay = delay  # seconds between word events
        self.abort = abort  # close the connection after the events (fail_after)


def _frame(ev: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(ev), ev)


# --------------------------------------------------------------------------- application


class _App:
    __slots__ = ("conns", "defaults", "ids", "state")

    def __init__(self, defaults: MockDefaults) -> None:
        self.defaults = defaults
        self.state = MockState()
        self.ids = itertools.count(1)
        self.conns: set[_Conn] = set()

    # -- routing ---------------------------------------------------------------------

    def dispatch(self, method: bytes, url: bytes, body: bytes, keep_alive: bool) -> _Plan:
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        if len(path) > 1 and path.endswith(b"/"):
            path = path[:-1]
        if method == b"POST":
            if path in _CHAT_PATHS:
                return self.chat(body, keep_alive)
            if path in _EMBED_PATHS:
                return self.embeddings(body, keep_alive)
            if path == b"/mock/reset":
                self.state.reset()
                return _Plan(_response(200, _EMPTY_BODY, keep_alive), counted=False)
        elif method == b"GET":
            if path == b"/health":
                return _Plan(_response(200, _HEALTH_BODY, keep_alive), counted=False)
            if path == b"/v1/models" or path == b"/models":
                return _Plan(_response(200, _MODELS_BODY, keep_alive), counted=False)
            if path == b"/mock/stats":
                body = orjson.dumps(self.state.snapshot())
                return _Plan(_response(200, body, keep_alive), counted=False)
        msg = f"unknown route: {method.decode('latin-1')} {path.decode('latin-1')}"
        return _Plan(_error_response(404, msg, keep_alive), counted=False)

    @staticmethod
    def _load(body: bytes) -> dict[str, Any] | None:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None

    # -- chat ------------------------------------------------------------------------

    def _behaviour(
        self, req: dict[str, Any], keep_alive: bool
    ) -> tuple[str, _Params, float, _Plan | None]:
        """The model name, the resolved behaviour, the latency in seconds and, when
        the behaviour is an injected error, the plan that answers it."""
        model = req.get("model")
        if not isinstance(model, str) or not model:
            model = "mock"
        p = _resolve(self.defaults, model, req)
        latency = p.latency_ms / 1000.0
        failure = None
        if p.error is not None:
            msg = f"mock upstream error {p.error}"
            failure = _Plan(
                _error_response(p.error, msg, keep_alive, p.retry_after), latency=latency
            )
        return model, p, latency, failure

    def chat(self, raw: bytes, keep_alive: bool) -> _Plan:
        req = self._load(raw)
        if req is None:
            return _Plan(_error_response(400, "invalid JSON body", keep_alive))
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            return _Plan(_error_response(400, "'messages' is required", keep_alive))
        model, p, latency, failure = self._behaviour(req, keep_alive)
        if failure is not None:
            return failure

        prompt_tokens = 0
        text = ""
        for m in messages:
            if not isinstance(m, dict):
                return _Plan(_error_response(400, "each message must be an object", keep_alive))
            text = _content_text(m.get("content"))
            prompt_tokens += _word_count(text)
        if prompt_tokens < 1:
            prompt_tokens = 1
        seed = zlib.crc32(text.encode("utf-8", "surrogatepass"))

        n = p.chunks
        finish = "stop"
        max_tokens = req.get("max_completion_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            max_tokens = req.get("max_tokens")
        if isinstance(max_tokens, int) and not isinstance(max_tokens, bool):
            max_tokens = max(max_tokens, 0)
            if max_tokens < n:
                n = max_tokens
                finish = "length"

        rid = f"chatcmpl-mock-{next(self.ids)}"
        created = int(time.time())
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
        }
        if req.get("stream") is not True:
            content = " ".join([WORDS[(seed + k) % _NWORDS] for k in range(n)])
            body = orjson.dumps(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": finish,
                        }
                    ],
                    "usage": usage,
                }
            )
            return _Plan(_response(200, body, keep_alive), latency=latency)

        # Streaming: pre-render every event; the connection writes them as it goes.
        meta = b'"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s' % (
            rid.encode("ascii"),
            created,
            orjson.dumps(model),
        )
        prefix = b'data: {%s,"choices":[{"index":0,"delta":' % meta
        head = _STREAM_HEAD + (_CRLF if keep_alive else _CLOSE_HDR + _CRLF)
        head += _frame(prefix + _DELTA_ROLE + _FINISH_NULL)
        n_words = n
        abort = False
        if p.fail_after is not None:
            n_words = min(n, p.fail_after)
            abort = True
        events = [
            _frame(
                prefix + (_DELTA_REST if k else _DELTA_FIRST)[(seed + k) % _NWORDS] + _FINISH_NULL
            )
            for k in range(n_words)
        ]
        tail = b""
        if not abort:
            tail = _frame(prefix + (_FINISH_STOP if finish == "stop" else _FINISH_LENGTH))
            opts = req.get("stream_options")
            if isinstance(opts, dict) and opts.get("include_usage") is True:
                tail += _frame(
                    b'data: {%s,"choices":[],"usage":%s}\n\n' % (meta, orjson.dumps(usage))
                )
            tail += _frame(_DONE_EVENT) + _CHUNKED_END
        return _Plan(
            head,
            latency=latency,
            events=events,
            tail=tail,
            delay=p.chunk_delay_ms / 1000.0,
            abort=abort,
        )

    # -- embeddings ------------------------------------------------------------------

    def embeddings(self, raw: bytes, keep_alive: bool) -> _Plan:
        req = self._load(raw)
        if req is None:
            return _Plan(_error_response(400, "invalid JSON body", keep_alive))
        inp = req.get("input")
        inputs: list[str]
        if isinstance(inp, str):
            inputs = [inp]
        elif isinstance(inp, list) and inp:
            inputs = [x if isinstance(x, str) else orjson.dumps(x).decode() for x in inp]
        else:
            return _Plan(_error_response(400, "'input' is required", keep_alive))
        model, _, latency, failure = self._behaviour(req, keep_alive)
        if failure is not None:
            return failure
        data = []
        tokens = 0
        for i, s in enumerate(inputs):
            b = s.encode("utf-8", "surrogatepass")
            vec = [((zlib.crc32(b, j) % 20001) - 10000) / 10000.0 for j in range(8)]
            data.append({"object": "embedding", "index": i, "embedding": vec})
            tokens += _word_count(s)
        tokens = max(tokens, 1)
        body = orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )
        return _Plan(_response(200, body, keep_alive), latency=latency)


# --------------------------------------------------------------------------- connection

_Request = tuple[bytes, bytes, bytes, bool]  # method, url, body, keep_alive


class _Conn(asyncio.Protocol):
    __slots__ = (
        "app",
        "body",
        "closed",
        "drain_waiter",
        "parser",
        "pending",
        "record_auth",
        "task",
        "transport",
        "url",
        "write_paused",
    )

    def __init__(self, app: _App) -> None:
        self.app = app
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.pending: collections.deque[_Request] = collections.deque()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        self.record_auth: list[str] = []

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self.transport = cast(asyncio.Transport, transport)
        self.app.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.app.conns.discard(self)
        self.pending.clear()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self._wake_writer()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fatal(400, "protocol upgrade not supported")
        except httptools.HttpParserError:
            self._fatal(400, "malformed HTTP request")

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()

    def eof_received(self) -> bool | None:
        # Half-close: finish what is in progress, the transport closes after that.
        return None

    # -- httptools callbacks ---------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname in _AUTH_HEADERS:
            self.record_auth.append(value.decode("latin-1"))
        elif lname == b"expect" and value.lower() == b"100-continue":
            if self.transport is not None and not self.closed:
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = self.body
        raw = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        req: _Request = (self.parser.get_method(), self.url, raw, self.parser.should_keep_alive())
        if self.record_auth:
            if not self.url.startswith(b"/mock/"):
                self.app.state.auth_seen.extend(self.record_auth)
            self.record_auth = []
        if self.task is None and not self.pending:
            self._handle(req)
        else:
            self.pending.append(req)

    # -- request handling ------------------------------------------------------------

    def _fatal(self, status: int, message: str) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.pending.clear()
            if self.task is None:
                self.transport.write(_error_response(status, message, False))
            self.transport.close()

    def _handle(self, req: _Request) -> None:
        method, url, raw, keep_alive = req
        app = self.app
        state = app.state
        counted = False
        try:
            plan = app.dispatch(method, url, raw, keep_alive)
            if plan.counted:
                counted = True
                state.calls += 1
                state.in_flight += 1
                if state.in_flight > state.peak_in_flight:
                    state.peak_in_flight = state.in_flight
            if plan.latency > 0.0 or (
                plan.events is not None and plan.delay > 0.0 and len(plan.events) > 1
            ):
                self.task = asyncio.get_running_loop().create_task(self._run(plan, keep_alive))
                self.task.add_done_callback(self._task_done)
                counted = False  # the task owns the in_flight slot now
                return
            transport = self.transport
            assert transport is not None
            if plan.events is None:
                transport.write(plan.head)
            else:
                transport.write(b"".join([plan.head, *plan.events, plan.tail]))
            if plan.abort:
                self._close()
            elif counted:
                state.completed += 1
            if not keep_alive:
                self._close()
        except Exception:
            self._fatal(500, "mock upstream internal error")
        finally:
            if counted:
                state.in_flight -= 1

    async def _run(self, plan: _Plan, keep_alive: bool) -> None:
        state = self.app.state
        try:
            if plan.latency > 0.0:
                await asyncio.sleep(plan.latency)
            if self.closed or self.transport is None:
                state.disconnects += 1
                return
            transport = self.transport
            if plan.events is None:
                transport.write(plan.head)
            else:
                events = plan.events
                if plan.delay > 0.0 and events:
                    transport.write(plan.head + events[0])
                    for ev in itertools.islice(events, 1, None):
                        await asyncio.sleep(plan.delay)
                        if self.write_paused:
                            await self._drain()
                        if self.closed:
                            state.disconnects += 1
                            return
                        transport.write(ev)
                    if plan.tail:
                        transport.write(plan.tail)
                else:
                    transport.write(b"".join([plan.head, *events, plan.tail]))
            if plan.abort:
                self._close()
                return
            state.completed += 1
            if not keep_alive:
                self._close()
        except asyncio.CancelledError:
            state.disconnects += 1
            raise
        finally:
            state.in_flight -= 1

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.task = None
        if not task.cancelled() and task.exception() is not None:
            self._close()  # a response may be half-written: just drop the connection
            return
        while self.pending and self.task is None and not self.closed:
            self._handle(self.pending.popleft())

    async def _drain(self) -> None:
        while self.write_paused and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self.drain_waiter = waiter
            await waiter

    def _wake_writer(self) -> None:
        waiter = self.drain_waiter
        if waiter is not None:
            self.drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _close(self) -> None:
        self.closed = True
        self.pending.clear()
        if self.transport is not None:
            self.transport.close()


# --------------------------------------------------------------------------- server


def _close_connections(app: _App) -> None:
    for conn in list(app.conns):
        if conn.transport is not None:
            conn.transport.close()


async def start_server(
    host: str, port: int, defaults: MockDefaults = MockDefaults()
) -> tuple[asyncio.base_events.Server, MockState]:
    """Start the mock on ``host:port`` (0 = ephemeral) in the running loop.

    ``server.close()`` also closes the open client connections (so that in-process tests
    shut down cleanly); the mock's counters are in the returned :class:`MockState`.
    """
    app = _App(defaults)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Conn(app), host, port, backlog=1024)
    original_close = server.close

    def close() -> None:
        original_close()
        _close_connections(app)

    try:
        server.close = close  # type: ignore[method-assign]
    except AttributeError:  # pragma: no cover - C-implemented Server (uvloop)
        pass
    return server, app.state


def _bound_port(server: asyncio.base_events.Server, fallback: int) -> int:
    for sock in server.sockets:
        return int(sock.getsockname()[1])
    return fallback


async def _serve(host: str, port: int, defaults: MockDefaults) -> None:
    loop = asyncio.get_running_loop()
    app = _App(defaults)
    server = await loop.create_server(lambda: _Conn(app), host, port, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop.set))
    shown = f"[{host}]" if ":" in host else host
    sys.stdout.write(f"mock-upstream listening on http://{shown}:{_bound_port(server, port)}\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        server.close()
        _close_connections(app)
        try:
            await asyncio.wait_for(server.wait_closed(), timeout=2.0)
        except TimeoutError:  # pragma: no cover
            pass


def run(host: str, port: int, defaults: MockDefaults) -> None:
    """Serve until SIGTERM/SIGINT (uvloop when importable), then return."""
    loop_factory: Any = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(host, port, defaults))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The mock's command-line options (also used by ``llm-broker mock-upstream``)."""
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    ap.add_argument("--latency-ms", type=float, default=MockDefaults.latency_ms)
    ap.add_argument("--chunks", type=int, default=MockDefaults.chunks)
    ap.add_argument("--chunk-delay-ms", type=float, default=MockDefaults.chunk_delay_ms)


def run_from_args(args: argparse.Namespace) -> int:
    defaults = MockDefaults(
        latency_ms=args.latency_ms, chunks=args.chunks, chunk_delay_ms=args.chunk_delay_ms
    )
    run(args.host, args.port, defaults)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m llm_broker.mock_upstream",
        description="Fast deterministic OpenAI-compatible mock LLM upstream.",
    )
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
