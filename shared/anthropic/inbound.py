"""Client speaks Anthropic, the broker speaks OpenAI chat inside (the ingress half).

``messages_to_chat`` turns a ``POST /v1/messages`` body into a chat request;
``chat_to_message`` and ``ChunksToEvents`` turn the chat answer back into an Anthropic
message or stream events (``sse_event`` frames one); ``error_object`` is the Anthropic
error body of a broker error.
"""

from __future__ import annotations

from typing import Any

import orjson

from llm_broker.shared.anthropic.common import (
    _anthropic_usage,
    _json,
    _messages,
    _sampling,
    _stop_reason,
    _tool_input,
)
from llm_broker.shared.translate import Event
from llm_broker.shared.translate import as_object as _object
from llm_broker.shared.translate import bad as _bad
from llm_broker.shared.translate import is_int as _is_int
from llm_broker.shared.translate import part_type as _block_type
from llm_broker.shared.translate import string as _string

# ---------------------------------------------------------------- ingress: requests


def messages_to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """Translate an Anthropic Messages request into an OpenAI chat request.

    Raises TranslationError for a malformed request or content that OpenAI chat
    cannot carry (documents, thinking blocks, server tools...).
    """
    body = _object(body, "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "a non-empty string is required")
    max_tokens = body.get("max_tokens")
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _bad("max_tokens", "a positive integer is required")
    raw_messages = _messages(body)
    messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system is not None:
        text = _system_text(system)
        if text:
            messages.append({"role": "system", "content": text})
    for i, message in enumerate(raw_messages):
        messages.extend(_anthropic_message(message, f"messages.{i}"))
    chat: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens}

    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop_sequences", "a list of strings is required")
        if stops:
            chat["stop"] = stops
    _sampling(body, chat, upper=2)
    stream = body.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise _bad("stream", "a boolean is required")
        chat["stream"] = stream
        if stream:
            chat["stream_options"] = {"include_usage": True}
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "a list is required")
        chat["tools"] = [_anthropic_tool(t, f"tools.{i}") for i, t in enumerate(tools)]
    if body.get("tool_choice") is not None:
        _anthropic_tool_choice(_object(body["tool_choice"], "tool_choice"), chat)
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    return chat


def _system_text(system: Any) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise _bad("system", "a string or a list of text blocks is required")
    texts = []
    for i, block in enumerate(system):
        if _block_type(block, f"system.{i}") != "text":
            raise _bad(f"system.{i}.type", "only text blocks are allowed")
        texts.append(_string(block, "text", f"system.{i}"))
    return "\n\n".join(t for t in texts if t)


def _anthropic_message(message: Any, param: str) -> list[dict[str, Any]]:
    role = _object(message, param).get("role")
    if role not in ("user", "assistant"):
        raise _bad(f"{param}.role", f"must be 'user' or 'assistant', not {role!r}")
    content = message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list) or not content:
        raise _bad(f"{param}.content", "a string or a non-empty list of blocks is required")
    if role == "assistant":
        return [_anthropic_assistant(content, param)]
    return _anthropic_user(content, param)


def _anthropic_assistant(blocks: list[Any], param: str) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        bparam = f"{param}.content.{j}"
        kind = _block_type(block, bparam)
        if kind == "text":
            texts.append(_string(block, "text", bparam))
        elif kind == "tool_use":
            tool_input = _object(block.get("input"), f"{bparam}.input")
            function = {"name": _string(block, "name", bparam), "arguments": _json(tool_input)}
            calls.append(
                {"id": _string(block, "id", bparam), "type": "function", "function": function}
            )
        else:
            raise _bad(
                f"{bparam}.type", f"block type {kind!r} is not supported in an assistant message"
            )
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        out["tool_calls"] = calls
    elif out["content"] is None:
        out["content"] = ""
    return out


def _anthropic_user(blocks: list[Any], param: str) -> list[dict[str, Any]]:
    """One user turn -> its tool messages (which must follow the tool calls) then the rest."""
    out: list[dict[str, Any]] = []
    tool_images: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        bparam = f"{param}.content.{j}"
        kind = _block_type(block, bparam)
        if kind == "text":
            parts.append({"type": "text", "text": _string(block, "text", bparam)})
        elif kind == "image":
            parts.append(_anthropic_image(block, bparam))
        elif kind == "tool_result":
            out.append(_anthropic_tool_result(block, bparam, tool_images))
        else:
            raise _bad(f"{bparam}.type", f"block type {kind!r} is not supported in a user message")
    # OpenAI tool messages carry text only: images a tool returned go in the user turn.
    parts = tool_images + parts
    if len(parts) == 1 and parts[0]["type"] == "text":
        out.append({"role": "user", "content": parts[0]["text"]})
    elif parts:
        out.append({"role": "user", "content": parts})
    return out


def _anthropic_tool_result(
    block: dict[str, Any], param: str, images: list[dict[str, Any]]
) -> dict[str, Any]:
    tool_use_id = _string(block, "tool_use_id", param)
    content = block.get("content")
    texts: list[str] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for k, item in enumerate(content):
            iparam = f"{param}.content.{k}"
            kind = _block_type(item, iparam)
            if kind == "text":
                texts.append(_string(item, "text", iparam))
            elif kind == "image":
                images.append(_anthropic_image(item, iparam))
            else:
                raise _bad(
                    f"{iparam}.type", f"block type {kind!r} is not supported in a tool result"
                )
    elif content is not None:
        raise _bad(f"{param}.content", "a string or a list of blocks is required")
    text = "\n".join(texts)
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": tool_use_id, "content": text}


def _anthropic_image(block: dict[str, Any], param: str) -> dict[str, Any]:
    source = _object(block.get("source"), f"{param}.source")
    kind = source.get("type")
    if kind == "base64":
        media_type = _string(source, "media_type", f"{param}.source")
        data = _string(source, "data", f"{param}.source")
        url = f"data:{media_type};base64,{data}"
    elif kind == "url":
        url = _string(source, "url", f"{param}.source")
    else:
        raise _bad(f"{param}.source.type", f"image source {kind!r} is not supported")
    return {"type": "image_url", "image_url": {"url": url}}


def _anthropic_tool(tool: Any, param: str) -> dict[str, Any]:
    kind = _object(tool, param).get("type")
    if kind not in (None, "custom"):
        raise _bad(f"{param}.type", f"tool type {kind!r} is not supported")
    function: dict[str, Any] = {"name": _string(tool, "name", param)}
    if isinstance(tool.get("description"), str):
        function["description"] = tool["description"]
    function["parameters"] = _object(tool.get("input_schema"), f"{param}.input_schema")
    return {"type": "function", "function": function}


def _anthropic_tool_choice(choice: dict[str, Any], chat: dict[str, Any]) -> None:
    kind = choice.get("type")
    if kind == "auto":
        chat["tool_choice"] = "auto"
    elif kind == "any":
        chat["tool_choice"] = "required"
    elif kind == "none":
        chat["tool_choice"] = "none"
    elif kind == "tool":
        name = _string(choice, "name", "tool_choice")
        chat["tool_choice"] = {"type": "function", "function": {"name": name}}
    else:
        raise _bad("tool_choice.type", f"{kind!r} is not one of auto, any, tool, none")
    if choice.get("disable_parallel_tool_use") is True and kind != "none":
        chat["parallel_tool_calls"] = False


# ---------------------------------------------------------------- ingress: responses


def chat_to_message(completion: dict[str, Any], model: str) -> dict[str, Any]:
    """Translate an OpenAI ``chat.completion`` into an Anthropic message object."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):  # some servers answer with text parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for i, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id") or f"toolu_{i}",
                "name": function.get("name") or "",
                "input": _tool_input(function.get("arguments")),
            }
        )
    has_tool_use = any(block["type"] == "tool_use" for block in content)
    stop_reason, stop_sequence = _stop_reason(
        choice.get("finish_reason"), choice.get("stop_reason"), has_tool_use
    )
    return {
        "id": "msg_" + str(completion.get("id") or "").removeprefix("chatcmpl-"),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _anthropic_usage(completion.get("usage")),
    }


class ChunksToEvents:
    """OpenAI ``chat.completion.chunk`` dicts -> Anthropic stream events, for one response.

    Each event is ``(name, data)``. Blocks are opened lazily: text deltas go to a
    text block, each tool call to its own tool_use block; switching closes the
    open block. ``finish`` closes the message.
    """

    def __init__(self, message_id: str, model: str) -> None:
        self._message_id = message_id
        self._model = model
        self._started = False
        self._finished = False
        self._blocks = 0  # blocks opened so far; the open one has index _blocks - 1
        self._open: str | None = None  # "text", "tool:<openai index>" or None
        self._open_id: str | None = None
        self._has_tool_use = False
        self._finish_reason: Any = None
        self._matched_stop: Any = None
        self._usage: dict[str, int] = {"input_tokens": 0, "output_tokens": 0}

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        events = self._start()
        if self._finished:
            return events
        if isinstance(chunk.get("usage"), dict):
            self._usage = _anthropic_usage(chunk["usage"])
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._open != "text":
                    events += self._open_block("text", {"type": "text", "text": ""})
                events.append(self._delta({"type": "text_delta", "text": text}))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    events += self._tool_delta(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
                self._matched_stop = choice.get("stop_reason")
        return events

    def finish(self) -> list[Event]:
        events = self._start()
        if self._finished:
            return events
        self._finished = True
        events += self._close_block()
        stop_reason, stop_sequence = _stop_reason(
            self._finish_reason, self._matched_stop, self._has_tool_use
        )
        usage = {"output_tokens": self._usage["output_tokens"], **self._usage}
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        events.append(("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def _start(self) -> list[Event]:
        if self._started:
            return []
        self._started = True
        message: dict[str, Any] = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def _tool_delta(self, call: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        key = f"tool:{call.get('index', 0)}"
        call_id = call.get("id")
        function = call.get("function") or {}
        # A new index, or a new id under the same index (some servers number every call 0).
        real_id = call_id if isinstance(call_id, str) and call_id else None
        if self._open != key or (real_id and self._open_id and real_id != self._open_id):
            block_id = real_id or f"toolu_{self._message_id.removeprefix('msg_')}_{self._blocks}"
            block = {"type": "tool_use", "id": block_id, "name": function.get("name") or ""}
            events += self._open_block(key, {**block, "input": {}})
            self._open_id = real_id
            self._has_tool_use = True
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            events.append(self._delta({"type": "input_json_delta", "partial_json": arguments}))
        return events

    def _open_block(self, key: str, block: dict[str, Any]) -> list[Event]:
        events = self._close_block()
        self._open = key
        self._open_id = None
        self._blocks += 1
        start = {"type": "content_block_start", "index": self._blocks - 1, "content_block": block}
        events.append(("content_block_start", start))
        return events

    def _close_block(self) -> list[Event]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1})]

    def _delta(self, delta: dict[str, Any]) -> Event:
        data = {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}
        return ("content_block_delta", data)


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """Frame one Anthropic stream event for the wire."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


_STATUS_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# Error types that say more than the status does (the broker's own, or an
# Anthropic upstream's passed through).
_SPECIFIC_ERROR_TYPES = {
    "timeout": "timeout_error",
    "timeout_error": "timeout_error",
    "service_unavailable": "overloaded_error",
    "overloaded_error": "overloaded_error",
    "billing_error": "billing_error",
    "insufficient_quota": "billing_error",
    "rate_limit_error": "rate_limit_error",
}


def error_object(status: int, message: str, openai_type: str | None = None) -> dict[str, Any]:
    """An Anthropic error body for an HTTP status (and the broker's error type, if any)."""
    error_type = _SPECIFIC_ERROR_TYPES.get(openai_type or "") or _STATUS_ERROR_TYPES.get(status)
    if error_type is None:
        error_type = "invalid_request_error" if 400 <= status < 500 else "api_error"
    return {"type": "error", "error": {"type": error_type, "message": message}}
