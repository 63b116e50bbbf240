"""shared/loop.py: Expiry behaves as asyncio.timeout_at, with the loop given; Deadlines
expire entries never early and at most a grain late, and not once dropped."""

from __future__ import annotations

import asyncio

import pytest

from llm_broker.shared.loop import GRAIN_S, NEAR_S, Deadlines, Expiry, LoopRef


async def test_a_block_past_its_time_raises_timeout_error_and_leaves_the_task_uncancelled() -> None:
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with Expiry(Deadlines(loop), started + 0.05) as expiry:
            await never
    assert expiry.expired
    assert loop.time() - started >= 0.05
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_block_done_in_time_is_left_alone() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    async with Expiry(deadlines, loop.time() + 0.05) as expiry:
        pass
    assert len(deadlines) == 0
    # The timer is gone: waiting past the time does not cancel this task.
    done: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.1, done.set_result, None)
    await done
    assert not expiry.expired


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    loop = asyncio.get_running_loop()
    inside: asyncio.Future[None] = loop.create_future()

    async def body() -> None:
        async with Expiry(Deadlines(loop), loop.time() + 10):
            inside.set_result(None)
            await loop.create_future()

    task = loop.create_task(body())
    await inside
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_the_ref_is_the_running_loop() -> None:
    ref = LoopRef()
    assert ref() is asyncio.get_running_loop()
    assert ref() is ref()


class _Entry:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.at: float | None = None
        self.fired = loop.create_future()

    def expire(self) -> None:
        self.at = self.loop.time()
        self.fired.set_result(None)


async def test_deadlines_fire_never_early_and_at_most_a_grain_late() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    now = loop.time()
    entries = [(now + d, _Entry(loop)) for d in (0.013, 0.0131, 0.03, 0.031)]
    for when, entry in entries:
        deadlines.add(when, entry)
    await asyncio.gather(*(entry.fired for _, entry in entries))
    for when, entry in entries:
        assert entry.at is not None
        assert when <= entry.at
        # a grain, plus a loop turn's slack on a busy machine
        assert entry.at - when < GRAIN_S + 0.05
    assert len(deadlines) == 0


async def test_a_dropped_deadline_does_not_fire_and_its_neighbours_do() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    when = loop.time() + 0.02
    kept, dropped = _Entry(loop), _Entry(loop)
    deadlines.add(when, kept)
    key = deadlines.add(when, dropped)
    deadlines.drop(key, dropped)
    assert len(deadlines) == 1
    await kept.fired
    # Its bucket has fired: dropped never will.
    assert not dropped.fired.done()
    assert len(deadlines) == 0
    deadlines.drop(key, kept)  # after it fired: nothing


async def test_a_deadline_in_the_past_fires_on_the_next_turns() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    entry = _Entry(loop)
    deadlines.add(loop.time() - 5, entry)
    await asyncio.wait_for(entry.fired, 1)


async def test_the_ref_keeps_one_deadlines_on_its_loop() -> None:
    ref = LoopRef()
    assert ref.deadlines() is ref.deadlines()
    assert ref.deadlines().loop is asyncio.get_running_loop()


async def test_a_far_deadline_goes_in_a_wider_bucket_that_ends_at_or_after_it() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    now = loop.time()
    for ahead, width in ((0.5, GRAIN_S), (NEAR_S * 5, GRAIN_S * 10), (NEAR_S * 60, GRAIN_S * 100)):
        when = now + ahead
        end = deadlines.add(when, _Entry(loop)) * GRAIN_S
        assert when <= end < when + width + 1e-9, (ahead, end - when)


async def test_dropped_deadlines_of_a_long_timeout_leave_few_buckets_behind() -> None:
    """Calls with a 10-minute timeout whose deadlines fall 2 ms apart over 10 s: their
    empty buckets (each waits for its time) are 1 s wide, about ten."""
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    now = loop.time()
    for i in range(5000):
        entry = _Entry(loop)
        deadlines.drop(deadlines.add(now + 600 + i * 0.002, entry), entry)
    assert len(deadlines) == 0
    assert deadlines.buckets() <= 11
