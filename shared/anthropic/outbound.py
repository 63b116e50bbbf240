"""Upstream speaks Anthropic, the broker speaks OpenAI chat (the worker half).

``chat_to_messages`` turns a chat request into an Anthropic request; ``message_to_chat``
and ``EventsToChunks`` turn the Anthropic answer back into a ``chat.completion`` or
``chat.completion.chunk`` dicts. ``UpstreamStreamError`` (from ``common``) is raised
for an ``error`` event in the stream.
"""

from __future__ import annotations

from typing import Any

import orjson

from llm_broker.shared.anthropic.common import (
    DEFAULT_MAX_TOKENS,
    UpstreamStreamError,
    _chat_usage,
    _finish_reason,
    _json,
    _messages,
    _parse_arguments,
    _sampling,
)
from llm_broker.shared.translate import as_object as _object
from llm_broker.shared.translate import bad as _bad
from llm_broker.shared.translate import base64_data_url, function_tools
from llm_broker.shared.translate import chat_text as _chat_text
from llm_broker.shared.translate import is_int as _is_int
from llm_broker.shared.translate import part_type as _block_type
from llm_broker.shared.translate import string as _string

# ---------------------------------------------------------------- worker: requests


def chat_to_messages(
    body: dict[str, Any], model: str, default_max_tokens: int = DEFAULT_MAX_TOKENS
) -> dict[str, Any]:
    """Translate an OpenAI chat request into an Anthropic request for upstream ``model``.

    System and developer messages become the system prompt; tool messages become
    tool_result blocks; consecutive turns of one role are merged, since Anthropic
    requires user and assistant to alternate. Fields with no Anthropic equivalent
    are dropped, except ``n`` > 1, which is refused.
    """
    body = _object(body, "body")
    raw_messages = _messages(body)
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n", "only one choice per request is supported")

    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(raw_messages):
        param = f"messages.{i}"
        role = _object(message, param).get("role")
        if role in ("system", "developer"):
            text = _chat_text(message.get("content"), f"{param}.content")
            if text:
                system.append(text)
            continue
        if role == "user":
            turn_role, blocks = "user", _user_blocks(message.get("content"), param)
        elif role == "assistant":
            turn_role, blocks = "assistant", _assistant_blocks(message, param)
        elif role == "tool":
            turn_role, blocks = "user", [_tool_result_block(message, param)]
        else:
            raise _bad(f"{param}.role", f"role {role!r} is not supported")
        if not blocks:
            continue
        if turns and turns[-1]["role"] == turn_role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": turn_role, "content": blocks})
    if not turns:
        raise _bad("messages", "a user or assistant message is required")
    for turn in turns:  # tool results must open their user turn
        turn["content"].sort(key=lambda block: block["type"] != "tool_result")

    out: dict[str, Any] = {
        "model": model,
        "messages": turns,
        "max_tokens": _max_tokens(body, default_max_tokens),
    }
    if system:
        out["system"] = "\n\n".join(system)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop", "a string or a list of strings is required")
        if any(stops):
            out["stop_sequences"] = [s for s in stops if s]
    _sampling(body, out, upper=1)
    if isinstance(body.get("stream"), bool):
        out["stream"] = body["stream"]
    _chat_tools(body, out)
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    return out


def _max_tokens(body: dict[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _bad(key, "a positive integer is required")
            return int(value)
    return default


def _user_blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise _bad(f"{param}.content", "a string or a list of parts is required")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pparam = f"{param}.content.{j}"
        kind = _block_type(part, pparam)
        if kind == "text":
            text = _string(part, "text", pparam)
            if text:  # Anthropic refuses empty text blocks
                blocks.append({"type": "text", "text": text})
        elif kind == "image_url":
            blocks.append(_image_block(part, pparam))
        else:
            raise _bad(f"{pparam}.type", f"content part type {kind!r} is not supported")
    return blocks


def _image_block(part: dict[str, Any], param: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise _bad(f"{param}.image_url.url", "a string is required")
    if url.startswith("data:"):
        media_type, data = base64_data_url(url, f"{param}.image_url.url")
        source = {"type": "base64", "media_type": media_type, "data": data}
        return {"type": "image", "source": source}
    if url.startswith(("http://", "https://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise _bad(f"{param}.image_url.url", "a data: or http(s) URL is required")


def _assistant_blocks(message: dict[str, Any], param: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, str):
        if content:
            blocks.append({"type": "text", "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            pparam = f"{param}.content.{j}"
            kind = _block_type(part, pparam)
            if kind not in ("text", "refusal"):
                raise _bad(f"{pparam}.type", f"content part type {kind!r} is not supported")
            text = _string(part, kind, pparam)
            if text:
                blocks.append({"type": "text", "text": text})
    elif content is not None:
        raise _bad(f"{param}.content", "a string or a list of parts is required")
    calls = message.get("tool_calls")
    for k, call in enumerate(calls if isinstance(calls, list) else ()):
        cparam = f"{param}.tool_calls.{k}"
        if _object(call, cparam).get("type", "function") != "function":
            raise _bad(f"{cparam}.type", "only function calls are supported")
        function = _object(call.get("function"), f"{cparam}.function")
        try:
            tool_input = _parse_arguments(function.get("arguments"))
        except orjson.JSONDecodeError as e:
            raise _bad(f"{cparam}.function.arguments", f"invalid JSON: {e}") from e
        if not isinstance(tool_input, dict):
            raise _bad(f"{cparam}.function.arguments", "a JSON object is required")
        blocks.append(
            {
                "type": "tool_use",
                "id": _string(call, "id", cparam),
                "name": _string(function, "name", f"{cparam}.function"),
                "input": tool_input,
            }
        )
    return blocks


def _tool_result_block(message: dict[str, Any], param: str) -> dict[str, Any]:
    block: dict[str, Any] = {
        "type": "tool_result",
        "tool_use_id": _string(message, "tool_call_id", param),
    }
    text = _chat_text(message.get("content"), f"{param}.content")
    if text:
        block["content"] = text
    return block


def _chat_tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    tools = []
    for tool in function_tools(body):
        converted: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            converted["description"] = tool.description
        schema = tool.parameters
        converted["input_schema"] = (
            schema if isinstance(schema, dict) else {"type": "object", "properties": {}}
        )
        tools.append(converted)

    choice = body.get("tool_choice")
    tool_choice: dict[str, Any] | None = None
    if choice in ("auto", "none"):
        tool_choice = {"type": choice}
    elif choice == "required":
        tool_choice = {"type": "any"}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = _string(
            _object(choice.get("function"), "tool_choice.function"), "name", "tool_choice.function"
        )
        tool_choice = {"type": "tool", "name": name}
    elif choice is not None:
        raise _bad("tool_choice", "must be 'auto', 'none', 'required' or a named function")
    if body.get("parallel_tool_calls") is False:
        tool_choice = tool_choice or {"type": "auto"}
        if tool_choice["type"] != "none":
            tool_choice["disable_parallel_tool_use"] = True
    if tools:  # Anthropic refuses a tool_choice without tools
        out["tools"] = tools
        if tool_choice is not None:
            out["tool_choice"] = tool_choice


# ---------------------------------------------------------------- worker: responses


def _chunk(
    response_id: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None
) -> dict[str, Any]:
    return {
        "id": response_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def message_to_chat(
    message: dict[str, Any], model: str, response_id: str, created: int
) -> dict[str, Any]:
    """Translate an Anthropic message into an OpenAI ``chat.completion``."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            texts.append(str(block.get("text") or ""))
        elif block.get("type") == "tool_use":
            function = {
                "name": block.get("name") or "",
                "arguments": _json(block.get("input") or {}),
            }
            calls.append({"id": block.get("id"), "type": "function", "function": function})
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        reply["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": reply,
        "logprobs": None,
        "finish_reason": _finish_reason(message.get("stop_reason")),
    }
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _chat_usage(message.get("usage")),
    }


class EventsToChunks:
    """Anthropic stream events (decoded ``data`` of each SSE event) -> chat chunks."""

    def __init__(self, response_id: str, model: str, created: int) -> None:
        self._id = response_id
        self._model = model
        self._created = created
        self._tool_index: dict[Any, int] = {}  # Anthropic block index -> tool_calls index
        self._usage: dict[str, int] = {}
        self._done = False

    @property
    def done(self) -> bool:
        return self._done

    def feed(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            self._record_usage(message.get("usage"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(event.get("index"), event.get("content_block") or {})
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            if delta.get("type") == "text_delta" and delta.get("text"):
                return [self._chunk({"content": delta["text"]})]
            tool = self._tool_index.get(event.get("index"))
            if (
                delta.get("type") == "input_json_delta"
                and delta.get("partial_json")
                and tool is not None
            ):
                call = {"index": tool, "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [call]})]
            return []
        if kind == "message_delta":
            self._record_usage(event.get("usage"))
            stop_reason = (event.get("delta") or {}).get("stop_reason")
            return [self._chunk({}, _finish_reason(stop_reason))]
        if kind == "message_stop":
            self._done = True
            final = {"id": self._id, "object": "chat.completion.chunk", "created": self._created}
            return [
                {**final, "model": self._model, "choices": [], "usage": _chat_usage(self._usage)}
            ]
        if kind == "error":
            error = event.get("error") or {}
            text = str(error.get("message") or "upstream stream error")
            raise UpstreamStreamError(text, str(error.get("type") or "api_error"))
        return []  # ping, content_block_stop, and types added later

    def _block_start(self, index: Any, block: dict[str, Any]) -> list[dict[str, Any]]:
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if block.get("type") != "tool_use":
            return []
        tool = self._tool_index[index] = len(self._tool_index)
        tool_input = block.get("input")
        function = {
            "name": block.get("name") or "",
            "arguments": _json(tool_input) if tool_input else "",
        }
        call = {"index": tool, "id": block.get("id"), "type": "function", "function": function}
        return [self._chunk({"tool_calls": [call]})]

    def _record_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):  # counts are cumulative: later ones replace earlier
            self._usage.update({k: v for k, v in usage.items() if _is_int(v)})

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return _chunk(self._id, self._model, self._created, delta, finish)
