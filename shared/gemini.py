"""Translation between OpenAI Chat Completions and Google's Gemini API (the worker half).

Pure functions and a small state machine over decoded JSON; nothing here does I/O::

    chat request              --chat_to_gemini----->  GenerateContentRequest
    GenerateContentResponse   --response_to_chat--->  chat.completion
    streamed responses        --StreamToChunks----->  chat.completion.chunk dicts
    Gemini error body         --error_to_openai---->  {"error": {"message", "type", "code"}}

Gemini has no tool-call ids: a call's id is made up, ``call_<n>`` (n counts the calls of
one answer), unless Gemini sent one. A call's ``thoughtSignature`` (which Gemini 3
requires back with the call in the next turn) rides in the id after a ``~``, so that
any OpenAI client that echoes its tool calls hands it back; :func:`chat_to_gemini`
splits it off again. Fields with no Gemini equivalent that change the answer's shape
raise :class:`TranslationError` (``param``: the dotted path of the culprit); hints
without one (``user``, ``parallel_tool_calls``, ``reasoning_effort``…) are dropped.
"""

from __future__ import annotations

import binascii
import re
from base64 import b64decode
from typing import Any

import orjson

from llm_broker.shared.translate import TranslationError, function_tools, inline_data
from llm_broker.shared.translate import as_object as _object
from llm_broker.shared.translate import bad as _bad
from llm_broker.shared.translate import chat_text as _text_only
from llm_broker.shared.translate import is_int as _is_int
from llm_broker.shared.translate import is_number as _is_number
from llm_broker.shared.translate import part_type as _part_type
from llm_broker.shared.translate import string as _string

__all__ = [
    "StreamToChunks",
    "TranslationError",
    "chat_to_gemini",
    "chat_usage",
    "error_to_openai",
    "response_to_chat",
    "retry_delay",
    "split_call_id",
]


# ---------------------------------------------------------------- tool-call ids

#: The ids this module makes up; they are not sent back to Gemini.
_MADE_UP_ID = re.compile(r"call_\d+")
_SIGNATURE_SEPARATOR = "~"


def _call_id(base: str, signature: str | None) -> str:
    return f"{base}{_SIGNATURE_SEPARATOR}{signature}" if signature else base


def split_call_id(call_id: str) -> tuple[str | None, str | None]:
    """A tool call's id -> (Gemini's own id, or None for a made-up one; the thought
    signature, if the id carries one)."""
    base, _, signature = call_id.partition(_SIGNATURE_SEPARATOR)
    return (None if _MADE_UP_ID.fullmatch(base) else base or None), signature or None


# ---------------------------------------------------------------- requests

#: Refused: Gemini cannot give these, and leaving them out would change the answer.
_REFUSED = {
    "logprobs": "token log probabilities are not translated for Gemini",
    "top_logprobs": "token log probabilities are not translated for Gemini",
    "audio": "audio output is not supported for Gemini",
    "prediction": "predicted outputs are not supported by Gemini",
    "function_call": "the legacy function_call is not supported; use tool_choice",
    "functions": "the legacy functions are not supported; use tools",
}
_ROLE_OF = {"user": "user", "assistant": "model", "tool": "user", "function": "user"}
_AUDIO_TYPES = {"wav": "audio/wav", "mp3": "audio/mp3"}


def chat_to_gemini(body: dict[str, Any]) -> dict[str, Any]:
    """Translate an OpenAI chat request into a Gemini ``GenerateContentRequest``
    (the model goes in the URL).

    System and developer messages become ``systemInstruction``; assistant turns are
    the ``model`` role; tool results become ``functionResponse`` parts named after the
    earlier tool call they answer; consecutive turns of one role are merged.
    """
    body = _object(body, "body")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty list is required")
    for key, why in _REFUSED.items():
        if body.get(key) not in (None, False, [], {}):
            raise _bad(key, why)
    if body.get("logit_bias"):
        raise _bad("logit_bias", "Gemini has no token biases")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise _bad("modalities", "only text output is supported for Gemini")

    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, latest wins
    for i, message in enumerate(messages):
        param = f"messages.{i}"
        role = _object(message, param).get("role")
        if role in ("system", "developer"):
            text = _text_only(message.get("content"), f"{param}.content")
            if text:
                system.append({"text": text})
            continue
        if role == "user":
            parts = _user_parts(message.get("content"), param)
        elif role == "assistant":
            parts = _assistant_parts(message, param, names)
        elif role == "tool":
            parts = [_tool_result(message, param, names)]
        elif role == "function":
            name = _string(message, "name", param)
            parts = [_function_response(name, None, message.get("content"), param)]
        else:
            raise _bad(f"{param}.role", f"role {role!r} is not supported")
        if not parts:
            continue
        gemini_role = _ROLE_OF[role]
        if contents and contents[-1]["role"] == gemini_role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": gemini_role, "parts": parts})
    if not contents:
        raise _bad("messages", "a user or assistant message is required")

    out: dict[str, Any] = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": system}
    config = _generation_config(body)
    if config:
        out["generationConfig"] = config
    _tools(body, out)
    return out


def _user_parts(content: Any, param: str) -> list[dict[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"text": content}] if content else []
    if not isinstance(content, list):
        raise _bad(f"{param}.content", "a string or a list of parts is required")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        pparam = f"{param}.content.{j}"
        kind = _part_type(part, pparam)
        if kind == "text":
            text = _string(part, "text", pparam)
            if text:
                parts.append({"text": text})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append(_data_url(url, f"{pparam}.image_url.url"))
        elif kind == "input_audio":
            audio = _object(part.get("input_audio"), f"{pparam}.input_audio")
            fmt = audio.get("format")
            if fmt not in _AUDIO_TYPES:
                raise _bad(f"{pparam}.input_audio.format", "'wav' or 'mp3' is required")
            data = _base64(audio.get("data"), f"{pparam}.input_audio.data")
            parts.append({"inlineData": {"mimeType": _AUDIO_TYPES[fmt], "data": data}})
        elif kind == "file":
            file = _object(part.get("file"), f"{pparam}.file")
            if file.get("file_id") is not None:
                raise _bad(
                    f"{pparam}.file.file_id",
                    "uploaded file ids are not available to Gemini; send file_data",
                )
            parts.append(_data_url(file.get("file_data"), f"{pparam}.file.file_data"))
        else:
            raise _bad(f"{pparam}.type", f"content part type {kind!r} is not supported")
    return parts


def _data_url(url: Any, param: str) -> dict[str, Any]:
    """A ``data:<type>;base64,<data>`` URL -> an ``inlineData`` part."""
    media_type, data = inline_data(
        url,
        param,
        "Gemini cannot fetch http(s) URLs (it reads only files in its own storage); "
        "send the data as a base64 data: URL",
    )
    return {"inlineData": {"mimeType": media_type, "data": _base64(data, param)}}


def _base64(data: Any, param: str) -> str:
    if not isinstance(data, str) or not data:
        raise _bad(param, "base64 data is required")
    try:
        b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _bad(param, "invalid base64 data") from e
    return data


def _assistant_parts(
    message: dict[str, Any], param: str, names: dict[str, str]
) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    content = message.get("content")
    if isinstance(content, str):
        if content:
            parts.append({"text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            pparam = f"{param}.content.{j}"
            kind = _part_type(part, pparam)
            if kind not in ("text", "refusal"):
                raise _bad(f"{pparam}.type", f"content part type {kind!r} is not supported")
            text = _string(part, kind, pparam)
            if text:
                parts.append({"text": text})
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
        name = _string(function, "name", f"{cparam}.function")
        arguments = function.get("arguments")
        try:
            args = orjson.loads(arguments) if isinstance(arguments, str) and arguments else {}
        except orjson.JSONDecodeError as e:
            raise _bad(f"{cparam}.function.arguments", f"invalid JSON: {e}") from e
        if not isinstance(args, dict):
            raise _bad(f"{cparam}.function.arguments", "a JSON object is required")
        call_id = _string(call, "id", cparam)
        names[call_id] = name
        own_id, signature = split_call_id(call_id)
        function_call: dict[str, Any] = {"name": name, "args": args}
        if own_id is not None:
            function_call["id"] = own_id
        out: dict[str, Any] = {"functionCall": function_call}
        if signature:
            out["thoughtSignature"] = signature
        parts.append(out)
    return parts


def _tool_result(message: dict[str, Any], param: str, names: dict[str, str]) -> dict[str, Any]:
    call_id = _string(message, "tool_call_id", param)
    name = names.get(call_id)
    if name is None:
        raise _bad(
            f"{param}.tool_call_id",
            "no earlier assistant tool call has this id (Gemini needs the function's name)",
        )
    return _function_response(name, split_call_id(call_id)[0], message.get("content"), param)


def _function_response(name: str, own_id: str | None, content: Any, param: str) -> dict[str, Any]:
    """A tool's text -> ``functionResponse``: a JSON object as it is, else
    ``{"content": text}`` (Gemini wants an object)."""
    text = _text_only(content, f"{param}.content")
    try:
        value = orjson.loads(text) if text.lstrip().startswith("{") else None
    except orjson.JSONDecodeError:
        value = None
    response: dict[str, Any] = {"name": name, "response": value or {"content": text}}
    if own_id is not None:
        response["id"] = own_id
    return {"functionResponse": response}


def _generation_config(body: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for key, target, low, high in (
        ("temperature", "temperature", 0, 2),
        ("top_p", "topP", 0, 1),
        ("presence_penalty", "presencePenalty", -2, 2),
        ("frequency_penalty", "frequencyPenalty", -2, 2),
    ):
        value = body.get(key)
        if value is not None:
            if not _is_number(value) or not low <= value <= high:
                raise _bad(key, f"a number from {low} to {high} is required")
            config[target] = value
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise _bad(key, "a positive integer is required")
            config["maxOutputTokens"] = value
            break
    n = body.get("n")
    if n is not None:
        if not _is_int(n) or n < 1:
            raise _bad("n", "a positive integer is required")
        if n > 1:
            config["candidateCount"] = n
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise _bad("seed", "an integer is required")
        config["seed"] = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("stop", "a string or a list of strings is required")
        if any(stops):
            config["stopSequences"] = [s for s in stops if s]
    _response_format(body.get("response_format"), config)
    return config


def _response_format(value: Any, config: dict[str, Any]) -> None:
    if value is None:
        return
    kind = _object(value, "response_format").get("type")
    if kind == "text":
        return
    if kind == "json_object":
        config["responseMimeType"] = "application/json"
    elif kind == "json_schema":
        spec = _object(value.get("json_schema"), "response_format.json_schema")
        config["responseMimeType"] = "application/json"
        schema = spec.get("schema")
        if schema is not None:
            config["responseJsonSchema"] = _object(schema, "response_format.json_schema.schema")
    else:
        raise _bad("response_format.type", "'text', 'json_object' or 'json_schema' is required")


def _tools(body: dict[str, Any], out: dict[str, Any]) -> None:
    declarations = []
    for i, tool in enumerate(function_tools(body)):
        declaration: dict[str, Any] = {"name": tool.name}
        if tool.description is not None:
            declaration["description"] = tool.description
        if tool.parameters is not None:
            # JSON Schema as OpenAI has it (``parameters`` takes only an OpenAPI subset).
            declaration["parametersJsonSchema"] = _object(
                tool.parameters, f"tools.{i}.function.parameters"
            )
        declarations.append(declaration)

    choice = body.get("tool_choice")
    mode: dict[str, Any] | None = None
    if choice in ("auto", "none", "required"):
        mode = {"mode": {"auto": "AUTO", "none": "NONE", "required": "ANY"}[choice]}
    elif isinstance(choice, dict) and choice.get("type") == "function":
        function = _object(choice.get("function"), "tool_choice.function")
        name = _string(function, "name", "tool_choice.function")
        mode = {"mode": "ANY", "allowedFunctionNames": [name]}
    elif choice is not None:
        raise _bad("tool_choice", "must be 'auto', 'none', 'required' or a named function")
    if declarations:
        out["tools"] = [{"functionDeclarations": declarations}]
        if mode is not None:
            out["toolConfig"] = {"functionCallingConfig": mode}


# ---------------------------------------------------------------- responses

_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
}


def _finish_reason(reason: Any, has_calls: bool) -> str:
    if has_calls and reason in (None, "STOP"):
        return "tool_calls"
    return _FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"


def _int(value: Any) -> int:
    return value if _is_int(value) else 0


def chat_usage(metadata: Any) -> dict[str, Any]:
    """``usageMetadata`` -> OpenAI usage (thinking tokens count as completion tokens,
    as OpenAI's reasoning tokens do)."""
    metadata = metadata if isinstance(metadata, dict) else {}
    prompt = _int(metadata.get("promptTokenCount"))
    thoughts = _int(metadata.get("thoughtsTokenCount"))
    completion = _int(metadata.get("candidatesTokenCount")) + thoughts
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = _int(metadata.get("cachedContentTokenCount"))
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if thoughts:
        usage["completion_tokens_details"] = {"reasoning_tokens": thoughts}
    return usage


class _Calls:
    """Numbers the tool calls of one answer: ``call_0``, ``call_1``…"""

    def __init__(self) -> None:
        self.count = 0

    def convert(self, part: dict[str, Any]) -> dict[str, Any]:
        call = part["functionCall"]
        base = call.get("id") if isinstance(call.get("id"), str) and call.get("id") else None
        if base is None:
            base = f"call_{self.count}"
        self.count += 1
        signature = part.get("thoughtSignature")
        function = {"name": str(call.get("name") or ""), "arguments": _args(call.get("args"))}
        call_id = _call_id(base, signature if isinstance(signature, str) else None)
        return {"id": call_id, "type": "function", "function": function}


def _args(args: Any) -> str:
    return orjson.dumps(args if isinstance(args, dict) else {}).decode()


def _parts(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _visible_text(part: dict[str, Any]) -> str | None:
    """A text part's text; None for thoughts and parts of other kinds."""
    text = part.get("text")
    return text if isinstance(text, str) and part.get("thought") is not True else None


def _candidates(response: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    found = response.get("candidates")
    out = []
    for position, candidate in enumerate(found if isinstance(found, list) else ()):
        if isinstance(candidate, dict):
            index = candidate.get("index")
            out.append((index if _is_int(index) else position, candidate))
    return out


def _blocked(response: dict[str, Any]) -> bool:
    feedback = response.get("promptFeedback")
    return isinstance(feedback, dict) and bool(feedback.get("blockReason"))


def response_to_chat(response: dict[str, Any], model: str, created: int) -> dict[str, Any]:
    """Translate a ``GenerateContentResponse`` into an OpenAI ``chat.completion``.

    A prompt Gemini blocked (no candidates, ``promptFeedback.blockReason``) is an
    empty answer with ``finish_reason: "content_filter"``.
    """
    calls = _Calls()
    choices = []
    for index, candidate in _candidates(response):
        texts: list[str] = []
        tool_calls: list[dict[str, Any]] = []
        for part in _parts(candidate):
            text = _visible_text(part)
            if text is not None:
                texts.append(text)
            elif isinstance(part.get("functionCall"), dict):
                tool_calls.append(calls.convert(part))
        message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        elif message["content"] is None:
            message["content"] = ""
        finish = _finish_reason(candidate.get("finishReason"), bool(tool_calls))
        choices.append(
            {"index": index, "message": message, "logprobs": None, "finish_reason": finish}
        )
    if not choices and _blocked(response):
        message = {"role": "assistant", "content": ""}
        choices.append(
            {"index": 0, "message": message, "logprobs": None, "finish_reason": "content_filter"}
        )
    if not choices:
        raise ValueError("a response without candidates")
    return {
        "id": str(response.get("responseId") or ""),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": sorted(choices, key=lambda c: c["index"]),
        "usage": chat_usage(response.get("usageMetadata")),
    }


class StreamToChunks:
    """Streamed ``GenerateContentResponse`` objects -> ``chat.completion.chunk`` dicts.

    Each choice gets a role chunk first, then its text and tool-call deltas (Gemini
    sends a call whole: one delta with the id, name and arguments) and a chunk with
    its finish reason; :meth:`end` gives the usage chunk once the upstream's stream
    ended, and raises ``ValueError`` if no choice finished (the stream was cut short).
    """

    def __init__(self, response_id: str, model: str, created: int) -> None:
        self._id = response_id
        self._model = model
        self._created = created
        self._calls = _Calls()
        self._tools: dict[int, int] = {}  # choice index -> tool calls so far
        self._finished: set[int] = set()
        self._started: set[int] = set()
        self._usage: Any = None

    def feed(self, response: dict[str, Any]) -> list[dict[str, Any]]:
        if isinstance(response.get("usageMetadata"), dict):
            self._usage = response["usageMetadata"]
        chunks: list[dict[str, Any]] = []
        candidates = _candidates(response)
        if not candidates and _blocked(response) and 0 not in self._finished:
            candidates = [(0, {"finishReason": "SAFETY"})]
        for index, candidate in candidates:
            if index not in self._started:
                self._started.add(index)
                chunks.append(self._chunk(index, {"role": "assistant", "content": ""}))
            for part in _parts(candidate):
                text = _visible_text(part)
                if text:
                    chunks.append(self._chunk(index, {"content": text}))
                elif isinstance(part.get("functionCall"), dict):
                    position = self._tools.get(index, 0)
                    self._tools[index] = position + 1
                    call = {"index": position, **self._calls.convert(part)}
                    chunks.append(self._chunk(index, {"tool_calls": [call]}))
            reason = candidate.get("finishReason")
            if reason and index not in self._finished:
                self._finished.add(index)
                finish = _finish_reason(reason, index in self._tools)
                chunks.append(self._chunk(index, {}, finish))
        return chunks

    def end(self) -> dict[str, Any]:
        """The closing usage chunk; ``ValueError`` if the stream ended unfinished."""
        if not self._finished or not self._started <= self._finished:
            raise ValueError("the stream ended before its answer finished")
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": chat_usage(self._usage),
        }

    def _chunk(
        self, index: int, delta: dict[str, Any], finish: str | None = None
    ) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }


# ---------------------------------------------------------------- errors


def error_to_openai(payload: Any) -> Any:
    """A Gemini error body (``{"error": {"code", "message", "status"}}``, or a list of
    them from a streaming call) -> the OpenAI shape the broker's error mapping reads;
    anything else unchanged."""
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return payload
    status = error.get("status")
    out: dict[str, Any] = {"message": error.get("message")}
    if isinstance(status, str) and status:
        out["code"] = status.lower()
        if status == "RESOURCE_EXHAUSTED":
            out["type"] = "rate_limit_error"
    return {"error": out}


def retry_delay(payload: Any) -> str | None:
    """The wait a Gemini error asks for in its ``google.rpc.RetryInfo`` detail
    (``"retryDelay": "37s"``), in seconds as a ``Retry-After`` value; None if none."""
    if isinstance(payload, list) and payload:
        payload = payload[0]
    error = payload.get("error") if isinstance(payload, dict) else None
    details = error.get("details") if isinstance(error, dict) else None
    for detail in details if isinstance(details, list) else ():
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        if isinstance(delay, str) and delay.endswith("s"):
            try:
                seconds = float(delay[:-1])
            except ValueError:
                continue
            if seconds >= 0:
                return f"{seconds:g}"
    return None
