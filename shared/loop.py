"""The event loop, asked for once.

On Python 3.11 every ``asyncio.get_running_loop()`` is a system call (a getpid, to
tell a forked child's loop), and ``asyncio.timeout`` asks for the loop three times
(the loop, the current task, the timer). On the request path of ingress and
workers those calls were most of the system calls per request. :class:`LoopRef`
keeps the loop from its first use; :class:`Expiry` is ``asyncio.timeout_at`` with
the loop given.

Deadlines that are nearly always cancelled before they pass (a call's timeout, a
Redis round trip's) go to :class:`Deadlines`, not to a loop timer each: uvloop
makes, starts, stops and closes a libuv timer for every ``call_at`` and its
cancel: 5.3 µs a pair on a busy machine, where a dict's add and pop cost an
eighth of that.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType
from typing import Protocol


class LoopRef:
    """``ref()`` is the running event loop, asked for at the first call only (an
    object made outside the loop it will serve binds on first use);
    ``ref.deadlines()`` is a :class:`Deadlines` on it, made at the first call."""

    __slots__ = ("_deadlines", "_loop")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: Deadlines | None = None

    def __call__(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def deadlines(self) -> Deadlines:
        found = self._deadlines
        if found is None:
            found = self._deadlines = Deadlines(self())
        return found


class Expiring(Protocol):
    def expire(self) -> None: ...


#: The width of a :class:`Deadlines` bucket, in seconds, for a deadline less than
#: :data:`NEAR_S` away: how late it may fire. A deadline further away goes in a
#: bucket ten times as wide (a hundred times beyond ten times that).
GRAIN_S = 0.01
NEAR_S = 10.0


class Deadlines:
    """Loop-time deadlines in buckets: an entry goes in the bucket that ends at the
    first boundary at or after its time, boundaries :data:`GRAIN_S` apart for a
    deadline less than :data:`NEAR_S` away, ten times as far apart for one up to ten
    times that, a hundred times beyond; one loop timer per bucket (made with the
    bucket's first entry) calls ``expire()`` on the entries still in it. An entry
    never expires early, and late by at most its bucket's width: 10 ms under 10 s,
    100 ms under 100 s, 1 s beyond (a hundredth of its timeout at most, past the
    first 10 ms). Dropping it (:meth:`drop`) is a dict operation.

    A bucket whose entries were all dropped stays, with its timer, until its time:
    the wider buckets of far deadlines (a call's timeout of minutes) keep that to
    about a thousand buckets for each range of distances."""

    __slots__ = ("_buckets", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: In units of GRAIN_S: the bucket's end -> its entries.
        self._buckets: dict[int, dict[Expiring, None]] = {}

    def add(self, when: float, entry: Expiring) -> int:
        """Expire ``entry`` at loop time ``when``; returns its bucket, for :meth:`drop`."""
        key = math.ceil(when / GRAIN_S)
        ahead = when - self.loop.time()
        if ahead >= NEAR_S:
            width = 10 if ahead < 10 * NEAR_S else 100
            key = -(-key // width) * width
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            self.loop.call_at(key * GRAIN_S, self._fire, key)
        bucket[entry] = None
        return key

    def drop(self, key: int, entry: Expiring) -> None:
        """``entry`` does not expire after all (nothing if it has already)."""
        bucket = self._buckets.get(key)
        if bucket is not None:
            bucket.pop(entry, None)

    def _fire(self, key: int) -> None:
        for entry in self._buckets.pop(key, ()):
            entry.expire()

    def __len__(self) -> int:
        """Entries waiting to expire (for tests)."""
        return sum(map(len, self._buckets.values()))

    def buckets(self) -> int:
        """Buckets whose time has not come, empty ones included (for tests)."""
        return len(self._buckets)


class Expiry:
    """``async with Expiry(deadlines, when):`` cancels the task at loop time ``when``
    (a little later: see :class:`Deadlines`) and raises ``TimeoutError`` out of the block, as
    ``asyncio.timeout_at(when)`` does (a cancellation from elsewhere stays a
    cancellation)."""

    __slots__ = ("_cancelling", "_deadlines", "_key", "_task", "_when", "expired")

    def __init__(self, deadlines: Deadlines, when: float) -> None:
        self._deadlines = deadlines
        self._when = when
        self._task: asyncio.Task[object] | None = None
        self._key: int | None = None
        self._cancelling = 0
        #: Whether the block was cut short by this expiry.
        self.expired = False

    async def __aenter__(self) -> Expiry:
        # With the loop given: no system call.
        task = asyncio.current_task(self._deadlines.loop)
        if task is None:
            raise RuntimeError("Expiry must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._key = self._deadlines.add(self._when, self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._key is not None:
            self._deadlines.drop(self._key, self)
            self._key = None
        if self.expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def expire(self) -> None:
        assert self._task is not None
        self._task.cancel()
        self.expired = True
        self._key = None
