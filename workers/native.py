"""Jobs in the Anthropic Messages and OpenAI Responses APIs (``m.MESSAGES``,
``m.COUNT_TOKENS``, ``m.RESPONSES``): the answer is in the job's own API.

A deployment whose API is the job's (``Upstream.native``) gets the body as the client
sent it, apart from the model's name upstream (an Anthropic body keeps every other
byte: prompt caching's ``cache_control``, thinking and document blocks, whatever
the client's SDK wrote), with the client's ``anthropic-beta`` and
``anthropic-version`` headers; its answer, or its stream's events, come back as they
came. Any other deployment gets the request translated to chat, and its answer
translated back; a field that cannot be translated is a 400 naming it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from llm_broker.shared import anthropic, rawjson, responses
from llm_broker.shared import messages as m
from llm_broker.shared.errors import (
    BadRequest,
    UpstreamError,
    upstream_interrupted,
    upstream_message,
)
from llm_broker.shared.store.records import Usage
from llm_broker.workers import shaping
from llm_broker.workers.accumulate import StreamAccumulator
from llm_broker.workers.upstream import stream_error

if TYPE_CHECKING:
    from llm_broker.workers.call import Answer, DeploymentCall


async def answer(
    call: DeploymentCall, body: dict[str, Any], timeout: float, headers: dict[str, str] | None
) -> Answer:
    """One upstream call of a job in the Messages or Responses API."""
    job, upstream = call.job, call.pool.upstream
    if job.kind in upstream.native:
        if job.headers:
            headers = {**headers, **job.headers} if headers else job.headers
        if job.kind == m.RESPONSES:
            return await _native_response(call, body, timeout, headers)
        return await _native_message(call, timeout, headers)
    return await _translated(call, body, timeout, headers)


# ---------------------------------------------------------------- native


async def _native_message(
    call: DeploymentCall, timeout: float, headers: dict[str, str] | None
) -> Answer:
    job, upstream = call.job, call.pool.upstream
    path = upstream.native_path(job.kind, job.upstream_model)
    data = rawjson.set_member(job.body, "model", job.upstream_model)
    if not job.stream:
        raw, found = await upstream.whole(path, data, timeout, headers)
        usage = message_usage(found.get("usage")) if job.kind == m.MESSAGES else None
        return raw, None, usage
    acc = MessageAccumulator()

    async def frames() -> AsyncIterator[bytes]:
        blocks = upstream.blocks(path, data, timeout, headers, eof_ends=True)
        async with contextlib.aclosing(blocks):
            async for block, event, _ in blocks:
                if isinstance(event, dict):
                    acc.add(event)  # an error event raises
                yield block
                if acc.done:
                    return

    await call.relay(frames())
    if not acc.done:
        raise upstream_interrupted()
    return orjson.dumps(acc.message), b"", message_usage(acc.message.get("usage"))


def message_usage(usage: Any) -> Usage | None:
    """The tokens of an Anthropic usage object: cache writes and reads are input too."""
    if not isinstance(usage, dict):
        return None
    total_in = 0
    for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
        value = usage.get(key)
        if isinstance(value, int):
            total_in += value
    out = usage.get("output_tokens")
    return Usage.reported(total_in, out if isinstance(out, int) else 0)


class MessageAccumulator:
    """The whole message of an Anthropic stream, built from its events (the job's
    record keeps it); ``done`` once ``message_stop`` came."""

    def __init__(self) -> None:
        self.message: dict[str, Any] = {"type": "message", "role": "assistant", "content": []}
        self.done = False
        self._json: dict[int, list[str]] = {}

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "error":
            error = event.get("error")
            error = error if isinstance(error, dict) else {}
            raise stream_error(
                anthropic.UpstreamStreamError(
                    str(error.get("message") or "upstream stream error"),
                    str(error.get("type") or "api_error"),
                )
            )
        content: list[Any] = self.message["content"]
        if kind == "message_start" and isinstance(event.get("message"), dict):
            self.message.update(event["message"])
            self.message["content"] = content
        elif kind == "content_block_start" and isinstance(event.get("content_block"), dict):
            content.append(dict(event["content_block"]))
        elif kind == "content_block_delta" and content and isinstance(event.get("delta"), dict):
            self._delta(content[-1], event["delta"], len(content) - 1)
        elif kind == "content_block_stop" and content:
            pieces = self._json.pop(len(content) - 1, None)
            if pieces is not None:
                try:
                    content[-1]["input"] = orjson.loads("".join(pieces) or "{}")
                except orjson.JSONDecodeError:
                    content[-1]["input"] = {}
        elif kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                self.message.update(delta)
            usage = event.get("usage")
            if isinstance(usage, dict):
                merged = dict(self.message.get("usage") or {})
                merged.update(usage)
                self.message["usage"] = merged
        elif kind == "message_stop":
            self.done = True

    def _delta(self, block: dict[str, Any], delta: dict[str, Any], index: int) -> None:
        match delta.get("type"):
            case "text_delta":
                block["text"] = block.get("text", "") + str(delta.get("text", ""))
            case "input_json_delta":
                self._json.setdefault(index, []).append(str(delta.get("partial_json", "")))
            case "thinking_delta":
                block["thinking"] = block.get("thinking", "") + str(delta.get("thinking", ""))
            case "signature_delta":
                block["signature"] = delta.get("signature")
            case "citations_delta":
                block.setdefault("citations", []).append(delta.get("citation"))


async def _native_response(
    call: DeploymentCall, body: dict[str, Any], timeout: float, headers: dict[str, str] | None
) -> Answer:
    """A Responses job on an OpenAI or Azure deployment. The broker keeps the state
    (``previous_response_id`` becomes the earlier turns' items in ``input``; a
    background job is the broker's own), so those fields do not go upstream; ``store``
    goes as asked (a stored reasoning item is what a later turn refers to by id); the
    answer carries the broker's response id."""
    job, upstream = call.job, call.pool.upstream
    path = upstream.native_path(job.kind, job.upstream_model)
    payload = {k: v for k, v in body.items() if k not in _BROKER_FIELDS}
    payload["model"] = job.upstream_model
    if job.context:
        payload["input"] = [*orjson.loads(job.context), *responses.input_items(body)]
    rid = response_id(job)
    if not job.stream:
        _, found = await upstream.whole(path, payload, timeout, headers)
        _own(found, rid, body)
        _check_failed(found)
        return orjson.dumps(found), None, response_usage(found)
    final: dict[str, Any] | None = None

    async def frames() -> AsyncIterator[bytes]:
        nonlocal final
        blocks = upstream.blocks(path, payload, timeout, headers, eof_ends=True)
        async with contextlib.aclosing(blocks):
            async for _, event, _ in blocks:
                if isinstance(event, dict):
                    yield _response_event(event, rid, body)
                    if event.get("type") in _LAST_EVENTS:
                        final = event["response"]
                        return

    await call.relay(frames())
    if final is None:
        raise upstream_interrupted()
    return orjson.dumps(final), b"", response_usage(final)


#: Request fields of the broker's own (its state and its background jobs).
_BROKER_FIELDS = frozenset(("previous_response_id", "background", "stream_options"))


def response_id(job: m.Job) -> str:
    return f"resp_{job.id}"


#: The events that end a Responses stream with a response.
_LAST_EVENTS = frozenset(("response.completed", "response.incomplete"))


def _response_event(event: dict[str, Any], rid: str, request: dict[str, Any]) -> bytes:
    """An upstream Responses event, framed, with the broker's response id; an error
    event, or a failed response, raises its error."""
    kind = str(event.get("type") or "")
    if kind == "error":
        raise UpstreamError(
            502,
            upstream_message(str(event.get("message") or "upstream stream error")),
            code="upstream_error",
            retryable=True,
        )
    found = event.get("response")
    if isinstance(found, dict):
        _own(found, rid, request)
        _check_failed(found)
    return responses.sse_event(kind, event)


def _own(found: dict[str, Any], rid: str, request: dict[str, Any]) -> None:
    """An upstream response made the broker's: its id, and the state fields as asked."""
    found["id"] = rid
    found["previous_response_id"] = request.get("previous_response_id")
    found["background"] = bool(request.get("background"))
    found["store"] = request.get("store", True) is not False


def _check_failed(found: dict[str, Any]) -> None:
    if found.get("status") != "failed":
        return
    error = found.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    raise UpstreamError(
        502,
        upstream_message(str(message or "the upstream response failed")),
        code="upstream_error",
        retryable=True,
    )


def response_usage(found: dict[str, Any]) -> Usage | None:
    usage = found.get("usage")
    if not isinstance(usage, dict):
        return None
    tokens_in, tokens_out = usage.get("input_tokens"), usage.get("output_tokens")
    if not isinstance(tokens_in, int) or not isinstance(tokens_out, int):
        return None
    return Usage.reported(tokens_in, tokens_out)


# ---------------------------------------------------------------- translated


async def _translated(
    call: DeploymentCall, body: dict[str, Any], timeout: float, headers: dict[str, str] | None
) -> Answer:
    job, upstream = call.job, call.pool.upstream
    ptype = call.pool.pcfg.type
    if job.kind == m.COUNT_TOKENS:
        raise BadRequest(
            f"counting tokens needs an anthropic deployment; {call.name} is {ptype}",
            param="model",
        )
    history = orjson.loads(job.context) if job.context else None
    try:
        if job.kind == m.MESSAGES:
            chat = anthropic.messages_to_chat(body)
        else:
            chat = responses.responses_to_chat(body, history)
    except (anthropic.TranslationError, responses.TranslationError) as e:
        raise BadRequest(
            f"{e} (the deployment {call.name} is {ptype}: the request is translated for it)",
            param=e.param,
            code="untranslatable",
        ) from e
    model = job.upstream_model
    if not job.stream:
        completion = await upstream.complete(chat, model, timeout, headers)
        return (
            orjson.dumps(_translate_back(job, completion, body)),
            None,
            shaping.usage_of(completion),
        )
    acc = StreamAccumulator()
    events = _events(job, body)

    async def frames() -> AsyncIterator[bytes]:
        async for chunk in upstream.stream(chat, model, timeout, headers):
            acc.add(chunk)
            out = events.feed(chunk)
            if out:
                yield out

    await call.relay(frames())
    closing = events.finish()
    completion = acc.result(shaping.response_id(job), job.model, int(job.created))
    return (
        orjson.dumps(events.result(completion)),
        closing,
        shaping.usage_of(completion),
    )


def _translate_back(job: m.Job, completion: dict[str, Any], request: dict[str, Any]) -> Any:
    if job.kind == m.MESSAGES:
        message = anthropic.chat_to_message(completion, job.model)
        message["id"] = f"msg_{job.id}"
        return message
    return responses.chat_to_response(
        completion,
        response_id=response_id(job),
        model=job.model,
        created_at=int(job.created),
        request=request,
    )


class _MessageEvents:
    """Chat chunks as Anthropic stream events."""

    def __init__(self, job: m.Job) -> None:
        self._job = job
        self._events = anthropic.ChunksToEvents(f"msg_{job.id}", job.model)

    def feed(self, chunk: dict[str, Any]) -> bytes:
        return b"".join(anthropic.sse_event(n, e) for n, e in self._events.feed(chunk))

    def finish(self) -> bytes:
        return b"".join(anthropic.sse_event(n, e) for n, e in self._events.finish())

    def result(self, completion: dict[str, Any]) -> Any:
        return _translate_back(self._job, completion, {})


class _ResponseEvents:
    """Chat chunks as Responses stream events."""

    def __init__(self, job: m.Job, request: dict[str, Any]) -> None:
        self._events = responses.ChunksToResponseEvents(
            response_id=response_id(job),
            model=job.model,
            created_at=int(job.created),
            request=request,
        )
        self.final: dict[str, Any] | None = None

    def feed(self, chunk: dict[str, Any]) -> bytes:
        return b"".join(responses.sse_event(n, e) for n, e in self._events.feed(chunk))

    def finish(self) -> bytes:
        out: list[bytes] = []
        for name, event in self._events.finish():
            if isinstance(event.get("response"), dict):
                self.final = event["response"]
            out.append(responses.sse_event(name, event))
        return b"".join(out)

    def result(self, completion: dict[str, Any]) -> Any:
        return self.final


def _events(job: m.Job, request: dict[str, Any]) -> _MessageEvents | _ResponseEvents:
    return _MessageEvents(job) if job.kind == m.MESSAGES else _ResponseEvents(job, request)
