"""The Anthropic Messages API kept native end to end, token counts, async messages, and
the OpenAI Responses API (plain, streamed, tools, background, cancel, continued turns),
on deployments of their own API and translated for others.

One mock upstream behind one worker and one ingress on the session's Redis; the
official ``anthropic`` and ``openai`` SDKs as clients. What reaches the upstream is
read back from the mock's ``/mock/requests`` (each body exactly as it came), and
what the SDK sent from an httpx request hook.
"""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import anthropic
import msgspec
import openai
import orjson
import pytest

from llm_broker.shared.config import Target, new_key
from llm_broker.shared.errors import BadRequest
from llm_broker.shared.rawjson import set_member
from llm_broker.workers.policy import CallPolicy, Tries
from llm_broker.workers.upstream import SSEBlocks
from tests.conftest import Procs, RedisServer, write_config
from tests.helpers import eventually, make_job

KEY, HASH = new_key()
AUTH = {"Authorization": f"Bearer {KEY}"}
TOOL: Any = {
    "type": "function",
    "name": "lookup",
    "description": "Look a word up",
    "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string"}},
        "required": ["query"],
    },
}
PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n").decode()


@dataclass
class Stack:
    url: str
    mock: str
    sent: list[bytes] = field(default_factory=list)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if redis_server.proc is None:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("native")
    procs = Procs(tmp)
    try:
        _, mock = procs.mock()
        config = write_config(
            tmp,
            redis_server.url,
            "native:",
            mock,
            auth={"keys": [{"tenant": "alpha", "sha256": HASH}]},
            providers={
                "anth": {"type": "anthropic", "base_url": f"{mock}/v1"},
                "oai": {"type": "openai", "base_url": f"{mock}/v1"},
                "compat": {"type": "openai-compatible", "base_url": f"{mock}/v1"},
            },
            models={
                "claude-n": {"provider": "anth", "model": "claude-upstream"},
                "claude-slow": {"provider": "anth", "model": "mock-latency-3000"},
                "gpt-n": {"provider": "oai", "model": "gpt-upstream"},
                "gpt-slow": {"provider": "oai", "model": "mock-latency-3000"},
                "chat-only": {"provider": "compat", "model": "mock"},
                # A chat-only deployment first, an Anthropic one behind it.
                "mixed": {
                    "fallback": True,
                    "deployments": [
                        {"provider": "compat", "model": "mock", "weight": 1},
                        {"provider": "anth", "model": "claude-upstream", "weight": 0},
                    ],
                },
            },
            cache={"enabled": True, "ttl_s": 60},
            files={"dir": str(tmp / "files")},
        )
        procs.worker(config, providers=["mock", "anth", "oai", "compat"])
        _, url = procs.ingress(config)
        yield Stack(url, mock)
    finally:
        procs.stop_all()


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{stack.mock}/mock/reset") as resp:
            assert resp.status == 200
        stack.sent.clear()
        yield session


@pytest.fixture
async def claude(stack: Stack) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async def hook(request: Any) -> None:
        stack.sent.append(request.content)

    client = anthropic.AsyncAnthropic(
        base_url=stack.url,
        api_key=KEY,
        max_retries=0,
        # The SDK's own HTTP client, with a hook that keeps each request's bytes.
        http_client=anthropic.DefaultAsyncHttpxClient(event_hooks={"request": [hook]}),
    )
    yield client
    await client.close()


@pytest.fixture
async def oai(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=KEY, max_retries=0)
    yield client
    await client.close()


async def seen(http: aiohttp.ClientSession, stack: Stack) -> list[dict[str, Any]]:
    """The mock's last model calls, bodies decoded from base64 to bytes."""
    async with http.get(f"{stack.mock}/mock/requests") as resp:
        found: list[dict[str, Any]] = await resp.json()
    for call in found:
        call["body"] = base64.b64decode(call.pop("body_b64"))
    return found


# ---------------------------------------------------------------- Anthropic, native


def rich_messages() -> Any:
    """A conversation with what only Anthropic carries: cache_control on blocks, a
    document (PDF) block, an earlier turn's thinking block."""
    return [
        {
            "role": "user",
            "content": [
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": PDF},
                    "cache_control": {"type": "ephemeral"},
                },
                {"type": "text", "text": "Summarise the old stone bridges"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "The user wants bridges.", "signature": "c2ln"},
                {"type": "text", "text": "Which ones?"},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Rivers of Europe", "cache_control": {"type": "ephemeral"}}
            ],
        },
    ]


THINKING: Any = {"type": "enabled", "budget_tokens": 1024}
SYSTEM: Any = [{"type": "text", "text": "Be brief. " * 50, "cache_control": {"type": "ephemeral"}}]


async def test_messages_reach_an_anthropic_deployment_byte_for_byte(
    stack: Stack, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic
) -> None:
    message = await claude.messages.create(
        model="claude-n",
        max_tokens=64,
        system=SYSTEM,
        messages=rich_messages(),
        thinking=THINKING,
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31,pdfs-2024-09-25"},
    )
    assert message.type == "message" and message.content[0].type == "text"
    [call] = await seen(http, stack)
    assert call["path"] == "/v1/messages"
    sent = stack.sent[-1]
    # Every byte as the SDK wrote it, but the model's name upstream.
    assert sent.count(b'"claude-n"') == 1
    assert call["body"] == sent.replace(b'"claude-n"', b'"claude-upstream"')
    assert call["headers"]["anthropic-beta"] == "prompt-caching-2024-07-31,pdfs-2024-09-25"


async def test_a_native_stream_reaches_the_client_as_the_upstream_sent_it(
    stack: Stack, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic
) -> None:
    body = {
        "model": "claude-n",
        "max_tokens": 64,
        "stream": True,
        "system": SYSTEM,
        "messages": rich_messages(),
    }
    async with http.post(f"{stack.url}/v1/messages", json=body, headers=AUTH) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        through = await resp.read()
    direct_body = {**body, "model": "claude-upstream"}
    async with http.post(f"{stack.mock}/v1/messages", json=direct_body) as resp:
        direct = await resp.read()
    # The same events, byte for byte, but for the mock's message counter.
    assert re.sub(rb"msg_mock_\d+", b"ID", through) == re.sub(rb"msg_mock_\d+", b"ID", direct)
    async with claude.messages.stream(
        model="claude-n",
        max_tokens=64,
        system=SYSTEM,
        messages=rich_messages(),
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text and final.content[0].type == "text" and final.content[0].text == text
    assert final.usage.output_tokens > 0


async def test_count_tokens_on_an_anthropic_deployment(
    stack: Stack, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic
) -> None:
    counted = await claude.messages.count_tokens(
        model="claude-n",
        system="one two",
        messages=[{"role": "user", "content": "three four five"}],
    )
    assert counted.input_tokens == 5
    [call] = await seen(http, stack)
    assert call["path"] == "/v1/messages/count_tokens"
    with pytest.raises(anthropic.BadRequestError) as refused:
        await claude.messages.count_tokens(
            model="gpt-n", messages=[{"role": "user", "content": "hi"}]
        )
    assert "token count" in refused.value.message


async def test_a_request_that_cannot_be_translated_names_the_field(
    stack: Stack, claude: anthropic.AsyncAnthropic
) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        await claude.messages.create(
            model="gpt-n",
            max_tokens=64,
            messages=rich_messages(),
        )
    body: Any = refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "messages.0.content.0" in body["error"]["message"]
    assert "openai deployment" in body["error"]["message"]
    # The same conversation without what OpenAI cannot carry is translated.
    message = await claude.messages.create(
        model="gpt-n",
        max_tokens=64,
        system=SYSTEM,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "hello", "cache_control": {"type": "ephemeral"}}
                ],
            }
        ],
    )
    assert message.model == "gpt-n" and message.content[0].type == "text"


async def test_messages_as_an_async_job(stack: Stack, http: aiohttp.ClientSession) -> None:
    body = {
        "model": "claude-n",
        "max_tokens": 32,
        "messages": [{"role": "user", "content": "Old stone bridges"}],
    }
    headers = {**AUTH, "Prefer": "respond-async"}
    async with http.post(f"{stack.url}/v1/messages", json=body, headers=headers) as resp:
        assert resp.status == 202
        assert resp.headers["Preference-Applied"] == "respond-async"
        job = await resp.json()

    async def done() -> dict[str, Any] | None:
        async with http.get(f"{stack.url}/v1/jobs/{job['id']}", headers=AUTH) as resp:
            found: dict[str, Any] = await resp.json()
        return found if found["status"] == "completed" else None

    finished = await eventually(done)
    result = finished["result"]
    assert result["type"] == "message" and result["content"][0]["type"] == "text"
    assert result["usage"]["output_tokens"] > 0


# ---------------------------------------------------------------- Responses


@pytest.mark.parametrize("model", ["gpt-n", "chat-only", "claude-n"])
async def test_responses_plain_and_streamed(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI, model: str
) -> None:
    response = await oai.responses.create(
        model=model, input="Tell me about rivers", instructions="Be brief."
    )
    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text
    assert response.usage is not None and response.usage.output_tokens > 0
    upstream = (await seen(http, stack))[-1]["path"]
    assert (
        upstream
        == {
            "gpt-n": "/v1/responses",
            "chat-only": "/v1/chat/completions",
            "claude-n": "/v1/messages",
        }[model]
    )

    events: list[str] = []
    async with oai.responses.stream(
        model=model, input="Tell me about rivers", instructions="Be brief."
    ) as stream:
        async for event in stream:
            events.append(event.type)
        final = await stream.get_final_response()
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert events.count("response.output_text.delta") > 1
    assert final.output_text == response.output_text
    again = await oai.responses.retrieve(final.id)
    assert again.output_text == final.output_text


@pytest.mark.parametrize("model", ["gpt-n", "chat-only", "claude-n"])
async def test_responses_function_call_and_continued_turn(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI, model: str
) -> None:
    first = await oai.responses.create(
        model=model,
        input="bridges",
        tools=[TOOL],
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert call.name == "lookup" and orjson.loads(call.arguments) == {"query": "bridges"}
    second = await oai.responses.create(
        model=model,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "stone arch"}],
        tools=[TOOL],
    )
    assert second.status == "completed" and second.output_text
    assert second.previous_response_id == first.id
    # The earlier turn went upstream with the new one: the first input and the call.
    last = (await seen(http, stack))[-1]["body"]
    assert b"bridges" in last and call.call_id.encode() in last and b"stone arch" in last
    items = await oai.responses.input_items.list(second.id)
    assert [getattr(i, "type", None) for i in items.data][-1] == "function_call_output"


async def test_background_response_polled_to_completion(oai: openai.AsyncOpenAI) -> None:
    queued = await oai.responses.create(model="chat-only", input="Rivers", background=True)
    assert queued.status in ("queued", "in_progress", "completed") and queued.background

    async def done() -> openai.types.responses.Response | None:
        found = await oai.responses.retrieve(queued.id)
        return found if found.status == "completed" else None

    finished = await eventually(done)
    assert finished.id == queued.id and finished.output_text and finished.background


@pytest.mark.parametrize("model", ["gpt-slow", "claude-slow"])
async def test_background_response_cancelled(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI, model: str
) -> None:
    queued = await oai.responses.create(model=model, input="Rivers", background=True)

    async def running() -> bool:
        async with http.get(f"{stack.mock}/mock/stats") as resp:
            return bool((await resp.json())["in_flight"] >= 1)

    await eventually(running)
    cancelled = await oai.responses.cancel(queued.id)
    assert cancelled.status == "cancelled"
    assert (await oai.responses.retrieve(queued.id)).status == "cancelled"

    async def aborted() -> bool:
        async with http.get(f"{stack.mock}/mock/stats") as resp:
            return bool((await resp.json())["in_flight"] == 0)

    await eventually(aborted)


async def test_responses_bad_input(stack: Stack, http: aiohttp.ClientSession) -> None:
    cases: list[tuple[dict[str, Any], str | None]] = [
        ({"model": "gpt-n"}, "input"),
        ({"model": "gpt-n", "input": ""}, "input"),
        ({"model": "gpt-n", "input": "x", "background": True, "stream": True}, "stream"),
        (
            {"model": "gpt-n", "input": "x", "previous_response_id": "resp_nope"},
            "previous_response_id",
        ),
        ({"model": "chat-only", "input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"model": "gpt-n", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "gpt-n", "input": [1]}, "input[0]"),
        # Found by the fuzzer: a background response's answer echoes its tools.
        ({"model": "gpt-n", "input": "x", "background": True, "tools": True}, "tools"),
        ({"model": "gpt-n", "input": "x", "tools": [1]}, "tools[0]"),
    ]
    for body, param in cases:
        async with http.post(f"{stack.url}/v1/responses", json=body, headers=AUTH) as resp:
            found = await resp.json()
            assert resp.status == 400, (body, found)
        assert found["error"]["param"] == param, (body, found)
    async with http.get(f"{stack.url}/v1/responses/resp_unknown", headers=AUTH) as resp:
        assert resp.status == 404


async def test_a_route_leaves_out_a_deployment_that_cannot_take_the_request(
    stack: Stack, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic
) -> None:
    """A document block cannot go to the chat-only deployment that the route tries
    first: the Anthropic one behind it serves the request, as it came."""
    message = await claude.messages.create(model="mixed", max_tokens=32, messages=rich_messages())
    assert message.content[0].type == "text"
    [call] = await seen(http, stack)
    assert call["path"] == "/v1/messages"
    assert b'"document"' in call["body"]


async def test_the_cache_tells_anthropic_betas_apart(
    stack: Stack, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic
) -> None:
    """A token count is cached, but an answer under one beta is not another's."""
    messages: Any = [{"role": "user", "content": "one two three " + secrets.token_hex(4)}]
    for beta in ("beta-a", "beta-b", "beta-a"):
        counted = await claude.messages.count_tokens(
            model="claude-n", messages=messages, extra_headers={"anthropic-beta": beta}
        )
        assert counted.input_tokens == 4
    calls = [c for c in await seen(http, stack) if c["path"] == "/v1/messages/count_tokens"]
    assert [c["headers"]["anthropic-beta"] for c in calls] == ["beta-a", "beta-b"]


async def test_a_message_batch_keeps_what_only_anthropic_carries(
    stack: Stack, http: aiohttp.ClientSession, claude: anthropic.AsyncAnthropic
) -> None:
    params: Any = {
        "model": "claude-n",
        "max_tokens": 32,
        "system": SYSTEM,
        "messages": rich_messages(),
    }
    batch = await claude.messages.batches.create(requests=[{"custom_id": "doc", "params": params}])

    async def ended() -> bool:
        found = await claude.messages.batches.retrieve(batch.id)
        return found.processing_status == "ended"

    await eventually(ended, timeout=60)
    [result] = [r async for r in await claude.messages.batches.results(batch.id)]
    assert result.custom_id == "doc" and result.result.type == "succeeded"
    [call] = [c for c in await seen(http, stack) if c["path"] == "/v1/messages"]
    sent = orjson.loads(call["body"])
    assert sent["model"] == "claude-upstream"
    assert sent["messages"] == rich_messages() and sent["system"] == SYSTEM


# ---------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"model": "a", "x": [1, {"model": 2}]}', b'{"model": "up", "x": [1, {"model": 2}]}'),
        (b'{"m":[{"c":"model,}\\""}],"model":"a"}', b'{"m":[{"c":"model,}\\""}],"model":"up"}'),
        (b" { } ", b' { "model":"up"} '),
        (b'{"a":1.50}', b'{"a":1.50,"model":"up"}'),
        (b'{"model" : "x" ,"b":2}', b'{"model" : "up" ,"b":2}'),
        # Repeated: decoders keep the last; an upstream may read any.
        (b'{"model":"a","b":[[]],"model":"b"}', b'{"model":"up","b":[[]],"model":"up"}'),
        (b'{"mod\\u0065l":"a"}', b'{"mod\\u0065l":"up"}'),
    ],
)
def test_set_member_keeps_every_other_byte(raw: bytes, expected: bytes) -> None:
    assert set_member(raw, "model", "up") == expected
    assert orjson.loads(expected)["model"] == "up"


def test_set_member_scans_a_large_body_quickly() -> None:
    image = base64.b64encode(secrets.token_bytes(3_000_000))
    raw = b'{"messages":[{"data":"' + image + b'","n":[' + b",".join([b"1"] * 300_000)
    raw += b']}],"model":"a"}'
    started = time.process_time()
    out = set_member(raw, "model", "up")
    assert out.endswith(b'"model":"up"}') and len(out) == len(raw) + 1
    assert time.process_time() - started < 1.0  # a regex step per byte took seconds


def test_sse_events_split_inside_a_crlf_are_all_read() -> None:
    """Gemini frames events with CRLF; a chunk may end between the CR and the LF."""
    splitter = SSEBlocks()
    found = splitter.feed(b'data: {"a":1}\r\n\r') + splitter.feed(b'\ndata: {"b":2}\r\n\r\n')
    assert [data for _, data in found] == [b'{"a":1}', b'{"b":2}']
    assert splitter.end() == []


def test_a_deployment_that_cannot_take_a_request_falls_back() -> None:
    """A request that one deployment's API cannot carry (a worker's translation
    refuses it) moves on to the next deployment; another 400 ends the job."""
    job = msgspec.structs.replace(make_job(), fallbacks=[Target("anth", "claude-upstream")])
    tries = Tries(time.time())
    untranslatable = BadRequest("tools.0.type: not translatable", code="untranslatable")
    assert CallPolicy.may_fall_back(job, untranslatable, tries)
    assert not CallPolicy.may_fall_back(job, BadRequest("max_tokens: too large"), tries)
