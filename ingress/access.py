"""One log line per request: who asked for what, the outcome, how long, what it cost.

Never the prompt, the answer or a key. With ``--log-format json`` the line is a
JSON object; in text, ``key=value`` pairs after the message.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from shared.config import Price

request_log = logging.getLogger("llm_broker.requests")


def log_request(
    pricing: dict[str, Price], request: web.Request, endpoint: str, status: int, seconds: float
) -> None:
    model = request.get("model") or None
    fields: dict[str, Any] = {
        "request_id": request.get("job_id"),
        "method": request.method,
        "endpoint": endpoint,
        "tenant": request.get("tenant"),
        "model": model,
        "provider": request.get("provider") or None,
        "status": status,
        "latency_ms": round(seconds * 1000, 3),
    }
    trace = request.headers.get("traceparent", "")
    if len(trace) >= 35:
        fields["trace_id"] = trace[3:35]
    if "error_type" in request:
        fields["error_type"] = request["error_type"]
    if "cache" in request:
        fields["cache"] = request["cache"]
    usage: bytes = request.get("usage", b"")
    if usage:
        found = usage.split()
        input_tokens, output_tokens = int(found[0]), int(found[1])
        fields["input_tokens"] = input_tokens
        fields["output_tokens"] = output_tokens
        price = pricing.get(model or "")
        if price is not None:
            fields["cost_usd"] = round(price.cost(input_tokens, output_tokens), 8)
    request_log.info("request", extra={"fields": fields})
