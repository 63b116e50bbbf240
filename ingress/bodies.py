"""Request and response bodies: reading, decoding and checking what clients send."""

from __future__ import annotations

import re

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

# The checks of a request body live in shared code: a batch's lines get the same.
from llm_broker.shared.batchlines import decode_body as decode_body
from llm_broker.shared.batchlines import decode_chat as decode_chat
from llm_broker.shared.batchlines import decode_count_tokens as decode_count_tokens
from llm_broker.shared.batchlines import decode_embeddings as decode_embeddings
from llm_broker.shared.batchlines import decode_messages as decode_messages
from llm_broker.shared.batchlines import decode_responses as decode_responses
from llm_broker.shared.batchlines import load_json as load_json
from llm_broker.shared.batchlines import untranslatable as untranslatable
from llm_broker.shared.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType


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


_DIGITS = re.compile(r"[0-9]{1,9}", re.ASCII)


def limit_query(request: web.Request, default: int, top: int, name: str = "limit") -> int:
    """A page size from the query (``limit``): ASCII digits from 1 to ``top``, else 400."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not 1 <= int(raw) <= top:
        raise BadRequest(f"{name} must be an integer from 1 to {top}", param=name)
    return int(raw)
