"""End to end: real ingress, worker, mock upstream and Redis processes, real clients."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis.asyncio as aioredis
from openai.types.chat import ChatCompletionMessageParam

from llm_broker.procs import Child
from llm_broker.shared.config import new_key
from llm_broker.shared.keys import Keys
from tests.conftest import (
    ConfigFactory,
    Procs,
    RedisServer,
    chat,
    mock_stats,
    wait_in_flight,
    write_config,
)
from tests.helpers import eventually, job_status

KEY, KEY_HASH = new_key()


@dataclass
class Stack:
    url: str
    mock_url: str
    redis_url: str
    prefix: str
    config: Path
    ingress: Child
    worker: Child


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One broker shared by the tests that do not stop any of its processes."""
    if redis_server.proc is None:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("stack")
    procs = Procs(tmp)
    try:
        _, mock_url = procs.mock()
        prefix = "e2e-shared:"
        config = write_config(
            tmp,
            redis_server.url,
            prefix,
            mock_url,
            auth={"keys": [{"tenant": "acme", "sha256": KEY_HASH}]},
            ingress={"max_body_bytes": 64 * 1024},
        )
        worker = procs.worker(config)
        ingress, url = procs.ingress(config)
        yield Stack(url, mock_url, redis_server.url, prefix, config, ingress, worker)
    finally:
        procs.stop_all()


@pytest.fixture
async def sdk(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0)
    yield client
    await client.close()


AUTH = {"Authorization": f"Bearer {KEY}"}


async def direct_mock(
    http: aiohttp.ClientSession, mock_url: str, body: dict[str, Any]
) -> dict[str, Any]:
    async with http.post(f"{mock_url}/v1/chat/completions", json=body) as resp:
        result: dict[str, Any] = await resp.json()
        return result


async def test_openai_sdk_gets_the_upstream_content_and_usage(
    stack: Stack,
    sdk: openai.AsyncOpenAI,
    http: aiohttp.ClientSession,
) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name three rivers"},
    ]
    result = await sdk.chat.completions.create(model="gpt-4o-mini", messages=messages)
    expected = await direct_mock(http, stack.mock_url, {"model": "mock", "messages": messages})
    assert result.object == "chat.completion"
    assert result.model == "gpt-4o-mini"
    assert result.choices[0].message.content == expected["choices"][0]["message"]["content"]
    assert result.choices[0].finish_reason == "stop"
    assert result.usage is not None
    assert result.usage.model_dump() == {
        **expected["usage"],
        **result.usage.model_dump(include={"completion_tokens_details", "prompt_tokens_details"}),
    }
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens


async def test_openai_sdk_streams_chunks_and_the_usage_chunk(
    stack: Stack,
    sdk: openai.AsyncOpenAI,
    http: aiohttp.ClientSession,
) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Count to twenty"}]
    stream = await sdk.chat.completions.create(
        model="mock-chunks-20",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    expected = await direct_mock(
        http, stack.mock_url, {"model": "mock-chunks-20", "messages": messages}
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected["choices"][0]["message"]["content"]
    assert len(content.split()) == 20
    assert all(c.object == "chat.completion.chunk" and c.model == "mock-chunks-20" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == "stop"
    assert not chunks[-1].choices
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == expected["usage"]["prompt_tokens"]


async def test_stream_without_include_usage_has_no_usage_chunk(
    stack: Stack,
    http: aiohttp.ClientSession,
) -> None:
    async with http.post(
        f"{stack.url}/v1/chat/completions", headers=AUTH, json=chat("mock-chunks-3", stream=True)
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        body = await resp.read()
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c or c["usage"] is None for c in chunks)


async def test_models_lists_the_configured_names(stack: Stack, sdk: openai.AsyncOpenAI) -> None:
    models = [m.id async for m in sdk.models.list()]
    assert models == ["gpt-4o-mini"]


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": KEY}]
)
async def test_missing_or_wrong_key_gets_401(
    stack: Stack,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
) -> None:
    async with http.post(f"{stack.url}/v1/chat/completions", json=chat(), headers=headers) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error"]["type"] == "authentication_error"
    assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_openai_sdk_with_a_wrong_key_raises_authentication_error(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="sk-nope", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
            )
    finally:
        await client.close()


BAD_INPUTS = [
    # (name, method, path, body, content type, status, code, param)
    (
        "malformed json",
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini",',
        "application/json",
        400,
        "invalid_json",
        None,
    ),
    (
        "not an object",
        "POST",
        "/v1/chat/completions",
        b"[1, 2]",
        "application/json",
        400,
        None,
        None,
    ),
    ("empty body", "POST", "/v1/chat/completions", b"", "application/json", 400, None, None),
    (
        "temperature not a number",
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}],'
        b' "temperature": "hot"}',
        "application/json",
        400,
        None,
        "temperature",
    ),
    (
        "missing messages",
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini"}',
        "application/json",
        400,
        None,
        "messages",
    ),
    (
        "empty messages",
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": []}',
        "application/json",
        400,
        None,
        "messages",
    ),
    (
        "bad role",
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": [{"role": "wizard", "content": "x"}]}',
        "application/json",
        400,
        None,
        "messages[0].role",
    ),
    (
        "missing model",
        "POST",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}]}',
        "application/json",
        400,
        None,
        "model",
    ),
    (
        "unknown model",
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}',
        "application/json",
        404,
        "model_not_found",
        "model",
    ),
    (
        "wrong content type",
        "POST",
        "/v1/chat/completions",
        b"model=gpt-4o-mini",
        "application/x-www-form-urlencoded",
        415,
        "unsupported_media_type",
        None,
    ),
    (
        "body over the limit",
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        + b"x" * (70 * 1024)
        + b'"}]}',
        "application/json",
        413,
        "request_too_large",
        None,
    ),
    ("unknown route", "GET", "/v1/nothing-here", None, None, 404, "not_found", None),
    ("wrong method", "GET", "/v1/chat/completions", None, None, 405, "method_not_allowed", None),
    (
        "bad timeout header",
        "POST",
        "/v1/chat/completions",
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}',
        "application/json",
        400,
        None,
        "X-Request-Timeout",
    ),
]


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "ctype", "status", "code", "param"),
    BAD_INPUTS,
    ids=[b[0] for b in BAD_INPUTS],
)
async def test_bad_input_gets_a_clear_4xx_error_object(
    stack: Stack,
    http: aiohttp.ClientSession,
    name: str,
    method: str,
    path: str,
    body: bytes | None,
    ctype: str | None,
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    headers = dict(AUTH)
    if ctype:
        headers["Content-Type"] = ctype
    if name == "bad timeout header":
        headers["X-Request-Timeout"] = "soon"
    started = time.monotonic()
    async with http.request(method, f"{stack.url}{path}", data=body, headers=headers) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
    assert time.monotonic() - started < 2
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param


async def test_bad_inputs_leave_nothing_queued(
    stack: Stack,
    http: aiohttp.ClientSession,
    sdk: openai.AsyncOpenAI,
) -> None:
    client = aioredis.Redis.from_url(stack.redis_url)
    try:
        for bad in (b"{", b'{"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}'):
            async with http.post(
                f"{stack.url}/v1/chat/completions",
                data=bad,
                headers={**AUTH, "Content-Type": "application/json"},
            ) as resp:
                assert resp.status in (400, 404)
        result = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "still fine?"}]
        )
        assert result.choices[0].message.content
        assert await client.xlen(Keys(stack.prefix).queue("mock")) == 0
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("model", "status", "etype"),
    [
        ("mock-error-400", 400, "invalid_request_error"),
        ("mock-error-422", 422, "api_error"),  # the upstream's own type is kept
        ("mock-error-500", 502, "server_error"),
        ("mock-error-503", 502, "server_error"),
    ],
)
async def test_upstream_errors_map_to_openai_errors(
    stack: Stack,
    http: aiohttp.ClientSession,
    model: str,
    status: int,
    etype: str,
) -> None:
    for stream in (False, True):
        async with http.post(
            f"{stack.url}/v1/chat/completions", headers=AUTH, json=chat(model, stream=stream)
        ) as resp:
            assert resp.status == status
            error = (await resp.json())["error"]
        assert error["type"] == etype
        assert f"mock upstream error {model.rsplit('-', 1)[1]}" in error["message"]


async def test_upstream_429_keeps_its_retry_after(
    stack: Stack,
    http: aiohttp.ClientSession,
) -> None:
    async with http.post(
        f"{stack.url}/v1/chat/completions", headers=AUTH, json=chat("mock-error-429-retryafter-7")
    ) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "7"
        assert resp.headers["X-Request-Id"]
        assert (await resp.json())["error"]["type"] == "rate_limit_error"


async def test_openai_sdk_sees_upstream_400_as_bad_request(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await sdk.chat.completions.create(
            model="mock-error-400", messages=[{"role": "user", "content": "x"}]
        )


async def test_stream_cut_by_the_upstream_ends_with_an_error_event(
    stack: Stack,
    http: aiohttp.ClientSession,
) -> None:
    async with http.post(
        f"{stack.url}/v1/chat/completions",
        headers=AUTH,
        json=chat("mock-chunks-10-delay-5-failafter-3", stream=True),
    ) as resp:
        assert resp.status == 200
        body = (await resp.read()).decode()
    events = [e.removeprefix("data: ") for e in body.split("\n\n") if e]
    last = orjson.loads(events[-1])
    assert last["error"]["code"] == "upstream_stream_interrupted"
    assert "[DONE]" not in body


async def test_request_timeout_header_gives_504(
    stack: Stack,
    http: aiohttp.ClientSession,
) -> None:
    started = time.monotonic()
    async with http.post(
        f"{stack.url}/v1/chat/completions",
        headers={**AUTH, "X-Request-Timeout": "0.5"},
        json=chat("mock-latency-3000"),
    ) as resp:
        assert resp.status == 504
        error = (await resp.json())["error"]
    elapsed = time.monotonic() - started
    assert 0.45 < elapsed < 1.5
    assert error["type"] == "timeout"


async def test_health_ready_and_metrics(stack: Stack, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{stack.url}/health") as resp:
        assert resp.status == 200
    async with http.get(f"{stack.url}/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"
    async with http.post(f"{stack.url}/v1/chat/completions", headers=AUTH, json=chat()) as resp:
        assert resp.status == 200
    async with http.get(f"{stack.url}/metrics") as resp:
        text = await resp.text()
    assert (
        'llm_broker_requests_total{endpoint="/v1/chat/completions",model="gpt-4o-mini",'
        'provider="mock",status="200"}' in text
    )
    assert "llm_broker_request_duration_seconds_bucket" in text


# ---------------------------------------------------------------- tests that break things


async def test_deadline_passed_in_the_queue_gives_504_and_never_runs(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    rclient: aioredis.Redis,
    prefix: str,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url)
    _, url = procs.ingress(config)  # no worker yet: the job waits in the queue
    async with http.post(
        f"{url}/v1/chat/completions", json=chat(), headers={"X-Request-Timeout": "0.3"}
    ) as resp:
        assert resp.status == 504
        job_id = resp.headers["X-Request-Id"]
    procs.worker(config)
    queue = Keys(prefix).queue("mock")

    async def drained() -> bool:
        return bool(await rclient.xlen(queue) == 0)

    await eventually(drained, what="the worker to drop the expired job")
    assert (await mock_stats(http, mock_url))["calls"] == 0
    statuses = [
        await job_status(rclient, prefix, k.decode().rsplit(":", 1)[1])
        async for k in rclient.scan_iter(f"{prefix}job:*")
    ]
    assert statuses == ["expired"]
    assert await job_status(rclient, prefix, job_id) == "expired"


async def test_full_queue_answers_429_with_retry_after(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    rclient: aioredis.Redis,
    prefix: str,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, providers={"mock": {"max_queue_depth": 2}})
    _, url = procs.ingress(config)  # no worker: the queue only fills
    waiting = [
        asyncio.ensure_future(
            http.post(f"{url}/v1/chat/completions", json=chat(), headers={"X-Request-Timeout": "2"})
        )
        for _ in range(2)
    ]
    try:
        # No worker has offered a slot: both wait for one.
        queue = Keys(prefix).waiting_index("mock", "interactive")

        async def two_queued() -> bool:
            return bool(await rclient.zcard(queue) == 2)

        await eventually(two_queued, what="two jobs in the queue")
        started = time.monotonic()
        async with http.post(
            f"{url}/v1/chat/completions", json=chat(), headers={"X-Request-Timeout": "2"}
        ) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == "1"
            error = (await resp.json())["error"]
        assert time.monotonic() - started < 1
        assert error["code"] == "queue_full"
        assert error["type"] == "rate_limit_error"
        assert await rclient.zcard(queue) == 2
    finally:
        for fut in waiting:
            resp = await fut
            assert resp.status == 504
            resp.release()


@pytest.mark.chaos
async def test_redis_down_gives_503_fast_and_service_recovers(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
    redis_up: RedisServer,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url)
    procs.worker(config)
    _, url = procs.ingress(config)
    async with http.post(f"{url}/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    redis_up.stop()
    try:
        for _ in range(3):
            started = time.monotonic()
            async with http.post(f"{url}/v1/chat/completions", json=chat()) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
                error = (await resp.json())["error"]
                # No connection could be made: the request was never admitted.
                assert error["type"] == "service_unavailable"
                assert "job_id" not in error
                assert "was not admitted" in error["message"]
            assert time.monotonic() - started < 1.0
        async with http.get(f"{url}/ready") as resp:
            assert resp.status == 503
        async with http.get(f"{url}/health") as resp:
            assert resp.status == 200
    finally:
        redis_up.start()

    async def serving() -> bool:
        async with http.post(
            f"{url}/v1/chat/completions", json=chat(), headers={"X-Request-Timeout": "5"}
        ) as resp:
            return resp.status == 200

    await eventually(serving, timeout=20, what="service to resume after Redis came back")
    async with http.get(f"{url}/ready") as resp:
        assert resp.status == 200


@pytest.mark.chaos
async def test_sigterm_to_a_worker_mid_request_still_completes_it(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url)
    worker = procs.worker(config)
    _, url = procs.ingress(config)
    request = asyncio.ensure_future(
        http.post(f"{url}/v1/chat/completions", json=chat("mock-latency-2000"))
    )

    await wait_in_flight(http, mock_url)
    worker.send_signal(signal.SIGTERM)
    resp = await request
    async with resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["choices"][0]["message"]["content"]
    assert await asyncio.to_thread(worker.proc.wait, 10) == 0


async def test_ingress_sigterm_fails_ready_then_drains_in_flight_requests(
    procs: Procs,
    make_config: ConfigFactory,
    http: aiohttp.ClientSession,
) -> None:
    _, mock_url = procs.mock()
    config = make_config(mock_url, ingress={"shutdown_delay_s": 1.5})
    procs.worker(config)
    ingress, url = procs.ingress(config)
    request = asyncio.ensure_future(
        http.post(f"{url}/v1/chat/completions", json=chat("mock-latency-2500"))
    )

    await wait_in_flight(http, mock_url)
    ingress.send_signal(signal.SIGTERM)

    async def not_ready() -> bool:
        async with http.get(f"{url}/ready") as resp:
            return resp.status == 503 and (await resp.json())["status"] == "draining"

    await eventually(not_ready, timeout=1, what="/ready to fail after SIGTERM")
    # Within the shutdown delay new requests are still served.
    async with http.post(f"{url}/v1/chat/completions", json=chat()) as resp:
        assert resp.status == 200
    resp = await request
    async with resp:
        assert resp.status == 200
    assert await asyncio.to_thread(ingress.proc.wait, 10) == 0
