"""Amazon Bedrock's Converse API in the mock upstream (:mod:`llm_broker.mock.server`).

Model calls::

    POST /model/{modelId}/converse          Converse: one JSON answer
    POST /model/{modelId}/converse-stream   ConverseStream: application/vnd.amazon.eventstream

Every call must be signed with AWS Signature Version 4 (service ``bedrock``, any
region). The mock knows every key pair whose secret is ``"secret-" + access key id``
(for example ``AKIDMOCKEXAMPLE`` / ``secret-AKIDMOCKEXAMPLE``); temporary keys (ids
starting ``ASIA``) need the session token ``"token-" + access key id``, and other keys
no token. It recomputes the signature with botocore's ``SigV4Auth`` over the request
it received (method, path, the signed headers, the body) and answers 403
``InvalidSignatureException`` (a bad, missing or expired signature, or a signed header
it cannot see) or ``UnrecognizedClientException`` (a wrong session token). It sees
``host``, ``content-type``, ``x-amz-date``, ``x-amz-content-sha256`` and
``x-amz-security-token``.

Behaviour and content are those of the other APIs: the model id's tokens
(``mock-error-429``, ``mock-latency-N``, ``mock-chunks-N-delay-M``, ``mock-failafter-N``,
``mock-retryafter-N``) or ``additionalModelRequestFields.mock``; word ``k`` of the
answer is ``WORDS[(crc32(text of the last message) + k) % len(WORDS)]`` (the
toolResult blocks' text when the last message has any, else its text blocks joined
with single spaces). Usage counts the words of ``system`` and of every message, plus
one token per image. ``inferenceConfig.maxTokens`` below the word count shortens the
answer (``stopReason: "max_tokens"``). With ``toolConfig`` and a last message without
``toolResult`` blocks the answer calls the first tool (or ``toolChoice.tool``'s) with
``{"<param>": "<first word>"}``; streamed, its input comes in two ``toolUse`` deltas.

The model id token ``exception-<kind>`` (``throttling``, ``modelstreamerror``,
``internalserver``, ``serviceunavailable``, ``validation``) ends a ConverseStream with
an exception message (``:message-type: exception``) after its content (after
``failafter-N`` words when given) instead of ``messageStop``.

Requests are checked like Bedrock does (a user turn first, alternating roles, no
blank text, known image formats whose bytes match, ``toolConfig`` when tool blocks are
present, ``maxTokens`` >= 1, ``temperature`` and ``topP`` within 0..1): a 400
``ValidationException``. Errors are ``{"message": ...}`` with ``x-amzn-ErrorType``;
``POST /mock/fail`` failures come in this shape too.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hmac
import re
import struct
import zlib
from typing import Any, Final
from urllib.parse import unquote

import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from llm_broker.mock.formats import (
    CHUNKED_END,
    CLOSE_HDR,
    CRLF,
    NWORDS,
    WORDS,
    frame,
    response,
    tool_arguments,
    word_count,
)
from llm_broker.mock.params import resolve
from llm_broker.mock.server import _App, _Plan
from llm_broker.mock.state import Captured

__all__ = ["STREAM_CT", "event_message", "handle", "signature_problem"]

STREAM_CT: Final = b"application/vnd.amazon.eventstream"
_STREAM_HEAD: Final = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: application/vnd.amazon.eventstream\r\n"
    b"Transfer-Encoding: chunked\r\n"
)
_PREFIX: Final = b"/model/"
_TOOL_TOKENS = 2
_MAX_SKEW_S = 300  # as AWS: a signature more than 5 minutes off is expired
_SIGNATURE_MISMATCH: Final = (
    "The request signature we calculated does not match the signature you provided. "
    "Check your AWS Secret Access Key and signing method."
)
_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=([^/\s,]+)/(\d{8})/([^/\s,]+)/([^/\s,]+)/aws4_request,"
    r"\s*SignedHeaders=([a-z0-9;\-]+),\s*Signature=([0-9a-f]{64})"
)
_ERROR_TYPES: Final = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
_STREAM_EXCEPTIONS: Final = {
    "throttling": "throttlingException",
    "modelstreamerror": "modelStreamErrorException",
    "internalserver": "internalServerException",
    "serviceunavailable": "serviceUnavailableException",
    "validation": "validationException",
}
_IMAGE_MAGIC: Final = {
    "png": (b"\x89PNG\r\n\x1a\n",),
    "jpeg": (b"\xff\xd8\xff",),
    "gif": (b"GIF87a", b"GIF89a"),
    "webp": (b"RIFF",),
}
_BLOCK_KINDS: Final = frozenset(("text", "image", "toolUse", "toolResult", "document"))


class _Invalid(Exception):
    """A request Bedrock would refuse: 400 ValidationException with this message."""


# --------------------------------------------------------------------------- event stream


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode("utf-8"), value.encode("utf-8")
    return (
        struct.pack("!B", len(raw_name))
        + raw_name
        + b"\x07"
        + struct.pack("!H", len(raw_value))
        + raw_value
    )


def event_message(headers: list[tuple[str, str]], payload: bytes) -> bytes:
    """One ``application/vnd.amazon.eventstream`` message: the prelude (total length,
    headers length, their CRC32), string headers (type 7), the payload, the CRC32 of
    everything before it."""
    head = b"".join(_header(name, value) for name, value in headers)
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack("!II", total, len(head))
    prelude += struct.pack("!I", zlib.crc32(prelude))
    message = prelude + head + payload
    return message + struct.pack("!I", zlib.crc32(message))


def _event(kind: str, payload: dict[str, Any]) -> bytes:
    """A framed (HTTP chunk) event message."""
    headers = [
        (":event-type", kind),
        (":content-type", "application/json"),
        (":message-type", "event"),
    ]
    return frame(event_message(headers, orjson.dumps(payload)))


def _exception(kind: str, message: str) -> bytes:
    headers = [
        (":exception-type", kind),
        (":content-type", "application/json"),
        (":message-type", "exception"),
    ]
    return frame(event_message(headers, orjson.dumps({"message": message})))


def _padding(n: int) -> str:
    """Bedrock pads events with a ``p`` field of varying length (hiding token sizes)."""
    return "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123"[: 4 + n % 40]


# Text delta events for each word, first position (no leading space) and later positions.
_DELTA_FIRST: Final = tuple(
    _event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": w}, "p": _padding(i)})
    for i, w in enumerate(WORDS)
)
_DELTA_REST: Final = tuple(
    _event(
        "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": " " + w}, "p": _padding(i)}
    )
    for i, w in enumerate(WORDS)
)
_MESSAGE_START: Final = _event("messageStart", {"role": "assistant", "p": _padding(0)})
_BLOCK_STOP: Final = _event("contentBlockStop", {"contentBlockIndex": 0, "p": _padding(1)})


# --------------------------------------------------------------------------- responses


def _request_id(app: _App) -> bytes:
    return b"x-amzn-RequestId: mock-%d\r\n" % next(app.ids)


def _error(
    status: int, message: str, keep_alive: bool, etype: str | None = None, extra: bytes = b""
) -> bytes:
    """Bedrock's error answer: ``{"message"}`` and the ``x-amzn-ErrorType`` header."""
    if etype is None:
        etype = _ERROR_TYPES.get(status) or (
            "InternalServerException" if status >= 500 else "ValidationException"
        )
    extra = b"x-amzn-ErrorType: %s\r\n%s" % (etype.encode("ascii"), extra)
    return response(status, orjson.dumps({"message": message}), keep_alive, extra=extra)


def _injected(app: _App, keep_alive: bool) -> _Plan:
    """The answer of a ``POST /mock/fail`` failure, Bedrock-shaped unless it has a body."""
    st = app.state
    if st.failures_left > 0:
        st.failures_left -= 1
    if st.fail_body is None:
        return _Plan(
            _error(
                st.fail_status,
                f"mock injected failure {st.fail_status}",
                keep_alive,
                extra=st.fail_headers,
            )
        )
    return _Plan(
        response(
            st.fail_status, st.fail_body, keep_alive, ctype=st.fail_ctype, extra=st.fail_headers
        )
    )


# --------------------------------------------------------------------------- signature


def _secret(access_key: str) -> str:
    return "secret-" + access_key


def signature_problem(
    path: bytes, body: bytes, captured: Captured | None, now: datetime.datetime | None = None
) -> tuple[str, str] | None:
    """Why the request's SigV4 signature is refused, as (error type, message); None if
    it is valid."""
    seen: dict[str, str] = {}
    for name, value in captured or ():
        seen[name.decode("latin-1")] = value
    auth = _AUTHORIZATION.fullmatch(seen.get("authorization", "").strip())
    if auth is None:
        return "InvalidSignatureException", "Missing or malformed AWS4-HMAC-SHA256 Authorization"
    access_key, day, region, service, signed, signature = auth.groups()
    if service != "bedrock":
        return (
            "InvalidSignatureException",
            f"Credential should be scoped to service 'bedrock', not {service!r}",
        )
    names = signed.split(";")
    missing = [name for name in names if name not in seen]
    if missing or "host" not in names or "x-amz-date" not in names:
        what = ", ".join(missing) or "host and x-amz-date"
        return (
            "InvalidSignatureException",
            f"{_SIGNATURE_MISMATCH} (signed headers the mock cannot check or lacks: {what})",
        )
    stamp = seen["x-amz-date"]
    try:
        when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError:
        return "InvalidSignatureException", "X-Amz-Date is not an ISO 8601 basic timestamp"
    now = now or datetime.datetime.now(datetime.UTC)
    if abs((now - when).total_seconds()) > _MAX_SKEW_S or stamp[:8] != day:
        return "InvalidSignatureException", "Signature expired or not yet current"
    token = seen.get("x-amz-security-token") if "x-amz-security-token" in names else None
    if (token is not None) != access_key.startswith("ASIA") or (
        token is not None and not hmac.compare_digest(token, "token-" + access_key)
    ):
        return (
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    request = AWSRequest(
        method="POST",
        url="http://" + seen["host"] + path.decode("latin-1"),
        headers={name: seen[name] for name in names},
        data=body,
    )
    request.context["timestamp"] = stamp
    signer = SigV4Auth(Credentials(access_key, _secret(access_key), token), service, region)
    expected = signer.signature(
        signer.string_to_sign(request, signer.canonical_request(request)), request
    )
    if not hmac.compare_digest(expected, signature):
        return "InvalidSignatureException", _SIGNATURE_MISMATCH
    return None


# --------------------------------------------------------------------------- requests


def _texts(content: list[Any], where: str, has_tools: bool) -> tuple[str, bool, int]:
    """A message's seed text, whether it holds tool results and its image count;
    raises :class:`_Invalid` for what Bedrock refuses."""
    texts: list[str] = []
    results: list[str] = []
    images = 0
    for j, block in enumerate(content):
        at = f"{where}.content.{j}"
        if not isinstance(block, dict) or len(block) != 1 or next(iter(block)) not in _BLOCK_KINDS:
            raise _Invalid(f"The content block at {at} must have exactly one known member")
        kind, value = next(iter(block.items()))
        if kind == "text":
            if not isinstance(value, str) or not value.strip():
                raise _Invalid(f"The text field in the ContentBlock object at {at} is blank.")
            texts.append(value)
        elif kind == "image":
            _check_image(value, at)
            images += 1
        elif kind in ("toolUse", "toolResult"):
            if not has_tools:
                raise _Invalid(
                    "The toolConfig field must be defined when using toolUse and toolResult "
                    "content blocks."
                )
            if not isinstance(value, dict) or not isinstance(value.get("toolUseId"), str):
                raise _Invalid(f"{at}.{kind}.toolUseId is required")
            if kind == "toolResult":
                parts = value.get("content")
                if not isinstance(parts, list):
                    raise _Invalid(f"{at}.toolResult.content is required")
                results.append(
                    " ".join(
                        p["text"]
                        for p in parts
                        if isinstance(p, dict) and isinstance(p.get("text"), str)
                    )
                )
            elif not isinstance(value.get("name"), str) or not isinstance(value.get("input"), dict):
                raise _Invalid(f"{at}.toolUse needs name and an input object")
    if results:
        return " ".join(results), True, images
    return (texts[0] if len(texts) == 1 else " ".join(texts)), False, images


def _check_image(image: Any, at: str) -> None:
    if not isinstance(image, dict) or not isinstance(image.get("source"), dict):
        raise _Invalid(f"{at}.image needs format and source")
    fmt = image.get("format")
    if fmt not in _IMAGE_MAGIC:
        raise _Invalid(f"{at}.image.format must be one of png, jpeg, gif, webp")
    data = image["source"].get("bytes")
    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if not raw:
        raise _Invalid(f"{at}.image.source.bytes must be base64-encoded image bytes")
    if not raw.startswith(_IMAGE_MAGIC[fmt]):
        raise _Invalid(f"The image at {at} is not a valid {fmt} image.")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _tool(req: dict[str, Any]) -> tuple[str, object] | None:
    """The tool to call: ``toolChoice.tool``'s, else the first; raises for a bad config."""
    config = req.get("toolConfig")
    if config is None:
        return None
    tools = config.get("tools") if isinstance(config, dict) else None
    if not isinstance(tools, list) or not tools:
        raise _Invalid("toolConfig.tools must be a non-empty list")
    specs: list[tuple[str, object]] = []
    for i, tool in enumerate(tools):
        spec = tool.get("toolSpec") if isinstance(tool, dict) else None
        schema = spec.get("inputSchema") if isinstance(spec, dict) else None
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("name"), str)
            or not isinstance(schema, dict)
        ):
            raise _Invalid(f"toolConfig.tools.{i}.toolSpec needs name and inputSchema")
        specs.append((spec["name"], schema.get("json")))
    choice = config.get("toolChoice")
    named = choice.get("tool") if isinstance(choice, dict) else None
    if isinstance(named, dict):
        for spec_name, schema in specs:
            if spec_name == named.get("name"):
                return spec_name, schema
        raise _Invalid("toolConfig.toolChoice.tool.name names no tool of toolConfig.tools")
    return specs[0]


def _inference(req: dict[str, Any]) -> int | None:
    """``inferenceConfig.maxTokens`` (None: not given), checked with its siblings."""
    config = req.get("inferenceConfig")
    if config is None:
        return None
    if not isinstance(config, dict):
        raise _Invalid("inferenceConfig must be an object")
    for key in ("temperature", "topP"):
        if key in config and not (_number(config[key]) and 0 <= config[key] <= 1):
            raise _Invalid(f"inferenceConfig.{key} must be a number from 0 to 1")
    max_tokens = config.get("maxTokens")
    if max_tokens is None:
        return None
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _Invalid("inferenceConfig.maxTokens must be an integer >= 1")
    return max_tokens


def _read(req: dict[str, Any]) -> tuple[str, bool, int]:
    """Checks the request; (seed text, last message holds tool results, input tokens)."""
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _Invalid("messages must be a non-empty list")
    has_tools = req.get("toolConfig") is not None
    tokens = 0
    system = req.get("system")
    if system is not None:
        if not isinstance(system, list):
            raise _Invalid("system must be a list of content blocks")
        for block in system:
            text = block.get("text") if isinstance(block, dict) else None
            if isinstance(text, str):
                tokens += word_count(text)
    text, tool_result, previous = "", False, None
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise _Invalid(f"messages.{i}.role must be user or assistant")
        if i == 0 and role != "user":
            raise _Invalid(
                "A conversation must start with a user message. Try again with a "
                "conversation that starts with a user message."
            )
        if role == previous:
            raise _Invalid("A conversation must alternate between user and assistant roles.")
        previous = role
        content = message.get("content")
        if not isinstance(content, list) or not content:
            raise _Invalid(f"messages.{i}.content must be a non-empty list")
        text, tool_result, images = _texts(content, f"messages.{i}", has_tools)
        tokens += word_count(text) + images
    return text, tool_result, max(tokens, 1)


def _stream_exception(model: str) -> str | None:
    tokens = model.lower().split("-")
    for i, tok in enumerate(tokens[:-1]):
        if tok == "exception":
            return _STREAM_EXCEPTIONS.get(tokens[i + 1])
    return None


def handle(
    app: _App, path: bytes, raw: bytes, keep_alive: bool, captured: Captured | None
) -> _Plan:
    """A ``POST /model/{modelId}/converse[-stream]`` call."""
    rest = path[len(_PREFIX) :]
    slash = rest.rfind(b"/")
    operation = rest[slash + 1 :] if slash > 0 else b""
    if operation not in (b"converse", b"converse-stream"):
        msg = f"Unknown operation: POST {path.decode('latin-1')}"
        return _Plan(_error(404, msg, keep_alive, "UnknownOperationException"), counted=False)
    stream = operation == b"converse-stream"
    st = app.state
    st.record_call(path, captured)
    problem = signature_problem(path, raw, captured)
    if problem is not None:
        return _Plan(_error(403, problem[1], keep_alive, problem[0]))
    model = app._model(None, unquote(rest[:slash].decode("latin-1")))
    if st.failures_left:
        return _injected(app, keep_alive)
    req = app._load(raw)
    if req is None:
        return _Plan(
            _error(
                400,
                "Malformed input request, please reformat your input and try again.",
                keep_alive,
                "SerializationException",
            )
        )
    extra = req.get("additionalModelRequestFields")
    p = resolve(app.defaults, model, extra if isinstance(extra, dict) else {})
    latency = p.latency_ms / 1000.0
    try:
        text, tool_result, input_tokens = _read(req)
        max_tokens = _inference(req)
        tool = None if tool_result else _tool(req)
    except _Invalid as e:
        return _Plan(_error(400, str(e), keep_alive))
    if p.error is not None:
        retry = (
            b""
            if p.retry_after is None
            else b"Retry-After: %s\r\n" % p.retry_after.encode("latin-1")
        )
        msg = p.error_message or f"mock upstream error {p.error}"
        return _Plan(_error(p.error, msg, keep_alive, extra=retry), latency=latency)

    seed = zlib.crc32(text.encode("utf-8", "surrogatepass"))
    metrics = {"latencyMs": int(p.latency_ms)}
    rid = _request_id(app)
    if tool is not None:
        name, schema = tool
        pieces = tool_arguments(schema, text, seed)
        tool_id = f"tooluse_mock_{next(app.ids)}"
        n, stop = _TOOL_TOKENS, "tool_use"
    else:
        n, stop = p.chunks, "end_turn"
        if max_tokens is not None and max_tokens < n:
            n, stop = max_tokens, "max_tokens"
    usage = {"inputTokens": input_tokens, "outputTokens": n, "totalTokens": input_tokens + n}

    if not stream:
        if tool is not None:
            block: dict[str, Any] = {
                "toolUse": {
                    "toolUseId": tool_id,
                    "name": name,
                    "input": orjson.loads(pieces[0] + pieces[1]),
                }
            }
        else:
            block = {"text": " ".join([WORDS[(seed + k) % NWORDS] for k in range(n)])}
        answer = {
            "output": {"message": {"role": "assistant", "content": [block]}},
            "stopReason": stop,
            "usage": usage,
            "metrics": metrics,
        }
        return _Plan(response(200, orjson.dumps(answer), keep_alive, extra=rid), latency=latency)

    head = _STREAM_HEAD + rid + (b"" if keep_alive else CLOSE_HDR) + CRLF + _MESSAGE_START
    if tool is not None:
        start = {"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": tool_id, "name": name}}}
        head += _event("contentBlockStart", start)
        events = [
            _event(
                "contentBlockDelta",
                {"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}},
            )
            for piece in pieces
        ]
    else:
        events = [(_DELTA_REST if k else _DELTA_FIRST)[(seed + k) % NWORDS] for k in range(n)]
    exception = _stream_exception(model)
    abort = False
    if p.fail_after is not None:
        del events[p.fail_after :]
        abort = exception is None
    if exception is not None:
        tail = _exception(exception, f"mock stream {exception}") + CHUNKED_END
    elif abort:
        tail = b""
    else:
        tail = (
            _BLOCK_STOP
            + _event("messageStop", {"stopReason": stop, "p": _padding(2)})
            + _event("metadata", {"usage": usage, "metrics": metrics, "p": _padding(3)})
            + CHUNKED_END
        )
    return _Plan(
        head,
        latency=latency,
        events=events,
        tail=tail,
        delay=p.chunk_delay_ms / 1000.0,
        abort=abort,
    )
