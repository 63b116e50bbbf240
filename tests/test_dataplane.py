"""The data plane's HTTP path (ingress/dataplane.py): its requests are served without
aiohttp's request objects, everything else is handed to aiohttp on the same
connection, and what a client sees is the same either way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import openai
import pytest
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from llm_broker.ingress import dataplane
from llm_broker.ingress.dataplane import DataPlaneSite, FastRequest
from llm_broker.ingress.server import Runner
from tests.conftest import ConfigFactory, Procs

LIMIT = 1024
CHAT = "/v1/chat/completions"


@dataclass
class Served:
    """What the app's handlers saw: (path, served by the data plane, body)."""

    seen: list[tuple[str, bool, bytes]] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Site:
    port: int
    served: Served
    site: DataPlaneSite
    writers: list[asyncio.StreamWriter] = field(default_factory=list)


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    served = Served()

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        served.seen.append((request.path, isinstance(request, FastRequest), body))
        if body == b"hold":
            served.held.set()
            try:
                await served.hold.wait()
            except asyncio.CancelledError:
                served.cancelled.set()
                raise
        if body == b"stream":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for n in range(3):
                await response.write(b"data: %d\n\n" % n)
            await response.write_eof()
            return response
        return web.Response(body=b"echo:" + body, content_type="application/json")

    async def other(request: web.Request) -> web.Response:
        served.seen.append((request.path, isinstance(request, FastRequest), b""))
        return web.Response(text="other")

    app = web.Application(client_max_size=LIMIT)
    app.router.add_post(CHAT, chat)
    app.router.add_get("/other", other)
    runner = Runner(app, handle_signals=False, access_log=None, handler_cancellation=True)
    await runner.setup()
    dp = DataPlaneSite(runner, "127.0.0.1", 0)
    await dp.start()
    running = Site(dp.port, served, dp)
    try:
        yield running
    finally:
        for writer in running.writers:
            writer.close()
        await runner.cleanup()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if status == 100:
        return Answer(status, headers, b"")
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Answer(status, headers, body)


def post(body: bytes, path: str = CHAT, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{extra}"
    return f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body


GET_OTHER = b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n"


async def connect(site: Site) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
    site.writers.append(writer)
    return reader, writer


async def closed(reader: asyncio.StreamReader) -> bool:
    return await asyncio.wait_for(reader.read(), 5) == b""


async def test_data_plane_calls_are_served_here_and_the_rest_by_aiohttp(site: Site) -> None:
    reader, writer = await connect(site)
    writer.write(post(b"one"))
    first = await read_answer(reader)
    assert (first.status, first.body) == (200, b"echo:one")
    assert first.headers["content-type"] == "application/json"
    assert "date" in first.headers and "connection" not in first.headers
    writer.write(GET_OTHER)  # the same connection, handed to aiohttp
    other = await read_answer(reader)
    assert (other.status, other.body) == (200, b"other")
    writer.write(post(b"two"))  # it stays with aiohttp
    second = await read_answer(reader)
    assert (second.status, second.body) == (200, b"echo:two")
    assert site.served.seen == [(CHAT, True, b"one"), ("/other", False, b""), (CHAT, False, b"two")]


async def test_a_request_read_in_pieces_and_a_chunked_body(site: Site) -> None:
    reader, writer = await connect(site)
    data = post(b"pieces")
    for i in range(0, len(data), 7):
        writer.write(data[i : i + 7])
        await writer.drain()
    assert (await read_answer(reader)).body == b"echo:pieces"
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
        + b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert (await read_answer(reader)).body == b"echo:abcde"
    assert [s[1] for s in site.served.seen] == [True, True]


async def test_pipelined_calls_are_answered_in_order(site: Site) -> None:
    reader, writer = await connect(site)
    writer.write(post(b"a") + post(b"b") + post(b"c"))
    bodies = [(await read_answer(reader)).body for _ in range(3)]
    assert bodies == [b"echo:a", b"echo:b", b"echo:c"]
    assert all(fast for _, fast, _ in site.served.seen)


async def test_a_pipelined_request_for_aiohttp_ends_the_connection_after_the_answers(
    site: Site,
) -> None:
    reader, writer = await connect(site)
    writer.write(post(b"a") + GET_OTHER)
    assert (await read_answer(reader)).body == b"echo:a"
    assert await closed(reader)
    assert site.served.seen == [(CHAT, True, b"a")]  # the GET was not run


async def test_a_request_for_aiohttp_behind_an_unanswered_call_waits_for_its_answer(
    site: Site,
) -> None:
    reader, writer = await connect(site)
    writer.write(post(b"hold"))
    await asyncio.wait_for(site.served.held.wait(), 5)
    writer.write(GET_OTHER)  # a read of its own, while the call is unanswered
    await writer.drain()
    site.served.hold.set()
    assert (await read_answer(reader)).body == b"echo:hold"
    assert (await read_answer(reader)).body == b"other"


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ("Expect: 100-continue\r\n", CHAT),
        ("Prefer: respond-async\r\n", CHAT),
        ("", CHAT + "?x=1"),
    ],
    ids=["expect", "prefer", "query"],
)
async def test_requests_that_are_not_plain_go_to_aiohttp(site: Site, extra: str, path: str) -> None:
    reader, writer = await connect(site)
    writer.write(post(b"x", path, extra))
    answer = await read_answer(reader)
    if answer.status == 100:
        answer = await read_answer(reader)
    assert (answer.status, answer.body) == (200, b"echo:x")
    assert site.served.seen == [(CHAT, False, b"x")]


async def test_a_body_over_the_limit_gets_413(site: Site) -> None:
    reader, writer = await connect(site)
    writer.write(post(b"x" * (LIMIT + 1)))
    assert (await read_answer(reader)).status == 413
    reader, writer = await connect(site)
    chunks = b"".join(b"%x\r\n%s\r\n" % (300, b"y" * 300) for _ in range(4)) + b"0\r\n\r\n"
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode() + chunks
    )
    assert (await read_answer(reader)).status == 413


async def test_a_malformed_request_gets_the_json_error_object(site: Site) -> None:
    reader, writer = await connect(site)
    writer.write(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".encode())
    answer = await read_answer(reader)
    assert answer.status == 400
    assert b"malformed_http_request" in answer.body
    assert site.served.seen == []


async def test_a_client_that_goes_away_cancels_its_call(site: Site) -> None:
    _reader, writer = await connect(site)
    writer.write(post(b"hold"))
    await asyncio.wait_for(site.served.held.wait(), 5)
    writer.close()
    await asyncio.wait_for(site.served.cancelled.wait(), 5)


async def test_connection_close_is_honoured(site: Site) -> None:
    reader, writer = await connect(site)
    writer.write(post(b"bye", extra="Connection: close\r\n") + post(b"never"))
    answer = await read_answer(reader)
    assert answer.body == b"echo:bye" and answer.headers["connection"] == "close"
    assert await closed(reader)
    assert [s[2] for s in site.served.seen] == [b"bye"]


async def test_a_streamed_answer_and_the_call_after_it(site: Site) -> None:
    reader, writer = await connect(site)
    writer.write(post(b"stream"))
    answer = await read_answer(reader)
    assert answer.headers["transfer-encoding"] == "chunked"
    assert answer.body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
    writer.write(post(b"after"))
    assert (await read_answer(reader)).body == b"echo:after"
    assert [s[1] for s in site.served.seen] == [True, True]


async def test_stopping_closes_idle_connections_and_busy_ones_after_their_answer(
    site: Site,
) -> None:
    idle_reader, idle_writer = await connect(site)
    idle_writer.write(post(b"first"))
    assert (await read_answer(idle_reader)).body == b"echo:first"
    reader, writer = await connect(site)
    writer.write(post(b"hold"))
    await asyncio.wait_for(site.served.held.wait(), 5)
    await site.site.stop()
    assert await closed(idle_reader)
    site.served.hold.set()
    answer = await read_answer(reader)
    assert answer.body == b"echo:hold" and answer.headers["connection"] == "close"
    assert await closed(reader)
    with pytest.raises(OSError):
        await connect(site)


async def test_an_idle_connection_closes_after_the_keep_alive_and_one_in_use_stays_open(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    keepalive = 0.4
    monkeypatch.setattr(dataplane, "KEEPALIVE_S", keepalive)
    loop = asyncio.get_running_loop()
    reader, writer = await connect(site)
    began = loop.time()
    # A call every 0.15 s for three keep-alives: the connection stays open (its
    # timer, set when it opened, fires while it is in use and is moved on).
    n = 0
    while loop.time() - began < 3 * keepalive:
        writer.write(post(b"%d" % n))
        assert (await read_answer(reader)).body == b"echo:%d" % n
        last = loop.time()
        n += 1
        await asyncio.sleep(0.15)  # (the time between calls is what is tested)
    # Then idle: it closes a keep-alive after its last answer, not before.
    assert await closed(reader)
    idle = loop.time() - last
    assert keepalive * 0.9 <= idle < keepalive + 2
    assert len(site.served.seen) == n


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "aiohttp"])
async def test_the_sdk_gets_the_same_answers_either_way(
    procs: Procs, make_config: ConfigFactory, fast_path: bool
) -> None:
    """The real processes, with ``ingress.fast_path`` on and off: a call, a stream
    and an async job (which the data plane hands to aiohttp) through the OpenAI SDK."""
    _, mock_url = procs.mock()
    config = make_config(mock_url, ingress={"fast_path": fast_path})
    procs.worker(config)
    _, url = procs.ingress(config)
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-any", max_retries=0)
    try:
        said: list[ChatCompletionMessageParam] = [{"role": "user", "content": "either way"}]
        whole = await client.chat.completions.create(model="gpt-4o-mini", messages=said)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=said,
            stream=True,
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        later = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=said,
            extra_headers={"Prefer": "respond-async"},
        )
    finally:
        await client.close()
    assert whole.choices[0].message.content
    assert streamed == whole.choices[0].message.content
    assert later.status_code == 202 and later.headers["Preference-Applied"] == "respond-async"
