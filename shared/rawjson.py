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

# A string (with its escapes, unrolled: one pass of the regex engine per run of plain
# characters), or one structural character. Inside a nested value only strings and
# brackets matter: the second pattern skips everything else in C.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]:,]', re.DOTALL)
_NESTED = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\]]', re.DOTALL)
_SPACE = b" \t\r\n"


class NotAnObject(ValueError):
    """The bytes are not a JSON object."""


def _members(raw: bytes) -> list[tuple[bytes, int, int]]:
    """The top-level members of an object: (decoded key, value start, value end)."""
    start = len(raw) - len(raw.lstrip(_SPACE))
    if raw[start : start + 1] != b"{":
        raise NotAnObject("expected a JSON object")
    found: list[tuple[bytes, int, int]] = []
    key: bytes | None = None
    value_at = -1
    expect_key = True
    pos = start + 1
    while True:
        token = _TOKEN.search(raw, pos)
        if token is None:
            raise NotAnObject("unterminated JSON object")
        t = token.group()
        c = t[:1]
        pos = token.end()
        if c == b"{" or c == b"[":
            pos = _skip_nested(raw, pos)
        elif c == b"}" or c == b"]":
            if key is not None:
                found.append((key, value_at, token.start()))
            return found
        elif c == b'"' and expect_key:
            key = orjson.loads(t).encode()
            expect_key = False
        elif c == b":":
            value_at = pos
        elif c == b"," and key is not None:
            found.append((key, value_at, token.start()))
            key = None
            expect_key = True


def _skip_nested(raw: bytes, pos: int) -> int:
    """The position after the nested value whose opening bracket ends at ``pos``."""
    depth = 1
    while depth:
        token = _NESTED.search(raw, pos)
        if token is None:
            raise NotAnObject("unterminated JSON value")
        c = raw[token.start()]
        if c == 0x7B or c == 0x5B:  # { [
            depth += 1
        elif c == 0x7D or c == 0x5D:  # } ]
            depth -= 1
        pos = token.end()
    return pos


def set_member(raw: bytes, key: str, value: object) -> bytes:
    """``raw`` with its top-level member ``key`` set to ``value`` (encoded as JSON):
    replaced where it is (every occurrence, when the key is repeated: decoders keep
    the last, an upstream may read any), or added at the end; every other byte
    unchanged."""
    encoded = orjson.dumps(value)
    name = key.encode()
    members = _members(raw)
    out: list[bytes] = []
    done = 0
    for found, begin, end in members:
        if found != name:
            continue
        # Keep the spacing around the old value.
        lead = len(raw[begin:end]) - len(raw[begin:end].lstrip(_SPACE))
        trail = len(raw[begin:end]) - len(raw[begin:end].rstrip(_SPACE))
        out += (raw[done : begin + lead], encoded)
        done = end - trail
    if out:
        return b"".join(out) + raw[done:]
    close = raw.rstrip(_SPACE).rfind(b"}")
    sep = b"," if members else b""
    return raw[:close] + sep + orjson.dumps(key) + b":" + encoded + raw[close:]
