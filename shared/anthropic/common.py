"""Shared by both directions of the Anthropic translation: errors and helpers.

The errors (``TranslationError``, ``UpstreamStreamError``), JSON shape checks that
raise ``TranslationError`` with the dotted path of the culprit, and the mappings of
stop reasons, usage counts, tool-call arguments and sampling parameters.
"""

from __future__ import annotations

from typing import Any

import orjson

from llm_broker.shared.translate import Event as Event
from llm_broker.shared.translate import TranslationError as TranslationError
from llm_broker.shared.translate import bad as _bad
from llm_broker.shared.translate import is_int as _is_int
from llm_broker.shared.translate import is_number as _is_number

DEFAULT_MAX_TOKENS: int = 4096


class UpstreamStreamError(Exception):
    """The upstream sent an ``error`` event in the middle of a stream."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


# ---------------------------------------------------------------- shared helpers


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _int(value: Any) -> int:
    return value if _is_int(value) else 0


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list is required")
    return messages


# Anthropic stop_reason -> OpenAI finish_reason.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _finish_reason(stop_reason: Any) -> str:
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _stop_reason(finish_reason: Any, matched: Any, has_tool_use: bool) -> tuple[str, str | None]:
    """OpenAI finish_reason -> Anthropic (stop_reason, stop_sequence).

    ``matched`` is the stop string some servers (vLLM) report as ``stop_reason``.
    A "stop" that ends with tool calls (some servers say so) is ``tool_use``: that
    is what Anthropic clients look at to run the tools.
    """
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "content_filter":
        return "refusal", None
    if finish_reason in ("tool_calls", "function_call") or has_tool_use:
        return "tool_use", None
    if isinstance(matched, str) and matched:
        return "stop_sequence", matched
    return "end_turn", None


def _anthropic_usage(usage: Any) -> dict[str, int]:
    """OpenAI usage -> Anthropic usage (input_tokens excludes cache reads there)."""
    usage = usage if isinstance(usage, dict) else {}
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    out = {
        "input_tokens": max(_int(usage.get("prompt_tokens")) - cached, 0),
        "output_tokens": _int(usage.get("completion_tokens")),
    }
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def _chat_usage(usage: Any) -> dict[str, Any]:
    """Anthropic usage -> OpenAI usage (prompt_tokens counts cached input too)."""
    usage = usage if isinstance(usage, dict) else {}
    cache_read = _int(usage.get("cache_read_input_tokens"))
    prompt = sum(_int(usage.get(k)) for k in ("input_tokens", "cache_creation_input_tokens"))
    prompt += cache_read
    completion = _int(usage.get("output_tokens"))
    out: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion}
    out["total_tokens"] = prompt + completion
    if cache_read:
        out["prompt_tokens_details"] = {"cached_tokens": cache_read}
    return out


def _parse_arguments(arguments: Any) -> Any:
    """OpenAI tool-call arguments (a JSON string, maybe empty) -> the decoded value."""
    if isinstance(arguments, str):
        return orjson.loads(arguments) if arguments.strip() else {}
    return {} if arguments is None else arguments


def _tool_input(arguments: Any) -> dict[str, Any]:
    """Arguments -> Anthropic tool input; what is not a JSON object is kept in ``_raw``."""
    try:
        value = _parse_arguments(arguments)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"_raw": arguments}


def _sampling(body: dict[str, Any], out: dict[str, Any], upper: float) -> None:
    """Copy temperature and top_p, clamped to what the target API accepts."""
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if not _is_number(value):
                raise _bad(key, "a number is required")
            out[key] = min(max(value, 0), upper if key == "temperature" else 1)
