"""The Redis connection settings: passwords from files (rotated without a restart),
the Sentinel settings' checks, and WAIT sent after the write it waits for; an
admission no replica confirmed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from llm_broker.dev import free_port
from llm_broker.shared.config import ConfigError, parse_config
from llm_broker.shared.redisio import Batcher, Script, _HiredisPacking, connect, execute
from tests.conftest import ConfigFactory, Procs, RedisServer, answering, chat, start_sentinel
from tests.helpers import eventually


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone that wants a password."""
    server = RedisServer(tmp_path, ("--requirepass", "first"))
    server.start()
    yield server
    server.stop()


async def test_the_password_file_is_read_at_each_new_connection(
    protected: RedisServer, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("first\n")
    config = parse_config(
        {
            "redis": {
                "url": f"redis://:wrong@127.0.0.1:{protected.port}/0",
                "password_file": str(secret),
            }
        }
    )
    client = connect(config.redis)
    try:
        assert await client.ping()  # the file's password, not the URL's
        # The password rotates: Redis takes the new one, the file is updated.
        admin = aioredis.Redis(port=protected.port, password="first")
        await admin.config_set("requirepass", "second")
        await admin.aclose()
        secret.write_text("second\n")
        await client.connection_pool.disconnect()  # the next command opens a new connection
        assert await client.ping()
    finally:
        await client.aclose()


async def test_an_unreadable_password_file_is_a_connection_error_then_heals(
    protected: RedisServer, tmp_path: Path
) -> None:
    secret = tmp_path / "not-yet"
    config = parse_config(
        {"redis": {"url": f"redis://127.0.0.1:{protected.port}/0", "password_file": str(secret)}}
    )
    client = connect(config.redis, max_connections=1)
    try:
        with pytest.raises(RedisConnectionError, match="cannot read the password file"):
            await client.ping()
        secret.write_text("first")  # the Secret is mounted: the next connection works
        assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_commands_are_packed_by_hiredis_with_and_without_tls(scheme: str) -> None:
    config = parse_config({"redis": {"url": f"{scheme}://127.0.0.1:6390/0"}})
    pool = connect(config.redis).connection_pool
    assert issubclass(pool.connection_class, _HiredisPacking)
    assert issubclass(pool.connection_class, aioredis.SSLConnection) == (scheme == "rediss")


@pytest.mark.parametrize(
    ("redis", "says"),
    [
        ({"sentinel": {"addresses": []}}, "at least one sentinel"),
        ({"sentinel": {"addresses": ["sentinel-0"]}}, "is not host:port"),
        ({"sentinel": {"addresses": ["sentinel-0:port"]}}, "is not host:port"),
        ({"min_replicas_acked": -1}, "0 or more"),
        ({"min_replicas_acked": 1, "min_replicas_timeout_ms": 750}, "shorter than"),
    ],
)
def test_bad_redis_settings_are_refused_with_the_reason(
    redis: dict[str, object], says: str
) -> None:
    with pytest.raises(ConfigError, match=says):
        parse_config({"redis": redis})


def test_sentinel_addresses_are_hosts_and_ports() -> None:
    config = parse_config({"redis": {"sentinel": {"addresses": ["s0.redis:26379", "[::1]:26380"]}}})
    assert config.redis.sentinel is not None
    assert config.redis.sentinel.hosts() == [("s0.redis", 26379), ("::1", 26380)]
    assert config.redis.sentinel.service_name == "mymaster"


async def test_a_wait_is_sent_again_after_the_script_it_followed(
    redis_up: RedisServer, prefix: str
) -> None:
    """A script Redis does not know yet is sent again with its text, in a second round
    trip: the WAIT behind it must follow it there, or it would count nothing."""
    client = aioredis.Redis.from_url(redis_up.url)
    try:
        script = Script(f"-- {prefix}\nreturn redis.call('INCR', KEYS[1])")
        before = await client.info("commandstats")
        results = await execute(client, [script.command([f"{prefix}n"], []), ("WAIT", 0, 0)])
        after = await client.info("commandstats")
    finally:
        await client.aclose()
    assert results == [1, 0]
    waits = after["cmdstat_wait"]["calls"] - before.get("cmdstat_wait", {"calls": 0})["calls"]
    assert waits == 2  # once after the unknown script, once after it ran


async def test_an_admission_no_replica_confirmed_names_its_job(
    procs: Procs, make_config: ConfigFactory, http: aiohttp.ClientSession
) -> None:
    """``min_replicas_acked`` on a Redis without replicas: the job is admitted on the
    primary but not acknowledged; the 503 says so and names it, and it runs."""
    _, mock_url = procs.mock()
    config = make_config(mock_url, redis={"min_replicas_acked": 1, "min_replicas_timeout_ms": 50})
    procs.worker(config)
    _, url = procs.ingress(config)
    async with http.post(f"{url}/v1/jobs", json={"request": chat("mock", "hi")}) as resp:
        body = await resp.json()
        assert resp.status == 503, body
        assert resp.headers["Retry-After"] == "1"
    job_id = body["error"]["job_id"]
    assert f"GET /v1/jobs/{job_id}" in body["error"]["message"]

    async def done() -> dict[str, Any] | None:
        async with http.get(f"{url}/v1/jobs/{job_id}") as resp:
            assert resp.status == 200
            job: dict[str, Any] = await resp.json()
            return job if job["status"] == "completed" else None

    assert (await eventually(done, what="the unacknowledged job to complete"))["result"]


class NamingSentinels:
    """``redis-server --sentinel`` processes, each naming a primary of its own under
    a configuration epoch of its own: the views of sentinels that disagree, as just
    after a failover."""

    SERVICE = "svc"

    def __init__(self, directory: Path, views: list[tuple[int, int]]) -> None:
        self.ports = [free_port() for _ in views]
        self.procs = [
            start_sentinel(
                directory,
                port,
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {primary} 1\n"
                f"sentinel config-epoch {self.SERVICE} {epoch}\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 60000\n",
            )
            for port, (primary, epoch) in zip(self.ports, views, strict=True)
        ]
        for port in self.ports:
            answering(port, "SENTINEL", "MASTER", self.SERVICE)

    def config(self) -> Any:
        addresses = [f"127.0.0.1:{p}" for p in self.ports]
        return parse_config(
            {
                "redis": {
                    "url": "redis://127.0.0.1:1/0",
                    "sentinel": {"addresses": addresses, "service_name": self.SERVICE},
                }
            }
        ).redis

    def name(self, primary: int) -> None:
        """Every sentinel now names ``primary`` (as after a failover)."""
        for port in self.ports:
            with redis.Redis(port=port) as client:
                client.execute_command("SENTINEL", "REMOVE", self.SERVICE)
                client.execute_command("SENTINEL", "MONITOR", self.SERVICE, "127.0.0.1", primary, 1)

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def two_primaries(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer]]:
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        server = RedisServer(tmp_path / name)
        server.start()
        servers.append(server)
    yield servers[0], servers[1]
    for server in servers:
        server.stop()


async def test_the_primary_named_under_the_newest_epoch_wins(
    two_primaries: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    old, new = two_primaries
    # The first sentinel has not heard of the failover: it names the old primary.
    sentinels = NamingSentinels(tmp_path, [(old.port, 1), (new.port, 2), (old.port, 1)])
    client = connect(sentinels.config())
    try:
        await client.set("written", "here")
    finally:
        await client.aclose()
        sentinels.stop()
    assert await _holds(new, "written")
    assert not await _holds(old, "written")


async def test_a_held_connection_follows_a_new_primary(
    two_primaries: tuple[RedisServer, RedisServer], tmp_path: Path
) -> None:
    """A batcher keeps its connection while it works, and a demoted primary may keep
    answering: the pool asks the sentinels while in use and moves every
    connection to the primary they name."""
    old, new = two_primaries
    sentinels = NamingSentinels(tmp_path, [(old.port, 1)])
    client = connect(sentinels.config())
    batcher = Batcher(client, timeout=2.0)
    try:
        await batcher.call("SET", "before", "1")
        sentinels.name(new.port)
        n = 0

        async def written_on_the_new_primary() -> bool:
            nonlocal n
            n += 1
            try:
                await batcher.call("SET", f"after{n}", "1")
            except RedisConnectionError:  # the connection it was on moved meanwhile
                return False
            return await _holds(new, f"after{n}")

        await eventually(written_on_the_new_primary, timeout=10, what="a write to the new one")
    finally:
        await batcher.close()
        await client.aclose()
        sentinels.stop()
    assert await _holds(old, "before")


async def _holds(server: RedisServer, key: str) -> bool:
    async with aioredis.Redis(port=server.port) as client:
        return bool(await client.exists(key))
