"""What a careless or hostile client cannot do to the queue: poison a worker,
fill Redis, keep records forever, drain a token budget, or reach an ingress
that serves without keys by accident; and what a shutdown promises.

Real processes (mock upstream, worker, ingress) on the session's Redis.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
import redis.asyncio as aioredis
import yaml

from llm_broker.procs import python_cmd
from llm_broker.shared import body as json_body
from llm_broker.shared.config import parse_config
from llm_broker.shared.keys import GROUP, Keys
from tests.conftest import ConfigFactory, Procs, chat, mock_stats, wait_in_flight
from tests.helpers import (
    dispatched,
    enqueue,
    eventually,
    job_record,
    job_status,
    make_job,
    wait_status,
)


def _poisoned(job_body: bytes) -> Any:
    job = make_job("mock")
    return msgspec.structs.replace(job, body=job_body)


@pytest.mark.parametrize(
    "poison",
    [
        b'{"model":"mock","messages":[{"role":"user","content":"x"}],"seed":1e400}',
        b'{"model":"mock","messages":[{"role":"user","content":"\xff"}]}',
        b'{"model":"mock","messages":[{"role":"user","content":"x"}],"x":'
        + b"[" * 300
        + b"]" * 300
        + b"}",
        b"[1, 2]",
    ],
    ids=["overflowing-number", "invalid-utf8", "nesting-300", "not-an-object"],
)
async def test_a_job_the_worker_cannot_decode_fails_at_once_without_redelivery(
    poison: bytes,
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    # A short lease: a redelivery loop would show within the test's time.
    config = make_config(mock_url, worker={"lease_s": 0.3, "max_deliveries": 3})
    job = _poisoned(poison)
    await enqueue(rclient, prefix, job)
    procs.worker(config)

    await wait_status(rclient, prefix, job.id, "failed", timeout=10)
    record = await job_record(rclient, prefix, job.id)
    error = orjson.loads(record["error"])["error"]
    assert error["code"] == "invalid_json", error
    assert record["http_status"] == "400"
    assert record["attempts"] == "1"
    keys = Keys(prefix)
    assert await rclient.xlen(keys.queue("mock")) == 0
    assert not await rclient.exists(keys.dead_letter("mock"))
    assert (await mock_stats(http, mock_url))["calls"] == 0


def test_ingress_and_worker_share_one_decoder() -> None:
    """What ingress admits, a worker decodes and can encode again with room for a
    translation; what it refuses, the worker would have refused too."""
    deep_ok = b'{"a":' + b"[" * json_body.MAX_DEPTH + b"]" * json_body.MAX_DEPTH + b"}"
    with pytest.raises(json_body.InvalidBody, match="nested too deeply"):
        json_body.load(deep_ok)
    ok = b"[" * json_body.MAX_DEPTH + b"]" * json_body.MAX_DEPTH
    value = json_body.load(ok)
    assert json_body.dump({"wrapped": {"twice": value}}).startswith(b'{"wrapped"')
    for bad in (b'{"x": 1e309}', b'{"x": "\xed\xa0\x80"}', b'{"x": NaN}', b"1" + b"0" * 400):
        with pytest.raises(json_body.InvalidBody):
            json_body.load(bad)
    # Integers beyond 64 bits arrive as floats: the worker can always encode them.
    assert json_body.load(b'{"seed": 18446744073709551616}') == {"seed": 1.8446744073709552e19}
    with pytest.raises(json_body.InvalidBody, match="64-bit"):
        json_body.dump({"max_tokens": 10**30})


async def test_dead_letter_entries_are_bounded_summaries_that_expire(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(
        mock_url,
        worker={
            "lease_s": 0.3,
            "max_deliveries": 1,
            "dead_letter_body_bytes": 1000,
            "dead_letter_ttl_s": 3600,
            "dead_letter_maxlen": 5,
        },
    )
    keys = Keys(prefix)
    queue = keys.queue("mock")
    await rclient.xgroup_create(queue, GROUP, id="0", mkstream=True)
    big = "y" * 200_000
    jobs = [make_job("mock", content=big) for _ in range(8)]
    for job in jobs:
        entry = await dispatched(rclient, prefix, job)
        # A consumer took each entry and died: the next delivery is one too many.
        await rclient.xclaim(queue, GROUP, "crashed", 0, [entry])
    await rclient.xreadgroup(GROUP, "crashed", {queue: ">"}, count=100)
    procs.worker(config)

    async def all_failed() -> bool:
        statuses = [await job_status(rclient, prefix, j.id) for j in jobs]
        return all(s == "failed" for s in statuses)

    await eventually(all_failed, what="every poison job to fail")
    dlq = keys.dead_letter("mock")
    entries = await rclient.xrange(dlq)
    # MAXLEN is approximate: trimmed in whole nodes, so a little over the cap.
    assert 1 <= len(entries) <= 8
    ttl = await rclient.ttl(dlq)
    assert 0 < ttl <= 3600
    memory = await rclient.memory_usage(dlq)
    assert memory is not None and memory < 8 * 200_000 / 4, memory
    fields = entries[-1][1]
    assert fields[b"job"].decode() in {j.id for j in jobs}
    assert fields[b"tenant"] == b"default"
    assert fields[b"model"] == b"mock"
    assert b"max_deliveries_exceeded" in fields[b"error"]
    assert int(fields[b"body_bytes"]) > 200_000
    assert len(fields[b"body"]) == 1000
    assert fields[b"body_truncated"] == b"1"


async def test_an_active_tenant_that_never_lists_keeps_a_bounded_job_index(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, jobs={"result_ttl_s": 1})
    procs.worker(config)
    _, url = procs.ingress(config)
    index = Keys(prefix).tenant_jobs("default")

    async def submit() -> str:
        async with http.post(f"{url}/v1/jobs", json={"request": chat("mock")}) as resp:
            assert resp.status == 202
            job_id: str = (await resp.json())["id"]
            return job_id

    first = [await submit() for _ in range(6)]

    async def expired() -> bool:
        return not any([await rclient.exists(Keys(prefix).job(i)) for i in first])

    await eventually(expired, timeout=30, what="the first jobs' records to expire")
    assert await rclient.zcard(index) == 6
    for _ in range(3):
        await submit()
    # Each submission looks at the oldest few ids and drops those whose records expired.
    members = {m.decode() for m in await rclient.zrange(index, 0, -1)}
    assert not members & set(first)
    assert len(members) == 3


async def test_a_synchronous_calls_record_is_kept_minutes_not_a_day(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, jobs={"sync_result_ttl_s": 120, "result_ttl_s": 86_400})
    procs.worker(config)
    _, url = procs.ingress(config)
    async with http.post(f"{url}/v1/chat/completions", json=chat("mock")) as resp:
        assert resp.status == 200
        call_id = resp.headers["X-Request-Id"]
    ttl = await rclient.ttl(Keys(prefix).job(call_id))
    assert 0 < ttl <= 120
    # Still readable after the call, within that time.
    async with http.get(f"{url}/v1/jobs/{call_id}") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "completed"
    async with http.post(f"{url}/v1/jobs", json={"request": chat("mock")}) as resp:
        async_id = (await resp.json())["id"]

    await wait_status(rclient, prefix, async_id, "completed")
    assert await rclient.ttl(Keys(prefix).job(async_id)) > 80_000


@pytest.mark.chaos
async def test_a_call_cut_by_shutdown_gets_its_job_id_and_the_job_finishes(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, ingress={"drain_s": 2.0, "shutdown_delay_s": 0.5})
    procs.worker(config)
    ingress, url = procs.ingress(config)
    # Answers after 4 s: past the ingress's shutdown_delay_s + drain_s.
    call = asyncio.ensure_future(
        http.post(f"{url}/v1/chat/completions", json=chat("mock-latency-4000"))
    )
    await wait_in_flight(http, mock_url)
    sent = time.monotonic()
    ingress.proc.send_signal(signal.SIGTERM)
    async with await call as resp:
        assert resp.status == 503
        err = (await resp.json())["error"]
        job_id = resp.headers["X-Request-Id"]
    assert err["code"] == "shutting_down"
    assert job_id in err["message"]
    ingress.proc.wait(timeout=10)
    # Bounded by shutdown_delay_s + drain_s (plus process exit).
    assert time.monotonic() - sent < 2.5 + 1.0
    # The job was not cancelled: it finishes, and its record has the answer.

    await wait_status(rclient, prefix, job_id, "completed")
    record = await job_record(rclient, prefix, job_id)
    assert orjson.loads(record["result"])["object"] == "chat.completion"


def test_ingress_without_keys_refuses_to_start_unless_open(
    procs: Procs, make_config: ConfigFactory, tmp_path: Any
) -> None:
    config = make_config("http://127.0.0.1:9", auth={"open": False})
    done = subprocess.run(
        python_cmd("ingress", "--config", str(config), "--port", "0"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "auth.keys" in done.stderr and "open: true" in done.stderr
    # With open mode said in so many words, it serves.
    open_config = tmp_path / "open.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["auth"] = {"open": True}
    open_config.write_text(yaml.safe_dump(cfg))
    _, url = procs.ingress(open_config)
    assert url.startswith("http://")


def test_open_mode_is_off_by_default() -> None:
    assert parse_config({}).auth.open is False


async def test_token_estimate_is_capped_and_given_back_when_the_call_failed(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(
        mock_url,
        providers={"mock": {"tpm": 1_000_000, "max_call_tokens": 5000}},
        limits={"window_s": 60},
    )
    procs.worker(config)
    _, url = procs.ingress(config)
    # A request claiming an absurd max_tokens is estimated at max_call_tokens (two
    # uncapped estimates would overflow the window's 64-bit token sum).
    for _ in range(3):
        body = chat("mock-error-500", max_tokens=9 * 10**18)
        async with http.post(f"{url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 502, await resp.text()
    # The three failed calls spent nothing: the window holds no tokens from them,
    # so a caller still gets the whole budget.

    async def given_back() -> bool:
        sums = [k for k in await rclient.keys(f"{prefix}*") if k.endswith(b"sum")]
        totals = [int(await rclient.get(k) or 0) for k in sums]
        return bool(sums) and all(t == 0 for t in totals)

    await eventually(given_back, what="the failed calls' estimates to be given back")
    async with http.post(f"{url}/v1/chat/completions", json=chat("mock")) as resp:
        assert resp.status == 200


def test_idempotency_keys_of_different_tenants_never_share_a_name() -> None:
    keys = Keys("p:")
    assert keys.idempotency("a:b", "c") != keys.idempotency("a", "b:c")
    assert keys.idempotency("a", "b") != keys.idempotency("a:", "b")


async def test_an_idempotency_key_never_returns_another_tenants_job(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url)
    procs.worker(config)
    _, url = procs.ingress(config)
    body = {"request": chat("mock")}
    async with http.post(f"{url}/v1/jobs", json=body) as resp:
        first = (await resp.json())["id"]
    # A key name that points at a job of another tenant (as a colliding name would).
    keys = Keys(prefix)
    await rclient.hset(keys.job(first), "tenant", "someone-else")  # type: ignore[misc]
    await rclient.set(keys.idempotency("default", "k1"), f"whatever {first}", ex=60)
    async with http.post(f"{url}/v1/jobs", json=body, headers={"Idempotency-Key": "k1"}) as resp:
        assert resp.status == 422
        answer = await resp.json()
    assert answer["error"]["code"] == "idempotency_key_reused"
    assert first not in orjson.dumps(answer).decode()
