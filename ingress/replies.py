"""The reply reader: one task per ingress process reads this process's reply
stream and hands each entry to the request waiting for that job."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import msgspec
from redis.exceptions import ResponseError

from llm_broker.shared.config import Config
from llm_broker.shared.errors import Unavailable
from llm_broker.shared.keys import Keys
from llm_broker.shared.loop import LoopRef
from llm_broker.shared.redisio import (
    READ_AHEAD,
    REDIS_DOWN,
    Commands,
    Readers,
    raise_if_cancelling,
    stream_reader,
)
from llm_broker.shared.store import JobStore
from llm_broker.shared.store.jobs import REPLY_GROUP
from llm_broker.shared.store.records import Failure, Reply

log = logging.getLogger("llm_broker.ingress.replies")

#: How long each read blocks: a round of reads (READ_AHEAD, sent together) on an
#: idle stream ends in a second.
BLOCK_MS = 1000 // READ_AHEAD
#: What ends a round of reads but not the reader (a ResponseError only when Redis
#: lost the stream or its group: see _stream_lost).
_READ_ERRORS: tuple[type[Exception], ...] = (*REDIS_DOWN, ResponseError)


class Waiter:
    """The replies for one job, in order: a deque and a future to wake the reader;
    or, when its job was not admitted, the error that says so."""

    __slots__ = ("_error", "_items", "_loop", "_wakeup")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Reply] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def put(self, item: Reply) -> None:
        self._items.append(item)
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def fail(self, error: BaseException) -> None:
        """No reply will come: :meth:`get` raises ``error`` once the replies that
        came are taken."""
        self._error = error
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def get(self) -> Reply:
        while not self._items:
            if self._error is not None:
                raise self._error
            self._wakeup = self._loop.create_future()
            try:
                await self._wakeup
            finally:
                self._wakeup = None
        return self._items.popleft()


class ReplyRouter:
    """The replies for this process's waiting calls. On one Redis they come on one
    stream; on a Cluster on one per provider (a reply is written beside its job's
    record, on the shard of the provider that admitted it), each read by a loop of
    its own."""

    TTL_S = 120

    def __init__(self, config: Config, pod: str, *, cluster: bool = False) -> None:
        keys = Keys(config.redis.key_prefix, cluster=cluster)
        #: What a job names as where its replies go (``Job.reply_to``): this
        #: process's stream, or on a Cluster this process (the job store names the
        #: stream beside the job's record).
        self.reply_to = pod if cluster else keys.reply(pod)
        names = [keys.reply(pod, p) for p in config.providers] if cluster else [self.reply_to]
        self._cfg = config
        self._waiters: dict[bytes, Waiter] = {}
        self._streams = [_Stream(name, self._waiters) for name in names]
        #: The event loop, kept from the first use.
        self.loop = LoopRef()

    @property
    def healthy(self) -> bool:
        return all(s.healthy for s in self._streams)

    @property
    def stream_exists(self) -> bool:
        return all(s.ready.is_set() for s in self._streams)

    async def stream_ready(self, timeout: float) -> None:
        """Return once the reply streams exist (at once, but for the first moments
        of the process and while Redis is unreachable); TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            for s in self._streams:
                await s.ready.wait()

    def register(self, job_id: str) -> Waiter:
        waiter = Waiter(self.loop())
        self._waiters[job_id.encode()] = waiter
        return waiter

    def unregister(self, job_id: str) -> None:
        self._waiters.pop(job_id.encode(), None)

    def cut_off(self) -> int:
        """Answer every waiting call with a 503 that names its job: this process is
        shutting down, and the job goes on. Returns how many calls were waiting."""
        for job_id, waiter in self._waiters.items():
            err = Unavailable(
                f"this ingress process is shutting down; the request goes on as job "
                f"{job_id.decode()}: GET /v1/jobs/{job_id.decode()} gives its result",
                code="shutting_down",
            )
            waiter.put(Failure(503, msgspec.json.encode(err.body()), "1"))
        return len(self._waiters)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def run(self) -> None:
        await asyncio.gather(*(self._run(s) for s in self._streams))

    async def _run(self, stream: _Stream) -> None:
        reader = stream_reader(self._cfg.redis, BLOCK_MS, READ_AHEAD)
        next_refresh = next_trim = 0.0
        backoff = 0.05
        try:
            loop = self.loop()
            while True:
                raise_if_cancelling(loop)
                try:
                    now = time.monotonic()
                    if now >= next_refresh:
                        await stream.ensure(reader, self.TTL_S)
                        stream.ready.set()
                        next_refresh = now + self.TTL_S / 4
                    if stream.rewind:
                        await stream.set_group(reader)
                    if now >= next_trim:
                        # Entries up to the last one read are done with.
                        await reader.call("XTRIM", stream.name, "MINID", "~", stream.last_id)
                        next_trim = now + 1.0
                    await stream.read_until(reader, min(next_refresh, next_trim))
                    backoff = 0.05
                except _READ_ERRORS as e:
                    raise_if_cancelling(loop)
                    if isinstance(e, ResponseError) and not _stream_lost(e):
                        raise
                    if stream.healthy:
                        log.warning("reply reader: Redis unreachable or emptied: %s", e)
                    stream.healthy = False
                    stream.ready.clear()  # Redis may come back without it
                    stream.rewind = True  # reads may have been lost with the connection
                    next_refresh = 0.0
                    await asyncio.sleep(backoff)  # back off while Redis is unreachable
                    backoff = min(backoff * 2, 1.0)
        finally:
            await reader.close(wait=False)


def _stream_lost(e: ResponseError) -> bool:
    """Whether Redis lost the stream or its group (emptied while connected)."""
    text = str(e)
    return text.startswith("NOGROUP") or "requires the key to exist" in text


class _Stream:
    """One reply stream and how far it was read."""

    def __init__(self, name: str, waiters: dict[bytes, Waiter]) -> None:
        self.name = name
        self._waiters = waiters
        self.last_id = b"0-0"
        #: The group's place is to be set to ``last_id`` before the next read: at
        #: first, and after a Redis error (a read's entries may have been delivered
        #: and lost with the connection).
        self.rewind = True
        self.healthy = False
        #: Set while the stream is known to exist: workers never create it (their
        #: replies to a missing stream are dropped), so a call waits for it.
        self.ready = asyncio.Event()

    async def ensure(self, reader: Commands, ttl_s: int) -> None:
        """Create the stream (workers never create it) and refresh its TTL."""
        if not await reader.call("EXPIRE", self.name, ttl_s):
            await reader.call("XADD", self.name, "*", "k", "init")
            await reader.call("EXPIRE", self.name, ttl_s)
            log.info("reply stream %s created", self.name)

    async def set_group(self, reader: Commands) -> None:
        """Set the reader's group to read after the last entry read (made if missing)."""
        try:
            await reader.call("XGROUP SETID", self.name, REPLY_GROUP, self.last_id)
        except ResponseError as e:
            if not str(e).startswith("NOGROUP"):
                raise
            await reader.call("XGROUP CREATE", self.name, REPLY_GROUP, self.last_id)
        self.rewind = False

    def read_until(self, reader: Readers, until: float) -> asyncio.Future[None]:
        """Read the replies, each handed to its waiter in the step that reads it
        (:meth:`Batcher.reads`), until ``until`` (monotonic time) or a Redis error (the
        future's). No task switch per read: on a lightly loaded process each was a
        loop turn on every reply's way."""

        def next_read() -> tuple[Any, ...] | None:
            if time.monotonic() >= until:
                return None
            return JobStore.next_replies_command(self.name, BLOCK_MS)

        return reader.reads(next_read, self._route, ahead=READ_AHEAD)

    def _route(self, batches: Any) -> None:
        self.healthy = True
        for entry_id, job_id, reply in JobStore.decode_replies(self.name, batches):
            self.last_id = entry_id
            waiter = self._waiters.get(job_id)
            if waiter is not None:
                waiter.put(reply)
