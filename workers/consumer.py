"""A provider queue's consumer inside one worker process.

It reads the provider's stream with the consumer group, pulling only as many
entries as there are free slots, and hands each delivery to a handler task.
Entries left pending by a dead worker are reclaimed once idle past the lease,
before new entries are read; the consumer keeps its own entries' idle time
fresh so a long call is never stolen, and removes the group's consumers of dead
workers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from redis.exceptions import ResponseError

from llm_broker.shared.config import Config
from llm_broker.shared.metrics import FastCount, WorkerMetrics
from llm_broker.shared.redisio import (
    READ_AHEAD,
    REDIS_DOWN,
    Readers,
    raise_if_cancelling,
    stream_reader,
)
from llm_broker.shared.store import Delivery, Queues

log = logging.getLogger("llm_broker.worker")


class StreamConsumer:
    def __init__(
        self,
        *,
        provider: str,
        config: Config,
        queues: Queues,
        consumer: str,
        metrics: WorkerMetrics,
        handle: Callable[[Delivery], Coroutine[Any, Any, None]],
        renew: Callable[[], Awaitable[None]],
        upkeep: Callable[[], Awaitable[None]],
        upkeep_every: float,
        register: Callable[[int, float], Awaitable[int]],
    ) -> None:
        self.provider = provider
        self.name = consumer
        self._cfg = config
        self._wcfg = config.worker
        self._capacity = config.providers[provider].max_concurrency
        self._queues = queues
        self._metrics = metrics
        self._handle = handle
        #: Called on every maintenance round: ``renew`` (the owner's own leases)
        #: before this consumer's entries are refreshed, ``upkeep`` after.
        self._renew = renew
        self._upkeep = upkeep
        #: Offers this consumer's slots to the scheduler for a while (0: withdraws them).
        self._register = register
        self._interval = min(max(0.05, self._wcfg.lease_s / 3), upkeep_every)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._slot_freed = asyncio.Event()
        #: Made in the loop it serves; asked once (on Python 3.11 asking is a system call).
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._in_flight = FastCount(metrics.in_flight.labels(provider))
        #: When this consumer's entries last had their leases refreshed (monotonic).
        self._refreshed_at = 0.0
        #: When the read loop next looks for entries to reclaim (monotonic), and the
        #: pending entry it looks from (long calls of live workers may come first).
        self._next_reclaim = 0.0
        self._reclaim_from = b"0-0"

    # ------------------------------------------------------------ slots

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def free_slots(self) -> int:
        return self._capacity - len(self._tasks)

    @property
    def busy(self) -> bool:
        return bool(self._tasks)

    def lease_holds(self, since: float, wait: float) -> bool:
        """Whether an entry this consumer has held since ``since`` (monotonic) is still
        surely its own ``wait`` seconds from now: no other worker reclaims it before
        ``lease_s`` passed without a refresh."""
        last = max(since, self._refreshed_at)
        return time.monotonic() + wait < last + self._wcfg.lease_s

    def stop_reading(self) -> None:
        self._stopping.set()
        self._slot_freed.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait for the deliveries in hand; True if all finished within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._tasks:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            await asyncio.wait(list(self._tasks.values()), timeout=remaining)
        return True

    async def abandon(self) -> None:
        """Cancel what is still running; its entries stay pending for another worker."""
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    @property
    def running(self) -> int:
        """Deliveries in hand."""
        return len(self._tasks)

    def _spawn(self, delivery: Delivery) -> None:
        entry_id = delivery.entry_id
        if entry_id in self._tasks:
            return
        try:
            run = self._handle(delivery)
        except Exception:  # the task boundary, as in _run: the entry stays pending
            log.exception("provider %s: entry %s failed unexpectedly", self.provider, entry_id)
            return
        task = self._loop.create_task(self._run(delivery, run))
        self._tasks[entry_id] = task
        self._in_flight.inc(1)
        task.add_done_callback(lambda _t: self._done(entry_id, run))

    def _done(self, entry_id: str, run: Coroutine[Any, Any, None]) -> None:
        run.close()  # a run cancelled before it began (at shutdown) never ran
        self._tasks.pop(entry_id, None)
        self._in_flight.dec()
        self._slot_freed.set()

    async def _run(self, delivery: Delivery, run: Coroutine[Any, Any, None]) -> None:
        try:
            await run
        except asyncio.CancelledError:
            raise
        except Exception:  # the task boundary: log once, the entry stays pending
            log.exception(
                "provider %s: entry %s failed unexpectedly", self.provider, delivery.entry_id
            )

    # ------------------------------------------------------------ loops

    async def read_loop(self) -> None:
        """Pull entries while there are free slots, until told to stop."""
        reader = stream_reader(self._cfg.redis, self._block_ms, READ_AHEAD)
        backoff = 0.1
        need_group = True
        try:
            while not self._stopping.is_set():
                free = self.free_slots
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                try:
                    if need_group:
                        await self._ensure_group()
                        await self._offer()
                        need_group = False
                    if time.monotonic() >= self._next_reclaim and await self._reclaim(free):
                        continue  # what a dead worker left goes before new entries
                    await self._read_while_free(reader)
                    backoff = 0.1
                except ResponseError as e:
                    if "NOGROUP" not in str(e):
                        raise
                    need_group = True  # Redis lost the group (restarted empty)
                    continue
                except REDIS_DOWN as e:
                    raise_if_cancelling()
                    self._metrics.redis_errors.labels("read").inc()
                    log.warning(
                        "provider %s: cannot read the queue (%s); retrying in %.1fs",
                        self.provider,
                        e,
                        backoff,
                    )
                    await asyncio.sleep(backoff)  # back off while Redis is unreachable
                    backoff = min(backoff * 2, 2.0)
        finally:
            await reader.close(wait=False)

    @property
    def _block_ms(self) -> int:
        """How long each of a round's reads blocks: the round, ``block_ms``."""
        return max(1, self._wcfg.block_ms // READ_AHEAD)

    def _read_while_free(self, reader: Readers) -> asyncio.Future[None]:
        """Read new entries, each batch's jobs started in the step that reads it, and
        ask again at once while slots are free, until a reclaim is due, the consumer
        stops or Redis fails (the future's error). No task switch per read: on a
        lightly loaded worker each was a loop turn on every job's way.

        The reads leave :data:`READ_AHEAD` at a time (``Batcher.reads``): a worker
        whose jobs come one at a time writes once per four of them, not once each.
        A round's reads share the free slots out (each asks for its share), so that
        what they bring never exceeds them."""
        block_ms = self._block_ms
        first = True
        asked: deque[int] = deque()  # what each read not answered yet asked for

        def next_read() -> tuple[Any, ...] | None:
            nonlocal first
            free = self.free_slots - sum(asked)
            # One read at least between two reclaims, as between any two rounds.
            due = not first and time.monotonic() >= self._next_reclaim
            if free <= 0 or self._stopping.is_set() or due:
                return None
            first = False
            count = max(1, free // (READ_AHEAD - len(asked)))
            asked.append(count)
            return self._queues.read_command(self.provider, self.name, count, block_ms)

        def started(batches: Any) -> None:
            asked.popleft()
            self._start(batches)

        # A job's upstream request leaves before the next reads (behind_tasks).
        return reader.reads(next_read, started, behind_tasks=True, ahead=READ_AHEAD)

    def _start(self, batches: Any) -> None:
        for delivery in self._queues.deliveries(self.provider, batches):
            self._spawn(delivery)

    async def maintain_loop(self) -> None:
        """Keep this consumer's leases fresh and remove the group's dead consumers."""
        next_forget = 0.0
        while not self._stopping.is_set():
            try:
                async with asyncio.timeout(self._cfg.redis.command_timeout_s * 4):
                    await self._refresh()
                    await self._offer()
                    await self._upkeep()
                    if time.monotonic() >= next_forget:
                        await self._forget_dead_consumers()
                        next_forget = time.monotonic() + min(
                            600.0, self._wcfg.forget_consumers_after_s / 2
                        )
            except REDIS_DOWN as e:
                raise_if_cancelling()
                self._metrics.redis_errors.labels("maintain").inc()
                log.warning("provider %s: lease maintenance failed: %s", self.provider, e)
            except ResponseError as e:
                if "NOGROUP" not in str(e):
                    raise
                await self._ensure_group()
            try:
                await asyncio.wait_for(self._stopping.wait(), self._interval)
            except TimeoutError:
                pass
        # No more jobs for this process; the ones in the queue go to the others.
        try:
            async with asyncio.timeout(self._cfg.redis.command_timeout_s * 4):
                await self._register(0, self._wcfg.lease_s)
        except (*REDIS_DOWN, ResponseError) as e:  # type: ignore[misc]
            log.warning("provider %s: could not withdraw the slots: %s", self.provider, e)
        # Keep leases fresh while the deliveries in hand finish during shutdown.
        while self._tasks:
            try:
                async with asyncio.timeout(self._cfg.redis.command_timeout_s * 4):
                    await self._refresh()
            except (*REDIS_DOWN, ResponseError) as e:  # type: ignore[misc]
                log.warning("provider %s: lease refresh failed: %s", self.provider, e)
            await asyncio.sleep(self._interval)  # periodic timer, not synchronisation

    async def _ensure_group(self) -> None:
        async with asyncio.timeout(self._cfg.redis.command_timeout_s * 4):
            await self._queues.ensure_group(self.provider)

    async def _offer(self) -> None:
        """Offer this consumer's slots to the scheduler for one lease period; waiting
        jobs fill what is free."""
        if not self._stopping.is_set():
            await self._register(self._capacity, self._wcfg.lease_s)

    async def _refresh(self) -> None:
        """The owner's leases renewed, then this consumer's entries' idle time reset."""
        began = time.monotonic()
        await self._renew()
        if self._tasks:
            await self._queues.refresh(self.provider, self.name, set(self._tasks))
        self._refreshed_at = began

    async def _reclaim(self, free: int) -> bool:
        """Take up to ``free`` entries a dead worker left idle past the lease; True
        if any. Run by the read loop between its reads, at most once an interval,
        so that these entries go before new ones and slots are never overbooked."""
        self._next_reclaim = time.monotonic() + self._interval
        lease_ms = int(self._wcfg.lease_s * 1000)
        async with asyncio.timeout(self._cfg.redis.command_timeout_s * 4):
            self._reclaim_from, claimed = await self._queues.reclaim(
                self.provider, self.name, idle_ms=lease_ms, count=free, start=self._reclaim_from
            )
        for delivery in claimed:
            self._metrics.reclaimed.labels(self.provider).inc()
            log.info(
                "provider %s: reclaimed %s (delivery %d)",
                self.provider,
                delivery.entry_id,
                delivery.deliveries,
            )
            self._spawn(delivery)
        if len(claimed) >= free or self._reclaim_from != b"0-0":
            self._next_reclaim = 0.0  # more may be left: look again at the next free slot
        return bool(claimed)

    async def _forget_dead_consumers(self) -> None:
        """Remove consumers of dead workers once they hold nothing and sat idle long enough.

        Every worker process joins the group under a new name, so without this
        the group's consumer list grows with every restart. Removing a live but
        idle consumer that holds nothing is harmless: its next read re-creates it.
        """
        idle_ms = self._wcfg.forget_consumers_after_s * 1000
        for name in await self._queues.forget_consumers(self.provider, self.name, idle_ms):
            log.info("provider %s: removed idle consumer %s", self.provider, name)
