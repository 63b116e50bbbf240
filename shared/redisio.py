"""The Redis connection, command batching, scripts sent by their SHA-1 and
libraries of functions loaded once.

The job-state functions are in :mod:`llm_broker.shared.store.scripts`; the job
store (:mod:`llm_broker.shared.store`) is the only user.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import hiredis
import redis.asyncio as aioredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import UnixDomainSocketConnection, parse_url
from redis.asyncio.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)
from redis.credentials import CredentialProvider
from redis.exceptions import (
    AuthenticationError,
    InvalidResponse,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from llm_broker.shared.config import RedisConfig
from llm_broker.shared.loop import LoopRef

log = logging.getLogger("llm_broker.redis")


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


class Mergeable:
    """A function with a batch form: calls of ``one`` that wait for the same write
    leave as one call of ``many`` (:meth:`Batcher.call_merged`), which takes each
    call's keys, then each call's argument count and arguments, and answers
    the list of the calls' answers. A call alone leaves as a call of ``one``. One
    function call instead of several spares Redis the cost of starting each (its
    argument tables, its run of Lua), which a call's small work is mostly made of.

    An error of the batch form (a Lua error stops it) is every caller's, as a call
    that may have run: the calls before the failing one were made."""

    __slots__ = ("many", "one")

    def __init__(self, one: Function, many: Function) -> None:
        self.one = one
        self.many = many


#: Calls in one call of a batch form at most: one function call holds Redis for all
#: of them, where separate calls would let other clients' commands in between.
MAX_MERGED = 64


class _Merge:
    """The calls of a :class:`Mergeable` that wait for one write, in the place of
    one pending command: its command, made when it leaves, and its caller (as a
    future, which hands each call its answer)."""

    __slots__ = ("_alone", "_done", "calls", "fn", "futures", "open")

    def __init__(self, fn: Mergeable) -> None:
        self.fn = fn
        self.calls: list[tuple[Sequence[Any], Sequence[Any]]] = []
        self.futures: list[asyncio.Future[Any]] = []
        #: Whether more calls may join (not sent, not answered, not full).
        self.open = True
        self._alone = False
        self._done = False

    def join(self, keys: Sequence[Any], args: Sequence[Any], fut: asyncio.Future[Any]) -> None:
        self.calls.append((keys, args))
        self.futures.append(fut)
        if len(self.calls) >= MAX_MERGED:
            self.open = False

    def command(self) -> tuple[Any, ...]:
        self.open = False
        if len(self.calls) == 1:
            self._alone = True
            return self.fn.one.command(*self.calls[0])
        keys: list[Any] = []
        args: list[Any] = []
        for k, a in self.calls:
            keys += k
            args.append(len(a))
            args += a
        return self.fn.many.command(keys, args)

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        answers = [result] if self._alone else result
        if not isinstance(answers, list) or len(answers) != len(self.futures):
            self.set_exception(ResponseError(f"{self.fn.many.name} answered {result!r}"))
            return
        self._done, self.open = True, False
        for fut, answer in zip(self.futures, answers, strict=True):
            if not fut.done():
                fut.set_result(answer)

    def set_exception(self, error: BaseException) -> None:
        self._done, self.open = True, False
        _fail(self.futures, error)


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


def raise_if_cancelling(loop: asyncio.AbstractEventLoop | None = None) -> None:
    """Raise a cancellation that was requested but did not arrive.

    A cancellation that lands inside a Redis call can be lost on the way (on
    Python 3.11 ``asyncio.timeout`` turns one that meets an expiring timeout into
    a timeout, and redis-py turns that into its own error): the task stays
    "cancelling" and a loop that backs off on Redis errors would run on, so a
    shutdown waiting for it would never end. Loops that run until cancelled call
    this on every round and in their Redis-error handler (``loop``: the running
    loop, if the caller holds it: then no system call asks for it).
    """
    task = asyncio.current_task(loop)
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class _HiredisPacking:
    """Packs commands with hiredis (C) instead of redis-py's pure-Python packer.

    redis-py's asyncio connections pack in Python; on the request path that was
    about a tenth of ingress and worker CPU.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        return [_pack(args)]

    def pack_commands(self, commands: Iterable[Iterable[Any]]) -> list[bytes]:
        return [b"".join(_pack(tuple(cmd)) for cmd in commands)]


class _Connection(_HiredisPacking, aioredis.Connection):
    pass


class _SSLConnection(_HiredisPacking, aioredis.SSLConnection):
    pass


class _SentinelConnection(_HiredisPacking, SentinelManagedConnection):
    pass


class _SentinelSSLConnection(_HiredisPacking, SentinelManagedSSLConnection):
    pass


class _Sentinels(Sentinel):
    """The sentinels, asked together: the primary named under the highest
    configuration epoch wins.

    redis-py takes the first sentinel that answers. Just after a failover one that
    has not heard of it yet, or that watches the old primary restarted (which calls
    itself a primary until the sentinels make it a replica), names the old primary,
    and what is written there is lost when it becomes a replica.
    """

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        answers = await asyncio.gather(
            *(s.sentinel_masters() for s in self.sentinels),  # type: ignore[no-untyped-call]
            return_exceptions=True,
        )
        best: dict[str, Any] | None = None
        errors = []
        for sentinel, answer in zip(self.sentinels, answers, strict=True):
            if isinstance(answer, (RedisConnectionError, RedisTimeoutError)):
                errors.append(f"{sentinel} - {answer!r}")
                continue
            if isinstance(answer, BaseException):
                raise answer
            state = answer.get(service_name)
            if not state or not self.check_master_state(state, service_name):
                continue
            if best is None or state.get("config-epoch", 0) > best.get("config-epoch", 0):
                best = state
        if best is None:
            raise MasterNotFoundError(f"No master found for {service_name!r} : {', '.join(errors)}")
        return best["ip"], best["port"]


#: How often a pool in use asks the sentinels whether the primary has changed.
WATCH_S = 1.0


class _SentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A pool whose connections go to the primary the sentinels name, and that
    waits for a free connection as :class:`BlockingConnectionPool` does.

    redis-py asks the sentinels only when it makes a connection, and then drops
    only the idle ones. The broker holds its connections (a batcher's, a blocking
    reader's) for as long as they work, and a demoted primary that comes back as a
    replica still answers reads. So while the pool is in use it asks the sentinels
    every ``WATCH_S``, and when they name another primary it closes every
    connection, in use or not: the next command connects to the new primary.
    """

    def __init__(self, sentinels: Sentinel, service_name: str, **kwargs: Any) -> None:
        super().__init__(service_name, sentinels, **kwargs)  # type: ignore[no-untyped-call]
        self._sentinels = sentinels
        self._watch: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._follow())
        return await super().get_connection(*args, **kwargs)

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                named = await self.sentinel_manager.discover_master(self.service_name)
            except (MasterNotFoundError, RedisConnectionError, RedisTimeoutError):
                continue  # no answer is no news: the connections' own errors tell
            except Exception:
                log.exception("asking the sentinels for the primary failed")
                continue
            if self.master_address is not None and named != self.master_address:
                log.warning(
                    "the sentinels name a new primary %s:%s (was %s:%s): reconnecting",
                    *named,
                    *self.master_address,
                )
                self.master_address = named
                await aioredis.BlockingConnectionPool.disconnect(self, inuse_connections=True)

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client closes: so do its watch and sentinel connections
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
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
    if cfg.cluster:
        from llm_broker.shared.cluster import cluster_client  # (it builds on this module)

        return cluster_client(cfg, socket_timeout=socket_timeout, max_connections=max_connections)
    return _connect(cfg, socket_timeout=socket_timeout, max_connections=max_connections)


def _connect(
    cfg: RedisConfig,
    *,
    socket_timeout: float | None = None,
    max_connections: int = 64,
    node: tuple[str, int] | None = None,
) -> aioredis.Redis:
    """A client whose connections fail fast when Redis is unreachable: to
    ``redis.url``, or to the primary that ``redis.sentinel`` names.

    Without ``socket_timeout`` a read has no timer of its own (redis-py would
    arm one per command); callers bound their calls instead, as the
    :class:`Batcher` does for each batch.
    """
    # The client owns its pool: closing the client closes its connections.
    return aioredis.Redis.from_pool(
        connection_pool(
            cfg, socket_timeout=socket_timeout, max_connections=max_connections, node=node
        )
    )


def subscriber(cfg: RedisConfig, connections: int = 1) -> aioredis.Redis:
    """A client for pub/sub (one connection, or ``connections``: a subscription
    holds one): on a Cluster, to the first node that ``redis.url`` names (a message
    published on any node reaches every node)."""
    if cfg.cluster:
        url = parse_url(cfg.url)
        host, port = str(url.get("host", "127.0.0.1")), int(url.get("port", 6379))
        return node_client(cfg, host, port, connections)
    return connect(cfg, max_connections=connections)


def node_client(cfg: RedisConfig, host: str, port: int, max_connections: int) -> aioredis.Redis:
    """A client of one node at ``host:port`` with ``redis.url``'s credentials and
    TLS (a Cluster's node)."""
    return _connect(cfg, max_connections=max_connections, node=(host, port))


def connection_pool(
    cfg: RedisConfig,
    *,
    socket_timeout: float | None = None,
    max_connections: int = 64,
    node: tuple[str, int] | None = None,
) -> aioredis.ConnectionPool:
    """The pool of :func:`connect`'s client, for a client of another class (``node``:
    this address instead of the URL's)."""
    # What redis-py reads from a URL: address, database, credentials, TLS options
    # (which win over the defaults below, as with from_url).
    options: dict[str, Any] = {
        "max_connections": max_connections,
        "timeout": cfg.command_timeout_s,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "health_check_interval": 0,
        **parse_url(cfg.url),
    }
    if node is not None:
        options["host"], options["port"] = node
    tls = cfg.url.startswith("rediss:")
    if cfg.password_file:  # the file's password, not the URL's
        options.pop("password", None)
        options["credential_provider"] = FilePassword(
            cfg.password_file, options.pop("username", None)
        )
    if cfg.sentinel is None:
        if options.get("connection_class") is not UnixDomainSocketConnection:
            options["connection_class"] = _SSLConnection if tls else _Connection
        return aioredis.BlockingConnectionPool(**options)
    options.pop("host", None)  # the sentinels name the primary
    options.pop("port", None)
    options["connection_class"] = _SentinelSSLConnection if tls else _SentinelConnection
    sentinels = _sentinels(cfg, {k: v for k, v in options.items() if k.startswith("ssl_")})
    return _SentinelPool(sentinels, cfg.sentinel.service_name, **options)


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
    return _Sentinels(sc.hosts(), sentinel_kwargs=own)  # type: ignore[no-untyped-call]


class Commands(Protocol):
    """What sends Redis commands and hands back their answers: a :class:`Batcher`,
    or a Cluster's (``shared/cluster.py``)."""

    def call(self, *args: Any) -> asyncio.Future[Any]: ...

    def call_merged(
        self, fn: Mergeable, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]: ...


class Readers(Commands, Protocol):
    """What reads streams one blocking read after another (:meth:`Batcher.reads`)."""

    def reads(
        self,
        next_read: Callable[[], tuple[Any, ...] | None],
        handle: Callable[[Any], None],
        *,
        behind_tasks: bool = False,
        ahead: int = 1,
    ) -> asyncio.Future[None]: ...

    async def close(self, wait: bool = True) -> None: ...


class AnyBatcher(Readers, Protocol):
    """A :class:`Batcher`, or a Cluster's (``shared/cluster.py``)."""

    quiet: Callable[[], bool] | None

    @property
    def last_ok(self) -> float: ...

    def lagging(self) -> bool: ...

    def call_then(self, then: Callable[[Any, BaseException | None], None], *args: Any) -> None: ...


def batcher_for(
    cfg: RedisConfig,
    client: aioredis.Redis,
    *,
    timeout: float,
    round_trip: Observer | None = None,
    lag: Callable[[], float] | None = None,
) -> AnyBatcher:
    """The process's batcher: on ``client``'s pool, or on a Cluster one connection
    to each node it speaks to."""
    if cfg.cluster:
        from llm_broker.shared.cluster import cluster_batcher

        return cluster_batcher(cfg, timeout=timeout, round_trip=round_trip, lag=lag)
    return Batcher(client, timeout=timeout, round_trip=round_trip, lag=lag)


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class Batcher:
    """Sends commands in pipelines, several callers' commands per round trip.

    Every command called in one turn of the event loop leaves in one write (on a
    quiet process, see ``quiet``, a command called while nothing is on the wire
    leaves at once). While
    ``max_in_flight`` pipelines are on the wire, new commands wait and leave
    together with the next one, as in Nagle's algorithm: an idle process pays no
    delay, a busy one pays a fraction of a round trip and sends one write instead
    of hundreds. Each caller gets its own result (or exception) within ``timeout``
    of its call, however long it waited; but time the event loop spent late
    (``lag``) does not count: a busy process would otherwise time out on replies
    that Redis sent in time.

    The batcher speaks to Redis on a connection of its own (:class:`_Wire`): the
    client's pool makes it (address, Sentinel, TLS, credentials, database), then
    the batcher reads its replies as they arrive and hands each to its caller in
    the same step. Through redis-py's reader each reply cost a task switch and
    the pool two locks per round trip: on a synchronous call, more than the work.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        timeout: float,
        max_in_flight: int = 1,
        round_trip: Observer | None = None,
        lag: Callable[[], float] | None = None,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        #: Close the client with the batcher (see :func:`stream_reader`).
        self._owns_client = owns_client
        self._timeout = timeout
        #: The event loop's current lag (LoopLag.now_s): while it is late, a round
        #: trip's time is not all Redis's, and its timeout is extended.
        self._lag = lag
        #: When (loop time) a round trip last succeeded: Redis answered then.
        self.last_ok = -1e9
        #: Observes the duration of each pipeline round trip (a histogram child).
        self._round_trip = round_trip
        self._max_in_flight = max_in_flight
        #: (command, its caller's future, when it was called, whether Redis may be
        #: sent it again when it did not know its script or function).
        self._pending: list[tuple[Sequence[Any] | _Merge, asyncio.Future[Any], float, bool]] = []
        #: The calls of each mergeable function that wait to leave together.
        self._merges: dict[Mergeable, _Merge] = {}
        self._flush_soon = False
        #: Fails the commands that wait to be sent (a round trip on the wire, or a
        #: connection being made) once they have waited their timeout: the bucket of
        #: its deadline (shared/loop.py's Deadlines), if it is set.
        self._waiting_at: int | None = None
        self._watcher = _Callback(self._watch_waiting)
        self._wire: _Wire | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Closing: no new connection; closed: nothing more is sent.
        self._closing = False
        self._closed = False
        #: The event loop, kept from the first call.
        self._loop = LoopRef()
        #: Whether the process is quiet now (its owner sets it: one request in hand):
        #: then a command called while the wire is idle leaves at once instead of
        #: on the next loop turn. Unset: every command waits for the turn's end.
        self.quiet: Callable[[], bool] | None = None

    def call(self, *args: Any) -> asyncio.Future[Any]:
        return self._call(args, True)

    def call_then(self, then: Callable[[Any, BaseException | None], None], *args: Any) -> None:
        """Send a command; ``then(result, None)`` or ``then(None, error)`` runs in the
        step that reads its answer (an awaited call resumes its task one loop turn
        later): for a reader that hands each answer on and asks again at once."""
        loop = self._loop()
        self._pending.append((args, _Then(then), loop.time(), True))  # type: ignore[arg-type]
        self._flush_later()

    def reads(
        self,
        next_read: Callable[[], tuple[Any, ...] | None],
        handle: Callable[[Any], None],
        *,
        behind_tasks: bool = False,
        ahead: int = 1,
    ) -> asyncio.Future[None]:
        """Blocking reads, one after another: ``next_read()``'s command is sent, its
        answer goes to ``handle`` in the step that reads it, and the next command
        leaves at once. The future ends when ``next_read()`` gives None (once the
        reads sent have answered), or with the first Redis error or error of
        ``handle`` or ``next_read`` (a reader's defect ends its reads, as it would
        end a loop); once it is done (or cancelled) no more is sent.

        ``behind_tasks``: the next command is asked for one loop turn later, so that
        what the tasks ``handle`` started write in their first two steps (a job's
        upstream request) leaves before it: on a quiet process every write wakes
        another, and the one the caller waits for goes first.

        ``ahead``: that many reads leave together, each answer handled as it comes,
        and the next ones when all have answered: one write for ``ahead`` answers.
        Only for reads whose command does not depend on the answers before it
        (``XREADGROUP ... >``, not ``XREAD`` after an entry). Redis runs each when
        the one before it has answered, so the last may answer ``ahead`` blocks
        later: the batcher's timeout must allow it (:func:`stream_reader`)."""
        return chain_reads(self._loop(), self.call_then, next_read, handle, behind_tasks, ahead)

    def call_merged(
        self, fn: Mergeable, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """A call of ``fn`` with ``keys`` and ``args``, which leaves with the other
        calls of ``fn`` that wait for the same write as one call (see
        :class:`Mergeable`); its answer is this call's."""
        fut: asyncio.Future[Any] = self._loop().create_future()
        merge = self._merges.get(fn)
        if merge is not None and merge.open:
            merge.join(keys, args, fut)
        else:
            merge = self._merges[fn] = _Merge(fn)
            merge.join(keys, args, fut)  # (before it can leave: _add may send it)
            self._add(merge, merge, True)  # type: ignore[arg-type]
        return fut

    def _call(self, args: Sequence[Any], resend: bool) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop().create_future()
        self._add(args, fut, resend)
        return fut

    def _add(self, command: Sequence[Any] | _Merge, fut: asyncio.Future[Any], resend: bool) -> None:
        self._pending.append((command, fut, self._loop().time(), resend))
        wire = self._wire
        if (
            len(self._pending) == 1
            and not self._flush_soon
            and wire is not None
            and not wire.batches
            and not wire.closed
            and self.quiet is not None
            and self.quiet()
        ):
            # A quiet process (one request in hand) with nothing on the wire would
            # only wait a loop turn for company that does not come, on the request's
            # path. What is called after it waits for its round trip, as any command
            # does while one is on the wire.
            self._flush()
        else:
            self._flush_later()

    def _flush_later(self) -> None:
        """Write what waits on the next loop turn: every command called until then
        joins it."""
        if self._pending and not self._flush_soon:
            self._flush_soon = True
            self._loop().call_soon(self._flush)

    def lagging(self) -> bool:
        """Whether this process's event loop runs late now (beyond the tolerance)."""
        return self._lag is not None and self._lag() > LAG_TOLERANCE_S

    def _flush(self) -> None:
        self._flush_soon = False
        if not self._pending:
            return
        if self._closed:
            pending, self._pending = self._pending, []
            _fail([p[1] for p in pending], NotSent("the batcher is closed"))
            return
        wire = self._wire
        if wire is None or wire.closed:
            self._connect()
            self._watch_waiting()
            return
        if len(wire.batches) >= self._max_in_flight:
            self._watch_waiting()
            return  # leaves when a round trip ends
        batch, self._pending = self._pending, []
        now = self._loop().time()
        deadline = batch[0][2] + self._timeout
        if deadline <= now and self.lagging():
            deadline = now + self._timeout  # the wait was this process's lateness
        futures = [p[1] for p in batch]
        if deadline <= now:
            _fail(futures, NotSent("Redis did not answer in time"))
            return
        commands: list[Sequence[Any]] = [
            c.command() if isinstance(c, _Merge) else c for c, _, _, _ in batch
        ]
        resend = [p[3] for p in batch]
        each = None
        if any(isinstance(f, _Then) for f in futures):
            each = functools.partial(_then_now, futures, resend)
        answered = functools.partial(self._answered, commands, futures, resend)
        wire.send(commands, answered, deadline, each)

    def _watch_waiting(self) -> None:
        """Fail the commands that waited to be sent past their timeout (unless the
        event loop is late), now or when the first of them reaches it."""
        deadlines = self._loop.deadlines()
        if self._waiting_at is not None:
            deadlines.drop(self._waiting_at, self._watcher)
            self._waiting_at = None
        if not self._pending:
            return
        now = deadlines.loop.time()
        if self.lagging():
            when = now + self._timeout
        else:
            expired = [p for p in self._pending if p[2] + self._timeout <= now]
            if expired:
                self._pending = [p for p in self._pending if p[2] + self._timeout > now]
                _fail([p[1] for p in expired], NotSent("Redis did not answer in time"))
            if not self._pending:
                return
            when = self._pending[0][2] + self._timeout
        self._waiting_at = deadlines.add(when, self._watcher)

    def _answered(
        self,
        commands: list[Sequence[Any]],
        futures: list[asyncio.Future[Any]],
        resend: list[bool],
        results: list[Any] | BaseException,
        started: float,
    ) -> None:
        """A round trip's end: every caller gets its result or the round trip's error."""
        if isinstance(results, BaseException):
            _fail(futures, results)
        else:
            loop = self._loop()
            self.last_ok = loop.time()
            if self._round_trip is not None:
                self._round_trip.observe(time.perf_counter() - started)
            if any(again and _unknown(r) for again, r in zip(resend, results, strict=True)):
                task = loop.create_task(self._send_again(commands, futures, results))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                _settle(futures, results)
        self._flush_later()

    async def _send_again(
        self, commands: list[Sequence[Any]], futures: list[asyncio.Future[Any]], results: list[Any]
    ) -> None:
        """The second round trip of commands Redis did not know (see :func:`execute`)."""
        try:
            results = await _resend_unknown(commands, results, self._round_trip_of)
        except BaseException as e:
            _fail(futures, e if isinstance(e, Exception) else ConnectionError("cancelled"))
            raise
        _settle(futures, results)

    async def _round_trip_of(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Results of ``commands`` in one round trip, errors as results."""
        futures = [self._call(c, False) for c in commands]
        done = await asyncio.gather(*futures, return_exceptions=True)
        return list(done)

    def _connect(self) -> None:
        if self._connecting is None and not self._closing:
            self._connecting = self._loop().create_task(self._open())

    async def _open(self) -> None:
        """Take a connection from the client's pool and speak on it directly."""
        pool = self._client.connection_pool
        try:
            async with asyncio.timeout(self._timeout):
                conn = await pool.get_connection()
        except (Exception, asyncio.CancelledError) as e:
            self._connecting = None
            err = e if isinstance(e, Exception) else NotSent("the batcher is closed")
            if not isinstance(err, NotSent) and isinstance(err, TimeoutError):
                err = RedisConnectionError("Error connecting to Redis: no connection in time")
            pending, self._pending = self._pending, []
            _fail([p[1] for p in pending], err)
            # A handshake cut short leaves its connection in the pool looking
            # connected, with the handshake's replies still to come: drop it.
            try:
                await pool.disconnect(inuse_connections=False)
            finally:
                if isinstance(e, asyncio.CancelledError):
                    raise  # the cancellation goes on
            return
        self._connecting = None
        if self._closing:
            await pool.release(conn)
            return
        self._wire = _Wire(self, conn)
        self._flush()

    def _lost(self, wire: _Wire) -> None:
        """A wire closed (its in-flight callers have heard why): give its connection
        back to the pool, disconnected, so that a new one is made on next use."""
        if self._wire is wire:
            self._wire = None
        task = self._loop().create_task(self._return(wire.conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._flush_later()

    async def _return(self, conn: Any) -> None:
        await conn.disconnect(nowait=True)
        await self._client.connection_pool.release(conn)

    async def close(self, wait: bool = True) -> None:
        """Send what was called and wait for the round trips on the wire (each
        within its timeout), then give the connection back. With ``wait=False``
        (a blocking read may be on the wire) they fail at once."""
        self._closing = True
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        wire = self._wire
        if wire is not None:
            while wait and not wire.closed and (wire.batches or self._pending):
                if not wire.batches:
                    self._flush()
                await wire.idle()
        self._closed = True
        if self._waiting_at is not None:
            self._loop.deadlines().drop(self._waiting_at, self._watcher)
            self._waiting_at = None
        if wire is not None:
            wire.close(ConnectionError("the batcher is closed"))
        self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()


#: How many reads a stream reader sends together (``Batcher.reads``): one write per
#: four answers where they come one at a time (the reply reader, the queue reader).
READ_AHEAD = 4


def stream_reader(cfg: RedisConfig, block_ms: int, ahead: int = 1) -> Readers:
    """A batcher on a connection of its own, for blocking stream reads (``XREAD`` or
    ``XREADGROUP ... BLOCK``): what arrives reaches the reader in the step that
    reads it. A round trip may take ``ahead`` blocks (reads sent together, see
    :meth:`Batcher.reads`) plus ``command_timeout_s``. Close it with
    ``close(wait=False)`` (a read may be blocking); that closes its client. On a
    Cluster, a connection of its own to each node it reads from."""
    timeout = ahead * block_ms / 1000 + cfg.command_timeout_s
    if cfg.cluster:
        from llm_broker.shared.cluster import cluster_batcher

        return cluster_batcher(cfg, timeout=timeout, max_connections=1)
    client = connect(cfg, max_connections=1)
    return Batcher(client, timeout=timeout, owns_client=True)


def _then_now(futures: list[Any], resend: list[bool], i: int, reply: Any) -> None:
    """The answer to command ``i`` of a round trip, as it arrives: given at once to
    a caller of :meth:`Batcher.call_then` (its other callers get theirs when the
    round trip ends; a function Redis did not know waits for its second sending)."""
    then = futures[i]
    if not isinstance(then, _Then) or then.done():
        return
    if isinstance(reply, Exception):
        if resend[i] and _unknown(reply):
            return
        then.set_exception(reply)
    else:
        then.set_result(reply)


class _Then:
    """A caller of :meth:`Batcher.call_then`, in a future's place."""

    __slots__ = ("_done", "_then")

    def __init__(self, then: Callable[[Any, BaseException | None], None]) -> None:
        self._then = then
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: Any) -> None:
        self._done = True
        self._run(result, None)

    def set_exception(self, error: BaseException) -> None:
        self._done = True
        self._run(None, error)

    def _run(self, result: Any, error: BaseException | None) -> None:
        try:
            self._then(result, error)
        except Exception:  # the reader's defect must not break the connection's reading
            log.exception("a reader's callback failed")


def chain_reads(
    loop: asyncio.AbstractEventLoop,
    call_then: Callable[..., None],
    next_read: Callable[[], tuple[Any, ...] | None],
    handle: Callable[[Any], None],
    behind_tasks: bool,
    ahead: int = 1,
) -> asyncio.Future[None]:
    """:meth:`Batcher.reads` over any ``call_then`` (a node's batcher, or a
    cluster's, which routes each read to the node of its stream)."""
    done: asyncio.Future[None] = loop.create_future()
    out = 0  # reads sent and not answered yet
    last = False  # next_read() gave None: the reads end once those out answer

    def ask() -> None:
        nonlocal out, last
        if done.done():  # stopped (or cancelled) meanwhile
            return
        while not last and out < ahead:
            try:
                command = next_read()
            except Exception as e:
                done.set_exception(e)
                return
            if command is None:
                last = True
            else:
                out += 1
                call_then(answered, *command)
        if not out:
            done.set_result(None)

    def answered(result: Any, error: BaseException | None) -> None:
        nonlocal out
        out -= 1
        if done.done():  # the reader stopped
            return
        if error is not None:
            done.set_exception(error)
            return
        try:
            handle(result)
        except Exception as e:
            done.set_exception(e)
            return
        if out:
            return  # the next reads leave when those out have answered
        if behind_tasks:
            loop.call_soon(ask)
        else:
            ask()

    ask()
    return done


def _fail(futures: Sequence[asyncio.Future[Any]], error: BaseException) -> None:
    for fut in futures:
        if not fut.done():
            fut.set_exception(error)


def _settle(futures: Sequence[asyncio.Future[Any]], results: Sequence[Any]) -> None:
    for fut, result in zip(futures, results, strict=True):
        if fut.done():
            continue
        if isinstance(result, Exception):
            fut.set_exception(result)
        else:
            fut.set_result(result)


#: A round trip's timeout is extended while the event loop is this late...
LAG_TOLERANCE_S = 0.1
#: ...up to this many times the timeout in all.
MAX_EXTENSIONS = 10

_NOT_ENOUGH_DATA = object()

Answered = Callable[[list[Any] | BaseException, float], None]
Each = Callable[[int, Any], None]


class _Callback:
    """A function as an entry of shared/loop.py's Deadlines."""

    __slots__ = ("expire",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.expire = fn


class _RoundTrip:
    """Commands written together: a response callback each, the replies so far,
    and the bucket of their timeout's deadline (shared/loop.py's Deadlines; the
    timeout is extended up to ``cap`` while the loop is late)."""

    __slots__ = ("answered", "callbacks", "cap", "due", "each", "results", "started", "wire")

    def __init__(
        self,
        wire: _Wire,
        callbacks: list[Any],
        answered: Answered,
        cap: float,
        each: Each | None = None,
    ) -> None:
        self.wire = wire
        self.callbacks = callbacks
        self.answered = answered
        #: Told each reply as it arrives (its index, the reply): see _then_now.
        self.each = each
        self.results: list[Any] = []
        self.started = time.perf_counter()
        self.cap = cap
        self.due: int | None = None

    def expire(self) -> None:
        self.due = None
        self.wire._expire(self)


class _Wire(asyncio.Protocol):
    """A Redis connection read as its replies arrive: they are parsed by hiredis in
    ``data_received`` and each round trip's callback runs when its last reply is
    in. The connection is made by redis-py's pool (which speaks to Sentinel, does
    TLS and AUTH), then its transport is handed to this protocol.

    A round trip that outlives its deadline closes the connection (later replies
    could no longer be matched to their commands); so does a reply saying the node
    is a replica now (a failover: the next connection goes to the new primary).
    The timeout does not count the event loop's own lateness: when it fires while
    the loop is late (the replies may be waiting unread), it waits one more
    timeout, up to ``MAX_EXTENSIONS`` timeouts in all.
    """

    def __init__(self, batcher: Batcher, conn: Any) -> None:
        self._batcher = batcher
        self._loop = batcher._loop()
        self._deadlines = batcher._loop.deadlines()
        self._timeout = batcher._timeout
        self.conn = conn
        self._callbacks = batcher._client.response_callbacks
        self.batches: deque[_RoundTrip] = deque()
        self.closed = False
        self._idle: asyncio.Future[None] | None = None
        self._reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=BaseParser.parse_error,
            notEnoughData=_NOT_ENOUGH_DATA,
        )
        reader, writer = conn._reader, conn._writer
        self._transport: asyncio.Transport = writer.transport
        leftover = bytes(reader._buffer) if reader is not None else b""
        #: redis-py's protocol: told when the connection ends, so that its
        #: ``disconnect()`` (on the pool's ``disconnect``) does not wait forever.
        self._stream = self._transport.get_protocol()
        self._transport.set_protocol(self)
        if leftover:
            self.data_received(leftover)

    def send(
        self,
        commands: list[Sequence[Any]],
        answered: Answered,
        deadline: float,
        each: Each | None = None,
    ) -> None:
        try:
            data = b"".join(_pack(c) for c in commands)
        except Exception as e:  # an argument Redis's protocol cannot carry: nothing left
            answered(e, time.perf_counter())
            return
        callbacks = [self._callbacks.get(c[0]) for c in commands]
        deadlines = self._deadlines
        cap = deadlines.loop.time() + MAX_EXTENSIONS * self._timeout
        trip = _RoundTrip(self, callbacks, answered, cap, each)
        trip.due = deadlines.add(deadline, trip)
        self.batches.append(trip)
        self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        reader, batches = self._reader, self.batches
        while batches:
            try:
                reply = reader.gets()
            except InvalidResponse as e:
                self.close(RedisConnectionError(f"Protocol error from Redis: {e}"))
                return
            if reply is _NOT_ENOUGH_DATA:
                return
            trip = batches[0]
            if isinstance(reply, ReadOnlyError):
                # The node is a replica now: what it answers is not the primary's.
                self.close(RedisConnectionError("The previous master is now a slave"))
                return
            if not isinstance(reply, Exception):
                callback = trip.callbacks[len(trip.results)]
                if callback is not None:
                    try:
                        reply = callback(reply)
                    except Exception as e:  # a form of the reply redis-py does not parse
                        reply = e
            trip.results.append(reply)
            if trip.each is not None:
                trip.each(len(trip.results) - 1, reply)
            if len(trip.results) == len(trip.callbacks):
                batches.popleft()
                if trip.due is not None:
                    self._deadlines.drop(trip.due, trip)
                trip.answered(trip.results, trip.started)
                if not batches and self._idle is not None and not self._idle.done():
                    self._idle.set_result(None)

    def _expire(self, trip: _RoundTrip) -> None:
        loop = self._loop
        now = loop.time()
        if now < trip.cap and self._batcher.lagging():
            trip.due = self._deadlines.add(min(trip.cap, now + self._timeout), trip)
        else:
            self.close(TimeoutError("Redis did not answer in time"), first=trip)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stream.connection_lost(exc)
        self.close(RedisConnectionError("Connection closed by server."))

    def close(self, error: BaseException, first: _RoundTrip | None = None) -> None:
        """Close the connection; every round trip on it fails: ``first`` (the one
        that timed out) with ``error``, the others as a lost connection would."""
        if self.closed:
            return
        self.closed = True
        self._transport.close()
        lost = error if first is None else RedisConnectionError("Connection closed by server.")
        while self.batches:
            trip = self.batches.popleft()
            if trip.due is not None:
                self._deadlines.drop(trip.due, trip)
            trip.answered(error if trip is first or first is None else lost, trip.started)
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
        self._batcher._lost(self)

    async def idle(self) -> None:
        """Return when no round trip is on the wire."""
        if self.batches and not self.closed:
            self._idle = self._loop.create_future()
            await self._idle


def _pack(command: Sequence[Any]) -> bytes:
    """One command in Redis's protocol, packed by hiredis (C); redis-py's asyncio
    connections pack in Python, which was about a tenth of ingress and worker CPU."""
    first = command[0]
    if isinstance(first, str) and " " in first:  # e.g. "XINFO GROUPS"
        command = (*first.split(), *command[1:])
    elif isinstance(first, bytes) and b" " in first:
        command = (*first.split(), *command[1:])
    packed: bytes = hiredis.pack_command(tuple(command))
    return packed


async def execute(client: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """Run ``commands`` in one round trip; a command's error is its result.

    Scripts and functions Redis does not know yet (first use, or Redis restarted)
    are sent again in a second round trip: a script with its text, a function
    after its library is loaded.
    """
    results = await _pipeline(client, commands)
    return await _resend_unknown(commands, results, functools.partial(_pipeline, client))


async def _resend_unknown(
    commands: Sequence[Sequence[Any]],
    results: list[Any],
    round_trip: Callable[[Sequence[Sequence[Any]]], Awaitable[list[Any]]],
) -> list[Any]:
    """``results`` with those of the commands Redis did not know sent again."""
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
        retried = await round_trip([*loads, *(_with_text(commands[i]) for i in missing)])
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
