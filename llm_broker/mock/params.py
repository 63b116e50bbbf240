"""Behaviour of one mock upstream call (:mod:`llm_broker.mock.server`).

Resolved, in increasing priority, from the server defaults (:class:`MockDefaults`),
the tokens of the model name (``mock-slow``, ``mock-latency-1000``, ``mock-error-429``..;
parsed once per distinct name and cached) and the request's optional ``"mock"`` field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["MockDefaults", "Params", "as_number", "resolve"]

_MODEL_CACHE_MAX = 4096
_MAX_CHUNKS = 100_000


@dataclass(frozen=True)
class MockDefaults:
    latency_ms: float = 0.0  # delay before the first byte of the response
    chunks: int = 8  # number of content words / stream chunks
    chunk_delay_ms: float = 0.0  # delay between stream chunks


class Params:
    """Resolved behaviour of one request."""

    __slots__ = (
        "chunk_delay_ms",
        "chunks",
        "error",
        "error_message",
        "fail_after",
        "latency_ms",
        "retry_after",
    )

    def __init__(self, d: MockDefaults) -> None:
        self.latency_ms: float = d.latency_ms
        self.chunks: int = d.chunks
        self.chunk_delay_ms: float = d.chunk_delay_ms
        self.error: int | None = None
        self.error_message: str | None = None
        self.fail_after: int | None = None
        self.retry_after: str | None = None


# Per-model-name overrides: (latency_ms, chunks, chunk_delay_ms, error, fail_after, retry_after)
_ModelOverrides = tuple[float | None, int | None, float | None, int | None, int | None, str | None]
_NO_OVERRIDES: _ModelOverrides = (None, None, None, None, None, None)
_model_cache: dict[str, _ModelOverrides] = {}


def _num(tok: str) -> float | None:
    try:
        v = float(tok)
    except ValueError:
        return None
    return v if v == v and v not in (float("inf"), float("-inf")) else None


def _parse_model(model: str) -> _ModelOverrides:
    cached = _model_cache.get(model)
    if cached is not None:
        return cached
    latency: float | None = None
    chunks: int | None = None
    delay: float | None = None
    error: int | None = None
    fail_after: int | None = None
    retry_after: str | None = None
    toks = model.lower().split("-")[1:]
    i = 0
    n = len(toks)
    while i < n:
        tok = toks[i]
        if tok == "slow":
            latency = 2000.0
            i += 1
            continue
        if tok in ("latency", "lat", "chunks", "delay", "error", "failafter", "retryafter"):
            v = _num(toks[i + 1]) if i + 1 < n else None
            if v is not None:
                if tok in ("latency", "lat"):
                    latency = max(v, 0.0)
                elif tok == "chunks":
                    chunks = min(max(int(v), 0), _MAX_CHUNKS)
                elif tok == "delay":
                    delay = max(v, 0.0)
                elif tok == "error":
                    error = int(v)
                elif tok == "failafter":
                    fail_after = max(int(v), 0)
                else:
                    retry_after = str(int(v))
                i += 2
                continue
        i += 1
    result: _ModelOverrides = (latency, chunks, delay, error, fail_after, retry_after)
    if result == _NO_OVERRIDES:
        result = _NO_OVERRIDES
    if len(_model_cache) >= _MODEL_CACHE_MAX:
        _model_cache.clear()
    _model_cache[model] = result
    return result


def as_number(v: object) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


def resolve(defaults: MockDefaults, model: str, body: dict[str, Any]) -> Params:
    p = Params(defaults)
    ov = _parse_model(model)
    if ov is not _NO_OVERRIDES:
        latency, chunks, delay, error, fail_after, retry_after = ov
        if latency is not None:
            p.latency_ms = latency
        if chunks is not None:
            p.chunks = chunks
        if delay is not None:
            p.chunk_delay_ms = delay
        if error is not None:
            p.error = error
        if fail_after is not None:
            p.fail_after = fail_after
        if retry_after is not None:
            p.retry_after = retry_after
    mock = body.get("mock")
    if isinstance(mock, dict):
        v = as_number(mock.get("latency_ms"))
        if v is not None:
            p.latency_ms = max(v, 0.0)
        v = as_number(mock.get("chunks"))
        if v is not None:
            p.chunks = min(max(int(v), 0), _MAX_CHUNKS)
        v = as_number(mock.get("chunk_delay_ms"))
        if v is not None:
            p.chunk_delay_ms = max(v, 0.0)
        v = as_number(mock.get("error"))
        if v is not None:
            p.error = int(v)
        v = as_number(mock.get("fail_after"))
        if v is not None:
            p.fail_after = max(int(v), 0)
        message = mock.get("error_message")
        if isinstance(message, str) and message:
            p.error_message = message
        ra = mock.get("retry_after")
        if isinstance(ra, str) and ra:
            p.retry_after = ra
        else:
            v = as_number(ra)
            if v is not None:
                p.retry_after = str(int(v))
    if p.error is not None and not 400 <= p.error <= 599:
        p.error = None
    return p
