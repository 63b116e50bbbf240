"""Redis Cluster: commands routed to the primary that serves their key's slot.

A :class:`ClusterBatcher` keeps one :class:`~llm_broker.shared.redisio.Batcher`
per primary and the map of which primary serves each of the 16,384 hash slots
(``CLUSTER SLOTS``, asked of any node that answers). A command goes to the
batcher of its key's slot, so the commands of many callers to one node still
leave together. Redirections are followed: ``MOVED`` (the slot lives elsewhere
now: the map is asked again, the command goes to the named node), ``ASK`` (the
slot is being migrated and the key is on the target already: ``ASKING`` then the
command, on the target), ``TRYAGAIN``, ``CLUSTERDOWN`` and ``UNBLOCKED`` (a
migration or a failover in progress: sent again shortly), at most
:data:`MAX_REDIRECTS` times.
None of these ran the command, so sending it again is safe.

A command's key is its first (``FCALL``/``EVALSHA``: the first of its keys;
``XREAD``/``XREADGROUP``: the first stream). A command without one (``PING``,
``TIME``, an ``FCALL`` of no keys) goes to any primary.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import parse_url
from redis.crc import key_slot
from redis.exceptions import ResponseError

from llm_broker.shared.config import RedisConfig
from llm_broker.shared.loop import LoopRef
from llm_broker.shared.redisio import (
    REDIS_DOWN,
    Batcher,
    FilePassword,
    Mergeable,
    Observer,
    chain_reads,
    node_client,
)

log = logging.getLogger("llm_broker.redis")

SLOTS = 16384
#: A command follows at most this many redirections before its caller hears the last.
MAX_REDIRECTS = 5
#: ``TRYAGAIN``/``CLUSTERDOWN``: the wait before the n-th try is n times this.
RETRY_DELAY_S = 0.05

#: The commands whose first argument is not their key (and that have one).
_KEYS_AT: dict[str, Callable[[Sequence[Any]], Any]] = {}

Then = Callable[[Any, BaseException | None], None]
#: A node that cannot give the slot map: the next one is asked.
_NO_MAP: tuple[type[Exception], ...] = (*REDIS_DOWN, ResponseError)


def _numkeys(command: Sequence[Any]) -> Any:
    return command[3] if int(command[2]) > 0 else None


def _streams(command: Sequence[Any]) -> Any:
    for i, word in enumerate(command):
        if isinstance(word, str | bytes) and _text(word).upper() == "STREAMS":
            return command[i + 1]
    return None


for _name in ("FCALL", "FCALL_RO", "EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO"):
    _KEYS_AT[_name] = _numkeys
_KEYS_AT["XREAD"] = _streams
_KEYS_AT["XREADGROUP"] = _streams
#: Commands of no key: any primary answers them.
_KEYLESS = frozenset(
    ("PING", "TIME", "INFO", "FUNCTION", "SCRIPT", "CLUSTER", "WAIT", "PUBLISH", "ECHO", "DBSIZE")
)


def key_of(command: Sequence[Any]) -> Any:
    """The key that decides where ``command`` runs, or None when any node will do."""
    name = command[0]
    name = (name.decode() if isinstance(name, bytes) else name).upper()
    if " " in name:  # e.g. "XINFO GROUPS <stream>"
        return command[1] if len(command) > 1 else None
    if name in _KEYLESS or len(command) < 2:
        return None
    find = _KEYS_AT.get(name)
    return find(command) if find is not None else command[1]


def slot_of(key: Any) -> int:
    return int(key_slot(key if isinstance(key, bytes) else str(key).encode()))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_slots(reply: Sequence[Any], asked: str) -> list[str | None]:
    """``CLUSTER SLOTS``'s answer as the address ("host:port") serving each slot.
    A node that does not know its own address names it ''; ``asked`` (the address
    of the node that answered) stands in for it."""
    owners: list[str | None] = [None] * SLOTS
    asked_host = asked.rsplit(":", 1)[0]
    for entry in reply:
        start, end, primary = int(entry[0]), int(entry[1]), entry[2]
        host = _text(primary[0]) or asked_host
        address = f"{host}:{int(primary[1])}"
        for slot in range(start, end + 1):
            owners[slot] = address
    return owners


def _redirect(error: BaseException) -> tuple[str, int, str] | None:
    """("MOVED" or "ASK", slot, address) of a redirection, else None."""
    if not isinstance(error, ResponseError):
        return None
    words = str(error).split()
    if len(words) == 3 and words[0] in ("MOVED", "ASK"):
        return words[0], int(words[1]), words[2]
    return None


def _busy(error: BaseException) -> bool:
    """A migration or failover under way: the same command may work shortly. (A
    read blocked on a stream that was migrated away ends with UNBLOCKED; sent
    again, it is redirected to the stream's new node.)"""
    return isinstance(error, ResponseError) and str(error).startswith(
        ("TRYAGAIN", "CLUSTERDOWN", "UNBLOCKED")
    )


class ClusterBatcher:
    """The :class:`Batcher`'s calls (``call``, ``call_then``, ``reads``) on a
    Redis Cluster: each command on the batcher of its slot's primary."""

    def __init__(
        self,
        seeds: Sequence[str],
        node_client: Callable[[str, int], aioredis.Redis],
        *,
        timeout: float,
        max_in_flight: int = 1,
        round_trip: Observer | None = None,
        lag: Callable[[], float] | None = None,
    ) -> None:
        #: Addresses ("host:port") asked for the slot map until one answers.
        self._seeds = list(seeds)
        self._node_client = node_client
        self._timeout = timeout
        self._options: dict[str, Any] = {
            "timeout": timeout,
            "max_in_flight": max_in_flight,
            "round_trip": round_trip,
            "lag": lag,
            "owns_client": True,
        }
        self._nodes: dict[str, Batcher] = {}
        #: The primary of each slot (None: the map is not known yet).
        self._owners: list[str | None] | None = None
        #: Commands that wait for the first map: (command, then, tries).
        self._unrouted: list[tuple[tuple[Any, ...], Then, int]] = []
        self._refresh: asyncio.Task[None] | None = None
        #: Asked for while a refresh ran: one more follows it.
        self._stale = False
        self._quiet: Callable[[], bool] | None = None
        self._closed = False
        self._loop = LoopRef()
        self._tasks: set[asyncio.Task[Any]] = set()

    # The Batcher's interface ---------------------------------------------------

    @property
    def quiet(self) -> Callable[[], bool] | None:
        return self._quiet

    @quiet.setter
    def quiet(self, quiet: Callable[[], bool] | None) -> None:
        self._quiet = quiet
        for node in self._nodes.values():
            node.quiet = quiet

    @property
    def last_ok(self) -> float:
        """When (loop time) a round trip to any primary last succeeded."""
        return max((node.last_ok for node in self._nodes.values()), default=-1e9)

    def lagging(self) -> bool:
        return any(node.lagging() for node in self._nodes.values())

    def call(self, *args: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop().create_future()

        def then(result: Any, error: BaseException | None) -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

        self._route(args, then, 0)
        return fut

    def call_merged(
        self, fn: Mergeable, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """A call of ``fn`` on its own: each command here goes to its slot's node, and
        is sent again where the slot moved, one by one."""
        return self.call(*fn.one.command(keys, args))

    def call_then(self, then: Then, *args: Any) -> None:
        self._route(args, then, 0)

    def reads(
        self,
        next_read: Callable[[], tuple[Any, ...] | None],
        handle: Callable[[Any], None],
        *,
        behind_tasks: bool = False,
        ahead: int = 1,
    ) -> asyncio.Future[None]:
        """Blocking reads one after another (see :meth:`Batcher.reads`), each on the
        primary of its stream: a stream whose slot moves is read on its new node."""
        return chain_reads(self._loop(), self.call_then, next_read, handle, behind_tasks, ahead)

    async def close(self, wait: bool = True) -> None:
        self._closed = True
        if self._refresh is not None:
            self._refresh.cancel()
        unrouted, self._unrouted = self._unrouted, []
        for _, then, _ in unrouted:
            then(None, ConnectionError("the batcher is closed"))
        await asyncio.gather(
            *(node.close(wait) for node in self._nodes.values()),
            *self._tasks,
            return_exceptions=True,
        )

    # Routing -------------------------------------------------------------------

    def node(self, address: str) -> Batcher:
        """The batcher of the primary at ``address`` ("host:port")."""
        batcher = self._nodes.get(address)
        if batcher is None:
            host, port = address.rsplit(":", 1)
            batcher = Batcher(self._node_client(host, int(port)), **self._options)
            batcher.quiet = self._quiet
            self._nodes[address] = batcher
        return batcher

    def address_of(self, command: Sequence[Any]) -> str | None:
        """The primary that ``command`` goes to (None: the map is not known yet)."""
        owners = self._owners
        if owners is None:
            return None
        key = key_of(command)
        if key is not None:
            return owners[slot_of(key)]
        return next((a for a in owners if a is not None), None)

    def _route(
        self, command: tuple[Any, ...], then: Then, tries: int, to: str | None = None
    ) -> None:
        if self._closed:
            then(None, ConnectionError("the batcher is closed"))
            return
        address = to or self.address_of(command)
        if address is None:  # no map yet, or a slot no primary serves
            self._unrouted.append((command, then, tries))
            self._refresh_map()
            return
        self.node(address).call_then(
            lambda result, error: self._answered(command, then, tries, address, result, error),
            *command,
        )

    def _answered(
        self,
        command: tuple[Any, ...],
        then: Then,
        tries: int,
        address: str,
        result: Any,
        error: BaseException | None,
    ) -> None:
        if error is None or tries >= MAX_REDIRECTS:
            if error is not None and isinstance(error, REDIS_DOWN):
                self._refresh_map()  # the node may have failed over, or left
            then(result, error)
            return
        redirect = _redirect(error)
        if redirect is not None:
            kind, slot, target = redirect
            if kind == "MOVED":
                if self._owners is not None:
                    self._owners[slot] = target
                self._refresh_map()
                self._route(command, then, tries + 1, target)
            else:  # ASK: this command only, on the target, right after ASKING
                node = self.node(target)
                node.call_then(_ignore, "ASKING")
                node.call_then(
                    lambda r, e: self._answered(command, then, tries + 1, target, r, e), *command
                )
            return
        if _busy(error):
            loop = self._loop()
            loop.call_later(RETRY_DELAY_S * (tries + 1), self._route, command, then, tries + 1)
            return
        if isinstance(error, REDIS_DOWN):
            self._refresh_map()
        then(result, error)

    def _refresh_map(self) -> None:
        if self._closed:
            return
        if self._refresh is not None:
            self._stale = True
            return
        self._refresh = self._loop().create_task(self._load_map())

    async def _load_map(self) -> None:
        """Ask the known primaries, then the seeds, for the slot map until one
        answers; then send what waited for it."""
        try:
            while True:
                self._stale = False
                candidates = [*self._nodes, *(s for s in self._seeds if s not in self._nodes)]
                error: BaseException | None = None
                for address in candidates:
                    try:
                        async with asyncio.timeout(self._timeout):
                            reply = await self.node(address).call("CLUSTER", "SLOTS")
                    except _NO_MAP as e:
                        error = e
                        continue
                    self._owners = parse_slots(reply, address)
                    break
                else:
                    self._fail_unrouted(error or ConnectionError("no Redis Cluster node answered"))
                    return
                if not self._stale:
                    break
        finally:
            self._refresh = None
        self._drop_gone()
        unrouted, self._unrouted = self._unrouted, []
        for command, then, tries in unrouted:
            if self.address_of(command) is None:
                then(None, ResponseError(f"CLUSTERDOWN no node serves the slot of {command[0]}"))
            else:
                self._route(command, then, tries)

    def _fail_unrouted(self, error: BaseException) -> None:
        unrouted, self._unrouted = self._unrouted, []
        for _, then, _ in unrouted:
            then(None, error)

    def _drop_gone(self) -> None:
        """Close the batchers of nodes that no longer serve a slot (left the
        cluster, or became replicas)."""
        owners = self._owners
        if owners is None:
            return
        serving = set(owners)
        for address in [a for a in self._nodes if a not in serving and a not in self._seeds]:
            node = self._nodes.pop(address)
            task = self._loop().create_task(node.close())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _ignore(result: Any, error: BaseException | None) -> None:
    """The answer to ``ASKING`` (its failure shows in the command after it)."""


def seeds(cfg: RedisConfig) -> list[str]:
    """The nodes asked for the slot map: ``redis.url``'s, then ``redis.nodes``."""
    url = parse_url(cfg.url)
    first = f"{url.get('host', '127.0.0.1')}:{url.get('port', 6379)}"
    return [first, *(n for n in cfg.nodes if n != first)]


def cluster_batcher(
    cfg: RedisConfig,
    *,
    timeout: float,
    max_connections: int = 1,
    max_in_flight: int = 1,
    round_trip: Observer | None = None,
    lag: Callable[[], float] | None = None,
) -> ClusterBatcher:
    """A :class:`ClusterBatcher` whose node connections use ``redis.url``'s
    credentials and TLS (and ``redis.password_file``)."""
    return ClusterBatcher(
        seeds(cfg),
        lambda host, port: node_client(cfg, host, port, max_connections),
        timeout=timeout,
        max_in_flight=max_in_flight,
        round_trip=round_trip,
        lag=lag,
    )


def cluster_client(
    cfg: RedisConfig, *, socket_timeout: float | None = None, max_connections: int = 64
) -> aioredis.Redis:
    """redis-py's Cluster client, for what is not on the request path (it routes
    each command to its slot's node, and follows redirections)."""
    url: dict[str, Any] = dict(parse_url(cfg.url))
    options: dict[str, Any] = {
        "username": url.get("username"),
        "password": url.get("password"),
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": cfg.connect_timeout_s,
        "max_connections": max_connections,
    }
    if cfg.password_file:
        options.pop("password")
        options["credential_provider"] = FilePassword(cfg.password_file, options.pop("username"))
    if cfg.url.startswith("rediss:"):
        options["ssl"] = True
        for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs"):
            if name in url:
                options[name] = url[name]
    nodes = [ClusterNode(*_address(n)) for n in seeds(cfg)]
    client: aioredis.Redis = RedisCluster(startup_nodes=nodes, **options)
    return client


def _address(node: str) -> tuple[str, int]:
    host, _, port = node.rpartition(":")
    return host, int(port)
