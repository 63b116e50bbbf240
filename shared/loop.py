"""The event loop, asked for once.

On Python 3.11 every ``asyncio.get_running_loop()`` is a system call (a getpid, to
tell a forked child's loop), and ``asyncio.timeout`` asks for the loop three times
(the loop, the current task, the timer). On the request path of ingress and
workers those calls were most of the system calls per request. :class:`LoopRef`
keeps the loop from its first use; :class:`Expiry` is ``asyncio.timeout_at`` with
the loop given.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class LoopRef:
    """``ref()`` is the running event loop, asked for at the first call only (an
    object made outside the loop it will serve binds on first use)."""

    __slots__ = ("_loop",)

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None

    def __call__(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop


class Expiry:
    """``async with Expiry(loop, when):`` cancels the task at loop time ``when`` and
    raises ``TimeoutError`` out of the block, as ``asyncio.timeout_at(when)`` does
    (a cancellation from elsewhere stays a cancellation)."""

    __slots__ = ("_cancelling", "_handle", "_loop", "_task", "_when", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._loop = loop
        self._when = when
        self._task: asyncio.Task[object] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._cancelling = 0
        #: Whether the block was cut short by this expiry.
        self.expired = False

    async def __aenter__(self) -> Expiry:
        task = asyncio.current_task(self._loop)  # with the loop given: no system call
        if task is None:
            raise RuntimeError("Expiry must be used inside a task")
        self._task = task
        self._cancelling = task.cancelling()
        self._handle = self._loop.call_at(self._when, self._expire)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.expired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def _expire(self) -> None:
        assert self._task is not None
        self._task.cancel()
        self.expired = True
        self._handle = None
