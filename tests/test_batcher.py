"""The Redis command batcher: pipelining under load, bounded waits when Redis hangs.

Against the session's real Redis: a Redis that "hangs" is one stopped with
SIGSTOP (it accepts the bytes and answers nothing until SIGCONT).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from llm_broker.shared.redisio import (
    MAX_MERGED,
    Batcher,
    Library,
    Mergeable,
    NotSent,
    maybe_ran,
)
from tests.conftest import RedisServer


class RoundTrips:
    """Counts round trips (the batcher's round-trip observer)."""

    def __init__(self) -> None:
        self.count = 0

    def observe(self, amount: float) -> None:
        self.count += 1


@contextmanager
def stopped(server: RedisServer) -> Iterator[None]:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


@pytest.fixture
async def client(redis_up: RedisServer) -> AsyncIterator[aioredis.Redis]:
    found = aioredis.Redis.from_url(redis_up.url)
    yield found
    await found.aclose()


async def turns(n: int = 10) -> None:
    """Let the event loop take ``n`` turns (no wall-clock wait)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def test_commands_issued_during_a_round_trip_share_the_next_one(
    client: aioredis.Redis, redis_up: RedisServer
) -> None:
    trips = RoundTrips()
    batcher = Batcher(client, timeout=5, round_trip=trips)
    assert await batcher.call("PING") is True  # connected
    with stopped(redis_up):
        first = batcher.call("ECHO", "a")
        await turns()  # "a" is on the wire, alone: nothing else was called
        later = [batcher.call("ECHO", str(i)) for i in range(50)]
        await turns()
        assert not first.done()
    assert await first == b"a"
    assert await asyncio.gather(*later) == [str(i).encode() for i in range(50)]
    assert trips.count == 3  # PING, "a", then the 50 together
    await batcher.close()


async def test_every_call_fails_within_its_timeout_when_redis_hangs(
    client: aioredis.Redis, redis_up: RedisServer
) -> None:
    batcher = Batcher(client, timeout=0.3)
    await batcher.call("PING")
    with stopped(redis_up):
        started = time.monotonic()
        first = batcher.call("ECHO", "a")
        await asyncio.sleep(0.2)  # the stimulus: a second call while the first hangs
        second = batcher.call("ECHO", "b")  # waits behind the hung round trip
        with pytest.raises(TimeoutError) as sent:
            await first
        with pytest.raises(NotSent) as waited:
            await second
        # The second call gave up 0.3 s after it was made, not 0.3 s after the first failed.
        assert time.monotonic() - started < 0.2 + 0.3 + 0.15
    assert maybe_ran(sent.value)  # it left: Redis may have run it
    assert not maybe_ran(waited.value)  # it never left
    # Redis is back: the batcher makes a new connection and goes on.
    assert await batcher.call("ECHO", "c") == b"c"
    await batcher.close()


async def test_a_late_event_loop_does_not_make_a_round_trip_time_out(
    client: aioredis.Redis, redis_up: RedisServer
) -> None:
    """While the process's own event loop is late, a round trip past its timeout
    waits on (its reply may be sitting unread); once the loop is on time again, or
    after ten timeouts, it times out."""
    lag = {"s": 1.0}
    batcher = Batcher(client, timeout=0.1, lag=lambda: lag["s"])
    await batcher.call("PING")
    ok_before = batcher.last_ok
    loop = asyncio.get_running_loop()
    assert redis_up.proc is not None
    redis_up.proc.send_signal(signal.SIGSTOP)
    # Held well past its 0.1 s timeout while the loop says it is 1 s late.
    loop.call_later(0.35, redis_up.proc.send_signal, signal.SIGCONT)
    assert await batcher.call("ECHO", "a") == b"a"
    assert batcher.last_ok > ok_before

    with stopped(redis_up):
        started = time.monotonic()
        call = batcher.call("ECHO", "b")
        loop.call_later(0.25, lag.update, {"s": 0.0})  # the loop catches up
        with pytest.raises(TimeoutError):
            await call
        assert 0.25 <= time.monotonic() - started < 0.25 + 0.1 + 0.15
    await batcher.close()


async def test_a_lost_connection_fails_what_was_sent_and_the_next_call_reconnects(
    client: aioredis.Redis, redis_up: RedisServer
) -> None:
    """Redis killed under a round trip: its callers hear of a lost connection (which
    may have run); once Redis is back, the next call succeeds on a new connection."""
    batcher = Batcher(client, timeout=5)
    await batcher.call("PING")
    assert redis_up.proc is not None
    redis_up.proc.send_signal(signal.SIGSTOP)
    call = batcher.call("ECHO", "a")
    await turns()  # on the wire
    redis_up.stop(signal.SIGKILL)
    with pytest.raises(RedisConnectionError) as lost:
        await call
    assert maybe_ran(lost.value)
    with pytest.raises(RedisConnectionError) as refused:
        await batcher.call("ECHO", "b")  # Redis is down: nothing was sent
    assert not maybe_ran(refused.value)
    redis_up.start()
    assert await batcher.call("ECHO", "c") == b"c"
    await batcher.close()


async def test_closing_waits_for_the_round_trip_on_the_wire(
    client: aioredis.Redis, redis_up: RedisServer
) -> None:
    batcher = Batcher(client, timeout=5)
    await batcher.call("PING")
    with stopped(redis_up):
        call = batcher.call("ECHO", "a")
        await turns()
        queued = batcher.call("ECHO", "b")  # waits for the round trip on the wire
        closing = asyncio.ensure_future(batcher.close())
        await turns()
        assert not closing.done()
    await closing
    assert call.result() == b"a"
    assert queued.result() == b"b"  # called before close: it left too
    with pytest.raises(NotSent) as closed:
        await batcher.call("PING")
    assert not maybe_ran(closed.value)


async def test_an_argument_redis_cannot_carry_fails_its_call_at_once(
    client: aioredis.Redis,
) -> None:
    batcher = Batcher(client, timeout=5)
    started = time.monotonic()
    with pytest.raises(TypeError):
        await batcher.call("ECHO", None)
    assert time.monotonic() - started < 1
    assert await batcher.call("ECHO", "a") == b"a"
    await batcher.close()


async def test_call_then_answers_in_the_step_that_reads_the_reply(client: aioredis.Redis) -> None:
    """A reader's callback runs as the reply is read, outside any task (an awaited
    call resumes its task a loop turn later); Redis's error reaches it as the error."""
    batcher = Batcher(client, timeout=5)
    heard: list[tuple[object, object, object]] = []
    done = asyncio.get_running_loop().create_future()

    def then(result: object, error: BaseException | None) -> None:
        heard.append((result, type(error) if error else None, asyncio.current_task()))
        if len(heard) == 2:
            done.set_result(None)

    try:
        batcher.call_then(then, "ECHO", "hello")
        batcher.call_then(then, "INCR", "no-such-command-argument", "extra")
        await asyncio.wait_for(done, 5)
    finally:
        await batcher.close()
    assert heard[0] == (b"hello", None, None)
    assert heard[1] == (None, ResponseError, None)


async def test_reads_send_each_next_command_until_told_to_stop(client: aioredis.Redis) -> None:
    batcher = Batcher(client, timeout=5)
    handled: list[object] = []
    commands = [("ECHO", "a"), ("ECHO", "b"), ("ECHO", "c")]
    try:
        await asyncio.wait_for(
            batcher.reads(lambda: commands.pop(0) if commands else None, handled.append), 5
        )
        assert handled == [b"a", b"b", b"c"]
        # A Redis error ends the reads with it.
        failing = [("INCR", "too", "many")]
        with pytest.raises(ResponseError):
            await asyncio.wait_for(
                batcher.reads(lambda: failing.pop(0) if failing else None, handled.append), 5
            )
        assert handled == [b"a", b"b", b"c"]
    finally:
        await batcher.close()


async def test_a_readers_own_error_ends_its_reads_with_that_error(client: aioredis.Redis) -> None:
    """A defect in what a reader does with an answer ends the reads (as it would end
    a loop) instead of leaving them waiting for an answer that never comes."""
    batcher = Batcher(client, timeout=5)
    commands = [("ECHO", "a"), ("ECHO", "b")]

    def handle(result: object) -> None:
        raise ValueError(f"cannot use {result!r}")

    try:
        with pytest.raises(ValueError, match="cannot use b'a'"):
            await asyncio.wait_for(
                batcher.reads(lambda: commands.pop(0) if commands else None, handle), 5
            )
        assert commands == [("ECHO", "b")]  # nothing more was asked
    finally:
        await batcher.close()


async def test_reads_ahead_leave_together_and_each_answer_is_handled_as_it_comes(
    client: aioredis.Redis,
) -> None:
    """Reads sent ``ahead`` at a time leave in one write (a round trip), Redis runs
    each when the one before has answered, and each answer is handled as it
    arrives, not when the round ends; the next round leaves once all have answered,
    and the reads end when told to, after those sent have answered."""
    trips = RoundTrips()
    batcher = Batcher(client, timeout=30, round_trip=trips)
    await client.xgroup_create("ahead", "g", "$", mkstream=True)
    read = ("XREADGROUP", "GROUP", "g", "c", "COUNT", 1, "BLOCK", 5000, "STREAMS", "ahead", ">")
    reads_left = 5
    handled: list[bytes] = []
    got = asyncio.Event()

    def next_read() -> tuple[object, ...] | None:
        nonlocal reads_left
        if not reads_left:
            return None
        reads_left -= 1
        return read

    def handle(batches: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]) -> None:
        ((_stream, entries),) = batches
        ((_entry_id, fields),) = entries
        handled.append(fields[b"n"])
        got.set()

    try:
        reads = batcher.reads(next_read, handle, ahead=3)
        for n in range(5):
            await client.xadd("ahead", {"n": n})
            while len(handled) <= n:  # each answer before the next entry exists
                await asyncio.wait_for(got.wait(), 5)
                got.clear()
            assert reads.done() == (n == 4)
        await asyncio.wait_for(reads, 5)
    finally:
        await batcher.close()
    assert handled == [b"0", b"1", b"2", b"3", b"4"]
    assert trips.count == 2  # three reads in the first write, the last two in the second


@pytest.mark.parametrize("behind_tasks", [False, True])
async def test_reads_behind_tasks_let_the_started_tasks_write_first(
    client: aioredis.Redis, behind_tasks: bool
) -> None:
    """A worker's next queue read waits behind the jobs it started: what a job
    sends in its first steps reaches Redis before the read. Here the job's SET
    precedes the next read (a GET of its key) only with behind_tasks."""
    batcher = Batcher(client, timeout=5)
    key = f"behind-{behind_tasks}"
    commands = [("ECHO", "a"), ("GET", key)]
    handled: list[object] = []
    started: list[asyncio.Task[object]] = []

    async def job() -> object:
        return await batcher.call("SET", key, "set")

    def handle(result: object) -> None:
        handled.append(result)
        if result == b"a":
            started.append(asyncio.get_running_loop().create_task(job()))

    try:
        await asyncio.wait_for(
            batcher.reads(
                lambda: commands.pop(0) if commands else None, handle, behind_tasks=behind_tasks
            ),
            5,
        )
        await asyncio.wait_for(started[0], 5)
    finally:
        await batcher.close()
    assert handled == ([b"a", b"set"] if behind_tasks else [b"a", None])


@pytest.mark.parametrize("quiet", [False, True])
async def test_a_quiet_process_sends_a_command_at_once(client: aioredis.Redis, quiet: bool) -> None:
    """On a quiet process a command called while nothing is on the wire leaves in
    the step that calls it (the next one, called in the same step, follows once its
    round trip ends); otherwise both leave together at the end of the loop turn."""
    trips = RoundTrips()
    batcher = Batcher(client, timeout=5, round_trip=trips)
    batcher.quiet = lambda: quiet
    try:
        assert await batcher.call("PING") is True  # connected
        first = batcher.call("ECHO", "a")
        second = batcher.call("ECHO", "b")
        assert [await first, await second] == [b"a", b"b"]
    finally:
        await batcher.close()
    assert trips.count == (3 if quiet else 2)


#: A function and its batch form (as the job store's enqueue and settle have): each
#: call adds to its key and notes which form ran.
MERGE_LIBRARY = Library(
    "batchertest",
    "",
    {
        "add": "redis.call('SET', KEYS[2], 'one')\nreturn redis.call('INCRBY', KEYS[1], ARGV[1])",
        "add_many": """
local answers, p = {}, 1
for i = 1, #KEYS / 2 do
  redis.call('SET', KEYS[2 * i], 'many')
  answers[i] = redis.call('INCRBY', KEYS[2 * i - 1], ARGV[p + 1])
  p = p + tonumber(ARGV[p]) + 1
end
return answers
""",
    },
)
ADD = Mergeable(MERGE_LIBRARY["add"], MERGE_LIBRARY["add_many"])


async def test_merged_calls_that_leave_together_are_one_call_each_with_its_answer(
    client: aioredis.Redis,
) -> None:
    """Calls of a mergeable function made in one turn leave as one call of its batch
    form, sent again once its library is loaded (Redis did not know it); each caller
    gets its own answer. A call alone leaves as the function itself."""
    await client.delete("m:a", "m:b", "m:form")
    try:
        await client.function_delete(MERGE_LIBRARY.name)  # type: ignore[misc]
    except ResponseError:
        pass  # (not loaded)
    trips = RoundTrips()
    batcher = Batcher(client, timeout=5, round_trip=trips)
    try:
        calls = [
            batcher.call_merged(ADD, (key, "m:form"), (amount,))
            for key, amount in (("m:a", 1), ("m:b", 10), ("m:a", 2))
        ]
        assert await asyncio.gather(*calls) == [1, 10, 3]
        assert await client.get("m:form") == b"many"
        assert trips.count == 2  # the call Redis did not know, then again
        assert await batcher.call_merged(ADD, ("m:b", "m:form"), (5,)) == 15
        assert await client.get("m:form") == b"one"
        # At most MAX_MERGED calls in one: more make another (in the same write).
        await client.config_resetstat()
        many = [batcher.call_merged(ADD, ("m:a", "m:form"), (1,)) for _ in range(MAX_MERGED + 1)]
        assert await asyncio.gather(*many) == list(range(4, MAX_MERGED + 5))
        assert (await client.info("commandstats"))["cmdstat_fcall"]["calls"] == 2
    finally:
        await batcher.close()


async def test_a_merged_call_that_fails_fails_each_of_its_callers(
    client: aioredis.Redis,
) -> None:
    """A batch form's error (one call's bad argument stops the function) is every
    caller's: none is told it succeeded. The next call goes on as usual."""
    await client.delete("m:c", "m:form")
    batcher = Batcher(client, timeout=5)
    try:
        calls = [batcher.call_merged(ADD, ("m:c", "m:form"), (amount,)) for amount in (1, "x", 2)]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(a, ResponseError) for a in answers), answers
        assert await batcher.call_merged(ADD, ("m:c", "m:form"), (4,)) == 5
    finally:
        await batcher.close()
