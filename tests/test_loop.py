"""shared/loop.py: Expiry behaves as asyncio.timeout_at, with the loop given."""

from __future__ import annotations

import asyncio

import pytest

from llm_broker.shared.loop import Expiry, LoopRef


async def test_a_block_past_its_time_raises_timeout_error_and_leaves_the_task_uncancelled() -> None:
    loop = asyncio.get_running_loop()
    never: asyncio.Future[None] = loop.create_future()
    started = loop.time()
    with pytest.raises(TimeoutError):
        async with Expiry(loop, started + 0.05) as expiry:
            await never
    assert expiry.expired
    assert loop.time() - started >= 0.05
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_block_done_in_time_is_left_alone() -> None:
    loop = asyncio.get_running_loop()
    async with Expiry(loop, loop.time() + 0.05) as expiry:
        pass
    # The timer is gone: waiting past the time does not cancel this task.
    done: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.1, done.set_result, None)
    await done
    assert not expiry.expired


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    loop = asyncio.get_running_loop()
    inside: asyncio.Future[None] = loop.create_future()

    async def body() -> None:
        async with Expiry(loop, loop.time() + 10):
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
