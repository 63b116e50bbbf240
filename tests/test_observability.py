"""Metrics, request logs and trace context after real traffic through ingress and a worker."""

from __future__ import annotations

import re
import secrets
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from llm_broker.dev import free_port
from llm_broker.procs import python_cmd
from llm_broker.shared.config import new_key
from tests.conftest import ConfigFactory, Procs, chat, mock_stats
from tests.helpers import eventually

KEY, KEY_HASH = new_key()
AUTH = {"Authorization": f"Bearer {KEY}"}
PRICE_IN, PRICE_OUT = 2.5, 10.0  # USD per million tokens

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_metrics(text: str) -> tuple[Samples, set[str]]:
    """Samples by (name, labels), and the metric families announced by ``# TYPE``."""
    samples: Samples = {}
    families: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            families.add(line.split()[2])
        elif line and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            name, _, labels = head.partition("{")
            found = frozenset(re.findall(r'(\w+)="([^"]*)"', labels))
            samples[(name, found)] = float(value)
    return samples, families


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[Samples, set[str]]:
    async with http.get(url) as resp:
        assert resp.status == 200
        return parse_metrics(await resp.text())


async def test_metrics_logs_and_traces_match_the_traffic(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock = procs.mock()
    config = make_config(
        mock,
        auth={"keys": [{"tenant": "acme", "sha256": KEY_HASH}]},
        pricing={
            "gpt-4o-mini": {"input_usd_per_million": PRICE_IN, "output_usd_per_million": PRICE_OUT}
        },
        cache={"enabled": True},
    )
    worker_port = free_port()
    procs.worker(config, "--metrics-port", str(worker_port))
    ingress, found = procs.start(
        "ingress",
        python_cmd("ingress", "--config", str(config), "--port", "0"),
        r"listening on (http://\S+)",
        env={"LLM_BROKER_LOG_FORMAT": "json"},
    )
    url = found.group(1)
    secret_prompt = f"do not log me {secrets.token_hex(6)}"
    trace = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"

    tokens_in = tokens_out = 0
    request_ids: list[str] = []
    for i in range(3):
        headers = {**AUTH, "traceparent": trace} if i == 0 else AUTH
        async with http.post(
            f"{url}/v1/chat/completions",
            json=chat("gpt-4o-mini", content=f"{secret_prompt} {i}"),
            headers=headers,
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
            request_ids.append(resp.headers["X-Request-Id"])
        tokens_in += body["usage"]["prompt_tokens"]
        tokens_out += body["usage"]["completion_tokens"]
    async with http.post(
        f"{url}/v1/chat/completions",
        json=chat(
            "gpt-4o-mini", content="streamed", stream=True, stream_options={"include_usage": True}
        ),
        headers=AUTH,
    ) as resp:
        frames = [
            orjson.loads(line[6:])
            for line in (await resp.read()).decode().split("\n")
            if line.startswith("data: {")
        ]
    tokens_in += frames[-1]["usage"]["prompt_tokens"]
    tokens_out += frames[-1]["usage"]["completion_tokens"]
    # Two identical deterministic requests: a miss, then a hit.
    for _ in range(2):
        async with http.post(
            f"{url}/v1/chat/completions", json=chat("mock", temperature=0), headers=AUTH
        ) as resp:
            assert resp.status == 200
            cached_usage = (await resp.json())["usage"]
    async with http.post(
        f"{url}/v1/chat/completions", json=chat("mock-error-503"), headers=AUTH
    ) as resp:
        assert resp.status == 502
    async with http.post(
        f"{url}/v1/chat/completions", json=chat("no-such-model"), headers=AUTH
    ) as resp:
        assert resp.status == 404

    ing, ing_families = await scrape(http, f"{url}/metrics")
    # Requests by endpoint, model, provider and status.
    chat_ep = {"endpoint": "/v1/chat/completions"}
    assert (
        value(
            ing,
            "llm_broker_requests_total",
            **chat_ep,
            model="gpt-4o-mini",
            provider="mock",
            status="200",
        )
        == 4
    )
    assert (
        # A name matched by the wildcard route is counted under the route's name.
        value(ing, "llm_broker_requests_total", **chat_ep, model="mock*", status="502") == 1
    )
    assert value(ing, "llm_broker_request_duration_seconds_count", **chat_ep, provider="mock") == 7
    assert value(ing, "llm_broker_time_to_first_token_seconds_count", provider="mock") == 1
    # Errors by type and provider; cache hits and misses per model.
    # The upstream's error type is kept (the mock's 503 says "server_error").
    assert value(ing, "llm_broker_errors_total", type="server_error", provider="mock") == 1
    assert value(ing, "llm_broker_errors_total", type="invalid_request_error") == 1
    assert value(ing, "llm_broker_cache_requests_total", model="mock*", result="miss") == 1
    assert value(ing, "llm_broker_cache_requests_total", model="mock*", result="hit") == 1
    assert value(ing, "llm_broker_redis_command_duration_seconds_count", role="ingress") > 0
    for family in (
        "llm_broker_active_requests",
        "llm_broker_client_disconnects_total",
        "llm_broker_admission_rejections_total",
        "llm_broker_redis_errors_total",
    ):
        assert family in ing_families

    worker_url = f"http://127.0.0.1:{worker_port}/metrics"

    async def queue_exported() -> tuple[Samples, set[str]] | None:
        found = await scrape(http, worker_url)
        return (
            found
            if ("llm_broker_queue_depth", frozenset({("provider", "mock")})) in found[0]
            else None
        )

    wrk, wrk_families = await eventually(queue_exported, what="queue depth exported")
    # Tokens equal the mock's usage; cost is tokens times the configured price.
    mock_tokens = {"model": "gpt-4o-mini", "provider": "mock"}
    assert value(wrk, "llm_broker_tokens_total", **mock_tokens, type="input") == tokens_in
    assert value(wrk, "llm_broker_tokens_total", **mock_tokens, type="output") == tokens_out
    assert (
        value(wrk, "llm_broker_tokens_total", **mock_tokens, type="total") == tokens_in + tokens_out
    )
    cost = value(wrk, "llm_broker_cost_usd_total", **mock_tokens)
    assert cost == pytest.approx((tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6)
    # The cached call's tokens were spent once; a model without a price has no cost.
    assert (
        value(wrk, "llm_broker_tokens_total", model="mock*", type="input")
        == cached_usage["prompt_tokens"]
    )
    assert value(wrk, "llm_broker_cost_usd_total", model="mock*") == 0
    assert value(wrk, "llm_broker_upstream_errors_total", provider="mock", status="502") == 1
    assert value(wrk, "llm_broker_worker_jobs_total", provider="mock", outcome="completed") == 5
    # Six calls reached the worker: three plain, one stream, the cache miss, the error.
    assert value(wrk, "llm_broker_upstream_duration_seconds_count", provider="mock") == 6
    assert value(wrk, "llm_broker_queue_wait_seconds_count", provider="mock") == 6
    assert value(wrk, "llm_broker_queue_depth", provider="mock") == 0
    assert value(wrk, "llm_broker_queue_lag", provider="mock") == 0
    assert ("llm_broker_queue_pending", frozenset({("provider", "mock")})) in wrk
    assert value(wrk, "llm_broker_upstream_in_flight", provider="mock") == 0
    assert value(wrk, "llm_broker_redis_command_duration_seconds_count", role="worker") > 0
    for family in (
        "llm_broker_upstream_retries_total",
        "llm_broker_fallbacks_total",
        "llm_broker_upstream_aborted_total",
        "llm_broker_circuit_state",
    ):
        assert family in wrk_families

    # The client's trace context reached the upstream call.
    assert trace in (await mock_stats(http, mock))["traceparent_seen"]

    # One JSON line per request, with the request's facts and never its prompt.
    def request_lines() -> list[dict[str, Any]]:
        lines = []
        for line in ingress.output().splitlines():
            start = line.find("{")
            if start >= 0 and '"llm_broker.requests"' in line:
                lines.append(orjson.loads(line[start:]))
        return lines

    async def all_logged() -> list[dict[str, Any]] | None:
        lines = request_lines()
        return lines if len(lines) >= 8 else None

    lines = await eventually(all_logged, what="a log line per request")
    assert secret_prompt not in ingress.output()
    first = next(line for line in lines if line.get("request_id") == request_ids[0])
    assert first["tenant"] == "acme"
    assert (first["model"], first["provider"], first["status"]) == ("gpt-4o-mini", "mock", 200)
    assert first["latency_ms"] > 0
    assert first["trace_id"] == trace.split("-")[1]
    assert first["input_tokens"] > 0 and first["output_tokens"] > 0
    assert first["cost_usd"] == pytest.approx(
        (first["input_tokens"] * PRICE_IN + first["output_tokens"] * PRICE_OUT) / 1e6
    )
    assert sum(1 for line in lines if line.get("cache") == "hit") == 1
    missing = next(line for line in lines if line["status"] == 404)
    assert missing["error_type"] == "invalid_request_error"


async def test_spans_exported_over_otlp_continue_the_clients_trace(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    """With tracing on, ingress and worker export spans of the client's trace, and the
    upstream receives the worker span's context."""
    received: list[Any] = []

    async def collect(request: web.Request) -> web.Response:
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(content_type="application/x-protobuf", body=b"")

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        _, mock = procs.mock()
        config = make_config(mock, tracing={"otlp_endpoint": f"http://127.0.0.1:{port}/v1/traces"})
        fast_export = {"OTEL_BSP_SCHEDULE_DELAY": "100"}
        procs.start(
            "worker",
            python_cmd("worker", "--all", "--config", str(config)),
            r"worker ready",
            env=fast_export,
        )
        _, found = procs.start(
            "ingress",
            python_cmd("ingress", "--config", str(config), "--port", "0"),
            r"listening on (http://\S+)",
            env=fast_export,
        )
        trace_id = secrets.token_hex(16)
        client_span = secrets.token_hex(8)
        async with http.post(
            f"{found.group(1)}/v1/chat/completions",
            json=chat("mock"),
            headers={"traceparent": f"00-{trace_id}-{client_span}-01"},
        ) as resp:
            assert resp.status == 200

        def spans() -> dict[str, Any]:
            return {
                span.name: span
                for req in received
                for rs in req.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
            }

        async def both() -> dict[str, Any] | None:
            found = spans()
            return found if {"llm_broker.request", "llm_broker.upstream"} <= set(found) else None

        found_spans = await eventually(both, what="spans from ingress and worker")
        request_span = found_spans["llm_broker.request"]
        upstream_span = found_spans["llm_broker.upstream"]
        assert request_span.trace_id.hex() == trace_id
        assert request_span.parent_span_id.hex() == client_span
        assert upstream_span.trace_id.hex() == trace_id
        assert upstream_span.parent_span_id == request_span.span_id
        seen = (await mock_stats(http, mock))["traceparent_seen"]
        assert seen == [f"00-{trace_id}-{upstream_span.span_id.hex()}-01"]
    finally:
        await runner.cleanup()
