"""What a client's input may grow, forge or learn: metric series, log lines, upstream errors.

Real ingress, worker and mock upstream processes. A wildcard route (``mock*``)
takes any model name a client makes up; the provider ``mock`` calls the mock
with a key of its own, ``anth`` speaks Anthropic's format to the same mock, and
``dead`` points at a port where nothing listens.
"""

from __future__ import annotations

import asyncio
import io
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import make_mocked_request

from llm_broker.dev import free_port
from llm_broker.ingress.access import AccessLog
from llm_broker.ingress.context import CONTEXT, RequestContext
from llm_broker.procs import Child
from llm_broker.shared import logs
from llm_broker.shared.config import Price, new_key
from llm_broker.shared.errors import UPSTREAM_MESSAGE_MAX, redact, upstream_status_error
from llm_broker.shared.store.records import Usage
from tests.conftest import Procs, RedisServer, chat, write_config
from tests.test_observability import parse_metrics

KEY, KEY_HASH = new_key()
AUTH = {"Authorization": f"Bearer {KEY}"}
#: The providers' own keys: nothing marks them as keys but the config.
MOCK_KEY = "prov-" + secrets.token_hex(12)
ANTH_KEY = "anth-" + secrets.token_hex(12)


@dataclass
class Stack:
    url: str
    mock_url: str
    worker_metrics: str
    ingress: Child
    worker: Child
    dead_port: int


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if redis_server.proc is None:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("leaks")
    (tmp / "mock.key").write_text(MOCK_KEY)
    (tmp / "anth.key").write_text(ANTH_KEY)
    procs = Procs(tmp)
    try:
        _, mock_url = procs.mock()
        dead_port = free_port()
        config = write_config(
            tmp,
            redis_server.url,
            "leaks:",
            mock_url,
            auth={"keys": [{"tenant": "acme", "sha256": KEY_HASH}]},
            providers={
                "mock": {"api_key_file": str(tmp / "mock.key")},
                "anth": {
                    "type": "anthropic",
                    "base_url": f"{mock_url}/v1",
                    "api_key_file": str(tmp / "anth.key"),
                    "retry": {"max_retries": 0},
                },
                "dead": {
                    "type": "mock",
                    "base_url": f"http://127.0.0.1:{dead_port}/v1",
                    "retry": {"max_retries": 0},
                },
            },
            models={
                "claude-leak": {"provider": "anth", "model": "mock"},
                "dead-x": {"provider": "dead", "model": "mock"},
            },
        )
        worker_port = free_port()
        worker = procs.worker(config, "--metrics-port", str(worker_port))
        ingress, url = procs.ingress(config)
        yield Stack(
            url, mock_url, f"http://127.0.0.1:{worker_port}/metrics", ingress, worker, dead_port
        )
    finally:
        procs.stop_all()


async def post(
    http: aiohttp.ClientSession, stack: Stack, body: dict[str, Any], path: str = "chat/completions"
) -> tuple[int, Any]:
    async with http.post(f"{stack.url}/v1/{path}", headers=AUTH, json=body) as resp:
        return resp.status, await resp.json()


async def metrics_text(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


def label_values(text: str, label: str) -> set[str]:
    samples, _ = parse_metrics(text)
    return {value for _, labels in samples for name, value in labels if name == label}


# ---------------------------------------------------------------- metric labels


async def test_made_up_model_names_add_no_metric_series(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    names = [f"mock-{secrets.token_hex(8)}" for _ in range(200)]
    huge = "mock-" + "x" * 1_000_000
    for batch in range(0, len(names), 25):
        statuses = await asyncio.gather(
            *(post(http, stack, chat(n)) for n in names[batch : batch + 25])
        )
        assert [s for s, _ in statuses] == [200] * len(statuses)
    status, answer = await post(http, stack, chat(huge))
    assert status == 200 and answer["model"] == huge  # the answer still carries the name

    ingress = await metrics_text(http, f"{stack.url}/metrics")
    worker = await metrics_text(http, stack.worker_metrics)
    for text in (ingress, worker):
        assert "xxxxxxxxxx" not in text
        assert not any(n in text for n in names)
        assert len(text) < 200_000
    assert label_values(ingress, "model") == {"mock*"}
    assert label_values(worker, "model") == {"mock*"}
    assert label_values(worker, "deployment") == {"mock/mock*"}  # one circuit breaker


# ---------------------------------------------------------------- log lines


async def test_a_model_name_cannot_forge_or_flood_a_request_log_line(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    forged = "2031-01-01 00:00:00,000 INFO llm_broker.requests request request_id=forged"
    status, answer = await post(http, stack, chat(f"mock-a\n{forged} status=200"))
    assert status == 200
    job_id = answer["id"].removeprefix("chatcmpl-")
    stack.ingress.wait_for(rf"request_id={job_id} ")
    status, answer = await post(http, stack, chat("mock-" + "y" * 100_000))
    assert status == 200
    long_id = answer["id"].removeprefix("chatcmpl-")
    stack.ingress.wait_for(rf"request_id={long_id} ")

    lines = stack.ingress.output().splitlines()
    [line] = [x for x in lines if f"request_id={job_id} " in x]
    assert r'model="mock-a\n2031-01-01' in line  # the name, escaped on its own line
    for output in (lines, stack.worker.output().splitlines()):
        assert not any(x.startswith("2031-01-01") for x in output)
    [line] = [x for x in lines if f"request_id={long_id} " in x]
    assert "yyyyyyyyyy" in line and len(line) < 1000


# Ingress keeps its per-request values under str keys, as this test does.
async def test_text_log_values_that_are_not_plain_tokens_are_quoted() -> None:
    out = io.StringIO()
    access = AccessLog({}, out)
    forged_trace = "00-" + "0" * 10 + " status=200 x=" + "-" + "1" * 16 + "-01"
    request = make_mocked_request(
        "POST", "/v1/chat/completions", headers={"traceparent": forged_trace}
    )
    request[CONTEXT] = RequestContext(
        route="mock*", requested_model="mock-a\u2028b c=d\r\n\x00", tenant="acme"
    )
    access.log(request, "/v1/chat/completions", 200, 0.01)
    access.flush()
    [line] = out.getvalue().splitlines()  # str.splitlines also splits at U+2028
    assert 'model="mock-a\\u2028b c=d\\r\\n\\u0000"' in line
    assert "route=mock* " in line and "tenant=acme " in line
    assert "trace_id" not in line and line.count("status=") == 1


# The text line renders its repeating part once per combination of values: it must
# write what the field-by-field rendering of the same values (the JSON line's) writes.
@pytest.mark.parametrize(
    "context, traceparent",
    [
        (RequestContext(), ""),
        (
            RequestContext(
                job_id="0e9564e9b0891fccfcad2d0441f7257a",
                tenant="acme",
                route="gpt*",
                requested_model="gpt-4o",
                provider="openai",
                usage=Usage.reported(12, 34),
            ),
            "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        ),
        (
            RequestContext(
                job_id="not an id of ours",
                tenant="",
                route="mock",
                requested_model="mock",
                error_type="rate_limit_error",
                cache="hit",
                usage=Usage.reported(1, 0),
            ),
            "00-short",
        ),
        (
            RequestContext(route="m", requested_model="x y\n" + "z" * 300, provider="p q"),
            "",
        ),
    ],
)
async def test_a_text_line_writes_the_fields_of_the_json_line(
    context: RequestContext, traceparent: str
) -> None:
    out = io.StringIO()
    prices = {"gpt-4o": Price(input_usd_per_million=2.5, output_usd_per_million=10.0)}
    access = AccessLog(prices, out)
    headers = {"traceparent": traceparent} if traceparent else {}
    request = make_mocked_request("POST", "/v1/chat/completions", headers=headers)
    request[CONTEXT] = context
    for _ in range(2):  # rendered, then kept
        access.log(request, "/v1/chat/completions", 429, 0.0123456)
    access.flush()
    expected = logs.text_pairs(access._fields(request, "/v1/chat/completions", 429, 0.0123456))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    for line in lines:
        assert line.split(" request ", 1)[1] == expected


def test_credentials_are_redacted_from_upstream_messages() -> None:
    text = (
        "key sk-ant-api03-abcDEF_123-xyz bad; Authorization: Bearer abc.def; "
        "api_key=qwerty12345 x-api-key: zzzzzzzzzz AKIAABCDEFGHIJKLMNOP my-own-key-123"
    )
    clean = redact(text, ["my-own-key-123"])
    for secret in ("sk-ant", "abc.def", "qwerty", "zzzz", "AKIA", "my-own-key"):
        assert secret not in clean
    assert clean.startswith("key [redacted] bad;")
    error = upstream_status_error(400, {"error": {"message": "x" * 10_000, "code": 42}})
    assert len(error.message) == UPSTREAM_MESSAGE_MAX + 1 and error.error_code == "42"


# ---------------------------------------------------------------- upstream errors

SECRETS = (
    "sk-ant-api03-" + secrets.token_urlsafe(24),
    "sk-proj-" + secrets.token_urlsafe(24),
    secrets.token_urlsafe(24),  # the value after "Bearer "
)


def leaky(status: int) -> dict[str, Any]:
    """A mock request whose error echoes the call's credentials, keys and a long text."""
    message = (
        f"request from {{credentials}} refused; also tried {SECRETS[0]} and {SECRETS[1]}, "
        f"Authorization: Bearer {SECRETS[2]}\nfake log line " + "z" * 20_000
    )
    return {"error": status, "error_message": message}


def assert_clean(message: str) -> None:
    for secret in (MOCK_KEY, ANTH_KEY, *SECRETS):
        assert secret not in message
    assert "[redacted]" in message
    assert "\n" not in message
    assert len(message) <= UPSTREAM_MESSAGE_MAX + 1


async def fail_next(http: aiohttp.ClientSession, stack: Stack, status: int, body: Any) -> None:
    """The mock's next model call answers ``status`` with ``body``."""
    async with http.post(
        f"{stack.mock_url}/mock/fail", json={"status": status, "body": body}
    ) as resp:
        assert resp.status == 200


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_error_text_is_redacted_and_bounded(
    stack: Stack, http: aiohttp.ClientSession, status: int, stream: bool
) -> None:
    expected = 400 if status == 400 else 502
    code, answer = await post(http, stack, chat("mock-leak", stream=stream, mock=leaky(status)))
    assert code == expected
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert_clean(answer["error"]["message"])

    # An Anthropic upstream that echoes its key, seen through both APIs.
    message = leaky(status)["error_message"].replace("{credentials}", ANTH_KEY)
    anthropic_error = {"type": "error", "error": {"type": "api_error", "message": message}}
    await fail_next(http, stack, status, anthropic_error)
    code, answer = await post(http, stack, chat("claude-leak", stream=stream))
    assert code == expected
    assert_clean(answer["error"]["message"])
    await fail_next(http, stack, status, anthropic_error)
    body = {"model": "claude-leak", "max_tokens": 50, "stream": stream}
    body["messages"] = [{"role": "user", "content": "hi"}]
    code, answer = await post(http, stack, body, "messages")
    assert code == expected
    assert answer["type"] == "error"
    assert_clean(answer["error"]["message"])


async def test_only_an_upstream_errors_identifiers_pass_through(
    stack: Stack, http: aiohttp.ClientSession
) -> None:
    error = {
        "message": "no such thing",
        "type": f"invalid_request_error (key {SECRETS[1]})",
        "param": "messages[0].content",
        "code": "Bearer " + SECRETS[2],
        "debug": {"upstream_host": "10.1.2.3", "api_key": MOCK_KEY},
    }
    await fail_next(http, stack, 400, {"error": error})
    code, answer = await post(http, stack, chat("mock-ids"))
    assert code == 400
    assert answer["error"] == {
        "message": "no such thing",
        "type": "invalid_request_error",
        "param": "messages[0].content",
        "code": None,
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_a_connection_error_does_not_reveal_the_upstream_address(
    stack: Stack, http: aiohttp.ClientSession, stream: bool
) -> None:
    code, answer = await post(http, stack, chat("dead-x", stream=stream))
    assert code == 502
    error = answer["error"]
    assert error["code"] == "upstream_connection_error"
    assert "connection refused" in error["message"]
    assert not re.search(rf"127\.0\.0\.1|{stack.dead_port}", error["message"])
    # The operator still learns where: the worker's log names the address.
    stack.worker.wait_for(rf"127\.0\.0\.1:{stack.dead_port}")
