"""The ``bedrock`` provider type: Converse and ConverseStream, end to end and in parts.

End to end: the mock upstream (which speaks Bedrock and checks every SigV4
signature), workers and an ingress on the session's real Redis, the official
``openai`` SDK as the client. In parts: the translation, the event-stream framing
(the mock's encoder against botocore's decoder) and the mock's signature check.
"""

from __future__ import annotations

import base64
import datetime
import os
import secrets
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import msgspec
import openai
import orjson
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.eventstream import ChecksumMismatch, EventStreamBuffer, EventStreamMessage

from llm_broker.mock.bedrock import event_message, signature_problem
from llm_broker.procs import Child, python_cmd
from llm_broker.shared import bedrock
from llm_broker.shared.config import ProviderConfig
from llm_broker.shared.errors import UpstreamCredentialsRejected, upstream_status_error
from llm_broker.workers.bedrock import AwsCredentials
from tests.conftest import Procs, RedisServer, mock_stats, write_config
from tests.helpers import eventually

MODEL_ID = "anthropic.claude-3-haiku-20240307-v1:0"  # a ':' to quote in the path
TOOLS = [
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
# A 1x1 PNG.
PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000100e221bc330000000049454e44ae426082"
    )
).decode()


# ---------------------------------------------------------------- translation


def test_chat_request_translates_to_converse() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "No jokes."}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me look.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": '{"query": "dot"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a pixel"},
            {"role": "user", "content": "And so?"},
        ],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        "max_tokens": 50,
        "temperature": 1.5,
        "top_p": 0.9,
        "stop": ["END", ""],
        "stream": True,
        "user": "someone",
    }
    assert bedrock.chat_to_converse(body) == {
        "system": [{"text": "Be brief."}, {"text": "No jokes."}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"text": "What is this?"},
                    {"image": {"format": "png", "source": {"bytes": PNG}}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"text": "Let me look."},
                    {
                        "toolUse": {
                            "toolUseId": "call_1",
                            "name": "lookup",
                            "input": {"query": "dot"},
                        }
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {"toolResult": {"toolUseId": "call_1", "content": [{"text": "a pixel"}]}},
                    {"text": "And so?"},
                ],
            },
        ],
        "inferenceConfig": {
            "maxTokens": 50,
            "temperature": 1,
            "topP": 0.9,
            "stopSequences": ["END"],
        },
        "toolConfig": {
            "tools": [
                {
                    "toolSpec": {
                        "name": "lookup",
                        "description": "Look a word up",
                        "inputSchema": {"json": TOOLS[0]["function"]["parameters"]},  # type: ignore[index]
                    }
                }
            ],
            "toolChoice": {"tool": {"name": "lookup"}},
        },
    }
    required = bedrock.chat_to_converse({**body, "tool_choice": "required"})
    assert required["toolConfig"]["toolChoice"] == {"any": {}}
    plain = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": "none"}
    assert "toolConfig" not in bedrock.chat_to_converse(plain)


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}}
                        ],
                    }
                ]
            },
            "messages.0.content.0.image_url.url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/bmp;base64,AA=="},
                            }
                        ],
                    }
                ]
            },
            "messages.0.content.0.image_url.url",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ]
            },
            "messages.0.content.0.type",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{"},
                            }
                        ],
                    },
                ]
            },
            "messages.1.tool_calls.0.function.arguments",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "lookup"}}],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "x"},
                ],
                "tools": TOOLS,
                "tool_choice": "none",
            },
            "tool_choice",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "lookup"}}],
                    },
                    {"role": "tool", "tool_call_id": "c", "content": "x"},
                ]
            },
            "tools",
        ),
    ],
)
def test_untranslatable_requests_name_their_field(change: dict[str, Any], param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **change}
    with pytest.raises(bedrock.TranslationError) as caught:
        bedrock.chat_to_converse(body)
    assert caught.value.param == param
    assert str(caught.value).startswith(f"{param}: ")


def test_converse_answer_translates_to_a_chat_completion() -> None:
    answer = {
        "output": {
            "message": {
                "role": "assistant",
                "content": [
                    {"text": "Looking"},
                    {"toolUse": {"toolUseId": "t1", "name": "lookup", "input": {"query": "x"}}},
                ],
            }
        },
        "stopReason": "tool_use",
        "usage": {
            "inputTokens": 10,
            "outputTokens": 4,
            "totalTokens": 14,
            "cacheReadInputTokens": 6,
        },
        "metrics": {"latencyMs": 12},
    }
    chat = bedrock.converse_to_chat(answer, "m", "id", 1)
    assert chat["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Looking",
        "tool_calls": [
            {
                "id": "t1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"query":"x"}'},
            }
        ],
    }
    assert chat["choices"][0]["finish_reason"] == "tool_calls"
    assert chat["usage"] == {
        "prompt_tokens": 16,
        "completion_tokens": 4,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 6},
    }
    for stop, finish in [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
    ]:
        done = bedrock.converse_to_chat({**answer, "stopReason": stop}, "m", "id", 1)
        assert done["choices"][0]["finish_reason"] == finish
    with pytest.raises(KeyError):
        bedrock.converse_to_chat({"message": "not converse"}, "m", "id", 1)


def test_stream_events_translate_to_chunks() -> None:
    events: list[tuple[str, dict[str, Any]]] = [
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}, "p": "abc"}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        (
            "contentBlockStart",
            {"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "t", "name": "f"}}},
        ),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"a":'}}}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": "1}"}}}),
        ("messageStop", {"stopReason": "tool_use"}),
        ("metadata", {"usage": {"inputTokens": 3, "outputTokens": 5, "totalTokens": 8}}),
    ]
    translator = bedrock.StreamToChunks("id", "m", 1)
    chunks = [chunk for kind, event in events for chunk in translator.feed(kind, event)]
    assert translator.done
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "t",
                    "type": "function",
                    "function": {"name": "f", "arguments": ""},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"a":'}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
        {},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_bedrock_errors_map_to_the_broker_errors() -> None:
    def mapped(status: int, header: str | None, message: str = "nope") -> Any:
        etype = bedrock.error_type(header)
        return upstream_status_error(
            bedrock.error_status(status, etype),
            bedrock.error_payload({"message": message}, etype),
            secrets=("s3cr3t-key-value",),
        )

    throttled = mapped(
        429, "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"
    )
    assert (throttled.http_status, throttled.retryable) == (429, True)
    assert throttled.body().error.type == "ThrottlingException"
    invalid = mapped(400, "ValidationException", "maxTokens too big, s3cr3t-key-value")
    assert (invalid.http_status, invalid.retryable) == (400, False)
    assert invalid.message == "maxTokens too big, [redacted]"
    denied = mapped(403, "AccessDeniedException")
    assert isinstance(denied, UpstreamCredentialsRejected) and denied.http_status == 502
    assert isinstance(mapped(400, "UnrecognizedClientException"), UpstreamCredentialsRejected)
    timeout = mapped(408, "ModelTimeoutException")
    assert (timeout.http_status, timeout.retryable) == (504, True)
    for status in (500, 503):
        failed = mapped(status, None)
        assert (failed.http_status, failed.retryable) == (502, True)


# ---------------------------------------------------------------- event stream framing


def test_event_stream_encoder_round_trips_through_botocore() -> None:
    messages = [
        event_message(
            [(":event-type", "contentBlockDelta"), (":message-type", "event")],
            orjson.dumps({"delta": {"text": f"word {i} é"}}),
        )
        for i in range(5)
    ] + [event_message([(":message-type", "exception")], b"")]
    wire = b"".join(messages)
    buffer = EventStreamBuffer()
    decoded: list[EventStreamMessage] = []
    for start in range(0, len(wire), 7):  # arbitrary pieces, as TCP delivers them
        buffer.add_data(wire[start : start + 7])
        decoded.extend(buffer)
    # (botocore-stubs types the headers as int; they are a dict)
    assert [cast(dict[str, Any], m.headers) for m in decoded] == [
        {":event-type": "contentBlockDelta", ":message-type": "event"}
    ] * 5 + [{":message-type": "exception"}]
    assert orjson.loads(decoded[3].payload) == {"delta": {"text": "word 3 é"}}
    assert decoded[5].payload == b""
    total, headers_length = struct.unpack("!II", messages[0][:8])
    assert total == len(messages[0])
    assert headers_length == (1 + 11 + 1 + 2 + 17) + (1 + 13 + 1 + 2 + 5)
    tampered = bytearray(messages[0])
    tampered[-5] ^= 1  # the payload's last byte
    buffer = EventStreamBuffer()
    buffer.add_data(bytes(tampered))
    with pytest.raises(ChecksumMismatch):
        list(buffer)


# ---------------------------------------------------------------- the mock's signature check


def _signed(
    body: bytes, key: str, secret: str, token: str | None = None
) -> list[tuple[bytes, str]]:
    """The headers the mock records of a request signed as the adapter signs it."""
    request = AWSRequest(
        method="POST",
        url="http://127.0.0.1:9000/model/m%3A1/converse",
        data=body,
        headers={"Host": "127.0.0.1:9000", "Content-Type": "application/json"},
    )
    SigV4Auth(Credentials(key, secret, token), "bedrock", "us-west-2").add_auth(request)
    return [(name.lower().encode(), value) for name, value in request.headers.items()]


def test_signature_check_accepts_a_signed_request_and_rejects_a_tampered_one() -> None:
    path = b"/model/m%3A1/converse"
    body = b'{"messages":[]}'
    good = _signed(body, "AKIDMOCKEXAMPLE", "secret-AKIDMOCKEXAMPLE")
    assert signature_problem(path, body, good) is None
    tampered = signature_problem(path, b'{"messages":[1]}', good)
    assert tampered is not None and tampered[0] == "InvalidSignatureException"
    assert "signature we calculated does not match" in tampered[1]
    assert signature_problem(b"/model/other/converse", body, good) is not None
    wrong = _signed(body, "AKIDMOCKEXAMPLE", "secret-wrong")
    assert signature_problem(path, body, wrong) is not None
    assert signature_problem(path, body, None) is not None
    assert signature_problem(path, body, [(n, v) for n, v in good if n != b"authorization"])
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=10)
    expired = signature_problem(path, body, good, now=later)
    assert expired is not None and "expired" in expired[1]
    # Temporary keys (ASIA…) need their session token, signed.
    temporary = _signed(body, "ASIAMOCKEXAMPLE", "secret-ASIAMOCKEXAMPLE", "token-ASIAMOCKEXAMPLE")
    assert signature_problem(path, body, temporary) is None
    bad_token = _signed(body, "ASIAMOCKEXAMPLE", "secret-ASIAMOCKEXAMPLE", "token-other")
    assert signature_problem(path, body, bad_token) == (
        "UnrecognizedClientException",
        "The security token included in the request is invalid.",
    )
    no_token = _signed(body, "ASIAMOCKEXAMPLE", "secret-ASIAMOCKEXAMPLE")
    assert signature_problem(path, body, no_token) is not None


# ---------------------------------------------------------------- credentials


@pytest.mark.parametrize("profile", [None, "no-such-profile"])
async def test_no_credentials_in_the_chain_is_the_credentials_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, profile: str | None
) -> None:
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    if profile is not None:
        monkeypatch.setenv("AWS_PROFILE", profile)  # botocore raises ProfileNotFound
    cfg = msgspec.convert({"type": "bedrock", "region": "us-east-1"}, ProviderConfig)
    credentials = AwsCredentials("br", cfg)
    with pytest.raises(UpstreamCredentialsRejected) as caught:
        await credentials.current()
    assert caught.value.http_status == 502
    assert caught.value.error_code == "upstream_auth_failed"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDMOCKEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-AKIDMOCKEXAMPLE")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with pytest.raises(UpstreamCredentialsRejected):
        await credentials.current()  # not looked up again at once
    assert (await AwsCredentials("br", cfg).current()).access_key == "AKIDMOCKEXAMPLE"


# ---------------------------------------------------------------- end to end


@dataclass
class Stack:
    url: str
    mock: str
    worker: Child
    key_id_file: Path
    secret_file: Path
    secrets: list[str]


def _write(path: Path, value: str) -> Path:
    staged = path.with_suffix(".new")
    staged.write_text(value + "\n")
    os.replace(staged, path)  # as a secret mount swaps its files
    return path


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if redis_server.proc is None:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("bedrock")
    procs = Procs(tmp)
    files_key = f"AKIDMOCK{secrets.token_hex(6).upper()}"
    session_key = f"ASIAMOCK{secrets.token_hex(6).upper()}"
    env_key = f"ASIAMOCK{secrets.token_hex(6).upper()}"
    wrong_secret = f"wrong-secret-{secrets.token_hex(8)}"
    try:
        _, mock = procs.mock()
        fast_retry = {"max_retries": 1, "base_s": 0.05, "max_s": 0.1}
        common = {"type": "bedrock", "region": "us-west-2", "base_url": mock, "retry": fast_retry}

        def files(name: str, key: str, secret: str, token: str | None = None) -> dict[str, Any]:
            out = {
                "aws_access_key_id_file": str(_write(tmp / f"{name}.id", key)),
                "aws_secret_access_key_file": str(_write(tmp / f"{name}.secret", secret)),
            }
            if token is not None:
                out["aws_session_token_file"] = str(_write(tmp / f"{name}.token", token))
            return {**common, **out}

        config = write_config(
            tmp,
            redis_server.url,
            "bedrock:",
            mock,
            providers={
                "br": files("br", files_key, f"secret-{files_key}"),
                "br-session": files(
                    "session", session_key, f"secret-{session_key}", f"token-{session_key}"
                ),
                "br-wrong": files("wrong", files_key, wrong_secret),
                "br-env": common,
                "fb": {"type": "mock", "base_url": f"{mock}/v1"},
            },
            models={
                "claude-br": {"provider": "br", "model": MODEL_ID},
                "bedrock-mock*": {"provider": "br"},
                "claude-session": {"provider": "br-session", "model": MODEL_ID},
                "claude-env": {"provider": "br-env", "model": MODEL_ID},
                "claude-wrong": {"provider": "br-wrong", "model": MODEL_ID},
                "claude-plain": {"provider": "fb", "model": "mock"},
                "claude-fallback": {
                    "deployments": [
                        {"provider": "br", "model": "amazon.titan-error-503", "weight": 1},
                        {"provider": "fb", "model": "mock", "weight": 0},
                    ]
                },
            },
        )
        worker = procs.worker(config, providers=["br", "br-session", "br-wrong", "fb"])
        # The standard chain: temporary credentials in the worker's environment only.
        procs.start(
            "worker-env",
            python_cmd("worker", "--provider=br-env", "--config", str(config)),
            r"worker ready",
            env={
                "AWS_ACCESS_KEY_ID": env_key,
                "AWS_SECRET_ACCESS_KEY": f"secret-{env_key}",
                "AWS_SESSION_TOKEN": f"token-{env_key}",
                "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
                "AWS_EC2_METADATA_DISABLED": "true",
            },
        )
        _, url = procs.ingress(config)
        yield Stack(
            url,
            mock,
            worker,
            tmp / "br.id",
            tmp / "br.secret",
            [f"secret-{files_key}", f"secret-{session_key}", f"token-{session_key}", wrong_secret],
        )
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
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key="unused", max_retries=0)
    yield client
    await client.close()


def _user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


async def _calls(http: aiohttp.ClientSession, mock: str, operation: str) -> int:
    by_path: dict[str, int] = (await mock_stats(http, mock))["calls_by_path"]
    return sum(n for path, n in by_path.items() if path.endswith("/" + operation))


async def _streamed(stream: Any) -> tuple[str, list[Any], str | None, Any]:
    """Text, tool-call deltas, finish reason and usage of a streamed answer."""
    text, finish, usage = "", None, None
    calls: list[Any] = []
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            calls.extend(choice.delta.tool_calls or ())
            finish = choice.finish_reason or finish
    return text, calls, finish, usage


async def test_chat_and_stream_through_bedrock(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Old stone bridges"},
    ]
    answer = await oai.chat.completions.create(model="claude-br", messages=messages)
    assert answer.model == "claude-br"
    assert answer.choices[0].finish_reason == "stop"
    text = answer.choices[0].message.content
    assert text and len(text.split()) == 8
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 8)
    # The same words as the mock's OpenAI API gives for the same last message.
    plain = await oai.chat.completions.create(model="claude-plain", messages=messages)
    assert plain.choices[0].message.content == text

    stream = await oai.chat.completions.create(
        model="claude-br",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed, calls, finish, usage = await _streamed(stream)
    assert (streamed, calls, finish) == (text, [], "stop")
    assert usage is not None and usage.total_tokens == 13
    stats = await mock_stats(http, stack.mock)
    quoted = MODEL_ID.replace(":", "%3A")
    assert stats["calls_by_path"][f"/model/{quoted}/converse"] == 1
    assert stats["calls_by_path"][f"/model/{quoted}/converse-stream"] == 1
    assert all(
        a.startswith("AWS4-HMAC-SHA256 Credential=AKIDMOCK") for a in stats["authorization_seen"]
    )


async def test_tool_call_and_result_through_bedrock(oai: openai.AsyncOpenAI) -> None:
    first = await oai.chat.completions.create(
        model="claude-br",
        messages=_user("bridges please"),
        tools=TOOLS,  # type: ignore[arg-type]
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "lookup"  # type: ignore[union-attr]
    arguments = orjson.loads(call.function.arguments)  # type: ignore[union-attr]
    assert arguments == {"query": "bridges"}

    stream = await oai.chat.completions.create(
        model="claude-br",
        messages=_user("bridges please"),
        tools=TOOLS,  # type: ignore[arg-type]
        stream=True,
    )
    _, deltas, finish, _ = await _streamed(stream)
    assert deltas[0].id and deltas[0].function.name == "lookup"
    pieces = "".join(d.function.arguments or "" for d in deltas)
    assert (orjson.loads(pieces), finish) == (arguments, "tool_calls")

    follow_up: list[Any] = [
        *_user("bridges please"),
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "stone arches"},
    ]
    answer = await oai.chat.completions.create(
        model="claude-br",
        messages=follow_up,
        tools=TOOLS,  # type: ignore[arg-type]
    )
    assert answer.choices[0].finish_reason == "stop"
    # Seeded from the tool result: the mock answers as its OpenAI API does.
    plain = await oai.chat.completions.create(model="claude-plain", messages=_user("stone arches"))
    assert answer.choices[0].message.content == plain.choices[0].message.content
    stream = await oai.chat.completions.create(
        model="claude-br",
        messages=follow_up,
        tools=TOOLS,  # type: ignore[arg-type]
        stream=True,
    )
    text, deltas, finish, _ = await _streamed(stream)
    assert (text, deltas, finish) == (answer.choices[0].message.content, [], "stop")


async def test_image_data_url_reaches_bedrock_as_bytes(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    def asking(url: str) -> list[Any]:
        parts = [
            {"type": "text", "text": "What is it"},
            {"type": "image_url", "image_url": {"url": url}},
        ]
        return [{"role": "user", "content": parts}]

    answer = await oai.chat.completions.create(
        model="claude-br", messages=asking(f"data:image/png;base64,{PNG}")
    )
    assert answer.usage is not None and answer.usage.prompt_tokens == 3 + 1  # words + image
    # The bytes arrived: the mock refuses PNG bytes announced as JPEG.
    with pytest.raises(openai.BadRequestError) as refused:
        await oai.chat.completions.create(
            model="claude-br", messages=asking(f"data:image/jpeg;base64,{PNG}")
        )
    assert "not a valid jpeg image" in refused.value.message
    before = await _calls(http, stack.mock, "converse")
    with pytest.raises(openai.BadRequestError) as url:
        await oai.chat.completions.create(
            model="claude-br", messages=asking("https://example.com/a.png")
        )
    body: Any = url.value.body
    assert body["param"] == "messages.0.content.1.image_url.url"
    assert "Bedrock takes an image's bytes" in body["message"]
    assert await _calls(http, stack.mock, "converse") == before


async def test_max_tokens_ends_with_length(oai: openai.AsyncOpenAI) -> None:
    answer = await oai.chat.completions.create(
        model="claude-br", messages=_user("count to ten"), max_tokens=3
    )
    assert answer.choices[0].finish_reason == "length"
    assert len((answer.choices[0].message.content or "").split()) == 3
    stream = await oai.chat.completions.create(
        model="claude-br",
        messages=_user("count to ten"),
        max_completion_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, _, finish, usage = await _streamed(stream)
    assert (text, finish) == (answer.choices[0].message.content, "length")
    assert usage is not None and usage.completion_tokens == 3


async def test_credentials_from_files_are_reread_when_they_change(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    new_key = f"AKIDMOCK{secrets.token_hex(6).upper()}"
    new_secret = f"secret-{new_key}"
    stack.secrets.append(new_secret)
    _write(stack.secret_file, new_secret)
    _write(stack.key_id_file, new_key)

    async def rotated() -> bool:
        try:
            await oai.chat.completions.create(model="claude-br", messages=_user("hello"))
        except openai.APIStatusError:
            return False  # the two files were read a moment apart
        last = (await mock_stats(http, stack.mock))["authorization_seen"][-1]
        return f"Credential={new_key}/" in last

    await eventually(rotated, what="the new key pair in use")


async def test_session_token_from_a_file(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    answer = await oai.chat.completions.create(model="claude-session", messages=_user("hello"))
    assert answer.choices[0].message.content
    assert any(
        v.startswith("token-ASIAMOCK") for v in (await mock_stats(http, stack.mock))["auth_seen"]
    )


async def test_standard_chain_from_the_environment_with_a_session_token(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    answer = await oai.chat.completions.create(model="claude-env", messages=_user("hello"))
    assert answer.choices[0].message.content
    stream = await oai.chat.completions.create(
        model="claude-env", messages=_user("hello"), stream=True
    )
    text, _, finish, _ = await _streamed(stream)
    assert (text, finish) == (answer.choices[0].message.content, "stop")
    stats = await mock_stats(http, stack.mock)
    # The mock accepts a temporary (ASIA) key only with its session token, signed.
    assert len(stats["authorization_seen"]) == 2
    assert sum(v.startswith("token-ASIAMOCK") for v in stats["auth_seen"]) == 2


async def test_a_wrong_secret_is_the_brokers_credentials_error(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        await oai.chat.completions.create(model="claude-wrong", messages=_user("hello"))
    assert caught.value.status_code == 502
    body: Any = caught.value.body
    assert body["code"] == "upstream_auth_failed"
    assert await _calls(http, stack.mock, "converse") == 1  # refused, and not retried
    text = caught.value.response.text + stack.worker.output()
    for secret in stack.secrets:
        assert secret not in text


async def test_throttling_is_retried(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    async with http.post(f"{stack.mock}/mock/fail", json={"status": 429, "times": 1}) as resp:
        assert resp.status == 200
    answer = await oai.chat.completions.create(model="claude-br", messages=_user("hello"))
    assert answer.choices[0].message.content
    assert await _calls(http, stack.mock, "converse") == 2  # the 429 and its retry


async def test_a_server_error_falls_back_to_the_next_deployment(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    answer = await oai.chat.completions.create(model="claude-fallback", messages=_user("hello"))
    assert answer.choices[0].message.content
    assert await _calls(http, stack.mock, "converse") == 2  # the 503 and its retry
    assert (await mock_stats(http, stack.mock))["calls_by_path"]["/v1/chat/completions"] == 1


async def test_a_validation_error_reaches_the_client_as_400(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    messages: list[Any] = [{"role": "assistant", "content": "I start"}, *_user("hello")]
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.chat.completions.create(model="claude-br", messages=messages)
    assert "must start with a user message" in caught.value.message
    body: Any = caught.value.body
    assert body["type"] == "ValidationException"
    assert await _calls(http, stack.mock, "converse") == 1  # not retried


async def test_an_exception_event_ends_the_stream_with_an_error(
    stack: Stack, http: aiohttp.ClientSession, oai: openai.AsyncOpenAI
) -> None:
    stream = await oai.chat.completions.create(
        model="bedrock-mock-chunks-6-failafter-3-exception-modelstreamerror",
        messages=_user("hello"),
        stream=True,
    )
    text = ""
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
    assert len(text.split()) == 3
    assert "mock stream modelStreamErrorException" in caught.value.message
    # Chunks had reached the client: no retry.
    assert await _calls(http, stack.mock, "converse-stream") == 1
