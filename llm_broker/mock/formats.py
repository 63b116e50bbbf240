"""Wire formats of the mock upstream (:mod:`llm_broker.mock.server`).

Pure builders, no I/O: HTTP/1.1 response framing, the error bodies of the three APIs
the mock speaks (OpenAI, Azure OpenAI, Anthropic Messages), OpenAI chat completions,
chunks and embeddings, the Anthropic message and stream events, tool calls in both
formats and the Azure deployment paths. Everything returns ready-to-write ``bytes``;
stream events come chunk-framed.
"""

from __future__ import annotations

import http
import zlib
from typing import Any, Final
from urllib.parse import parse_qs, unquote

import orjson

__all__ = [
    "ANTHROPIC",
    "AZURE",
    "AZURE_CHAT",
    "AZURE_EMBEDDINGS",
    "AZURE_NOT_FOUND",
    "AZURE_PREFIX",
    "A_DELTA_FIRST",
    "A_DELTA_REST",
    "CHUNKED_END",
    "DELTA_FIRST",
    "DELTA_REST",
    "DELTA_ROLE",
    "FINISH_LENGTH",
    "FINISH_NULL",
    "FINISH_STOP",
    "JSON_CT",
    "NWORDS",
    "OPENAI",
    "TEXT_CT",
    "WORDS",
    "anthropic_json_delta",
    "anthropic_message",
    "anthropic_stream_end",
    "anthropic_stream_start",
    "anthropic_text",
    "anthropic_tool",
    "chunk_meta",
    "content_text",
    "embeddings_body",
    "error_body",
    "error_response",
    "frame",
    "injected_response",
    "openai_completion",
    "openai_stream_tail",
    "openai_tool",
    "openai_tool_completion",
    "openai_tool_stream",
    "parse_azure",
    "response",
    "status_line",
    "stream_head",
    "tool_arguments",
    "word_count",
]

WORDS: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy",
    "dog", "while", "bright", "stars", "shine", "above", "quiet", "hills",
    "and", "gentle", "rivers", "flow", "past", "old", "stone", "bridges",
    "under", "soft", "silver", "light", "of", "early", "morning", "sun",
)  # fmt: skip
NWORDS: Final = len(WORDS)

# Which API a model call speaks: selects the error shape.
OPENAI: Final = 0
AZURE: Final = 1
ANTHROPIC: Final = 2

# --------------------------------------------------------------------------- HTTP framing

CRLF: Final = b"\r\n"
JSON_CT: Final = b"application/json"
TEXT_CT: Final = b"text/plain; charset=utf-8"
CLOSE_HDR: Final = b"Connection: close\r\n"
_STREAM_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
)
_STREAM_HEAD_KEEP: Final = _STREAM_HEAD + CRLF
_STREAM_HEAD_CLOSE: Final = _STREAM_HEAD + CLOSE_HDR + CRLF
CHUNKED_END: Final = b"0\r\n\r\n"

_status_lines: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    line = _status_lines.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        line = b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode("ascii"))
        _status_lines[status] = line
    return line


def response(
    status: int, body: bytes, keep_alive: bool, ctype: bytes = JSON_CT, extra: bytes = b""
) -> bytes:
    """A complete response with a ``Content-Length`` body; ``extra`` is header lines."""
    return b"%sContent-Type: %s\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
        status_line(status),
        ctype,
        len(body),
        extra,
        b"" if keep_alive else CLOSE_HDR,
        body,
    )


def stream_head(keep_alive: bool) -> bytes:
    """Status line and headers of a chunked ``text/event-stream`` response."""
    return _STREAM_HEAD_KEEP if keep_alive else _STREAM_HEAD_CLOSE


def frame(ev: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(ev), ev)


def _sse(name: bytes, data: bytes) -> bytes:
    return frame(b"event: %s\ndata: %s\n\n" % (name, data))


# --------------------------------------------------------------------------- errors


def _openai_error_type(status: int) -> str:
    if status == 400:
        return "invalid_request_error"
    if status == 429:
        return "rate_limit_error"
    if 500 <= status <= 599:
        return "server_error"
    return "api_error"


_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def _anthropic_error_type(status: int) -> str:
    known = _ANTHROPIC_ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(api: int, status: int, message: str) -> bytes:
    """The API's own error object: OpenAI's, Azure's (OpenAI's with ``code`` = the
    status as a string) or Anthropic's ``{"type": "error", "error": {...}}``."""
    if api == ANTHROPIC:
        error = {"type": _anthropic_error_type(status), "message": message}
        return orjson.dumps({"type": "error", "error": error})
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": _openai_error_type(status),
                "param": None,
                "code": str(status) if api == AZURE else None,
            }
        }
    )


_RETRY_STATUSES: Final = frozenset((429, 503, 529))


def error_response(
    api: int, status: int, message: str, keep_alive: bool, retry_after: str | None = None
) -> bytes:
    """An error answer; 429, 503 and 529 carry ``Retry-After`` (default 1)."""
    extra = b""
    if status in _RETRY_STATUSES:
        extra = b"Retry-After: %s\r\n" % (retry_after or "1").encode("latin-1")
    return response(status, error_body(api, status, message), keep_alive, extra=extra)


def injected_response(
    api: int,
    status: int,
    headers: bytes,
    body: bytes | None,
    ctype: bytes,
    keep_alive: bool,
) -> bytes:
    """An answer of ``POST /mock/fail``: exactly its headers, its body or the API's error."""
    if body is None:
        body = error_body(api, status, f"mock injected failure {status}")
        ctype = JSON_CT
    return response(status, body, keep_alive, ctype=ctype, extra=headers)


# --------------------------------------------------------------------------- Azure

AZURE_PREFIX: Final = b"/openai/deployments/"
AZURE_NOT_FOUND: Final = b'{"error":{"code":"404","message":"Resource not found"}}'
AZURE_CHAT: Final = 0
AZURE_EMBEDDINGS: Final = 1


def parse_azure(path: bytes, query: bytes) -> tuple[str, int, str | None] | None:
    """``/openai/deployments/{deployment}/chat/completions|embeddings`` ->
    (deployment, AZURE_CHAT | AZURE_EMBEDDINGS, api-version or None); None if no match."""
    rest = path[len(AZURE_PREFIX) :]
    slash = rest.find(b"/")
    if slash <= 0:
        return None
    op = rest[slash + 1 :]
    if op == b"chat/completions":
        kind = AZURE_CHAT
    elif op == b"embeddings":
        kind = AZURE_EMBEDDINGS
    else:
        return None
    deployment = unquote(rest[:slash].decode("latin-1"))
    versions = parse_qs(query.decode("latin-1")).get("api-version")
    return deployment, kind, versions[-1] if versions else None


# --------------------------------------------------------------------------- content


def word_count(text: str) -> int:
    return len(text.split())


def content_text(content: object) -> str:
    """OpenAI message content: the string, or its text parts joined with single spaces."""
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


def anthropic_text(content: object) -> tuple[str, bool]:
    """Anthropic message content -> (text, has a tool_result block). With tool results the
    text is theirs (joined with single spaces), otherwise the text blocks'."""
    if isinstance(content, str):
        return content, False
    if not isinstance(content, list):
        return "", False
    texts: list[str] = []
    results: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if isinstance(text, str):
                texts.append(text)
        elif kind == "tool_result":
            results.append(content_text(block.get("content")))
    if results:
        return " ".join(results), True
    return (texts[0] if len(texts) == 1 else " ".join(texts)), False


# --------------------------------------------------------------------------- OpenAI

# Stream deltas for each word, first position (no leading space) and later positions.
DELTA_FIRST: tuple[bytes, ...] = tuple(orjson.dumps({"content": w}) for w in WORDS)
DELTA_REST: tuple[bytes, ...] = tuple(orjson.dumps({"content": " " + w}) for w in WORDS)
DELTA_ROLE: Final = b'{"role":"assistant","content":""}'
FINISH_NULL: Final = b',"finish_reason":null}]}\n\n'
FINISH_STOP: Final = b'{},"finish_reason":"stop"}]}\n\n'
FINISH_LENGTH: Final = b'{},"finish_reason":"length"}]}\n\n'
_DONE_EVENT: Final = b"data: [DONE]\n\n"


def openai_completion(
    rid: str, created: int, model: str, content: str, finish: str, usage: object
) -> bytes:
    return _completion(
        rid, created, model, {"role": "assistant", "content": content}, finish, usage
    )


def _completion(
    rid: str, created: int, model: str, message: object, finish: str, usage: object
) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": usage,
        }
    )


def chunk_meta(rid: str, created: int, model: str) -> bytes:
    """The fields of every ``chat.completion.chunk`` before ``choices``, JSON-encoded."""
    return b'"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s' % (
        rid.encode("ascii"),
        created,
        orjson.dumps(model),
    )


def openai_stream_tail(finish: bytes, meta: bytes, req: dict[str, Any], usage: object) -> bytes:
    """The finish chunk, the usage chunk when asked for, ``[DONE]`` and the end."""
    tail = finish
    opts = req.get("stream_options")
    if isinstance(opts, dict) and opts.get("include_usage") is True:
        tail += frame(b'data: {%s,"choices":[],"usage":%s}\n\n' % (meta, orjson.dumps(usage)))
    return tail + frame(_DONE_EVENT) + CHUNKED_END


def embeddings_body(model: str, inputs: list[str]) -> bytes:
    """Deterministic 8-dimensional vectors (crc32 of the input); usage counts words."""
    data = []
    tokens = 0
    for i, s in enumerate(inputs):
        b = s.encode("utf-8", "surrogatepass")
        vec = [((zlib.crc32(b, j) % 20001) - 10000) / 10000.0 for j in range(8)]
        data.append({"object": "embedding", "index": i, "embedding": vec})
        tokens += word_count(s)
    tokens = max(tokens, 1)
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


# --------------------------------------------------------------------------- tool calls

_Tool = tuple[str, object]  # name, JSON schema of the arguments (or None)


def openai_tool(req: dict[str, Any]) -> _Tool | None:
    """The function to call: the forced one, else the first; None for ``"none"``."""
    tools = req.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = req.get("tool_choice")
    if choice == "none":
        return None
    named: str | None = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            named = fn["name"]
    for tool in tools:
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            continue
        fn = tool.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            if named is None or fn["name"] == named:
                return fn["name"], fn.get("parameters")
    return (named, None) if named is not None else None


def anthropic_tool(req: dict[str, Any]) -> _Tool | None:
    """The tool to use: the forced one (``{"type": "tool"}``), else the first; None for
    ``{"type": "none"}``."""
    tools = req.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = req.get("tool_choice")
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "none":
        return None
    named: str | None = None
    if kind == "tool" and isinstance(choice, dict) and isinstance(choice.get("name"), str):
        named = choice["name"]
    for tool in tools:
        if isinstance(tool, dict) and isinstance(tool.get("name"), str):
            if named is None or tool["name"] == named:
                return tool["name"], tool.get("input_schema")
    return (named, None) if named is not None else None


def tool_arguments(schema: object, text: str, seed: int) -> tuple[str, str]:
    """Deterministic arguments ``{"<param>": "<first word of text>"}`` split in two pieces.

    ``<param>`` is the schema's first required property, else its first property, else
    ``query``; an empty text gives the seeded word instead.
    """
    key = "query"
    if isinstance(schema, dict):
        required = schema.get("required")
        props = schema.get("properties")
        if isinstance(required, list) and required and isinstance(required[0], str):
            key = required[0]
        elif isinstance(props, dict) and props:
            first = next(iter(props))
            if isinstance(first, str):
                key = first
    words = text.split()
    value = words[0] if words else WORDS[seed % NWORDS]
    return "{" + orjson.dumps(key).decode() + ":", orjson.dumps(value).decode() + "}"


def openai_tool_completion(
    rid: str, created: int, model: str, call_id: str, name: str, args: str, usage: object
) -> bytes:
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    return _completion(rid, created, model, message, "tool_calls", usage)


def openai_tool_stream(
    prefix: bytes, call_id: str, name: str, pieces: tuple[str, str]
) -> tuple[bytes, list[bytes], bytes]:
    """Framed chunks (first, argument pieces, finish) of a streamed tool call; ``prefix``
    is ``data: {<id, object, created, model>,"choices":[{"index":0,"delta":``."""
    head = {"index": 0, "id": call_id, "type": "function"}
    first = orjson.dumps(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{**head, "function": {"name": name, "arguments": ""}}],
        }
    )
    events = [
        frame(
            prefix
            + orjson.dumps({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            + FINISH_NULL
        )
        for piece in pieces
    ]
    finish = frame(prefix + b'{},"finish_reason":"tool_calls"}]}\n\n')
    return frame(prefix + first + FINISH_NULL), events, finish


# --------------------------------------------------------------------------- Anthropic


def anthropic_message(
    rid: str,
    model: str,
    content: list[dict[str, Any]],
    stop_reason: str,
    input_tokens: int,
    output_tokens: int,
) -> bytes:
    return orjson.dumps(
        {
            "id": rid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }
    )


_A_DELTA: Final = (
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":%s}}'
)
# Text delta events for each word, first position (no leading space) and later positions.
A_DELTA_FIRST: tuple[bytes, ...] = tuple(
    _sse(b"content_block_delta", _A_DELTA % orjson.dumps(w)) for w in WORDS
)
A_DELTA_REST: tuple[bytes, ...] = tuple(
    _sse(b"content_block_delta", _A_DELTA % orjson.dumps(" " + w)) for w in WORDS
)
_A_PING: Final = _sse(b"ping", b'{"type":"ping"}')
_A_BLOCK_STOP: Final = _sse(b"content_block_stop", b'{"type":"content_block_stop","index":0}')
_A_MESSAGE_STOP: Final = _sse(b"message_stop", b'{"type":"message_stop"}')


def anthropic_stream_start(rid: str, model: str, input_tokens: int, block: dict[str, Any]) -> bytes:
    """Framed ``message_start``, ``content_block_start`` (index 0) and ``ping``."""
    message: dict[str, Any] = {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": input_tokens, "output_tokens": 1},
    }
    start = orjson.dumps({"type": "message_start", "message": message})
    block_start = orjson.dumps({"type": "content_block_start", "index": 0, "content_block": block})
    return _sse(b"message_start", start) + _sse(b"content_block_start", block_start) + _A_PING


def anthropic_json_delta(piece: str) -> bytes:
    delta = {"type": "input_json_delta", "partial_json": piece}
    return _sse(
        b"content_block_delta",
        orjson.dumps({"type": "content_block_delta", "index": 0, "delta": delta}),
    )


def anthropic_stream_end(stop_reason: str, output_tokens: int) -> bytes:
    """Framed ``content_block_stop``, ``message_delta``, ``message_stop`` and the end of
    the chunked body."""
    delta = orjson.dumps(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": output_tokens},
        }
    )
    return _A_BLOCK_STOP + _sse(b"message_delta", delta) + _A_MESSAGE_STOP + CHUNKED_END
