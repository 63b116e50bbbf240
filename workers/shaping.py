"""Response shaping and accounting: what the client sees of an upstream answer
(its id, model name and creation time, the SSE frames), and the tokens and cost
it is counted for."""

from __future__ import annotations

from typing import Any

import orjson

from llm_broker.shared import messages as m
from llm_broker.shared.config import Config, Price
from llm_broker.shared.metrics import FastCount, WorkerMetrics
from llm_broker.shared.store.records import Usage


def response_id(job: m.Job) -> str:
    return f"chatcmpl-{job.id}"


def frame(obj: dict[str, Any]) -> bytes:
    """One SSE frame."""
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage_of(result: dict[str, Any]) -> Usage | None:
    """The tokens of an OpenAI answer's usage object (embeddings: output 0)."""
    usage = result.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens", 0)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage.reported(prompt, completion)


def completion(job: m.Job, result: dict[str, Any]) -> dict[str, Any]:
    """A whole chat completion as the client sees it: the job's id and model name."""
    result["id"] = response_id(job)
    result["model"] = job.model
    result["created"] = result.get("created") or int(job.created)
    return result


def embeddings(job: m.Job, result: dict[str, Any]) -> dict[str, Any]:
    result["model"] = job.model
    return result


def chunk(job: m.Job, found: dict[str, Any], rid: str) -> bytes | None:
    """A stream chunk's frame for the client (``rid``: the job's response id); None
    for a usage-only chunk (the usage is sent at the end, if the client asked)."""
    if not found.get("choices") and found.get("usage"):
        return None
    found["id"] = rid
    found["model"] = job.model
    found["created"] = found.get("created") or int(job.created)
    return frame(found)


def stream_end(job: m.Job, result: dict[str, Any]) -> bytes:
    """What closes a stream before ``[DONE]``: the usage chunk, if asked for."""
    if not (job.include_usage and result.get("usage")):
        return b""
    return frame(
        {
            "id": result["id"],
            "object": "chat.completion.chunk",
            "created": result["created"],
            "model": job.model,
            "choices": [],
            "usage": result["usage"],
        }
    )


class Accounting:
    """Counts a completed call's tokens and cost, per route (metric children looked
    up once); priced as the client's model name, else as the route."""

    def __init__(self, config: Config, provider: str, metrics: WorkerMetrics) -> None:
        self._pricing = config.pricing
        self._provider = provider
        self._metrics = metrics
        #: The cost counter's tenant label: a tenant the config lists, else "other"
        #: (the number of series stays bounded by the config).
        self._tenants = frozenset(t for t in config.tenants if t != "*")
        self._children: dict[
            tuple[str, str], tuple[FastCount, FastCount, FastCount, FastCount, Price | None]
        ] = {}

    def count(self, job: m.Job, usage: Usage) -> None:
        model = job.route or job.model
        tenant = job.tenant if job.tenant in self._tenants else "other"
        found = self._children.get((model, tenant))
        if found is None:
            tokens = self._metrics.tokens
            found = (
                FastCount(tokens.labels(model, self._provider, "input")),
                FastCount(tokens.labels(model, self._provider, "output")),
                FastCount(tokens.labels(model, self._provider, "total")),
                FastCount(self._metrics.cost.labels(model, self._provider, tenant)),
                self._pricing.get(model),
            )
            self._children[(model, tenant)] = found
        found[0].inc(usage.input)
        found[1].inc(usage.output)
        found[2].inc(usage.total)
        price = self._pricing.get(job.model) or found[4]
        if price is not None:
            found[3].inc(price.cost(usage.input, usage.output))
