"""Batches (OpenAI's Batch API and Anthropic's Message Batches) on the broker's
queue: their state in Redis, shared by ingress (create, read, cancel) and the
batch driver in the worker processes (workers/batches.py), which runs them.

A batch is a hash ``batch:<id>``: ``spec`` (what it was created with, JSON) and
its progress, each a field of its own (status, timestamps, counts, the input's
read offset, the finished-lines stream's read position, the output's segments).
Its lines are async jobs of class ``batch``; the function that makes a job final
appends the job's id to the batch's stream ``batch:<id>:done``.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Mapping
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis

Api = Literal["openai", "anthropic"]

#: OpenAI's batch statuses (Anthropic's processing_status is derived from them).
VALIDATING = "validating"
IN_PROGRESS = "in_progress"
FINALIZING = "finalizing"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLING = "cancelling"
CANCELLED = "cancelled"
FINAL = frozenset((COMPLETED, FAILED, EXPIRED, CANCELLED))
RUNNING = frozenset((VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING))

ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings")
#: Anthropic batches run Messages requests.
MESSAGES = "/v1/messages"


class Spec(msgspec.Struct, kw_only=True):
    """What a batch was created with."""

    id: str
    tenant: str
    api: Api = "openai"
    #: The API key kept in Redis that created it ("" for a config key): its lines
    #: count in that key's usage.
    key_id: str = ""
    endpoint: str
    input_file_id: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    created_at: int
    expires_at: int
    webhook_url: str | None = None


class Batch(msgspec.Struct, kw_only=True):
    """A batch as read from Redis."""

    spec: Spec
    status: str
    total: int = 0
    #: Lines submitted as jobs, and the input's byte offset after the last of them.
    submitted: int = 0
    cursor: int = 0
    completed: int = 0
    failed: int = 0
    #: Lines cancelled or expired before they ran (written to the error file).
    dropped: int = 0
    #: The finished-lines stream's last entry taken into the output.
    done_id: str = "0-0"
    out_segments: int = 0
    out_bytes: int = 0
    err_segments: int = 0
    err_bytes: int = 0
    output_file_id: str | None = None
    error_file_id: str | None = None
    #: Validation errors: [{"code", "message", "param", "line"}].
    errors: list[dict[str, Any]] | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    @property
    def finished(self) -> int:
        return self.completed + self.failed + self.dropped


_INT_FIELDS = {
    "total", "submitted", "cursor", "completed", "failed", "dropped", "out_segments",
    "out_bytes", "err_segments", "err_bytes", "in_progress_at", "finalizing_at",
    "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
}  # fmt: skip


def _from_hash(raw: Mapping[bytes, bytes]) -> Batch:
    values: dict[str, Any] = {}
    for k, v in raw.items():
        name = k.decode()
        if name == "spec":
            values["spec"] = msgspec.json.decode(v, type=Spec)
        elif name == "errors":
            values["errors"] = msgspec.json.decode(v)
        elif name in _INT_FIELDS:
            values[name] = int(v)
        elif name in ("status", "done_id", "output_file_id", "error_file_id"):
            values[name] = v.decode()
    return Batch(**values)


def line_job_id(batch_id: str, line: int) -> str:
    """The job id of a batch's line: the same every time, so a line submitted twice
    (a driver that died in between) is one job."""
    return hashlib.sha256(f"{batch_id}:{line}".encode()).hexdigest()[:32]


def new_batch_id(api: Api) -> str:
    return ("batch_" if api == "openai" else "msgbatch_") + secrets.token_hex(12)


class BatchKeys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}batch:{batch_id}"

    def done(self, batch_id: str) -> str:
        """Stream of the batch's finished lines (job ids), in the order they finished."""
        return f"{self.prefix}batch:{batch_id}:done"

    def jobs(self, batch_id: str) -> str:
        """Sorted set of the batch's submitted jobs (its lines' index, not the tenant's)."""
        return f"{self.prefix}batch:{batch_id}:jobs"

    def lease(self, batch_id: str) -> str:
        """The driver process running the batch (a lease with a TTL)."""
        return f"{self.prefix}batch:{batch_id}:lease"

    def active(self) -> str:
        """Sorted set of the batches not final yet (score: creation time)."""
        return f"{self.prefix}batches:active"

    def tenant(self, tenant: str) -> str:
        """Sorted set of a tenant's batches of one API, newest last."""
        return f"{self.prefix}batches:{len(tenant)}:{tenant}"


class TooManyBatches(Exception):
    pass


class BatchStore:
    def __init__(self, redis: aioredis.Redis, prefix: str, retention_s: float) -> None:
        self.redis = redis
        self.k = BatchKeys(prefix)
        self.retention_s = int(retention_s)

    async def create(self, spec: Spec, max_in_progress: int) -> Batch:
        """A new batch, validating; refused when the tenant has ``max_in_progress``
        batches not final."""
        index = self.k.tenant(spec.tenant)
        running = 0
        for batch_id in await self.redis.zrevrange(index, 0, max_in_progress * 4):
            status = await self.redis.hget(self.k.batch(batch_id.decode()), "status")  # type: ignore[misc]
            running += status is not None and status.decode() in RUNNING
        if running >= max_in_progress:
            raise TooManyBatches(
                f"the tenant has {running} batches in progress, as many as allowed "
                f"({max_in_progress}); wait for one to end"
            )
        keep = spec.expires_at - int(time.time()) + self.retention_s
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                self.k.batch(spec.id),
                mapping={"spec": msgspec.json.encode(spec), "status": VALIDATING},
            )
            pipe.expire(self.k.batch(spec.id), keep)
            pipe.zadd(index, {spec.id: spec.created_at})
            pipe.expire(index, keep, gt=True)
            pipe.expire(index, keep, nx=True)
            pipe.zadd(self.k.active(), {spec.id: spec.created_at})
            await pipe.execute()
        return Batch(spec=spec, status=VALIDATING)

    async def get(self, batch_id: str, tenant: str | None = None) -> Batch | None:
        """The batch (None: none, or ``tenant``'s is another)."""
        raw = await self.redis.hgetall(self.k.batch(batch_id))  # type: ignore[misc]
        if not raw or b"spec" not in raw:
            return None
        batch = _from_hash(raw)
        if tenant is not None and batch.spec.tenant != tenant:
            return None
        return batch

    async def page(
        self, tenant: str, api: Api, after: str | None, limit: int
    ) -> tuple[list[Batch], bool]:
        """The tenant's batches of ``api``, newest first, after batch ``after``."""
        index = self.k.tenant(tenant)
        start = 0
        if after is not None:
            rank = await self.redis.zrevrank(index, after)
            start = rank + 1 if rank is not None else 0
        found: list[Batch] = []
        more = False
        while True:
            ids = await self.redis.zrevrange(index, start, start + 99)
            if not ids:
                break
            for batch_id in ids:
                batch = await self.get(batch_id.decode(), tenant)
                if batch is None:
                    await self.redis.zrem(index, batch_id)
                elif batch.spec.api == api:
                    if len(found) == limit:
                        return found, True
                    found.append(batch)
            start += len(ids)
        return found, more

    async def cancel(self, batch_id: str, tenant: str) -> Batch | None:
        """Ask the driver to cancel a running batch (it stops submitting lines and
        cancels those not done); a final batch is returned as it is."""
        key = self.k.batch(batch_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    batch = await self.get(batch_id, tenant)
                    if batch is None or batch.status not in (VALIDATING, IN_PROGRESS):
                        await pipe.unwatch()  # type: ignore[no-untyped-call]
                        return batch
                    pipe.multi()  # type: ignore[no-untyped-call]
                    now = int(time.time())
                    pipe.hset(key, mapping={"status": CANCELLING, "cancelling_at": now})
                    await pipe.execute()
                    batch.status, batch.cancelling_at = CANCELLING, now
                    return batch
                except aioredis.WatchError:
                    continue

    async def set_total(self, batch_id: str, total: int) -> None:
        await self.redis.hset(self.k.batch(batch_id), "total", str(total))  # type: ignore[misc]

    async def delete(self, batch: Batch) -> None:
        """Forget a final batch (Anthropic's DELETE)."""
        spec = batch.spec
        await self.redis.delete(self.k.batch(spec.id), self.k.done(spec.id), self.k.jobs(spec.id))
        await self.redis.zrem(self.k.tenant(spec.tenant), spec.id)
        await self.redis.zrem(self.k.active(), spec.id)


# ------------------------------------------------------------------ the objects


def openai_object(b: Batch) -> dict[str, Any]:
    s = b.spec
    errors = None
    if b.errors:
        errors = {"object": "list", "data": b.errors}
    return {
        "id": s.id,
        "object": "batch",
        "endpoint": s.endpoint,
        "errors": errors,
        "input_file_id": s.input_file_id,
        "completion_window": s.completion_window,
        "status": b.status,
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": s.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": s.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {
            "total": b.total,
            "completed": b.completed,
            "failed": b.failed + b.dropped,
        },
        "metadata": s.metadata,
    }


def _iso(t: int | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def anthropic_object(b: Batch, base: str = "") -> dict[str, Any]:
    """Anthropic's message batch object (``base``: the broker's URL, for results_url)."""
    s = b.spec
    ended = b.status in FINAL
    dropped_as = "expired" if b.status == EXPIRED else "canceled"
    counts = {
        "processing": 0 if ended else max(0, b.total - b.finished),
        "succeeded": b.completed,
        "errored": b.failed,
        "canceled": b.dropped if dropped_as == "canceled" else 0,
        "expired": b.dropped if dropped_as == "expired" else 0,
    }
    if b.status == FAILED:  # an input Anthropic would have refused up front
        counts["errored"] = max(b.total, 1)
    ended_at = b.completed_at or b.cancelled_at or b.expired_at or b.failed_at
    status = "ended" if ended else ("canceling" if b.status == CANCELLING else "in_progress")
    return {
        "id": s.id,
        "type": "message_batch",
        "processing_status": status,
        "request_counts": counts,
        "ended_at": _iso(ended_at),
        "created_at": _iso(s.created_at),
        "expires_at": _iso(s.expires_at),
        "archived_at": None,
        "cancel_initiated_at": _iso(b.cancelling_at),
        "results_url": f"{base}/v1/messages/batches/{s.id}/results" if ended else None,
    }


def webhook_event(b: Batch) -> bytes:
    """The Standard Webhooks event of a batch's end: ``batch.<status>`` with the
    batch object of its API."""
    data = openai_object(b) if b.spec.api == "openai" else anthropic_object(b)
    at = b.completed_at or b.failed_at or b.expired_at or b.cancelled_at or int(time.time())
    return msgspec.json.encode(
        {
            "type": f"batch.{b.status}",
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at)),
            "data": data,
        }
    )
