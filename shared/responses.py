"""Translation between the OpenAI Responses API and OpenAI Chat Completions.

Pure functions and one small state machine over decoded JSON; nothing here does I/O.
The broker serves ``POST /v1/responses`` for deployments that only speak chat::

    Responses request (+ earlier turns)  --responses_to_chat-------->  chat request
    chat.completion                      --chat_to_response--------->  response object
    chat.completion.chunk                --ChunksToResponseEvents--->  Responses stream events
                                                                        (sse_event frames one)
    queued / in_progress / failed / ...  --response_shell----------->  response object, no output

Errors are the OpenAI ``{"error": {...}}`` bodies the chat endpoints already send;
only a failed *response object* carries its own ``error`` (``failure_error``).
``TranslationError`` (shared with :mod:`llm_broker.shared.anthropic`, so the ingress
handles both alike) names the dotted path of the field that cannot be translated.

Request mapping (``responses_to_chat``):

- ``instructions`` -> a leading system message; ``history`` (the earlier turns' input
  and output items, for ``previous_response_id``) -> the messages that follow it, then
  ``input`` (a string is one user message).
- message items -> chat messages (``developer`` becomes ``system``: every chat server
  knows that role); ``input_text``/``output_text``/``refusal`` parts -> text parts,
  ``input_image`` with ``image_url`` (http(s) or data URL) -> ``image_url`` parts,
  ``input_file`` with ``file_data`` or ``file_id`` -> chat ``file`` parts.
- ``function_call`` items -> ``tool_calls`` of one assistant message (consecutive
  calls, and an assistant message right before them, are one chat message);
  ``function_call_output`` items -> ``tool`` messages (images they return follow in a
  user message: chat tool messages carry text only). ``reasoning`` items are dropped:
  they are opaque to any other server.
- function tools -> chat tools; ``tool_choice``, ``parallel_tool_calls`` (sent only
  with tools), ``temperature``, ``top_p``, ``user``; ``max_output_tokens`` ->
  ``max_tokens`` (the name every chat server accepts, and the broker's admission reads);
  ``reasoning.effort`` -> ``reasoning_effort``; ``text.format`` -> ``response_format``;
  ``stream`` -> ``stream`` with ``stream_options.include_usage``.
- Echoed on the response, never sent upstream: ``metadata``, ``store``,
  ``background``, ``previous_response_id``, ``max_tool_calls``, ``safety_identifier``,
  ``prompt_cache_key``. Hints dropped: ``reasoning.summary`` (no summary is produced),
  ``text.verbosity``, ``service_tier``, ``stream_options``, ``include`` values other
  than logprobs.

Refused with ``TranslationError``: built-in tools (``tools.N.type``) and tool choices
naming them, ``truncation: "auto"``, ``conversation``, ``prompt``, ``top_logprobs`` and
``include: message.output_text.logprobs`` (no logprobs come back), ``item_reference``
and built-in tool call items, image or file parts given by URL or id that chat cannot
carry, and malformed fields.
"""

from __future__ import annotations

from typing import Any

import orjson

from llm_broker.shared.anthropic.common import (
    _int,
)
from llm_broker.shared.translate import Event, TranslationError
from llm_broker.shared.translate import as_object as _object
from llm_broker.shared.translate import bad as _bad
from llm_broker.shared.translate import is_int as _is_int
from llm_broker.shared.translate import is_number as _is_number
from llm_broker.shared.translate import string as _string

__all__ = [
    "ChunksToResponseEvents",
    "Event",
    "TranslationError",
    "chat_to_response",
    "failure_error",
    "input_items",
    "output_text",
    "response_shell",
    "responses_to_chat",
    "sse_event",
]

_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_DETAILS = ("auto", "low", "high")
_ECHOED = (
    "previous_response_id",
    "max_output_tokens",
    "max_tool_calls",
    "user",
    "safety_identifier",
    "prompt_cache_key",
)

# ---------------------------------------------------------------- requests


def responses_to_chat(
    body: dict[str, Any], history: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Translate a ``POST /v1/responses`` body into an OpenAI chat request.

    ``history`` is the earlier turns' items (for ``previous_response_id``: the earlier
    request's input items followed by its output items); they precede ``input``.
    Raises TranslationError for a malformed request or one that chat cannot express.
    """
    body = _object(body, "body")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model", "a non-empty string is required")
    _refuse_untranslatable(body)

    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("instructions", "a string is required")
        if instructions:
            messages.append({"role": "system", "content": instructions})
    items = list(history or [])
    earlier = len(items)
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        items.append({"role": "user", "content": raw_input})
    elif isinstance(raw_input, list):
        items.extend(raw_input)
    elif raw_input is not None:
        raise _bad("input", "a string or a list of items is required")
    try:
        messages.extend(_items_to_messages(items, earlier))
    except TranslationError as e:
        if e.param is None or not e.param.startswith("history."):
            raise
        message = f"previous_response_id: an earlier turn cannot be translated ({e.message})"
        raise TranslationError(message, "previous_response_id") from e
    if not any(m["role"] != "system" for m in messages):
        raise _bad("input", "at least one input item is required")

    chat: dict[str, Any] = {"model": model, "messages": messages}
    _copy_sampling(body, chat)
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise _bad("tools", "a list is required")
        if tools:
            chat["tools"] = [_chat_tool(t, f"tools.{i}") for i, t in enumerate(tools)]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_tool_choice(body["tool_choice"])
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            raise _bad("parallel_tool_calls", "a boolean is required")
        if "tools" in chat:
            chat["parallel_tool_calls"] = parallel
    reasoning = body.get("reasoning")
    if reasoning is not None:
        effort = _object(reasoning, "reasoning").get("effort")
        if effort is not None:
            if not isinstance(effort, str):
                raise _bad("reasoning.effort", "a string is required")
            chat["reasoning_effort"] = effort
    text = body.get("text")
    if text is not None:
        response_format = _response_format(_object(text, "text").get("format"))
        if response_format is not None:
            chat["response_format"] = response_format
    stream = body.get("stream")
    if stream is not None:
        if not isinstance(stream, bool):
            raise _bad("stream", "a boolean is required")
        if stream:
            chat["stream"] = True
            chat["stream_options"] = {"include_usage": True}
    return chat


def _refuse_untranslatable(body: dict[str, Any]) -> None:
    if body.get("truncation") not in (None, "disabled"):
        raise _bad(
            "truncation",
            "only 'disabled' is supported: the broker does not drop input to fit the context",
        )
    for key in ("conversation", "prompt"):
        if body.get(key) is not None:
            raise _bad(key, "not supported for this model: it needs OpenAI's stored objects")
    if body.get("top_logprobs"):
        raise _bad("top_logprobs", "logprobs are not returned for this model")
    include = body.get("include")
    if include is not None:
        if not isinstance(include, list):
            raise _bad("include", "a list is required")
        for i, value in enumerate(include):
            if value == "message.output_text.logprobs":
                raise _bad(f"include.{i}", "logprobs are not returned for this model")
    max_output_tokens = body.get("max_output_tokens")
    if max_output_tokens is not None and (not _is_int(max_output_tokens) or max_output_tokens < 1):
        raise _bad("max_output_tokens", "a positive integer is required")


def _copy_sampling(body: dict[str, Any], chat: dict[str, Any]) -> None:
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None:
            if not _is_number(value):
                raise _bad(key, "a number is required")
            chat[key] = value
    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise _bad("user", "a string is required")
        chat["user"] = user


def _item_param(index: int, earlier: int) -> str:
    return f"history.{index}" if index < earlier else f"input.{index - earlier}"


def _items_to_messages(items: list[Any], earlier: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    tool_images: list[dict[str, Any]] = []  # images function_call_output items returned
    for i, item in enumerate(items):
        param = _item_param(i, earlier)
        kind = _object(item, param).get("type", "message")
        if kind != "function_call_output" and tool_images:
            out.append({"role": "user", "content": tool_images})
            tool_images = []
        if kind == "message":
            out.append(_message(item, param))
        elif kind == "function_call":
            call = {
                "id": _string(item, "call_id", param),
                "type": "function",
                "function": {
                    "name": _string(item, "name", param),
                    "arguments": _string(item, "arguments", param),
                },
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append(_tool_message(item, param, tool_images))
        elif kind == "reasoning":
            continue
        elif kind == "item_reference":
            raise _bad(f"{param}.type", "item references are not supported for this model")
        else:
            raise _bad(
                f"{param}.type",
                f"item type {kind!r} is not supported: only messages, function calls "
                "and function call outputs can be translated",
            )
    if tool_images:
        out.append({"role": "user", "content": tool_images})
    return out


def _message(item: dict[str, Any], param: str) -> dict[str, Any]:
    role_name = item.get("role")
    role = _ROLES.get(role_name) if isinstance(role_name, str) else None
    if role is None:
        raise _bad(
            f"{param}.role",
            f"must be user, assistant, system or developer, not {item.get('role')!r}",
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise _bad(f"{param}.content", "a string or a list of content parts is required")
    parts = [_part(p, f"{param}.content.{j}", role == "user") for j, p in enumerate(content)]
    if len(parts) == 1 and parts[0]["type"] == "text":
        return {"role": role, "content": parts[0]["text"]}
    if role == "assistant":  # chat assistant messages carry text only
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _part(part: Any, param: str, media: bool) -> dict[str, Any]:
    kind = _object(part, param).get("type")
    if kind in ("input_text", "output_text"):
        return {"type": "text", "text": _string(part, "text", param)}
    if kind == "refusal":
        return {"type": "text", "text": _string(part, "refusal", param)}
    if kind not in ("input_image", "input_file"):
        raise _bad(f"{param}.type", f"content type {kind!r} is not supported")
    if not media:
        raise _bad(f"{param}.type", f"{kind} is only supported in user messages")
    return _image(part, param) if kind == "input_image" else _file(part, param)


def _image(part: dict[str, Any], param: str) -> dict[str, Any]:
    url = part.get("image_url")
    if not isinstance(url, str) or not url:
        if part.get("file_id") is not None:
            raise _bad(f"{param}.file_id", "images by file id are not supported: send image_url")
        raise _bad(f"{param}.image_url", "a URL or a data URL is required")
    image: dict[str, Any] = {"url": url}
    detail = part.get("detail")
    if detail is not None:
        if detail not in _DETAILS:
            raise _bad(f"{param}.detail", f"must be one of {', '.join(_DETAILS)}")
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def _file(part: dict[str, Any], param: str) -> dict[str, Any]:
    if part.get("file_url") is not None:
        raise _bad(f"{param}.file_url", "files by URL are not supported: send file_data")
    file: dict[str, Any] = {}
    for key in ("file_data", "file_id", "filename"):
        value = part.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise _bad(f"{param}.{key}", "a string is required")
            file[key] = value
    if "file_data" not in file and "file_id" not in file:
        raise _bad(param, "file_data or file_id is required")
    return {"type": "file", "file": file}


def _tool_message(item: dict[str, Any], param: str, images: list[dict[str, Any]]) -> dict[str, Any]:
    call_id = _string(item, "call_id", param)
    output = item.get("output")
    if isinstance(output, str):
        return {"role": "tool", "tool_call_id": call_id, "content": output}
    if not isinstance(output, list):
        raise _bad(f"{param}.output", "a string or a list of content parts is required")
    texts: list[str] = []
    for j, part in enumerate(output):
        chat_part = _part(part, f"{param}.output.{j}", media=True)
        if chat_part["type"] == "text":
            texts.append(chat_part["text"])
        else:
            images.append(chat_part)
    return {"role": "tool", "tool_call_id": call_id, "content": "".join(texts)}


def _chat_tool(tool: Any, param: str) -> dict[str, Any]:
    kind = _object(tool, param).get("type")
    if kind != "function":
        raise _bad(
            f"{param}.type",
            f"tool type {kind!r} is not supported for this model: only function tools "
            "can be translated",
        )
    function: dict[str, Any] = {"name": _string(tool, "name", param)}
    if tool.get("description") is not None:
        function["description"] = _string(tool, "description", param)
    if tool.get("parameters") is not None:
        function["parameters"] = _object(tool["parameters"], f"{param}.parameters")
    if tool.get("strict") is not None:
        if not isinstance(tool["strict"], bool):
            raise _bad(f"{param}.strict", "a boolean is required")
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    kind = _object(choice, "tool_choice").get("type")
    if kind == "function":
        return {"type": "function", "function": {"name": _string(choice, "name", "tool_choice")}}
    raise _bad(
        "tool_choice.type" if isinstance(choice, dict) else "tool_choice",
        f"{kind!r} is not supported for this model: use auto, none, required or a function",
    )


def _response_format(fmt: Any) -> dict[str, Any] | None:
    if fmt is None:
        return None
    kind = _object(fmt, "text.format").get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise _bad("text.format.type", f"must be text, json_object or json_schema, not {kind!r}")
    schema: dict[str, Any] = {
        "name": _string(fmt, "name", "text.format"),
        "schema": _object(fmt.get("schema"), "text.format.schema"),
    }
    if fmt.get("description") is not None:
        schema["description"] = _string(fmt, "description", "text.format")
    if fmt.get("strict") is not None:
        schema["strict"] = bool(fmt["strict"])
    return {"type": "json_schema", "json_schema": schema}


# ---------------------------------------------------------------- responses


def chat_to_response(
    completion: dict[str, Any],
    *,
    response_id: str,
    model: str,
    created_at: int,
    request: dict[str, Any],
    completed_at: int | None = None,
) -> dict[str, Any]:
    """Translate a ``chat.completion`` into a Responses ``response`` object.

    ``request`` is the Responses request, whose settings the response echoes.
    Item ids derive from ``response_id``, as ``ChunksToResponseEvents`` derives them.
    """
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    message = choice.get("message") or {}
    suffix = _suffix(response_id)
    output: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    text = message.get("content")
    if isinstance(text, list):  # some servers answer with text parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if isinstance(text, str) and text:
        parts.append(_text_part(text))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    if parts:
        output.append(_message_item(f"msg_{suffix}_0", parts, "completed"))
    for call in message.get("tool_calls") or ():
        if not isinstance(call, dict):
            continue
        function = call.get("function") or {}
        arguments = function.get("arguments")
        item = _call_item(
            f"fc_{suffix}_{len(output)}",
            call.get("id") or f"call_{suffix}_{len(output)}",
            function.get("name") or "",
            arguments if isinstance(arguments, str) else orjson.dumps(arguments or {}).decode(),
            "completed",
        )
        output.append(item)
    if not output:
        output.append(_message_item(f"msg_{suffix}_0", [_text_part("")], "completed"))
    return _finished(
        output,
        choice.get("finish_reason"),
        completion.get("usage"),
        response_id=response_id,
        model=model,
        created_at=created_at,
        request=request,
        completed_at=completed_at,
    )


def response_shell(
    *,
    response_id: str,
    model: str,
    created_at: int,
    request: dict[str, Any],
    status: str,
    error: dict[str, Any] | None = None,
    output: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A response without output yet: ``queued``, ``in_progress``, ``cancelled`` or ``failed``.

    ``error`` (see ``failure_error``) goes with ``failed``.
    """
    text = request.get("text")
    response: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": None,
        "model": model,
        "output": output or [],
        "instructions": request.get("instructions"),
        "metadata": request.get("metadata") or {},
        "tools": [_echoed_tool(t) for t in request.get("tools") or () if _is_function(t)],
        "tool_choice": request.get("tool_choice") or "auto",
        "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
        "temperature": request.get("temperature"),
        "top_p": request.get("top_p"),
        "text": text if isinstance(text, dict) and text else {"format": {"type": "text"}},
        "reasoning": request.get("reasoning") or {"effort": None, "summary": None},
        "truncation": request.get("truncation") or "disabled",
        "store": request.get("store") is not False,
        "background": request.get("background") is True,
        "usage": None,
    }
    for key in _ECHOED:
        response[key] = request.get(key)
    return response


# Response error codes the SDK knows for a failed response, by HTTP status.
_FAILURE_CODES = {400: "invalid_prompt", 413: "invalid_prompt", 429: "rate_limit_exceeded"}


def input_items(body: dict[str, Any]) -> list[Any]:
    """A Responses request's ``input`` as a list of items (a string is one user message)."""
    found = body.get("input")
    if isinstance(found, str):
        return [{"role": "user", "content": found}]
    return list(found) if isinstance(found, list) else []


def failure_error(status: int, message: str) -> dict[str, Any]:
    """The ``error`` of a failed response object, for the HTTP status the job failed with."""
    return {"code": _FAILURE_CODES.get(status, "server_error"), "message": message}


def output_text(response: dict[str, Any]) -> str:
    """All ``output_text`` of a response's message items, joined (the SDK's ``output_text``)."""
    return "".join(
        part.get("text", "")
        for item in response.get("output") or ()
        if item.get("type") == "message"
        for part in item.get("content") or ()
        if part.get("type") == "output_text"
    )


def _finished(
    output: list[dict[str, Any]],
    finish_reason: Any,
    usage: Any,
    *,
    response_id: str,
    model: str,
    created_at: int,
    request: dict[str, Any],
    completed_at: int | None,
) -> dict[str, Any]:
    response = response_shell(
        response_id=response_id,
        model=model,
        created_at=created_at,
        request=request,
        status="completed",
        output=output,
    )
    reason = _incomplete_reason(finish_reason)
    if reason is not None:
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": reason}
        output[-1]["status"] = "incomplete"  # the item the model was cut off in
    elif completed_at is not None:
        response["completed_at"] = completed_at
    response["usage"] = _usage(usage)
    return response


def _incomplete_reason(finish_reason: Any) -> str | None:
    if finish_reason == "length":
        return "max_output_tokens"
    if finish_reason == "content_filter":
        return "content_filter"
    return None


def _usage(usage: Any) -> dict[str, Any]:
    usage = usage if isinstance(usage, dict) else {}
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
    completion_details = usage.get("completion_tokens_details")
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": _int(prompt_details.get("cached_tokens")),
            "cache_write_tokens": _int(prompt_details.get("cache_write_tokens")),
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": _int(completion_details.get("reasoning_tokens"))
        },
        "total_tokens": _int(usage.get("total_tokens")) or prompt + completion,
    }


def _is_function(tool: Any) -> bool:
    return isinstance(tool, dict) and tool.get("type") == "function"


def _echoed_tool(tool: dict[str, Any]) -> dict[str, Any]:
    keys = ("name", "description", "parameters", "strict")
    return {"type": "function", **{k: tool.get(k) for k in keys}}


def _suffix(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def _message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": parts,
    }


def _call_item(
    item_id: str, call_id: str, name: str, arguments: str, status: str
) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


# ---------------------------------------------------------------- streams


class ChunksToResponseEvents:
    """OpenAI ``chat.completion.chunk`` dicts -> Responses stream events, for one response.

    Each event is ``(type, data)`` with ``sequence_number`` counting up from
    ``sequence_number`` (pass the next number when resuming a stream). Text goes to a
    message item (an ``output_text`` part, then a ``refusal`` part if one comes);
    each tool call becomes a function_call item. A message item closes when a tool
    call starts; function_call items stay open until ``finish`` (servers may
    interleave the deltas of parallel calls). ``finish`` closes the open items and
    sends ``response.completed`` or ``response.incomplete``; ``fail`` sends
    ``response.failed`` instead.
    """

    def __init__(
        self,
        *,
        response_id: str,
        model: str,
        created_at: int,
        request: dict[str, Any],
        sequence_number: int = 0,
    ) -> None:
        self._response_id = response_id
        self._suffix = _suffix(response_id)
        self._model = model
        self._created_at = created_at
        self._request = request
        self._sequence = sequence_number
        self._started = False
        self._finished = False
        self._output: list[dict[str, Any]] = []
        self._message: int | None = None  # output index of the open message item
        self._calls: dict[int, int] = {}  # chat tool-call index -> output index (open calls)
        self._pending: dict[int, dict[str, Any]] = {}  # calls whose name has not come yet
        self._finish_reason: Any = None
        self._usage: Any = None

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        """The events one chunk produces (the first call also opens the response)."""
        events = self._start()
        if self._finished:
            return events
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            for kind, key in (("output_text", "content"), ("refusal", "refusal")):
                text = delta.get(key)
                if isinstance(text, str) and text:
                    events += self._text_delta(kind, text)
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    events += self._call_delta(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def finish(self, completed_at: int | None = None) -> list[Event]:
        """Close the open items and the response (after the last chunk)."""
        events = self._start()
        if self._finished:
            return events
        self._finished = True
        if not self._output:
            events += self._open_message()
            events += self._open_part(0, "output_text")
        events += self._close_all()
        response = _finished(
            self._output,
            self._finish_reason,
            self._usage,
            response_id=self._response_id,
            model=self._model,
            created_at=self._created_at,
            request=self._request,
            completed_at=completed_at,
        )
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        events.append(self._event(kind, response=response))
        return events

    def fail(self, error: dict[str, Any]) -> list[Event]:
        """Close the stream with ``response.failed`` (``error``: see ``failure_error``)."""
        events = self._start()
        if self._finished:
            return events
        self._finished = True
        response = self._shell("failed", error)
        response["output"] = self._output
        events.append(self._event("response.failed", response=response))
        return events

    def _start(self) -> list[Event]:
        if self._started:
            return []
        self._started = True
        return [
            self._event("response.created", response=self._shell("in_progress")),
            self._event("response.in_progress", response=self._shell("in_progress")),
        ]

    def _shell(self, status: str, error: dict[str, Any] | None = None) -> dict[str, Any]:
        return response_shell(
            response_id=self._response_id,
            model=self._model,
            created_at=self._created_at,
            request=self._request,
            status=status,
            error=error,
        )

    def _event(self, kind: str, **fields: Any) -> Event:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return kind, data

    def _text_delta(self, kind: str, text: str) -> list[Event]:
        events: list[Event] = []
        if self._message is None:
            events += self._close_all()
            events += self._open_message()
        position = self._message
        assert position is not None
        parts = self._output[position]["content"]
        if not parts or parts[-1]["type"] != kind:
            events += self._close_part(position)
            events += self._open_part(position, kind)
        where = self._where(position)
        if kind == "output_text":
            parts[-1]["text"] += text
            events.append(
                self._event("response.output_text.delta", **where, delta=text, logprobs=[])
            )
        else:
            parts[-1]["refusal"] += text
            events.append(self._event("response.refusal.delta", **where, delta=text))
        return events

    def _open_message(self) -> list[Event]:
        position = self._message = len(self._output)
        self._output.append(_message_item(f"msg_{self._suffix}_{position}", [], "in_progress"))
        return [self._item_event("response.output_item.added", position)]

    def _open_part(self, position: int, kind: str) -> list[Event]:
        part = _text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
        self._output[position]["content"].append(part)
        where = self._where(position)
        return [self._event("response.content_part.added", **where, part=dict(part))]

    def _close_part(self, position: int) -> list[Event]:
        parts = self._output[position]["content"]
        if not parts:
            return []
        part, where = parts[-1], self._where(position)
        if part["type"] == "output_text":
            done = self._event("response.output_text.done", **where, text=part["text"], logprobs=[])
        else:
            done = self._event("response.refusal.done", **where, refusal=part["refusal"])
        return [done, self._event("response.content_part.done", **where, part=dict(part))]

    def _where(self, position: int) -> dict[str, Any]:
        item = self._output[position]
        return {
            "item_id": item["id"],
            "output_index": position,
            "content_index": len(item["content"]) - 1,
        }

    def _call_delta(self, call: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        index = call.get("index", 0)
        index = index if _is_int(index) else 0
        function = call.get("function") or {}
        call_id = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
        current = self._pending.get(index)
        if current is None and index in self._calls:
            current = self._output[self._calls[index]]
        if current is not None and call_id and not current["call_id"]:
            current["call_id"] = call_id  # the id came after the first delta
        # A new index, or a new id under the same index (some servers number every call 0).
        if current is None or (call_id and call_id != current["call_id"]):
            if index in self._pending:  # a call that never got its name
                events += self._announce(index)
            current = self._pending[index] = {"call_id": call_id, "name": "", "arguments": ""}
        if not current["name"] and isinstance(function.get("name"), str):
            current["name"] = function["name"]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            current["arguments"] += arguments
            if index in self._calls and current is not self._pending.get(index):
                position = self._calls[index]
                delta = {"item_id": current["id"], "output_index": position, "delta": arguments}
                events.append(self._event("response.function_call_arguments.delta", **delta))
        if current["name"] and index in self._pending:
            events += self._announce(index)
        return events

    def _announce(self, index: int) -> list[Event]:
        """Open the item of a call once its name is known (clients dispatch on it)."""
        call = self._pending.pop(index)
        events = self._close_message()
        position = self._calls[index] = len(self._output)
        call_id = call["call_id"] or f"call_{self._suffix}_{position}"
        item = _call_item(f"fc_{self._suffix}_{position}", call_id, call["name"], "", "in_progress")
        self._output.append(item)
        events.append(self._item_event("response.output_item.added", position))
        if call["arguments"]:
            item["arguments"] = call["arguments"]
            delta = {"item_id": item["id"], "output_index": position, "delta": call["arguments"]}
            events.append(self._event("response.function_call_arguments.delta", **delta))
        return events

    def _close_message(self) -> list[Event]:
        position, self._message = self._message, None
        if position is None:
            return []
        events = self._close_part(position)
        events.append(self._close_item(position))
        return events

    def _close_all(self) -> list[Event]:
        events: list[Event] = []
        for index in sorted(self._pending):
            events += self._announce(index)
        events += self._close_message()
        for position in sorted(self._calls.values()):
            item = self._output[position]
            done = {"item_id": item["id"], "output_index": position, "arguments": item["arguments"]}
            events.append(self._event("response.function_call_arguments.done", **done))
            events.append(self._close_item(position))
        self._calls.clear()
        return events

    def _close_item(self, position: int) -> Event:
        cut_off = self._finished and _incomplete_reason(self._finish_reason) is not None
        last = position == len(self._output) - 1
        self._output[position]["status"] = "incomplete" if cut_off and last else "completed"
        return self._item_event("response.output_item.done", position)

    def _item_event(self, kind: str, position: int) -> Event:
        item = dict(self._output[position])
        if "content" in item:
            item["content"] = [dict(part) for part in item["content"]]
        return self._event(kind, output_index=position, item=item)


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """Frame one Responses stream event for the wire."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
