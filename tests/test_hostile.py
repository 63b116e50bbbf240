"""Hostile inputs against the real processes (ingress, worker, mock upstream, Redis).

Whatever a client sends, it gets within a few seconds either a 4xx error object
(OpenAI's shape, Anthropic's on ``/v1/messages``), never plain text and never a
5xx, or, when ingress accepts the request, the answer a worker produced: what
ingress accepts, a worker must be able to run. Nothing is left behind: the
queue drains, both processes live on and log no traceback.

The requests are written byte by byte on a socket, since an HTTP client library
would refuse or repair most of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pytest
import redis.asyncio as aioredis

from llm_broker.procs import Child
from llm_broker.shared.config import hash_key, new_webhook_secret
from llm_broker.shared.keys import Keys
from tests.conftest import Procs, RedisServer, write_config
from tests.helpers import eventually

KEY = "sk-hostile-test-key"
MAX_BODY = 256 * 1024
#: An answer slower than this counts as hanging.
ANSWER_S = 5.0
#: An async job accepted with poison must reach a final state within this.
JOB_S = 10.0

Expect = Literal["4xx", "200", "either"]
POISON = "@@poison@@"


@dataclass(frozen=True)
class Stack:
    url: str
    host: str
    port: int
    prefix: str
    redis_url: str
    ingress: Child
    worker: Child


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    if redis_server.proc is None or redis_server.proc.poll() is not None:
        redis_server.start()
    tmp = tmp_path_factory.mktemp("hostile")
    secret = tmp / "webhook-secret"
    secret.write_text(new_webhook_secret())
    procs = Procs(tmp)
    try:
        _, mock_url = procs.mock()
        prefix = f"hostile{os.getpid()}:"
        config = write_config(
            tmp,
            redis_server.url,
            prefix,
            mock_url,
            auth={"keys": [{"tenant": "hostile", "sha256": hash_key(KEY)}]},
            cache={"enabled": True},
            webhooks={"secret_file": str(secret)},
            ingress={"max_body_bytes": MAX_BODY},
        )
        worker = procs.worker(config)
        ingress, url = procs.ingress(config)
        host, port = url.removeprefix("http://").rsplit(":", 1)
        yield Stack(url, host, int(port), prefix, redis_server.url, ingress, worker)
    finally:
        procs.stop_all()


@pytest.fixture
async def redis_client(stack: Stack) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(stack.redis_url)
    yield client
    await client.aclose()


# ---------------------------------------------------------------- raw HTTP


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def _request(
    path: str,
    body: bytes | None,
    headers: tuple[tuple[str, bytes], ...] = (),
    method: str = "POST",
) -> bytes:
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
    if "authorization" not in names:
        lines.append(b"Authorization: Bearer " + KEY.encode())
    if body is not None:
        if "content-type" not in names:
            lines.append(b"Content-Type: application/json")
        if "transfer-encoding" not in names and "content-length" not in names:
            lines.append(b"Content-Length: " + str(len(body)).encode())
    lines += [name.encode() + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


def _parse(raw: bytes, seconds: float) -> Answer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, f"not an HTTP response: {raw[:200]!r}"
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    return Answer(int(status_line.split()[1]), headers, body, seconds)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


async def send(stack: Stack, request: bytes, *, chunk: int = 65536) -> Answer:
    """Write ``request`` and read the whole answer (the server closes the connection)."""
    started = time.monotonic()
    async with asyncio.timeout(ANSWER_S * 2):
        reader, writer = await asyncio.open_connection(stack.host, stack.port)
        # Read while writing: the server may answer (413, 431) and close before it
        # read everything, and the failed write would then hide the answer.
        answer = asyncio.ensure_future(_read_all(reader))
        try:
            try:
                for i in range(0, len(request), chunk):
                    writer.write(request[i : i + chunk])
                    await writer.drain()
            except ConnectionError:
                pass  # the server answered and closed before reading it all
            raw = await answer
        finally:
            answer.cancel()
            writer.close()
    return _parse(raw, time.monotonic() - started)


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sent until it closed (or the connection broke)."""
    received = []
    try:
        while block := await reader.read(65536):
            received.append(block)
    except ConnectionError:
        pass
    return b"".join(received)


# ---------------------------------------------------------------- bodies


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "mock", "messages": [{"role": "user", "content": "Hello"}], **extra}


def anthropic(**extra: Any) -> dict[str, Any]:
    return {
        "model": "mock",
        "max_tokens": 16,
        "messages": [{"role": "user", "content": "Hello"}],
        **extra,
    }


def splice(value: Any, raw: bytes) -> bytes:
    """``value`` as JSON with the string ``POISON`` replaced by the raw bytes ``raw``."""
    encoded = json.dumps(value, separators=(",", ":")).encode()
    assert encoded.count(b'"' + POISON.encode() + b'"') == 1
    return encoded.replace(b'"' + POISON.encode() + b'"', raw)


def nested(depth: int, kind: str = "array") -> bytes:
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * (depth - 1) + b"{}" + b"}" * (depth - 1)


HUGE_NUMBERS = {"1e400": b"1e400", "1e309": b"1e309", "1-and-400-zeros": b"1" + b"0" * 400}
BAD_UTF8 = {
    "ff": b"\xff",
    "overlong-c0af": b"\xc0\xaf",
    "cesu-eda080": b"\xed\xa0\x80",
    "lone-80": b"\x80",
    "truncated-e282": b"\xe2\x82",
    "above-max-f4908080": b"\xf4\x90\x80\x80",
}


def bad_string(bad: bytes) -> bytes:
    return b'"a' + bad + b'b"'


# Where a poison value sits: passed through untouched, or in a field ingress decodes.
def in_field(where: str) -> dict[str, Any]:
    match where:
        case "x":
            return chat(x=POISON)
        case "tools":
            tool = {"type": "function", "function": {"name": "f", "parameters": POISON}}
            return chat(tools=[tool])
        case "seed":
            return chat(seed=POISON)
        case "message-extra":
            return {"model": "mock", "messages": [{"role": "user", "content": "Hi", "x": POISON}]}
        case "content":
            return {"model": "mock", "messages": [{"role": "user", "content": POISON}]}
    raise AssertionError(where)


@dataclass(frozen=True)
class Case:
    path: str
    body: bytes | None
    expect: Expect
    headers: tuple[tuple[str, bytes], ...] = ()
    #: POST /v1/jobs or Prefer: respond-async: a 202 is polled to its end.
    method: str = "POST"


def _cases() -> Iterator[Any]:
    def case(name: str, path: str, body: bytes | None, expect: Expect, **kw: Any) -> Any:
        return pytest.param(Case(path, body, expect, **kw), id=name)

    chat_path, jobs, emb, msgs = (
        "/v1/chat/completions",
        "/v1/jobs",
        "/v1/embeddings",
        "/v1/messages",
    )
    asynchronous = (("Prefer", b"respond-async"),)

    # 1. Poison in passed-through fields: numbers a double cannot hold, invalid UTF-8, nesting.
    for num, raw in HUGE_NUMBERS.items():
        for where in ("x", "tools", "seed", "message-extra"):
            yield case(f"chat-{where}-{num}", chat_path, splice(in_field(where), raw), "either")
        yield case(
            f"chat-stream-{num}", chat_path, splice(chat(x=POISON, stream=True), raw), "either"
        )
        yield case(
            f"chat-async-{num}",
            chat_path,
            splice(chat(seed=POISON), raw),
            "either",
            headers=asynchronous,
        )
        yield case(f"jobs-{num}", jobs, splice({"request": chat(x=POISON)}, raw), "either")
        yield case(
            f"embeddings-{num}",
            emb,
            splice({"model": "mock", "input": "hi", "x": POISON}, raw),
            "either",
        )
        yield case(f"messages-{num}", msgs, splice(anthropic(x=POISON), raw), "either")
    for name, bad in BAD_UTF8.items():
        for where in ("x", "message-extra", "content"):
            yield case(
                f"chat-{where}-utf8-{name}",
                chat_path,
                splice(in_field(where), bad_string(bad)),
                "either",
            )
        yield case(
            f"jobs-utf8-{name}",
            jobs,
            splice({"request": chat(x=POISON)}, bad_string(bad)),
            "either",
        )
        body = splice({"model": "mock", "input": "hi", "x": POISON}, bad_string(bad))
        yield case(f"embeddings-utf8-{name}", emb, body, "either")
        yield case(
            f"messages-utf8-{name}", msgs, splice(anthropic(x=POISON), bad_string(bad)), "either"
        )
        key = (("Idempotency-Key", b"k-" + bad),)
        yield case(
            f"idempotency-key-utf8-{name}",
            jobs,
            json.dumps({"request": chat()}).encode(),
            "either",
            headers=key,
        )
    for depth in (254, 255, 300):
        for kind in ("array", "object"):
            body = splice(chat(x=POISON), nested(depth, kind))
            yield case(f"chat-nested-{depth}-{kind}", chat_path, body, "either")
        yield case(
            f"jobs-nested-{depth}",
            jobs,
            splice({"request": chat(x=POISON)}, nested(depth)),
            "either",
        )
        yield case(
            f"chat-async-nested-{depth}",
            chat_path,
            splice(chat(x=POISON), nested(depth)),
            "either",
            headers=asynchronous,
        )
    trace = (("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-€1".encode()),)
    yield case(
        "traceparent-not-latin-1", chat_path, json.dumps(chat()).encode(), "either", headers=trace
    )
    yield case(
        "traceparent-not-latin-1-async",
        jobs,
        json.dumps({"request": chat()}).encode(),
        "either",
        headers=trace,
    )

    # 4. What used to be a plain-text 500.
    shapes: tuple[tuple[str, dict[str, Any]], ...] = (
        (chat_path, chat(x=POISON)),
        (emb, {"model": "mock", "input": "hi", "x": POISON}),
        (msgs, anthropic(x=POISON)),
        (jobs, {"request": chat(x=POISON)}),
    )
    for path, shape in shapes:
        name = path.rsplit("/", 1)[1]
        yield case(f"{name}-nested-990", path, splice(shape, nested(990)), "4xx")
        yield case(f"{name}-nested-990-object", path, splice(shape, nested(990, "object")), "4xx")
        yield case(f"{name}-whole-body-nested-990", path, nested(990), "4xx")
        yield case(f"{name}-whole-body-nested-100000", path, nested(100_000), "4xx")
    for num, raw in HUGE_NUMBERS.items():
        yield case(
            f"cache-chat-{num}", chat_path, splice(chat(x=POISON, temperature=0), raw), "either"
        )
        yield case(
            f"cache-embeddings-{num}",
            emb,
            splice({"model": "mock", "input": "hi", "x": POISON}, raw),
            "either",
        )
        key = (("Idempotency-Key", f"idem-{num}".encode()),)
        yield case(
            f"idempotency-{num}",
            jobs,
            splice({"request": chat(x=POISON)}, raw),
            "either",
            headers=key,
        )
    for name, bad in list(BAD_UTF8.items())[:3]:
        yield case(
            f"cache-chat-utf8-{name}",
            chat_path,
            splice(chat(x=POISON, temperature=0), bad_string(bad)),
            "either",
        )
        yield case(
            f"cache-embeddings-utf8-{name}",
            emb,
            splice({"model": "mock", "input": "hi", "x": POISON}, bad_string(bad)),
            "either",
        )
        key = (("Idempotency-Key", f"idem-utf8-{name}".encode()),)
        yield case(
            f"idempotency-utf8-{name}",
            jobs,
            splice({"request": chat(x=POISON)}, bad_string(bad)),
            "either",
            headers=key,
        )
    for depth in (253, 300):
        yield case(
            f"cache-chat-nested-{depth}",
            chat_path,
            splice(chat(x=POISON, temperature=0), nested(depth)),
            "either",
        )
        yield case(
            f"cache-embeddings-nested-{depth}",
            emb,
            splice({"model": "mock", "input": "hi", "x": POISON}, nested(depth)),
            "either",
        )
        key = (("Idempotency-Key", f"idem-nested-{depth}".encode()),)
        yield case(
            f"idempotency-nested-{depth}",
            jobs,
            splice({"request": chat(x=POISON)}, nested(depth)),
            "either",
            headers=key,
        )
    big = b"1" + b"0" * 30  # 10^30, written as an integer
    yield case("messages-max-tokens-1e30", msgs, splice(anthropic(max_tokens=POISON), big), "4xx")
    tool_use = {"type": "tool_use", "id": "t1", "name": "f", "input": {"n": POISON}}
    history = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [tool_use]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}],
        },
    ]
    yield case(
        "messages-tool-use-input-1e30", msgs, splice(anthropic(messages=history), big), "either"
    )
    tool = {
        "name": "f",
        "input_schema": {"type": "object", "properties": {"n": {"maximum": POISON}}},
    }
    yield case("messages-input-schema-1e30", msgs, splice(anthropic(tools=[tool]), big), "either")
    for depth in (252, 300):
        tool = {"name": "f", "input_schema": {"type": "object", "x": POISON}}
        yield case(
            f"messages-input-schema-nested-{depth}",
            msgs,
            splice(anthropic(tools=[tool]), nested(depth, "object")),
            "either",
        )
    tool = {"name": "f", "input_schema": {"type": "object", "x": POISON}}
    yield case(
        "messages-input-schema-nested-990",
        msgs,
        splice(anthropic(tools=[tool]), nested(990, "object")),
        "4xx",
    )
    for name, url in (
        ("empty-label", "https://a..com/"),
        ("label-64", f"https://{'a' * 64}.com/"),
        ("empty-host", "https:///x"),
        ("label-only-dots", "https://.../"),
    ):
        yield case(
            f"webhook-url-{name}",
            jobs,
            json.dumps({"request": chat(), "webhook_url": url}).encode(),
            "4xx",
        )
    # A body that is not what its Content-Encoding says. A list of codings is not
    # decoded by aiohttp: such a body is read as it is, which may then run.
    codings: tuple[tuple[bytes, Expect], ...] = (
        (b"gzip", "4xx"),
        (b"deflate", "4xx"),
        (b"br", "4xx"),
        (b"zstd", "4xx"),
        (b"gzip, deflate", "either"),
    )
    for encoding, expect in codings:
        yield case(
            f"content-encoding-{encoding.decode()}",
            chat_path,
            json.dumps(chat()).encode(),
            expect,
            headers=(("Content-Encoding", encoding),),
        )
    yield case(
        "idempotency-key-10000",
        jobs,
        json.dumps({"request": chat()}).encode(),
        "4xx",
        headers=(("Idempotency-Key", b"k" * 10_000),),
    )
    for name, value in (
        ("underscore", b"1_0"),
        ("arabic-indic", "\u0661\u0660".encode()),
        ("nan", b"NaN"),
        ("infinity", b"Infinity"),
        ("minus-zero", b"-0"),
        ("1e309", b"1e309"),
        ("hex", b"0x10"),
        ("spaces-inside", b"1 0"),
        ("10000-digits", b"1" * 10_000),
    ):
        for path, shape in ((chat_path, chat()), (jobs, {"request": chat()})):
            yield case(
                f"{path.rsplit('/', 1)[1]}-timeout-{name}",
                path,
                json.dumps(shape).encode(),
                "4xx",
                headers=(("X-Request-Timeout", value),),
            )

    # Not JSON: NaN and Infinity literals; -0 is JSON and runs.
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        for where in ("x", "seed"):
            yield case(
                f"chat-{where}-{literal.decode()}",
                chat_path,
                splice(in_field(where), literal),
                "4xx",
            )
        yield case(
            f"chat-temperature-{literal.decode()}",
            chat_path,
            splice(chat(temperature=POISON), literal),
            "4xx",
        )
        yield case(
            f"messages-{literal.decode()}",
            msgs,
            splice(anthropic(temperature=POISON), literal),
            "4xx",
        )
        yield case(
            f"embeddings-{literal.decode()}",
            emb,
            splice({"model": "mock", "input": "hi", "x": POISON}, literal),
            "4xx",
        )
    for zero in (b"-0", b"-0.0", b"-0e0"):
        for where in ("x", "seed"):
            yield case(
                f"chat-{where}-{zero.decode()}", chat_path, splice(in_field(where), zero), "200"
            )
        yield case(
            f"chat-temperature-{zero.decode()}",
            chat_path,
            splice(chat(temperature=POISON), zero),
            "200",
        )
        yield case(
            f"jobs-temperature-{zero.decode()}",
            jobs,
            splice({"request": chat(temperature=POISON)}, zero),
            "200",
        )
        yield case(
            f"messages-max-tokens-{zero.decode()}",
            msgs,
            splice(anthropic(max_tokens=POISON), zero),
            "4xx",
        )

    # Long headers.
    ok = json.dumps(chat()).encode()
    yield case("header-10k-unknown", chat_path, ok, "200", headers=(("X-Custom", b"a" * 10_000),))
    yield case(
        "header-10k-authorization",
        chat_path,
        ok,
        "4xx",
        headers=(("Authorization", b"Bearer " + b"a" * 10_000),),
    )
    yield case(
        "header-10k-x-api-key",
        msgs,
        json.dumps(anthropic()).encode(),
        "4xx",
        headers=(("Authorization", b""), ("x-api-key", b"a" * 10_000)),
    )
    yield case(
        "header-10k-traceparent", chat_path, ok, "either", headers=(("traceparent", b"0" * 10_000),)
    )
    yield case("header-10k-prefer", chat_path, ok, "either", headers=(("Prefer", b"x" * 10_000),))
    yield case(
        "header-10k-content-type",
        chat_path,
        ok,
        "4xx",
        headers=(("Content-Type", b"application/" + b"j" * 10_000),),
    )
    yield case("header-100k", chat_path, ok, "4xx", headers=(("X-Custom", b"a" * 100_000),))
    yield case(
        "headers-200-of-1k",
        chat_path,
        ok,
        "4xx",
        headers=tuple((f"X-H{i}", b"a" * 1000) for i in range(200)),
    )
    yield case(
        "header-10k-messages",
        msgs,
        json.dumps(anthropic()).encode(),
        "200",
        headers=(("X-Custom", b"a" * 10_000),),
    )

    # Bodies over the limit, declared or chunked.
    over = json.dumps(chat(x="a" * (MAX_BODY + 1000))).encode()
    yield case("body-over-limit", chat_path, over, "4xx")
    yield case(
        "chunked-body-over-limit",
        chat_path,
        _chunked(over),
        "4xx",
        headers=(("Transfer-Encoding", b"chunked"),),
    )
    yield case(
        "chunked-body-over-limit-messages",
        msgs,
        _chunked(json.dumps(anthropic(x="a" * (MAX_BODY + 1000))).encode()),
        "4xx",
        headers=(("Transfer-Encoding", b"chunked"),),
    )
    yield case(
        "chunked-body-over-limit-jobs",
        jobs,
        _chunked(json.dumps({"request": chat(x="a" * (MAX_BODY + 1000))}).encode()),
        "4xx",
        headers=(("Transfer-Encoding", b"chunked"),),
    )
    yield case(
        "chunked-body-within-limit",
        chat_path,
        _chunked(ok),
        "200",
        headers=(("Transfer-Encoding", b"chunked"),),
    )


def _chunked(body: bytes, size: int = 8192) -> bytes:
    out = bytearray()
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        out += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    return bytes(out + b"0\r\n\r\n")


CASES = list(_cases())


# ---------------------------------------------------------------- checks


def _assert_error_object(case: Case, answer: Answer) -> None:
    shown = f"{answer.status} {answer.headers.get('content-type')} {answer.body[:300]!r}"
    assert answer.headers.get("content-type", "").startswith("application/json"), shown
    try:
        found = answer.json()
    except ValueError:
        raise AssertionError(f"not JSON: {shown}") from None
    if case.path == "/v1/messages":
        assert found.get("type") == "error", shown
        assert set(found["error"]) == {"type", "message"}, shown
        assert all(isinstance(v, str) for v in found["error"].values()), shown
    else:
        assert set(found) == {"error"}, shown
        error = found["error"]
        assert set(error) == {"message", "type", "param", "code"}, shown
        assert isinstance(error["message"], str) and isinstance(error["type"], str), shown
        assert all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")), shown


def _assert_answer(case: Case, answer: Answer) -> None:
    shown = f"{answer.status} {answer.body[:300]!r}"
    assert answer.status in (200, 202), shown
    if answer.status == 202:
        return
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        assert b"data: [DONE]" in answer.body, shown
        assert b'"error"' not in answer.body, shown
        return
    found = answer.json()
    if case.path == "/v1/messages":
        assert found["type"] == "message", shown
    elif case.path == "/v1/embeddings":
        assert found["data"], shown
    else:
        assert found["choices"][0]["message"], shown


async def _assert_job_ends(stack: Stack, case: Case, answer: Answer, expect: Expect) -> None:
    """An accepted async job ends quickly: completed, or failed as the client's fault."""
    job_id = answer.json()["id"]
    request = _request(f"/v1/jobs/{job_id}", None, method="GET")

    async def final() -> dict[str, Any] | None:
        job: dict[str, Any] = (await send(stack, request)).json()
        return job if job["status"] not in ("queued", "in_progress") else None

    job = await eventually(final, timeout=JOB_S, what=f"job {job_id} to end")
    if expect == "200" or job["status"] != "failed":
        assert job["status"] == "completed", job
        assert job["result"]["choices"], job
    else:
        assert job["error"]["error"]["type"] == "invalid_request_error", job


async def _assert_nothing_left(stack: Stack, client: aioredis.Redis) -> None:
    keys = Keys(stack.prefix)

    async def drained() -> bool:
        return bool(await client.xlen(keys.queue("mock")) == 0)

    await eventually(drained, timeout=JOB_S, what="the queue to drain")
    for child in (stack.ingress, stack.worker):
        assert child.proc.poll() is None, f"{child.name} exited:\n{child.output()[-3000:]}"
    health = await send(stack, _request("/health", None, method="GET"))
    assert health.status == 200
    logged = [line for c in (stack.ingress, stack.worker) for line in c.lines]
    assert not any("Traceback" in line for line in logged), "\n".join(logged[-60:])


def _forget_logs(stack: Stack) -> None:
    """Only what a case makes the processes log is checked after it."""
    for child in (stack.ingress, stack.worker):
        child.lines.clear()


@pytest.mark.parametrize("case", CASES)
async def test_hostile_input_gets_an_error_object_or_an_answer(
    stack: Stack, redis_client: aioredis.Redis, case: Case
) -> None:
    _forget_logs(stack)
    answer = await send(stack, _request(case.path, case.body, case.headers, case.method))
    print(f"answer: {answer.status} in {answer.seconds:.3f}s {answer.body[:200]!r}")
    assert answer.seconds < ANSWER_S, f"answered after {answer.seconds:.1f}s"
    assert answer.status < 500, f"{answer.status} {answer.body[:500]!r}"
    if 400 <= answer.status < 500:
        assert case.expect in ("4xx", "either"), f"refused: {answer.status} {answer.body[:500]!r}"
        _assert_error_object(case, answer)
    else:
        assert case.expect in ("200", "either"), f"accepted: {answer.status} {answer.body[:300]!r}"
        _assert_answer(case, answer)
        if answer.status == 202:
            await _assert_job_ends(stack, case, answer, case.expect)
    await _assert_nothing_left(stack, redis_client)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/jobs", "/v1/messages"])
@pytest.mark.parametrize("how", ["half-closed", "closed"])
async def test_a_body_that_stops_midway_creates_nothing(
    stack: Stack, redis_client: aioredis.Redis, path: str, how: str
) -> None:
    """The client promises more bytes than it sends, then stops: no job is queued,
    nothing waits for the rest forever, and the next request is served."""
    _forget_logs(stack)
    keys = Keys(stack.prefix)
    jobs_before = len(await redis_client.keys(keys.job("*")))
    body = json.dumps(chat()).encode()
    promised = (("Content-Length", str(len(body) + 1000).encode()),)
    reader, writer = await asyncio.open_connection(stack.host, stack.port)
    writer.write(_request(path, body, promised))
    await writer.drain()
    if how == "half-closed":
        writer.write_eof()
        async with asyncio.timeout(ANSWER_S):
            raw = await reader.read()
        if raw:  # an answer is optional, but if there is one it is an error object
            answer = _parse(raw, 0.0)
            assert 400 <= answer.status < 500, raw[:300]
            _assert_error_object(Case(path, None, "4xx"), answer)
    writer.close()
    await _assert_nothing_left(stack, redis_client)
    assert len(await redis_client.keys(keys.job("*"))) == jobs_before
    answer = await send(stack, _request("/v1/chat/completions", body))
    assert answer.status == 200
