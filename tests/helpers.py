"""Helpers shared by the tests."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import redis.asyncio as aioredis

from llm_broker.shared import messages as m
from llm_broker.shared.config import new_webhook_secret, parse_config
from llm_broker.shared.keys import Keys
from llm_broker.shared.redisio import Batcher
from llm_broker.shared.store import JobStore

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T | None]], timeout: float = 15.0, what: str = "condition"
) -> T:
    """Poll ``check`` until it returns something truthy, within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)  # polling interval of a bounded wait


def make_job(
    model: str = "mock",
    *,
    timeout: float = 60.0,
    stream: bool = False,
    provider: str = "mock",
    content: str = "hello",
) -> m.Job:
    now = time.time()
    body = orjson.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream}
    )
    return m.Job(
        id=secrets.token_hex(16),
        tenant="default",
        provider=provider,
        model=model,
        upstream_model=model,
        stream=stream,
        deadline=now + timeout,
        created=now,
        body=body,
    )


async def enqueue(client: aioredis.Redis, prefix: str, job: m.Job, max_depth: int = 10_000) -> None:
    """Admit ``job``: it waits for the provider's workers (or goes to one now)."""
    config = parse_config({"redis": {"key_prefix": prefix}})
    store = JobStore(config, Batcher(client, timeout=5.0), client)
    assert await store.enqueue(job, max_depth=max_depth, ttl_s=3600) is None


async def dispatched(client: aioredis.Redis, prefix: str, job: m.Job) -> str:
    """Admit ``job`` and put it on its provider's stream at once, as a dispatch to
    a free worker slot does; returns its entry id."""
    config = parse_config(
        {
            "redis": {"key_prefix": prefix},
            "providers": {job.provider: {"type": "mock", "base_url": "http://127.0.0.1:9"}},
        }
    )
    store = JobStore(config, Batcher(client, timeout=5.0), client)
    queue = Keys(prefix).queue(job.provider)
    before = await client.xlen(queue)
    await store.register(job.provider, "test-slots", before + 1, 60)
    try:
        assert await store.enqueue(job, max_depth=10_000, ttl_s=3600) is None
    finally:
        await store.register(job.provider, "test-slots", 0, 60)
    ((entry, _fields),) = await client.xrevrange(queue, count=1)
    return str(entry.decode())


async def job_record(client: aioredis.Redis, prefix: str, job_id: str) -> dict[str, Any]:
    raw: dict[bytes, bytes] = await client.hgetall(Keys(prefix).job(job_id))  # type: ignore[misc]
    return {k.decode(): v.decode() for k, v in raw.items()}


async def job_status(client: aioredis.Redis, prefix: str, job_id: str) -> str:
    status: bytes | None = await client.hget(Keys(prefix).job(job_id), "status")  # type: ignore[misc]
    return status.decode() if status else ""


async def wait_status(
    client: aioredis.Redis, prefix: str, job_id: str, status: str, timeout: float = 15.0
) -> None:
    """Wait (bounded) until job ``job_id`` has ``status``."""

    async def reached() -> bool:
        return await job_status(client, prefix, job_id) == status

    await eventually(reached, timeout, what=f"job {job_id} to be {status}")


def schema_errors(builtin_schema: str, path: Path) -> str | None:
    """Validate a file against one of check-jsonschema's built-in schemas
    (``vendor.compose-spec``, ``vendor.github-workflows``...); its complaints, or None."""
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", builtin_schema, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return None if done.returncode == 0 else done.stdout + done.stderr


def rss_kib(pid: int) -> int:
    """Resident set size of process ``pid`` (``VmRSS`` in /proc), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


async def scan_keys(client: aioredis.Redis, match: str) -> list[bytes]:
    """Every key matching ``match`` (SCAN, so a busy server is not blocked)."""
    return [key async for key in client.scan_iter(match=match, count=1000)]


_LENGTH = {
    b"string": "STRLEN",
    b"hash": "HLEN",
    b"list": "LLEN",
    b"set": "SCARD",
    b"zset": "ZCARD",
    b"stream": "XLEN",
}


async def key_report(client: aioredis.Redis, match: str) -> list[tuple[str, str, int, int]]:
    """(key, type, TTL in whole seconds (-1: none), length) of every key matching ``match``.
    A key that expired between the scan and the look-up is left out."""
    keys = await scan_keys(client, match)
    async with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.type(key)
            pipe.pttl(key)
        found = await pipe.execute()
    types = found[0::2]
    ttls = [t if t < 0 else -(-t // 1000) for t in found[1::2]]  # seconds, rounded up
    async with client.pipeline(transaction=False) as pipe:
        for key, kind in zip(keys, types, strict=True):
            pipe.execute_command(_LENGTH.get(kind, "EXISTS"), key)
        lengths = await pipe.execute()
    return [
        (key.decode(errors="replace"), kind.decode(), int(ttl), int(length))
        for key, kind, ttl, length in zip(keys, types, ttls, lengths, strict=True)
        if kind != b"none" and ttl != -2
    ]


def loopback_webhooks(directory: Path) -> dict[str, Any]:
    """A ``webhooks`` config section that signs with a new secret (written in
    ``directory``) and delivers fast to a receiver on any loopback port."""
    secret = directory / "webhook-secret"
    secret.write_text(new_webhook_secret())
    return {
        "secret_file": str(secret),
        "allow_cidrs": ["127.0.0.0/8"],
        "allow_ports": ["1024-65535"],  # receivers listen on random ports
        "poll_delay_s": 0.05,
        "retry_schedule_s": [0, 0.2, 0.2],
    }


async def read_once(client: aioredis.Redis, read: Callable[[Batcher], Awaitable[T]]) -> T:
    """``read`` on a reader connection of its own (as ingress and workers read
    streams), closed afterwards."""
    reader = Batcher(client, timeout=5.0)
    try:
        return await read(reader)
    finally:
        await reader.close(wait=False)


async def admin_call(
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    method: str,
    url: str,
    body: object = None,
    status: int = 200,
) -> Any:
    """An admin API call with ``headers`` (its admin key): its JSON, once its status
    is ``status``."""
    async with http.request(method, url, json=body, headers=headers) as r:
        data = await r.json()
        assert r.status == status, data
        return data
