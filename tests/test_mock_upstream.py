"""Tests for the in-process / standalone mock LLM upstream."""

from __future__ import annotations

import asyncio
import contextlib
import os
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
import orjson
import pytest

from llm_broker.mock_upstream import WORDS, MockDefaults, MockState, main, start_server

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
    assert stats == {
        "calls": 4,
        "in_flight": 0,
        "peak_in_flight": 1,
        "completed": 4,
        "disconnects": 0,
        "auth_seen": ["Bearer sk-0", "Bearer sk-1", "Bearer sk-2", "anthropic-key"],
    }
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


# --------------------------------------------------------------------------- run()


async def test_run_subprocess_prints_line_and_exits_on_sigterm() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "llm_broker.mock_upstream",
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
    monkeypatch.setattr("llm_broker.mock_upstream.run", lambda h, p, d: seen.append((h, p, d)))
    assert main(["--port", "0", "--latency-ms", "5", "--chunks", "3", "--chunk-delay-ms", "1"]) == 0
    assert seen == [("127.0.0.1", 0, MockDefaults(latency_ms=5.0, chunks=3, chunk_delay_ms=1.0))]
    seen.clear()
    assert main([]) == 0
    assert seen == [("127.0.0.1", 9000, MockDefaults())]
