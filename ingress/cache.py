"""The exact-match response cache.

A request's key is the SHA-256 of its normalized body (JSON with sorted keys,
without ``stream`` and ``stream_options``, which change the delivery, not the
answer; a Messages request's with its ``anthropic-beta`` and ``anthropic-version``
headers), its kind (chat, embeddings, messages, count_tokens), scoped to the tenant unless
``cache.shared``. Chat and Messages requests are cached only when they do not sample
(``temperature`` given and 0), unless the model's route sets
``cache_sampling``. ``Cache-Control: no-cache`` skips the lookup (the answer is
still stored), ``no-store`` skips both. Workers store the answer when the job
completes; a cached chat answer is replayed as SSE for a streaming request.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from llm_broker.shared import messages as m
from llm_broker.shared.config import CacheConfig, ModelRoute
from llm_broker.shared.keys import Keys

#: The kinds whose answer does not depend on sampling: cached at any temperature.
DETERMINISTIC = frozenset((m.EMBEDDINGS, m.COUNT_TOKENS))


_ANTHROPIC = frozenset((m.MESSAGES, m.COUNT_TOKENS))
_ANTHROPIC_HEADERS = ("anthropic-beta", "anthropic-version")


@dataclass(frozen=True)
class Plan:
    key: str
    #: Look the key up before running the job (False under ``no-cache``).
    read: bool


def plan(
    request: web.Request,
    cfg: CacheConfig,
    keys: Keys,
    tenant: str,
    kind: str,
    body: dict[str, Any],
    route: ModelRoute,
) -> Plan | None:
    """Whether and how this request uses the cache."""
    if not cfg.enabled:
        return None
    directives = {
        d.strip().lower() for d in request.headers.get("Cache-Control", "").split(",") if d.strip()
    }
    if "no-store" in directives:
        return None
    if kind == m.RESPONSES:
        return None  # a response has state of its own (its id, previous_response_id)
    if kind not in DETERMINISTIC and not route.cache_sampling:
        temperature = body.get("temperature")
        if not isinstance(temperature, int | float) or temperature != 0:
            return None
    normal = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    # The Anthropic headers an answer depends on (a beta feature, the API version).
    versions = (
        [request.headers.get(h, "") for h in _ANTHROPIC_HEADERS] if kind in _ANTHROPIC else []
    )
    digest = hashlib.sha256(
        kind.encode()
        + b"\n"
        + orjson.dumps(normal, option=orjson.OPT_SORT_KEYS)
        + orjson.dumps(versions)
    ).hexdigest()
    return Plan(keys.cache("*" if cfg.shared else tenant, digest), "no-cache" not in directives)


def sse_replay(completion: dict[str, Any], include_usage: bool) -> tuple[bytes, bytes]:
    """A stored ``chat.completion`` as stream frames: (chunks, closing frames)."""
    base = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    frames: list[bytes] = []
    for choice in completion.get("choices") or ():
        message = choice.get("message") or {}
        delta: dict[str, Any] = {"role": "assistant", "content": message.get("content") or ""}
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        index = choice.get("index", 0)
        frames.append(
            _frame({**base, "choices": [{"index": index, "delta": delta, "finish_reason": None}]})
        )
        frames.append(
            _frame(
                {
                    **base,
                    "choices": [
                        {"index": index, "delta": {}, "finish_reason": choice.get("finish_reason")}
                    ],
                }
            )
        )
    closing = b""
    if include_usage and completion.get("usage"):
        closing = _frame({**base, "choices": [], "usage": completion["usage"]})
    return b"".join(frames), closing


def _frame(obj: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"
