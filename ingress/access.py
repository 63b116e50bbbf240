"""One log line per request: who asked for what, the outcome, how long, what it cost.

Never the prompt, the answer or a key. The lines go to stderr in the format
the process logs in (``--log-format``): a JSON object, or text with
``key=value`` pairs, where a value that is not a plain token is written as a
JSON string (quoted, line breaks and control characters escaped), so that no
client-supplied value can end a line or forge a field. Client-supplied values
are cut to :data:`MAX_VALUE_CHARS`. They are written in batches, at most
:data:`FLUSH_S` after the first line of a batch, rather than through a logging
handler per request: on a busy ingress the handler's record, lock and write per
line cost a tenth of its CPU.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
from aiohttp import web

from llm_broker.ingress.context import CONTEXT, RequestContext
from llm_broker.shared import logs
from llm_broker.shared.config import Price
from llm_broker.shared.loop import LoopRef
from llm_broker.shared.store.records import Usage

LOGGER = "llm_broker.requests"
#: Lines are written together, at most this long after the first of them: one
#: write per request at low rates (and a reader of the log woken for each) cost
#: as much as the rest of the request's logging.
FLUSH_S = 0.05
#: The longest client-supplied value (a model name) written to a request log line.
MAX_VALUE_CHARS = 200
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
#: A request id as this gateway makes them (hex; on a Cluster the provider's code
#: first): written as it is.
_JOB_ID = re.compile(r"[0-9a-f]{1,64}")
#: The most distinct combinations of method, endpoint, tenant, model, route and
#: provider whose rendering a text line keeps (then all are forgotten at once).
MAX_KEPT = 1024
_Repeating = tuple[str, str, str | None, str | None, str | None, str]
_NO_CONTEXT = RequestContext()


def capped(value: str) -> str:
    return value if len(value) <= MAX_VALUE_CHARS else value[:MAX_VALUE_CHARS] + "…"


class AccessLog:
    def __init__(self, pricing: dict[str, Price], stream: TextIO | None = None) -> None:
        self._pricing = pricing
        self._stream = stream or sys.stderr
        self.enabled = logging.getLogger(LOGGER).isEnabledFor(logging.INFO)
        self._json = logs.current_format() == "json"
        self._lines: list[str] = []
        self._loop = LoopRef()
        #: The formatted timestamp of the current second, and that second.
        self._second = -1
        self._stamp = ""
        #: The rendered repeating part of a text line, by its values (_repeating).
        self._middles: dict[_Repeating, str] = {}

    def log(self, request: web.Request, endpoint: str, status: int, seconds: float) -> None:
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            if self._json:
                self._stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        millis = int(now * 1000) % 1000
        if self._json:
            fields = self._fields(request, endpoint, status, seconds)
            stamp = f"{self._stamp}.{millis:03d}+00:00"
            head = {"ts": stamp, "level": "info", "logger": LOGGER, "message": "request"}
            line = orjson.dumps({**head, **fields}).decode()
        else:
            pairs = self._text_pairs(request, endpoint, status, seconds)
            line = f"{self._stamp},{millis:03d} INFO {LOGGER} request {pairs}"
        if not self._lines:
            self._loop().call_later(FLUSH_S, self.flush)
        self._lines.append(line)

    def flush(self) -> None:
        if self._lines:
            self._stream.write("\n".join(self._lines) + "\n")
            self._stream.flush()
            self._lines.clear()

    def _text_pairs(self, request: web.Request, endpoint: str, status: int, seconds: float) -> str:
        """The line's fields as ``logs.text_pairs`` writes :meth:`_fields`, without
        their dict: the part that repeats from request to request (method, endpoint,
        tenant, model, route, provider) is rendered once per distinct combination
        and kept (at most :data:`MAX_KEPT`: a client's names cannot grow it)."""
        ctx = request.get(CONTEXT) or _NO_CONTEXT
        key = _repeating(request, endpoint, ctx)
        middle = self._middles.get(key)
        if middle is None:
            if len(self._middles) >= MAX_KEPT:
                self._middles.clear()
            middle = self._middles[key] = logs.text_pairs(_repeating_fields(key))
        latency = round(seconds * 1000, 3)
        job_id = ctx.job_id
        if job_id is None:
            text = f"{middle} status={status} latency_ms={latency}"
        else:
            if not _JOB_ID.fullmatch(job_id):
                job_id = logs.text_value(job_id)
            text = f"request_id={job_id} {middle} status={status} latency_ms={latency}"
        trace_id = _trace_id(request)
        if trace_id is not None:
            text += f" trace_id={trace_id}"
        if ctx.error_type is not None:
            text += f" error_type={logs.text_value(ctx.error_type)}"
        if ctx.cache is not None:
            text += f" cache={logs.text_value(ctx.cache)}"
        usage = ctx.usage
        if usage is not None:
            text += f" input_tokens={usage.input} output_tokens={usage.output}"
            cost = self._cost(key, usage)
            if cost is not None:
                text += f" cost_usd={cost}"
        return text

    def _fields(
        self, request: web.Request, endpoint: str, status: int, seconds: float
    ) -> dict[str, Any]:
        ctx = request.get(CONTEXT) or _NO_CONTEXT
        key = _repeating(request, endpoint, ctx)
        fields: dict[str, Any] = {
            "request_id": ctx.job_id,
            **_repeating_fields(key),
            "status": status,
            "latency_ms": round(seconds * 1000, 3),
        }
        trace_id = _trace_id(request)
        if trace_id is not None:
            fields["trace_id"] = trace_id
        if ctx.error_type is not None:
            fields["error_type"] = ctx.error_type
        if ctx.cache is not None:
            fields["cache"] = ctx.cache
        usage = ctx.usage
        if usage is not None:
            fields["input_tokens"] = usage.input
            fields["output_tokens"] = usage.output
            cost = self._cost(key, usage)
            if cost is not None:
                fields["cost_usd"] = cost
        return fields

    def _cost(self, key: _Repeating, usage: Usage) -> float | None:
        """The call's cost in US dollars, if its model (or route) has a price."""
        model, route = key[3], key[4]
        price = self._pricing.get(model or "") or self._pricing.get(route or "")
        return None if price is None else round(price.cost(usage.input, usage.output), 8)


def _repeating(request: web.Request, endpoint: str, ctx: RequestContext) -> _Repeating:
    """The values of a line that repeat from request to request: method, endpoint,
    tenant, model (the client's name, else the route), route and provider."""
    route = ctx.route or None
    return (request.method, endpoint, ctx.tenant, ctx.requested_model or route, route, ctx.provider)


def _repeating_fields(key: _Repeating) -> dict[str, Any]:
    """The fields those values make (None: left out of the line)."""
    method, endpoint, tenant, model, route, provider = key
    return {
        "method": method,
        "endpoint": endpoint,
        "tenant": tenant,
        "model": capped(model) if model else None,
        "route": route if route != model else None,
        "provider": provider or None,
    }


def _trace_id(request: web.Request) -> str | None:
    trace = request.headers.get("traceparent", "")
    return trace[3:35] if len(trace) >= 35 and _TRACE_ID.fullmatch(trace, 3, 35) else None
