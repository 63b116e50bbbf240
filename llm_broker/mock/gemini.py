"""Google's Gemini API in the mock upstream (:mod:`llm_broker.mock.server` routes here).

Model calls, at any prefix (AI Studio ``/v1beta``, Vertex AI
``/v1/projects/P/locations/L/publishers/google``)::

    POST {prefix}/models/{model}:generateContent
    POST {prefix}/models/{model}:streamGenerateContent?alt=sse   (without alt=sse: a JSON array)

They need either an ``x-goog-api-key`` header (any non-empty key) or
``Authorization: Bearer <token>`` with a token this mock issued at ``POST /token``;
else 401 ``UNAUTHENTICATED``. Behaviour follows the model name and the body's
``"mock"`` field exactly as for the other APIs (``mock-error-429``, ``mock-latency-N``,
``mock-chunks-N-delay-M``, ``mock-failafter-N``…), and ``POST /mock/fail`` failures
apply. Every call is recorded in ``calls_by_path`` under its path.

The request is checked as Gemini does, so that a translation slip shows: unknown
fields (top level, ``generationConfig``, parts, function declarations) are a 400
``Invalid JSON payload received. Unknown name …``; each part holds exactly one kind
of data; ``inlineData`` needs a ``mimeType`` and valid base64; ``functionResponse``
needs a ``name`` and an object ``response``. As Gemini 3 does, the first
``functionCall`` part of each ``model`` turn must carry a ``thoughtSignature`` this
mock gave out (or Google's documented dummy ``skip_thought_signature_validator``).

Content is deterministic as for the other APIs: the seed is the crc32 of the last
turn's text (its text parts joined with single spaces; for a turn of
``functionResponse`` parts, their ``response.content`` strings, else their JSON).
``usageMetadata`` counts words (``systemInstruction`` included) plus 258 tokens per
``inlineData`` part (Gemini's count for an image); ``maxOutputTokens`` below the
word count shortens the answer with ``finishReason: "MAX_TOKENS"``. With ``tools``
(and ``toolConfig.functionCallingConfig.mode`` not ``NONE``) and a last turn that is
not a tool result, the answer is one ``functionCall`` of the first declared function
(or of ``allowedFunctionNames[0]``) with the arguments of the other APIs, a
``thoughtSignature`` and ``finishReason: "STOP"``. One candidate, whatever
``candidateCount`` says.

Streamed (``alt=sse``): ``data: <GenerateContentResponse>`` events, one per word (the
first chunk's text has no leading space), then one with an empty text part, the
``finishReason`` and the full ``usageMetadata``; the stream then ends (no ``[DONE]``).
A function call comes whole in one event.

Errors have Gemini's shape: ``{"error": {"code": 429, "message": "...", "status":
"RESOURCE_EXHAUSTED"}}`` (400 ``INVALID_ARGUMENT``, 401 ``UNAUTHENTICATED``, 403
``PERMISSION_DENIED``, 404 ``NOT_FOUND``, 500 ``INTERNAL``, 503 ``UNAVAILABLE``, 504
``DEADLINE_EXCEEDED``…), with ``Retry-After`` on 429 and 503.

``POST /token`` is an OAuth 2.0 JWT-bearer token endpoint (RFC 7523), as a service
account's ``token_uri``: the form body ``grant_type=urn:ietf:params:oauth:grant-type:
jwt-bearer&assertion=<JWT>``. The mock cannot know the service account's public key,
so it does not verify the signature: it accepts a well-formed JWT (RS256 header,
string ``iss``, ``aud`` and ``scope``, an ``exp`` in the future), records it and
answers ``{"access_token": "mock-token-<n>", "expires_in": 3600, "token_type":
"Bearer"}``; tests that hold the key verify the recorded assertion themselves. Errors
are OAuth's ``{"error": "invalid_grant", "error_description": ...}`` (400). Token
requests are recorded in ``calls_by_path`` (``/token``) but are not model calls.
``POST /token?mock=assertions`` answers ``{"assertions": [{"assertion", "header",
"claims"}, ...], "tokens_issued": n}`` (the last 100 assertions); ``/mock/reset``
clears them, and forgets the tokens it issued.
"""

from __future__ import annotations

import binascii
import collections
import time
import zlib
from base64 import b64decode, b64encode, urlsafe_b64decode
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import parse_qs, unquote

import orjson

from llm_broker.mock.formats import (
    CHUNKED_END,
    JSON_CT,
    NWORDS,
    WORDS,
    frame,
    response,
    stream_head,
    tool_arguments,
    word_count,
)
from llm_broker.mock.params import resolve
from llm_broker.mock.server import _CREDENTIAL_HEADERS, _Plan
from llm_broker.mock.state import Captured

if TYPE_CHECKING:
    from llm_broker.mock.server import _App

__all__ = ["JWT_BEARER", "error_body", "handle"]

JWT_BEARER: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
_IMAGE_TOKENS: Final = 258
_TOOL_TOKENS: Final = 2
_SIGNATURE_PREFIX: Final = b"mock-sig:"
_DUMMY_SIGNATURE: Final = "skip_thought_signature_validator"
_ASSERTIONS_KEPT: Final = 100

_STATUSES: Final = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_RETRY_STATUSES: Final = frozenset((429, 503))

_REQUEST_FIELDS: Final = frozenset(
    (
        "contents",
        "systemInstruction",
        "generationConfig",
        "tools",
        "toolConfig",
        "safetySettings",
        "cachedContent",
        "labels",
        "mock",
    )
)
_CONFIG_FIELDS: Final = frozenset(
    (
        "temperature",
        "topP",
        "topK",
        "candidateCount",
        "maxOutputTokens",
        "stopSequences",
        "presencePenalty",
        "frequencyPenalty",
        "seed",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseLogprobs",
        "logprobs",
        "thinkingConfig",
        "responseModalities",
        "mediaResolution",
        "speechConfig",
    )
)
_DATA_FIELDS: Final = frozenset(
    (
        "text",
        "inlineData",
        "fileData",
        "functionCall",
        "functionResponse",
        "executableCode",
        "codeExecutionResult",
    )
)
_PART_FIELDS: Final = _DATA_FIELDS | {"thought", "thoughtSignature", "videoMetadata"}
_DECLARATION_FIELDS: Final = frozenset(
    ("name", "description", "parameters", "parametersJsonSchema", "response", "behavior")
)
_MODES: Final = frozenset(("AUTO", "ANY", "NONE", "VALIDATED"))


# --------------------------------------------------------------------------- token book


@dataclass
class _Book:
    """The tokens one mock server issued and the assertions it was shown."""

    tokens: set[str] = field(default_factory=set)
    assertions: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=_ASSERTIONS_KEPT)
    )


def _book(app: _App) -> _Book:
    book: _Book = app.apis.setdefault("gemini", _Book())
    return book


# --------------------------------------------------------------------------- errors


def error_body(status: int, message: str) -> bytes:
    """Gemini's error object."""
    return orjson.dumps(
        {"error": {"code": status, "message": message, "status": _STATUSES.get(status, "UNKNOWN")}}
    )


def _error(
    status: int, message: str, keep_alive: bool, retry_after: str | None = None, latency: float = 0
) -> _Plan:
    extra = b""
    if status in _RETRY_STATUSES:
        extra = b"Retry-After: %s\r\n" % (retry_after or "1").encode("latin-1")
    return _Plan(
        response(status, error_body(status, message), keep_alive, extra=extra), latency=latency
    )


def _injected(app: _App, keep_alive: bool) -> _Plan:
    """The answer of a ``POST /mock/fail`` failure, Gemini's error unless a body was set."""
    st = app.state
    if st.failures_left > 0:
        st.failures_left -= 1
    body, ctype = st.fail_body, st.fail_ctype
    if body is None:
        body, ctype = error_body(st.fail_status, f"mock injected failure {st.fail_status}"), JSON_CT
    return _Plan(response(st.fail_status, body, keep_alive, ctype=ctype, extra=st.fail_headers))


# --------------------------------------------------------------------------- dispatch


def handle(
    app: _App, path: bytes, query: bytes, raw: bytes, keep_alive: bool, captured: Captured | None
) -> _Plan:
    """Answer a Gemini model call or a token request."""
    if path == b"/token":
        return _token(app, query, raw, keep_alive, captured)
    app.state.record_call(path, captured)
    slash = path.rfind(b"/models/")
    colon = path.rfind(b":")
    method = path[colon + 1 :]
    if slash < 0 or colon < slash or method not in (b"generateContent", b"streamGenerateContent"):
        return _error(404, f"unknown Gemini method: {path.decode('latin-1')}", keep_alive)
    model = app._model(None, unquote(path[slash + 8 : colon].decode("latin-1")))
    if not _authorized(_book(app), captured):
        msg = (
            "Request had invalid authentication credentials. "
            "Expected an API key or OAuth 2 access token."
        )
        return _error(401, msg, keep_alive)
    if app.state.failures_left:
        return _injected(app, keep_alive)
    req = app._load(raw)
    if req is None:
        return _error(400, "Invalid JSON payload received.", keep_alive)
    problem = _problem(req)
    if problem is not None:
        return _error(400, problem, keep_alive)

    p = resolve(app.defaults, model, req)
    latency = p.latency_ms / 1000.0
    if p.error is not None:
        msg = p.error_message or f"mock upstream error {p.error}"
        if "{credentials}" in msg:
            sent = " ".join(v for n, v in captured or () if n in _CREDENTIAL_HEADERS)
            msg = msg.replace("{credentials}", sent)
        return _error(p.error, msg, keep_alive, p.retry_after, latency)

    contents: list[dict[str, Any]] = req["contents"]
    prompt_tokens = _prompt_tokens(req)
    text, tool_result = _last_text(contents[-1])
    seed = zlib.crc32(text.encode("utf-8", "surrogatepass"))
    rid = f"mock-{next(app.ids)}"
    stream = method == b"streamGenerateContent"
    sse = stream and b"alt=sse" in query.split(b"&")

    tool = None if tool_result else _tool(req)
    if tool is not None:
        name, schema = tool
        pieces = tool_arguments(schema, text, seed)
        signature = b64encode(_SIGNATURE_PREFIX + name.encode()).decode()
        call = {"name": name, "args": orjson.loads(pieces[0] + pieces[1])}
        parts: list[dict[str, Any]] = [{"functionCall": call, "thoughtSignature": signature}]
        n, finish = _TOOL_TOKENS, "STOP"
        words: list[dict[str, Any]] = [{"functionCall": call, "thoughtSignature": signature}]
    else:
        n, finish = p.chunks, "STOP"
        config = req.get("generationConfig") or {}
        limit = config.get("maxOutputTokens")
        if isinstance(limit, int) and limit < n:
            n, finish = limit, "MAX_TOKENS"
        chosen = [WORDS[(seed + k) % NWORDS] for k in range(n)]
        parts = [{"text": " ".join(chosen)}]
        words = [{"text": word if k == 0 else " " + word} for k, word in enumerate(chosen)]
    usage = {
        "promptTokenCount": prompt_tokens,
        "candidatesTokenCount": n,
        "totalTokenCount": prompt_tokens + n,
    }
    if not stream:
        body = orjson.dumps(_answer(rid, model, parts, finish, usage))
        return _Plan(response(200, body, keep_alive), latency=latency)

    partial = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
    chunks = [_answer(rid, model, [part], None, partial) for part in words]
    last = _answer(rid, model, [{"text": ""}], finish, usage)
    if not sse:
        body = orjson.dumps([*chunks, last])
        return _Plan(response(200, body, keep_alive), latency=latency)
    events = [_event(chunk) for chunk in chunks]
    return app._stream(stream_head(keep_alive), events, _event(last) + CHUNKED_END, p, latency)


def _answer(
    rid: str, model: str, parts: list[dict[str, Any]], finish: str | None, usage: dict[str, int]
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    return {
        "candidates": [candidate],
        "usageMetadata": usage,
        "modelVersion": model,
        "responseId": rid,
    }


def _event(obj: dict[str, Any]) -> bytes:
    return frame(b"data: " + orjson.dumps(obj) + b"\r\n\r\n")


def _authorized(book: _Book, captured: Captured | None) -> bool:
    for name, value in captured or ():
        if name == b"x-goog-api-key" and value:
            return True
        if name == b"authorization" and value.startswith("Bearer "):
            return value[7:] in book.tokens
    return False


# --------------------------------------------------------------------------- requests


def _problem(req: dict[str, Any]) -> str | None:
    """What Gemini would refuse in the request (its 400 message), if anything."""
    unknown = _unknown(req, _REQUEST_FIELDS, "")
    if unknown:
        return unknown
    contents = req.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    for i, content in enumerate(contents):
        if not isinstance(content, dict) or content.get("role", "user") not in ("user", "model"):
            return f"* GenerateContentRequest.contents[{i}].role: must be 'user' or 'model'"
        problem = _parts_problem(content.get("parts"), f"contents[{i}]")
        if problem:
            return problem
        if content.get("role") == "model":
            problem = _signature_problem(content["parts"], i)
            if problem:
                return problem
    system = req.get("systemInstruction")
    if system is not None:
        if not isinstance(system, dict):
            return "* GenerateContentRequest.system_instruction: an object is required"
        problem = _parts_problem(system.get("parts"), "system_instruction")
        if problem:
            return problem
    config = req.get("generationConfig")
    if config is not None:
        if not isinstance(config, dict):
            return "* GenerateContentRequest.generation_config: an object is required"
        unknown = _unknown(config, _CONFIG_FIELDS, "generation_config")
        if unknown:
            return unknown
        limit = config.get("maxOutputTokens")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            return "* GenerateContentRequest.generation_config.max_output_tokens: must be positive"
    return _tools_problem(req)


def _unknown(obj: dict[str, Any], known: frozenset[str], where: str) -> str | None:
    for key in obj:
        if key not in known:
            at = f" at '{where}'" if where else ""
            return f'Invalid JSON payload received. Unknown name "{key}"{at}: Cannot find field.'
    return None


def _parts_problem(parts: Any, where: str) -> str | None:
    if not isinstance(parts, list) or not parts:
        return f"* GenerateContentRequest.{where}.parts: must not be empty"
    for j, part in enumerate(parts):
        at = f"{where}.parts[{j}]"
        if not isinstance(part, dict):
            return f"* GenerateContentRequest.{at}: an object is required"
        unknown = _unknown(part, _PART_FIELDS, at)
        if unknown:
            return unknown
        kinds = [key for key in part if key in _DATA_FIELDS]
        if len(kinds) != 1:
            return f"* GenerateContentRequest.{at}: exactly one kind of data is required"
        problem = _data_problem(kinds[0], part[kinds[0]], at)
        if problem:
            return problem
    return None


def _data_problem(kind: str, value: Any, at: str) -> str | None:
    if kind == "text":
        return None if isinstance(value, str) else f"* {at}.text: a string is required"
    if not isinstance(value, dict):
        return f"* {at}.{kind}: an object is required"
    if kind == "inlineData":
        if not isinstance(value.get("mimeType"), str) or not value["mimeType"]:
            return f"* {at}.inline_data.mime_type: required"
        try:
            b64decode(value.get("data") or "", validate=True)
        except (binascii.Error, ValueError, TypeError):
            return f"* {at}.inline_data.data: invalid base64 data"
    elif kind == "functionCall":
        if not isinstance(value.get("name"), str):
            return f"* {at}.function_call.name: required"
        if not isinstance(value.get("args", {}), dict):
            return f"* {at}.function_call.args: an object is required"
    elif kind == "functionResponse":
        if not isinstance(value.get("name"), str):
            return f"* {at}.function_response.name: required"
        if not isinstance(value.get("response"), dict):
            return f"* {at}.function_response.response: an object is required"
    return None


def _signature_problem(parts: list[dict[str, Any]], i: int) -> str | None:
    for part in parts:
        if "functionCall" not in part:
            continue
        signature = part.get("thoughtSignature")
        if signature == _DUMMY_SIGNATURE:
            return None
        try:
            issued = b64decode(signature or "", validate=True).startswith(_SIGNATURE_PREFIX)
        except (binascii.Error, ValueError, TypeError):
            issued = False
        if issued:
            return None
        name = part["functionCall"].get("name")
        return (
            f"Function call `{name}` in the `{i}.` content block is missing a `thought_signature`."
        )
    return None


def _tools_problem(req: dict[str, Any]) -> str | None:
    tools = req.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            return "* GenerateContentRequest.tools: a list is required"
        for i, tool in enumerate(tools):
            declarations = tool.get("functionDeclarations") if isinstance(tool, dict) else None
            if not isinstance(declarations, list):
                return f"* GenerateContentRequest.tools[{i}]: functionDeclarations expected"
            for j, decl in enumerate(declarations):
                at = f"tools[{i}].function_declarations[{j}]"
                if not isinstance(decl, dict) or not isinstance(decl.get("name"), str):
                    return f"* GenerateContentRequest.{at}.name: required"
                unknown = _unknown(decl, _DECLARATION_FIELDS, at)
                if unknown:
                    return unknown
                if "parameters" in decl and "parametersJsonSchema" in decl:
                    return f"* {at}: parameters and parametersJsonSchema are mutually exclusive"
    config = req.get("toolConfig")
    if config is not None:
        calling = config.get("functionCallingConfig") if isinstance(config, dict) else None
        if not isinstance(calling, dict) or calling.get("mode", "AUTO") not in _MODES:
            return "* GenerateContentRequest.tool_config.function_calling_config.mode: invalid"
    return None


def _prompt_tokens(req: dict[str, Any]) -> int:
    tokens = 0
    system = req.get("systemInstruction")
    groups = [system] if isinstance(system, dict) else []
    for content in [*groups, *req["contents"]]:
        for part in content["parts"]:
            if isinstance(part.get("text"), str):
                tokens += word_count(part["text"])
            elif "inlineData" in part:
                tokens += _IMAGE_TOKENS
    return max(tokens, 1)


def _last_text(content: dict[str, Any]) -> tuple[str, bool]:
    """The text that seeds the answer, and whether the turn holds tool results."""
    texts: list[str] = []
    results: list[str] = []
    for part in content["parts"]:
        if isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif "functionResponse" in part:
            answer = part["functionResponse"]["response"]
            given = answer.get("content")
            results.append(given if isinstance(given, str) else orjson.dumps(answer).decode())
    if results:
        return " ".join(results), True
    return " ".join(texts), False


def _tool(req: dict[str, Any]) -> tuple[str, object] | None:
    """The function to call: the first allowed one, else the first declared; None
    without tools or with mode NONE."""
    calling = (req.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if calling.get("mode") == "NONE":
        return None
    allowed = calling.get("allowedFunctionNames")
    named = allowed[0] if isinstance(allowed, list) and allowed else None
    for tool in req.get("tools") or ():
        for decl in tool["functionDeclarations"]:
            if named is None or decl["name"] == named:
                return decl["name"], decl.get("parametersJsonSchema", decl.get("parameters"))
    return None


# --------------------------------------------------------------------------- tokens


def _oauth_error(error: str, description: str, keep_alive: bool) -> _Plan:
    body = orjson.dumps({"error": error, "error_description": description})
    return _Plan(response(400, body, keep_alive), counted=False)


def _token(
    app: _App, query: bytes, raw: bytes, keep_alive: bool, captured: Captured | None
) -> _Plan:
    book = _book(app)
    if query == b"mock=assertions":
        found = {"assertions": list(book.assertions), "tokens_issued": len(book.tokens)}
        return _Plan(response(200, orjson.dumps(found), keep_alive), counted=False)
    app.state.record_call(b"/token", captured)
    form = parse_qs(raw.decode("latin-1"))
    if form.get("grant_type", [""])[-1] != JWT_BEARER:
        return _oauth_error(
            "unsupported_grant_type", f"grant_type must be {JWT_BEARER}", keep_alive
        )
    assertion = form.get("assertion", [""])[-1]
    try:
        header, claims = _decode_jwt(assertion)
    except ValueError as e:
        return _oauth_error("invalid_grant", f"Invalid JWT: {e}", keep_alive)
    book.assertions.append({"assertion": assertion, "header": header, "claims": claims})
    token = f"mock-token-{next(app.ids)}"
    book.tokens.add(token)
    body = orjson.dumps({"access_token": token, "expires_in": 3600, "token_type": "Bearer"})
    return _Plan(response(200, body, keep_alive), counted=False)


def _decode_jwt(assertion: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header and claims of a well-formed, unexpired RS256 JWT (not verified)."""
    pieces = assertion.split(".")
    if len(pieces) != 3 or not all(pieces):
        raise ValueError("a JWT has three non-empty parts")
    try:
        header, claims = (
            orjson.loads(urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in pieces[:2]
        )
        urlsafe_b64decode(pieces[2] + "=" * (-len(pieces[2]) % 4))
    except (binascii.Error, ValueError) as e:
        raise ValueError("its parts are not base64url JSON") from e
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise ValueError("its header and claims must be objects")
    if header.get("alg") != "RS256":
        raise ValueError("alg must be RS256")
    for claim in ("iss", "aud", "scope"):
        if not isinstance(claims.get(claim), str) or not claims[claim]:
            raise ValueError(f"claim {claim!r} is required")
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or exp <= time.time():
        raise ValueError("claim 'exp' must be in the future")
    return header, claims
