"""Tests for the in-process / standalone mock LLM upstream."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest

from llm_broker.mock.server import WORDS, MockDefaults, MockState, main, start_server

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Mock:
    url: str
    port: int
    state: MockState
    session: aiohttp.ClientSession

    async def chat(self, **body: Any) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        body.setdefault("model", "mock")
        body.setdefault("messages", [{"role": "user", "content": "hello world"}])
        async with self.session.post(f"{self.url}/v1/chat/completions", json=body) as resp:
            data = await resp.read()
            return resp.status, orjson.loads(data), resp.headers

    async def stream(self, **body: Any) -> list[Any]:
        """Return the decoded SSE events; ``"[DONE]"`` stays a string."""
        body.setdefault("model", "mock")
        body.setdefault("messages", [{"role": "user", "content": "hello world"}])
        body["stream"] = True
        events: list[Any] = []
        async with self.session.post(f"{self.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            async for line in resp.content:
                if line.startswith(b"data: "):
                    payload = line[6:].strip()
                    events.append("[DONE]" if payload == b"[DONE]" else orjson.loads(payload))
                else:
                    assert line == b"\n"
        return events

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(f"{self.url}/mock/stats") as resp:
            assert resp.status == 200
            result: dict[str, Any] = await resp.json()
            return result

    async def post(
        self, path: str, body: Any = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any, Mapping[str, str]]:
        """POST JSON; the answer is decoded as JSON when it is, else returned as text."""
        async with self.session.post(f"{self.url}{path}", json=body, headers=headers) as resp:
            data = await resp.read()
            try:
                decoded: Any = orjson.loads(data)
            except orjson.JSONDecodeError:
                decoded = data.decode()
            return resp.status, decoded, resp.headers

    async def messages(self, **body: Any) -> tuple[int, dict[str, Any], Mapping[str, str]]:
        body.setdefault("model", "mock")
        body.setdefault("max_tokens", 100)
        body.setdefault("messages", [{"role": "user", "content": "hello world"}])
        return await self.post("/v1/messages", body)

    async def anthropic_events(self, **body: Any) -> list[tuple[str, dict[str, Any]]]:
        """(event name, decoded data) of an Anthropic stream, checking the SSE framing."""
        body.setdefault("model", "mock")
        body.setdefault("max_tokens", 100)
        body.setdefault("messages", [{"role": "user", "content": "hello world"}])
        body["stream"] = True
        async with self.session.post(f"{self.url}/v1/messages", json=body) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            raw = (await resp.read()).decode()
        assert raw.endswith("\n\n")
        events: list[tuple[str, dict[str, Any]]] = []
        for block in raw[:-2].split("\n\n"):
            name_line, data_line = block.split("\n")
            assert name_line.startswith("event: ") and data_line.startswith("data: ")
            data = orjson.loads(data_line[6:])
            assert data["type"] == name_line[7:]
            events.append((name_line[7:], data))
        return events

    async def fail(self, **spec: Any) -> dict[str, Any]:
        status, body, _ = await self.post("/mock/fail", spec)
        assert status == 200, body
        result: dict[str, Any] = body
        return result

    async def reset(self) -> None:
        status, _, _ = await self.post("/mock/reset")
        assert status == 200


async def _wait_for(
    check: Callable[[], Awaitable[bool]], limit_s: float = 5.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + limit_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def _make_mock(defaults: MockDefaults) -> AsyncIterator[Mock]:
    server, state = await start_server("127.0.0.1", 0, defaults)
    port = server.sockets[0].getsockname()[1]
    try:
        async with aiohttp.ClientSession() as session:
            yield Mock(f"http://127.0.0.1:{port}", port, state, session)
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def mock() -> AsyncIterator[Mock]:
    async for m in _make_mock(MockDefaults()):
        yield m


LEGACY_STATS_KEYS = (
    "calls",
    "in_flight",
    "peak_in_flight",
    "completed",
    "disconnects",
    "auth_seen",
)
NEW_STATS_KEYS = {
    "authorization_seen",
    "api_key_seen",
    "x_api_key_seen",
    "api_version_seen",
    "models_seen",
    "call_times",
    "calls_by_path",
    "traceparent_seen",
    "failures_left",
    "prompt_tokens",
    "completion_tokens",
}


def expected_words(last_text: str, n: int) -> list[str]:
    seed = zlib.crc32(last_text.encode())
    return [WORDS[(seed + k) % len(WORDS)] for k in range(n)]


# --------------------------------------------------------------------------- chat


async def test_non_streaming_shape(mock: Mock) -> None:
    status, body, headers = await mock.chat(
        model="mock",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "say  hello\nworld"},
        ],
    )
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert body["id"].startswith("chatcmpl-mock-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int) and abs(body["created"] - time.time()) < 60
    assert body["model"] == "mock"
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    words = expected_words("say  hello\nworld", 8)
    assert choice["message"]["content"] == " ".join(words)
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}


async def test_content_is_deterministic(mock: Mock) -> None:
    msgs = [{"role": "user", "content": "determinism please"}]
    _, a, _ = await mock.chat(messages=msgs)
    _, b, _ = await mock.chat(messages=msgs)
    _, c, _ = await mock.chat(messages=[{"role": "user", "content": "something else"}])
    content_a = a["choices"][0]["message"]["content"]
    assert content_a == b["choices"][0]["message"]["content"]
    assert content_a != c["choices"][0]["message"]["content"]
    assert a["id"] != b["id"]


async def test_content_parts_and_usage(mock: Mock) -> None:
    status, body, _ = await mock.chat(
        messages=[
            {"role": "user", "content": "one two three"},
            {"role": "assistant", "content": None},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "text", "text": "this"},
                ],
            },
        ],
    )
    assert status == 200
    assert body["usage"]["prompt_tokens"] == 6
    assert body["choices"][0]["message"]["content"] == " ".join(expected_words("look at this", 8))

    # An empty prompt still counts as one token.
    _, body, _ = await mock.chat(messages=[{"role": "user", "content": ""}])
    assert body["usage"]["prompt_tokens"] == 1


async def test_streaming_without_usage(mock: Mock) -> None:
    events = await mock.stream(model="mock-chunks-4", messages=[{"role": "user", "content": "hi"}])
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 1 + 4 + 1
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and next(iter(ids)).startswith("chatcmpl-mock-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "mock-chunks-4"
        assert isinstance(c["created"], int)
        assert len(c["choices"]) == 1 and c["choices"][0]["index"] == 0
        assert "usage" not in c
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[0]["choices"][0]["finish_reason"] is None
    words = expected_words("hi", 4)
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:5]]
    assert deltas == [words[0]] + [" " + w for w in words[1:]]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[1:5])
    assert chunks[5]["choices"][0]["delta"] == {}
    assert chunks[5]["choices"][0]["finish_reason"] == "stop"

    # Streamed content equals the non-streamed content.
    _, body, _ = await mock.chat(
        model="mock-chunks-4", messages=[{"role": "user", "content": "hi"}]
    )
    assert body["choices"][0]["message"]["content"] == "".join(deltas)


async def test_streaming_with_usage(mock: Mock) -> None:
    events = await mock.stream(
        messages=[{"role": "user", "content": "a b c"}],
        stream_options={"include_usage": True},
    )
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["object"] == "chat.completion.chunk"
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11}
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert len(events) == 1 + 8 + 1 + 1 + 1
    assert mock.state.completed == 1


async def test_streaming_is_incremental(mock: Mock) -> None:
    body = {
        "model": "mock-chunks-3-delay-100",
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    arrivals: list[float] = []
    async with mock.session.post(f"{mock.url}/v1/chat/completions", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 1 + 3 + 1 + 1
    # Two 100 ms gaps between the three word chunks: the first chunk came well before the end.
    assert arrivals[-1] - arrivals[0] >= 0.15


async def test_stream_fail_after_closes_connection(mock: Mock) -> None:
    body = {
        "model": "mock-chunks-5-failafter-2",
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    lines: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with mock.session.post(f"{mock.url}/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for line in resp.content:
                if line.startswith(b"data: "):
                    lines.append(line)
    assert len(lines) == 1 + 2
    assert not any(b"[DONE]" in line for line in lines)
    assert mock.state.completed == 0


# --------------------------------------------------------------------------- grammar


async def test_model_grammar_chunks(mock: Mock) -> None:
    _, body, _ = await mock.chat(model="mock-chunks-3")
    assert len(body["choices"][0]["message"]["content"].split(" ")) == 3
    assert body["usage"]["completion_tokens"] == 3
    # Unknown tokens are ignored; the first token is ignored whatever it is.
    _, body, _ = await mock.chat(model="gpt-4o-chunks-2-foo-bar")
    assert len(body["choices"][0]["message"]["content"].split(" ")) == 2
    _, body, _ = await mock.chat(model="mock-chunks-0")
    assert body["choices"][0]["message"]["content"] == ""


async def test_model_grammar_error_500(mock: Mock) -> None:
    status, body, headers = await mock.chat(model="mock-error-500")
    assert status == 500
    assert body == {
        "error": {
            "message": "mock upstream error 500",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "Retry-After" not in headers


async def test_model_grammar_error_429_and_503(mock: Mock) -> None:
    status, body, headers = await mock.chat(model="mock-error-429")
    assert status == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert headers["Retry-After"] == "1"
    status, body, headers = await mock.chat(model="mock-error-503")
    assert status == 503 and headers["Retry-After"] == "1"
    status, body, headers = await mock.chat(model="mock-error-404")
    assert status == 404 and body["error"]["type"] == "api_error"
    status, body, _ = await mock.chat(model="mock-error-400")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    # Errors are returned for streaming requests too, as plain JSON.
    async with mock.session.post(
        f"{mock.url}/v1/chat/completions",
        json={"model": "mock-error-502", "stream": True, "messages": [{"role": "user"}]},
    ) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"]["message"] == "mock upstream error 502"


async def test_model_grammar_latency(mock: Mock) -> None:
    t0 = time.monotonic()
    status, _, _ = await mock.chat(model="mock-latency-150")
    assert status == 200
    assert time.monotonic() - t0 >= 0.14
    t0 = time.monotonic()
    status, _, _ = await mock.chat(model="mock-lat-100-error-500")
    assert status == 500
    assert time.monotonic() - t0 >= 0.09


async def test_body_mock_overrides(mock: Mock) -> None:
    _, body, _ = await mock.chat(model="mock-chunks-5", mock={"chunks": 2})
    assert body["usage"]["completion_tokens"] == 2
    status, body, headers = await mock.chat(
        model="mock-chunks-5", mock={"error": 429, "retry_after": 7}
    )
    assert status == 429 and headers["Retry-After"] == "7"
    # The body wins over the model name.
    status, _, _ = await mock.chat(model="mock-error-500", mock={"error": 503})
    assert status == 503


async def test_server_defaults() -> None:
    async for m in _make_mock(MockDefaults(chunks=3)):
        _, body, _ = await m.chat()
        assert body["usage"]["completion_tokens"] == 3
        _, body, _ = await m.chat(model="mock-chunks-4")
        assert body["usage"]["completion_tokens"] == 4


async def test_max_tokens_gives_length(mock: Mock) -> None:
    _, body, _ = await mock.chat(max_tokens=2)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    assert body["choices"][0]["message"]["content"] == " ".join(expected_words("hello world", 2))
    _, body, _ = await mock.chat(max_completion_tokens=3)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    _, body, _ = await mock.chat(max_tokens=100)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 8
    events = await mock.stream(max_tokens=1)
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert len(events) == 1 + 1 + 1 + 1


# --------------------------------------------------------------------------- other routes


async def test_invalid_json_and_missing_messages(mock: Mock) -> None:
    async with mock.session.post(
        f"{mock.url}/v1/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        body = await resp.json()
        assert body["error"]["type"] == "invalid_request_error"
        assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body, _ = await mock.chat(messages=None)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    async with mock.session.post(f"{mock.url}/v1/chat/completions", json={"model": "m"}) as resp:
        assert resp.status == 400


async def test_unknown_route_404(mock: Mock) -> None:
    async with mock.session.get(f"{mock.url}/v2/nothing") as resp:
        assert resp.status == 404
        body = await resp.json()
        assert set(body["error"]) == {"message", "type", "param", "code"}
    async with mock.session.get(f"{mock.url}/v1/chat/completions") as resp:
        assert resp.status == 404


async def test_health_models_embeddings(mock: Mock) -> None:
    async with mock.session.get(f"{mock.url}/health") as resp:
        assert resp.status == 200 and await resp.json() == {"status": "ok"}
    async with mock.session.get(f"{mock.url}/v1/models") as resp:
        assert await resp.json() == {
            "object": "list",
            "data": [{"id": "mock", "object": "model", "created": 0, "owned_by": "mock"}],
        }
    payload = {"model": "emb", "input": ["hello there", "x"]}
    async with mock.session.post(f"{mock.url}/v1/embeddings", json=payload) as resp:
        first = await resp.json()
    async with mock.session.post(f"{mock.url}/v1/embeddings", json=payload) as resp:
        second = await resp.json()
    assert first == second
    assert first["object"] == "list" and first["model"] == "emb"
    assert [d["index"] for d in first["data"]] == [0, 1]
    for d in first["data"]:
        assert d["object"] == "embedding"
        assert len(d["embedding"]) == 8 and all(isinstance(v, float) for v in d["embedding"])
    assert first["data"][0]["embedding"] != first["data"][1]["embedding"]
    assert first["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    async with mock.session.post(f"{mock.url}/v1/embeddings", json={"input": "solo"}) as resp:
        single = await resp.json()
    assert len(single["data"]) == 1
    assert mock.state.calls == 3


async def test_chunked_request_body(mock: Mock) -> None:
    async def gen() -> AsyncIterator[bytes]:
        yield b'{"model": "mock-chunks-2", '
        yield b'"messages": [{"role": "user", "content": "hi"}]}'

    async with mock.session.post(f"{mock.url}/v1/chat/completions", data=gen()) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["choices"][0]["message"]["content"] == " ".join(expected_words("hi", 2))


# --------------------------------------------------------------------------- counters


async def test_stats_reset_and_auth(mock: Mock) -> None:
    for i in range(3):
        async with mock.session.post(
            f"{mock.url}/v1/chat/completions",
            json={"model": "mock", "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer sk-{i}"},
        ) as resp:
            assert resp.status == 200
    async with mock.session.post(
        f"{mock.url}/v1/embeddings", json={"input": "x"}, headers={"x-api-key": "anthropic-key"}
    ) as resp:
        assert resp.status == 200
    stats = await mock.stats()
    # The original keys keep their meaning (auth_seen: every credential header, as before).
    assert {k: stats[k] for k in LEGACY_STATS_KEYS} == {
        "calls": 4,
        "in_flight": 0,
        "peak_in_flight": 1,
        "completed": 4,
        "disconnects": 0,
        "auth_seen": ["Bearer sk-0", "Bearer sk-1", "Bearer sk-2", "anthropic-key"],
    }
    assert set(stats) == set(LEGACY_STATS_KEYS) | NEW_STATS_KEYS
    assert mock.state.snapshot() == stats
    async with mock.session.post(f"{mock.url}/mock/reset") as resp:
        assert resp.status == 200 and await resp.json() == {}
    stats = await mock.stats()
    assert stats["calls"] == 0 and stats["completed"] == 0 and stats["auth_seen"] == []


async def test_peak_in_flight(mock: Mock) -> None:
    results = await asyncio.gather(*(mock.chat(model="mock-latency-200") for _ in range(5)))
    assert all(status == 200 for status, _, _ in results)
    stats = await mock.stats()
    assert stats["peak_in_flight"] == 5
    assert stats["in_flight"] == 0
    assert stats["completed"] == 5


async def test_disconnect_during_latency_counts(mock: Mock) -> None:
    async with aiohttp.ClientSession() as other:

        async def slow() -> None:
            async with other.post(
                f"{mock.url}/v1/chat/completions",
                json={"model": "mock-latency-5000", "messages": [{"role": "user", "content": "x"}]},
            ) as resp:
                await resp.read()

        task = asyncio.create_task(slow())

        async def in_flight() -> bool:
            return bool((await mock.stats())["in_flight"] == 1)

        await _wait_for(in_flight, what="request in flight")
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def disconnected() -> bool:
        stats = await mock.stats()
        return bool(stats["disconnects"] == 1 and stats["in_flight"] == 0)

    await _wait_for(disconnected, what="disconnect to be counted")
    stats = await mock.stats()
    assert stats["completed"] == 0 and stats["calls"] == 1


async def test_disconnect_during_slow_stream_counts(mock: Mock) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    body = orjson.dumps(
        {
            "model": "mock-chunks-50-delay-100",
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        }
    )
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    assert (await reader.readline()).startswith(b"HTTP/1.1 200")
    await reader.readuntil(b'"delta":{"content"')  # at least one word arrived
    writer.close()
    await writer.wait_closed()

    async def disconnected() -> bool:
        return mock.state.disconnects == 1 and mock.state.in_flight == 0

    await _wait_for(disconnected, what="disconnect to be counted")
    assert mock.state.completed == 0


# --------------------------------------------------------------------------- connection


async def test_keep_alive_50_sequential_requests(mock: Mock) -> None:
    created: list[int] = []

    async def on_create(
        _s: aiohttp.ClientSession, _ctx: SimpleNamespace, _p: aiohttp.TraceConnectionCreateEndParams
    ) -> None:
        created.append(1)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        for i in range(50):
            stream = i % 5 == 0
            async with session.post(
                f"{mock.url}/v1/chat/completions",
                json={
                    "model": "mock-chunks-2",
                    "stream": stream,
                    "messages": [{"role": "user", "content": f"request {i}"}],
                },
            ) as resp:
                assert resp.status == 200
                data = await resp.read()
                assert data.endswith(b"data: [DONE]\n\n" if stream else b"}")
    assert len(created) == 1  # one TCP connection for all 50 requests
    assert mock.state.completed == 50
    assert mock.state.calls == 50


async def test_pipelining_and_connection_close(mock: Mock) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    body = orjson.dumps(
        {"model": "mock-latency-50-chunks-1", "messages": [{"role": "user", "content": "x"}]}
    )
    req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
    writer.write(
        req % (len(body), b"", body)
        + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        + req % (len(body), b"Connection: close\r\n", body)
    )
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)  # reads until the server closes
    writer.close()
    await writer.wait_closed()
    assert data.count(b"HTTP/1.1 200 OK") == 3
    first = data.index(b"chat.completion")
    assert first < data.index(b'{"status":"ok"}') < data.rindex(b"chat.completion")
    assert data.count(b"Connection: close") == 1


async def test_malformed_http_request(mock: Mock) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", mock.port)
    writer.write(b"THIS IS NOT HTTP\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), timeout=5)
    writer.close()
    await writer.wait_closed()
    assert data.startswith(b"HTTP/1.1 400")


# --------------------------------------------------------------------------- Anthropic

WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather of a place",
    "input_schema": {
        "type": "object",
        "properties": {"unit": {"type": "string"}, "location": {"type": "string"}},
        "required": ["location"],
    },
}
SEARCH_TOOL: dict[str, Any] = {
    "name": "search",
    "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}},
}


@pytest.fixture
async def claude(mock: Mock) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=mock.url, api_key="sk-ant-test", max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def gpt(mock: Mock) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{mock.url}/v1", api_key="sk-openai-test", max_retries=0
    ) as client:
        yield client


async def test_anthropic_non_streaming_shape(mock: Mock) -> None:
    status, body, headers = await mock.messages(
        model="claude-mock",
        system="be brief",
        messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look at"},
                    {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                    {"type": "text", "text": "this"},
                ],
            },
        ],
    )
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert body["id"].startswith("msg_")
    assert body == {
        "id": body["id"],
        "type": "message",
        "role": "assistant",
        "model": "claude-mock",
        "content": [{"type": "text", "text": " ".join(expected_words("look at this", 8))}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 2 + 2 + 2 + 3, "output_tokens": 8},
    }
    # /messages is the same endpoint; max_tokens below the word count stops early.
    status, short, _ = await mock.post(
        "/messages",
        {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hello world"}]},
    )
    assert status == 200
    assert short["content"][0]["text"] == " ".join(expected_words("hello world", 3))
    assert short["stop_reason"] == "max_tokens" and short["usage"]["output_tokens"] == 3


async def test_anthropic_requires_max_tokens_and_messages(mock: Mock) -> None:
    status, body, _ = await mock.post(
        "/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    )
    assert status == 400
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    assert set(body) == {"type", "error"} and set(body["error"]) == {"type", "message"}
    status, body, _ = await mock.messages(max_tokens=0)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body, _ = await mock.messages(messages=[])
    assert status == 400 and "messages" in body["error"]["message"]
    async with mock.session.post(f"{mock.url}/v1/messages", data=b"{oops") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_anthropic_stream_event_sequence(mock: Mock) -> None:
    events = await mock.anthropic_events(
        model="mock-chunks-4", messages=[{"role": "user", "content": "a b c"}]
    )
    names = [name for name, _ in events]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    message = events[0][1]["message"]
    assert message["id"].startswith("msg_") and message["model"] == "mock-chunks-4"
    assert message["role"] == "assistant" and message["content"] == []
    assert message["stop_reason"] is None and message["usage"]["input_tokens"] == 3
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    deltas = [data["delta"] for _, data in events[3:7]]
    assert all(d["type"] == "text_delta" for d in deltas)
    assert all(data["index"] == 0 for _, data in events[3:8])
    words = expected_words("a b c", 4)
    assert [d["text"] for d in deltas] == [words[0]] + [" " + w for w in words[1:]]
    assert events[8][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 4},
    }
    # Streamed text equals the non-streamed text.
    _, body, _ = await mock.messages(
        model="mock-chunks-4", messages=[{"role": "user", "content": "a b c"}]
    )
    assert body["content"][0]["text"] == "".join(d["text"] for d in deltas)
    events = await mock.anthropic_events(max_tokens=2)
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"


async def test_anthropic_sdk_create_and_stream(
    mock: Mock, claude: anthropic.AsyncAnthropic
) -> None:
    message = await claude.messages.create(
        model="claude-mock-chunks-5",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": "tell me a story"}],
    )
    assert message.model == "claude-mock-chunks-5"
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert len(message.content) == 1 and message.content[0].type == "text"
    assert message.content[0].text == " ".join(expected_words("tell me a story", 5))
    assert message.usage.input_tokens == 6 and message.usage.output_tokens == 5

    async with claude.messages.stream(
        model="claude-mock-chunks-5-delay-5",
        max_tokens=64,
        system="be brief",
        messages=[{"role": "user", "content": "tell me a story"}],
    ) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(texts) == 5
    assert final.content[0].type == "text" and final.content[0].text == "".join(texts)
    assert final.content[0].text == message.content[0].text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 6 and final.usage.output_tokens == 5
    stats = await mock.stats()
    # SDK versions differ in how they send the key (x-api-key or a bearer token).
    keys = stats["x_api_key_seen"] + [
        a.removeprefix("Bearer ") for a in stats["authorization_seen"]
    ]
    assert keys == ["sk-ant-test", "sk-ant-test"]
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", stats["api_version_seen"])  # anthropic-version
    assert stats["calls_by_path"] == {"/v1/messages": 2}


async def test_anthropic_errors(mock: Mock, claude: anthropic.AsyncAnthropic) -> None:
    status, body, headers = await mock.messages(model="mock-error-429-retryafter-3")
    assert status == 429 and headers["Retry-After"] == "3"
    assert body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "mock upstream error 429"},
    }
    for code, kind in (
        (500, "api_error"),
        (529, "overloaded_error"),
        (401, "authentication_error"),
    ):
        status, body, _ = await mock.messages(mock={"error": code})
        assert status == code and body["error"]["type"] == kind
    with pytest.raises(anthropic.RateLimitError) as err:
        await claude.messages.create(
            model="mock-error-429", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        )
    assert err.value.response.headers["retry-after"] == "1"
    # Errors of streaming requests are plain JSON too.
    async with mock.session.post(
        f"{mock.url}/v1/messages",
        json={"model": "mock-error-503", "max_tokens": 5, "stream": True, "messages": []},
    ) as resp:
        assert resp.status == 400  # the request is checked first: no messages
    async with mock.session.post(
        f"{mock.url}/v1/messages",
        json={
            "model": "mock-error-503",
            "max_tokens": 5,
            "stream": True,
            "messages": [{"role": "user", "content": "x"}],
        },
    ) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["type"] == "overloaded_error"


async def test_anthropic_stream_delay_and_fail_after(mock: Mock) -> None:
    body = {
        "model": "mock-chunks-3-delay-100",
        "max_tokens": 10,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    arrivals: list[float] = []
    async with mock.session.post(f"{mock.url}/v1/messages", json=body) as resp:
        async for line in resp.content:
            if line.startswith(b"event: content_block_delta"):
                arrivals.append(time.monotonic())
    assert len(arrivals) == 3 and arrivals[-1] - arrivals[0] >= 0.15

    body["model"] = "mock-chunks-5-failafter-2"
    lines: list[bytes] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with mock.session.post(f"{mock.url}/v1/messages", json=body) as resp:
            async for line in resp.content:
                if line.startswith(b"event: "):
                    lines.append(line.strip())
    assert lines == [
        b"event: message_start",
        b"event: content_block_start",
        b"event: ping",
        b"event: content_block_delta",
        b"event: content_block_delta",
    ]
    assert mock.state.completed == 1


# --------------------------------------------------------------------------- tool calls


def _openai_tools() -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": t["name"], "parameters": t["input_schema"]}}
        for t in (WEATHER_TOOL, SEARCH_TOOL)
    ]


async def test_openai_tool_calls_raw(mock: Mock) -> None:
    msgs = [{"role": "user", "content": "Paris weather today"}]
    status, body, _ = await mock.chat(messages=msgs, tools=_openai_tools())
    assert status == 200
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"location": "Paris"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}

    # A forced function; "none" answers with text; no tools, no call.
    forced = {"type": "function", "function": {"name": "search"}}
    _, body, _ = await mock.chat(messages=msgs, tools=_openai_tools(), tool_choice=forced)
    (call,) = body["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "search"
    assert orjson.loads(call["function"]["arguments"]) == {"query": "Paris"}
    _, body, _ = await mock.chat(messages=msgs, tools=_openai_tools(), tool_choice="none")
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in body["choices"][0]["message"]

    # After the tool result: text seeded from the result.
    history = [
        *msgs,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny and warm"},
    ]
    _, body, _ = await mock.chat(messages=history, tools=_openai_tools())
    assert body["choices"][0]["finish_reason"] == "stop"
    expected = " ".join(expected_words("sunny and warm", 8))
    assert body["choices"][0]["message"]["content"] == expected

    # Streamed: role + id + name first, then the arguments in two pieces.
    events = await mock.stream(
        messages=msgs, tools=_openai_tools(), stream_options={"include_usage": True}
    )
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-2]]
    assert len(deltas) == 4
    first = deltas[0]["tool_calls"][0]
    assert deltas[0]["role"] == "assistant"
    assert first["index"] == 0 and first["id"].startswith("call_")
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    pieces = [d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:3]]
    assert all(pieces) and orjson.loads("".join(pieces)) == {"location": "Paris"}
    assert events[-3]["choices"][0]["finish_reason"] == "tool_calls"
    assert events[-2]["usage"]["completion_tokens"] == 2


async def test_openai_tool_calls_sdk(gpt: openai.AsyncOpenAI) -> None:
    result = await gpt.chat.completions.create(
        model="gpt-mock",
        messages=[{"role": "user", "content": "Lisbon forecast"}],
        tools=[
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": WEATHER_TOOL["input_schema"]},
            }
        ],
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"location": "Lisbon"}

    async with gpt.chat.completions.stream(
        model="gpt-mock-delay-5",
        messages=[{"role": "user", "content": "Lisbon forecast"}],
        tools=[
            {
                "type": "function",
                "function": {"name": "get_weather", "parameters": WEATHER_TOOL["input_schema"]},
            }
        ],
    ) as stream:
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    streamed = choice.message.tool_calls
    assert streamed is not None and len(streamed) == 1
    assert streamed[0].type == "function"
    assert streamed[0].function.name == "get_weather"
    assert orjson.loads(streamed[0].function.arguments) == {"location": "Lisbon"}


async def test_anthropic_tool_calls(mock: Mock, claude: anthropic.AsyncAnthropic) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Oslo weather now"}]}]
    status, body, _ = await mock.messages(messages=msgs, tools=[WEATHER_TOOL, SEARCH_TOOL])
    assert status == 200
    assert body["stop_reason"] == "tool_use"
    (block,) = body["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert block["name"] == "get_weather" and block["input"] == {"location": "Oslo"}
    assert body["usage"] == {"input_tokens": 3, "output_tokens": 2}
    forced = {"type": "tool", "name": "search"}
    _, body, _ = await mock.messages(
        messages=msgs, tools=[WEATHER_TOOL, SEARCH_TOOL], tool_choice=forced
    )
    assert body["content"][0]["name"] == "search"
    assert body["content"][0]["input"] == {"query": "Oslo"}
    _, body, _ = await mock.messages(
        messages=msgs, tools=[WEATHER_TOOL], tool_choice={"type": "none"}
    )
    assert body["stop_reason"] == "end_turn" and body["content"][0]["type"] == "text"

    # The tool result: text again, seeded from the result's text.
    history = [
        *msgs,
        {"role": "assistant", "content": [block]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": block["id"],
                    "content": [{"type": "text", "text": "cold and windy"}],
                }
            ],
        },
    ]
    _, body, _ = await mock.messages(messages=history, tools=[WEATHER_TOOL])
    assert body["stop_reason"] == "end_turn"
    assert body["content"][0]["text"] == " ".join(expected_words("cold and windy", 8))

    # Streamed: a tool_use block, then the input in two input_json_delta pieces.
    events = await mock.anthropic_events(messages=msgs, tools=[WEATHER_TOOL])
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[1][1]["content_block"]
    assert start["type"] == "tool_use" and start["name"] == "get_weather"
    assert start["input"] == {}
    pieces = [data["delta"] for _, data in events[3:5]]
    assert all(p["type"] == "input_json_delta" and p["partial_json"] for p in pieces)
    assert orjson.loads("".join(p["partial_json"] for p in pieces)) == {"location": "Oslo"}
    assert events[6][1]["delta"]["stop_reason"] == "tool_use"

    # The official SDK, streamed and not.
    message = await claude.messages.create(
        model="claude-mock",
        max_tokens=100,
        messages=[{"role": "user", "content": "Oslo weather now"}],
        tools=[
            {"name": "get_weather", "input_schema": WEATHER_TOOL["input_schema"]},
        ],
    )
    assert message.stop_reason == "tool_use"
    tool_use = message.content[0]
    assert tool_use.type == "tool_use"
    assert tool_use.name == "get_weather" and tool_use.input == {"location": "Oslo"}
    async with claude.messages.stream(
        model="claude-mock-delay-5",
        max_tokens=100,
        messages=[{"role": "user", "content": "Oslo weather now"}],
        tools=[
            {"name": "get_weather", "input_schema": WEATHER_TOOL["input_schema"]},
        ],
    ) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 2
    streamed = final.content[0]
    assert streamed.type == "tool_use"
    assert streamed.name == "get_weather" and streamed.input == {"location": "Oslo"}


# --------------------------------------------------------------------------- Azure


async def test_azure_chat_and_embeddings(mock: Mock) -> None:
    base = "/openai/deployments/my-gpt-chunks-3/chat/completions"
    status, body, _ = await mock.post(
        f"{base}?api-version=2024-06-01",
        {"messages": [{"role": "user", "content": "hi"}]},
        headers={"api-key": "azure-key-1"},
    )
    assert status == 200
    assert body["model"] == "my-gpt-chunks-3"  # the deployment, not the body's model
    assert body["choices"][0]["message"]["content"] == " ".join(expected_words("hi", 3))
    status, body, _ = await mock.post(
        "/openai/deployments/emb/embeddings?api-version=2024-02-01",
        {"input": ["a b", "c"], "model": "ignored"},
        headers={"api-key": "azure-key-2"},
    )
    assert status == 200 and body["model"] == "emb" and len(body["data"]) == 2
    # Errors are OpenAI-shaped with Azure's string code.
    status, body, headers = await mock.post(
        "/openai/deployments/mock-error-429/chat/completions?api-version=2024-06-01",
        {"messages": [{"role": "user", "content": "x"}]},
    )
    assert status == 429 and headers["Retry-After"] == "1"
    assert body["error"]["code"] == "429" and body["error"]["type"] == "rate_limit_error"
    stats = await mock.stats()
    assert stats["api_key_seen"] == ["azure-key-1", "azure-key-2"]
    assert stats["api_version_seen"] == "2024-06-01"
    assert stats["models_seen"] == ["my-gpt-chunks-3", "emb", "mock-error-429"]
    assert stats["calls"] == 3

    # Without api-version (or on an unknown operation): Azure's 404, not a model call.
    for path in (base, f"{base}?foo=1", "/openai/deployments/x/completions?api-version=1"):
        status, body, _ = await mock.post(path, {"messages": [{"role": "user", "content": "x"}]})
        assert status == 404
        assert body == {"error": {"code": "404", "message": "Resource not found"}}
    assert (await mock.stats())["calls"] == 3


async def test_azure_openai_sdk(mock: Mock) -> None:
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=mock.url, api_key="az-sdk-key", api_version="2024-10-21", max_retries=0
    ) as client:
        result = await client.chat.completions.create(
            model="dep-one", messages=[{"role": "user", "content": "hello world"}]
        )
        assert result.model == "dep-one"
        assert result.choices[0].message.content == " ".join(expected_words("hello world", 8))
        emb = await client.embeddings.create(model="dep-emb", input="text")
        assert len(emb.data) == 1 and emb.model == "dep-emb"
    stats = await mock.stats()
    assert stats["api_key_seen"] == ["az-sdk-key", "az-sdk-key"]
    assert stats["api_version_seen"] == "2024-10-21"
    assert stats["calls_by_path"] == {
        "/openai/deployments/dep-one/chat/completions": 1,
        "/openai/deployments/dep-emb/embeddings": 1,
    }


# --------------------------------------------------------------------------- keys seen


async def test_keys_seen(mock: Mock) -> None:
    await mock.post(
        "/v1/chat/completions",
        {"model": "a", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": "Bearer sk-openai"},
    )
    await mock.post(
        "/v1/messages",
        {"model": "b", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
        headers={"x-api-key": "sk-ant", "anthropic-version": "2023-06-01"},
    )
    await mock.post(
        "/openai/deployments/c/chat/completions?api-version=2024-06-01",
        {"messages": [{"role": "user", "content": "x"}]},
        headers={"api-key": "az"},
    )
    # Not model calls: no entry in the per-call histories.
    async with mock.session.get(f"{mock.url}/health", headers={"api-key": "health"}) as resp:
        assert resp.status == 200
    await mock.post("/mock/reset-nothing", {}, headers={"x-api-key": "control"})
    stats = await mock.stats()
    assert stats["authorization_seen"] == ["Bearer sk-openai"]
    assert stats["x_api_key_seen"] == ["sk-ant"]
    assert stats["api_key_seen"] == ["az"]
    assert stats["api_version_seen"] == "2024-06-01"
    assert stats["models_seen"] == ["a", "b", "c"]
    assert stats["auth_seen"] == ["Bearer sk-openai", "sk-ant", "az", "health"]

    # Bounded histories.
    for i in range(105):
        await mock.post(
            "/v1/embeddings", {"model": f"m{i}", "input": "x"}, headers={"x-api-key": f"k{i}"}
        )
    stats = await mock.stats()
    assert stats["x_api_key_seen"] == [f"k{i}" for i in range(5, 105)]
    assert stats["models_seen"] == [f"m{i}" for i in range(5, 105)]
    assert len(stats["auth_seen"]) == 100
    await mock.reset()
    stats = await mock.stats()
    for key in ("authorization_seen", "api_key_seen", "x_api_key_seen", "models_seen"):
        assert stats[key] == []
    assert stats["api_version_seen"] is None


# --------------------------------------------------------------------------- fail on demand


async def test_fail_on_demand(mock: Mock) -> None:
    armed = await mock.fail(status=503, times=3, retry_after="2", retry_after_ms=1500)
    assert armed == {"status": 503, "failures_left": 3}
    assert (await mock.stats())["failures_left"] == 3

    status, body, headers = await mock.chat(model="mock-latency-5000")  # no latency applied
    assert status == 503
    assert headers["Retry-After"] == "2" and headers["retry-after-ms"] == "1500"
    assert body["error"]["type"] == "server_error" and set(body["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    status, body, headers = await mock.messages()
    assert status == 503 and headers["Retry-After"] == "2"
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"
    status, body, _ = await mock.post(
        "/openai/deployments/d/embeddings?api-version=1", {"input": "x"}
    )
    assert status == 503 and body["error"]["code"] == "503"
    stats = await mock.stats()
    assert stats["failures_left"] == 0 and stats["calls"] == 3 and stats["completed"] == 3

    # Then normal again.
    status, _, headers = await mock.chat()
    assert status == 200 and "Retry-After" not in headers
    events = await mock.stream()
    assert events[-1] == "[DONE]"


async def test_fail_on_demand_until_cleared_and_body(mock: Mock) -> None:
    await mock.fail(status=429, times=-1, body={"custom": True})
    for _ in range(3):
        status, body, headers = await mock.chat(stream=True)
        assert status == 429 and body == {"custom": True}
        assert "Retry-After" not in headers and "retry-after-ms" not in headers
    status, body, _ = await mock.post("/v1/embeddings", {"input": "x"})
    assert status == 429 and body == {"custom": True}
    assert (await mock.stats())["failures_left"] == -1
    assert await mock.fail(times=0) == {"failures_left": 0}
    assert (await mock.chat())[0] == 200

    # A text body; /mock/reset clears too.
    await mock.fail(status=502, times=-1, body="<html>bad gateway</html>")
    async with mock.session.post(f"{mock.url}/v1/messages", json={}) as resp:
        assert resp.status == 502
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert await resp.text() == "<html>bad gateway</html>"
    await mock.reset()
    assert (await mock.stats())["failures_left"] == 0
    assert (await mock.messages())[0] == 200

    # The default is one failure of 500; bad specs are rejected.
    assert await mock.fail() == {"status": 500, "failures_left": 1}
    assert (await mock.chat())[0] == 500
    assert (await mock.chat())[0] == 200
    for spec in ({"status": 200}, {"times": -2}, {"times": "1"}, {"retry_after": "a\r\nb"}):
        status, body, _ = await mock.post("/mock/fail", spec)
        assert status == 400, spec
    assert (await mock.stats())["failures_left"] == 0


async def test_retry_after_ms_is_honoured_by_the_sdk(mock: Mock) -> None:
    await mock.fail(status=429, times=1, retry_after_ms=300)
    async with openai.AsyncOpenAI(
        base_url=f"{mock.url}/v1", api_key="sk-retry", max_retries=1
    ) as client:
        result = await client.chat.completions.create(
            model="mock", messages=[{"role": "user", "content": "x"}]
        )
    assert result.choices[0].finish_reason == "stop"
    stats = await mock.stats()
    first, second = stats["call_times"]
    assert second - first >= 0.29  # the retry waited for retry-after-ms


# --------------------------------------------------------------------------- timeline


async def test_call_times_and_calls_by_path(mock: Mock) -> None:
    t0 = time.time()
    await mock.chat(model="m-1")
    await mock.post("/chat/completions/", {"model": "m-2", "messages": [{"role": "user"}]})
    await mock.messages(model="m-3")
    await mock.post("/v1/embeddings?x=1", {"model": "m-4", "input": "y"})
    await mock.post("/v1/chat/completions", {"model": "m-5"})  # a 400 is a call too
    async with mock.session.get(f"{mock.url}/v1/models") as resp:
        assert resp.status == 200
    t1 = time.time()
    stats = await mock.stats()
    times = stats["call_times"]
    assert len(times) == stats["calls"] == 5
    assert times == sorted(times) and t0 <= times[0] and times[-1] <= t1
    assert stats["calls_by_path"] == {
        "/v1/chat/completions": 2,
        "/chat/completions": 1,
        "/v1/messages": 1,
        "/v1/embeddings": 1,
    }
    assert stats["models_seen"] == ["m-1", "m-2", "m-3", "m-4", "m-5"]
    assert mock.state.call_times.maxlen == 1000
    assert mock.state.calls_by_path == stats["calls_by_path"]
    await mock.reset()
    stats = await mock.stats()
    assert stats["call_times"] == [] and stats["calls_by_path"] == {}


# --------------------------------------------------------------------------- run()


async def test_run_subprocess_prints_line_and_exits_on_sigterm() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_broker.mock.server",
        "--port",
        "0",
        "--chunks",
        "2",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=15)).decode()
        assert line.startswith("mock-upstream listening on http://127.0.0.1:")
        url = line.strip().removeprefix("mock-upstream listening on ")
        port = int(url.rsplit(":", 1)[1])
        assert port > 0
        # Exercise the real (uvloop) server a little before stopping it.
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{url}/v1/chat/completions",
                json={"model": "mock", "messages": [{"role": "user", "content": "hi"}]},
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["usage"]["completion_tokens"] == 2
            events = 0
            async with session.post(
                f"{url}/v1/chat/completions",
                json={
                    "model": "mock-delay-10",
                    "stream": True,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            ) as resp:
                async for chunk in resp.content:
                    events += chunk.startswith(b"data: ")
            assert events == 1 + 2 + 1 + 1
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=15)
        assert proc.returncode == 0, err.decode()
        assert out == b""
        assert err == b"", err.decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_main_parses_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, int, MockDefaults]] = []
    monkeypatch.setattr("llm_broker.mock.server.run", lambda h, p, d: seen.append((h, p, d)))
    assert main(["--port", "0", "--latency-ms", "5", "--chunks", "3", "--chunk-delay-ms", "1"]) == 0
    assert seen == [("127.0.0.1", 0, MockDefaults(latency_ms=5.0, chunks=3, chunk_delay_ms=1.0))]
    seen.clear()
    assert main([]) == 0
    assert seen == [("127.0.0.1", 9000, MockDefaults())]
