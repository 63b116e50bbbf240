"""A provider queue's stream and its consumer group: what workers read, reclaim
and hold (the entries' leases), and the group's consumers."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llm_broker.shared import messages as m
from llm_broker.shared.config import PRIORITIES
from llm_broker.shared.keys import GROUP, Keys
from llm_broker.shared.redisio import Commands, ensure_group
from llm_broker.shared.store.values import Delivery


class Queues:
    def __init__(self, keys: Keys, redis: aioredis.Redis, max_deliveries: int) -> None:
        self.keys = keys
        self._redis = redis
        self._max_deliveries = max_deliveries

    async def ensure_group(self, provider: str) -> None:
        """Create the provider's consumer group (and its stream) unless it exists."""
        await ensure_group(self._redis, self.keys.queue(provider), GROUP)

    async def read(
        self, reader: Commands, provider: str, consumer: str, *, count: int, block_ms: int
    ) -> list[Delivery]:
        """New entries for ``consumer`` (first deliveries), blocking up to ``block_ms``;
        ``reader`` is the reader's own connection."""
        batches = await reader.call(*self.read_command(provider, consumer, count, block_ms))
        return self.deliveries(provider, batches)

    def read_command(
        self, provider: str, consumer: str, count: int, block_ms: int
    ) -> tuple[Any, ...]:
        """The blocking read of :meth:`read`."""
        return (
            "XREADGROUP", "GROUP", GROUP, consumer, "COUNT", count, "BLOCK", block_ms,
            "STREAMS", self.keys.queue(provider), ">",
        )  # fmt: skip

    @staticmethod
    def deliveries(provider: str, batches: Any) -> list[Delivery]:
        """:meth:`read_command`'s answer as deliveries."""
        return [
            _delivery(provider, entry_id, fields, 1)
            for _stream, entries in batches or ()
            for entry_id, fields in entries
        ]

    async def reclaim(
        self, provider: str, consumer: str, *, idle_ms: int, count: int, start: bytes = b"0-0"
    ) -> tuple[bytes, list[Delivery]]:
        """Entries idle longer than ``idle_ms`` (their worker died), now ``consumer``'s,
        looked for from ``start`` on; and where the next look starts (``0-0`` once
        the pending entries were all seen: Redis looks at ten per entry asked for)."""
        queue = self.keys.queue(provider)
        after, claimed, _deleted = await self._redis.xautoclaim(
            queue, GROUP, consumer, idle_ms, start, count=count
        )
        if not claimed:
            return after, []
        async with self._redis.pipeline(transaction=False) as pipe:
            for entry_id, _ in claimed:
                pipe.xpending_range(queue, GROUP, entry_id, entry_id, 1)
            pending = await pipe.execute()
        too_many = self._max_deliveries + 1
        return after, [
            _delivery(
                provider, entry_id, fields or {}, info[0]["times_delivered"] if info else too_many
            )
            for (entry_id, fields), info in zip(claimed, pending, strict=True)
        ]

    async def refresh(self, provider: str, consumer: str, entry_ids: set[str]) -> None:
        """Reset the idle time of those of ``entry_ids`` that ``consumer`` still owns.

        Only entries still owned are touched: XCLAIM would otherwise take back an
        entry that another worker reclaimed while this one was stalled.
        """
        queue = self.keys.queue(provider)
        owned = await self._redis.xpending_range(
            # Entries left pending without a running job (Redis was down when they
            # started or settled) come first: look past them.
            queue,
            GROUP,
            "-",
            "+",
            len(entry_ids) + 1000,
            consumername=consumer,
        )
        ids = [p["message_id"] for p in owned if p["message_id"].decode() in entry_ids]
        if ids:
            await self._redis.xclaim(queue, GROUP, consumer, 0, ids, justid=True)

    async def forget_consumers(self, provider: str, consumer: str, idle_ms: float) -> list[str]:
        """Remove the group's other consumers that hold nothing and sat idle longer
        than ``idle_ms`` (dead workers'); returns their names."""
        queue = self.keys.queue(provider)
        removed = []
        for found in await self._redis.xinfo_consumers(queue, GROUP):
            name = found["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name != consumer and found["pending"] == 0 and found["idle"] > idle_ms:
                await self._redis.xgroup_delconsumer(queue, GROUP, name)
                removed.append(name)
        return removed


def _delivery(
    provider: str, entry_id: bytes, fields: dict[bytes, bytes], deliveries: int
) -> Delivery:
    raw = fields.get(b"j", b"")
    try:
        job: m.Job | None = m.job_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError, ValueError, TypeError):
        # Whatever an entry holds, it costs that entry only (dead-lettered as no
        # job), never the loop that read it.
        job = None
    return Delivery(
        provider=provider, entry_id=entry_id.decode(), job=job, raw=raw, deliveries=deliveries
    )


class Waiting(msgspec.Struct, frozen=True):
    """One priority class of a provider: the jobs waiting, and the oldest one's age."""

    priority: str
    count: int
    oldest_s: float


class Backlog(msgspec.Struct, frozen=True):
    """A provider's backlog: the stream's length, its entries held by workers
    (pending) and not yet read (lag), and what waits per class."""

    stream: int
    pending: int
    lag: int
    waiting: list[Waiting]

    @property
    def depth(self) -> int:
        """Everything admitted and not finished: waiting, in the stream or running."""
        return self.stream + sum(w.count for w in self.waiting)


async def backlog(batcher: Commands, keys: Keys, provider: str, now: float) -> Backlog:
    """Read a provider's backlog (a few commands, pipelined by the batcher)."""
    queue = keys.queue(provider)

    async def groups() -> Any:
        try:
            return await batcher.call("XINFO", "GROUPS", queue)
        except ResponseError:  # no stream yet
            return []

    indexes = [keys.waiting_index(provider, c) for c in PRIORITIES]
    length, found, *waiting = await asyncio.gather(
        batcher.call("XLEN", queue),
        groups(),
        *(batcher.call("ZCARD", i) for i in indexes),
        *(batcher.call("ZRANGE", i, 0, 0, "WITHSCORES") for i in indexes),
    )
    pending = lag = 0
    for group in found:
        pairs = (
            group.items() if isinstance(group, dict) else zip(group[::2], group[1::2], strict=True)
        )
        info = {_text(k): v for k, v in pairs}
        if _text(info.get("name")) == GROUP:
            pending = int(info.get("pending") or 0)
            lag = int(info.get("lag") or 0)
    counts, oldest = waiting[: len(PRIORITIES)], waiting[len(PRIORITIES) :]
    classes = [
        # (a flat [member, score] pair: the command was sent as it is)
        Waiting(priority, int(count), max(0.0, now - float(first[1])) if first else 0.0)
        for priority, count, first in zip(PRIORITIES, counts, oldest, strict=True)
    ]
    return Backlog(int(length), pending, lag, classes)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
