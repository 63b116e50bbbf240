"""Builds the final ``chat.completion`` of a streamed call from its chunks."""

from __future__ import annotations

from typing import Any


class StreamAccumulator:
    def __init__(self) -> None:
        self._choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.created: int | None = None
        self.system_fingerprint: str | None = None

    def add(self, chunk: dict[str, Any]) -> None:
        if self.created is None and isinstance(chunk.get("created"), int):
            self.created = chunk["created"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if chunk.get("system_fingerprint"):
            self.system_fingerprint = chunk["system_fingerprint"]
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            acc = self._choices.setdefault(
                index,
                {
                    "index": index,
                    "role": "assistant",
                    "content": [],
                    "tool_calls": {},
                    "finish_reason": None,
                },
            )
            delta = choice.get("delta") or {}
            if delta.get("role"):
                acc["role"] = delta["role"]
            if delta.get("content"):
                acc["content"].append(delta["content"])
            for call in delta.get("tool_calls") or ():
                slot = acc["tool_calls"].setdefault(
                    call.get("index", 0),
                    {"id": None, "type": "function", "function": {"name": "", "arguments": []}},
                )
                if call.get("id"):
                    slot["id"] = call["id"]
                fn = call.get("function") or {}
                if fn.get("name"):
                    slot["function"]["name"] += fn["name"]
                if fn.get("arguments"):
                    slot["function"]["arguments"].append(fn["arguments"])
            if choice.get("finish_reason"):
                acc["finish_reason"] = choice["finish_reason"]

    def result(self, response_id: str, model: str, created: int) -> dict[str, Any]:
        choices = []
        for index in sorted(self._choices):
            acc = self._choices[index]
            message: dict[str, Any] = {"role": acc["role"], "content": "".join(acc["content"])}
            if acc["tool_calls"]:
                message["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": c["type"],
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": "".join(c["function"]["arguments"]),
                        },
                    }
                    for _, c in sorted(acc["tool_calls"].items())
                ]
                if not message["content"]:
                    message["content"] = None
            choices.append(
                {"index": index, "message": message, "finish_reason": acc["finish_reason"]}
            )
        out: dict[str, Any] = {
            "id": response_id,
            "object": "chat.completion",
            "created": self.created or created,
            "model": model,
            "choices": choices,
        }
        if self.usage is not None:
            out["usage"] = self.usage
        if self.system_fingerprint:
            out["system_fingerprint"] = self.system_fingerprint
        return out
