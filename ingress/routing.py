"""Picking a deployment for a job: weighted, least-queued or lowest-latency.

The chosen deployment comes first; the others follow in the same order as the
job's fallbacks. Queue depths (jobs waiting for each provider and on its stream) are read at
most every 100 ms per process, latency averages (written by workers) at most
once a second. When Redis cannot tell, the configured order stands: routing
is a preference, not a limit.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from llm_broker.shared.config import PRIORITIES, Candidates, Target
from llm_broker.shared.keys import Keys
from llm_broker.shared.redisio import REDIS_DOWN, AnyBatcher

log = logging.getLogger("llm_broker.ingress.routing")

DEPTH_MAX_AGE_S = 0.1
LATENCY_MAX_AGE_S = 1.0


class Chooser:
    def __init__(self, keys: Keys, batcher: AnyBatcher) -> None:
        self._keys = keys
        self._batcher = batcher
        self._depths: dict[str, tuple[float, int]] = {}
        self._latency: dict[str, float] = {}
        self._latency_at = -LATENCY_MAX_AGE_S

    async def order(self, candidates: Candidates) -> list[Target]:
        """The deployments to try, best first."""
        targets = list(candidates.targets)
        if len(targets) == 1:
            return targets
        match candidates.route.strategy:
            case "least-queued":
                depths = await self._queue_depths({t.provider for t in targets})
                shuffled = random.sample(targets, len(targets))  # ties go either way
                return sorted(shuffled, key=lambda t: depths.get(t.provider, 0))
            case "lowest-latency":
                latency = await self._latencies()
                # A deployment not measured yet goes first, so that it gets measured.
                return sorted(targets, key=lambda t: latency.get(t.name, 0.0))
            case _:
                return _weighted(targets, candidates.weights)

    async def _queue_depths(self, providers: set[str]) -> dict[str, int]:
        now = time.monotonic()
        stale = sorted(
            p for p in providers if now - self._depths.get(p, (-1.0, 0))[0] > DEPTH_MAX_AGE_S
        )
        if stale:
            try:
                # The batcher bounds the calls by redis.command_timeout_s.
                keys = self._keys
                found = await asyncio.gather(
                    *(
                        self._batcher.call(*command)
                        for p in stale
                        for command in (
                            ("XLEN", keys.queue(p)),
                            *(("ZCARD", keys.waiting_index(p, c)) for c in PRIORITIES),
                        )
                    )
                )
                per = 1 + len(PRIORITIES)
                for i, p in enumerate(stale):
                    self._depths[p] = (now, sum(int(n) for n in found[i * per : (i + 1) * per]))
            except REDIS_DOWN as e:
                log.debug("queue depths unavailable: %s", e)
        return {p: self._depths[p][1] for p in providers if p in self._depths}

    async def _latencies(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self._latency_at > LATENCY_MAX_AGE_S:
            self._latency_at = now
            try:
                found = await self._batcher.call("HGETALL", self._keys.latency())
                self._latency = {k.decode(): float(v) for k, v in _pairs(found)}
            except REDIS_DOWN as e:
                log.debug("latency averages unavailable: %s", e)
        return self._latency


def _pairs(found: object) -> list[tuple[bytes, bytes]]:
    if isinstance(found, dict):
        return list(found.items())
    if isinstance(found, list):
        return [(found[i], found[i + 1]) for i in range(0, len(found), 2)]
    return []


def _weighted(targets: list[Target], weights: tuple[float, ...]) -> list[Target]:
    """One deployment drawn by weight first, the rest in configured order."""
    if sum(weights) <= 0:
        return targets
    first = random.choices(range(len(targets)), weights=weights)[0]
    return [targets[first], *targets[:first], *targets[first + 1 :]]
