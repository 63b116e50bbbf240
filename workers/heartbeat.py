"""A worker process's heartbeat: what the operator's console knows of live workers.

Every ``worker.heartbeat_s`` each worker process writes one hash (host, pid,
version, start time, and per provider its slots, free slots and jobs held, and
the circuit state of each deployment it called), lets it expire three beats
later, and scores itself in ``wk:live`` by that expiry, so a dead process drops
off the list within its TTL without anybody cleaning up. The same pipeline adds
the jobs it finished since the last beat to the current minute's counts (the
console's throughput and error charts). The cost is one pipeline of a handful of
commands per process per beat, whatever the traffic.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, Protocol

import orjson
import redis.asyncio as aioredis

from llm_broker.shared.config import Config
from llm_broker.shared.keys import Keys
from llm_broker.shared.metrics import version
from llm_broker.shared.redisio import REDIS_DOWN, raise_if_cancelling

log = logging.getLogger("llm_broker.worker")

#: A beat is missed this many times before the worker counts as gone.
MISSED_BEATS = 3
#: How long a minute's counts are kept.
MINUTES_KEPT_S = 2 * 3600


class Beating(Protocol):
    """What the heartbeat reads of a provider pool."""

    provider: str
    counts: dict[str, int]

    def slots(self) -> tuple[int, int]:
        """(slots, free slots)."""
        ...

    def circuits(self) -> dict[str, str]: ...


class Heartbeat:
    def __init__(
        self, config: Config, redis: aioredis.Redis, consumer: str, pools: Sequence[Beating]
    ) -> None:
        self._redis = redis
        self._keys = Keys(config.redis.key_prefix, cluster=config.redis.cluster)
        self._every = config.worker.heartbeat_s
        #: A shutdown waits at most this long for Redis (as the worker's other last words).
        self._last_words_s = config.redis.command_timeout_s * 4
        self._consumer = consumer
        self._pools = pools
        self._started = time.time()
        self._sent: dict[tuple[str, str], int] = {}
        self._static: dict[str, Any] = {
            "id": consumer,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": version(),
            "started_at": f"{self._started:.3f}",
        }

    @property
    def ttl_s(self) -> float:
        return self._every * MISSED_BEATS

    async def run(self) -> None:
        """Beat until cancelled; a beat that Redis does not take is tried at the next."""
        while True:
            raise_if_cancelling()
            try:
                async with asyncio.timeout(self._every * 2):
                    await self.beat()
            except (*REDIS_DOWN, TimeoutError) as e:  # type: ignore[misc]
                raise_if_cancelling()
                log.debug("heartbeat not written: %s", e)
            await asyncio.sleep(self._every)  # the heartbeat's period

    async def beat(self) -> None:
        now = time.time()
        providers = []
        circuits: dict[str, str] = {}
        deltas: dict[str, int] = {}
        counted = {(p.provider, o): n for p in self._pools for o, n in p.counts.items()}
        for pool in self._pools:
            slots, free = pool.slots()
            providers.append(
                {"name": pool.provider, "slots": slots, "free": free, "held": slots - free}
            )
            # (a deployment's name is "<provider>/<model>")
            circuits.update(pool.circuits())
        for (provider, outcome), count in counted.items():
            sent = self._sent.get((provider, outcome), 0)
            if count > sent:
                deltas[f"{provider}|{outcome}"] = count - sent
        key = self._keys.worker(self._consumer)
        ttl_ms = int(self.ttl_s * 1000)
        fields = {
            **self._static,
            "beat_at": f"{now:.3f}",
            "providers": orjson.dumps(providers),
            "circuits": orjson.dumps(circuits),
        }
        live = self._keys.live_workers()
        pipe = self._redis.pipeline(transaction=False)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, ttl_ms)
        pipe.zadd(live, {self._consumer: now + self.ttl_s})
        pipe.zremrangebyscore(live, "-inf", now)
        pipe.pexpire(live, ttl_ms * 4)
        if deltas:
            minute = self._keys.minute_counts(int(now // 60) * 60)
            for field, n in deltas.items():
                pipe.hincrby(minute, field, n)
            pipe.expire(minute, MINUTES_KEPT_S)
        await pipe.execute()
        self._sent = counted

    async def stop(self) -> None:
        """Leave the list at once (a clean shutdown), counting the last jobs first."""
        try:
            async with asyncio.timeout(self._last_words_s):
                await self.beat()
                pipe = self._redis.pipeline(transaction=False)
                pipe.delete(self._keys.worker(self._consumer))
                pipe.zrem(self._keys.live_workers(), self._consumer)
                await pipe.execute()
        except (*REDIS_DOWN, TimeoutError) as e:  # type: ignore[misc]
            log.warning("could not take this worker off the live list: %s", e)
