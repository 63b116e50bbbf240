"""The operator's console in a real browser: headless Chromium (Debian's package),
driven by Playwright with the system browser, against ``llm-broker dev`` with
traffic running. It logs in, visits every page (no console errors, charts drawn,
a screenshot of each saved under ``test-artifacts/console/``, or
``$LLM_BROKER_TEST_ARTIFACTS/console/``), replays a dead-lettered job and sees it
complete, revokes a key and sees its next request fail, and measures what one open
console costs Redis (``INFO commandstats`` with and without it)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from llm_broker.dev import free_port
from llm_broker.procs import python_cmd
from tests.conftest import ConfigFactory, Procs, RedisServer, chat
from tests.helpers import eventually, wait_status
from tests.test_console import ADMIN, ADMIN_KEY, USER, _config, _poison

playwright_api = pytest.importorskip("playwright.async_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
    pytest.mark.timeout(240),
]

ARTIFACTS = Path(
    os.environ.get("LLM_BROKER_TEST_ARTIFACTS") or Path(__file__).parent.parent / "test-artifacts"
)
PAGES = ["overview", "workers", "jobs", "dead-letters", "tenants", "batches"]
#: What one open console may cost Redis (the issue's bound).
MAX_CONSOLE_COMMANDS_PER_S = 50


async def _commands(client: aioredis.Redis) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


async def _rate(client: aioredis.Redis, seconds: float) -> float:
    """Redis commands per second over ``seconds`` (a measurement window)."""
    before = await _commands(client)
    began = time.monotonic()
    await asyncio.sleep(seconds)  # the window being measured, not synchronisation
    return (await _commands(client) - before) / (time.monotonic() - began)


@contextlib.asynccontextmanager
async def _traffic(url: str) -> AsyncIterator[list[int]]:
    """Chat calls, one after another, until the block ends (at most 20,000)."""
    statuses: list[int] = []
    stop = asyncio.Event()

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            for n in range(20_000):
                if stop.is_set():
                    return
                async with http.post(
                    f"{url}/v1/chat/completions",
                    json=chat("mock-latency-50", f"traffic {n}"),
                    headers=USER,
                ) as r:
                    statuses.append(r.status)

    task = asyncio.create_task(run())
    try:
        yield statuses
    finally:
        stop.set()
        await task


async def test_an_operator_uses_the_console_in_a_browser(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
    redis_up: RedisServer,
) -> None:
    out = ARTIFACTS / "console"
    out.mkdir(parents=True, exist_ok=True)
    _, mock_url = procs.mock()
    config = _config(
        make_config,
        mock_url,
        # The poisoned job's lease runs out 2 s after the worker starts; a shorter one
        # can lapse for a live call while the browser loads the machine, and that
        # call, delivered again, would be one dead letter too many.
        worker={"lease_s": 2, "max_deliveries": 1, "heartbeat_s": 1},
    )
    dead_job, _ = await _poison(rclient, prefix, "a poisoned request")
    port = free_port()
    procs.start(
        "dev",
        python_cmd("dev", "--config", str(config), "--port", str(port)),
        r"llm-broker dev is running",
        # dev starts a Redis of its own unless REDIS_URL names one: the test's.
        env={"REDIS_URL": redis_up.url},
        timeout=60,
    )
    url = f"http://127.0.0.1:{port}"
    await wait_status(rclient, prefix, dead_job, "failed")
    async with http.get(f"{url}/admin/api/dead-letters?provider=mock", headers=ADMIN) as r:
        (letter,) = (await r.json())["entries"]
    async with http.post(f"{url}/admin/v1/tenants", json={"name": "acme"}, headers=ADMIN) as r:
        assert r.status == 201, await r.text()
    async with http.post(
        f"{url}/admin/v1/keys", json={"tenant": "acme", "name": "doomed"}, headers=ADMIN
    ) as r:
        doomed = await r.json()
    doomed_auth = {"Authorization": f"Bearer {doomed['key']}"}
    async with http.post(f"{url}/v1/chat/completions", json=chat(), headers=doomed_auth) as r:
        assert r.status == 200

    errors: list[str] = []
    async with playwright_api.async_playwright() as pw, _traffic(url) as statuses:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            page = await context.new_page()

            def on_console(msg: Any) -> None:
                if msg.type == "error":
                    errors.append(f"{msg.type}: {msg.text}")

            page.on("console", on_console)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))

            async def shown(name: str) -> None:
                await page.wait_for_selector(f'#page[data-page="{name}"][data-loaded="1"]')

            # Log in.
            response = await page.goto(f"{url}/admin/login")
            assert response is not None and response.status == 200
            await page.screenshot(path=out / "login.png")
            await page.fill("#key", ADMIN_KEY)
            await page.click("#login-submit")
            await shown("overview")

            # Every page, with traffic running.
            for name in PAGES:
                await page.click(f'a[data-page="{name}"]')
                await shown(name)
                if name == "overview":
                    await page.wait_for_selector(
                        'svg.chart[data-chart="throughput"] path.series[data-series="mock"]'
                    )
                    d = await page.get_attribute(
                        'svg.chart[data-chart="throughput"] path.series[data-series="mock"]', "d"
                    )
                    assert d and len(d) > 10, d
                if name == "workers":
                    await page.wait_for_selector("#page table tbody tr")
                if name == "tenants":
                    for chart in ("spend", "models"):
                        await page.wait_for_selector(f'svg.chart[data-chart="{chart}"]')
                await page.screenshot(path=out / f"{name}.png", full_page=True)

            # Replay the dead letter; its new job completes.
            await page.click('a[data-page="dead-letters"]')
            await shown("dead-letters")
            row = f'tr[data-entry="{letter["id"]}"]'
            await page.click(f'{row} button[data-action="replay"]')
            await page.click("#confirm-ok")
            await page.wait_for_selector("#toast")

            async def replayed() -> str | None:
                async with http.get(
                    f"{url}/admin/api/dead-letters?provider=mock", headers=ADMIN
                ) as r:
                    (entry,) = (await r.json())["entries"]
                    return entry["replayed_as"]  # type: ignore[no-any-return]

            new_job = await eventually(replayed, what="the replay")
            await wait_status(rclient, prefix, new_job, "completed")
            await page.goto(f"{url}/admin/#/jobs/{new_job}")
            await shown("jobs")
            await page.wait_for_selector('#page:has-text("completed")')
            await page.screenshot(path=out / "job-replayed.png", full_page=True)

            # Revoke a key; its next request fails.
            await page.click('a[data-page="tenants"]')
            await shown("tenants")
            await page.click('tr[data-tenant="acme"]')
            await page.wait_for_selector('svg.chart[data-chart="keys"] path.series')
            await page.click(f'button[data-action="revoke"][data-key="{doomed["id"]}"]')
            await page.click("#confirm-ok")

            async def refused() -> bool:
                async with http.post(
                    f"{url}/v1/chat/completions", json=chat(), headers=doomed_auth
                ) as r:
                    return r.status == 401

            await eventually(refused, what="the revoked key to be refused")
            await page.screenshot(path=out / "tenants.png", full_page=True)

            # Dark and light, and a phone's width.
            for theme in ("dark", "light"):
                await page.emulate_media(color_scheme=theme)
                await page.goto(f"{url}/admin/#/overview")
                await shown("overview")
                await page.evaluate("localStorage.clear()")
                await page.screenshot(path=out / f"overview-{theme}.png")
            await page.set_viewport_size({"width": 390, "height": 844})
            await page.goto(f"{url}/admin/#/overview")
            await shown("overview")
            await page.screenshot(path=out / "overview-phone.png", full_page=True)
            width = await page.evaluate("document.documentElement.scrollWidth")
            assert width <= 400, f"the page is {width}px wide at a phone's 390px"
        finally:
            await browser.close()
    assert errors == [], errors
    assert statuses and set(statuses) == {200}, set(statuses)

    # What one open console costs Redis: with the traffic stopped, the idle broker
    # alone, then with the overview open and polling.
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = await browser.new_context()
            page = await context.new_page()
            idle = await _rate(rclient, 8)
            await page.goto(f"{url}/admin/login")
            await page.fill("#key", ADMIN_KEY)
            await page.click("#login-submit")
            await page.wait_for_selector('#page[data-page="overview"][data-loaded="1"]')
            with_console = await _rate(rclient, 10)
        finally:
            await browser.close()
    cost = with_console - idle
    print(
        f"\nconsole: Redis {idle:.1f} commands/s idle, {with_console:.1f} with the overview "
        f"open: {cost:.1f} commands/s for the console; screenshots in {out}"
    )
    assert cost < MAX_CONSOLE_COMMANDS_PER_S, (idle, with_console)
