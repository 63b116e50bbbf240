"""Providers, the Anthropic API, routing, retries, fallbacks, circuit breakers,
client disconnects, key rotation and the response cache, end to end.

Two mock upstreams (``A`` and ``B``) behind one worker and one ingress on the
session's real Redis; the official ``openai`` and ``anthropic`` SDKs as clients.
Upstream failures are switched on and off with the mock's ``/mock/fail``.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
from multidict import CIMultiDict

from llm_broker.dev import free_port
from llm_broker.procs import Child
from llm_broker.shared.config import new_key
from tests.conftest import Procs, RedisServer, chat, mock_stats, write_config
from tests.helpers import eventually

KEY_A, HASH_A = new_key()
KEY_B, HASH_B = new_key()
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}
AUTH_B = {"Authorization": f"Bearer {KEY_B}"}
TOOLS_OPENAI = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Look a word up",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    }
]
TOOLS_ANTHROPIC = [
    {
        "name": "lookup",
        "description": "Look a word up",
        "input_schema": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
        },
    }
]


@dataclass
class Stack:
    url: str
    a: str  # mock A
    b: str  # mock B
    worker: Child
    worker_metrics: str
    key_file: Path
    keys_seen: list[str]


def _secret(tmp: Path, name: str, keys_seen: list[str]) -> Path:
    key = f"sk-test-{name}-{secrets.token_hex(8)}"
    keys_seen.append(key)
    path = tmp / f"{name}.key"
    path.write_text(key + "\n")
    return path


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if redis_server.proc is None:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("providers")
    procs = Procs(tmp)
    keys_seen: list[str] = []
    try:
        _, a = procs.mock()
        _, b = procs.mock()
        key_file = _secret(tmp, "keyed", keys_seen)
        fast_retry = {"max_retries": 1, "base_s": 0.05, "max_s": 0.1}
        config = write_config(
            tmp,
            redis_server.url,
            "providers:",
            a,
            auth={
                "keys": [
                    {"tenant": "alpha", "sha256": HASH_A},
                    {"tenant": "beta", "sha256": HASH_B},
                ]
            },
            providers={
                "a": {
                    "type": "mock",
                    "base_url": f"{a}/v1",
                    "retry": fast_retry,
                    "circuit": {"failures": 3, "open_s": 1.5},
                },
                "b": {"type": "mock", "base_url": f"{b}/v1"},
                "anth": {
                    "type": "anthropic",
                    "base_url": f"{a}/v1",
                    "api_key_file": str(_secret(tmp, "anth", keys_seen)),
                },
                "az": {
                    "type": "azure",
                    "base_url": a,
                    "api_version": "2024-10-21",
                    "api_key_file": str(_secret(tmp, "azure", keys_seen)),
                },
                "keyed": {"type": "openai", "base_url": f"{b}/v1", "api_key_file": str(key_file)},
                "rl": {"type": "mock", "base_url": f"{b}/v1", "rpm": 3},
                "parked": {"type": "mock", "base_url": f"{b}/v1"},
                "slow": {
                    "type": "mock",
                    "base_url": f"{b}/v1",
                    "timeout_s": 0.5,
                    "retry": {"max_retries": 0},
                },
            },
            models={
                "gpt-x": {"provider": "a", "model": "mock"},
                "claude-x": {"provider": "anth", "model": "mock"},
                "azure-x": {"provider": "az", "model": "dep1"},
                "keyed-x": {"provider": "keyed", "model": "mock"},
                "rl-x": {"provider": "rl", "model": "mock"},
                "parked-x": {"provider": "parked", "model": "mock"},
                "slow-x": {"provider": "slow", "model": "mock"},
                "fallback-x": {
                    "deployments": [
                        {"provider": "a", "model": "mock-fb", "weight": 1},
                        {"provider": "b", "model": "mock", "weight": 0},
                    ]
                },
                "fallback429-x": {
                    "deployments": [
                        {"provider": "a", "model": "mock-fbtwo", "weight": 1},
                        {"provider": "b", "model": "mock", "weight": 0},
                    ]
                },
                "circuit-x": {
                    "deployments": [
                        {"provider": "a", "model": "mock-cb", "weight": 1},
                        {"provider": "b", "model": "mock", "weight": 0},
                    ]
                },
                "least-x": {
                    "strategy": "least-queued",
                    "deployments": [
                        {"provider": "parked", "model": "mock"},
                        {"provider": "b", "model": "mock"},
                    ],
                },
                "fast-x": {
                    "strategy": "lowest-latency",
                    "deployments": [
                        {"provider": "a", "model": "mock-latency-300"},
                        {"provider": "b", "model": "mock"},
                    ],
                },
            },
            limits={"window_s": 2},
            cache={"enabled": True, "ttl_s": 60},
        )
        metrics_port = free_port()
        worker = procs.worker(
            config,
            "--metrics-port",
            str(metrics_port),
            providers=["a", "b", "anth", "az", "keyed", "rl", "slow"],
        )
        _, url = procs.ingress(config)
        yield Stack(
            url, a, b, worker, f"http://127.0.0.1:{metrics_port}/metrics", key_file, keys_seen
        )
    finally:
        procs.stop_all()


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        for mock in (stack.a, stack.b):
            async with session.post(f"{mock}/mock/reset") as resp:
                assert resp.status == 200
        yield session


@pytest.fixture
async def oai(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=KEY_A, max_retries=0)
    yield client
    await client.close()


@pytest.fixture
async def claude(stack: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=stack.url, api_key=KEY_A, max_retries=0)
    yield client
    await client.close()


async def fail(http: aiohttp.ClientSession, mock: str, **how: Any) -> None:
    async with http.post(f"{mock}/mock/fail", json=how) as resp:
        assert resp.status == 200


async def calls(http: aiohttp.ClientSession, mock: str) -> int:
    return int((await mock_stats(http, mock))["calls"])


async def post_chat(
    http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, CIMultiDict[str], Any]:
    async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers=headers) as resp:
        return resp.status, CIMultiDict(resp.headers), await resp.json()


async def metric(http: aiohttp.ClientSession, url: str, name: str, **labels: str) -> float:
    """The value of one sample on a /metrics page (0 when absent)."""
    async with http.get(url) as resp:
        text = await resp.text()
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---------------------------------------------------------------- Anthropic API


@pytest.mark.parametrize("model", ["gpt-x", "claude-x"])
async def test_anthropic_sdk_against_messages(
    stack: Stack, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic, model: str
) -> None:
    """The official SDK, plain and streaming, on an OpenAI-style and an Anthropic-style
    deployment; the answers match the same request made through the OpenAI API."""
    messages: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": "Tell me about rivers"},
        {"role": "assistant", "content": "Which ones?"},
        {"role": "user", "content": "Old stone bridges"},
    ]
    message = await claude.messages.create(
        model=model, max_tokens=100, system="Be brief.", messages=messages
    )
    assert message.type == "message" and message.role == "assistant"
    # A translated answer carries the model asked for; an Anthropic deployment's
    # comes as it answered, with the model it ran (here the mock's name).
    assert message.model == (model if model == "gpt-x" else "mock")
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0

    async with claude.messages.stream(
        model=model, max_tokens=100, system="Be brief.", messages=messages
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 1
    assert "".join(pieces) == message.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == message.usage.output_tokens

    status, _, body = await post_chat(
        http,
        stack,
        {
            "model": model,
            "messages": [{"role": "system", "content": "Be brief."}, *messages],
        },
        AUTH_A,
    )
    assert status == 200
    assert body["choices"][0]["message"]["content"] == message.content[0].text
    stats = await mock_stats(http, stack.a)
    if model == "claude-x":
        # The Anthropic-style deployment was called in Anthropic's format, with its key.
        assert stats["calls_by_path"].get("/v1/messages", 0) >= 3
        assert stats["x_api_key_seen"][-1] == stack.keys_seen[1]
    else:
        assert stats["calls_by_path"].get("/v1/chat/completions", 0) >= 3


async def test_anthropic_sdk_tool_calls_through_openai_deployment(
    claude: anthropic.AsyncAnthropic,
) -> None:
    first = await claude.messages.create(
        model="gpt-x",
        max_tokens=100,
        tools=TOOLS_ANTHROPIC,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "bridges please"}],
    )
    assert first.stop_reason == "tool_use"
    use = next(block for block in first.content if block.type == "tool_use")
    assert use.name == "lookup" and isinstance(use.input, dict) and use.input
    async with claude.messages.stream(
        model="gpt-x",
        max_tokens=100,
        tools=TOOLS_ANTHROPIC,  # type: ignore[arg-type]
        messages=[{"role": "user", "content": "bridges please"}],
    ) as stream:
        streamed = await stream.get_final_message()
    streamed_use = next(block for block in streamed.content if block.type == "tool_use")
    assert (streamed_use.name, streamed_use.input) == (use.name, use.input)
    follow_up: list[Any] = [
        {"role": "user", "content": "bridges please"},
        {"role": "assistant", "content": [use.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "stone arches"}],
        },
    ]
    answer = await claude.messages.create(
        model="gpt-x",
        max_tokens=100,
        tools=TOOLS_ANTHROPIC,  # type: ignore[arg-type]
        messages=follow_up,
    )
    assert answer.stop_reason == "end_turn"
    assert answer.content[0].type == "text" and answer.content[0].text


async def test_openai_sdk_tool_calls_through_anthropic_deployment(
    oai: openai.AsyncOpenAI,
) -> None:
    first = await oai.chat.completions.create(
        model="claude-x",
        messages=[{"role": "user", "content": "bridges please"}],
        tools=TOOLS_OPENAI,  # type: ignore[arg-type]
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "lookup"  # type: ignore[union-attr]
    arguments = orjson.loads(call.function.arguments)  # type: ignore[union-attr]
    assert isinstance(arguments, dict) and arguments

    stream: Any = await oai.chat.completions.create(
        model="claude-x",
        messages=[{"role": "user", "content": "bridges please"}],
        tools=TOOLS_OPENAI,  # type: ignore[arg-type]
        stream=True,
    )
    name, pieces, finish = "", [], None
    async for chunk in stream:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if delta_call.function and delta_call.function.name:
                name = delta_call.function.name
            if delta_call.function and delta_call.function.arguments:
                pieces.append(delta_call.function.arguments)
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    assert (name, orjson.loads("".join(pieces)), finish) == ("lookup", arguments, "tool_calls")

    answer = await oai.chat.completions.create(
        model="claude-x",
        messages=[
            {"role": "user", "content": "bridges please"},
            {"role": "assistant", "tool_calls": [call.model_dump()]},  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "stone arches"},
        ],
        tools=TOOLS_OPENAI,  # type: ignore[arg-type]
    )
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content


async def test_messages_bad_input_gets_anthropic_errors(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    url = f"{stack.url}/v1/messages"
    good = {"model": "gpt-x", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}
    cases: list[tuple[dict[str, str], bytes, int, str]] = [
        ({}, orjson.dumps(good), 401, "authentication_error"),
        ({"x-api-key": "wrong"}, orjson.dumps(good), 401, "authentication_error"),
        (AUTH_A, b"", 400, "invalid_request_error"),
        (AUTH_A, b"{not json", 400, "invalid_request_error"),
        (AUTH_A, b"[1]", 400, "invalid_request_error"),
        (AUTH_A, orjson.dumps({**good, "max_tokens": None}), 400, "invalid_request_error"),
        (AUTH_A, orjson.dumps({**good, "messages": []}), 400, "invalid_request_error"),
        (
            AUTH_A,
            orjson.dumps({**good, "messages": [{"role": "robot", "content": "x"}]}),
            400,
            "invalid_request_error",
        ),
        (AUTH_A, orjson.dumps({**good, "model": "nope"}), 404, "not_found_error"),
    ]
    before = await calls(http, stack.a)
    for headers, body, status, etype in cases:
        async with http.post(
            url, data=body, headers={**headers, "Content-Type": "application/json"}
        ) as resp:
            assert resp.status == status, body
            found = await resp.json()
        assert found["type"] == "error"
        assert found["error"]["type"] == etype
        assert found["error"]["message"]
    assert await calls(http, stack.a) == before


async def test_x_api_key_authenticates_like_bearer(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    status, _, body = await post_chat(http, stack, chat("gpt-x"), {"x-api-key": KEY_A})
    assert status == 200 and body["choices"][0]["message"]["content"]


# ---------------------------------------------------------------- Azure, embeddings


async def test_azure_deployment_url_version_and_key(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    answer = await oai.chat.completions.create(
        model="azure-x", messages=[{"role": "user", "content": "hello"}]
    )
    assert answer.model == "azure-x" and answer.choices[0].message.content
    stats = await mock_stats(http, stack.a)
    assert stats["calls_by_path"] == {"/openai/deployments/dep1/chat/completions": 1}
    assert stats["api_key_seen"] == [stack.keys_seen[2]]
    assert stats["api_version_seen"] == "2024-10-21"


async def test_embeddings_through_the_queue(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    found = await oai.embeddings.create(model="gpt-x", input=["stone", "bridge"])
    assert [d.index for d in found.data] == [0, 1]
    assert len(found.data[0].embedding) > 0 and found.model == "gpt-x"
    azure = await oai.embeddings.create(model="azure-x", input="stone")
    assert len(azure.data) == 1
    stats = await mock_stats(http, stack.a)
    assert stats["calls_by_path"] == {
        "/v1/embeddings": 1,
        "/openai/deployments/dep1/embeddings": 1,
    }
    for body, status in (
        ({"model": "claude-x", "input": "x"}, 400),  # Anthropic has no embeddings API
        ({"model": "gpt-x", "input": ""}, 400),
        ({"model": "gpt-x", "input": []}, 400),
        ({"model": "gpt-x"}, 400),
        ({"model": "gpt-x", "input": {"a": 1}}, 400),
        ({"model": "nope", "input": "x"}, 404),
    ):
        async with http.post(f"{stack.url}/v1/embeddings", json=body, headers=AUTH_A) as resp:
            assert resp.status == status, body
            assert (await resp.json())["error"]["message"]
    assert await calls(http, stack.a) == 2


# ---------------------------------------------------------------- retries, fallback, circuit


async def _history(http: aiohttp.ClientSession, stack: Stack, job_id: str) -> list[Any]:
    async with http.get(f"{stack.url}/v1/jobs/{job_id}", headers=AUTH_A) as resp:
        assert resp.status == 200
        history: list[Any] = (await resp.json())["history"]
        return history


@pytest.mark.parametrize(("model", "status"), [("fallback-x", 500), ("fallback429-x", 429)])
async def test_fallback_to_the_next_deployment(
    stack: Stack, http: aiohttp.ClientSession, model: str, status: int
) -> None:
    await fail(http, stack.a, status=status, times=-1, retry_after="0")
    code, headers, body = await post_chat(http, stack, chat(model), AUTH_A)
    assert code == 200 and body["choices"][0]["message"]["content"]
    assert body["model"] == model
    assert await calls(http, stack.a) == 2  # the call and its one retry
    assert await calls(http, stack.b) == 1
    history = await _history(http, stack, headers["X-Request-Id"])
    assert [(h["deployment"], h["retries"]) for h in history] == [
        (f"a/{'mock-fb' if status == 500 else 'mock-fbtwo'}", 1),
        ("b/mock", 0),
    ]
    assert history[0]["status"] == (502 if status == 500 else 429)
    assert history[1]["status"] == 200


async def test_circuit_opens_then_closes_after_a_probe(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    gauge = ("llm_broker_circuit_state", {"deployment": "a/mock-cb"})
    await fail(http, stack.a, status=500, times=-1)
    # Three failures (a call, its retry, the next job's call) open the circuit.
    for _ in range(2):
        code, _, _ = await post_chat(http, stack, chat("circuit-x"), AUTH_A)
        assert code == 200
    assert await calls(http, stack.a) == 3
    assert await metric(http, stack.worker_metrics, gauge[0], **gauge[1]) == 1
    # Open: jobs go straight to the next deployment.
    code, _, _ = await post_chat(http, stack, chat("circuit-x"), AUTH_A)
    assert code == 200
    assert await calls(http, stack.a) == 3
    await fail(http, stack.a, times=0)
    started = time.monotonic()

    async def probed() -> bool:
        code, _, _ = await post_chat(http, stack, chat("circuit-x"), AUTH_A)
        assert code == 200
        return await calls(http, stack.a) == 4

    await eventually(probed, what="a probe call to the recovered deployment")
    assert time.monotonic() - started >= 1.0  # not before the circuit's open time
    assert await metric(http, stack.worker_metrics, gauge[0], **gauge[1]) == 0
    b_before = await calls(http, stack.b)
    code, _, _ = await post_chat(http, stack, chat("circuit-x"), AUTH_A)
    assert code == 200
    assert (await calls(http, stack.a), await calls(http, stack.b)) == (5, b_before)


@pytest.mark.parametrize(
    ("how", "wait"),
    [({"status": 429, "retry_after": "1"}, 1.0), ({"status": 503, "retry_after_ms": 1200}, 1.2)],
)
async def test_retry_waits_as_long_as_the_upstream_asks(
    stack: Stack, http: aiohttp.ClientSession, how: dict[str, Any], wait: float
) -> None:
    await fail(http, stack.a, times=1, **how)
    code, _, body = await post_chat(http, stack, chat("gpt-x"), AUTH_A)
    assert code == 200 and body["choices"][0]["message"]["content"]
    times = (await mock_stats(http, stack.a))["call_times"]
    assert len(times) == 2
    # asyncio may fire a timer up to its clock resolution early, and the mock stamps
    # arrivals, not the moment it answered: allow a few milliseconds.
    assert times[1] - times[0] >= wait - 0.005


async def test_no_retry_on_a_client_error(stack: Stack, http: aiohttp.ClientSession) -> None:
    await fail(http, stack.a, status=400, times=1)
    code, _, body = await post_chat(http, stack, chat("gpt-x"), AUTH_A)
    assert code == 400 and body["error"]["message"]
    assert await calls(http, stack.a) == 1


async def test_no_retry_once_a_chunk_reached_the_client(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    body = chat("gpt-x", stream=True, mock={"fail_after": 3, "chunks": 10})
    async with http.post(f"{stack.url}/v1/chat/completions", json=body, headers=AUTH_A) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    assert text.count('"content"') >= 3
    assert "upstream_stream_interrupted" in text
    assert await calls(http, stack.a) == 1


# ---------------------------------------------------------------- routing strategies


async def test_least_queued_avoids_the_longer_queue(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    # ``parked`` has no worker: async jobs pile up in its queue.
    for _ in range(3):
        async with http.post(
            f"{stack.url}/v1/jobs", json={"request": chat("parked-x")}, headers=AUTH_A
        ) as resp:
            assert resp.status == 202
    for _ in range(6):
        code, _, _ = await post_chat(http, stack, chat("least-x"), AUTH_A)
        assert code == 200
    assert await calls(http, stack.b) == 6


async def test_lowest_latency_prefers_the_faster_deployment(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    async def measured() -> bool:
        code, _, _ = await post_chat(http, stack, chat("fast-x"), AUTH_A)
        assert code == 200
        return await calls(http, stack.a) >= 1 and await calls(http, stack.b) >= 1

    await eventually(measured, what="both deployments measured")
    a_calls = await calls(http, stack.a)

    async def settled() -> bool:
        b_before = await calls(http, stack.b)
        for _ in range(5):
            code, _, _ = await post_chat(http, stack, chat("fast-x"), AUTH_A)
            assert code == 200
        return await calls(http, stack.b) - b_before == 5

    # Averages reach ingress within about two seconds (written, then read, once a second).
    await eventually(settled, what="five calls in a row on the faster deployment")
    assert await calls(http, stack.a) - a_calls <= 5


# ---------------------------------------------------------------- client disconnect


@pytest.mark.parametrize("stream", [True, False])
async def test_client_disconnect_aborts_the_upstream_call(
    stack: Stack, http: aiohttp.ClientSession, stream: bool
) -> None:
    aborted = ("llm_broker_upstream_aborted_total", {"provider": "a"})
    aborted_before = await metric(http, stack.worker_metrics, aborted[0], **aborted[1])
    gone = ("llm_broker_client_disconnects_total", {"endpoint": "/v1/chat/completions"})
    gone_before = await metric(http, f"{stack.url}/metrics", gone[0], **gone[1])
    how = {"chunks": 200, "chunk_delay_ms": 100} if stream else {"latency_ms": 20_000}
    body = chat("gpt-x", stream=stream, mock=how)

    async def in_flight() -> bool:
        return bool((await mock_stats(http, stack.a))["in_flight"] == 1)

    async with aiohttp.ClientSession() as client:
        if stream:
            resp = await client.post(f"{stack.url}/v1/chat/completions", json=body, headers=AUTH_A)
            assert resp.status == 200
            assert (await resp.content.readany()).startswith(b"data: ")
            resp.close()  # the client goes away
        else:
            waiting = asyncio.ensure_future(
                client.post(f"{stack.url}/v1/chat/completions", json=body, headers=AUTH_A)
            )
            await eventually(in_flight, what="the upstream call")
            waiting.cancel()  # the client gives up and goes away
            await asyncio.gather(waiting, return_exceptions=True)
    closed_at = time.monotonic()

    async def upstream_closed() -> bool:
        return bool((await mock_stats(http, stack.a))["disconnects"] >= 1)

    await eventually(upstream_closed, timeout=5, what="the upstream connection closed")
    assert time.monotonic() - closed_at < 1.0
    assert (await mock_stats(http, stack.a))["in_flight"] == 0

    async def counted() -> bool:
        return (
            await metric(http, stack.worker_metrics, aborted[0], **aborted[1]) > aborted_before
            and await metric(http, f"{stack.url}/metrics", gone[0], **gone[1]) > gone_before
        )

    await eventually(counted, what="the aborted call and the disconnect counted")


# ---------------------------------------------------------------- provider keys


async def test_key_file_rotation_without_restart(stack: Stack, http: aiohttp.ClientSession) -> None:
    async def last_key() -> str:
        code, _, _ = await post_chat(http, stack, chat("keyed-x"), AUTH_A)
        assert code == 200
        return str((await mock_stats(http, stack.b))["auth_seen"][-1])

    assert await last_key() == f"Bearer {stack.keys_seen[0]}"
    new = f"sk-test-rotated-{secrets.token_hex(8)}"
    stack.keys_seen.append(new)
    staged = stack.key_file.with_suffix(".new")
    staged.write_text(new + "\n")
    os.replace(staged, stack.key_file)  # as a secret mount swaps its files

    async def rotated() -> bool:
        return await last_key() == f"Bearer {new}"

    await eventually(rotated, what="the new key in use")
    # Several keys in the file are used in turn.
    pair = [f"sk-test-pair-{secrets.token_hex(8)}" for _ in range(2)]
    stack.keys_seen.extend(pair)
    staged.write_text("\n".join(pair) + "\n")
    os.replace(staged, stack.key_file)

    async def both_used() -> bool:
        seen = {await last_key() for _ in range(4)}
        return seen == {f"Bearer {k}" for k in pair}

    await eventually(both_used, what="both keys of the file in use")
    # No key in the worker's log, command line or environment; reads are logged by file.
    output = stack.worker.output()
    assert f"from {stack.key_file}" in output
    exposed = _proc_files(stack.worker.pid)
    for key in stack.keys_seen:
        assert key not in output
        assert key.encode() not in exposed


def _proc_files(pid: int) -> bytes:
    """A process's command line and environment."""
    return Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()


# ---------------------------------------------------------------- response cache


async def test_cache_hits_per_tenant_and_respects_cache_control(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    body = chat("gpt-x", content=f"cached {secrets.token_hex(4)}", temperature=0)
    code, headers, first = await post_chat(http, stack, body, AUTH_A)
    assert code == 200 and headers["X-Cache"] == "miss"
    code, headers, second = await post_chat(http, stack, body, AUTH_A)
    assert code == 200 and headers["X-Cache"] == "hit"
    assert second["choices"] == first["choices"]
    assert await calls(http, stack.a) == 1
    # Another tenant's identical request reaches the upstream.
    code, headers, _ = await post_chat(http, stack, body, AUTH_B)
    assert code == 200 and headers["X-Cache"] == "miss"
    assert await calls(http, stack.a) == 2
    # A streaming request is served from the cache as SSE.
    async with http.post(
        f"{stack.url}/v1/chat/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
        headers=AUTH_A,
    ) as resp:
        assert resp.status == 200 and resp.headers["X-Cache"] == "hit"
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        frames = [
            orjson.loads(line[6:])
            for line in (await resp.read()).decode().split("\n")
            if line.startswith("data: {")
        ]
    text = "".join(f["choices"][0]["delta"].get("content") or "" for f in frames if f["choices"])
    assert text == first["choices"][0]["message"]["content"]
    assert frames[-1]["usage"] == first["usage"]
    assert await calls(http, stack.a) == 2
    # no-cache skips the lookup (and stores again); no-store skips both.
    code, headers, _ = await post_chat(http, stack, body, {**AUTH_A, "Cache-Control": "no-cache"})
    assert code == 200 and headers["X-Cache"] == "miss"
    assert await calls(http, stack.a) == 3
    fresh = chat("gpt-x", content=f"unstored {secrets.token_hex(4)}", temperature=0)
    code, headers, _ = await post_chat(http, stack, fresh, {**AUTH_A, "Cache-Control": "no-store"})
    assert code == 200 and "X-Cache" not in headers
    code, headers, _ = await post_chat(http, stack, fresh, AUTH_A)
    assert code == 200 and headers["X-Cache"] == "miss"
    assert await calls(http, stack.a) == 5
    # Sampling requests are not cached.
    sampled = chat("gpt-x", content=f"sampled {secrets.token_hex(4)}", temperature=0.7)
    for _ in range(2):
        code, headers, _ = await post_chat(http, stack, sampled, AUTH_A)
        assert code == 200 and "X-Cache" not in headers
    assert await calls(http, stack.a) == 7
    hits = await metric(
        http, f"{stack.url}/metrics", "llm_broker_cache_requests_total", model="gpt-x", result="hit"
    )
    assert hits >= 2


async def test_cache_serves_the_messages_api(
    stack: Stack, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic
) -> None:
    messages: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": f"cached message {secrets.token_hex(4)}"}
    ]
    first = await claude.messages.create(
        model="gpt-x", max_tokens=50, messages=messages, extra_body={"temperature": 0}
    )
    again = await claude.messages.create(
        model="gpt-x", max_tokens=50, messages=messages, extra_body={"temperature": 0}
    )
    assert again.content == first.content
    async with claude.messages.stream(
        model="gpt-x", max_tokens=50, messages=messages, extra_body={"temperature": 0}
    ) as stream:
        streamed = await stream.get_final_message()
    assert [b.model_dump(include={"type", "text"}) for b in streamed.content] == [
        b.model_dump(include={"type", "text"}) for b in first.content
    ]
    assert await calls(http, stack.a) == 1


# ---------------------------------------------------------------- rate limit


async def test_rpm_admits_no_more_than_the_limit_per_window(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """``rl`` allows 3 calls per 2 s window (``limits.window_s``); 7 requests at once
    all complete, spread over three windows."""
    results = await asyncio.gather(
        *(post_chat(http, stack, chat("rl-x"), AUTH_A) for _ in range(7))
    )
    assert [code for code, _, _ in results] == [200] * 7
    times = sorted((await mock_stats(http, stack.b))["call_times"])
    assert len(times) == 7
    # Admission and arrival at the mock differ by a few ms, more on a busy machine:
    # allow 0.3 s of slack.
    for i, t in enumerate(times):
        assert sum(1 for u in times[i:] if u - t < 2.0 - 0.3) <= 3
    assert times[-1] - times[0] >= 4.0 - 0.3


async def test_a_client_deadline_is_not_an_upstream_failure(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """Calls cut short by the clients' own deadlines neither open the circuit nor fall back."""
    slow = chat("fallback-x", mock={"latency_ms": 3000})
    for _ in range(4):  # more than the circuit's 3 failures
        code, _, body = await post_chat(http, stack, slow, {**AUTH_A, "X-Request-Timeout": "0.3"})
        assert code == 504 and body["error"]["code"] == "deadline_exceeded"
    gauge = await metric(
        http, stack.worker_metrics, "llm_broker_circuit_state", deployment="a/mock-fb"
    )
    assert gauge == 0
    assert await calls(http, stack.b) == 0  # nothing moved to the fallback deployment
    code, _, _ = await post_chat(http, stack, chat("fallback-x"), AUTH_A)
    assert code == 200
    assert await calls(http, stack.b) == 0  # and the deployment still takes calls


async def test_an_upstream_slower_than_the_providers_timeout_gives_504(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    """``slow`` allows its upstream 0.5 s: a call that takes 3 s is answered 504
    ``upstream_timeout`` at about 0.5 s, and the upstream connection is closed."""
    before = (await mock_stats(http, stack.b))["disconnects"]
    started = time.monotonic()
    code, _, body = await post_chat(http, stack, chat("slow-x", mock={"latency_ms": 3000}), AUTH_A)
    took = time.monotonic() - started
    assert code == 504 and body["error"]["code"] == "upstream_timeout", body
    assert 0.5 <= took < 2.5, took

    async def closed() -> bool:
        return bool((await mock_stats(http, stack.b))["disconnects"] > before)

    await eventually(closed, timeout=2, what="the upstream connection closed")
