"""The Anthropic Messages API: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

A request becomes a job of kind ``messages`` (``count_tokens``) holding the body as
it came. A worker sends it as it is to an Anthropic deployment (the model's name
upstream set, the client's ``anthropic-beta`` and ``anthropic-version`` headers
with it) and relays the answer or the stream's events as they came; to a deployment
of another API it translates the request through chat and the answer back
(``workers/native.py``). Either way the answer reaching this module is already an
Anthropic message or Anthropic events; only the broker's own errors are rewritten
into Anthropic's error shape here, so the official ``anthropic`` SDK works against
the broker unchanged. ``Prefer: respond-async`` makes it an async job whose result
is the message.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from llm_broker.ingress import calls
from llm_broker.ingress.admission import identify, new_job
from llm_broker.ingress.bodies import read_json_body
from llm_broker.ingress.context import CONTEXT
from llm_broker.ingress.jobs import prefers_async, submit
from llm_broker.ingress.state import STATE
from llm_broker.shared import anthropic
from llm_broker.shared import messages as m


class AnthropicRenderer(calls.Renderer):
    """Writes the broker's errors in Anthropic's shape; answers pass as they are."""

    def end(self, data: bytes) -> bytes:
        return data  # the closing events of a translated stream (none for a native one)

    def error(self, status: int, data: bytes) -> bytes:
        return orjson.dumps(anthropic.error_object(status, _message(data)))

    def stream_error(self, data: bytes) -> bytes:
        return anthropic.sse_event("error", anthropic.error_object(502, _message(data)))

    def replay(self, cached: bytes, include_usage: bool) -> tuple[bytes, bytes]:
        return message_events(orjson.loads(cached)), b""


ANTHROPIC = AnthropicRenderer()


def _message(data: bytes) -> str:
    """The message of an OpenAI error object."""
    try:
        found: Any = orjson.loads(data)
        return str(found["error"]["message"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return data.decode(errors="replace")


def message_events(message: dict[str, Any]) -> bytes:
    """A whole message (a cached answer) as the events of a stream that sent it."""
    usage = message.get("usage") or {}
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    start["usage"] = {**usage, "output_tokens": 0}
    out = [anthropic.sse_event("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message.get("content") or ()):
        kind = block.get("type")
        if kind == "text":
            empty, delta = {**block, "text": ""}, {"type": "text_delta", "text": block["text"]}
        elif kind == "tool_use":
            empty = {**block, "input": {}}
            delta = {
                "type": "input_json_delta",
                "partial_json": orjson.dumps(block["input"]).decode(),
            }
        elif kind == "thinking":
            empty = {**block, "thinking": ""}
            delta = {"type": "thinking_delta", "thinking": block.get("thinking", "")}
        else:
            empty, delta = block, None
        out.append(
            anthropic.sse_event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": empty},
            )
        )
        if delta is not None:
            out.append(
                anthropic.sse_event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": delta},
                )
            )
        out.append(
            anthropic.sse_event(
                "content_block_stop", {"type": "content_block_stop", "index": index}
            )
        )
    closing = {
        "stop_reason": message.get("stop_reason"),
        "stop_sequence": message.get("stop_sequence"),
    }
    out.append(
        anthropic.sse_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": closing,
                "usage": {"output_tokens": usage.get("output_tokens", 0)},
            },
        )
    )
    out.append(anthropic.sse_event("message_stop", {"type": "message_stop"}))
    return b"".join(out)


async def create_message(request: web.Request) -> web.StreamResponse:
    return await _messages(request, m.MESSAGES)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    return await _messages(request, m.COUNT_TOKENS)


async def _messages(request: web.Request, kind: str) -> web.StreamResponse:
    request[CONTEXT].api = "anthropic"  # errors in Anthropic's shape
    state = request.app[STATE]
    principal = await identify(request, state)
    raw = await read_json_body(request, state.config.ingress.max_body_bytes)
    if kind == m.MESSAGES and prefers_async(request):
        return await submit(
            request, state, principal, raw, raw, webhook_url=None, metadata=None, kind=kind
        )
    job, route = await new_job(
        request, state, principal, raw, reply_to=state.replies.reply_to, kind=kind
    )
    return await calls.run(request, state, job, route, ANTHROPIC)
