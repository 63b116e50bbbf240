"""Health and metrics ports: ingress's separate /metrics port
(``ingress.metrics_port``), and the worker's and webhooks' /health, answered
from the event loop with its lag."""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from yarl import URL

from llm_broker.dev import free_port
from llm_broker.procs import python_cmd
from llm_broker.shared.config import new_key
from llm_broker.shared.health import health_app
from tests.conftest import ConfigFactory, Procs

#: Nothing listens here: these tests never reach an upstream.
NO_UPSTREAM = "http://127.0.0.1:9"


def _keys() -> dict[str, object]:
    _key, digest = new_key()
    return {"keys": [{"tenant": "acme", "sha256": digest}]}


async def test_ingress_serves_metrics_only_on_its_metrics_port(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    config = make_config(NO_UPSTREAM, auth=_keys(), ingress={"metrics_port": 0})
    child, found = procs.start(
        "ingress",
        python_cmd("ingress", "--config", str(config), "--port", "0"),
        r"ingress metrics on (http://\S+)",
    )
    metrics_url = found.group(1)
    base = child.wait_for(r"listening on (http://\S+)").group(1)
    assert URL(metrics_url).port != URL(base).port

    async with http.get(metrics_url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert "llm_broker_requests_total" in await resp.text()
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with http.get(f"{base}/openapi.json") as resp:
        assert "/metrics" not in (await resp.json())["paths"]
    async with http.get(f"{base}/health") as resp:
        assert resp.status == 200
    # The main port's requests are counted on the metrics port.
    async with http.get(metrics_url) as resp:
        assert 'endpoint="/health"' in await resp.text()


async def test_ingress_without_metrics_port_serves_metrics_on_the_api_port(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    config = make_config(NO_UPSTREAM, auth=_keys())
    child, found = procs.start(
        "ingress",
        python_cmd("ingress", "--config", str(config), "--port", "0"),
        r"listening on (http://\S+)",
    )
    async with http.get(f"{found.group(1)}/metrics") as resp:
        assert resp.status == 200
        assert "llm_broker_requests_total" in await resp.text()
    assert "ingress metrics on" not in child.output()


@pytest.mark.parametrize("role", ["worker", "webhooks"])
async def test_background_process_health_reports_loop_lag(
    role: str, procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    config = make_config(NO_UPSTREAM)
    port = free_port()
    if role == "worker":
        procs.worker(config, "--metrics-port", str(port))
    else:
        procs.webhooks(config, "--metrics-port", str(port))
    async with http.get(f"http://127.0.0.1:{port}/health") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["status"] == "ok"
    assert 0 <= body["loop_lag_s"] < 1 and body["loop_lag_max_s"] >= body["loop_lag_s"]
    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert f'llm_broker_event_loop_lag_seconds{{role="{role}"}}' in text
    assert "# TYPE llm_broker_redis_errors_total counter" in text


@pytest.fixture
async def health_url() -> AsyncIterator[str]:
    runner = web.AppRunner(health_app(CollectorRegistry(), "worker"))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/health"
    await runner.cleanup()


async def test_health_times_out_while_the_event_loop_is_blocked(
    health_url: str, http: aiohttp.ClientSession
) -> None:
    async with http.get(health_url) as resp:
        assert resp.status == 200
        assert (await resp.json())["loop_lag_max_s"] < 1.0

    gave_up = threading.Event()

    def probe() -> str:
        """What a kubelet with timeoutSeconds: 1 sees."""
        try:
            with urllib.request.urlopen(health_url, timeout=1.0) as resp:
                return f"answered {resp.status}"
        except (TimeoutError, urllib.error.URLError):
            return "timed out"
        finally:
            gave_up.set()

    outcome = asyncio.get_running_loop().run_in_executor(None, probe)
    # A handler that never yields: the loop is hung until the probe has given up.
    assert gave_up.wait(timeout=10)
    assert await outcome == "timed out"

    async with http.get(health_url) as resp:
        body = await resp.json()
    # The loop hung for the probe's 1 s timeout; the timer it was late for was
    # due up to one measuring interval (0.25 s) into that.
    assert body["loop_lag_max_s"] >= 0.7, body


async def test_health_fails_while_the_loop_runs_late(
    health_url: str, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("llm_broker.shared.health.MAX_LAG_S", 0.3)
    gave_up = threading.Event()
    gave_up.wait(timeout=0.6)  # the loop hangs for 0.6 s, longer than the limit
    async with http.get(health_url) as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["status"] == "event loop lagging" and body["loop_lag_s"] >= 0.3
