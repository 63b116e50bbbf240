"""The Redis connection, command batching, scripts sent by their SHA-1 and
libraries of functions loaded once.

The job-state functions are in :mod:`llm_broker.shared.store.scripts`; the job
store (:mod:`llm_broker.shared.store`) is the only user.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.credentials import CredentialProvider
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_broker.shared.config import RedisConfig


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


class Function:
    """One function of a :class:`Library`, called by name (FCALL)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def command(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        return ("FCALL", self.name, len(keys), *keys, *args)


class Library:
    """Lua functions loaded into Redis once (FUNCTION LOAD, Redis 7) and called by
    name. Their shared code is compiled and set up once, not on every call as a
    script's is: the job scripts share a scheduler that costs a script about 2 µs
    a call just to define. Each body runs as ``function(KEYS, ARGV)``.

    The library's name and its functions' names end with a hash of its text, so
    processes of two versions (a rolling update) each call their own. Redis gets
    the text when it does not know the library yet: first use, or a restart that
    lost it (functions persist in RDB and AOF like data).
    """

    def __init__(self, name: str, shared: str, bodies: Mapping[str, str]) -> None:
        source = shared + "".join(f"\n{k}\n{v}" for k, v in sorted(bodies.items()))
        version = hashlib.sha1(source.encode()).hexdigest()[:12]
        self.name = f"{name}_{version}"
        parts = [f"#!lua name={self.name}", shared]
        self._functions: dict[str, Function] = {}
        for short, body in bodies.items():
            full = f"{short}_{version}"
            parts.append(f"redis.register_function('{full}', function(KEYS, ARGV)\n{body}\nend)")
            self._functions[short] = Function(full)
            _LIBRARIES[full] = self
        self.text = "\n".join(parts)

    def __getitem__(self, short: str) -> Function:
        return self._functions[short]


_LIBRARIES: dict[str, Library] = {}


def _unknown(result: object) -> bool:
    """Whether ``result`` says Redis does not know a script or function yet."""
    return isinstance(result, NoScriptError) or (
        isinstance(result, ResponseError) and str(result).startswith("Function not found")
    )


def _with_text(command: Sequence[Any]) -> tuple[Any, ...]:
    """The EVAL form of an EVALSHA command of one of this module's scripts (any
    other, such as an FCALL whose library is loaded first, stays as it is)."""
    if command[0] != "EVALSHA":
        return tuple(command)
    return ("EVAL", _SCRIPTS[command[1]].text, *command[2:])


#: Errors meaning "Redis cannot be reached right now" (as opposed to a command error).
REDIS_DOWN: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    TimeoutError,
)


class NotSent(TimeoutError):
    """A command waited in the :class:`Batcher` past its timeout and was never sent."""


def maybe_ran(error: BaseException) -> bool:
    """Whether a command that failed with ``error`` may still have run on Redis: it
    timed out or lost its connection after it was sent. A command that never left
    (no connection could be made or taken from the pool, or it timed out waiting
    to be sent) did not run."""
    if isinstance(error, NotSent | MasterNotFoundError | AuthenticationError):
        return False  # never sent, or sent to no primary
    if isinstance(error, RedisConnectionError | RedisTimeoutError):
        text = str(error)
        return not any(
            words in text
            for words in ("connecting to", "No connection available", "master is now a slave")
        )
    return not isinstance(error, ConnectionRefusedError)


def raise_if_cancelling() -> None:
    """Raise a cancellation that was requested but did not arrive.

    A cancellation that lands inside a Redis call can be lost on the way (on
    Python 3.11 ``asyncio.timeout`` turns one that meets an expiring timeout into
    a timeout, and redis-py turns that into its own error): the task stays
    "cancelling" and a loop that backs off on Redis errors would run on, so a
    shutdown waiting for it would never end. Loops that run until cancelled call
    this on every round and in their Redis-error handler.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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


class _SentinelConnection(_HiredisPacking, SentinelManagedConnection):
    pass


class _SentinelSSLConnection(_HiredisPacking, SentinelManagedSSLConnection):
    pass


class _SentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A pool whose connections go to the primary the sentinels name (asked on
    every new connection; a connection to a demoted primary is dropped), and that
    waits for a free connection as :class:`BlockingConnectionPool` does."""

    def __init__(self, sentinels: Sentinel, service_name: str, **kwargs: Any) -> None:
        super().__init__(service_name, sentinels, **kwargs)  # type: ignore[no-untyped-call]
        self._sentinels = sentinels

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client closes: so do its sentinel connections
            for sentinel in self._sentinels.sentinels:
                await sentinel.connection_pool.disconnect()


class FilePassword(CredentialProvider):
    """A password read from a file each time a connection authenticates, so that a
    rotated secret is used from the next connection on."""

    def __init__(self, path: str, username: str | None = None) -> None:
        self._path = path
        self._username = username

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        try:
            password = Path(self._path).read_text().strip()
        except OSError as e:  # the connection closes; nothing was sent on it
            raise RedisConnectionError(
                f"Error connecting to Redis: cannot read the password file {self._path}: "
                f"{e.strerror}"
            ) from e
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def connect(
    cfg: RedisConfig, *, socket_timeout: float | None = None, max_connections: int = 64
) -> aioredis.Redis:
    """A client whose connections fail fast when Redis is unreachable: to
    ``redis.url``, or to the primary that ``redis.sentinel`` names.

    Without ``socket_timeout`` a read has no timer of its own (redis-py would
    arm one per command); callers bound their calls instead, as the
    :class:`Batcher` does for each batch.
    """
    # The client owns its pool: closing the client closes its connections.
    return aioredis.Redis.from_pool(
        connection_pool(cfg, socket_timeout=socket_timeout, max_connections=max_connections)
    )


def connection_pool(
    cfg: RedisConfig, *, socket_timeout: float | None = None, max_connections: int = 64
) -> aioredis.ConnectionPool:
    """The pool of :func:`connect`'s client, for a client of another class."""
    # What redis-py reads from a URL: address, database, credentials, TLS options
    # (which win over the defaults below, as with from_url).
    node: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": cfg.command_timeout_s,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "health_check_interval": 0,
        **parse_url(cfg.url),
    }
    tls = cfg.url.startswith("rediss:")
    if cfg.password_file:  # the file's password, not the URL's
        node.pop("password", None)
        node["credential_provider"] = FilePassword(cfg.password_file, node.pop("username", None))
    if cfg.sentinel is None:
        if node.get("connection_class") is not UnixDomainSocketConnection:
            node["connection_class"] = _SSLConnection if tls else _Connection
        return aioredis.BlockingConnectionPool(**node)
    node.pop("host", None)  # the sentinels name the primary
    node.pop("port", None)
    node["connection_class"] = _SentinelSSLConnection if tls else _SentinelConnection
    sentinels = _sentinels(cfg, {k: v for k, v in node.items() if k.startswith("ssl_")})
    return _SentinelPool(sentinels, cfg.sentinel.service_name, **node)


def _sentinels(cfg: RedisConfig, tls_options: dict[str, Any]) -> Sentinel:
    """The sentinels' client; with TLS, the data nodes' CA and client certificate."""
    assert cfg.sentinel is not None
    sc = cfg.sentinel
    own: dict[str, Any] = {
        "socket_timeout": cfg.command_timeout_s,
        "socket_connect_timeout": cfg.connect_timeout_s,
    }
    if sc.password_file:
        own["credential_provider"] = FilePassword(sc.password_file, sc.username)
    if sc.tls:
        own.update(ssl=True, **tls_options)
    return Sentinel(sc.hosts(), sentinel_kwargs=own)  # type: ignore[no-untyped-call]


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class Batcher:
    """Sends commands in pipelines, several callers' commands per round trip.

    While ``max_in_flight`` pipelines are on the wire, new commands wait and
    leave together with the next one, as in Nagle's algorithm: an idle
    process pays no delay, a busy one pays a fraction of a round trip and
    sends one write instead of hundreds. Each caller gets its own result (or
    exception) within ``timeout`` of its call, however long it waited; but time
    the event loop spent late (``lag``) does not count: a busy process would
    otherwise time out on replies that Redis sent in time.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        timeout: float,
        max_in_flight: int = 1,
        round_trip: Observer | None = None,
        lag: Callable[[], float] | None = None,
    ) -> None:
        self._client = client
        self._timeout = timeout
        #: The event loop's current lag (LoopLag.now_s): while it is late, a round
        #: trip's time is not all Redis's, and its timeout is extended.
        self._lag = lag
        #: When (loop time) a round trip last succeeded: Redis answered then.
        self.last_ok = -1e9
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

    def lagging(self) -> bool:
        """Whether this process's event loop runs late now (beyond the tolerance)."""
        return self._lag is not None and self._lag() > LAG_TOLERANCE_S

    async def _run(self, batch: list[tuple[Sequence[Any], asyncio.Future[Any], float]]) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = batch[0][2] + self._timeout
        if deadline <= now and self.lagging():
            deadline = now + self._timeout  # the wait was this process's lateness
        try:
            if deadline <= now:
                raise NotSent("Redis did not answer in time")
            started = time.perf_counter()
            async with asyncio.timeout(None) as timeout:
                guard = _Guard(self, timeout, cap=now + MAX_EXTENSIONS * self._timeout)
                guard.arm(deadline)
                try:
                    results = await execute(self._client, [args for args, _, _ in batch])
                finally:
                    guard.cancel()
            self.last_ok = loop.time()
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


#: A round trip's timeout is extended while the event loop is this late...
LAG_TOLERANCE_S = 0.1
#: ...up to this many times the timeout in all.
MAX_EXTENSIONS = 10


class _Guard:
    """A round trip's timeout that does not count the event loop's own lateness:
    when it fires while the loop is late (its replies may be waiting unread), it
    waits one more timeout, up to ``cap``; else the round trip times out."""

    def __init__(self, batcher: Batcher, timeout: asyncio.Timeout, cap: float) -> None:
        self._batcher = batcher
        self._timeout = timeout
        self._cap = cap
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, when: float) -> None:
        self._handle = asyncio.get_running_loop().call_at(when, self._fire)

    def _fire(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._cap and self._batcher.lagging():
            self.arm(min(self._cap, now + self._batcher._timeout))
        else:
            self._timeout.reschedule(now)  # expires: the round trip is cancelled

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


async def execute(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Run ``commands`` in one round trip; a command's error is its result.

    Scripts and functions Redis does not know yet (first use, or Redis restarted)
    are sent again in a second round trip: a script with its text, a function
    after its library is loaded.
    """
    results = await _pipeline(client, commands)
    missing = [i for i, r in enumerate(results) if _unknown(r)]
    if not missing:
        return results
    # WAIT counts the writes made before it on its connection: one that followed
    # a command sent again follows it again.
    missing += [i for i in range(missing[0] + 1, len(commands)) if commands[i][0] == "WAIT"]
    missing.sort()
    libraries = list(
        {_LIBRARIES[commands[i][1]].text: None for i in missing if commands[i][0] == "FCALL"}
    )
    loads = [("FUNCTION", "LOAD", "REPLACE", text) for text in libraries]
    try:
        retried = await _pipeline(client, [*loads, *(_with_text(commands[i]) for i in missing)])
    except Exception as e:  # only the commands sent again failed; the others ran
        for i in missing:
            results[i] = e
        return results
    # A library that could not be loaded (no permission, out of memory, an old Redis)
    # is the error of the calls that needed it, not "Function not found".
    failed = {
        text: answer
        for text, answer in zip(libraries, retried, strict=False)
        if isinstance(answer, Exception)
    }
    for i, result in zip(missing, retried[len(loads) :], strict=True):
        command = commands[i]
        library = _LIBRARIES[command[1]].text if command[0] == "FCALL" else None
        results[i] = failed.get(library, result) if library is not None else result
    return results


async def _pipeline(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Send ``commands`` in one write on one connection and read their replies;
    a command's error is its result. The replies go through the client's response
    callbacks, as redis-py's own pipeline does, without its per-call machinery
    (retry wrapper, command stack, per-reply option handling): on the request path
    that machinery cost more than the round trip's packing and parsing together."""
    pool = client.connection_pool
    conn = await pool.get_connection()
    try:
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        callbacks = client.response_callbacks
        results: list[Any] = []
        for args in commands:
            try:
                reply = await conn.read_response()
            except ResponseError as e:
                results.append(e)
                continue
            callback = callbacks.get(args[0])
            results.append(reply if callback is None else callback(reply))
        return results
    except BaseException:
        # Replies may be left unread on the connection: it cannot be used again.
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)


async def ensure_group(client: aioredis.Redis, stream: str, group: str) -> None:
    """Create the consumer group (and the stream) unless it exists."""
    try:
        await client.xgroup_create(stream, group, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
