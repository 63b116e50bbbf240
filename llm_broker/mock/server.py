"""Fast, deterministic mock LLM upstream: OpenAI, Azure OpenAI and Anthropic wire formats.

Built directly on asyncio protocols (uvloop when available) and ``httptools`` so that
it can serve tens of thousands of requests per second on a single core; benchmarks
then measure the gateway rather than the mock. The response builders live in
:mod:`llm_broker.mock.formats`, the per-request behaviour in :mod:`llm_broker.mock.params`,
the counters and injected failures in :mod:`llm_broker.mock.state`.

Model calls (a trailing ``/`` and the query string are ignored, except Azure's)::

    POST /v1/chat/completions   (or /chat/completions)   OpenAI chat
    POST /v1/embeddings         (or /embeddings)         OpenAI embeddings
    POST /v1/messages           (or /messages)           Anthropic Messages
    POST /v1/messages/count_tokens                       Anthropic token count
    POST /v1/responses          (or /responses)          OpenAI Responses (mock.responses)
    POST /openai/deployments/{deployment}/chat/completions?api-version=V   Azure chat
    POST /openai/deployments/{deployment}/embeddings?api-version=V         Azure embeddings

Behaviour of every model call is controlled (in increasing priority) by the server
defaults, by tokens in the model name (Azure: the deployment name) and by an optional
``"mock"`` body field::

    mock                      defaults
    mock-slow                 latency_ms = 2000
    mock-latency-1000         latency_ms = 1000   (also ``lat``)
    mock-chunks-20-delay-50   20 words, 50 ms between stream chunks
    mock-error-429            HTTP 429 (+ Retry-After) after latency_ms
    mock-retryafter-5         the Retry-After of 429 / 503 / 529 errors (default 1)
    mock-failafter-3          stream: close the connection after 3 content chunks

    {"mock": {"latency_ms": .., "chunks": .., "chunk_delay_ms": .., "error": ..,
              "fail_after": .., "retry_after": .., "error_message": ..}}

``error_message`` is the message of the ``error`` answer instead of ``mock upstream
error N``; ``{credentials}`` in it becomes the credential headers the request carried
(``Authorization``, ``x-api-key``, ``api-key``), as an upstream that echoes too much would.

Content is deterministic: ``seed = zlib.crc32(text of the last message)`` (text parts of
a multi-part content are joined with single spaces; Anthropic: the text blocks, or the
tool_result blocks' text when there are any) and word ``k`` is
``WORDS[(seed + k) % len(WORDS)]``. Usage counts whitespace-separated words (Anthropic:
``system`` included); ``max_tokens`` / ``max_completion_tokens`` below the word count
shorten the answer (``finish_reason: "length"``, Anthropic ``stop_reason: "max_tokens"``).

Anthropic Messages: ``max_tokens`` is required (400 ``invalid_request_error``). The answer
is ``{"id": "msg_mock_N", "type": "message", "content": [{"type": "text", ..}],
"stop_reason": "end_turn", "usage": {"input_tokens", "output_tokens"}, ..}``; with
``"stream": true`` the events are those of the real API: ``message_start`` (input
tokens), ``content_block_start``, ``ping``, one ``content_block_delta`` (``text_delta``)
per word, ``content_block_stop``, ``message_delta`` (stop_reason, output tokens),
``message_stop``.

Tool calls: when the request has ``tools``, ``tool_choice`` is not none and the last
message is not a tool result (OpenAI: role ``tool``; Anthropic: a ``tool_result`` block),
the answer is one call of the first tool (or of the forced one) with the arguments
``{"<param>": "<first word of the last message>"}`` (``<param>``: the schema's first
required property, else its first property, else ``query``); finish_reason
``tool_calls`` / stop_reason ``tool_use``, usage 2 completion tokens. Streamed: OpenAI
sends the id and name first, then the arguments in two ``tool_calls`` deltas; Anthropic
a ``tool_use`` content_block_start and two ``input_json_delta`` pieces. After a tool
result the answer is text, seeded from the result's text.

Azure: the deployment name is the model (the body's ``model`` is ignored) and the answer
carries it; without ``api-version`` the answer is Azure's 404 ``{"error": {"code": "404",
"message": "Resource not found"}}``.

Errors come in the API's own shape: OpenAI ``{"error": {"message", "type", "param",
"code"}}`` (Azure: ``code`` is the status as a string), Anthropic ``{"type": "error",
"error": {"type": "rate_limit_error" | "api_error" | "overloaded_error" | ..,
"message"}}``. Streaming requests get them as plain JSON too.

Control endpoints (not model calls; the ``/mock/*`` ones in detail:
:mod:`llm_broker.mock.state`)::

    GET  /health, GET /v1/models (or /models)
    GET  /mock/stats    counters, JSON
    POST /mock/reset    zero the counters, clear the recorded history and /mock/fail
    POST /mock/fail     {"status": 500, "times": 3, ..}: fail the next model calls

Run standalone: ``python -m llm_broker.mock --port 9000`` (or ``llm-broker mock-upstream``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import signal
import sys
import time
import zlib
from typing import Any, Final, cast

import httptools
import orjson

from llm_broker.mock.formats import (
    A_DELTA_FIRST,
    A_DELTA_REST,
    ANTHROPIC,
    AZURE,
    AZURE_CHAT,
    AZURE_NOT_FOUND,
    AZURE_PREFIX,
    DELTA_FIRST,
    DELTA_REST,
    DELTA_ROLE,
    FINISH_LENGTH,
    FINISH_NULL,
    FINISH_STOP,
    NWORDS,
    OPENAI,
    WORDS,
    anthropic_json_delta,
    anthropic_message,
    anthropic_stream_end,
    anthropic_stream_start,
    anthropic_text,
    anthropic_tool,
    chunk_meta,
    content_text,
    embeddings_body,
    error_response,
    frame,
    injected_response,
    openai_completion,
    openai_stream_tail,
    openai_tool,
    openai_tool_completion,
    openai_tool_stream,
    parse_azure,
    response,
    stream_head,
    tool_arguments,
    word_count,
)
from llm_broker.mock.params import MockDefaults, Params, resolve
from llm_broker.mock.state import Captured, ControlError, MockState

__all__ = ["WORDS", "MockDefaults", "MockState", "main", "run", "start_server"]

_TOOL_TOKENS = 2  # completion tokens of a tool call (one per arguments piece)
_DEFAULTS: Final = MockDefaults()


# --------------------------------------------------------------------------- constants

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_ANTHROPIC_VERSION = b"anthropic-version"
# Request headers recorded in the stats; credentials also go to auth_seen.
_TRACEPARENT = b"traceparent"
_CREDENTIAL_HEADERS = frozenset(
    (b"authorization", b"x-api-key", b"api-key", b"x-goog-api-key", b"x-amz-security-token")
)
#: Headers recorded for the API handlers but not counted as credentials.
_PLAIN_HEADERS = frozenset((_ANTHROPIC_VERSION, _TRACEPARENT, b"anthropic-beta"))
_CAPTURED_HEADERS = _CREDENTIAL_HEADERS | _PLAIN_HEADERS
#: Also recorded on Bedrock's paths (``/model/...``): what its signature check reads.
_SIGNED_HEADERS = _CAPTURED_HEADERS | frozenset(
    (b"host", b"content-type", b"x-amz-date", b"x-amz-content-sha256")
)

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
_MESSAGES_PATHS = frozenset((b"/v1/messages", b"/messages"))
_COUNT_TOKENS_PATHS = frozenset((b"/v1/messages/count_tokens", b"/messages/count_tokens"))
_RESPONSES_PATHS = frozenset((b"/v1/responses", b"/responses"))
_TOOL_ROLES = frozenset(("tool", "function"))

_A_TEXT_BLOCK: Final = {"type": "text", "text": ""}


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
        self.counted = counted  # a model call: tracked by calls/in_flight/completed
        self.latency = latency  # seconds before the first byte
        self.events = events  # stream: chunk-framed events written one by one
        self.tail = tail  # stream: chunk-framed final events + terminator
        self.delay = delay  # seconds between word events
        self.abort = abort  # close the connection after the events (fail_after)


# --------------------------------------------------------------------------- application


class _App:
    __slots__ = ("apis", "captured", "conns", "defaults", "ids", "state")

    def __init__(self, defaults: MockDefaults) -> None:
        self.defaults = defaults
        self.state = MockState()
        self.ids = itertools.count(1)
        self.conns: set[_Conn] = set()
        #: What the handlers of an API in a module of their own keep (by API name:
        #: Gemini's issued tokens); ``/mock/reset`` clears it.
        self.apis: dict[str, Any] = {}
        #: The recorded headers of the request being dispatched.
        self.captured: Captured | None = None

    # -- routing ---------------------------------------------------------------------

    def dispatch(
        self, method: bytes, url: bytes, body: bytes, keep_alive: bool, captured: Captured | None
    ) -> _Plan:
        self.captured = captured
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        if len(path) > 1 and path.endswith(b"/"):
            path = path[:-1]
        if method == b"POST":
            if path in _CHAT_PATHS:
                self.state.record_call(path, captured, body)
                return self.chat(body, keep_alive)
            if path in _MESSAGES_PATHS:
                self.state.record_call(path, captured, body)
                return self.messages(body, keep_alive)
            if path in _COUNT_TOKENS_PATHS:
                self.state.record_call(path, captured, body)
                return self.count_tokens(body, keep_alive)
            if path in _RESPONSES_PATHS:
                from llm_broker.mock import responses

                self.state.record_call(path, captured, body)
                return responses.handle(self, body, keep_alive)
            if path in _EMBED_PATHS:
                self.state.record_call(path, captured, body)
                return self.embeddings(body, keep_alive)
            if path.startswith(b"/openai/"):
                query = url[q + 1 :] if q >= 0 else b""
                return self.azure(path, query, body, keep_alive, captured)
            if (
                b":generateContent" in path
                or b":streamGenerateContent" in path
                or (path == b"/token")
            ):
                from llm_broker.mock import gemini

                query = url[q + 1 :] if q >= 0 else b""
                return gemini.handle(self, path, query, body, keep_alive, captured)
            if path.startswith(b"/model/"):
                from llm_broker.mock import bedrock

                return bedrock.handle(self, path, body, keep_alive, captured)
            if path == b"/mock/reset":
                self.state.reset()
                self.apis.clear()
                return _Plan(response(200, _EMPTY_BODY, keep_alive), counted=False)
            if path == b"/mock/fail":
                return self.fail(body, keep_alive)
        elif method == b"GET":
            if path == b"/health":
                return _Plan(response(200, _HEALTH_BODY, keep_alive), counted=False)
            if path == b"/v1/models" or path == b"/models":
                return _Plan(response(200, _MODELS_BODY, keep_alive), counted=False)
            if path == b"/mock/requests":
                body = orjson.dumps(self.state.requests())
                return _Plan(response(200, body, keep_alive), counted=False)
            if path == b"/mock/stats":
                body = orjson.dumps(self.state.snapshot())
                return _Plan(response(200, body, keep_alive), counted=False)
        msg = f"unknown route: {method.decode('latin-1')} {path.decode('latin-1')}"
        return _Plan(error_response(OPENAI, 404, msg, keep_alive), counted=False)

    @staticmethod
    def _load(body: bytes) -> dict[str, Any] | None:
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError:
            return None
        return data if isinstance(data, dict) else None

    def _model(self, req: dict[str, Any] | None, deployment: str | None) -> str:
        """The requested model (recorded in ``models_seen``), ``"mock"`` if none."""
        model: object = deployment
        if model is None and req is not None:
            model = req.get("model")
        if not isinstance(model, str) or not model:
            return "mock"
        self.state.models_seen.append(model)
        return model

    def _injected(self, api: int, keep_alive: bool) -> _Plan:
        """The answer of a ``POST /mock/fail`` failure (the caller checked one is due)."""
        st = self.state
        if st.failures_left > 0:
            st.failures_left -= 1
        head = injected_response(
            api, st.fail_status, st.fail_headers, st.fail_body, st.fail_ctype, keep_alive
        )
        return _Plan(head)

    def _behaviour(
        self, model: str, req: dict[str, Any], keep_alive: bool, api: int
    ) -> tuple[Params, float, _Plan | None]:
        """The resolved behaviour, the latency in seconds and, when the behaviour is an
        injected error, the plan that answers it."""
        p = resolve(self.defaults, model, req)
        latency = p.latency_ms / 1000.0
        failure = None
        if p.error is not None:
            msg = p.error_message or f"mock upstream error {p.error}"
            if "{credentials}" in msg:
                sent = " ".join(v for n, v in self.captured or () if n in _CREDENTIAL_HEADERS)
                msg = msg.replace("{credentials}", sent)
            failure = _Plan(
                error_response(api, p.error, msg, keep_alive, p.retry_after), latency=latency
            )
        return p, latency, failure

    @staticmethod
    def _stream(head: bytes, events: list[bytes], tail: bytes, p: Params, latency: float) -> _Plan:
        abort = p.fail_after is not None
        if abort:
            del events[p.fail_after :]
            tail = b""
        return _Plan(
            head,
            latency=latency,
            events=events,
            tail=tail,
            delay=p.chunk_delay_ms / 1000.0,
            abort=abort,
        )

    # -- chat ------------------------------------------------------------------------

    def chat(
        self, raw: bytes, keep_alive: bool, api: int = OPENAI, deployment: str | None = None
    ) -> _Plan:
        req = self._load(raw)
        st = self.state
        if deployment is None and req is not None:  # _model(), inlined on the hot path
            model = req.get("model")
            if isinstance(model, str) and model:
                st.models_seen.append(model)
            else:
                model = "mock"
        else:
            model = self._model(req, deployment)
        if st.failures_left:
            return self._injected(api, keep_alive)
        if req is None:
            return _Plan(error_response(api, 400, "invalid JSON body", keep_alive))
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            return _Plan(error_response(api, 400, "'messages' is required", keep_alive))
        p, latency, failure = self._behaviour(model, req, keep_alive, api)
        if failure is not None:
            return failure

        prompt_tokens = 0
        text = ""
        for m in messages:
            if not isinstance(m, dict):
                msg = "each message must be an object"
                return _Plan(error_response(api, 400, msg, keep_alive))
            text = content_text(m.get("content"))
            prompt_tokens += word_count(text)
        if prompt_tokens < 1:
            prompt_tokens = 1
        seed = zlib.crc32(text.encode("utf-8", "surrogatepass"))
        rid = f"chatcmpl-mock-{next(self.ids)}"
        created = int(time.time())

        if req.get("tools") is not None and messages[-1].get("role") not in _TOOL_ROLES:
            tool = openai_tool(req)
            if tool is not None:
                return self._chat_tool(
                    req,
                    tool,
                    text,
                    seed,
                    rid,
                    created,
                    model,
                    prompt_tokens,
                    p,
                    latency,
                    keep_alive,
                )

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

        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
        }
        st.prompt_tokens += prompt_tokens
        st.completion_tokens += n
        if req.get("stream") is not True:
            content = " ".join([WORDS[(seed + k) % NWORDS] for k in range(n)])
            body = openai_completion(rid, created, model, content, finish, usage)
            return _Plan(response(200, body, keep_alive), latency=latency)

        # Streaming: pre-render every event; the connection writes them as it goes.
        meta = chunk_meta(rid, created, model)
        prefix = b'data: {%s,"choices":[{"index":0,"delta":' % meta
        head = stream_head(keep_alive) + frame(prefix + DELTA_ROLE + FINISH_NULL)
        n_words = n if p.fail_after is None else min(n, p.fail_after)
        events = [
            frame(prefix + (DELTA_REST if k else DELTA_FIRST)[(seed + k) % NWORDS] + FINISH_NULL)
            for k in range(n_words)
        ]
        finish_chunk = frame(prefix + (FINISH_STOP if finish == "stop" else FINISH_LENGTH))
        return self._stream(
            head, events, openai_stream_tail(finish_chunk, meta, req, usage), p, latency
        )

    def _chat_tool(
        self,
        req: dict[str, Any],
        tool: tuple[str, object],
        text: str,
        seed: int,
        rid: str,
        created: int,
        model: str,
        prompt_tokens: int,
        p: Params,
        latency: float,
        keep_alive: bool,
    ) -> _Plan:
        name, schema = tool
        pieces = tool_arguments(schema, text, seed)
        call_id = f"call_mock_{next(self.ids)}"
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": _TOOL_TOKENS,
            "total_tokens": prompt_tokens + _TOOL_TOKENS,
        }
        if req.get("stream") is not True:
            args = pieces[0] + pieces[1]
            body = openai_tool_completion(rid, created, model, call_id, name, args, usage)
            return _Plan(response(200, body, keep_alive), latency=latency)
        meta = chunk_meta(rid, created, model)
        prefix = b'data: {%s,"choices":[{"index":0,"delta":' % meta
        first, events, finish = openai_tool_stream(prefix, call_id, name, pieces)
        head = stream_head(keep_alive) + first
        return self._stream(head, events, openai_stream_tail(finish, meta, req, usage), p, latency)

    # -- Anthropic messages ----------------------------------------------------------

    def messages(self, raw: bytes, keep_alive: bool) -> _Plan:
        req = self._load(raw)
        model = self._model(req, None)
        if self.state.failures_left:
            return self._injected(ANTHROPIC, keep_alive)
        if req is None:
            return _Plan(error_response(ANTHROPIC, 400, "invalid JSON body", keep_alive))
        messages = req.get("messages")
        if not isinstance(messages, list) or not messages:
            msg = "messages: Field required"
            return _Plan(error_response(ANTHROPIC, 400, msg, keep_alive))
        max_tokens = req.get("max_tokens")
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool):
            msg = "max_tokens: Field required"
            return _Plan(error_response(ANTHROPIC, 400, msg, keep_alive))
        if max_tokens < 1:
            msg = "max_tokens: Input should be greater than or equal to 1"
            return _Plan(error_response(ANTHROPIC, 400, msg, keep_alive))
        p, latency, failure = self._behaviour(model, req, keep_alive, ANTHROPIC)
        if failure is not None:
            return failure

        input_tokens = word_count(content_text(req.get("system")))
        text = ""
        tool_result = False
        for m in messages:
            if not isinstance(m, dict):
                msg = "messages: each message must be an object"
                return _Plan(error_response(ANTHROPIC, 400, msg, keep_alive))
            text, tool_result = anthropic_text(m.get("content"))
            input_tokens += word_count(text)
        if input_tokens < 1:
            input_tokens = 1
        seed = zlib.crc32(text.encode("utf-8", "surrogatepass"))
        rid = f"msg_mock_{next(self.ids)}"
        stream = req.get("stream") is True

        tool = None if tool_result or req.get("tools") is None else anthropic_tool(req)
        if tool is not None:
            name, schema = tool
            pieces = tool_arguments(schema, text, seed)
            tool_id = f"toolu_mock_{next(self.ids)}"
            n = _TOOL_TOKENS
            stop = "tool_use"
            if not stream:
                block = {
                    "type": "tool_use",
                    "id": tool_id,
                    "name": name,
                    "input": orjson.loads(pieces[0] + pieces[1]),
                }
                body = anthropic_message(rid, model, [block], stop, input_tokens, n)
                return _Plan(response(200, body, keep_alive), latency=latency)
            start: dict[str, Any] = {"type": "tool_use", "id": tool_id, "name": name, "input": {}}
            events = [anthropic_json_delta(piece) for piece in pieces]
        else:
            n = p.chunks
            stop = "end_turn"
            if max_tokens < n:
                n = max_tokens
                stop = "max_tokens"
            if not stream:
                content = " ".join([WORDS[(seed + k) % NWORDS] for k in range(n)])
                blocks = [{"type": "text", "text": content}]
                body = anthropic_message(rid, model, blocks, stop, input_tokens, n)
                return _Plan(response(200, body, keep_alive), latency=latency)
            start = _A_TEXT_BLOCK
            n_words = n if p.fail_after is None else min(n, p.fail_after)
            events = [
                (A_DELTA_REST if k else A_DELTA_FIRST)[(seed + k) % NWORDS] for k in range(n_words)
            ]
        head = stream_head(keep_alive) + anthropic_stream_start(rid, model, input_tokens, start)
        return self._stream(head, events, anthropic_stream_end(stop, n), p, latency)

    def count_tokens(self, raw: bytes, keep_alive: bool) -> _Plan:
        """``POST /v1/messages/count_tokens``: the words of the system prompt and of
        every message's text."""
        req = self._load(raw)
        if self.state.failures_left:
            return self._injected(ANTHROPIC, keep_alive)
        messages = req.get("messages") if req is not None else None
        if not isinstance(messages, list) or not messages:
            msg = "messages: Field required"
            return _Plan(error_response(ANTHROPIC, 400, msg, keep_alive))
        tokens = word_count(content_text(req.get("system") if req else None))
        for m in messages:
            if isinstance(m, dict):
                tokens += word_count(anthropic_text(m.get("content"))[0])
        body = orjson.dumps({"input_tokens": max(tokens, 1)})
        return _Plan(response(200, body, keep_alive))

    # -- Azure -----------------------------------------------------------------------

    def azure(
        self,
        path: bytes,
        query: bytes,
        raw: bytes,
        keep_alive: bool,
        captured: Captured | None,
    ) -> _Plan:
        parsed = parse_azure(path, query) if path.startswith(AZURE_PREFIX) else None
        if parsed is None or parsed[2] is None:
            return _Plan(response(404, AZURE_NOT_FOUND, keep_alive), counted=False)
        deployment, kind, version = parsed
        self.state.record_call(path, captured)
        self.state.api_version_seen = version
        if kind == AZURE_CHAT:
            return self.chat(raw, keep_alive, AZURE, deployment)
        return self.embeddings(raw, keep_alive, AZURE, deployment)

    # -- embeddings ------------------------------------------------------------------

    def embeddings(
        self, raw: bytes, keep_alive: bool, api: int = OPENAI, deployment: str | None = None
    ) -> _Plan:
        req = self._load(raw)
        model = self._model(req, deployment)
        if self.state.failures_left:
            return self._injected(api, keep_alive)
        if req is None:
            return _Plan(error_response(api, 400, "invalid JSON body", keep_alive))
        inp = req.get("input")
        inputs: list[str]
        if isinstance(inp, str):
            inputs = [inp]
        elif isinstance(inp, list) and inp:
            inputs = [x if isinstance(x, str) else orjson.dumps(x).decode() for x in inp]
        else:
            return _Plan(error_response(api, 400, "'input' is required", keep_alive))
        _, latency, failure = self._behaviour(model, req, keep_alive, api)
        if failure is not None:
            return failure
        body = embeddings_body(model, inputs)
        return _Plan(response(200, body, keep_alive), latency=latency)

    # -- control ---------------------------------------------------------------------

    def fail(self, raw: bytes, keep_alive: bool) -> _Plan:
        """``POST /mock/fail``: arm (or clear) failures, see :meth:`MockState.arm`."""
        try:
            answer = self.state.arm(self._load(raw))
        except ControlError as e:
            return _Plan(error_response(OPENAI, 400, str(e), keep_alive), counted=False)
        return _Plan(response(200, answer, keep_alive), counted=False)


# --------------------------------------------------------------------------- connection

# method, url, body, keep_alive, recorded headers
_Request = tuple[bytes, bytes, bytes, bool, Captured | None]


class _Conn(asyncio.Protocol):
    __slots__ = (
        "app",
        "body",
        "captured",
        "closed",
        "drain_waiter",
        "parser",
        "pending",
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
        self.captured: Captured | None = None

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
        if lname in _CAPTURED_HEADERS or (
            lname in _SIGNED_HEADERS and self.url.startswith(b"/model/")
        ):
            if self.captured is None:
                self.captured = [(lname, value.decode("latin-1"))]
            else:
                self.captured.append((lname, value.decode("latin-1")))
        elif lname == b"expect" and value.lower() == b"100-continue":
            if self.transport is not None and not self.closed:
                self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        body = self.body
        raw = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        captured = self.captured
        if captured is not None:
            self.captured = None
            if not self.url.startswith(b"/mock/"):
                seen = self.app.state.auth_seen
                for name, value in captured:
                    if name in _CREDENTIAL_HEADERS:
                        seen.append(value)
        req: _Request = (
            self.parser.get_method(),
            self.url,
            raw,
            self.parser.should_keep_alive(),
            captured,
        )
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
                self.transport.write(error_response(OPENAI, status, message, False))
            self.transport.close()

    def _handle(self, req: _Request) -> None:
        method, url, raw, keep_alive, captured = req
        app = self.app
        state = app.state
        counted = False
        try:
            plan = app.dispatch(method, url, raw, keep_alive, captured)
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
    host: str, port: int, defaults: MockDefaults = _DEFAULTS
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


def main(argv: list[str] | None = None, prog: str = "python -m llm_broker.mock") -> int:
    ap = argparse.ArgumentParser(
        prog=prog,
        description="Fast deterministic OpenAI-compatible mock LLM upstream.",
    )
    add_arguments(ap)
    return run_from_args(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
