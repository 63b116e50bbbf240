"""The mock upstream's OpenAI Responses API: ``POST /v1/responses`` (or ``/responses``).

Behaves like the chat API (:mod:`llm_broker.mock.server`): the same model-name tokens
and ``mock`` field, the same deterministic words, seeded from the text of the last
input item (a string ``input`` is that text; a ``function_call_output`` item's
``output`` after a tool call). The answer is a ``response`` object with one
``message`` item (an ``output_text`` part), or, when the request has function
``tools``, ``tool_choice`` is not ``none`` and the last item is not a tool output,
one ``function_call`` item of the first (or forced) tool. ``max_output_tokens`` below
the word count shortens the answer (``status: incomplete``, ``incomplete_details.reason:
max_output_tokens``). Usage counts words of ``instructions`` and of every input item.

With ``"stream": true`` the events are the API's: ``response.created``,
``response.in_progress``, ``response.output_item.added``, ``response.content_part.added``,
one ``response.output_text.delta`` per word, ``response.output_text.done``,
``response.content_part.done``, ``response.output_item.done`` and
``response.completed`` (function calls: ``response.function_call_arguments.delta`` in two
pieces and ``.done``), each with its ``sequence_number``. ``background``, ``store`` and
``previous_response_id`` are echoed, not acted on.
"""

from __future__ import annotations

import time
import zlib
from typing import TYPE_CHECKING, Any

import orjson

from llm_broker.mock.formats import (
    CHUNKED_END,
    NWORDS,
    OPENAI,
    WORDS,
    content_text,
    error_response,
    frame,
    response,
    stream_head,
    tool_arguments,
    word_count,
)

if TYPE_CHECKING:
    from llm_broker.mock.server import _App, _Plan


def handle(app: _App, raw: bytes, keep_alive: bool) -> _Plan:
    from llm_broker.mock.server import _Plan

    req = app._load(raw)
    model = app._model(req, None)
    if app.state.failures_left:
        return app._injected(OPENAI, keep_alive)
    if req is None:
        return _Plan(error_response(OPENAI, 400, "invalid JSON body", keep_alive))
    items = _items(req.get("input"))
    if not items:
        return _Plan(
            error_response(OPENAI, 400, "Missing required parameter: 'input'.", keep_alive)
        )
    p, latency, failure = app._behaviour(model, req, keep_alive, OPENAI)
    if failure is not None:
        return failure
    input_tokens = word_count(str(req.get("instructions") or ""))
    text, tool_output = "", False
    for given in items:
        text, tool_output = _item_text(given)
        input_tokens += word_count(text)
    seed = zlib.crc32(text.encode("utf-8", "surrogatepass"))
    n = next(app.ids)
    rid, created = f"resp_mock_{n}", int(time.time())
    tool = None if tool_output else _tool(req)
    limit = req.get("max_output_tokens")
    status, words = "completed", p.chunks
    if tool is None and isinstance(limit, int) and 0 < limit < words:
        status, words = "incomplete", limit
    if tool is not None:
        name, schema = tool
        pieces = tool_arguments(schema, text, seed)
        item: dict[str, Any] = {
            "id": f"fc_mock_{n}",
            "type": "function_call",
            "status": "completed",
            "call_id": f"call_mock_{n}",
            "name": name,
            "arguments": pieces[0] + pieces[1],
        }
        output_tokens = 2
    else:
        content = " ".join(WORDS[(seed + k) % NWORDS] for k in range(words))
        part = {"type": "output_text", "text": content, "annotations": []}
        item = {
            "id": f"msg_mock_{n}",
            "type": "message",
            "role": "assistant",
            "status": status,
            "content": [part],
        }
        output_tokens = words
    usage = {
        "input_tokens": max(input_tokens, 1),
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": max(input_tokens, 1) + output_tokens,
    }
    final = _response(req, rid, created, model, status, [item], usage)
    if req.get("stream") is not True:
        return _Plan(response(200, orjson.dumps(final), keep_alive), latency=latency)
    events = _Events()
    head = stream_head(keep_alive)
    head += events.frame(
        "response.created",
        {"response": _response(req, rid, created, model, "in_progress", [], None)},
    )
    head += events.frame(
        "response.in_progress",
        {"response": _response(req, rid, created, model, "in_progress", [], None)},
    )
    opened = {**item, "status": "in_progress"}
    if item["type"] == "function_call":
        opened["arguments"] = ""
        head += events.frame("response.output_item.added", {"output_index": 0, "item": opened})
        body = [
            events.frame(
                "response.function_call_arguments.delta",
                {"item_id": item["id"], "output_index": 0, "delta": piece},
            )
            for piece in pieces
        ]
        tail = events.frame(
            "response.function_call_arguments.done",
            {
                "item_id": item["id"],
                "output_index": 0,
                "arguments": item["arguments"],
                "name": name,
            },
        )
    else:
        opened["content"] = []
        head += events.frame("response.output_item.added", {"output_index": 0, "item": opened})
        empty = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        head += events.frame("response.content_part.added", {**where, "part": empty})
        body = [
            events.frame(
                "response.output_text.delta",
                {**where, "delta": (" " if k else "") + WORDS[(seed + k) % NWORDS], "logprobs": []},
            )
            for k in range(words)
        ]
        text_done = item["content"][0]["text"]
        tail = events.frame(
            "response.output_text.done", {**where, "text": text_done, "logprobs": []}
        )
        tail += events.frame("response.content_part.done", {**where, "part": item["content"][0]})
    tail += events.frame("response.output_item.done", {"output_index": 0, "item": item})
    closing = "response.completed" if status == "completed" else "response.incomplete"
    tail += events.frame(closing, {"response": final}) + CHUNKED_END
    return app._stream(head, body, tail, p, latency)


class _Events:
    """Frames events with their sequence numbers."""

    def __init__(self) -> None:
        self.n = 0

    def frame(self, name: str, data: dict[str, Any]) -> bytes:
        data = {"type": name, **data, "sequence_number": self.n}
        self.n += 1
        return frame(b"event: %s\ndata: %s\n\n" % (name.encode(), orjson.dumps(data)))


def _items(found: object) -> list[Any]:
    if isinstance(found, str):
        return [{"role": "user", "content": found}] if found else []
    return [i for i in found if isinstance(i, dict)] if isinstance(found, list) else []


def _item_text(item: dict[str, Any]) -> tuple[str, bool]:
    """An input item's text, and whether it is a tool's output."""
    if item.get("type") == "function_call_output":
        return str(item.get("output") or ""), True
    if item.get("type") == "function_call":
        return str(item.get("arguments") or ""), False
    content = item.get("content")
    if isinstance(content, list):
        texts = [str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p]
        return " ".join(texts), False
    return content_text(content), False


def _tool(req: dict[str, Any]) -> tuple[str, Any] | None:
    tools = req.get("tools")
    if not isinstance(tools, list) or req.get("tool_choice") == "none":
        return None
    choice = req.get("tool_choice")
    named = choice.get("name") if isinstance(choice, dict) else None
    for tool in tools:
        if isinstance(tool, dict) and tool.get("type") == "function" and tool.get("name"):
            if named is None or tool["name"] == named:
                return str(tool["name"]), tool.get("parameters")
    return None


def _response(
    req: dict[str, Any],
    rid: str,
    created: int,
    model: str,
    status: str,
    output: list[Any],
    usage: dict[str, Any] | None,
) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": bool(req.get("background")),
        "error": None,
        "incomplete_details": incomplete,
        "instructions": req.get("instructions"),
        "max_output_tokens": req.get("max_output_tokens"),
        "model": model,
        "output": output,
        "parallel_tool_calls": req.get("parallel_tool_calls", True),
        "previous_response_id": req.get("previous_response_id"),
        "store": req.get("store", True),
        "temperature": req.get("temperature", 1.0),
        "text": req.get("text") or {"format": {"type": "text"}},
        "tool_choice": req.get("tool_choice", "auto"),
        "tools": req.get("tools") or [],
        "top_p": req.get("top_p", 1.0),
        "truncation": "disabled",
        "usage": usage,
        "metadata": req.get("metadata") or {},
    }
