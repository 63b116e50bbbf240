"""Request and response bodies: reading, decoding and checking what clients send."""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from llm_broker.shared import body
from llm_broker.shared import messages as m
from llm_broker.shared.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

T = TypeVar("T")

_PARAM_RE = re.compile(r"at `\$\.?([^`]*)`")


def json_response(
    obj: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(obj),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")


async def read_json_body(request: web.Request, limit: int) -> bytes:
    ctype = request.headers.get("Content-Type")
    if ctype is not None and request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got {request.content_type!r}"
        )
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge as e:
        raise too_large(limit) from e
    except RequestPayloadError as e:  # e.g. Content-Encoding: gzip on a plain body
        raise BadRequest(f"the request body cannot be read: {e}", code="invalid_body") from e


def load_json(raw: bytes) -> Any:
    """A request body decoded by the workers' own decoder (a body it would refuse
    is never queued); a 400 if it is empty or cannot be carried."""
    if not raw.strip():
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        return body.load(raw)
    except body.InvalidBody as e:
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
    req = decode_body(m.chat_request_decoder, raw, required=("model", "messages"))
    if not req.messages:
        raise BadRequest("'messages' must contain at least one message", param="messages")
    return req


def decode_embeddings(raw: bytes) -> m.EmbeddingsRequest:
    req = decode_body(m.embeddings_request_decoder, raw, required=("model", "input"))
    if req.input == "" or req.input == []:
        raise BadRequest("'input' must not be empty", param="input")
    return req
