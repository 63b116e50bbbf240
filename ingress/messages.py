"""The Anthropic Messages API: ``POST /v1/messages``.

The request is translated to the broker's internal (OpenAI chat) format and
runs like any chat job, on whatever provider its model routes to; answers,
stream events and errors are translated back into Anthropic's shapes, so the
official ``anthropic`` SDK works against the broker unchanged.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from llm_broker.ingress import calls
from llm_broker.ingress.admission import identify, new_job
from llm_broker.ingress.bodies import load_json, read_json_body
from llm_broker.ingress.context import CONTEXT
from llm_broker.ingress.state import STATE
from llm_broker.shared import anthropic, body
from llm_broker.shared.errors import BadRequest


class AnthropicRenderer(calls.Renderer):
    """Writes the worker's OpenAI-shaped answers as Anthropic messages and events."""

    def __init__(self, job_id: str, model: str) -> None:
        self._model = model
        self._events = anthropic.ChunksToEvents(f"msg_{job_id}", model)

    def result(self, data: bytes) -> bytes:
        return orjson.dumps(anthropic.chat_to_message(orjson.loads(data), self._model))

    def error(self, status: int, data: bytes) -> bytes:
        return orjson.dumps(anthropic.error_object(status, _message(data)))

    def chunks(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for frame in data.split(b"\n\n"):
            if not frame.startswith(b"data:"):
                continue
            payload = frame[5:].strip()
            if payload == b"[DONE]":
                continue
            for name, event in self._events.feed(orjson.loads(payload)):
                out.append(anthropic.sse_event(name, event))
        return b"".join(out)

    def end(self, data: bytes) -> bytes:
        last = self.chunks(data)  # the usage, before the closing events that carry it
        return last + b"".join(anthropic.sse_event(n, e) for n, e in self._events.finish())

    def stream_error(self, data: bytes) -> bytes:
        return anthropic.sse_event("error", anthropic.error_object(502, _message(data)))


def _message(data: bytes) -> str:
    """The message of an OpenAI error object."""
    try:
        found: Any = orjson.loads(data)
        return str(found["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return data.decode(errors="replace")


async def create_message(request: web.Request) -> web.StreamResponse:
    request[CONTEXT].api = "anthropic"  # errors in Anthropic's shape
    state = request.app[STATE]
    principal = await identify(request, state)
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    # Decoded with the workers' codec: integers beyond 64 bits arrive as floats,
    # which the translation refuses where it needs an integer.
    value = load_json(raw)
    if not isinstance(value, dict):
        raise BadRequest("invalid request: expected a JSON object")
    try:
        chat = body.dump(anthropic.messages_to_chat(value))
    except anthropic.TranslationError as e:
        raise BadRequest(str(e), param=e.param) from e
    except body.InvalidBody as e:
        raise BadRequest(str(e), code="invalid_json") from e
    job, route = await new_job(request, state, principal, chat, reply_to=state.replies.stream)
    return await calls.run(request, state, job, route, AnthropicRenderer(job.id, job.model))
