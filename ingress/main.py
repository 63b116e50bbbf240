"""The ingress process."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket

from aiohttp import web

from llm_broker.ingress.app import create_app, metrics
from llm_broker.ingress.dataplane import DataPlaneSite
from llm_broker.ingress.server import Runner, cut_off_reserve, drain
from llm_broker.ingress.state import STATE
from llm_broker.shared import logs
from llm_broker.shared.config import Config

log = logging.getLogger("llm_broker.ingress")


def pod_name(config: Config) -> str:
    """This process's reply stream name: the configured pod name (or the host
    name), made unique per process so that two processes never share a stream."""
    return f"{config.pod_name or socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def serve(
    config: Config, *, host: str | None = None, port: int | None = None, reuse_port: bool = False
) -> None:
    """Serve until SIGTERM/SIGINT; then fail /ready, stop accepting and drain.
    ``reuse_port``: share the port with the other processes of ``--processes N``."""
    host = host if host is not None else config.ingress.host
    port = port if port is not None else config.ingress.port
    app = create_app(config, pod_name(config))
    if not config.auth.keys and (config.auth.open or not config.auth.admin_keys):
        log.warning(
            "NO API KEYS CONFIGURED: ingress accepts every request without "
            "authentication. Add auth.keys to the config before exposing it."
        )
    runner = Runner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=cut_off_reserve(config.ingress) / 2,
        handler_cancellation=True,
    )
    await runner.setup()
    site_class = DataPlaneSite if config.ingress.fast_path else web.TCPSite
    site = site_class(
        runner, host, port, backlog=4096, reuse_address=True, reuse_port=reuse_port or None
    )
    await site.start()
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else host
    metrics_runner = None
    if config.ingress.metrics_port is not None:
        metrics_runner = await serve_metrics(app, host, config.ingress.metrics_port, reuse_port)
        metrics_bound = metrics_runner.addresses[0][1]
        logs.announce(f"ingress metrics on http://{shown}:{metrics_bound}/metrics")
    bound = runner.addresses[0][1] if runner.addresses else port
    logs.announce(f"ingress listening on http://{shown}:{bound}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await drain(runner, app)
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    log.info("ingress stopped")


async def serve_metrics(
    app: web.Application, host: str, port: int, reuse_port: bool = False
) -> web.AppRunner:
    """Serve ``app``'s /metrics alone on ``port`` (``ingress.metrics_port``)."""
    metrics_app = web.Application()
    metrics_app[STATE] = app[STATE]
    metrics_app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(metrics_app, handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, reuse_address=True, reuse_port=reuse_port or None).start()
    return runner
