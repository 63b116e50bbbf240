"""The Redis connection, command batching and the job-state scripts.

Job state only moves forward (queued → in_progress → a final state); every
transition is one Lua script on the job hash, so a late duplicate delivery can
never overwrite a final state.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_broker.shared import messages as m
from llm_broker.shared.config import RedisConfig
from llm_broker.shared.keys import Keys


class Script:
    """A Lua script sent by its SHA-1 (EVALSHA); Redis gets the text only when it
    does not know the script yet (first use, or after a restart)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()
        _SCRIPTS[self.sha] = self

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.sha, len(keys), *keys, *args)


_SCRIPTS: dict[str, Script] = {}


def _with_text(command: Sequence[Any]) -> tuple[Any, ...]:
    """The EVAL form of an EVALSHA command of one of this module's scripts."""
    return ("EVAL", _SCRIPTS[command[1]].text, *command[2:])


#: Errors meaning "Redis cannot be reached right now" (as opposed to a command error).
REDIS_DOWN: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)

# Makes a job final: status, finish time and more fields, and its TTL (the
# result is kept this long). The job's Idempotency-Key never outlives it, and a
# job with a webhook gets an entry on the webhook event stream.
_FINISH = """
local function finish(job, events, id, status, now, ttl, ...)
  redis.call('HSET', job, 'status', status, 'completed_at', now, ...)
  redis.call('EXPIRE', job, ttl)
  local idem = redis.call('HGET', job, 'idem_key')
  if idem then
    local left = redis.call('TTL', idem)
    if left > tonumber(ttl) then redis.call('EXPIRE', idem, ttl) end
  end
  if redis.call('HEXISTS', job, 'webhook_url') == 1 then
    redis.call('XADD', events, '*', 'i', id)
  end
end
"""

# KEYS[1] queue stream, KEYS[2] job hash.
# ARGV: max depth, packed job, job TTL, then job hash field/value pairs.
ENQUEUE = Script("""
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return false end
redis.call('HSET', KEYS[2], unpack(ARGV, 4))
redis.call('EXPIRE', KEYS[2], ARGV[3])
return redis.call('XADD', KEYS[1], '*', 'j', ARGV[2])
""")

# An async submission: the Idempotency-Key check, admission, the job record,
# the queue entry and the tenant's job index in one step.
# KEYS[1] queue stream, [2] job hash, [3] idempotency key (unused unless ARGV[4]
# is '1'), [4] the tenant's job index.
# ARGV[1] max depth, [2] packed job, [3] job TTL, [4] '1' to use the idempotency
# key, [5] its value ("<request hash> <job id>"), [6] its TTL, [7] job id,
# [8] index score, [9] job key prefix, [10…] job hash field/value pairs.
# Returns {'ok', entry id}, {'full'}, {'dup', idempotency value, the job's fields}
# or {'conflict'} (the key's job is gone or another tenant's).
SUBMIT = Script("""
if ARGV[4] == '1' then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    local id = string.sub(seen, string.find(seen, ' ', 1, true) + 1)
    -- ARGV[11] is the tenant (the first job hash field): another's job is never returned.
    if redis.call('HGET', ARGV[9] .. id, 'tenant') ~= ARGV[11] then return {'conflict'} end
    return {'dup', seen, redis.call('HGETALL', ARGV[9] .. id)}
  end
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return {'full'} end
redis.call('HSET', KEYS[2], unpack(ARGV, 10))
redis.call('EXPIRE', KEYS[2], ARGV[3])
local entry = redis.call('XADD', KEYS[1], '*', 'j', ARGV[2])
if ARGV[4] == '1' then redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6]) end
redis.call('ZADD', KEYS[4], ARGV[8], ARGV[7])
-- Bounded upkeep of the index: the oldest few ids whose records expired go.
for _, old in ipairs(redis.call('ZRANGE', KEYS[4], 0, 3)) do
  if redis.call('EXISTS', ARGV[9] .. old) == 0 then redis.call('ZREM', KEYS[4], old) end
end
if redis.call('TTL', KEYS[4]) < tonumber(ARGV[3]) then redis.call('EXPIRE', KEYS[4], ARGV[3]) end
return {'ok', entry}
""")

# KEYS[1] job hash, KEYS[2] webhook event stream.
# ARGV: now, max deliveries, this delivery's count, job id, result TTL.
# Returns 'ok' (run it), 'gone' (record expired), 'expired' (deadline passed:
# marked so), 'poison' (delivered too often) or the job's final status.
START = Script(
    _FINISH
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'deadline')
if not st[1] then return 'gone' end
if st[1] ~= 'queued' and st[1] ~= 'in_progress' then return st[1] end
if tonumber(st[2]) <= tonumber(ARGV[1]) then
  finish(KEYS[1], KEYS[2], ARGV[4], 'expired', ARGV[1], ARGV[5], 'http_status', 504)
  return 'expired'
end
if tonumber(ARGV[3]) > tonumber(ARGV[2]) then return 'poison' end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'in_progress', 'started_at', ARGV[1])
return 'ok'
"""
)

# Closes one queue entry in one call, in this order: make the job final (unless
# it already is), send the reply to the waiting ingress process (if any), then
# acknowledge and delete the entry, so the stream holds only work not yet done.
# KEYS[1] job hash, KEYS[2] queue stream, KEYS[3] reply stream, KEYS[4] webhook
# event stream.
# ARGV[1] group, [2] entry id, [3] job id, [4] final status ('' leaves the record
# alone), [5] now, [6] result field, [7] payload, [8] http status, [9] TTL,
# [10] reply kind ('' for no reply), [11] reply data, [12] '1' if the reply data
# is the payload, [13] Retry-After ('' for none), [14] reply stream max length,
# [15] the attempt history ('' for none: the job ran once, on one deployment),
# [16] the tokens used, "<input> <output>" ('' if unknown), sent with the reply.
# Returns 1 if this call made the job final.
SETTLE = Script(
    _FINISH
    + """
local made = 0
if ARGV[4] ~= '' then
  local st = redis.call('HGET', KEYS[1], 'status')
  if st == 'queued' or st == 'in_progress' then
    if ARGV[15] ~= '' then
      finish(KEYS[1], KEYS[4], ARGV[3], ARGV[4], ARGV[5], ARGV[9], ARGV[6], ARGV[7],
             'http_status', ARGV[8], 'history', ARGV[15])
    else
      finish(KEYS[1], KEYS[4], ARGV[3], ARGV[4], ARGV[5], ARGV[9], ARGV[6], ARGV[7],
             'http_status', ARGV[8])
    end
    made = 1
  end
end
if ARGV[10] ~= '' then
  local data = ARGV[11]
  if ARGV[12] == '1' then data = ARGV[7] end
  local fields = {'i', ARGV[3], 'k', ARGV[10], 'd', data, 's', ARGV[8]}
  if ARGV[13] ~= '' then
    fields[#fields + 1] = 'ra'
    fields[#fields + 1] = ARGV[13]
  end
  if ARGV[16] ~= '' then
    fields[#fields + 1] = 'u'
    fields[#fields + 1] = ARGV[16]
  end
  redis.call('XADD', KEYS[3], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[14], '*', unpack(fields))
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return made
"""
)

# KEYS[1] job hash, [2] the queue the job leaves, [3] the queue it moves to.
# ARGV[1] group, [2] entry id, [3] the job, packed, for its next deployment,
# [4] that deployment's provider, [5] the attempt history so far.
# Fallback: a job still running moves on to another provider's queue; its entry
# here is acknowledged either way. Returns 1 if it moved.
MOVE = Script("""
local moved = 0
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' or st == 'in_progress' then
  redis.call('XADD', KEYS[3], '*', 'j', ARGV[3])
  redis.call('HSET', KEYS[1], 'provider', ARGV[4], 'history', ARGV[5])
  moved = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return moved
""")

# KEYS[1] job hash, KEYS[2] webhook event stream. ARGV: now, job id, result TTL.
# The client stopped waiting at its deadline: a job not yet final becomes
# 'expired', so no worker starts it.
EXPIRE_JOB = Script(
    _FINISH
    + """
local st = redis.call('HGET', KEYS[1], 'status')
if st == 'queued' or st == 'in_progress' then
  finish(KEYS[1], KEYS[2], ARGV[2], 'expired', ARGV[1], ARGV[3], 'http_status', 504)
  return 1
end
return 0
"""
)

# KEYS[1] job hash, KEYS[2] webhook event stream.
# ARGV: now, tenant, result TTL, cancel channel, job id.
# A job of another tenant is 'gone'. A job not yet final becomes 'cancelled' and
# the worker running it hears of it on the channel; a final job is left alone.
# Returns {verdict, the job's fields}.
CANCEL = Script(
    _FINISH
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'tenant')
if not st[1] or st[2] ~= ARGV[2] then return {'gone'} end
local verdict = st[1]
if st[1] == 'queued' or st[1] == 'in_progress' then
  finish(KEYS[1], KEYS[2], ARGV[5], 'cancelled', ARGV[1], ARGV[3])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
  verdict = 'cancelled'
end
return {verdict, redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS[1] job hash. ARGV: seconds to keep the record at least (0: unchanged),
# then webhook field/value pairs. Records a delivery attempt unless the job is gone.
WEBHOOK_ATTEMPT = Script("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1], 'GT') end
return 1
""")


class _HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's pure-Python packer.

    redis-py's asyncio connections pack in Python; on the request path that was
    about a tenth of ingress and worker CPU.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " in first:  # e.g. "XINFO GROUPS"
            args = (*first.split(), *args[1:])
        elif isinstance(first, bytes) and b" " in first:
            args = (*first.split(), *args[1:])
        return [hiredis.pack_command(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(self.pack_command(*cmd)[0] for cmd in commands)]


class _Connection(_HiredisPacking, aioredis.Connection):
    pass


class _SSLConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


def connect(
    cfg: RedisConfig, *, socket_timeout: float | None = None, max_connections: int = 64
) -> aioredis.Redis:
    """A client whose connections fail fast when Redis is unreachable.

    Without ``socket_timeout`` a read has no timer of its own (redis-py would
    arm one per command); callers bound their calls instead, as the
    :class:`Batcher` does for each batch.
    """
    scheme = cfg.url.split("://", 1)[0]
    extra: dict[str, Any] = {}
    if scheme == "redis":
        extra["connection_class"] = _Connection
    elif scheme == "rediss":
        extra["connection_class"] = _SSLConnection
    pool = aioredis.BlockingConnectionPool.from_url(
        cfg.url,
        max_connections=max_connections,
        timeout=cfg.command_timeout_s,
        socket_timeout=socket_timeout,
        socket_connect_timeout=cfg.connect_timeout_s,
        health_check_interval=0,
        **extra,
    )
    return aioredis.Redis(connection_pool=pool)


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class Batcher:
    """Sends commands in pipelines, several callers' commands per round trip.

    While ``max_in_flight`` pipelines are on the wire, new commands wait and
    leave together with the next one, as in Nagle's algorithm: an idle
    process pays no delay, a busy one pays a fraction of a round trip and
    sends one write instead of hundreds. Each caller gets its own result (or
    exception) within ``timeout`` of its call, however long it waited.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        timeout: float,
        max_in_flight: int = 1,
        round_trip: Observer | None = None,
    ) -> None:
        self._client = client
        self._timeout = timeout
        #: Observes the duration of each pipeline round trip (a histogram child).
        self._round_trip = round_trip
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[Sequence[Any], asyncio.Future[Any], float]] = []
        self._runners = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((args, fut, loop.time()))
        if self._runners < self._max_in_flight and len(self._pending) == 1:
            # The runner's first step comes on the next loop turn: every
            # command issued until then joins its first pipeline.
            self._runners += 1
            task = loop.create_task(self._run_pending())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def _run_pending(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._run(batch)
        finally:
            self._runners -= 1

    async def _run(self, batch: list[tuple[Sequence[Any], asyncio.Future[Any], float]]) -> None:
        budget = batch[0][2] + self._timeout - asyncio.get_running_loop().time()
        try:
            if budget <= 0:
                raise TimeoutError("Redis did not answer in time")
            started = time.perf_counter()
            async with asyncio.timeout(budget):
                results = await execute(self._client, [args for args, _, _ in batch])
            if self._round_trip is not None:
                self._round_trip.observe(time.perf_counter() - started)
        except (Exception, asyncio.CancelledError) as e:  # every caller must hear of it
            err = e if isinstance(e, Exception) else ConnectionError("batch cancelled")
            for _, fut, _ in batch:
                if not fut.done():
                    fut.set_exception(err)
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for (_, fut, _), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


async def execute(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Run ``commands`` in one round trip; a command's error is its result.

    Scripts Redis does not know yet (first use, or Redis restarted) are sent
    again with their text, in a second round trip.
    """
    results = await _pipeline(client, commands)
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        retried = await _pipeline(client, [_with_text(commands[i]) for i in missing])
        for i, result in zip(missing, retried, strict=True):
            results[i] = result
    return results


async def _pipeline(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    if len(commands) == 1:
        try:
            return [await client.execute_command(*commands[0])]  # type: ignore[no-untyped-call]
        except ResponseError as e:
            return [e]
    async with client.pipeline(transaction=False) as pipe:
        for args in commands:
            pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) unless it exists."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


def job_fields(job: m.Job) -> list[Any]:
    """The job hash's fields at admission, as a flat field/value list."""
    return [
        "tenant",
        job.tenant,
        "status",
        m.QUEUED,
        "model",
        job.model,
        "provider",
        job.provider,
        "created_at",
        job.created,
        "deadline",
        job.deadline,
        "attempts",
        0,
        "stream",
        int(job.stream),
    ]


def enqueue_command(keys: Keys, job: m.Job, max_depth: int, ttl_s: int) -> tuple[Any, ...]:
    """The command that admits ``job`` to its provider's queue and creates its record.

    It returns the stream entry id, or nil when the queue already holds
    ``max_depth`` jobs.
    """
    return ENQUEUE.command(
        (keys.queue(job.provider), keys.job(job.id)),
        (max_depth, m.job_encoder.encode(job), ttl_s, *job_fields(job)),
    )
