"""Files (the OpenAI Files API's, and the batches' inputs and outputs): their
contents in a file store, their bounded metadata in Redis.

A file's contents live in the store under ``files/<id>`` (an uploaded file) or in
numbered segments ``files/<id>/<n>`` (a batch's output, appended to as lines
finish); its record (``FileRecord``) in Redis says which, and expires with the file.
Two stores: a directory (the default) and S3-compatible object storage
(:mod:`llm_broker.shared.s3store`).
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Protocol

import msgspec
import redis.asyncio as aioredis

from llm_broker.shared.config import FilesConfig

CHUNK = 256 * 1024


class TooLarge(Exception):
    """A file grew past the configured maximum while being written."""


class FileStore(Protocol):
    async def write(self, name: str, chunks: AsyncIterable[bytes], max_bytes: int) -> int:
        """Store the chunks under ``name`` (replacing what is there); returns the size.
        Raises :class:`TooLarge` past ``max_bytes`` (nothing is left stored)."""
        ...

    def read(self, name: str, start: int = 0) -> AsyncIterator[bytes]:
        """The contents of ``name`` from byte ``start``, in chunks; FileNotFoundError
        when there is none."""
        ...

    async def delete(self, name: str) -> None:
        """Remove ``name`` (nothing if it is not there)."""
        ...

    async def close(self) -> None: ...


class DirStore:
    """A directory: each name is a file under ``root`` (written to a temporary name
    and renamed, so a reader never sees half a file)."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def _path(self, name: str) -> Path:
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid file name {name!r}")
        return self.root.joinpath(*parts)

    async def write(self, name: str, chunks: AsyncIterable[bytes], max_bytes: int) -> int:
        path = self._path(name)
        await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        size = 0
        handle = await asyncio.to_thread(open, tmp, "wb")
        try:
            async for chunk in chunks:
                size += len(chunk)
                if size > max_bytes:
                    raise TooLarge(f"the file is larger than {max_bytes} bytes")
                await asyncio.to_thread(handle.write, chunk)
            await asyncio.to_thread(handle.close)
            await asyncio.to_thread(os.replace, tmp, path)
        except BaseException:
            handle.close()
            await asyncio.to_thread(tmp.unlink, True)
            raise
        return size

    async def read(self, name: str, start: int = 0) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(open, self._path(name), "rb")
        try:
            if start:
                await asyncio.to_thread(handle.seek, start)
            while chunk := await asyncio.to_thread(handle.read, CHUNK):
                yield chunk
        finally:
            handle.close()

    async def delete(self, name: str) -> None:
        path = self._path(name)
        await asyncio.to_thread(path.unlink, True)
        if name.count("/") >= 2:  # a segment: its file's own folder goes once empty
            try:
                await asyncio.to_thread(path.parent.rmdir)
            except OSError:
                pass

    async def close(self) -> None:
        return None


def open_store(cfg: FilesConfig) -> FileStore:
    """The configured store."""
    if cfg.backend == "s3":
        from llm_broker.shared.s3store import S3Store

        assert cfg.s3 is not None
        return S3Store(cfg.s3)
    return DirStore(cfg.directory())


# ------------------------------------------------------------------ records


class FileRecord(msgspec.Struct, kw_only=True):
    """A file's metadata (OpenAI's file object, plus where its contents are)."""

    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    created_at: int
    expires_at: int | None = None
    #: 0: one object (``files/<id>``); n: the segments ``files/<id>/0`` .. ``n-1``.
    segments: int = 0

    def public(self) -> dict[str, object]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
        }

    def objects(self) -> list[str]:
        if not self.segments:
            return [f"files/{self.id}"]
        return [f"files/{self.id}/{n}" for n in range(self.segments)]


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class Files:
    """Files: records in Redis, contents in the store."""

    def __init__(
        self, redis: aioredis.Redis, prefix: str, store: FileStore, cfg: FilesConfig
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.store = store
        self.cfg = cfg

    def _key(self, file_id: str) -> str:
        return f"{self.prefix}file:{file_id}"

    def _index(self, tenant: str) -> str:
        return f"{self.prefix}files:{len(tenant)}:{tenant}"

    def _expiry(self) -> str:
        """Sorted set of every file's objects ("<id> <segments>") by expiry time."""
        return f"{self.prefix}files:expiry"

    async def save(self, rec: FileRecord) -> None:
        """Write (or replace) a file's record; it expires with the file, whose
        objects :meth:`sweep` deletes then."""
        now = time.time()
        if rec.expires_at is None:
            rec.expires_at = int(now + self.cfg.retention_s)
        ttl = math.ceil(rec.expires_at - now)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(self._expiry(), {f"{rec.id} {rec.segments}": rec.expires_at})
            if ttl <= 0:  # already past its retention: only its objects are left to sweep
                pipe.delete(self._key(rec.id))
                pipe.zrem(self._index(rec.tenant), rec.id)
            else:
                pipe.set(self._key(rec.id), msgspec.json.encode(rec), ex=ttl)
                pipe.zadd(self._index(rec.tenant), {rec.id: rec.created_at})
                pipe.expire(self._index(rec.tenant), ttl, gt=True)
                pipe.expire(self._index(rec.tenant), ttl, nx=True)
            await pipe.execute()

    async def get(self, tenant: str, file_id: str) -> FileRecord | None:
        """The tenant's file ``file_id`` (None: none, or another tenant's)."""
        raw = await self.redis.get(self._key(file_id))
        if raw is None:
            return None
        rec = msgspec.json.decode(raw, type=FileRecord)
        return rec if rec.tenant == tenant else None

    async def list(
        self, tenant: str, after: str | None, limit: int
    ) -> tuple[list[FileRecord], bool]:
        """The tenant's files, newest first, after the file ``after``."""
        index = self._index(tenant)
        start = 0
        if after is not None:
            rank = await self.redis.zrevrank(index, after)
            start = rank + 1 if rank is not None else 0
        ids = [i.decode() for i in await self.redis.zrevrange(index, start, start + limit)]
        found = await self.redis.mget([self._key(i) for i in ids]) if ids else []
        gone = [i for i, raw in zip(ids, found, strict=True) if raw is None]
        if gone:
            await self.redis.zrem(index, *gone)
        recs = [msgspec.json.decode(raw, type=FileRecord) for raw in found if raw is not None]
        return recs[:limit], len(ids) > limit

    async def delete(self, rec: FileRecord) -> None:
        for name in rec.objects():
            await self.store.delete(name)
        await self.redis.delete(self._key(rec.id))
        await self.redis.zrem(self._index(rec.tenant), rec.id)
        await self.redis.zrem(self._expiry(), f"{rec.id} {rec.segments}")

    async def sweep(self, now: float, limit: int = 100) -> int:
        """Delete the objects of files past their retention; returns how many files."""
        due = await self.redis.zrangebyscore(self._expiry(), "-inf", now, start=0, num=limit)
        for member in due:
            file_id, _, segments = member.decode().partition(" ")
            rec = FileRecord(
                id=file_id,
                tenant="",
                purpose="",
                filename="",
                bytes=0,
                created_at=0,
                segments=int(segments or 0),
            )
            # A record saved again since (more segments, a later expiry) left this
            # member behind: the objects it still names are not this sweep's to delete.
            raw = await self.redis.get(self._key(file_id))
            live = msgspec.json.decode(raw, type=FileRecord) if raw is not None else None
            keep: set[str] = set()
            if live is not None and (live.expires_at is None or live.expires_at > now):
                keep = set(live.objects())
            elif live is not None:  # due, its key not yet expired (a second's rounding)
                await self.redis.delete(self._key(file_id))
            for name in rec.objects():
                if name not in keep:
                    await self.store.delete(name)
            await self.redis.zrem(self._expiry(), member)
        return len(due)

    async def content(self, rec: FileRecord, start: int = 0) -> AsyncIterator[bytes]:
        """The file's contents (from byte ``start`` of an uploaded file)."""
        if not rec.segments:
            async for chunk in self.store.read(f"files/{rec.id}", start):
                yield chunk
            return
        for name in rec.objects():
            async for chunk in self.store.read(name):
                yield chunk
