"""Edits of a JSON object's top-level members in its bytes, the rest left as it came.

A request passed through to an upstream of its own API keeps every byte the
client sent (key order, spacing, number spellings) apart from the members the
broker must set (the model's name upstream). The scanner finds the top-level
members by their string and bracket tokens (a regular expression, in C), so it
costs one pass over the body and no decoding. The body was validated as JSON
before; a body that is not an object is refused.
"""

from __future__ import annotations

import re

import orjson

# A string (with its escapes), or one structural character.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]:,]', re.DOTALL)
_SPACE = b" \t\r\n"


class NotAnObject(ValueError):
    """The bytes are not a JSON object."""


def _members(raw: bytes) -> list[tuple[bytes, int, int]]:
    """The top-level members of an object: (decoded key, value start, value end)."""
    start = len(raw) - len(raw.lstrip(_SPACE))
    if raw[start : start + 1] != b"{":
        raise NotAnObject("expected a JSON object")
    found: list[tuple[bytes, int, int]] = []
    depth = 0
    key: bytes | None = None
    value_at = -1
    expect_key = False
    for token in _TOKEN.finditer(raw, start):
        t = token.group()
        c = t[:1]
        if c == b"{" or c == b"[":
            depth += 1
            if depth == 1:
                expect_key = True
            continue
        if c == b"}" or c == b"]":
            if depth == 1 and key is not None:
                found.append((key, value_at, token.start()))
                key = None
            depth -= 1
            if depth == 0:
                return found
            continue
        if depth != 1:
            continue
        if c == b'"' and expect_key:
            key = orjson.loads(t).encode()
            expect_key = False
        elif c == b":":
            value_at = token.end()
        elif c == b"," and key is not None:
            found.append((key, value_at, token.start()))
            key = None
            expect_key = True
    raise NotAnObject("unterminated JSON object")


def set_member(raw: bytes, key: str, value: object) -> bytes:
    """``raw`` with its top-level member ``key`` set to ``value`` (encoded as JSON):
    replaced where it is, or added at the end; every other byte unchanged."""
    encoded = orjson.dumps(value)
    name = key.encode()
    members = _members(raw)
    for found, begin, end in members:
        if found == name:
            # Keep the spacing around the old value.
            lead = len(raw[begin:end]) - len(raw[begin:end].lstrip(_SPACE))
            trail = len(raw[begin:end]) - len(raw[begin:end].rstrip(_SPACE))
            return raw[: begin + lead] + encoded + raw[end - trail :]
    close = raw.rstrip(_SPACE).rfind(b"}")
    sep = b"," if members else b""
    return raw[:close] + sep + orjson.dumps(key) + b":" + encoded + raw[close:]
