"""The Files API with the official ``openai`` SDK against the real processes, and
the batch input lines (``shared/batchlines.py``): splitting and checking."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from llm_broker.procs import Child
from llm_broker.shared.batchlines import MAX_CUSTOM_ID, LineError, iter_lines, parse_line
from llm_broker.shared.config import new_key
from tests.conftest import ConfigFactory, Procs, chat

# ---------------------------------------------------------------- lines


def line(custom_id: Any = "r1", **over: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": chat(),
        **over,
    }


def jsonl(*lines: dict[str, Any] | str) -> bytes:
    return b"".join((x if isinstance(x, str) else json.dumps(x)).encode() + b"\n" for x in lines)


async def _chunks(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def split(data: bytes, sizes: Iterable[int], max_line: int = 1 << 20) -> list[Any]:
    parts, at = [], 0
    for size in sizes:
        parts.append(data[at : at + size])
        at += size
    parts.append(data[at:])
    return [x async for x in iter_lines(_chunks(parts), max_line)]


SAMPLE = b'{"a":1}\r\n\r\n{"b":22}\n   \n{"c":333}\r\n{"d":4444}'


def _expected(data: bytes) -> list[tuple[int, bytes, int]]:
    """The lines and offsets, worked out the slow way."""
    out, offset = [], 0
    for n, raw in enumerate(data.split(b"\n"), 1):
        end = offset + len(raw) + (1 if offset + len(raw) < len(data) else 0)
        text = raw[:-1] if raw.endswith(b"\r") else raw
        if text.strip():
            out.append((n, text, end))
        offset = end
    return out


async def test_iter_lines_any_chunking_gives_the_same_lines_and_offsets() -> None:
    want = _expected(SAMPLE)
    assert [w[1] for w in want] == [b'{"a":1}', b'{"b":22}', b'{"c":333}', b'{"d":4444}']
    assert [w[0] for w in want] == [1, 3, 5, 6]
    assert want[-1][2] == len(SAMPLE)
    rng = random.Random(7)
    for _ in range(300):
        cuts = [rng.randint(0, 5) for _ in range(rng.randint(0, 20))]
        assert await split(SAMPLE, cuts) == want, cuts
    # Byte by byte, every chunk boundary: between "\r" and "\n" too.
    assert await split(SAMPLE, [1] * len(SAMPLE)) == want


async def test_reading_from_an_offset_resumes_at_the_next_line() -> None:
    data = SAMPLE + b"\n"
    want = _expected(data)
    for i, (_, _, end) in enumerate(want):
        rest = await split(data[end:], [3] * 20)
        assert [(text, end + off) for _, text, off in rest] == [(t, o) for _, t, o in want[i + 1 :]]


async def test_iter_lines_edge_cases() -> None:
    assert await split(b"", []) == []
    assert await split(b"\n\r\n  \n", [1, 1]) == []
    assert await split(b"x", []) == [(1, b"x", 1)]
    assert await split(b"x\r", []) == [(1, b"x", 2)]
    assert await split(b"x\r\n", [2]) == [(1, b"x", 3)]
    # A line of exactly max_line bytes passes, "\r\n" or not; one more byte fails.
    assert await split(b"abcd\r\nef", [5], max_line=4) == [(1, b"abcd", 6), (2, b"ef", 8)]
    assert await split(b"abcd", [1, 1], max_line=4) == [(1, b"abcd", 4)]
    with pytest.raises(LineError) as err:
        await split(b"ok\nabcde\nok\n", [4], max_line=4)
    assert err.value.line == 2
    assert str(err.value).startswith("line 2: ")
    # A line without its end fails as soon as max_line bytes of it are held.
    fed: list[int] = []

    async def endless() -> AsyncIterator[bytes]:
        for n in range(1000):
            fed.append(n)
            yield b"y" * 10

    with pytest.raises(LineError):
        async for _ in iter_lines(endless(), 50):
            pass
    assert len(fed) < 10


def test_parse_line_accepts_a_request_and_reencodes_its_body() -> None:
    parsed = parse_line(json.dumps(line("a-1")).encode(), 1)
    assert (parsed.custom_id, parsed.method, parsed.url) == ("a-1", "POST", "/v1/chat/completions")
    assert json.loads(parsed.body) == chat()
    emb = line("e", url="/v1/embeddings", body={"model": "m", "input": ["a", "b"]})
    assert json.loads(parse_line(json.dumps(emb).encode(), 2, "/v1/embeddings").body) == {
        "model": "m",
        "input": ["a", "b"],
    }


@pytest.mark.parametrize(
    ("raw", "param", "says"),
    [
        ('{"custom_id": "a",', None, "not a JSON line"),
        ("[1, 2]", None, "expected a JSON object"),
        (line(custom_id=None), "custom_id", "must be a string"),
        ({k: v for k, v in line().items() if k != "custom_id"}, "custom_id", "missing"),
        (line(custom_id=7), "custom_id", "must be a string"),
        (line(custom_id=""), "custom_id", "must not be empty"),
        (line(custom_id="x" * (MAX_CUSTOM_ID + 1)), "custom_id", "longer than"),
        (line(method="GET"), "method", "'POST'"),
        (line(url="/v1/completions"), "url", "must be one of"),
        (line(url="/v1/embeddings"), "body.input", "not a valid request"),
        ({k: v for k, v in line().items() if k != "body"}, "body", "missing"),
        (line(body="hi"), "body", "must be a JSON object"),
        (line(body={"model": "m"}), "body.messages", "messages"),
        (line(body={"model": "m", "messages": []}), "body.messages", "at least one"),
        (line(body={"messages": [{"role": "user", "content": "x"}]}), "body.model", "model"),
        (line(body=chat(temperature="hot")), "body.temperature", "not a valid request"),
        (line(body=chat(stream=True)), "body.stream", "streaming"),
        (
            line(url="/v1/embeddings", body={"model": "m", "input": ""}),
            "body.input",
            "must not be empty",
        ),
    ],
)
def test_parse_line_refuses(raw: dict[str, Any] | str, param: str | None, says: str) -> None:
    data = (raw if isinstance(raw, str) else json.dumps(raw)).encode()
    with pytest.raises(LineError) as err:
        parse_line(data, 4)
    assert err.value.line == 4
    assert err.value.param == param
    assert says in str(err.value)
    assert str(err.value).startswith("line 4: ")


def test_parse_line_holds_lines_to_the_batch_endpoint() -> None:
    raw = json.dumps(line()).encode()
    assert parse_line(raw, 1, "/v1/chat/completions").custom_id == "r1"
    with pytest.raises(LineError) as err:
        parse_line(raw, 3, "/v1/embeddings")
    assert err.value.param == "url"
    assert "line 3:" in str(err.value)


def test_parse_line_refuses_what_ingress_cannot_carry() -> None:
    deep = "[" * 300 + "]" * 300
    raw = '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":' + deep + "}"
    with pytest.raises(LineError):
        parse_line(raw.encode(), 1)
    with pytest.raises(LineError):
        parse_line(b'{"custom_id":"a","method":"POST"} \xff', 1)


# ---------------------------------------------------------------- the API


def _stored(directory: Path) -> list[Path]:
    """The files the store holds (temporary ones too)."""
    return [p for p in directory.rglob("*") if p.is_file()] if directory.exists() else []


def _stack(
    procs: Procs, make_config: ConfigFactory, tmp_path: Path, **sections: Any
) -> tuple[Child, str]:
    """The mock upstream and an ingress whose files are under ``tmp_path/files``."""
    _, mock_url = procs.mock()
    files = {"dir": str(tmp_path / "files"), **sections.pop("files", {})}
    return procs.ingress(make_config(mock_url, files=files, **sections))


def _client(url: str, key: str = "sk-unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


async def test_upload_list_retrieve_read_and_delete_a_file(
    procs: Procs, make_config: ConfigFactory, tmp_path: Path
) -> None:
    ingress, url = _stack(procs, make_config, tmp_path)
    data = jsonl(
        line("a"),
        line("b", body=chat(content="second")),
        line("c", url="/v1/embeddings", body={"model": "mock", "input": "x"}),
    )
    data = data.replace(b"\n", b"\r\n", 1) + b"\n"  # "\r\n" and a blank line are kept as sent
    async with _client(url) as client:
        created = await client.files.create(file=("in.jsonl", data), purpose="batch")
        assert created.id.startswith("file-")
        assert created.object == "file"
        assert (created.filename, created.purpose, created.bytes) == (
            "in.jsonl",
            "batch",
            len(data),
        )
        second = await client.files.create(file=("two.jsonl", jsonl(line())), purpose="batch")

        # Newest first (files made within the same second: in either order).
        listed = [f.id async for f in client.files.list()]
        assert sorted(listed) == sorted([second.id, created.id])
        page = await client.files.list(limit=1)
        assert [f.id for f in page.data] == listed[:1]
        assert page.has_more
        later = await client.files.list(limit=1, after=listed[0])
        assert [f.id for f in later.data] == listed[1:]
        assert not later.has_more
        assert [f.id async for f in client.files.list(purpose="batch_output")] == []

        got = await client.files.retrieve(created.id)
        assert got.model_dump() == created.model_dump()
        content = await client.files.content(created.id)
        assert content.read() == data

        deleted = await client.files.delete(created.id)
        assert (deleted.id, deleted.deleted) == (created.id, True)
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.files.content(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.files.delete(created.id)
        assert [f.id async for f in client.files.list()] == [second.id]
    assert len(_stored(tmp_path / "files")) == 1
    assert "Traceback" not in ingress.output()


#: Files with one bad line: what is wrong, the file, the line, the field at fault.
BAD_FILES: list[tuple[str, bytes, int, str | None]] = [
    ("bad JSON", jsonl(line("a"), '{"custom_id": "b",', line("c")), 2, None),
    ("duplicate custom_id", jsonl(line("a"), line("b"), line("a")), 3, "custom_id"),
    ("wrong url", jsonl(line("a", url="/v1/responses")), 1, "url"),
    ("wrong method", jsonl(line("a"), line("b", method="PUT")), 2, "method"),
    ("no messages", jsonl(line("a"), "", line("b", body={"model": "mock"})), 3, "body.messages"),
]


async def test_a_bad_line_fails_the_upload_naming_the_line(
    procs: Procs, make_config: ConfigFactory, tmp_path: Path
) -> None:
    ingress, url = _stack(procs, make_config, tmp_path)
    async with _client(url) as client:
        for what, data, line_no, field in BAD_FILES:
            with pytest.raises(openai.BadRequestError) as err:
                await client.files.create(file=("in.jsonl", data), purpose="batch")
            assert f"line {line_no}:" in err.value.message, what
            assert err.value.code == "invalid_batch_line", what
            assert err.value.param == field, what

        with pytest.raises(openai.BadRequestError) as err:
            await client.files.create(file=("in.jsonl", b"\n\n"), purpose="batch")
        assert err.value.code == "empty_file"
        with pytest.raises(openai.BadRequestError) as err:
            await client.files.create(file=("in.jsonl", jsonl(line())), purpose="fine-tune")
        assert err.value.param == "purpose"
        assert "purpose" in err.value.message

        assert [f async for f in client.files.list()] == []
    assert _stored(tmp_path / "files") == []
    assert "Traceback" not in ingress.output()


async def test_the_line_limit(procs: Procs, make_config: ConfigFactory, tmp_path: Path) -> None:
    ingress, url = _stack(procs, make_config, tmp_path, files={"max_lines": 3})
    async with _client(url) as client:
        ok = await client.files.create(
            file=("in.jsonl", jsonl(*(line(str(n)) for n in range(3)))), purpose="batch"
        )
        with pytest.raises(openai.BadRequestError) as err:
            await client.files.create(
                file=("in.jsonl", jsonl(*(line(str(n)) for n in range(4)))), purpose="batch"
            )
        assert err.value.code == "too_many_lines"
        assert "line 4:" in err.value.message
        assert [f.id async for f in client.files.list()] == [ok.id]
    assert "Traceback" not in ingress.output()


async def test_a_file_over_max_bytes_is_413_and_leaves_nothing(
    procs: Procs, make_config: ConfigFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    ingress, url = _stack(procs, make_config, tmp_path, files={"max_bytes": 2000})
    small = jsonl(line("a"))
    big = jsonl(*(line(f"id-{n}") for n in range(40)))
    assert len(big) > 2000
    async with _client(url) as client:
        with pytest.raises(openai.APIStatusError) as err:
            await client.files.create(file=("big.jsonl", big), purpose="batch")
        assert err.value.status_code == 413
        assert err.value.code == "request_too_large"
        assert [f async for f in client.files.list()] == []
        assert _stored(tmp_path / "files") == []
        # Sent chunked (no Content-Length): the limit holds all the same.
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", _chunks([big[:1500], big[1500:]]), filename="big.jsonl")
        async with http.post(f"{url}/v1/files", data=form) as resp:
            assert resp.status == 413, await resp.text()
        assert [f async for f in client.files.list()] == []
        assert _stored(tmp_path / "files") == []
        fine = await client.files.create(file=("small.jsonl", small), purpose="batch")
        assert fine.bytes == len(small)
    assert "Traceback" not in ingress.output()


async def test_the_form_itself(
    procs: Procs, make_config: ConfigFactory, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    ingress, url = _stack(procs, make_config, tmp_path)
    data = jsonl(line("a"), line("b"))

    async def post(*fields: tuple[str, Any, str | None]) -> tuple[int, dict[str, Any]]:
        form = aiohttp.FormData(default_to_multipart=True)
        for name, value, filename in fields:
            form.add_field(name, value, filename=filename)
        async with http.post(f"{url}/v1/files", data=form) as resp:
            return resp.status, await resp.json()

    # The file before the purpose is fine; the filename is kept.
    status, body = await post(("file", data, "x.jsonl"), ("purpose", "batch", None))
    assert (status, body["filename"], body["bytes"]) == (200, "x.jsonl", len(data))
    status, body = await post(("file", data, "x.jsonl"), ("purpose", "assistants", None))
    assert (status, body["error"]["param"]) == (400, "purpose")
    status, body = await post(("file", data, "x.jsonl"))
    assert (status, body["error"]["param"]) == (400, "purpose")
    status, body = await post(("purpose", "batch", None))
    assert (status, body["error"]["param"]) == (400, "file")
    status, body = await post(("purpose", "batch", None), ("file", data, "a"), ("file", data, "b"))
    assert status == 400
    async with http.post(f"{url}/v1/files", json={"purpose": "batch"}) as resp:
        assert resp.status == 415
    async with http.post(
        f"{url}/v1/files",
        data=b"--x\r\nbroken",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"
    async with http.get(f"{url}/v1/files", params={"limit": "0"}) as resp:
        assert resp.status == 400
    async with http.get(f"{url}/v1/files", params={"after": "file-nope"}) as resp:
        assert resp.status == 400
    async with http.get(f"{url}/v1/files") as resp:
        listed = await resp.json()
    assert listed["object"] == "list"
    assert [f["filename"] for f in listed["data"]] == ["x.jsonl"]
    assert listed["first_id"] == listed["last_id"] == listed["data"][0]["id"]
    assert listed["has_more"] is False
    async with http.get(f"{url}/v1/files/{listed['first_id']}/content") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/octet-stream"
        assert await resp.read() == data
    assert len(_stored(tmp_path / "files")) == 1
    assert "Traceback" not in ingress.output()


async def test_a_tenant_sees_only_its_own_files(
    procs: Procs, make_config: ConfigFactory, tmp_path: Path
) -> None:
    key_a, hash_a = new_key()
    key_b, hash_b = new_key()
    auth = {
        "open": False,
        "keys": [{"tenant": "a", "sha256": hash_a}, {"tenant": "b", "sha256": hash_b}],
    }
    ingress, url = _stack(procs, make_config, tmp_path, auth=auth)
    async with _client(url, key_a) as a, _client(url, key_b) as b:
        mine = await a.files.create(file=("in.jsonl", jsonl(line())), purpose="batch")
        assert [f.id async for f in b.files.list()] == []
        for call in (b.files.retrieve, b.files.content, b.files.delete):
            with pytest.raises(openai.NotFoundError):
                await call(mine.id)
        assert [f.id async for f in a.files.list()] == [mine.id]
        assert (await a.files.content(mine.id)).read() == jsonl(line())
    async with _client(url, "sk-wrong") as nobody:
        with pytest.raises(openai.AuthenticationError):
            await nobody.files.list()
    assert "Traceback" not in ingress.output()
