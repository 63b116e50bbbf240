"""The metrics port of the worker and webhooks processes: ``/metrics`` and ``/health``.

Both are answered from the process's event loop (not from a thread of their
own), so a loop that hangs fails the liveness probe by timing out, and a loop
that runs late answers ``/health`` with 503 and its lag.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge

from llm_broker.shared.loop import LoopRef
from llm_broker.shared.metrics import exposition, loop_lag

#: /health fails while the loop wakes a timer later than this.
MAX_LAG_S = 5.0
#: The worst lag of this many recent seconds is reported as ``loop_lag_max_s``.
LAG_WINDOW_S = 60.0


class LoopLag:
    """How late the event loop wakes a task sleeping ``interval_s``: its lag."""

    def __init__(self, interval_s: float = 0.25, gauge: Gauge | None = None) -> None:
        self.interval_s = interval_s
        self._gauge = gauge
        self._last_s = 0.0
        self._due = 0.0
        self._worst: list[tuple[float, float]] = []  # (when, lag), a lag above every later one
        self._loop = LoopRef()

    def now_s(self) -> float:
        """The current lag: the last one measured, or longer if the next wake is overdue."""
        overdue = self._loop().time() - self._due if self._due else 0.0
        return max(self._last_s, overdue)

    def max_s(self) -> float:
        """The worst lag of the last ``LAG_WINDOW_S`` seconds, the current one included."""
        since = self._loop().time() - LAG_WINDOW_S
        return max([lag for when, lag in self._worst if when >= since] + [self.now_s()])

    async def run(self) -> None:
        loop = self._loop()
        while True:
            self._due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)  # the lag is how late this wakes
            now = loop.time()
            self._last_s = max(0.0, now - self._due)
            while self._worst and self._worst[-1][1] <= self._last_s:
                self._worst.pop()
            self._worst.append((now, self._last_s))
            while self._worst[0][0] < now - LAG_WINDOW_S:
                self._worst.pop(0)
            if self._gauge is not None:
                self._gauge.set(self._last_s)


LAG = web.AppKey("lag", LoopLag)
REGISTRY = web.AppKey("registry", CollectorRegistry)


async def _health(request: web.Request) -> web.Response:
    lag = request.app[LAG]
    now = lag.now_s()
    body = {
        "status": "ok" if now <= MAX_LAG_S else "event loop lagging",
        "loop_lag_s": round(now, 4),
        "loop_lag_max_s": round(lag.max_s(), 4),
    }
    return web.json_response(body, status=200 if now <= MAX_LAG_S else 503)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=exposition(request.app[REGISTRY]), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


async def _measure(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.get_running_loop().create_task(app[LAG].run())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def health_app(registry: CollectorRegistry, role: str) -> web.Application:
    """``/metrics`` of ``registry`` and ``/health`` with the loop's lag, which is
    also exported as ``llm_broker_event_loop_lag_seconds{role}``."""
    app = web.Application()
    app[LAG] = LoopLag(gauge=loop_lag(registry).labels(role))
    app[REGISTRY] = registry
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.cleanup_ctx.append(_measure)
    return app


async def serve_health(
    registry: CollectorRegistry,
    role: str,
    port: int,
    host: str = "0.0.0.0",
    *,
    reuse_port: bool = False,
) -> web.AppRunner:
    """Start :func:`health_app` on ``host:port``; ``cleanup()`` the runner to stop it.
    ``reuse_port``: share the port with the other processes of ``--processes N``."""
    runner = web.AppRunner(health_app(registry, role), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None)
    await site.start()
    return runner
