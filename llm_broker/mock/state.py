"""State of a mock upstream server (:mod:`llm_broker.mock.server`).

:class:`MockState` is what the control endpoints show, clear and arm; the connection
code updates its counters directly::

    GET  /mock/stats    counters, JSON (below)
    GET  /mock/requests the last 20 model calls: path, recorded headers, body (base64)
    POST /mock/reset    zero the counters, clear the recorded history and /mock/fail
    POST /mock/fail     {"status": 500, "times": 3, "retry_after": "2",
                         "retry_after_ms": 1500, "body": ..}  -> {"status", "failures_left"}
        the next ``times`` model calls (any API; -1: until cleared; 0: clear now; default
        1) answer ``status`` at once (no latency, no behaviour) with exactly the given
        ``Retry-After`` / ``retry-after-ms`` headers and ``body`` (a string is sent as
        text/plain, other JSON as JSON) or else the API's error object.

``GET /mock/stats``: ``calls``, ``completed``, ``disconnects``, ``in_flight``,
``peak_in_flight``; ``auth_seen`` (every credential header value of any request but
``/mock/*``, as always); for model calls ``authorization_seen`` (``Authorization``),
``api_key_seen`` (Azure ``api-key``), ``x_api_key_seen`` (Anthropic ``x-api-key``) and
``models_seen`` and ``traceparent_seen`` (W3C trace context) (the last 100 each),
``api_version_seen`` (the last Azure api-version
or ``anthropic-version`` header, else null), ``call_times`` (``time.time()`` of the last
1000 arrivals), ``calls_by_path`` (``{"/v1/messages": n, ..}``, path without query) and
``failures_left`` (of ``/mock/fail``); ``prompt_tokens`` and ``completion_tokens``, the
usage of every OpenAI chat completion it answered (or began to stream).
"""

from __future__ import annotations

import base64
import collections
import math
from time import time as _now
from typing import Any

import orjson

from llm_broker.mock.formats import JSON_CT, TEXT_CT
from llm_broker.mock.params import as_number

__all__ = ["Captured", "ControlError", "MockState"]

_AUTH_HISTORY = 100
_REQUEST_HISTORY = 20
_CALL_HISTORY = 1000
_MAX_PATHS = 1000  # distinct calls_by_path keys; later new paths count under "<other>"
_OTHER_PATH = b"<other>"

Captured = list[tuple[bytes, str]]  # recorded request headers: (lowercase name, value)


class ControlError(Exception):
    """An invalid control request (answered 400 with the message)."""


class MockState:
    """Per-server counters and history (exposed as JSON by ``GET /mock/stats``)."""

    __slots__ = (
        "api_key_seen",
        "api_version_seen",
        "auth_seen",
        "authorization_seen",
        "call_times",
        "calls",
        "completed",
        "completion_tokens",
        "disconnects",
        "fail_body",
        "fail_ctype",
        "fail_headers",
        "fail_status",
        "failures_left",
        "in_flight",
        "models_seen",
        "path_counts",
        "peak_in_flight",
        "prompt_tokens",
        "requests_seen",
        "traceparent_seen",
        "x_api_key_seen",
    )

    def __init__(self) -> None:
        self.calls = 0
        self.in_flight = 0
        self.peak_in_flight = 0
        self.completed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.disconnects = 0
        self.auth_seen: collections.deque[str] = collections.deque(maxlen=_AUTH_HISTORY)
        self.authorization_seen: collections.deque[str] = collections.deque(maxlen=_AUTH_HISTORY)
        self.api_key_seen: collections.deque[str] = collections.deque(maxlen=_AUTH_HISTORY)
        self.x_api_key_seen: collections.deque[str] = collections.deque(maxlen=_AUTH_HISTORY)
        self.api_version_seen: str | None = None
        #: The last model calls as they came: (path, recorded headers, body).
        self.requests_seen: collections.deque[tuple[bytes, Captured, bytes]] = collections.deque(
            maxlen=_REQUEST_HISTORY
        )
        self.traceparent_seen: collections.deque[str] = collections.deque(maxlen=_AUTH_HISTORY)
        self.models_seen: collections.deque[str] = collections.deque(maxlen=_AUTH_HISTORY)
        self.call_times: collections.deque[float] = collections.deque(maxlen=_CALL_HISTORY)
        self.path_counts: dict[bytes, int] = {}  # raw path -> model calls
        # POST /mock/fail: the remaining failures (-1: unlimited) and the answer.
        self.failures_left = 0
        self.fail_status = 500
        self.fail_headers = b""
        self.fail_body: bytes | None = None
        self.fail_ctype = JSON_CT

    @property
    def calls_by_path(self) -> dict[str, int]:
        return {k.decode("latin-1"): v for k, v in self.path_counts.items()}

    def snapshot(self) -> dict[str, object]:
        return {
            "calls": self.calls,
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "completed": self.completed,
            "disconnects": self.disconnects,
            "auth_seen": list(self.auth_seen),
            "authorization_seen": list(self.authorization_seen),
            "api_key_seen": list(self.api_key_seen),
            "x_api_key_seen": list(self.x_api_key_seen),
            "api_version_seen": self.api_version_seen,
            "traceparent_seen": list(self.traceparent_seen),
            "models_seen": list(self.models_seen),
            "call_times": list(self.call_times),
            "calls_by_path": self.calls_by_path,
            "failures_left": self.failures_left,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
        }

    def set_failure(
        self, status: int, times: int, headers: bytes, body: bytes | None, ctype: bytes
    ) -> None:
        """Answer the next ``times`` model calls (-1: all) with ``status``."""
        self.failures_left = times
        self.fail_status = status
        self.fail_headers = headers
        self.fail_body = body
        self.fail_ctype = ctype

    def clear_failure(self) -> None:
        self.set_failure(500, 0, b"", None, JSON_CT)

    def reset(self) -> None:
        """Zero the counters, clear the history and the injected failures. ``in_flight``
        is a live gauge and is kept (peak := current)."""
        self.calls = 0
        self.completed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.disconnects = 0
        self.peak_in_flight = self.in_flight
        self.auth_seen.clear()
        self.authorization_seen.clear()
        self.api_key_seen.clear()
        self.x_api_key_seen.clear()
        self.api_version_seen = None
        self.requests_seen.clear()
        self.traceparent_seen.clear()
        self.models_seen.clear()
        self.call_times.clear()
        self.path_counts.clear()
        self.clear_failure()

    def record_call(self, path: bytes, captured: Captured | None, body: bytes = b"") -> None:
        """Record a model call: its time, its path, its credentials and its body."""
        self.call_times.append(_now())
        self.requests_seen.append((path, captured or [], body))
        counts = self.path_counts
        if path in counts:
            counts[path] += 1
        else:
            if len(counts) >= _MAX_PATHS:
                path = _OTHER_PATH
            counts[path] = counts.get(path, 0) + 1
        if captured is not None:
            for name, value in captured:
                if name == b"authorization":
                    self.authorization_seen.append(value)
                elif name == b"x-api-key":
                    self.x_api_key_seen.append(value)
                elif name == b"api-key":
                    self.api_key_seen.append(value)
                elif name == b"traceparent":
                    self.traceparent_seen.append(value)
                elif name == b"anthropic-version":
                    self.api_version_seen = value

    def requests(self) -> list[dict[str, Any]]:
        """``GET /mock/requests``: the last model calls, oldest first, each with its
        path, the recorded headers and the body exactly as it came (base64)."""
        return [
            {
                "path": path.decode("latin-1"),
                "headers": {n.decode("latin-1"): v for n, v in captured},
                "body_b64": base64.b64encode(body).decode(),
            }
            for path, captured, body in self.requests_seen
        ]

    def arm(self, req: dict[str, Any] | None) -> bytes:
        """``POST /mock/fail``: arm (or clear, ``times: 0``) failures of the next calls.

        ``req`` is the decoded body (None: not a JSON object); returns the JSON answer,
        raises :class:`ControlError` for an invalid request.
        """
        if req is None:
            raise ControlError("invalid JSON body: an object is required")
        times = req.get("times", 1)
        if not isinstance(times, int) or isinstance(times, bool) or times < -1:
            raise ControlError("'times' must be an integer >= -1")
        if times == 0:
            self.clear_failure()
            return b'{"failures_left":0}'
        status = req.get("status", 500)
        if not isinstance(status, int) or isinstance(status, bool) or not 400 <= status <= 599:
            raise ControlError("'status' must be an HTTP error status (400-599)")
        headers = b""
        for field, header in (
            ("retry_after", b"Retry-After"),
            ("retry_after_ms", b"retry-after-ms"),
        ):
            given = req.get(field)
            if given is None:
                continue
            value = _header_value(given)
            if value is None:
                raise ControlError(f"'{field}' must be a number >= 0 or a one-line ASCII string")
            headers += b"%s: %s\r\n" % (header, value.encode("ascii"))
        given = req.get("body")
        body: bytes | None = None
        ctype = JSON_CT
        if isinstance(given, str):
            body, ctype = given.encode("utf-8"), TEXT_CT
        elif given is not None:
            body = orjson.dumps(given)
        self.set_failure(status, times, headers, body, ctype)
        return orjson.dumps({"status": status, "failures_left": times})


def _header_value(v: object) -> str | None:
    """A ``/mock/fail`` header value: a non-empty one-line string or a number >= 0."""
    if isinstance(v, str):
        if v and "\r" not in v and "\n" not in v and v.isascii():
            return v
        return None
    n = as_number(v)
    if n is None or n < 0 or not math.isfinite(n):
        return None
    return str(int(n)) if n.is_integer() else repr(n)
