"""Translation between OpenAI Chat Completions and the Anthropic Messages API.

Pure functions and small state machines over decoded JSON; nothing here does I/O.

Ingress side: the client speaks Anthropic, the broker speaks OpenAI chat inside::

    POST /v1/messages body  --messages_to_chat-->  chat request (queued as usual)
    chat.completion         --chat_to_message--->  Anthropic message
    chat.completion.chunk   --ChunksToEvents---->  Anthropic stream events (sse_event frames them)
    broker error            --error_object------>  Anthropic error body

Worker side: the upstream speaks Anthropic::

    chat request            --chat_to_messages-->  Anthropic request
    Anthropic message       --message_to_chat--->  chat.completion
    Anthropic stream events --EventsToChunks---->  chat.completion.chunk dicts

Errors::

    TranslationError (ValueError)  the request cannot be expressed in the other format;
                                   ``param`` is the dotted path of the culprit
    UpstreamStreamError            an ``error`` event in an upstream Anthropic stream
"""

from __future__ import annotations

from typing import Any, TypeGuard

import orjson

DEFAULT_MAX_TOKENS: int = 4096

Event = tuple[str, dict[str, Any]]


class TranslationError(ValueError):
    """The request cannot be translated; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _bad(param: str, what: str) -> TranslationError:
    return TranslationError(f"{param}: {what}", param)


class UpstreamStreamError(Exception):
    """The upstream sent an ``error`` event in the middle of a stream."""

    def __init__(self, message: str, error_type: str) -> None:
        super().__init__(message)
        self.message = message
        self.error_type = error_type


# ---------------------------------------------------------------- shared helpers


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(value: Any) -> int:
    return value if _is_int(value) else 0


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(param, "an object is required")
    return value


def _string(obj: dict[str, Any], key: str, param: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _bad(f"{param}.{key}", "a string is required")
    return value


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list is required")
    return messages


def _block_type(block: Any, param: str) -> str:
    kind = _object(block, param).get("type")
    if not isinstance(kind, str):
        raise _bad(f"{param}.type", "a string is required")
    return kind


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


def _sampling(body: dict[str, Any], out: dict[str, Any], upper: float) -> None:
    """Copy temperature and top_p, clamped to what the target API accepts."""
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if not _is_number(value):
                raise _bad(key, "a number is required")
            out[key] = min(max(value, 0), upper if key == "temperature" else 1)


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


def _chat_text(content: Any, param: str) -> str:
    """Text-only OpenAI content (system, developer and tool messages) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(param, "a string or a list of parts is required")
    texts = []
    for j, part in enumerate(content):
        if _block_type(part, f"{param}.{j}") != "text":
            raise _bad(f"{param}.{j}.type", "only text parts are allowed here")
        texts.append(_string(part, "text", f"{param}.{j}"))
    return "\n".join(texts)


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
        header, comma, data = url[5:].partition(",")
        media_type, *options = header.split(";")
        if not comma or not media_type or options[-1:] != ["base64"]:
            raise _bad(f"{param}.image_url.url", "only base64 data URLs are supported")
        source = {"type": "base64", "media_type": media_type.lower(), "data": data}
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
    raw_tools = body.get("tools")
    if raw_tools is not None and not isinstance(raw_tools, list):
        raise _bad("tools", "a list is required")
    tools = []
    for i, tool in enumerate(raw_tools or ()):
        if _object(tool, f"tools.{i}").get("type") != "function":
            raise _bad(f"tools.{i}.type", "only function tools are supported")
        function = _object(tool.get("function"), f"tools.{i}.function")
        converted: dict[str, Any] = {"name": _string(function, "name", f"tools.{i}.function")}
        if isinstance(function.get("description"), str):
            converted["description"] = function["description"]
        schema = function.get("parameters")
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
