"""Every key the broker writes has a TTL or a hard bound.

Traffic of every kind (sync, stream, async, webhook, idempotent, cancelled,
expired, failed, dead-lettered, cached, Anthropic, embeddings, global limits, a
lowest-latency route) runs through real processes; then every key under the
test's prefix (arq's keys carry it inside their names) is listed with its type,
TTL and length, and none may be unbounded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from llm_broker.shared import messages as m
from llm_broker.shared.config import new_key
from llm_broker.shared.keys import GROUP, Keys
from tests.conftest import ConfigFactory, Procs, Receiver, chat, wait_in_flight
from tests.helpers import (
    dispatched,
    eventually,
    job_status,
    key_report,
    loopback_webhooks,
    make_job,
)

KEY, KEY_HASH = new_key()
AUTH = {"Authorization": f"Bearer {KEY}"}
RESULT_TTL_S = 4


def pattern(key: str, prefix: str) -> str:
    """A key's shape: ids, pod names and counters replaced by placeholders."""
    shape = key.replace(prefix, "{prefix}")
    shape = re.sub(r"[0-9a-f]{16,}", "{id}", shape)
    shape = re.sub(r"(\{prefix\}r:).*", r"\1{pod}", shape)
    return re.sub(r":\d+$", ":{n}", shape)


def verdict(key: str, kind: str, ttl: int, length: int, prefix: str, deployments: int) -> str:
    if ttl >= 0:  # (0: its TTL ran out as the report read it; Redis deletes it next)
        return "ttl"
    if kind == "stream" and length == 0:
        return "empty queue"  # a consumer group's stream, every entry acknowledged and deleted
    keys = Keys(prefix)
    if key == keys.latency() and kind == "hash" and length <= deployments:
        return "one field per configured deployment"
    if key == keys.scheduler("mock") and kind == "hash" and length <= 5:
        return "the scheduler's five fields"
    return "UNBOUNDED"


async def call(
    http: aiohttp.ClientSession,
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    async with http.request(method, url, json=body, headers={**AUTH, **(headers or {})}) as r:
        raw = await r.read()
        return r.status, (await r.json() if raw.startswith(b"{") else raw), r.headers


async def test_every_key_has_a_ttl_or_a_hard_bound(
    procs: Procs,
    make_config: ConfigFactory,
    rclient: aioredis.Redis,
    prefix: str,
    http: aiohttp.ClientSession,
    receiver: Receiver,
    tmp_path: Path,
) -> None:
    keys = Keys(prefix)
    queue = keys.queue("mock")
    _, mock_url = procs.mock()
    hooks = loopback_webhooks(tmp_path)
    jobs: dict[str, Any] = {
        "result_ttl_s": RESULT_TTL_S,
        "idempotency_ttl_s": RESULT_TTL_S,
        "sync_result_ttl_s": 60,
    }
    config = make_config(
        mock_url,
        auth={"keys": [{"tenant": "keys", "sha256": KEY_HASH}]},
        providers={"mock": {"global_max_concurrency": 50, "rpm": 100_000, "tpm": 10_000_000}},
        models={
            "fast": {
                "deployments": [{"provider": "mock", "model": "mock"}],
                "strategy": "lowest-latency",
            }
        },
        worker={"lease_s": 0.3, "max_deliveries": 2},
        cache={"enabled": True},
        webhooks=hooks,
        jobs=jobs,
    )
    # Dead-lettered: two consumers took an entry and died without acknowledging it.
    await rclient.xgroup_create(queue, GROUP, id="0", mkstream=True)
    poison = make_job("mock")
    entry = await dispatched(rclient, prefix, poison)
    await rclient.xreadgroup(GROUP, "crashed-1", {queue: ">"}, count=1)
    await rclient.xclaim(queue, GROUP, "crashed-2", 0, [entry])
    procs.worker(config)
    procs.webhooks(config)
    _, url = procs.ingress(config)
    completions = f"{url}/v1/chat/completions"

    async def submit(body: dict[str, Any], headers: dict[str, str] | None = None) -> str:
        status, job, _ = await call(http, "POST", f"{url}/v1/jobs", body, headers)
        assert status == 202, job
        return str(job["id"])

    async def final(job_id: str) -> str:
        async def done() -> str | None:
            status = await job_status(rclient, prefix, job_id)
            return status if status in m.FINAL_STATUSES else None

        return await eventually(done, what=f"job {job_id} final")

    # The poisoned entry is the worker's first work (a reclaim): its record, final,
    # lives RESULT_TTL_S from then, so it is looked at now, not after the traffic.
    assert await final(poison.id) == m.FAILED

    # Early async jobs whose records expire before the later traffic: the tenant's
    # index must not keep their ids.
    early = [await submit({"request": chat("mock")}, {"X-Request-Timeout": "1"}) for _ in range(3)]
    for job_id in early:
        assert await final(job_id) == m.COMPLETED

    # Sync, stream, cached (a miss, then a hit), Anthropic, embeddings, lowest-latency.
    for body in (
        chat("mock"),
        chat("fast"),
        chat("mock", temperature=0),
        chat("mock", stream=True),
    ):
        status, _, _ = await call(http, "POST", completions, body)
        assert status == 200
    status, _, headers = await call(http, "POST", completions, chat("mock", temperature=0))
    assert status == 200 and headers["X-Cache"] == "hit"
    anthropic = {"model": "mock", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    status, _, _ = await call(http, "POST", f"{url}/v1/messages", anthropic)
    assert status == 200
    status, _, _ = await call(http, "POST", f"{url}/v1/embeddings", {"model": "mock", "input": "x"})
    assert status == 200
    # Failed (sync and async) and expired (the client's deadline passed).
    status, _, _ = await call(http, "POST", completions, chat("mock-error-500"))
    assert status in (500, 502)
    failed = await submit({"request": chat("mock-error-400")})
    assert await final(failed) == m.FAILED  # (before its record's short TTL runs out)
    status, _, _ = await call(
        http, "POST", completions, chat("mock-latency-3000"), {"X-Request-Timeout": "0.5"}
    )
    assert status == 504
    # Async: plain, idempotent, with a webhook.
    plain = await submit({"request": chat("mock")})
    idem = await submit({"request": chat("mock")}, {"Idempotency-Key": "k-1"})
    hooked = await submit({"request": chat("mock"), "webhook_url": f"{receiver.url}/keys"})
    # Cancelled: an async job through the API, a sync call by its client going away.
    slow = await submit({"request": chat("mock-latency-5000")})
    await wait_in_flight(http, mock_url)
    status, _, _ = await call(http, "POST", f"{url}/v1/jobs/{slow}/cancel")
    assert status == 200
    try:
        async with http.post(
            completions,
            json=chat("mock-latency-5000"),
            headers=AUTH,
            timeout=aiohttp.ClientTimeout(total=0.5),
        ):
            raise AssertionError("the slow call answered")
    except TimeoutError:
        pass
    for job_id, expected in (
        (plain, m.COMPLETED),
        (idem, m.COMPLETED),
        (hooked, m.COMPLETED),
        (slow, m.CANCELLED),
    ):
        assert await final(job_id) == expected, job_id
    await receiver.deliveries("keys", 1)

    async def early_gone() -> bool:
        return not await rclient.exists(*(keys.job(j) for j in early))

    await eventually(early_gone, what="the early jobs' records to expire")
    assert await final(await submit({"request": chat("mock")})) == m.COMPLETED

    async def settled() -> bool:
        pending = await rclient.xpending(queue, GROUP)
        events = await rclient.xlen(keys.webhook_events())
        return bool(await rclient.xlen(queue) == 0 and pending["pending"] == 0 and events == 0)

    await eventually(settled, what="the queues to drain")

    found = await key_report(rclient, f"*{prefix}*")
    deployments = 2
    rows: dict[tuple[str, str], list[tuple[int, int, str]]] = {}
    unbounded = []
    for key, kind, ttl, length in found:
        why = verdict(key, kind, ttl, length, prefix, deployments)
        rows.setdefault((pattern(key, prefix), kind), []).append((ttl, length, why))
        if why == "UNBOUNDED":
            unbounded.append((key, kind, length))
    lines = [f"{'key':<44} {'type':<7} {'n':>4} {'ttl s':>13} {'max len':>8}  verdict"]
    for (shape, kind), got in sorted(rows.items()):
        ttls = sorted(t for t, _, _ in got)
        ttl_text = "none" if ttls[-1] < 0 else f"{ttls[0]}..{ttls[-1]}"
        verdicts = ",".join(sorted({w for _, _, w in got}))
        longest = max(n for _, n, _ in got)
        lines.append(f"{shape:<44} {kind:<7} {len(got):>4} {ttl_text:>13} {longest:>8}  {verdicts}")
    print("\n" + "\n".join(lines))

    # The tenant's index keeps no ids of jobs whose records expired.
    stale = []
    for key, kind, _, _ in found:
        if kind == "zset" and key.startswith(keys.tenant_jobs("")):
            ids = [i.decode() for i in await rclient.zrange(key, 0, -1)]
            stale += [i for i in ids if not await rclient.exists(keys.job(i))]
    print(f"ids of expired jobs still in a tenant's index: {len(stale)}")
    assert not unbounded, f"keys with neither a TTL nor a hard bound: {unbounded}"
    # Ids of jobs that expired before the last submission are gone; ids of jobs that
    # expired since then go with the next submission (it looks at the oldest few).
    assert not set(stale) & set(early), "the tenant's job index keeps ids of expired jobs"
    assert len(stale) <= 4, f"the tenant's job index keeps {len(stale)} ids of expired jobs"
