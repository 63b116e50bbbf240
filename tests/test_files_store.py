"""The file stores (a directory; S3, against moto's S3-compatible server run as a
real process over HTTP) through the same tests, and the file records (``Files``) on
a real Redis with each store: records, listing, segments, retention."""

from __future__ import annotations

import asyncio
import hashlib
import random
import subprocess
import sys
import time
import tracemalloc
import urllib.error
import urllib.request
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiobotocore.session import get_session

from llm_broker.dev import free_port
from llm_broker.shared.config import FilesConfig, S3Config
from llm_broker.shared.files import CHUNK, DirStore, FileRecord, Files, FileStore, TooLarge
from llm_broker.shared.s3store import PART, S3Store

MiB = 1024 * 1024
BUCKET = "llm-broker-test"


@dataclass
class Moto:
    url: str
    key_file: Path
    secret_file: Path

    def config(self, prefix: str) -> S3Config:
        return S3Config(
            bucket=BUCKET,
            prefix=prefix,
            endpoint_url=self.url,
            access_key_id_file=str(self.key_file),
            secret_access_key_file=str(self.secret_file),
        )


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except urllib.error.HTTPError:
        return True  # an HTTP answer, whatever its status
    except OSError:
        return False


async def _create_bucket(url: str) -> None:
    async with get_session().create_client(
        "s3",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id="test-key",
        aws_secret_access_key="test-secret",
    ) as s3:
        await s3.create_bucket(Bucket=BUCKET)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """moto's S3-compatible server, a process of its own on a free port."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-p", str(port), "-H", "127.0.0.1"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not _answers(f"{url}/moto-api/"):
            assert proc.poll() is None, f"moto's server exited ({proc.returncode})"
            assert time.monotonic() < deadline, "moto's server did not answer in 30 s"
            time.sleep(0.05)  # poll until the server answers HTTP
        tmp = tmp_path_factory.mktemp("s3")
        # Credentials files as an operator writes them (a trailing newline, spaces).
        (tmp / "key").write_text(" test-key\n")
        (tmp / "secret").write_text("test-secret\n\n")
        # In a thread of its own: the fixture may be set up inside a test's event loop.
        with ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, _create_bucket(url)).result()
        yield Moto(url, tmp / "key", tmp / "secret")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["dir", "s3"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path, prefix: str
) -> AsyncIterator[FileStore]:
    """Each store, empty: a fresh directory, or a fresh prefix in the bucket."""
    s: FileStore
    if request.param == "dir":
        s = DirStore(str(tmp_path / "files"))
    else:
        moto: Moto = request.getfixturevalue("moto")
        s = S3Store(moto.config(f"files-test/{prefix}"))
    yield s
    await s.close()


async def generated(size: int, seed: int, digest: hashlib._Hash) -> AsyncIterator[bytes]:
    """``size`` pseudo-random bytes in chunks of uneven sizes (none aligned with a
    part), added to ``digest`` as they are made: never all in memory."""
    rnd = random.Random(seed)
    left = size
    while left:
        n = min(left, rnd.randrange(1, 3 * CHUNK) if rnd.random() < 0.5 else 1_000_003)
        chunk = rnd.randbytes(n)
        digest.update(chunk)
        left -= n
        yield chunk


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def contents(store: FileStore, name: str, start: int = 0) -> bytes:
    return b"".join([c async for c in store.read(name, start)])


async def missing(store: FileStore, name: str, start: int = 0) -> bool:
    try:
        await contents(store, name, start)
    except FileNotFoundError:
        return True
    return False


async def uploads_in_progress(store: FileStore) -> list[str]:
    """The S3 store's multipart uploads not completed nor aborted (none for a dir)."""
    if not isinstance(store, S3Store):
        return []
    s3 = await store._s3()
    found = await s3.list_multipart_uploads(Bucket=BUCKET, Prefix=store.cfg.prefix)
    return [u["Key"] for u in found.get("Uploads", [])]


# ------------------------------------------------------------------ stores


async def test_round_trip_of_a_file_of_several_parts(store: FileStore) -> None:
    size = 20 * MiB + 12_345
    assert size > 2 * PART
    sent = hashlib.sha256()
    assert await store.write("files/big", generated(size, 1, sent), 64 * MiB) == size

    got = hashlib.sha256()
    received = 0
    async for chunk in store.read("files/big"):
        assert 0 < len(chunk) <= CHUNK
        got.update(chunk)
        received += len(chunk)
    assert received == size
    assert got.hexdigest() == sent.hexdigest()

    if isinstance(store, S3Store):  # sent as a multipart upload of 3 parts
        s3 = await store._s3()
        head = await s3.head_object(Bucket=BUCKET, Key=store.cfg.prefix + "files/big")
        assert head["ETag"].strip('"').endswith("-3")
        assert head["ContentLength"] == size

    # From an offset inside the second part: the tail, and its hash.
    start = PART + 777
    tail = hashlib.sha256()
    offset = 0
    async for chunk in generated(size, 1, hashlib.sha256()):  # the same bytes again
        tail.update(chunk[max(0, start - offset) :])
        offset += len(chunk)
    got_tail = hashlib.sha256()
    async for chunk in store.read("files/big", start):
        got_tail.update(chunk)
    assert got_tail.hexdigest() == tail.hexdigest()


async def test_small_and_empty_files(store: FileStore) -> None:
    body = bytes(range(256)) * 4
    assert await store.write("files/small", chunks(body[:100], body[100:]), 1024) == 1024
    assert await contents(store, "files/small") == body
    assert await store.write("files/empty", chunks(), 10) == 0
    assert await contents(store, "files/empty") == b""
    assert await store.write("files/empty2", chunks(b"", b""), 10) == 0
    assert await contents(store, "files/empty2") == b""
    assert await uploads_in_progress(store) == []


async def test_read_from_an_offset(store: FileStore) -> None:
    body = b"0123456789" * 100
    await store.write("files/f", chunks(body), 10_000)
    assert await contents(store, "files/f", 300) == body[300:]
    assert await contents(store, "files/f", 999) == body[999:]
    assert await contents(store, "files/f", 1000) == b""  # at the end: nothing more
    assert await contents(store, "files/f", 5000) == b""
    assert await contents(store, "files/f", 0) == body


async def test_too_large_leaves_nothing(store: FileStore) -> None:
    with pytest.raises(TooLarge):
        await store.write("files/small", chunks(b"x" * 60, b"y" * 41), 100)
    assert await missing(store, "files/small")

    # Past one part: a multipart upload was under way, and is aborted.
    digest = hashlib.sha256()
    with pytest.raises(TooLarge):
        await store.write("files/big", generated(PART + 3 * MiB, 2, digest), PART + MiB)
    assert await missing(store, "files/big")
    assert await uploads_in_progress(store) == []

    # Exactly the maximum is not too large.
    assert await store.write("files/exact", chunks(b"z" * 100), 100) == 100


async def test_a_failing_source_leaves_nothing(store: FileStore) -> None:
    async def failing() -> AsyncIterator[bytes]:
        digest = hashlib.sha256()
        async for chunk in generated(PART + MiB, 3, digest):
            yield chunk
        raise RuntimeError("the client went away")

    with pytest.raises(RuntimeError, match="went away"):
        await store.write("files/broken", failing(), 64 * MiB)
    assert await missing(store, "files/broken")
    assert await uploads_in_progress(store) == []


async def test_a_cancelled_write_leaves_nothing(store: FileStore) -> None:
    sent = asyncio.Event()

    async def stalls() -> AsyncIterator[bytes]:
        async for chunk in generated(PART + MiB, 6, hashlib.sha256()):
            yield chunk
        sent.set()
        await asyncio.Event().wait()  # the client stops sending, and is cut off
        yield b""

    task = asyncio.create_task(store.write("files/cut", stalls(), 64 * MiB))
    await asyncio.wait_for(sent.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await missing(store, "files/cut")
    assert await uploads_in_progress(store) == []


async def test_streams_in_bounded_memory(store: FileStore) -> None:
    """A file several parts long is never whole in memory, written or read."""
    size = 64 * MiB
    await store.write("files/warm", chunks(b"the S3 client made, its models loaded"), 100)
    tracemalloc.start()
    try:
        await store.write("files/m", generated(size, 7, hashlib.sha256()), size)
        _, peak = tracemalloc.get_traced_memory()
        assert peak < 5 * PART < size  # a part, its copy, and the client's buffers
        tracemalloc.reset_peak()
        received = 0
        async for chunk in store.read("files/m"):
            received += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
        assert received == size and peak < 4 * CHUNK + MiB
    finally:
        tracemalloc.stop()


async def test_a_reader_may_stop_early(store: FileStore) -> None:
    await store.write("files/r", generated(PART, 8, hashlib.sha256()), PART)
    reader = store.read("files/r", 10)
    assert isinstance(reader, AsyncGenerator)  # both stores' read is one
    first = await anext(reader)
    assert first
    await reader.aclose()  # the response is released: no warning about it


async def test_missing_file(store: FileStore) -> None:
    assert await missing(store, "files/nothing")
    assert await missing(store, "files/nothing", 10)
    assert await missing(store, "files/no/such/segment")


async def test_delete_is_idempotent(store: FileStore) -> None:
    await store.delete("files/never-written")
    await store.write("files/d", chunks(b"data"), 100)
    await store.delete("files/d")
    assert await missing(store, "files/d")
    await store.delete("files/d")
    assert await missing(store, "files/d")


async def test_overwrite_replaces(store: FileStore) -> None:
    digest = hashlib.sha256()
    await store.write("files/o", generated(PART + 5, 4, digest), 64 * MiB)
    assert await store.write("files/o", chunks(b"short"), 100) == 5
    assert await contents(store, "files/o") == b"short"
    await store.write("files/o", chunks(b"longer, again"), 100)
    assert await contents(store, "files/o") == b"longer, again"


async def test_segments_and_a_single_object_side_by_side(store: FileStore) -> None:
    await store.write("files/a", chunks(b"whole"), 100)
    for n in range(3):
        await store.write(f"files/b/{n}", chunks(f"seg{n};".encode()), 100)
    assert await contents(store, "files/a") == b"whole"
    assert await contents(store, "files/b/2") == b"seg2;"
    for n in range(3):
        await store.delete(f"files/b/{n}")
    assert await missing(store, "files/b/0")
    assert await contents(store, "files/a") == b"whole"


async def test_s3_credentials_and_prefix(moto: Moto, tmp_path: Path, prefix: str) -> None:
    """The keys come from the files, stripped; objects are named prefix + name."""
    store = S3Store(moto.config(f"creds/{prefix}"))
    try:
        s3 = await store._s3()
        signed: list[str] = []

        def seen(request: Any, **_: Any) -> None:  # botocore's before-send event
            signed.append(request.headers["Authorization"].decode())

        s3.meta.events.register("before-send.s3", seen)
        await store.write("files/x", chunks(b"hello"), 10)
        assert signed and all("Credential=test-key/" in a for a in signed)
        listed = await s3.list_objects_v2(Bucket=BUCKET, Prefix=f"creds/{prefix}")
        assert [o["Key"] for o in listed.get("Contents", [])] == [f"creds/{prefix}files/x"]
    finally:
        await store.close()

    with pytest.raises(ValueError, match="go together"):
        S3Store(S3Config(bucket=BUCKET, access_key_id_file=str(moto.key_file)))


async def test_s3_default_credential_chain(
    moto: Moto, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the files, botocore's chain applies (here: the environment)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    store = S3Store(S3Config(bucket=BUCKET, prefix=f"env/{prefix}", endpoint_url=moto.url))
    try:
        s3 = await store._s3()
        signed: list[str] = []

        def seen(request: Any, **_: Any) -> None:
            signed.append(request.headers["Authorization"].decode())

        s3.meta.events.register("before-send.s3", seen)
        await store.write("files/y", chunks(b"hi"), 10)
        assert await contents(store, "files/y") == b"hi"
        assert signed and all("Credential=env-key/" in a for a in signed)
    finally:
        await store.close()


# ------------------------------------------------------------------ records


@pytest.fixture
def files(store: FileStore, rclient: aioredis.Redis, prefix: str) -> Files:
    return Files(rclient, prefix, store, FilesConfig())


def record(file_id: str, tenant: str = "acme", **changes: object) -> FileRecord:
    fields: dict[str, object] = {
        "id": file_id,
        "tenant": tenant,
        "purpose": "batch",
        "filename": f"{file_id}.jsonl",
        "bytes": 5,
        "created_at": 1_700_000_000,
    }
    fields.update(changes)
    return FileRecord(**fields)  # type: ignore[arg-type]


async def test_save_and_get(files: Files) -> None:
    await files.store.write("files/file-1", chunks(b"hello"), 100)
    before = int(time.time())
    rec = record("file-1")
    await files.save(rec)
    assert rec.expires_at is not None
    assert before + files.cfg.retention_s - 1 <= rec.expires_at
    assert await files.get("acme", "file-1") == rec
    assert await files.get("other", "file-1") is None
    assert await files.get("acme", "file-2") is None
    ttl = await files.redis.ttl(files._key("file-1"))
    assert 0 < ttl <= files.cfg.retention_s
    got = await files.get("acme", "file-1")
    assert got is not None
    assert b"".join([c async for c in files.content(got)]) == b"hello"
    assert b"".join([c async for c in files.content(got, 2)]) == b"llo"
    assert got.public()["object"] == "file"


async def test_list_newest_first_in_pages(files: Files) -> None:
    for n in range(5):
        await files.save(record(f"file-{n}", created_at=1_700_000_000 + n))
    await files.save(record("file-x", tenant="other", created_at=1_800_000_000))

    page, more = await files.list("acme", None, 2)
    assert [r.id for r in page] == ["file-4", "file-3"] and more
    page, more = await files.list("acme", "file-3", 2)
    assert [r.id for r in page] == ["file-2", "file-1"] and more
    page, more = await files.list("acme", "file-1", 2)
    assert [r.id for r in page] == ["file-0"] and not more
    page, more = await files.list("acme", None, 5)
    assert len(page) == 5 and not more
    page, more = await files.list("other", None, 10)
    assert [r.id for r in page] == ["file-x"] and not more
    assert await files.list("nobody", None, 10) == ([], False)


async def test_delete(files: Files) -> None:
    await files.store.write("files/file-d", chunks(b"bye"), 100)
    rec = record("file-d")
    await files.save(rec)
    await files.save(record("file-k"))
    await files.delete(rec)
    assert await files.get("acme", "file-d") is None
    assert await missing(files.store, "files/file-d")
    page, _ = await files.list("acme", None, 10)
    assert [r.id for r in page] == ["file-k"]
    assert await files.sweep(time.time() + 10 * files.cfg.retention_s) == 1  # file-k's only


async def test_content_of_segments(files: Files) -> None:
    digest = hashlib.sha256()
    size = PART + 1000
    await files.store.write("files/file-s/0", generated(size, 5, digest), 64 * MiB)
    await files.store.write("files/file-s/1", chunks(b"line two\n"), 100)
    await files.store.write("files/file-s/2", chunks(b""), 100)
    await files.store.write("files/file-s/3", chunks(b"line four\n"), 100)
    digest.update(b"line two\nline four\n")
    rec = record("file-s", segments=4, bytes=size + 19)
    await files.save(rec)
    assert rec.objects() == [f"files/file-s/{n}" for n in range(4)]
    got = hashlib.sha256()
    async for chunk in files.content(rec):
        got.update(chunk)
    assert got.hexdigest() == digest.hexdigest()

    await files.delete(rec)
    for n in range(4):
        assert await missing(files.store, f"files/file-s/{n}")


async def test_retention(files: Files) -> None:
    now = time.time()
    # Saved already past its retention: no record, and the sweep deletes its objects.
    await files.store.write("files/file-old", chunks(b"old"), 100)
    await files.save(record("file-old", expires_at=int(now) - 10))
    assert await files.get("acme", "file-old") is None
    assert await files.list("acme", None, 10) == ([], False)
    # A segmented one, likewise.
    for n in range(2):
        await files.store.write(f"files/file-oldseg/{n}", chunks(b"x"), 100)
    await files.save(record("file-oldseg", segments=2, expires_at=int(now) - 5))
    # A live one.
    await files.store.write("files/file-new", chunks(b"new"), 100)
    await files.save(record("file-new"))

    assert await files.sweep(now) == 2
    assert await missing(files.store, "files/file-old")
    assert await missing(files.store, "files/file-oldseg/0")
    assert await missing(files.store, "files/file-oldseg/1")
    assert await contents(files.store, "files/file-new") == b"new"
    assert await files.sweep(now) == 0

    # A record saved again with more segments and a later expiry: its earlier
    # entry, now due, leaves the live record's objects alone.
    for n in range(2):
        await files.store.write(f"files/file-grow/{n}", chunks(b"g"), 100)
    await files.save(record("file-grow", segments=1, expires_at=int(now) + 100))
    await files.save(record("file-grow", segments=2, expires_at=int(now) + 1000))
    assert await files.sweep(now + 500) == 1
    assert await contents(files.store, "files/file-grow/0") == b"g"
    assert await contents(files.store, "files/file-grow/1") == b"g"
    assert await files.get("acme", "file-grow") is not None

    # Past every expiry: the rest goes, records too (even before Redis expires them).
    assert await files.sweep(now + 10 * files.cfg.retention_s) == 2
    assert await files.get("acme", "file-grow") is None
    assert await files.get("acme", "file-new") is None
    assert await missing(files.store, "files/file-grow/0")
    assert await missing(files.store, "files/file-grow/1")
    assert await missing(files.store, "files/file-new")
