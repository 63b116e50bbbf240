"""``llm-broker dev``: Redis, the mock provider, a worker and ingress in one command."""

from __future__ import annotations

import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from llm_broker.procs import Child, python_cmd
from llm_broker.shared.config import load_config, new_key, new_webhook_secret


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def dev_config(mock_url: str, webhook_secret_file: str, admin_sha256: str) -> dict[str, Any]:
    """The default dev config: open (no API keys; one admin key, made for this run,
    for the admin API), every ``mock*`` and two familiar
    names routed to the mock provider, a Claude name to the same mock spoken to
    in Anthropic's format, room for hundreds of concurrent calls, the response
    cache on, webhooks signed with a secret made for this run (to public
    addresses only)."""
    roomy = {"max_concurrency": 1024, "max_queue_depth": 100_000}
    return {
        "auth": {"open": True, "admin_keys": [{"name": "dev", "sha256": admin_sha256}]},
        "webhooks": {"secret_file": webhook_secret_file},
        "providers": {
            "mock": {"type": "mock", "base_url": mock_url, **roomy},
            "mock-anthropic": {"type": "anthropic", "base_url": mock_url, **roomy},
        },
        "models": {
            "mock*": {"provider": "mock"},
            "gpt-4o-mini": {"provider": "mock", "model": "mock"},
            "gpt-4o": {"provider": "mock", "model": "mock-chunks-32"},
            "claude-sonnet-4-5": {"provider": "mock-anthropic", "model": "mock"},
        },
        "cache": {"enabled": True},
        "ingress": {"drain_s": 5},
        "worker": {"grace_period_s": 5, "lease_s": 15},
    }


class _EmbeddedRedis:
    """A fakeredis TCP server in a thread, for machines without ``redis-server``."""

    def __init__(self) -> None:
        from fakeredis import TcpFakeServer

        self.port = free_port()
        self._server = TcpFakeServer(("127.0.0.1", self.port), server_type="redis")
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def run_dev(
    *, host: str = "127.0.0.1", port: int, config_path: str | None, env: Mapping[str, str]
) -> int:
    children: list[Child] = []
    embedded: _EmbeddedRedis | None = None
    tmp = Path(tempfile.mkdtemp(prefix="llm-broker-dev-"))
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    config_path = config_path or env.get("LLM_BROKER_CONFIG") or None
    child_env = {k: v for k, v in env.items() if k != "LLM_BROKER_CONFIG"}
    child_env["PYTHONUNBUFFERED"] = "1"
    try:
        redis_url = env.get("REDIS_URL")
        if redis_url:
            where = f"REDIS_URL ({redis_url})"
        elif shutil.which("redis-server"):
            rport = free_port()
            redis = Child(
                "redis",
                [
                    "redis-server",
                    "--port",
                    str(rport),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(tmp),
                ],
            )
            children.append(redis)
            redis.wait_for(r"Ready to accept connections", 15)
            redis_url = f"redis://127.0.0.1:{rport}/0"
            where = f"redis-server on port {rport}"
        else:
            embedded = _EmbeddedRedis()
            redis_url = f"redis://127.0.0.1:{embedded.port}/0"
            where = (
                f"embedded Redis (fakeredis) on port {embedded.port}; install redis-server "
                "for real throughput"
            )
        child_env["REDIS_URL"] = redis_url

        admin_key = ""
        if config_path:
            cfg_file = Path(config_path)
        else:
            admin_key, admin_sha256 = new_key()
            mock = Child("mock", python_cmd("mock-upstream", "--port", "0"), child_env, echo=True)
            children.append(mock)
            mock_port = mock.wait_for(r"listening on http://[\d.]+:(\d+)", 30).group(1)
            secret_file = tmp / "webhook-secret"
            secret_file.write_text(new_webhook_secret())
            cfg_file = tmp / "dev-config.yaml"
            cfg_file.write_text(
                yaml.safe_dump(
                    dev_config(f"http://127.0.0.1:{mock_port}/v1", str(secret_file), admin_sha256),
                    sort_keys=False,
                )
            )
        config = load_config(str(cfg_file), child_env)

        worker = Child(
            "worker", python_cmd("worker", "--all", "--config", str(cfg_file)), child_env, echo=True
        )
        children.append(worker)
        ingress = Child(
            "ingress",
            python_cmd(
                "ingress", "--config", str(cfg_file), "--host", host, "--port", str(port), "--open"
            ),
            child_env,
            echo=True,
        )
        children.append(ingress)
        if embedded is None:
            webhooks = Child(
                "webhooks", python_cmd("webhooks", "--config", str(cfg_file)), child_env, echo=True
            )
            children.append(webhooks)
            webhooks.wait_for(r"webhooks ready", 30)
            webhook_line = "webhooks: delivered by an arq worker"
            if config.webhooks.secret_file:
                webhook_line += f" (signing secret in {config.webhooks.secret_file})"
        else:
            # arq needs Redis's INFO command, which the embedded Redis lacks.
            webhook_line = "webhooks: not delivered on the embedded Redis (install redis-server)"
        worker.wait_for(r"worker ready", 30)
        url = ingress.wait_for(r"listening on (http://\S+)", 30).group(1)
        model = next((n for n in config.models if not n.endswith("*")), "mock")
        admin_line = ""
        if admin_key:
            admin_line = (
                f"\n  admin:    export LLM_BROKER_URL={url} LLM_BROKER_ADMIN_KEY={admin_key}\n"
                "            then `llm-broker tenants create acme` and "
                "`llm-broker keys create --tenant acme` (docs/accounts.md)\n"
            )
        print(
            f"""
llm-broker dev is running
  gateway:  {url}   (OpenAI-compatible: {url}/v1)
  redis:    {where}
  models:   {", ".join(config.models)}
  {webhook_line}
{admin_line}
  curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello"}}]}}'

Ctrl-C stops everything.
""",
            flush=True,
        )
        while not stop.wait(0.5):
            dead = [c for c in children if c.proc.poll() is not None]
            if dead:
                print(
                    f"llm-broker dev: {dead[0].name} exited with {dead[0].proc.returncode}; "
                    "stopping",
                    file=sys.stderr,
                    flush=True,
                )
                return 1
        return 0
    finally:
        for child in reversed(children):
            child.stop(timeout=10)
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        print("llm-broker dev stopped", flush=True)
