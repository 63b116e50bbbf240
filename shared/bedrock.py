"""Translation between OpenAI Chat Completions and Amazon Bedrock's Converse API.

Pure functions and one small state machine over decoded JSON; no I/O (the worker's
adapter, :mod:`llm_broker.workers.bedrock`, signs, sends and decodes the frames)::

    chat request              --chat_to_converse-->  Converse / ConverseStream body
    Converse response         --converse_to_chat-->  chat.completion
    ConverseStream events     --StreamToChunks---->  chat.completion.chunk dicts
    Bedrock error answer      --error_status, error_payload--> what upstream_status_error reads

What cannot be expressed in Converse raises :class:`TranslationError` naming the field:
``n`` > 1, ``logprobs``, image URLs (Bedrock takes the image's bytes), content parts
other than text and images, ``response_format`` other than text, ``audio``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson

from llm_broker.shared.translate import TranslationError, function_tools, inline_data
from llm_broker.shared.translate import as_object as _object
from llm_broker.shared.translate import bad as _bad
from llm_broker.shared.translate import chat_text as _text
from llm_broker.shared.translate import is_int as _is_int
from llm_broker.shared.translate import is_number as _is_number
from llm_broker.shared.translate import part_type as _part_type
from llm_broker.shared.translate import string as _string

__all__ = [
    "STREAM_EXCEPTION_STATUS",
    "StreamToChunks",
    "TranslationError",
    "chat_to_converse",
    "converse_to_chat",
    "error_payload",
    "error_status",
    "error_type",
]

#: data: URL media types -> Bedrock image formats.
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}

#: Bedrock stopReason -> OpenAI finish_reason.
_FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

#: Error types (``x-amzn-ErrorType``) that mean the broker's credentials were refused.
_CREDENTIAL_ERRORS = frozenset(
    (
        "AccessDeniedException",
        "ExpiredTokenException",
        "IncompleteSignatureException",
        "InvalidSignatureException",
        "MissingAuthenticationTokenException",
        "UnrecognizedClientException",
    )
)

#: ``:exception-type`` of an exception inside a ConverseStream -> the HTTP status it
#: stands for (a model stream error is worth another try: a 502).
STREAM_EXCEPTION_STATUS = {
    "throttlingException": 429,
    "validationException": 400,
    "internalServerException": 500,
    "serviceUnavailableException": 503,
    "modelStreamErrorException": 502,
}


# ---------------------------------------------------------------- requests


def chat_to_converse(body: dict[str, Any]) -> dict[str, Any]:
    """Translate an OpenAI chat request into a Converse request body (the model is
    in the URL). System and developer messages become ``system``; tool messages become
    ``toolResult`` blocks of a user turn; consecutive turns of one role are merged,
    since Converse wants user and assistant to alternate."""
    body = _object(body, "body")
    _refuse_untranslatable(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list is required")

    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        param = f"messages.{i}"
        role = _object(message, param).get("role")
        if role in ("system", "developer"):
            text = _text(message.get("content"), f"{param}.content")
            if text.strip():
                system.append({"text": text})
            continue
        if role == "user":
            turn_role, blocks = "user", _user_blocks(message.get("content"), param)
        elif role == "assistant":
            turn_role, blocks = "assistant", _assistant_blocks(message, param)
        elif role == "tool":
            turn_role, blocks = "user", [_tool_result(message, param)]
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
    for turn in turns:  # tool results open their user turn
        turn["content"].sort(key=lambda block: "toolResult" not in block)

    out: dict[str, Any] = {"messages": turns}
    if system:
        out["system"] = system
    inference = _inference(body)
    if inference:
        out["inferenceConfig"] = inference
    tool_config = _tool_config(body, turns)
    if tool_config is not None:
        out["toolConfig"] = tool_config
    return out


def _refuse_untranslatable(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise _bad("n", "Bedrock answers one choice per request; send n: 1")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise _bad("logprobs", "Bedrock's Converse API returns no log probabilities")
    if body.get("audio") is not None:
        raise _bad("audio", "audio output is not available through Bedrock's Converse API")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _bad(
            "response_format",
            "Bedrock's Converse API has no JSON mode; describe the format in the prompt "
            "or use a tool",
        )


def _user_blocks(content: Any, param: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content.strip() else []
    if not isinstance(content, list):
        raise _bad(f"{param}.content", "a string or a list of parts is required")
    blocks: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pparam = f"{param}.content.{j}"
        kind = _part_type(part, pparam)
        if kind == "text":
            text = _string(part, "text", pparam)
            if text.strip():  # Bedrock refuses blank text blocks
                blocks.append({"text": text})
        elif kind == "image_url":
            blocks.append(_image(part, pparam))
        else:
            raise _bad(
                f"{pparam}.type",
                f"content part type {kind!r} is not supported on Bedrock (text and images are)",
            )
    return blocks


def _image(part: dict[str, Any], param: str) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    uparam = f"{param}.image_url.url"
    media_type, data = inline_data(
        url,
        uparam,
        "Bedrock takes an image's bytes, not its URL (the broker does not fetch URLs); "
        "send the image as a base64 data: URL",
    )
    fmt = _IMAGE_FORMATS.get(media_type)
    if fmt is None:
        raise _bad(uparam, f"image type {media_type!r} is not supported (png, jpeg, gif, webp are)")
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(uparam, "the data is not valid base64") from e
    return {"image": {"format": fmt, "source": {"bytes": data}}}


def _assistant_blocks(message: dict[str, Any], param: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, str):
        if content.strip():
            blocks.append({"text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            pparam = f"{param}.content.{j}"
            kind = _part_type(part, pparam)
            if kind not in ("text", "refusal"):
                raise _bad(f"{pparam}.type", f"content part type {kind!r} is not supported")
            text = _string(part, kind, pparam)
            if text.strip():
                blocks.append({"text": text})
    elif content is not None:
        raise _bad(f"{param}.content", "a string or a list of parts is required")
    calls = message.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise _bad(f"{param}.tool_calls", "a list is required")
    for k, call in enumerate(calls or ()):
        cparam = f"{param}.tool_calls.{k}"
        if _object(call, cparam).get("type", "function") != "function":
            raise _bad(f"{cparam}.type", "only function calls are supported")
        function = _object(call.get("function"), f"{cparam}.function")
        arguments = function.get("arguments")
        try:
            tool_input = (
                orjson.loads(arguments)
                if isinstance(arguments, str) and arguments.strip()
                else (arguments if arguments not in (None, "") else {})
            )
        except orjson.JSONDecodeError as e:
            raise _bad(f"{cparam}.function.arguments", f"invalid JSON: {e}") from e
        if not isinstance(tool_input, dict):
            raise _bad(f"{cparam}.function.arguments", "a JSON object is required")
        blocks.append(
            {
                "toolUse": {
                    "toolUseId": _string(call, "id", cparam),
                    "name": _string(function, "name", f"{cparam}.function"),
                    "input": tool_input,
                }
            }
        )
    return blocks


def _tool_result(message: dict[str, Any], param: str) -> dict[str, Any]:
    text = _text(message.get("content"), f"{param}.content")
    # A blank text block is refused; an empty result is an empty JSON object.
    content: list[dict[str, Any]] = [{"text": text}] if text.strip() else [{"json": {}}]
    return {
        "toolResult": {"toolUseId": _string(message, "tool_call_id", param), "content": content}
    }


def _inference(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _bad(key, "a positive integer is required")
            out["maxTokens"] = value
            break
    for key, name in (("temperature", "temperature"), ("top_p", "topP")):
        value = body.get(key)
        if value is not None:
            if not _is_number(value):
                raise _bad(key, "a number is required")
            out[name] = min(max(value, 0), 1)  # Bedrock's range is 0 to 1
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop", "a string or a list of strings is required")
        if any(stops):
            out["stopSequences"] = [s for s in stops if s]
    return out


def _tool_config(body: dict[str, Any], turns: list[dict[str, Any]]) -> dict[str, Any] | None:
    tools = []
    for tool in function_tools(body):
        schema = tool.parameters
        spec: dict[str, Any] = {
            "name": tool.name,
            "inputSchema": {
                "json": schema if isinstance(schema, dict) else {"type": "object", "properties": {}}
            },
        }
        if tool.description:
            spec["description"] = tool.description
        tools.append({"toolSpec": spec})
    choice = body.get("tool_choice")
    tool_choice: dict[str, Any] | None = None
    if choice == "auto":
        tool_choice = {"auto": {}}
    elif choice == "required":
        tool_choice = {"any": {}}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = _object(choice.get("function"), "tool_choice.function")
        tool_choice = {"tool": {"name": _string(function, "name", "tool_choice.function")}}
    elif choice is not None and choice != "none":
        raise _bad("tool_choice", "must be 'auto', 'none', 'required' or a named function")
    # Converse refuses toolUse and toolResult blocks unless the tools are declared.
    has_tool_blocks = any("toolUse" in b or "toolResult" in b for t in turns for b in t["content"])
    if not tools:
        if has_tool_blocks:
            raise _bad(
                "tools", "Bedrock needs the tools declared when the conversation holds tool calls"
            )
        return None
    if choice == "none":
        # Converse has no "none": without the tools the model cannot call one.
        if has_tool_blocks:
            raise _bad(
                "tool_choice",
                "Bedrock has no tool_choice 'none' for a conversation that holds tool calls",
            )
        return None
    config: dict[str, Any] = {"tools": tools}
    if tool_choice is not None:
        config["toolChoice"] = tool_choice
    return config


# ---------------------------------------------------------------- responses


def _finish_reason(stop_reason: Any) -> str:
    return _FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def _usage(usage: Any) -> dict[str, Any]:
    """Bedrock usage -> OpenAI usage (prompt_tokens counts cache reads and writes too)."""
    usage = usage if isinstance(usage, dict) else {}

    def count(key: str) -> int:
        value = usage.get(key)
        return value if _is_int(value) and value > 0 else 0

    cached = count("cacheReadInputTokens")
    prompt = count("inputTokens") + cached + count("cacheWriteInputTokens")
    completion = count("outputTokens")
    out: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def converse_to_chat(
    answer: dict[str, Any], model: str, response_id: str, created: int
) -> dict[str, Any]:
    """Translate a Converse response into an OpenAI ``chat.completion``; raises
    ``KeyError``/``TypeError``/``ValueError`` when it is not Converse-shaped."""
    message = answer["output"]["message"]
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message["content"]:
        if not isinstance(block, dict):
            raise TypeError("a content block is not an object")
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            function = {
                "name": str(use["name"]),
                "arguments": orjson.dumps(use.get("input") or {}).decode(),
            }
            calls.append({"id": str(use["toolUseId"]), "type": "function", "function": function})
    reply: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        reply["tool_calls"] = calls
    choice = {
        "index": 0,
        "message": reply,
        "logprobs": None,
        "finish_reason": _finish_reason(answer.get("stopReason")),
    }
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(answer.get("usage")),
    }


class StreamToChunks:
    """ConverseStream events (the ``:event-type`` and its decoded JSON payload) ->
    ``chat.completion.chunk`` dicts; the usage chunk (``choices: []``) comes last,
    from the ``metadata`` event, after which :attr:`done` is true."""

    def __init__(self, response_id: str, model: str, created: int) -> None:
        self._id = response_id
        self._model = model
        self._created = created
        self._tools: dict[Any, int] = {}  # contentBlockIndex -> tool_calls index
        self.done = False

    def feed(self, kind: str, event: dict[str, Any]) -> list[dict[str, Any]]:
        if kind == "messageStart":
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "contentBlockStart":
            use = (event.get("start") or {}).get("toolUse")
            if not isinstance(use, dict):
                return []
            index = self._tools[event.get("contentBlockIndex")] = len(self._tools)
            call = {
                "index": index,
                "id": str(use["toolUseId"]),
                "type": "function",
                "function": {"name": str(use["name"]), "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        if kind == "contentBlockDelta":
            delta = event.get("delta") or {}
            if isinstance(delta.get("text"), str) and delta["text"]:
                return [self._chunk({"content": delta["text"]})]
            use = delta.get("toolUse")
            tool = self._tools.get(event.get("contentBlockIndex"))
            if isinstance(use, dict) and tool is not None and use.get("input"):
                call = {"index": tool, "function": {"arguments": str(use["input"])}}
                return [self._chunk({"tool_calls": [call]})]
            return []  # reasoning, citations: no OpenAI equivalent
        if kind == "messageStop":
            return [self._chunk({}, _finish_reason(event.get("stopReason")))]
        if kind == "metadata":
            self.done = True
            final = {"id": self._id, "object": "chat.completion.chunk", "created": self._created}
            return [
                {**final, "model": self._model, "choices": [], "usage": _usage(event.get("usage"))}
            ]
        return []  # contentBlockStop, and event types added later

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }


# ---------------------------------------------------------------- errors


def error_type(header: str | None) -> str | None:
    """The error's name from ``x-amzn-ErrorType`` (which may carry ``:namespace-url``)."""
    if not header:
        return None
    return header.split(":", 1)[0].strip() or None


def error_status(status: int, etype: str | None) -> int:
    """The status to judge a Bedrock error by: refused credentials are a 403 whatever
    the status, and a model timeout (408) is an upstream timeout (504)."""
    if etype in _CREDENTIAL_ERRORS:
        return 403
    if status == 408 or etype == "ModelTimeoutException":
        return 504
    return status


def error_payload(payload: Any, etype: str | None) -> dict[str, Any]:
    """A Bedrock error body (``{"message": ...}``, sometimes ``Message``) as the
    ``{"error": {"message", "type"}}`` object :func:`upstream_status_error` reads."""
    error: dict[str, Any] = {}
    if isinstance(payload, dict):
        message = payload.get("message", payload.get("Message"))
        if isinstance(message, str) and message:
            error["message"] = message
    if etype:
        error["type"] = etype
    return {"error": error}
