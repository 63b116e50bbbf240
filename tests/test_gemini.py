"""The ``gemini`` provider type (Google AI Studio and Vertex AI), end to end and in parts.

The translation's pure functions first, then a real stack: the mock upstream
speaking Gemini (and OpenAI, for a fallback), one worker, one ingress on the
session's Redis, the official ``openai`` SDK as the client. The Vertex provider's
service-account key is made here, so the test can check the JWT that google-auth
signed and that the worker reuses its access token.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from llm_broker.mock.server import start_server
from llm_broker.shared import gemini
from llm_broker.shared.errors import UpstreamCredentialsRejected
from llm_broker.workers.gemini import REFRESH_MARGIN_S, VertexTokens, _usable_for
from tests.conftest import Procs, RedisServer, mock_stats, write_config

LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}},
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
TOOLS: Any = [LOOKUP]  # as the SDK's typed parameter
PNG_1PX = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
    "YPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
SCOPE = "https://www.googleapis.com/auth/cloud-platform"
GEN_PATH = "/v1beta/models/mock:generateContent"
STREAM_PATH = "/v1beta/models/mock:streamGenerateContent"


# ---------------------------------------------------------------- translation, in parts


def test_request_roles_config_and_tools_translate() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
            {"role": "user", "content": "Tell me"},
            {"role": "user", "content": [{"type": "text", "text": "about rivers"}]},
            {"role": "assistant", "content": "Which ones?"},
            {"role": "user", "content": "Old ones"},
        ],
        "temperature": 0.2,
        "top_p": 0.9,
        "max_tokens": 50,
        "stop": ["END"],
        "seed": 7,
        "n": 2,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object"}},
        },
        "tools": [LOOKUP],
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "user": "dropped",
        "parallel_tool_calls": False,
    }
    out = gemini.chat_to_gemini(body)
    assert out["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "No lists."}]}
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "Tell me"}, {"text": "about rivers"}]},
        {"role": "model", "parts": [{"text": "Which ones?"}]},
        {"role": "user", "parts": [{"text": "Old ones"}]},
    ]
    assert out["generationConfig"] == {
        "temperature": 0.2,
        "topP": 0.9,
        "maxOutputTokens": 50,
        "candidateCount": 2,
        "seed": 7,
        "stopSequences": ["END"],
        "responseMimeType": "application/json",
        "responseJsonSchema": {"type": "object"},
    }
    declaration = out["tools"][0]["functionDeclarations"][0]
    assert declaration["name"] == "lookup"
    assert declaration["parametersJsonSchema"] == LOOKUP["function"]["parameters"]  # type: ignore[index]
    assert out["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["lookup"]}
    }
    assert set(out) == {"contents", "systemInstruction", "generationConfig", "tools", "toolConfig"}


def test_tool_calls_round_trip_with_ids_and_thought_signatures() -> None:
    answer = {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "thinking...", "thought": True},
                        {
                            "functionCall": {"name": "lookup", "args": {"q": 1}},
                            "thoughtSignature": "c2ln",
                        },
                        {"functionCall": {"name": "fetch", "args": {}}},
                    ],
                },
                "finishReason": "STOP",
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 10,
            "candidatesTokenCount": 4,
            "thoughtsTokenCount": 6,
            "cachedContentTokenCount": 3,
            "totalTokenCount": 20,
        },
    }
    chat = gemini.response_to_chat(answer, "gem", 5)
    choice = chat["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None  # the thought is not part of the answer
    calls = choice["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["call_0~c2ln", "call_1"]
    assert [(c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in calls] == [
        ("lookup", {"q": 1}),
        ("fetch", {}),
    ]
    assert chat["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 10,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 6},
    }

    follow_up = gemini.chat_to_gemini(
        {
            "messages": [
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "tool_call_id": "call_0~c2ln", "content": "plain text"},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"found": true}'},
            ]
        }
    )
    model_turn, results = follow_up["contents"][1:]
    assert model_turn == {
        "role": "model",
        "parts": [
            {"functionCall": {"name": "lookup", "args": {"q": 1}}, "thoughtSignature": "c2ln"},
            {"functionCall": {"name": "fetch", "args": {}}},
        ],
    }
    assert results == {
        "role": "user",
        "parts": [
            {"functionResponse": {"name": "lookup", "response": {"content": "plain text"}}},
            {"functionResponse": {"name": "fetch", "response": {"found": True}}},
        ],
    }
    # An id Gemini gave is sent back with the call and its result.
    own = gemini.chat_to_gemini(
        {
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "tool_calls": [
                        {
                            "id": "g-7",
                            "type": "function",
                            "function": {"name": "f", "arguments": ""},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "g-7", "content": "ok"},
            ]
        }
    )
    assert own["contents"][1]["parts"][0]["functionCall"]["id"] == "g-7"
    assert own["contents"][2]["parts"][0]["functionResponse"]["id"] == "g-7"


def test_images_become_inline_data() -> None:
    out = gemini.chat_to_gemini(
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:image/PNG;base64,{PNG_1PX}"},
                        },
                    ],
                }
            ]
        }
    )
    assert out["contents"][0]["parts"][1] == {
        "inlineData": {"mimeType": "image/png", "data": PNG_1PX}
    }


def _user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "messages": [
                    _user([{"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}])
                ]
            },
            "messages.0.content.0.image_url.url",
        ),
        (
            {
                "messages": [
                    _user([{"type": "image_url", "image_url": {"url": "data:image/png,xx"}}])
                ]
            },
            "messages.0.content.0.image_url.url",
        ),
        (
            {
                "messages": [
                    _user([{"type": "image_url", "image_url": {"url": "data:image/png;base64,*"}}])
                ]
            },
            "messages.0.content.0.image_url.url",
        ),
        (
            {
                "messages": [
                    _user("hi"),
                    {"role": "tool", "tool_call_id": "call_9", "content": "orphan"},
                ]
            },
            "messages.1.tool_call_id",
        ),
        ({"messages": [_user("hi")], "logprobs": True}, "logprobs"),
        ({"messages": [_user("hi")], "logit_bias": {"50256": -100}}, "logit_bias"),
        ({"messages": [_user("hi")], "modalities": ["text", "audio"]}, "modalities"),
        ({"messages": [_user("hi")], "n": 0}, "n"),
        ({"messages": [_user("hi")], "temperature": 3}, "temperature"),
        ({"messages": [_user("hi")], "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"messages": [_user("hi")], "response_format": {"type": "xml"}}, "response_format.type"),
        ({"messages": [{"role": "system", "content": "only me"}]}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        (
            {"messages": [_user([{"type": "file", "file": {"file_id": "file-1"}}])]},
            "messages.0.content.0.file.file_id",
        ),
    ],
)
def test_untranslatable_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(gemini.TranslationError) as caught:
        gemini.chat_to_gemini(body)
    assert caught.value.param == param
    assert str(caught.value).startswith(param + ": ")


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("OTHER", "stop"),
    ],
)
def test_finish_reasons_map(reason: str, finish: str) -> None:
    answer = {"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": reason}]}
    assert gemini.response_to_chat(answer, "m", 0)["choices"][0]["finish_reason"] == finish


def test_blocked_prompt_and_empty_answers() -> None:
    blocked = {
        "promptFeedback": {"blockReason": "SAFETY"},
        "usageMetadata": {"promptTokenCount": 4},
    }
    choice = gemini.response_to_chat(blocked, "m", 0)["choices"][0]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("content_filter", "")
    with pytest.raises(ValueError):
        gemini.response_to_chat({"usageMetadata": {}}, "m", 0)


def test_stream_events_become_chunks() -> None:
    translate = gemini.StreamToChunks("r", "m", 1)
    usage = {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5}
    chunks = translate.feed({"candidates": [{"content": {"parts": [{"text": "Hello"}]}}]})
    chunks += translate.feed(
        {
            "candidates": [
                {
                    "content": {
                        "parts": [
                            {"text": " world"},
                            {
                                "functionCall": {"name": "f", "args": {"a": 1}},
                                "thoughtSignature": "s",
                            },
                        ]
                    },
                    "finishReason": "STOP",
                }
            ],
            "usageMetadata": usage,
        }
    )
    deltas = [(c["choices"][0]["delta"], c["choices"][0]["finish_reason"]) for c in chunks]
    assert deltas == [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "Hello"}, None),
        ({"content": " world"}, None),
        (
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_0~s",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a":1}'},
                    }
                ]
            },
            None,
        ),
        ({}, "tool_calls"),
    ]
    end = translate.end()
    assert end["choices"] == [] and end["usage"]["total_tokens"] == 5

    cut = gemini.StreamToChunks("r", "m", 1)
    cut.feed({"candidates": [{"content": {"parts": [{"text": "Hel"}]}}]})
    with pytest.raises(ValueError):
        cut.end()


def test_errors_translate_for_the_broker() -> None:
    body = {
        "error": {
            "code": 429,
            "message": "Quota exceeded",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}],
        }
    }
    assert gemini.error_to_openai(body) == {
        "error": {
            "message": "Quota exceeded",
            "code": "resource_exhausted",
            "type": "rate_limit_error",
        }
    }
    assert gemini.error_to_openai([body]) == gemini.error_to_openai(body)
    assert gemini.retry_delay(body) == "37"
    assert gemini.retry_delay({"error": {"code": 500}}) is None
    assert gemini.error_to_openai("not json") == "not json"


# ---------------------------------------------------------------- Vertex tokens


def test_tokens_are_renewed_before_they_expire() -> None:
    now = datetime.datetime.now(datetime.UTC)
    hour = (now + datetime.timedelta(hours=1)).replace(tzinfo=None)  # google-auth: naive UTC
    assert 3600 - REFRESH_MARGIN_S - 5 < _usable_for(hour) <= 3600 - REFRESH_MARGIN_S
    assert 25 < _usable_for(now + datetime.timedelta(seconds=60)) <= 30  # half a short life
    assert _usable_for(now - datetime.timedelta(seconds=1)) == 0


async def test_one_token_request_serves_concurrent_calls(tmp_path: Path) -> None:
    server, state = await start_server("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    path, _, _ = _service_account(tmp_path, f"http://127.0.0.1:{port}/token")
    tokens = VertexTokens("vx", str(path))
    try:
        first = await asyncio.gather(*(tokens.get() for _ in range(5)))
        assert len(set(first)) == 1 and state.calls_by_path == {"/token": 1}
        assert await tokens.get() == first[0]
        tokens.invalidate(first[0])  # as after Google's 401
        renewed = await tokens.get()
        assert renewed != first[0] and state.calls_by_path == {"/token": 2}
    finally:
        tokens.close()
        server.close()
        await server.wait_closed()


async def test_an_unreadable_service_account_file_is_a_credentials_error(
    tmp_path: Path,
) -> None:
    tokens = VertexTokens("vx", str(tmp_path / "missing.json"))
    with pytest.raises(UpstreamCredentialsRejected) as caught:
        await tokens.get()
    assert caught.value.http_status == 502 and "missing.json" not in caught.value.message
    tokens.close()


# ---------------------------------------------------------------- end to end


@dataclass
class Stack:
    url: str
    mock: str
    key: str
    account: dict[str, Any]
    private_key: rsa.RSAPrivateKey


def _service_account(tmp: Path, token_uri: str) -> tuple[Path, dict[str, Any], rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    account = {
        "type": "service_account",
        "project_id": "proj",
        "private_key_id": secrets.token_hex(8),
        "private_key": pem,
        "client_email": "broker@proj.iam.gserviceaccount.com",
        "client_id": "1234567890",
        "token_uri": token_uri,
    }
    path = tmp / "vertex-sa.json"
    path.write_text(orjson.dumps(account).decode())
    return path, account, key


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if redis_server.proc is None:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("gemini")
    procs = Procs(tmp)
    try:
        _, mock = procs.mock()
        # No known key shape: only the redaction of the call's own key hides it.
        key = f"gk-test-{secrets.token_hex(12)}"
        key_file = tmp / "gemini.key"
        key_file.write_text(key + "\n")
        account_file, account, private_key = _service_account(tmp, f"{mock}/token")
        fast_retry = {"max_retries": 1, "base_s": 0.05, "max_s": 0.1}
        config = write_config(
            tmp,
            redis_server.url,
            "gemini:",
            mock,
            providers={
                "gem": {
                    "type": "gemini",
                    "base_url": f"{mock}/v1beta",
                    "api_key_file": str(key_file),
                    "retry": fast_retry,
                    "circuit": {"failures": 1_000_000},
                },
                "vertex": {
                    "type": "gemini",
                    "base_url": f"{mock}/v1/projects/proj/locations/us-central1/publishers/google",
                    "vertex_credentials_file": str(account_file),
                },
            },
            models={
                "gemini-x": {"provider": "gem", "model": "mock"},
                "vertex-x": {"provider": "vertex", "model": "mock"},
                "gemini-fb": {
                    "deployments": [
                        {"provider": "gem", "model": "mock-error-500", "weight": 1},
                        {"provider": "mock", "model": "mock", "weight": 0},
                    ]
                },
            },
        )
        procs.worker(config, providers=["gem", "vertex", "mock"])
        _, url = procs.ingress(config)
        yield Stack(url, mock, key, account, private_key)
    finally:
        procs.stop_all()


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{stack.mock}/mock/reset") as resp:
            assert resp.status == 200
        yield session


@pytest.fixture
async def oai(stack: Stack) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="none", max_retries=0)
    yield client
    await client.close()


async def _post_chat(
    http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any]
) -> tuple[int, Any]:
    async with http.post(f"{stack.url}/v1/chat/completions", json=body) as resp:
        return resp.status, await resp.json()


async def _stream_text(oai: openai.AsyncOpenAI, **request: Any) -> tuple[str, str | None, Any]:
    stream: Any = await oai.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **request
    )
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    return "".join(pieces), finish, usage


async def test_chat_and_stream_through_ai_studio(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    messages: Any = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Tell me about old stone bridges"},
    ]
    answer = await oai.chat.completions.create(model="gemini-x", messages=messages)
    choice = answer.choices[0]
    assert answer.model == "gemini-x" and choice.finish_reason == "stop"
    assert choice.message.role == "assistant" and len((choice.message.content or "").split()) == 8
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (8, 8)

    text, finish, usage = await _stream_text(oai, model="gemini-x", messages=messages)
    assert (text, finish) == (choice.message.content, "stop")
    assert usage is not None and usage.total_tokens == 16

    stats = await mock_stats(http, stack.mock)
    assert stats["calls_by_path"] == {GEN_PATH: 1, STREAM_PATH: 1}
    assert stats["auth_seen"] == [stack.key, stack.key]  # x-goog-api-key, nothing else


async def test_max_tokens_gives_finish_reason_length(oai: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Hello there"}]
    answer = await oai.chat.completions.create(model="gemini-x", messages=messages, max_tokens=3)
    assert answer.choices[0].finish_reason == "length"
    assert len((answer.choices[0].message.content or "").split()) == 3
    text, finish, _ = await _stream_text(oai, model="gemini-x", messages=messages, max_tokens=3)
    assert (text, finish) == (answer.choices[0].message.content, "length")


async def test_tool_call_and_its_result_turn(oai: openai.AsyncOpenAI) -> None:
    question: Any = {"role": "user", "content": "bridges please"}
    first = await oai.chat.completions.create(
        model="gemini-x",
        messages=[question],
        tools=TOOLS,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call: Any = choice.message.tool_calls[0]
    assert call.id.startswith("call_0") and call.function.name == "lookup"
    assert orjson.loads(call.function.arguments) == {"query": "bridges"}

    stream: Any = await oai.chat.completions.create(
        model="gemini-x",
        messages=[question],
        tools=TOOLS,
        stream=True,
    )
    streamed: dict[str, Any] = {}
    finish = None
    async for chunk in stream:
        for choice_delta in chunk.choices:
            for delta in choice_delta.delta.tool_calls or ():
                streamed.update(
                    {"id": delta.id, "name": delta.function.name, "args": delta.function.arguments}
                )
            finish = choice_delta.finish_reason or finish
    assert (streamed["id"], streamed["name"], finish) == (call.id, "lookup", "tool_calls")

    # The mock, like Gemini 3, refuses a function call without the thought signature
    # it gave: the round trip through the OpenAI client keeps it.
    answer = await oai.chat.completions.create(
        model="gemini-x",
        messages=[
            question,
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "stone arches"},
        ],
        tools=TOOLS,
    )
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


async def test_image_data_url_reaches_gemini_as_inline_data(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    content: Any = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG_1PX}"}},
    ]
    answer = await oai.chat.completions.create(
        model="gemini-x", messages=[{"role": "user", "content": content}]
    )
    assert answer.usage is not None
    assert answer.usage.prompt_tokens == 3 + 258  # the words and Gemini's count for an image

    content[1]["image_url"]["url"] = "https://example.com/cat.png"
    status, body = await _post_chat(
        http, stack, {"model": "gemini-x", "messages": [{"role": "user", "content": content}]}
    )
    assert status == 400
    assert body["error"]["param"] == "messages.0.content.1.image_url.url"
    assert "data: URL" in body["error"]["message"]
    assert (await mock_stats(http, stack.mock))["calls_by_path"] == {GEN_PATH: 1}


async def _fail(http: aiohttp.ClientSession, stack: Stack, **how: Any) -> None:
    async with http.post(f"{stack.mock}/mock/fail", json=how) as resp:
        assert resp.status == 200


async def test_429_is_retried(stack: Stack, http: aiohttp.ClientSession) -> None:
    await _fail(http, stack, status=429, times=1, retry_after="0")
    status, body = await _post_chat(
        http, stack, {"model": "gemini-x", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 200 and body["choices"][0]["message"]["content"]
    assert (await mock_stats(http, stack.mock))["calls_by_path"] == {GEN_PATH: 2}


async def test_5xx_falls_back_to_the_next_deployment(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    status, body = await _post_chat(
        http, stack, {"model": "gemini-fb", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert status == 200 and body["model"] == "gemini-fb"
    assert (await mock_stats(http, stack.mock))["calls_by_path"] == {
        "/v1beta/models/mock-error-500:generateContent": 2,  # the call and its one retry
        "/v1/chat/completions": 1,
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_400_passes_with_its_message_and_never_the_key(
    stack: Stack, http: aiohttp.ClientSession, stream: bool
) -> None:
    await _fail(
        http,
        stack,
        status=400,
        times=1,
        body={
            "error": {
                "code": 400,
                "message": f"API key {stack.key} not valid. Please pass a valid API key.",
                "status": "INVALID_ARGUMENT",
            }
        },
    )
    request = {"model": "gemini-x", "messages": [{"role": "user", "content": "hi"}]}
    status, body = await _post_chat(http, stack, {**request, "stream": stream})
    assert status == 400
    error = body["error"]
    assert error["message"] == "API key [redacted] not valid. Please pass a valid API key."
    assert error["code"] == "invalid_argument"
    assert stack.key not in orjson.dumps(body).decode()
    path = STREAM_PATH if stream else GEN_PATH
    assert (await mock_stats(http, stack.mock))["calls_by_path"] == {path: 1}  # not retried


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


async def test_vertex_uses_one_signed_service_account_token(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    messages: Any = [{"role": "user", "content": "Hello from Vertex"}]
    for _ in range(3):
        answer = await oai.chat.completions.create(model="vertex-x", messages=messages)
        assert answer.choices[0].message.content
    text, finish, _ = await _stream_text(oai, model="vertex-x", messages=messages)
    assert text == answer.choices[0].message.content and finish == "stop"

    stats = await mock_stats(http, stack.mock)
    prefix = "/v1/projects/proj/locations/us-central1/publishers/google/models/mock"
    assert stats["calls_by_path"][f"{prefix}:generateContent"] == 3
    assert stats["calls_by_path"][f"{prefix}:streamGenerateContent"] == 1
    bearers = set(stats["authorization_seen"])
    assert len(bearers) == 1 and bearers.pop().startswith("Bearer mock-token-")

    async with http.post(f"{stack.mock}/token?mock=assertions") as resp:
        book = await resp.json()
    assert book["tokens_issued"] == 1  # minted once, reused by every call
    (seen,) = book["assertions"]
    claims = seen["claims"]
    assert claims["iss"] == stack.account["client_email"]
    assert claims["aud"] == "https://oauth2.googleapis.com/token"  # google-auth's audience
    assert claims["scope"] == SCOPE
    assert seen["header"]["kid"] == stack.account["private_key_id"]
    head, payload, signature = seen["assertion"].split(".")
    assert orjson.loads(_b64url(payload)) == claims
    public = stack.private_key.public_key()
    public.verify(
        _b64url(signature), f"{head}.{payload}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    with pytest.raises(InvalidSignature):  # the check can fail
        public.verify(
            _b64url(signature), f"{head}.{payload}x".encode(), padding.PKCS1v15(), hashes.SHA256()
        )


async def test_mock_refuses_unknown_bearer_tokens_and_bad_assertions(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    async with http.post(
        f"{stack.mock}{GEN_PATH}", json=body, headers={"Authorization": "Bearer forged"}
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["status"] == "UNAUTHENTICATED"
    form = {"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer", "assertion": "a.b"}
    async with http.post(f"{stack.mock}/token", data=form) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "invalid_grant"
