"""The admin commands (keys, tenants, usage, audit, keygen --admin) as a user runs
them: ``python -m llm_broker ...`` as a child process against real Redis, ingress
and worker processes; what they print and their exit statuses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import yaml

from llm_broker.dev import free_port
from llm_broker.procs import python_cmd
from llm_broker.shared.config import hash_key, new_key, parse_config
from tests.conftest import ConfigFactory, Procs, chat
from tests.helpers import eventually

ADMIN_KEY, ADMIN_SHA = new_key()
SECRET = re.compile(r"^sk-llmb-[A-Za-z0-9_-]{43}$", re.MULTILINE)
#: 8 output tokens (the mock's answer) cost $0.001.
PRICING = {"gpt-4o-mini": {"input_usd_per_million": 0.0, "output_usd_per_million": 125.0}}


@dataclass
class Ran:
    status: int
    out: str
    err: str


async def cli(url: str, *args: str, admin_key: str | None = ADMIN_KEY) -> Ran:
    """``llm-broker ARGS`` with the broker's URL and the admin key in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_BROKER_")}
    env.pop("COLUMNS", None)
    env["LLM_BROKER_URL"] = url
    if admin_key is not None:
        env["LLM_BROKER_ADMIN_KEY"] = admin_key
    proc = await asyncio.create_subprocess_exec(
        *python_cmd(*args),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return Ran(proc.returncode, out.decode(), err.decode())


async def ok(url: str, *args: str) -> str:
    ran = await cli(url, *args)
    assert ran.status == 0, ran
    return ran.out


async def ok_json(url: str, *args: str) -> Any:
    return json.loads(await ok(url, *args, "--json"))


def secret_in(out: str) -> str:
    (secret,) = SECRET.findall(out)
    return str(secret)


async def chat_status(http: aiohttp.ClientSession, url: str, key: str) -> int:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(f"{url}/v1/chat/completions", json=chat(), headers=headers) as r:
        await r.read()
        return r.status


def start(procs: Procs, make_config: ConfigFactory) -> str:
    _, mock_url = procs.mock()
    config = make_config(
        mock_url,
        auth={"open": False, "keys": [], "admin_keys": [{"name": "ops", "sha256": ADMIN_SHA}]},
        pricing=PRICING,
    )
    procs.worker(config)
    return procs.ingress(config)[1]


def row_of(table: str, first: str) -> list[str]:
    """The cells of the table row that starts with ``first``."""
    for line in table.splitlines():
        cells = line.split()
        if cells and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in:\n{table}")


async def test_a_tenant_and_key_made_with_the_cli_serve_rotate_revoke_and_show_in_usage(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    url = start(procs, make_config)

    out = await ok(
        url, "tenants", "create", "acme", "--metadata", "team=search", "--budget-usd", "5"
    )
    assert re.search(r"^name\s+acme$", out, re.MULTILINE), out
    assert re.search(r"^metadata\s+team=search$", out, re.MULTILINE), out
    assert re.search(r"^budget\s+\$5\.00 monthly$", out, re.MULTILINE), out

    out = await ok(
        url, "keys", "create", "--tenant", "acme", "--name", "ci", "--model", "gpt-4o*",
        "--rpm", "100", "--expires-in", "30d",
    )  # fmt: skip
    key = secret_in(out)
    found = re.search(r"^id\s+(key_[0-9a-f]{24})$", out, re.MULTILINE)
    assert found, out
    key_id = found.group(1)
    assert "shown this once" in out
    assert re.search(r"^limits\s+rpm 100$", out, re.MULTILINE), out
    assert await chat_status(http, url, key) == 200

    # The table: one row per key, never its secret; --json: the API's list.
    table = await ok(url, "keys", "list", "--tenant", "acme")
    assert row_of(table, key_id)[1:5] == ["acme", "ci", key[:12] + "...", "active"], table
    assert key not in table and hash_key(key) not in table
    listed = await ok_json(url, "keys", "list")
    assert listed["object"] == "list"
    (shown,) = listed["data"]
    assert (shown["id"], shown["tenant"], shown["models"]) == (key_id, "acme", ["gpt-4o*"])
    assert shown["limits"] == {"rpm": 100} and "key" not in shown
    assert abs(shown["expires_at"] - (time.time() + 30 * 86400)) < 60

    # Usage: the request, its tokens and cost, for the key's tenant and model.
    async def used() -> list[dict[str, Any]] | None:
        rows = await ok_json(url, "usage", "--tenant", "acme", "--group-by", "key,model")
        data: list[dict[str, Any]] = rows["data"]
        return data if data else None

    (row,) = await eventually(used, 10, what="the request in the usage")
    assert (row["key"], row["model"], row["requests"], row["errors"]) == (
        key_id,
        "gpt-4o-mini",
        1,
        0,
    )
    assert row["output_tokens"] > 0 and row["cost_usd"] > 0
    table = await ok(url, "usage", "--tenant", "acme", "--group-by", "day,model")
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert row_of(table, today)[1:3] == ["gpt-4o-mini", "1"], table

    # An update names what changes: the limits and budget not named are kept.
    changed = await ok_json(url, "keys", "update", key_id, "--tpm", "5000", "--budget-usd", "2")
    assert changed["limits"] == {"rpm": 100, "tpm": 5000}
    assert changed["budget"] == {"usd": 2.0, "period": "monthly"}
    changed = await ok_json(url, "tenants", "update", "acme", "--budget-period", "daily")
    assert changed["budget"] == {"usd": 5.0, "period": "daily"}
    assert changed["metadata"] == {"team": "search"}

    # Rotation: a new secret, printed once, that works; the old one stops at once.
    out = await ok(url, "keys", "rotate", key_id, "--grace", "0")
    new = secret_in(out)
    assert new != key and "The previous secret no longer works." in out
    assert await chat_status(http, url, new) == 200

    async def refused(secret: str) -> bool:
        return await chat_status(http, url, secret) == 401

    await eventually(lambda: refused(key), 3, what="the rotated-out secret to be refused")

    out = await ok(url, "keys", "revoke", key_id)
    assert re.search(r"^status\s+revoked$", out, re.MULTILINE), out
    await eventually(lambda: refused(new), 3, what="the revoked key to be refused")
    table = await ok(url, "keys", "list")
    assert row_of(table, key_id)[4] == "revoked", table

    audit = await ok_json(url, "audit", "--limit", "3")
    assert [e["action"] for e in audit["data"]] == ["key.revoke", "key.rotate", "tenant.update"]
    assert {e["actor"] for e in audit["data"]} == {"config:ops"}
    table = await ok(url, "audit")
    assert row_of(table, audit["data"][0]["id"])[3:6] == ["config:ops", "key.revoke", key_id]

    tenant = await ok_json(url, "tenants", "get", "acme")
    assert tenant["budget"] == {"usd": 5.0, "period": "daily"}
    assert 0 < tenant["spend"]["usd"] <= 0.01


async def test_refusals_are_the_apis_message_on_stderr_and_exit_1(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    url = start(procs, make_config)
    await ok(url, "tenants", "create", "acme")
    ordinary = secret_in(await ok(url, "keys", "create", "--tenant", "acme"))

    # An ordinary key may not administer: the API's message, nothing on stdout.
    ran = await cli(url, "keys", "list", admin_key=ordinary)
    assert ran.status == 1 and ran.out == ""
    assert ran.err.strip() == (
        "llm-broker keys list: this key may not use the admin API (HTTP 403, not_admin)"
    )
    ran = await cli(url, "tenants", "get", "nobody")
    assert (ran.status, ran.err.strip()) == (
        1,
        "llm-broker tenants get: no tenant 'nobody' (HTTP 404, not_found)",
    )
    ran = await cli(url, "tenants", "create", "acme", "--json")
    assert ran.status == 1 and "tenant 'acme' exists (HTTP 409" in ran.err

    # Usage errors: exit 2, before any request.
    ran = await cli(url, "keys", "list", admin_key=None)
    assert ran.status == 2 and "no admin key: set $LLM_BROKER_ADMIN_KEY" in ran.err
    ran = await cli(url, "keys", "create", "--name", "no-tenant")
    assert ran.status == 2 and "--tenant NAME" in ran.err
    ran = await cli(url, "keys", "rotate", "key_x", "--grace", "soon")
    assert ran.status == 2 and "is not a duration" in ran.err

    # Nothing listening: a clear message.
    closed = f"http://127.0.0.1:{free_port()}"
    ran = await cli(url, "tenants", "list", "--url", closed)
    assert ran.status == 1
    assert f"cannot reach the broker at {closed}: connection refused" in ran.err

    # An admin key made with the CLI administers; it cannot call the model API.
    out = await ok(url, "keys", "create", "--admin", "--name", "deploy-bot")
    admin = secret_in(out)
    ran = await cli(url, "tenants", "list", "--json", "--admin-key", admin)
    assert ran.status == 0 and [t["name"] for t in json.loads(ran.out)["data"]] == ["acme"]
    assert await chat_status(http, url, admin) == 403
    assert await chat_status(http, url, ordinary) == 200

    # Deleting a tenant revokes its keys.
    out = await ok(url, "tenants", "delete", "acme")
    assert out == "Deleted tenant acme; its keys are revoked.\n"
    assert (await ok_json(url, "tenants", "list"))["data"] == []

    async def refused() -> bool:
        return await chat_status(http, url, ordinary) == 401

    await eventually(refused, 3, what="the deleted tenant's key to be refused")


def test_keygen_admin_prints_a_key_and_its_admin_keys_entry() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "llm_broker", "keygen", "--admin", "ops"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    key = secret_in(done.stdout.replace("key:    ", ""))
    lines = done.stdout.splitlines()
    assert lines[1:] == [
        "config: add under auth.admin_keys (a key for the admin API only):",
        "  - name: ops",
        f"    sha256: {hash_key(key)}",
    ]
    # The entry is a valid config as printed.
    config = parse_config({"auth": {"admin_keys": yaml.safe_load("\n".join(lines[2:]))}})
    assert [(k.name, k.sha256) for k in config.auth.admin_keys] == [("ops", hash_key(key))]
