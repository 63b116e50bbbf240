"""The lines of a batch's input file, and the checks of a request body they share
with the ingress.

A batch input file is JSON Lines, one request a line, as OpenAI's Batch API takes it::

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {...}}

:func:`iter_lines` splits a file's bytes (streamed in chunks, from any byte offset)
into lines, and :func:`parse_line` checks one: its ``body`` must be a request the
ingress would admit, checked by the very functions the ingress uses
(:func:`decode_chat`, :func:`decode_embeddings`), so a line that passes here is a
job a worker can run. Nothing here imports from ingress or workers.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, AsyncIterable
from typing import Any, TypeVar

import msgspec

from llm_broker.shared import anthropic, responses
from llm_broker.shared import body as json_body
from llm_broker.shared import messages as m
from llm_broker.shared.anthropic import TranslationError
from llm_broker.shared.errors import BadRequest

T = TypeVar("T")

CHAT_URL = "/v1/chat/completions"
EMBEDDINGS_URL = "/v1/embeddings"
#: The endpoints a batch line may call.
URLS = (CHAT_URL, EMBEDDINGS_URL)
#: The longest ``custom_id``.
MAX_CUSTOM_ID = 512
#: The longest line of an input file (its newline not counted).
MAX_LINE = 10 * 1024 * 1024

# ---------------------------------------------------------------- request bodies

_PARAM_RE = re.compile(r"at `\$\.?([^`]*)`")


def load_json(raw: bytes) -> Any:
    """A request body decoded by the workers' own decoder (a body it would refuse
    is never queued); a 400 if it is empty or cannot be carried."""
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return json_body.load(raw)
    except json_body.InvalidBody as e:
        raise BadRequest(str(e), code="invalid_json") from e


def decode_body(
    decoder: msgspec.json.Decoder[T],
    raw: bytes,
    what: str = "request",
    required: tuple[str, ...] = (),
) -> T:
    """Decode a JSON request body; every way it can be wrong is a 400 naming the field."""
    load_json(raw)
    try:
        return decoder.decode(raw)
    except msgspec.ValidationError as e:
        text = str(e)
        found = _PARAM_RE.search(text)
        param = found.group(1) if found and found.group(1) else None
        for name in required:
            if f"missing required field `{name}`" in text:
                param = name
        raise BadRequest(f"invalid {what}: {text}", param=param) from e
    except (msgspec.DecodeError, RecursionError) as e:
        raise BadRequest(f"malformed JSON body: {e}", code="invalid_json") from e


def decode_chat(raw: bytes) -> m.ChatRequest:
    """A chat completion request as the ingress admits it (a 400 otherwise)."""
    req = decode_body(m.chat_request_decoder, raw, required=("model", "messages"))
    if not req.messages:
        raise BadRequest("'messages' must contain at least one message", param="messages")
    return req


def decode_messages(raw: bytes) -> m.MessagesRequest:
    """An Anthropic Messages request as the ingress admits it (a 400 otherwise)."""
    req = decode_body(m.messages_request_decoder, raw, required=("model", "messages"))
    _check_messages(req.messages)
    if req.max_tokens < 1:
        raise BadRequest("'max_tokens' must be at least 1", param="max_tokens")
    return req


def decode_count_tokens(raw: bytes) -> m.CountTokensRequest:
    """A token count request (a Messages request without ``max_tokens``)."""
    req = decode_body(m.count_tokens_request_decoder, raw, required=("model", "messages"))
    _check_messages(req.messages)
    return req


def _check_messages(messages: list[m.AnthropicMessage]) -> None:
    if not messages:
        raise BadRequest("'messages' must contain at least one message", param="messages")


def decode_responses(raw: bytes) -> m.ResponsesRequest:
    """A Responses request as the ingress admits it (a 400 otherwise)."""
    req = decode_body(m.responses_request_decoder, raw, required=("model",))
    if req.input is None and req.previous_response_id is None:
        raise BadRequest("'input' is required", param="input")
    if req.input == "" or req.input == []:
        raise BadRequest("'input' must not be empty", param="input")
    if req.max_output_tokens is not None and req.max_output_tokens < 1:
        raise BadRequest("'max_output_tokens' must be at least 1", param="max_output_tokens")
    if req.background and req.store is False:
        raise BadRequest("a background response is stored: 'store' cannot be false", param="store")
    return req


def untranslatable(kind: str, raw: bytes, context: bytes = b"") -> TranslationError | None:
    """Why a Messages or Responses request (after the earlier turns of ``context``)
    cannot be translated to chat, or None."""
    body = load_json(raw)
    try:
        if kind == m.MESSAGES:
            anthropic.messages_to_chat(body)
        else:
            responses.responses_to_chat(body, json_body.load(context) if context else None)
    except (anthropic.TranslationError, responses.TranslationError) as e:
        return e
    return None


def decode_embeddings(raw: bytes) -> m.EmbeddingsRequest:
    """An embeddings request as the ingress admits it (a 400 otherwise)."""
    req = decode_body(m.embeddings_request_decoder, raw, required=("model", "input"))
    if req.input == "" or req.input == []:
        raise BadRequest("'input' must not be empty", param="input")
    return req


# ---------------------------------------------------------------- batch lines


class LineError(ValueError):
    """A line of a batch input file that cannot be a request: ``line`` is its number
    (from 1), ``param`` the field at fault (``body.messages``…) or None."""

    def __init__(self, message: str, line: int, param: str | None = None) -> None:
        super().__init__(f"line {line}: {message}")
        self.message = message
        self.line = line
        self.param = param


class BatchLine(msgspec.Struct, frozen=True):
    """One checked request of a batch."""

    custom_id: str
    method: str
    url: str
    #: The request body, encoded again as JSON: a job's body as it is.
    body: bytes
    #: What the batch driver needs of the body, read once here: its model, and the
    #: most it may write (``max_completion_tokens`` or ``max_tokens``; None: unsaid).
    model: str = ""
    max_tokens: object = None


def parse_line(raw: bytes, line_no: int, endpoint: str | None = None) -> BatchLine:
    """Check one line of a batch input file (without its newline); ``endpoint``:
    the one URL every line must call (the batch's). :class:`LineError` says what
    is wrong."""
    try:
        value = json_body.load(raw)
    except json_body.InvalidBody as e:
        raise LineError(f"not a JSON line: {e}", line_no) from e
    if not isinstance(value, dict):
        raise LineError(f"expected a JSON object, got {_kind(value)}", line_no)

    if "custom_id" not in value:
        raise LineError("missing required field 'custom_id'", line_no, "custom_id")
    custom_id = value["custom_id"]
    if not isinstance(custom_id, str):
        raise LineError(
            f"'custom_id' must be a string, got {_kind(custom_id)}", line_no, "custom_id"
        )
    if not custom_id:
        raise LineError("'custom_id' must not be empty", line_no, "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise LineError(
            f"'custom_id' is longer than {MAX_CUSTOM_ID} characters", line_no, "custom_id"
        )

    method = value.get("method")
    if method != "POST":
        got = "none" if method is None else repr(method)[:80]
        raise LineError(f"'method' must be 'POST' (got {got})", line_no, "method")

    url = value.get("url")
    if url not in URLS:
        got = "none" if url is None else repr(url)[:200]
        raise LineError(
            f"'url' must be one of {', '.join(repr(u) for u in URLS)} (got {got})",
            line_no,
            "url",
        )
    assert isinstance(url, str)
    if endpoint is not None and url != endpoint:
        raise LineError(
            f"'url' is {url!r} but the batch's endpoint is {endpoint!r}", line_no, "url"
        )

    if "body" not in value:
        raise LineError("missing required field 'body'", line_no, "body")
    request = value["body"]
    if not isinstance(request, dict):
        raise LineError(f"'body' must be a JSON object, got {_kind(request)}", line_no, "body")
    try:
        encoded = json_body.dump(request)
    except json_body.InvalidBody as e:
        raise LineError(f"'body' cannot be carried: {e}", line_no, "body") from e
    try:
        max_tokens: object = None
        if url == CHAT_URL:
            chat = decode_chat(encoded)
            if chat.stream:
                raise BadRequest("streaming is not supported in a batch", param="stream")
            model, max_tokens = chat.model, chat.max_completion_tokens or chat.max_tokens
        else:
            model = decode_embeddings(encoded).model
    except BadRequest as e:
        param = f"body.{e.param}" if e.param else "body"
        raise LineError(f"'body' is not a valid request: {e.message}", line_no, param) from e
    return BatchLine(
        custom_id=custom_id,
        method=method,
        url=url,
        body=encoded,
        model=model,
        max_tokens=max_tokens,
    )


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


async def iter_lines(
    chunks: AsyncIterable[bytes], max_line: int = MAX_LINE
) -> AsyncGenerator[tuple[int, bytes, int], None]:
    """The lines of a stream of chunks: ``(line number from 1, the line without its
    "\\n" or "\\r\\n", the byte offset just after it)``, offsets counted from the
    first chunk's first byte. Blank lines are skipped (but counted); the last line
    may lack a newline. A line longer than ``max_line`` bytes is a :class:`LineError`,
    raised as soon as that many bytes of it are held."""
    buf = bytearray()
    #: The stream offset of buf[0]; how much of buf is known to hold no newline.
    base = 0
    scanned = 0
    line_no = 0
    async for chunk in chunks:
        if not chunk:
            continue
        buf += chunk
        start = 0
        while (nl := buf.find(b"\n", max(start, scanned))) >= 0:
            line_no += 1
            end = nl - 1 if nl > start and buf[nl - 1] == 0x0D else nl
            if end - start > max_line:
                raise _too_long(line_no, max_line)
            line = bytes(buf[start:end])
            start = nl + 1
            if line.strip():
                yield line_no, line, base + start
        if start:
            del buf[:start]
            base += start
        scanned = len(buf)
        # One byte of slack: a line of max_line bytes may wait for its "\n" after "\r".
        if len(buf) > max_line + 1:
            raise _too_long(line_no + 1, max_line)
    if buf:
        line_no += 1
        end = len(buf) - 1 if buf[-1] == 0x0D else len(buf)
        if end > max_line:
            raise _too_long(line_no, max_line)
        line = bytes(buf[:end])
        if line.strip():
            yield line_no, line, base + len(buf)


def _too_long(line_no: int, max_line: int) -> LineError:
    return LineError(f"the line is longer than {max_line} bytes", line_no)
