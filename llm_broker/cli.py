"""The ``llm-broker`` command: dev, ingress, worker, webhooks, mock-upstream, keygen,
check-config; and keys, tenants, usage and audit, which call a running broker's admin
API."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any

from llm_broker.shared import logs
from llm_broker.shared.config import (
    PRIORITIES,
    Config,
    ConfigError,
    load_config,
    new_key,
    new_webhook_secret,
)

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.text import Text

    from llm_broker.admin_client import AdminClient


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


#: A YAML value written as it is (anything else is written quoted, as JSON).
_PLAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@/-]*")


def cmd_keygen(args: argparse.Namespace) -> int:
    key, digest = new_key()
    print(f"key:    {key}")
    if args.admin is not None:
        if not 0 < len(args.admin) <= 128:
            print("llm-broker keygen: --admin NAME is 1 to 128 characters", file=sys.stderr)
            return 2
        name = args.admin if _PLAIN.fullmatch(args.admin) else json.dumps(args.admin)
        print("config: add under auth.admin_keys (a key for the admin API only):")
        print(f"  - name: {name}")
    else:
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


# ------------------------------------------------------------------ admin commands
#
# keys, tenants, usage and audit call a running broker's admin API (/admin/v1)
# through llm_broker.admin_client (standard library only); rich draws their tables.
# Both are imported when one of these commands runs, never by the roles.

ADMIN_URL_ENV = "LLM_BROKER_URL"
ADMIN_KEY_ENV = "LLM_BROKER_ADMIN_KEY"
GROUPS = ("day", "tenant", "key", "model")
LIMITS = ("rpm", "tpm", "max_in_flight", "max_queued")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")


class UsageError(Exception):
    """A command line that cannot be carried out as given (exit status 2)."""


def duration(text: str) -> float:
    """Seconds from ``90`` (seconds), ``45s``, ``30m``, ``1h30m``, ``30d`` or ``2w``."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        if not _DURATION.fullmatch(value):
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a duration: seconds, or e.g. 90s, 30m, 1h30m, 12h, 30d, 2w"
            ) from None
        seconds = sum(
            float(n) * _UNITS[unit] for n, unit in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", value)
        )
    if not 0 <= seconds < 1e10:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration of 0 or more")
    return seconds


def timestamp(text: str) -> float:
    """A Unix time from an ISO 8601 date or time (UTC unless it names an offset)."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time, e.g. 2026-12-31 or 2026-12-31T18:00:00+01:00"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def day(text: str) -> str:
    """A day as the usage API takes it: ``YYYY-MM-DD``; also ``today``, ``yesterday``."""
    now = time.time()
    named = {"today": now, "yesterday": now - 86400}
    if text in named:
        return time.strftime("%Y-%m-%d", time.gmtime(named[text]))
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day: YYYY-MM-DD (UTC)") from None


def group_by(text: str) -> str:
    groups = [g.strip() for g in text.split(",") if g.strip()]
    if not groups or any(g not in GROUPS for g in groups) or len(set(groups)) != len(groups):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma-separated list of {', '.join(GROUPS)}, each at most once"
        )
    return ",".join(groups)


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 0 or more")
    return value


def page_size(text: str) -> int:
    value = count(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not from 1 to 1000")
    return value


def usd(text: str) -> float:
    try:
        value = float(text.strip().removeprefix("$"))
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1e9:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of US dollars (0 to 1e9)")
    return value


def metadata_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return name, value


# ------------------------------------------------------------ rendering


def _show(*things: RenderableType | _Table | None, stream: Any = None) -> None:
    """Print tables and lines (None: an empty line) on stdout, or ``stream``. On a
    terminal (or with $COLUMNS set): colours, and tables fit its width. Piped: plain
    text, tables at their full width (nothing cut or wrapped), no trailing blanks."""
    from rich.console import Console

    out = stream if stream is not None else sys.stdout
    piped = not out.isatty() and "COLUMNS" not in os.environ
    console = Console(file=out, width=10_000 if piped else None, highlight=False)
    shown = [
        "" if thing is None else thing.fit(console) if isinstance(thing, _Table) else thing
        for thing in things
    ]
    if not piped:
        for thing in shown:
            console.print(thing)
        return
    with console.capture() as captured:
        for thing in shown:
            console.print(thing)
    out.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
    out.flush()


def _text(value: object, style: str = "") -> Text:
    """A cell shown as it is: never read as rich markup (names come from users)."""
    from rich.text import Text

    return Text("-" if value is None or value == "" else str(value), style=style)


def _when(t: float | None, short: bool = False) -> str:
    """A time in UTC; ``short``: to the minute (in tables)."""
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%MZ" if short else "%Y-%m-%d %H:%M:%SZ", time.gmtime(t))


def _money(x: float) -> str:
    """Dollars: to the cent, or two significant digits below a cent ($0.0012)."""
    if x == 0 or abs(x) >= 0.01:
        return f"${x:,.2f}"
    places = min(9, 1 - math.floor(math.log10(abs(x))))
    return f"${x:.{places}f}"


def _limits_text(limits: Mapping[str, int] | None) -> str:
    """``rpm 100, max-in-flight 4``: the limits set (the API leaves out those at 0)."""
    given = limits or {}
    return ", ".join(f"{n.replace('_', '-')} {given[n]}" for n in LIMITS if given.get(n)) or "-"


def _budget_text(budget: Mapping[str, Any] | None) -> str:
    return "-" if not budget else f"{_money(budget['usd'])} {budget['period']}"


def _spend_text(spend: Mapping[str, Any] | None) -> str:
    if not spend:
        return "-"
    text = f"{_money(spend['usd'])} ({_money(spend['remaining_usd'])} left)"
    return text + ", resets " + (_when(spend["resets_at"]) if spend.get("resets_at") else "never")


def _budget_cell(record: Mapping[str, Any]) -> str:
    """A budget and what its period has spent, in a table: ``$0.42 of $5.00 monthly``."""
    budget, spend = record.get("budget"), record.get("spend")
    if not budget:
        return "-"
    spent = f"{_money(spend['usd'])} of " if spend else ""
    return spent + _budget_text(budget)


_STATUS_STYLE = {"active": "green", "revoked": "red", "expired": "yellow"}


class _Table:
    """Rows to draw as a table. On a terminal too narrow for all of it, the columns
    named in ``spare`` are left out, in that order, while it does not fit; what is
    left wraps (the first column, which names the row, never does). Piped, it is
    drawn whole."""

    def __init__(
        self,
        *columns: str,
        right: Iterable[str] = (),
        spare: Iterable[str] = (),
        title: str | None = None,
    ) -> None:
        self.columns = columns
        self.right = frozenset(right)
        self.spare = tuple(spare)
        self.title = title
        self.rows: list[tuple[Text, ...]] = []
        self.total: tuple[Text, ...] | None = None

    def add(self, *cells: Text) -> None:
        self.rows.append(cells)

    def rich(self, shown: Iterable[str]) -> Any:
        from rich import box
        from rich.table import Table

        which = [i for i, name in enumerate(self.columns) if name in set(shown)]
        table = Table(
            box=box.SIMPLE_HEAD,
            header_style="bold",
            show_edge=False,
            pad_edge=False,
            title=self.title,
        )
        for i in which:
            name = self.columns[i]
            table.add_column(
                name,
                justify="right" if name in self.right else "left",
                no_wrap=i == 0,
                overflow="fold",
            )
        for n, row in enumerate(self.rows):
            last = n == len(self.rows) - 1 and self.total is not None
            table.add_row(*(row[i] for i in which), end_section=last)
        if self.total is not None:
            table.add_row(*(self.total[i] for i in which))
        return table

    def fit(self, console: Console) -> Any:
        from rich.measure import Measurement

        unbounded = console.options.update_width(1_000_000)
        shown = list(self.columns)
        table = self.rich(shown)
        for name in self.spare:
            if Measurement.get(console, unbounded, table).maximum <= console.width:
                break
            shown.remove(name)
            table = self.rich(shown)
        return table


def _details(rows: Iterable[tuple[str, RenderableType]]) -> Any:
    """One record, a field a line."""
    from rich.table import Table

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in rows:
        grid.add_row(_text(name, "bold"), value)
    return grid


def _key_status(key: Mapping[str, Any]) -> Text:
    return _text(key["status"], _STATUS_STYLE.get(key["status"], ""))


def _key_owner(key: Mapping[str, Any]) -> str:
    return "(admin)" if key.get("admin") else key["tenant"]


def _key_details(key: Mapping[str, Any]) -> Any:
    rows: list[tuple[str, RenderableType]] = [
        ("id", _text(key["id"])),
        ("tenant", _text(_key_owner(key))),
        ("name", _text(key["name"])),
        ("hint", _text(key["hint"] + "...")),
        ("status", _key_status(key)),
        ("created", _text(_when(key["created_at"]))),
        ("expires", _text(_when(key.get("expires_at")) if key.get("expires_at") else "never")),
    ]
    if key.get("revoked_at") is not None:
        rows.append(("revoked", _text(_when(key["revoked_at"]))))
    if key.get("admin"):
        rows.append(("admin", _text("yes: the admin API only, never the model API")))
    else:
        rows += [
            ("models", _text(", ".join(key.get("models") or []) or "every model")),
            ("max priority", _text(key.get("max_priority") or "the tenant's")),
            ("limits", _text(_limits_text(key.get("limits")))),
            ("budget", _text(_budget_text(key.get("budget")))),
        ]
        if key.get("spend"):
            rows.append(("spend", _text(_spend_text(key["spend"]))))
    if key.get("previous_secret_valid_until"):
        rows.append(
            ("previous secret", _text(f"valid until {_when(key['previous_secret_valid_until'])}"))
        )
    return _details(rows)


def _keys_table(keys: list[Mapping[str, Any]]) -> _Table:
    table = _Table(
        "id",
        "tenant",
        "name",
        "hint",
        "status",
        "created",
        "expires",
        "models",
        "limits",
        "budget",
        spare=("created", "hint", "limits", "budget", "expires", "models"),
    )
    for key in keys:
        table.add(
            _text(key["id"]),
            _text(_key_owner(key)),
            _text(key["name"]),
            _text(key["hint"] + "..."),
            _key_status(key),
            _text(_when(key["created_at"], short=True)),
            _text(_when(key["expires_at"], short=True) if key.get("expires_at") else "never"),
            _text(", ".join(key.get("models") or []) or ("-" if key.get("admin") else "all")),
            _text(_limits_text(key.get("limits"))),
            _text(_budget_cell(key)),
        )
    return table


def _metadata_text(metadata: Mapping[str, str] | None) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted((metadata or {}).items())) or "-"


def _tenant_details(tenant: Mapping[str, Any]) -> Any:
    rows: list[tuple[str, RenderableType]] = [
        ("name", _text(tenant["name"])),
        ("metadata", _text(_metadata_text(tenant.get("metadata")))),
        ("limits", _text(_limits_text(tenant.get("limits")))),
        ("budget", _text(_budget_text(tenant.get("budget")))),
    ]
    if tenant.get("spend"):
        rows.append(("spend", _text(_spend_text(tenant["spend"]))))
    rows += [
        ("created", _text(_when(tenant["created_at"]))),
        ("updated", _text(_when(tenant["updated_at"]))),
    ]
    return _details(rows)


def _tenants_table(tenants: list[Mapping[str, Any]]) -> _Table:
    table = _Table("name", "metadata", "limits", "budget", "created", spare=("created", "metadata"))
    for tenant in tenants:
        table.add(
            _text(tenant["name"]),
            _text(_clip(_metadata_text(tenant.get("metadata")))),
            _text(_limits_text(tenant.get("limits"))),
            _text(_budget_cell(tenant)),
            _text(_when(tenant["created_at"], short=True)),
        )
    return table


def _secret(secret: str, what: str) -> list[RenderableType | None]:
    """A key's secret, alone on its line (never wrapped: it is copied whole), with
    what to do with it."""
    from rich.text import Text

    return [
        None,
        _text(what, "bold"),
        None,
        Text(secret, style="bold green", no_wrap=True, overflow="ignore"),
        None,
        _text("Store it now: it is shown this once; the broker keeps only its SHA-256.", "yellow"),
    ]


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False))


# ------------------------------------------------------------ request bodies


def _limits_change(
    args: argparse.Namespace, current: Mapping[str, int] | None = None
) -> dict[str, int] | None:
    """The limits named on the command line over ``current`` (None: none named).
    The API replaces a record's limits whole: those not named are kept as they are."""
    given = {name: getattr(args, name) for name in LIMITS if getattr(args, name) is not None}
    if not given:
        return None
    return {**{k: v for k, v in (current or {}).items() if k in LIMITS}, **given}


def _budget_change(
    args: argparse.Namespace, current: Mapping[str, Any] | None = None
) -> tuple[bool, dict[str, Any] | None]:
    """(changed, the budget); a period alone changes the current budget's period."""
    if getattr(args, "no_budget", False):
        if args.budget_usd is not None or args.budget_period is not None:
            raise UsageError("--no-budget goes with neither --budget-usd nor --budget-period")
        return True, None
    if args.budget_usd is None and args.budget_period is None:
        return False, None
    amount = args.budget_usd
    if amount is None:
        if not current:
            raise UsageError("--budget-period needs --budget-usd (there is no budget to change)")
        amount = current["usd"]
    period = args.budget_period or (current or {}).get("period") or "monthly"
    return True, {"usd": amount, "period": period}


def _with_limits_and_budget(
    body: dict[str, Any], args: argparse.Namespace, current: Mapping[str, Any] | None = None
) -> None:
    """Add the limits and budget named on the command line to a request ``body``
    (over ``current``'s, for an update)."""
    current = current or {}
    limits = _limits_change(args, current.get("limits"))
    if limits is not None:
        body["limits"] = limits
    changed, budget = _budget_change(args, current.get("budget"))
    if changed:
        body["budget"] = budget


def _merges(args: argparse.Namespace) -> bool:
    """Whether an update keeps part of what the record holds (limits not named, a
    budget's amount or period), so that the record is read first."""
    limits = any(getattr(args, name) is not None for name in LIMITS)
    return limits or (args.budget_usd is None) != (args.budget_period is None)


def _expiry(args: argparse.Namespace) -> tuple[bool, float | None]:
    """(changed, the key's expiry time)."""
    if getattr(args, "no_expiry", False):
        return True, None
    if args.expires_in is not None:
        if args.expires_in <= 0:
            raise UsageError("--expires-in must be more than 0")
        return True, time.time() + args.expires_in
    if args.expires_at is not None:
        if args.expires_at <= time.time():
            raise UsageError(f"--expires-at {_when(args.expires_at)} is in the past")
        return True, float(args.expires_at)
    return False, None


# ------------------------------------------------------------ keys


def _keys_create(client: AdminClient, args: argparse.Namespace) -> None:
    if args.admin and args.tenant:
        raise UsageError("an admin key belongs to no tenant: --admin goes without --tenant")
    if not args.admin and not args.tenant:
        raise UsageError("name the key's tenant with --tenant NAME (or --admin for an admin key)")
    spec: dict[str, Any] = {"tenant": args.tenant or "", "name": args.name or ""}
    changed, expires = _expiry(args)
    if changed:
        spec["expires_at"] = expires
    if args.model:
        spec["models"] = list(dict.fromkeys(args.model))
    if args.max_priority:
        spec["max_priority"] = args.max_priority
    _with_limits_and_budget(spec, args)
    if args.admin:
        spec["admin"] = True
    created = client.create_key(spec)
    if args.json:
        _print_json(created)
        return
    owner = "an admin key" if created.get("admin") else f"tenant {created['tenant']}"
    what = f"Created key {created['id']} ({owner}). Its secret:"
    _show(_key_details(created), *_secret(created["key"], what))


def _keys_list(client: AdminClient, args: argparse.Namespace) -> None:
    found = client.list_keys(args.tenant)
    if args.json:
        _print_json(found)
        return
    keys = found["data"]
    if not keys:
        _show(_text("no keys" + (f" of tenant {args.tenant}" if args.tenant else "")))
    else:
        _show(_keys_table(keys))


def _keys_get(client: AdminClient, args: argparse.Namespace) -> None:
    key = client.key(args.key_id)
    if args.json:
        _print_json(key)
    else:
        _show(_key_details(key))


def _keys_update(client: AdminClient, args: argparse.Namespace) -> None:
    patch: dict[str, Any] = {}
    if args.name is not None:
        patch["name"] = args.name
    changed, expires = _expiry(args)
    if changed:
        patch["expires_at"] = expires
    if args.model and args.all_models:
        raise UsageError("--model and --all-models exclude each other")
    if args.model:
        patch["models"] = list(dict.fromkeys(args.model))
    elif args.all_models:
        patch["models"] = []
    if args.max_priority and args.no_max_priority:
        raise UsageError("--max-priority and --no-max-priority exclude each other")
    if args.max_priority:
        patch["max_priority"] = args.max_priority
    elif args.no_max_priority:
        patch["max_priority"] = None
    current: Mapping[str, Any] = client.key(args.key_id) if _merges(args) else {}
    _with_limits_and_budget(patch, args, current)
    if not patch:
        raise UsageError("nothing to change: name at least one option (see --help)")
    key = client.update_key(args.key_id, patch)
    if args.json:
        _print_json(key)
    else:
        _show(_key_details(key))


def _keys_revoke(client: AdminClient, args: argparse.Namespace) -> None:
    key = client.revoke_key(args.key_id)
    if args.json:
        _print_json(key)
        return
    done = _text(f"Revoked key {key['id']}: it is refused from now on.", "bold")
    _show(_key_details(key), None, done)


def _keys_rotate(client: AdminClient, args: argparse.Namespace) -> None:
    rotated = client.rotate_key(args.key_id, args.grace)
    if args.json:
        _print_json(rotated)
        return
    until = rotated.get("previous_secret_valid_until")
    _show(
        _key_details(rotated),
        *_secret(rotated["key"], f"Rotated key {rotated['id']}. Its new secret:"),
        _text(
            f"The previous secret works until {_when(until)}."
            if until
            else "The previous secret no longer works."
        ),
    )


# ------------------------------------------------------------ tenants


def _tenants_create(client: AdminClient, args: argparse.Namespace) -> None:
    spec: dict[str, Any] = {"name": args.tenant_name, "metadata": dict(args.metadata or [])}
    _with_limits_and_budget(spec, args)
    tenant = client.create_tenant(spec)
    if args.json:
        _print_json(tenant)
    else:
        _show(_tenant_details(tenant))


def _tenants_list(client: AdminClient, args: argparse.Namespace) -> None:
    found = client.list_tenants()
    if args.json:
        _print_json(found)
        return
    _show(_tenants_table(found["data"]) if found["data"] else _text("no tenants"))


def _tenants_get(client: AdminClient, args: argparse.Namespace) -> None:
    tenant = client.tenant(args.tenant_name)
    if args.json:
        _print_json(tenant)
    else:
        _show(_tenant_details(tenant))


def _tenants_update(client: AdminClient, args: argparse.Namespace) -> None:
    patch: dict[str, Any] = {}
    merges = _merges(args) or bool(args.metadata or args.remove_metadata)
    current: Mapping[str, Any] = client.tenant(args.tenant_name) if merges else {}
    if args.metadata or args.remove_metadata:
        metadata = {**current.get("metadata", {}), **dict(args.metadata or [])}
        for name in args.remove_metadata or []:
            metadata.pop(name, None)
        patch["metadata"] = metadata
    _with_limits_and_budget(patch, args, current)
    if not patch:
        raise UsageError("nothing to change: name at least one option (see --help)")
    tenant = client.update_tenant(args.tenant_name, patch)
    if args.json:
        _print_json(tenant)
    else:
        _show(_tenant_details(tenant))


def _tenants_delete(client: AdminClient, args: argparse.Namespace) -> None:
    deleted = client.delete_tenant(args.tenant_name)
    if args.json:
        _print_json(deleted)
    else:
        _show(_text(f"Deleted tenant {args.tenant_name}; its keys are revoked.", "bold"))


# ------------------------------------------------------------ usage, audit


def _usage(client: AdminClient, args: argparse.Namespace) -> None:
    query = {
        "tenant": args.tenant,
        "key": args.key,
        "model": args.model,
        "from": getattr(args, "from"),
        "to": args.to,
        "group_by": args.group_by,
    }
    found = client.usage(query)
    if args.json:
        _print_json(found)
        return
    rows = found["data"]
    window = f"from {found['from']} to {found['to']} (UTC)"
    if not rows:
        _show(_text(f"no usage {window}"))
        return
    groups = args.group_by.split(",")
    metrics = ("requests", "input_tokens", "output_tokens", "cost_usd", "errors")
    headers = [m.replace("_", " ") for m in metrics]
    table = _Table(*groups, *headers, right=headers, spare=("errors",), title=f"usage {window}")
    totals = dict.fromkeys(metrics, 0.0)
    for row in rows:
        for m in metrics:
            totals[m] += row[m]
        table.add(
            *(_text(row[g] if g != "key" else (row[g] or "(config keys)")) for g in groups),
            *(_text(_amount(m, row[m])) for m in metrics),
        )
    if len(rows) > 1:
        table.total = (
            _text("total", "bold"),
            *(_text(" ") for _ in groups[1:]),
            *(_text(_amount(m, totals[m]), "bold") for m in metrics),
        )
    _show(table)


def _amount(metric: str, value: float) -> str:
    return _money(value) if metric == "cost_usd" else f"{int(value):,}"


def _audit(client: AdminClient, args: argparse.Namespace) -> None:
    found = client.audit(args.limit, args.after)
    if args.json:
        _print_json(found)
        return
    events = found["data"]
    if not events:
        _show(_text("no audit events" + (f" before {args.after}" if args.after else "")))
        return
    table = _Table("id", "at", "actor", "action", "target", "detail", spare=("detail", "id"))
    for event in events:
        detail = event.get("detail") or {}
        table.add(
            _text(event["id"]),
            _text(_when(event["at"], short=True)),
            _text(event["actor"]),
            _text(event["action"]),
            _text(event["target"]),
            _text(_clip(json.dumps(detail, sort_keys=True, ensure_ascii=False)) if detail else "-"),
        )
    _show(table)
    if found.get("has_more"):
        more = f"older events: llm-broker audit --after {found['last_id']}"
        _show(_text(more, "dim"), stream=sys.stderr)


def _clip(text: str, most: int = 80) -> str:
    """A long value in a table cell (--json has it whole)."""
    return text if len(text) <= most else text[: most - 3] + "..."


AdminRun = Callable[["AdminClient", argparse.Namespace], None]


def cmd_admin(args: argparse.Namespace) -> int:
    """Run one of the admin API's commands (``args.run``) against the broker."""
    from llm_broker.admin_client import DEFAULT_URL, AdminClient, AdminError

    what = f"llm-broker {args.what}"
    url = args.url or os.environ.get(ADMIN_URL_ENV) or DEFAULT_URL
    key = args.admin_key or os.environ.get(ADMIN_KEY_ENV)
    try:
        if not re.match(r"https?://[^/?#]", url):
            raise UsageError(f"--url {url!r}: the broker's base URL, e.g. {DEFAULT_URL}")
        if not key:
            raise UsageError(
                f"no admin key: set ${ADMIN_KEY_ENV} (or pass --admin-key KEY); "
                "`llm-broker keygen --admin NAME` makes one for the config"
            )
        run: AdminRun = args.run
        run(AdminClient(url, key), args)
    except UsageError as e:
        print(f"{what}: {e}", file=sys.stderr)
        return 2
    except AdminError as e:
        print(f"{what}: {e}", file=sys.stderr)
        return 1
    return 0


def _add_admin_commands(sub: Any) -> None:
    """keys, tenants, usage and audit: their parsers."""
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("broker")
    conn.add_argument(
        "--url",
        help=f"the broker's base URL (default: ${ADMIN_URL_ENV} or http://127.0.0.1:8000)",
    )
    conn.add_argument(
        "--admin-key",
        metavar="KEY",
        help=f"an admin key (default: ${ADMIN_KEY_ENV}; the variable keeps it out of `ps`)",
    )
    common.add_argument(
        "--json", action="store_true", help="print the API's JSON answer instead of tables"
    )

    def leaf(parent: Any, name: str, run: AdminRun, what: str, summary: str) -> Any:
        p = parent.add_parser(name, parents=[common], help=summary, description=summary)
        p.set_defaults(func=cmd_admin, run=run, what=what)
        return p

    def limit_options(p: Any) -> None:
        g = p.add_argument_group("limits (0: none; on update, those not named are kept)")
        g.add_argument("--rpm", type=count, metavar="N", help="requests per minute")
        g.add_argument("--tpm", type=count, metavar="N", help="tokens per minute")
        g.add_argument(
            "--max-in-flight", type=count, metavar="N", help="requests admitted, not finished"
        )
        g.add_argument(
            "--max-queued", type=count, metavar="N", help="requests waiting for a worker"
        )

    def budget_options(p: Any, update: bool) -> None:
        g = p.add_argument_group("budget")
        g.add_argument("--budget-usd", type=usd, metavar="USD", help="US dollars per period")
        g.add_argument(
            "--budget-period",
            choices=("daily", "monthly", "total"),
            help="daily and monthly reset at midnight UTC; total never (default: monthly)",
        )
        if update:
            g.add_argument("--no-budget", action="store_true", help="remove the budget")

    def expiry_options(p: Any, update: bool) -> None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--expires-in", type=duration, metavar="DURATION", help="e.g. 12h, 30d, 2w")
        g.add_argument(
            "--expires-at",
            type=timestamp,
            metavar="TIME",
            help="ISO 8601, UTC unless it names an offset: 2026-12-31 or 2026-12-31T18:00+01:00",
        )
        if update:
            g.add_argument("--no-expiry", action="store_true", help="the key never expires")

    # ---- keys
    keys = sub.add_parser(
        "keys", help="API keys kept in the broker: create, list, get, update, revoke, rotate"
    )
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(actions, "create", _keys_create, "keys create", "create a key; prints its secret once")
    p.add_argument("--tenant", help="the key's tenant (create it first: tenants create)")
    p.add_argument("--name", help="a name to tell the key apart in lists")
    expiry_options(p, update=False)
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="a model or pattern (gpt-4o*) the key may call; repeatable (default: every model)",
    )
    p.add_argument(
        "--max-priority", choices=PRIORITIES, help="the highest priority its requests may have"
    )
    limit_options(p)
    budget_options(p, update=False)
    p.add_argument(
        "--admin", action="store_true", help="an admin key: the admin API only, no tenant"
    )

    p = leaf(actions, "list", _keys_list, "keys list", "list keys (never their secrets)")
    p.add_argument("--tenant", help="only this tenant's keys")

    p = leaf(actions, "get", _keys_get, "keys get", "show one key")
    p.add_argument("key_id", metavar="KEY_ID")

    p = leaf(actions, "update", _keys_update, "keys update", "change a key")
    p.add_argument("key_id", metavar="KEY_ID")
    p.add_argument("--name")
    expiry_options(p, update=True)
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME",
        help="replaces the key's models or patterns; repeatable",
    )
    p.add_argument("--all-models", action="store_true", help="the key may call every model")
    p.add_argument("--max-priority", choices=PRIORITIES)
    p.add_argument(
        "--no-max-priority", action="store_true", help="the tenant's ceiling applies again"
    )
    limit_options(p)
    budget_options(p, update=True)

    p = leaf(actions, "revoke", _keys_revoke, "keys revoke", "revoke a key (for good)")
    p.add_argument("key_id", metavar="KEY_ID")

    p = leaf(
        actions,
        "rotate",
        _keys_rotate,
        "keys rotate",
        "give a key a new secret (printed once); the old one works for a grace period",
    )
    p.add_argument("key_id", metavar="KEY_ID")
    p.add_argument(
        "--grace",
        type=duration,
        metavar="DURATION",
        help="how long the old secret keeps working, e.g. 0, 1h "
        "(default: the broker's accounts.rotation_grace_s, 1 day)",
    )

    # ---- tenants
    tenants = sub.add_parser(
        "tenants", help="tenants kept in the broker: create, list, get, update, delete"
    )
    actions = tenants.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = leaf(actions, "create", _tenants_create, "tenants create", "create a tenant")
    p.add_argument("tenant_name", metavar="NAME")
    p.add_argument(
        "--metadata", action="append", type=metadata_pair, metavar="KEY=VALUE", help="repeatable"
    )
    limit_options(p)
    budget_options(p, update=False)

    leaf(actions, "list", _tenants_list, "tenants list", "list tenants")

    p = leaf(actions, "get", _tenants_get, "tenants get", "show one tenant, with its spend")
    p.add_argument("tenant_name", metavar="NAME")

    p = leaf(actions, "update", _tenants_update, "tenants update", "change a tenant")
    p.add_argument("tenant_name", metavar="NAME")
    p.add_argument(
        "--metadata",
        action="append",
        type=metadata_pair,
        metavar="KEY=VALUE",
        help="set this metadata entry (the others are kept); repeatable",
    )
    p.add_argument(
        "--remove-metadata", action="append", metavar="KEY", help="drop this entry; repeatable"
    )
    limit_options(p)
    budget_options(p, update=True)

    p = leaf(
        actions, "delete", _tenants_delete, "tenants delete", "delete a tenant and revoke its keys"
    )
    p.add_argument("tenant_name", metavar="NAME")

    # ---- usage, audit
    p = leaf(
        sub,
        "usage",
        _usage,
        "usage",
        "requests, tokens, cost and errors per day, tenant, key or model",
    )
    p.add_argument("--tenant", help="only this tenant's requests")
    p.add_argument("--key", metavar="KEY_ID", help="only this key's requests")
    p.add_argument("--model", help="only this model's requests")
    p.add_argument(
        "--from", type=day, metavar="DAY", help="first day, YYYY-MM-DD or today (default: today)"
    )
    p.add_argument("--to", type=day, metavar="DAY", help="last day, included (default: today)")
    p.add_argument(
        "--group-by",
        type=group_by,
        default="day",
        metavar="FIELDS",
        help=f"comma-separated: {', '.join(GROUPS)} (default: day)",
    )

    p = leaf(sub, "audit", _audit, "audit", "the audit log of admin changes, newest first")
    p.add_argument("--limit", type=page_size, metavar="N", help="1 to 1000 (default: 100)")
    p.add_argument("--after", metavar="EVENT_ID", help="events older than this one (paging)")


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
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tenant", default="default", help="an auth.keys entry for this tenant")
    which.add_argument(
        "--admin", metavar="NAME", help="an auth.admin_keys entry (the admin API) with this name"
    )
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("webhook-secret", help="print a new webhook signing secret")
    p.set_defaults(func=cmd_webhook_secret)

    p = with_config(sub.add_parser("check-config", help="validate a config file"))
    p.set_defaults(func=cmd_check_config)

    _add_admin_commands(sub)
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
