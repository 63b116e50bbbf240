"""The ``llm-broker`` command: dev, ingress, worker, webhooks, mock-upstream, keygen,
check-config."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Coroutine
from typing import Any

from llm_broker.shared import logs
from llm_broker.shared.config import Config, ConfigError, load_config, new_key, new_webhook_secret


def _run(coro: Coroutine[Any, Any, None]) -> None:
    # Objects alive at start-up (modules, config) never become garbage: keep
    # them out of collections, and collect young objects less often, so that a
    # burst of requests is not paused by full collections.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config, os.environ)


def cmd_ingress(args: argparse.Namespace) -> int:
    from llm_broker.ingress.main import serve

    config = _config(args)
    keyed = config.auth.keys or config.auth.admin_keys
    if not keyed and not (config.auth.open or args.open):
        print(
            "llm-broker ingress: no API keys are configured, and ingress does not serve "
            "without authentication unless told to.\n"
            "  Add a key: `llm-broker keygen --tenant NAME` prints a key and the "
            "auth.keys entry (its SHA-256) to put in the config, or `--admin` an\n"
            "  auth.admin_keys entry, to create keys at run time with the admin API;\n"
            "  or serve without authentication: set `auth: {open: true}` in the config.",
            file=sys.stderr,
        )
        return 2
    if args.processes > 1:
        from llm_broker.supervise import Supervisor, child_argv, reserve_port

        host = args.host if args.host is not None else config.ingress.host
        port = args.port if args.port is not None else config.ingress.port
        held, port = reserve_port(host, port)  # the same port for every process
        with held:
            print(f"ingress: {args.processes} processes on port {port}", flush=True)
            argv = child_argv(args.argv, processes=1, port=port, reuse_port=True)
            return Supervisor(argv, args.processes).run()
    _run(serve(config, host=args.host, port=args.port, reuse_port=args.reuse_port))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from llm_broker.workers.main import serve

    config = _config(args)
    providers = list(config.providers) if args.all else list(dict.fromkeys(args.provider or []))
    if not providers:
        print("worker: name --provider NAME (repeatable) or --all", file=sys.stderr)
        return 2
    unknown = [p for p in providers if p not in config.providers]
    if unknown:
        print(f"worker: unknown provider(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.processes > 1:
        from llm_broker.supervise import Supervisor, child_argv

        print(f"worker: {args.processes} processes", flush=True)
        argv = child_argv(args.argv, processes=1, reuse_port=True)
        return Supervisor(argv, args.processes).run()
    _run(serve(config, providers, metrics_port=args.metrics_port, reuse_port=args.reuse_port))
    return 0


def cmd_webhooks(args: argparse.Namespace) -> int:
    from llm_broker.workers.webhooks import serve

    _run(serve(_config(args), metrics_port=args.metrics_port))
    return 0


def cmd_mock(args: argparse.Namespace) -> int:
    from llm_broker.mock.server import main as mock_main

    return mock_main(args.rest, prog="llm-broker mock-upstream")


def cmd_dev(args: argparse.Namespace) -> int:
    from llm_broker.dev import run_dev

    return run_dev(host=args.host, port=args.port, config_path=args.config, env=os.environ)


def cmd_keygen(args: argparse.Namespace) -> int:
    key, digest = new_key()
    print(f"key:    {key}")
    print("config: add under auth.keys:")
    print(f"  - tenant: {args.tenant}")
    print(f"    sha256: {digest}")
    return 0


def cmd_webhook_secret(args: argparse.Namespace) -> int:
    print(new_webhook_secret())
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _config(args)
    print(
        f"config ok: {len(config.providers)} provider(s), {len(config.models)} model route(s), "
        f"{len(config.auth.keys)} API key(s)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-broker", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("LLM_BROKER_LOG_LEVEL", "info"))
    parser.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("LLM_BROKER_LOG_FORMAT", "text"),
        help="text, or one JSON object per line (default: $LLM_BROKER_LOG_FORMAT or text)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def with_processes(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--processes",
            type=int,
            default=1,
            help="run this many processes (one per core), sharing the port and the metrics",
        )
        # Set by the supervisor of --processes N for each of its processes.
        p.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="YAML config file (default: $LLM_BROKER_CONFIG)")
        return p

    p = with_config(
        sub.add_parser(
            "dev", help="run everything locally: Redis, ingress, workers and the mock provider"
        )
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1 only)"
    )
    p.set_defaults(func=cmd_dev)

    p = with_config(sub.add_parser("ingress", help="run the HTTP ingress"))
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument(
        "--open",
        action="store_true",
        help="serve without authentication when the config has no keys (auth.open)",
    )
    with_processes(p)
    p.set_defaults(func=cmd_ingress)

    p = with_config(sub.add_parser("worker", help="run provider worker pools"))
    p.add_argument("--provider", action="append", help="provider to serve (repeatable)")
    p.add_argument("--all", action="store_true", help="serve every configured provider")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    with_processes(p)
    p.set_defaults(func=cmd_worker)

    p = with_config(sub.add_parser("webhooks", help="deliver webhooks (an arq worker)"))
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.set_defaults(func=cmd_webhooks)

    # The mock's own parser reads its options (and --help): the production roles
    # never import the mock.
    p = sub.add_parser(
        "mock-upstream", help="run the mock OpenAI-compatible upstream", add_help=False
    )
    p.set_defaults(func=cmd_mock)

    p = sub.add_parser("keygen", help="print a new API key and the config entry for its hash")
    p.add_argument("--tenant", default="default")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("webhook-secret", help="print a new webhook signing secret")
    p.set_defaults(func=cmd_webhook_secret)

    p = with_config(sub.add_parser("check-config", help="validate a config file"))
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if getattr(args, "processes", 1) < 1:
        parser.error("--processes must be at least 1")
    if args.command == "mock-upstream":
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logs.setup(args.log_level, args.log_format)
    try:
        result: int = args.func(args)
    except ConfigError as e:
        print(f"llm-broker: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    raise SystemExit(main())
