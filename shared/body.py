"""The one codec of a client's JSON request body, shared by ingress and workers.

Ingress admits a body only if :func:`load` accepts it, and a worker decodes
the queued body with :func:`decode`, the same decoder, so whatever ingress
enqueues a worker can decode: they agree by construction. :func:`load` also
proves that the
value can be encoded again with room to spare, since the broker re-encodes
bodies (with the upstream's model name, or translated to another API, a few
levels deeper), and orjson's encoder stops at 254 levels of nesting and at
integers outside 64 bits.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

#: Levels of nesting the broker may add around a client's value when it
#: translates or wraps a request; a body must leave this much room.
HEADROOM = 8
#: The deepest nesting a body may have (orjson encodes at most 254 levels).
MAX_DEPTH = 254 - HEADROOM


class InvalidBody(ValueError):
    """The bytes are not a JSON value the broker can carry; the message says why."""


def decode(raw: bytes | str) -> Any:
    """Decode a queued body, as a worker does; :class:`InvalidBody` if it cannot."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidBody(f"malformed JSON body: {e}") from e


def load(raw: bytes | str) -> Any:
    """Decode a client's JSON body as ingress admits it: :func:`decode`, and the value
    must encode again with room to spare; :class:`InvalidBody` if the broker cannot
    carry it."""
    value = decode(raw)
    try:
        # The value wrapped HEADROOM levels deep must encode: then the value itself,
        # and anything the broker builds around it, does too.
        orjson.dumps(_wrap(value))
    except orjson.JSONEncodeError as e:
        raise InvalidBody(_encode_problem(e)) from e
    return value


def dump(value: Any) -> bytes:
    """Encode a body the broker built from a client's; :class:`InvalidBody` if it cannot."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as e:
        raise InvalidBody(_encode_problem(e)) from e


def _wrap(value: Any) -> list[Any]:
    for _ in range(HEADROOM - 1):
        value = [value]
    return [value]


def _encode_problem(e: orjson.JSONEncodeError) -> str:
    text = str(e)
    if "Recursion" in text:
        return f"the JSON body is nested too deeply (at most {MAX_DEPTH} levels)"
    if "Integer" in text:
        return "the JSON body holds an integer outside the 64-bit range"
    return f"the JSON body cannot be carried: {text}"


def estimate_tokens(body: Any, raw_size: int, cap: int) -> int:
    """A call's token cost before it runs: prompt bytes / 4 plus the most it may
    write, at most ``cap`` (no call uses more than its model's context)."""
    out = None
    if isinstance(body, dict):
        out = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(out, int) or out < 0:
        out = 256
    return min(cap, math.ceil(raw_size / 4) + min(out, cap))
