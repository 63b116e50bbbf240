"""Limits that hold across every worker process: in-flight caps and RPM/TPM.

* A global cap on in-flight calls (per provider, and per deployment) is a sorted
  set of leases in Redis: member = lease id, score = expiry time. A call takes a
  lease before it starts and gives it back when it ends; the worker renews the
  leases it holds, so a lease of a worker that died frees its slot after
  ``limits.lease_s``.
* RPM and TPM are exact sliding windows (``limits.window_s`` long): a sorted
  set of admitted calls, and one of token costs with a running sum. A call's
  tokens are estimated at admission (prompt bytes / 4 + its ``max_tokens``) and
  corrected to the real usage when it ends, in either direction.

One script checks every limit of a call and takes them all at once, so a call
never holds a lease while it waits for its rate window. The ``limits`` library
was considered: it has no concurrency leases, cannot give tokens back when the
real usage is below the estimate, and checks each limit in its own round trip
on its own connection pool. When Redis cannot be reached, nothing is admitted
(fail closed): a call waits, up to its deadline, for Redis to answer again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from llm_broker.shared.config import Config, Target, deployment_limits
from llm_broker.shared.errors import DeadlineExceeded
from llm_broker.shared.keys import Keys
from llm_broker.shared.metrics import WorkerMetrics
from llm_broker.shared.redisio import REDIS_DOWN, AnyBatcher, Script

log = logging.getLogger("llm_broker.worker.limits")

# KEYS[1] provider leases, [2] deployment leases, then for the provider's rate
# window and the deployment's: [3|6] request log, [4|7] token log, [5|8] token sum.
# ARGV[1] now, [2] lease expiry, [3] lease id, [4] window, [5] provider cap,
# [6] deployment cap, [7] provider rpm, [8] provider tpm, [9] deployment rpm,
# [10] deployment tpm (0: no such limit), [11] cost.
# Returns {1} when admitted, else {0, seconds worth waiting (-1: unknown)}.
ACQUIRE = Script("""
local now, win, cost = tonumber(ARGV[1]), tonumber(ARGV[4]), tonumber(ARGV[11])
-- Every argument is checked before anything is written.
if not (now and win and cost) or cost < 0 or cost > 1099511627776 or cost % 1 ~= 0 then
  return redis.error_reply('ERR invalid limit arguments')
end
for i = 5, 10 do
  local v = tonumber(ARGV[i])
  if not v or v < 0 or v > 1099511627776 then
    return redis.error_reply('ERR invalid limit arguments')
  end
end
local caps = {tonumber(ARGV[5]), tonumber(ARGV[6])}
local rates = {{3, tonumber(ARGV[7]), tonumber(ARGV[8])},
               {6, tonumber(ARGV[9]), tonumber(ARGV[10])}}
local function wait_for(log)
  local oldest = redis.call('ZRANGE', log, 0, 0, 'WITHSCORES')
  if oldest[2] then return {0, tostring(tonumber(oldest[2]) + win - now)} end
  return {0, '-1'}
end
for i = 1, 2 do
  if caps[i] > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    if redis.call('ZCARD', KEYS[i]) >= caps[i] then return {0, '-1'} end
  end
end
for _, r in ipairs(rates) do
  local k, rpm, tpm = r[1], r[2], r[3]
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k], '-inf', now - win)
    if redis.call('ZCARD', KEYS[k]) >= rpm then return wait_for(KEYS[k]) end
  end
  if tpm > 0 then
    local old = redis.call('ZRANGEBYSCORE', KEYS[k + 1], '-inf', now - win)
    if #old > 0 then
      local freed = 0
      for _, member in ipairs(old) do
        freed = freed + tonumber(string.match(member, ':(%-?%d+)$'))
      end
      redis.call('ZREMRANGEBYSCORE', KEYS[k + 1], '-inf', now - win)
      redis.call('DECRBY', KEYS[k + 2], freed)
    end
    local used = tonumber(redis.call('GET', KEYS[k + 2]) or '0')
    if used > 0 and used + cost > tpm then return wait_for(KEYS[k + 1]) end
  end
end
local keep = math.ceil(win) + 1
for i = 1, 2 do
  if caps[i] > 0 then
    redis.call('ZADD', KEYS[i], ARGV[2], ARGV[3])
    redis.call('EXPIRE', KEYS[i], math.ceil(tonumber(ARGV[2]) - now) + 1)
  end
end
for _, r in ipairs(rates) do
  local k, rpm, tpm = r[1], r[2], r[3]
  if rpm > 0 then
    redis.call('ZADD', KEYS[k], now, ARGV[3])
    redis.call('EXPIRE', KEYS[k], keep)
  end
  if tpm > 0 then
    redis.call('ZADD', KEYS[k + 1], now, ARGV[3] .. ':' .. ARGV[11])
    redis.call('INCRBY', KEYS[k + 2], cost)
    redis.call('EXPIRE', KEYS[k + 1], keep)
    redis.call('EXPIRE', KEYS[k + 2], keep)
  end
end
return {1}
""")

# KEYS as ACQUIRE. ARGV[1] lease id, [2] estimated cost, [3] real cost (-1: unknown).
# Gives the leases back and corrects the call's token cost to its real usage.
RELEASE = Script("""
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local real = tonumber(ARGV[3])
if real >= 0 and ARGV[3] ~= ARGV[2] then
  local member = ARGV[1] .. ':' .. ARGV[2]
  for _, k in ipairs({4, 7}) do
    local score = redis.call('ZSCORE', KEYS[k], member)
    if score then
      redis.call('ZREM', KEYS[k], member)
      redis.call('ZADD', KEYS[k], score, ARGV[1] .. ':' .. ARGV[3])
      redis.call('INCRBY', KEYS[k + 1], real - tonumber(ARGV[2]))
    end
  end
end
return 1
""")


@dataclass(frozen=True)
class _Rule:
    keys: tuple[str, ...]
    provider_cap: int
    deployment_cap: int
    #: rpm and tpm of the provider, then of the deployment (0: none).
    rates: tuple[int, int, int, int]

    @property
    def leases(self) -> bool:
        return bool(self.provider_cap or self.deployment_cap)


@dataclass
class Lease:
    id: str
    rule: _Rule
    cost: int


class Limits:
    """The global limits of one provider's deployments, as seen by one worker pool."""

    def __init__(
        self, config: Config, provider: str, batcher: AnyBatcher, metrics: WorkerMetrics
    ) -> None:
        self._cfg = config.limits
        self._provider = provider
        self._pcfg = config.providers[provider]
        self._keys = Keys(config.redis.key_prefix, cluster=config.redis.cluster)
        self._deployments = {
            t: d for t, d in deployment_limits(config).items() if t.provider == provider
        }
        self._batcher = batcher
        #: Whether any limit applies to this provider at all.
        self._any = bool(
            self._deployments
            or self._pcfg.global_max_concurrency
            or self._pcfg.rpm
            or self._pcfg.tpm
        )
        self._rules: dict[str, _Rule | None] = {}
        self._held: dict[str, Lease] = {}
        self._released = asyncio.Event()
        self._returns: set[asyncio.Future[None]] = set()
        self._seq = 0
        self._wait_seconds = metrics.limit_wait_seconds.labels(provider)
        self._redis_errors = metrics.redis_errors.labels("limits")

    def rule(self, target: Target) -> _Rule | None:
        """The limits that apply to ``target`` (None: no global limit at all)."""
        if not self._any:
            return None
        d = self._deployments.get(target)
        # Deployments without limits of their own share one rule (the provider's):
        # a wildcard route must not add a rule per requested model name.
        key = target.name if d is not None else ""
        if key in self._rules:
            return self._rules[key]
        p = self._pcfg
        caps = (p.global_max_concurrency or 0, (d.global_max_concurrency if d else None) or 0)
        rates = (p.rpm or 0, p.tpm or 0, (d.rpm if d else None) or 0, (d.tpm if d else None) or 0)
        found: _Rule | None = None
        if any(caps) or any(rates):
            keys = self._keys
            provider, model = self._provider, target.model if d is not None else "*"
            found = _Rule(
                (
                    keys.lease_set(provider),
                    keys.lease_set(provider, model),
                    *(keys.rate_log(provider, "", what) for what in ("req", "tok", "tok:sum")),
                    *(keys.rate_log(provider, model, what) for what in ("req", "tok", "tok:sum")),
                ),
                caps[0],
                caps[1],
                rates,
            )
        self._rules[key] = found
        return found

    async def acquire(
        self, job_id: str, target: Target, cost: int, deadline: float
    ) -> Lease | None:
        """Wait until every limit of ``target`` admits one more call; None if it has none.

        Raises :class:`DeadlineExceeded` when the call cannot be admitted before
        ``deadline`` (Unix time), which includes Redis staying unreachable.
        """
        rule = self.rule(target)
        if rule is None:
            return None
        self._seq += 1
        lease = Lease(f"{job_id}:{self._seq}", rule, cost)
        began = time.monotonic()
        backoff = 0.01
        warned = False
        while True:
            now = time.time()
            hint = -1.0
            try:
                call = self._batcher.call(
                    *ACQUIRE.command(
                        rule.keys,
                        (
                            now,
                            now + self._cfg.lease_s,
                            lease.id,
                            self._cfg.window_s,
                            rule.provider_cap,
                            rule.deployment_cap,
                            *rule.rates,
                            cost,
                        ),
                    )
                )
                try:
                    result = await asyncio.shield(call)
                except asyncio.CancelledError:
                    # The script may still admit the call: give back what it takes.
                    call.add_done_callback(lambda done: self._give_back(done, lease))
                    raise
                if result[0] == 1:
                    if rule.leases:
                        self._held[lease.id] = lease
                    self._wait_seconds.observe(time.monotonic() - began)
                    return lease
                hint = float(result[1])
            except REDIS_DOWN as e:
                self._redis_errors.inc()
                if not warned:
                    log.warning(
                        "provider %s: limits cannot be checked (%s); no call starts until they can",
                        self._provider,
                        e,
                    )
                    warned = True
            wait = min(backoff, 0.25) if hint < 0 else max(hint, 0.005)
            if time.time() + wait >= deadline:
                raise DeadlineExceeded(
                    "the request deadline passed while waiting for the provider's limits"
                )
            self._released.clear()
            try:
                # A lease given back in this process wakes the waiters at once;
                # others' releases are seen on the next try.
                await asyncio.wait_for(self._released.wait(), wait)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, 0.25)

    def _give_back(self, done: asyncio.Future[Any], lease: Lease) -> None:
        if done.cancelled() or done.exception() is not None or done.result()[0] != 1:
            return
        task = asyncio.ensure_future(self.release(lease, 0))
        self._returns.add(task)
        task.add_done_callback(self._returns.discard)

    async def release(self, lease: Lease, real_cost: int | None) -> None:
        self._held.pop(lease.id, None)
        self._released.set()
        try:
            await self._batcher.call(
                *RELEASE.command(
                    lease.rule.keys,
                    (lease.id, lease.cost, -1 if real_cost is None else real_cost),
                )
            )
        except REDIS_DOWN as e:
            # The lease expires by itself after limits.lease_s.
            self._redis_errors.inc()
            log.warning("provider %s: could not give back a lease: %s", self._provider, e)

    def renew_commands(self) -> list[tuple[Any, ...]]:
        """Commands that push the expiry of every lease this pool holds forward."""
        expiry = time.time() + self._cfg.lease_s
        commands: list[tuple[Any, ...]] = []
        sets: set[str] = set()
        for lease in self._held.values():
            for i, cap in enumerate((lease.rule.provider_cap, lease.rule.deployment_cap)):
                if cap:
                    commands.append(("ZADD", lease.rule.keys[i], "XX", expiry, lease.id))
                    sets.add(lease.rule.keys[i])
        # The set itself must outlive the leases renewed in it.
        ttl = math.ceil(self._cfg.lease_s) + 1
        commands += [("EXPIRE", key, ttl) for key in sets]
        return commands

    @property
    def renew_every(self) -> float:
        """How often held leases must be renewed (never, without a concurrency cap)."""
        caps = self._pcfg.global_max_concurrency or any(
            d.global_max_concurrency for d in self._deployments.values()
        )
        return max(0.05, self._cfg.lease_s / 3) if caps else math.inf
