"""Honest overload: a saturated ingress sheds new requests with 503 ``overloaded``
before doing any work, /ready says so, and a Redis command that failed after it may
have admitted a job names that job (real processes, on loopback)."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from typing import Any

import aiohttp
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_broker.ingress.overload import RedisProbe
from llm_broker.shared.redisio import Batcher, NotSent, maybe_ran
from tests.conftest import ConfigFactory, Procs, RedisServer, chat, mock_stats, wait_in_flight
from tests.helpers import eventually
from tests.test_observability import scrape, value


async def test_a_full_process_sheds_new_requests_at_once_and_admits_none(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, ingress={"overload": {"max_in_flight": 2}})
    procs.worker(config)
    _, url = procs.ingress(config)
    slow = chat("mock-latency-1500")
    held = [asyncio.ensure_future(http.post(f"{url}/v1/chat/completions", json=slow))]
    held.append(asyncio.ensure_future(http.post(f"{url}/v1/chat/completions", json=slow)))
    await wait_in_flight(http, mock_url, 2)

    async with http.get(f"{url}/ready") as resp:
        assert resp.status == 503
        assert (await resp.json())["status"] == "overloaded"

    async def shed(path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any, float]:
        started = time.monotonic()
        async with http.post(f"{url}{path}", json=body) as resp:
            return resp.status, dict(resp.headers), await resp.json(), time.monotonic() - started

    answers = await asyncio.gather(*(shed("/v1/chat/completions", chat()) for _ in range(6)))
    for status, headers, body, seconds in answers:
        assert status == 503
        assert headers["Retry-After"] == "1"
        assert body["error"]["code"] == "overloaded"
        assert body["error"]["type"] == "overloaded_error"
        assert "job_id" not in body["error"]
        assert "X-Request-Id" not in headers  # never became a job
        assert seconds < 0.5
    status, _, body, _ = await shed(
        "/v1/messages",
        {"model": "mock", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert (status, body["type"], body["error"]["type"]) == (503, "error", "overloaded_error")
    async with http.post(f"{url}/v1/jobs", json=chat()) as resp:
        assert resp.status == 503
    # A job's status is a read, and reads are still answered.
    async with http.get(f"{url}/v1/jobs/nosuchjob") as resp:
        assert resp.status == 404

    for fut in held:
        async with await fut as resp:
            assert resp.status == 200
    assert (await mock_stats(http, mock_url))["calls"] == 2  # nothing shed reached a worker
    async with http.post(f"{url}/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    async with http.get(f"{url}/ready") as resp:
        assert resp.status == 200
    samples, _ = await scrape(http, f"{url}/metrics")
    assert value(samples, "llm_broker_shed_requests_total", reason="in_flight") == 8


async def test_a_lagging_event_loop_sheds_until_it_catches_up(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, ingress={"overload": {"max_lag_ms": 200}})
    procs.worker(config)
    ingress, url = procs.ingress(config)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as client:
        async with client.post(f"{url}/v1/chat/completions", json=chat()) as resp:
            assert resp.status == 200
        # The CPU hog: the process gets no CPU at all for 0.6 s while requests arrive.
        os.kill(ingress.pid, signal.SIGSTOP)
        try:
            sent = [
                asyncio.ensure_future(client.post(f"{url}/v1/chat/completions", json=chat()))
                for _ in range(8)
            ]
            await asyncio.sleep(0.6)  # the stimulus: how long the process stays stopped
        finally:
            os.kill(ingress.pid, signal.SIGCONT)
        statuses = []
        for fut in sent:
            async with await fut as resp:
                body = await resp.json()
                statuses.append(resp.status)
                if resp.status != 200:
                    assert resp.status == 503
                    assert body["error"]["code"] == "overloaded", body
                    assert "job_id" not in body["error"]
        assert 503 in statuses

        async def serving() -> bool:
            async with client.post(f"{url}/v1/chat/completions", json=chat()) as resp:
                body = await resp.json()
                statuses.append(resp.status)
                if resp.status != 200:
                    assert body["error"]["code"] == "overloaded", body
                return resp.status == 200

        await eventually(serving, what="requests to succeed once the loop caught up")
    samples, _ = await scrape(http, f"{url}/metrics")
    shed = value(samples, "llm_broker_shed_requests_total", reason="lag")
    assert shed == statuses.count(503)
    # Every request that was not shed reached the upstream; none that was shed did.
    assert (await mock_stats(http, mock_url))["calls"] == 1 + statuses.count(200)


async def test_a_redis_command_that_timed_out_after_admitting_names_its_job(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    redis_up: RedisServer,
) -> None:
    """Redis takes the admission but answers after the command timeout (it stalls
    for 1.2 s: a fork, a slow disk, a busy host). The client's error names the job
    it may have become; the job runs and its result is readable by that id."""
    _, mock_url = procs.mock()
    config = make_config(mock_url)
    procs.worker(config)
    _, url = procs.ingress(config)
    async with http.post(f"{url}/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    assert redis_up.proc is not None
    redis_up.proc.send_signal(signal.SIGSTOP)
    try:
        call = asyncio.ensure_future(
            http.post(f"{url}/v1/chat/completions", json=chat(content="late"))
        )
        await asyncio.sleep(1.2)  # the stimulus: how long Redis stalls
    finally:
        redis_up.proc.send_signal(signal.SIGCONT)
    async with await call as resp:
        body = await resp.json()
        assert resp.status == 503, body
        assert resp.headers["Retry-After"] == "1"
        error = body["error"]
        job_id = error["job_id"]
        assert resp.headers["X-Request-Id"] == job_id
    assert error["code"] in ("overloaded", "service_unavailable")
    assert f"GET /v1/jobs/{job_id}" in error["message"]

    async def completed() -> dict[str, Any] | None:
        async with http.get(f"{url}/v1/jobs/{job_id}") as resp:
            record: dict[str, Any] = await resp.json()
            return record if resp.status == 200 and record["status"] == "completed" else None

    record = await eventually(completed, timeout=15, what="the admitted job to complete")
    assert record["result"]["choices"][0]["message"]["content"]


def test_only_a_command_that_left_may_have_run() -> None:
    """Which Redis failures leave a request's admission in doubt."""
    assert maybe_ran(TimeoutError())  # sent, no answer in time
    assert maybe_ran(RedisConnectionError("Connection closed by server."))
    assert not maybe_ran(NotSent("Redis did not answer in time"))  # waited, never sent
    assert not maybe_ran(RedisConnectionError("Error 111 connecting to 127.0.0.1:1. refused."))
    assert not maybe_ran(RedisTimeoutError("Timeout connecting to server"))
    assert not maybe_ran(RedisConnectionError("No connection available."))


class _SilentRedis:
    """A Redis client whose PING never answers (or is refused)."""

    def __init__(self, refuse: bool) -> None:
        self.refuse = refuse

    async def ping(self) -> bool:
        if self.refuse:
            raise RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        await asyncio.sleep(10)
        return True


async def test_a_ping_that_times_out_on_a_late_event_loop_does_not_blame_redis() -> None:
    """Under a CPU-bound neighbour the probe's own PING can time out because this
    process is late: that is overload, not Redis down. A refused connection, or a
    timeout on a punctual loop, is Redis down."""
    for refuse, lag, answers in ((False, 0.5, True), (False, 0.0, False), (True, 0.5, False)):
        client: Any = _SilentRedis(refuse)
        batcher = Batcher(client, timeout=1.0, lag=functools.partial(float, lag))
        probe = RedisProbe(client, batcher, timeout_s=0.05)
        assert await probe.answers(since=asyncio.get_running_loop().time()) is answers
