"""Webhook signing, the arq serializer, URL checks and one delivery attempt in-process.

The delivery tests run the real deliverer against the session's Redis and a
receiver on 127.0.0.1, with a resolver that answers like a DNS server under an
attacker's control would: a public-looking name that resolves to 127.0.0.1.
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.abc import AbstractResolver, ResolveResult
from arq.connections import ArqRedis, RedisSettings, create_pool
from prometheus_client import CollectorRegistry
from standardwebhooks.webhooks import Webhook

from llm_broker.shared.config import ConfigError, new_webhook_secret, parse_config
from llm_broker.shared.jobs import event_body, job_object
from llm_broker.shared.keys import Keys
from llm_broker.shared.metrics import WebhookMetrics
from llm_broker.shared.ssrf import BlockedURL, Ports, check_url, networks
from llm_broker.shared.store.records import JobRecord
from llm_broker.workers.webhooks import (
    Deliverer,
    deserialize,
    parse_secret,
    retry_after_seconds,
    serialize,
    signature,
)
from tests.conftest import Receiver, RedisServer

EVIL_NAME = "hooks.example-public.com"


class _EvilResolver(AbstractResolver):
    """Resolves every name to 127.0.0.1."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            {
                "hostname": host,
                "host": "127.0.0.1",
                "port": port,
                "family": socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        pass


async def _evil_resolve(host: str, port: int) -> list[str]:
    return ["127.0.0.1"]


def test_signatures_verify_with_the_standard_webhooks_library() -> None:
    old, new = new_webhook_secret(), new_webhook_secret()
    body = b'{"type":"job.completed"}'
    ts = int(time.time())
    header = signature([parse_secret(new), parse_secret(old)], "msg_1", ts, body)
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(ts), "webhook-signature": header}
    for secret in (old, new):
        assert Webhook(secret).verify(body, headers) == {"type": "job.completed"}


@pytest.mark.parametrize("bad", ["abc", "whsec_", "whsec_!!notbase64", "whsec_c2hvcnQ="])
def test_malformed_secrets_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="secret"):
        parse_secret(bad)


def test_arq_jobs_round_trip_through_msgspec_and_exceptions_become_text() -> None:
    job = {"t": 1, "f": "deliver", "a": ["abc"], "k": {}, "et": 123}
    assert deserialize(serialize(job)) == job
    result = deserialize(serialize({"r": RuntimeError("boom"), "s": False}))
    assert result == {"r": "RuntimeError('boom')", "s": False}


def test_retry_after_takes_seconds_and_http_dates() -> None:
    assert retry_after_seconds("120") == 120.0
    in_a_minute = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 60))
    parsed = retry_after_seconds(in_a_minute)
    assert parsed is not None and 55 <= parsed <= 61
    assert retry_after_seconds("soon") is None and retry_after_seconds(None) is None


def test_an_event_carries_the_job_with_its_result() -> None:
    rec = {
        b"status": b"completed",
        b"model": b"m",
        b"created_at": b"1700000000.5",
        b"completed_at": b"1700000001.25",
        b"result": b'{"object":"chat.completion"}',
        b"webhook_url": b"https://example.com/h",
    }
    record = JobRecord.from_hash(rec)
    event = msgspec.json.decode(event_body("abc", record))
    assert event["type"] == "job.completed"
    assert event["timestamp"] == "2023-11-14T22:13:21.250000Z"
    assert event["data"] == msgspec.json.decode(msgspec.json.encode(job_object("abc", record)))
    assert event["data"]["result"] == {"object": "chat.completion"}
    assert event["data"]["webhook"]["status"] == "pending"


async def test_a_public_looking_name_that_resolves_to_loopback_is_refused() -> None:
    with pytest.raises(BlockedURL, match="not a public address"):
        await check_url(f"https://{EVIL_NAME}/hook", (), _evil_resolve)
    allowed = await check_url(f"https://{EVIL_NAME}/hook", networks(["127.0.0.0/8"]), _evil_resolve)
    assert allowed == ["127.0.0.1"]


@pytest.mark.parametrize(
    "url",
    [
        "http://100.100.100.200/",  # a cloud metadata service outside link-local
        "http://[fd00:ec2::254]/",
        "http://224.0.0.1/",
        "http://0.0.0.0/",
        "http://user:pw@example.com/",
        "http:///nohost",
    ],
)
async def test_more_internal_urls_are_refused(url: str) -> None:
    with pytest.raises(BlockedURL):
        await check_url(url, (), _evil_resolve)


@pytest.mark.parametrize(
    "host",
    [
        "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
        "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
        "[64:ff9b:1::a9fe:a9fe]",  # local-use NAT64
        "[64:ff9b:1:a9fe:a9:fe00::]",  # local-use NAT64, /48 layout
        "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254
        "[2002:a00:1::1]",  # 6to4 of 10.0.0.1
        "[::127.0.0.1]",  # IPv4-compatible
        "[::a9fe:a9fe]",
        "[::ffff:0:7f00:1]",  # IPv4-translated
        "[::ffff:0:a00:1]",
        "[::ffff:127.0.0.1]",  # IPv4-mapped
        "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",  # Teredo
    ],
)
async def test_ipv6_addresses_carrying_an_internal_ipv4_address_are_refused(host: str) -> None:
    with pytest.raises(BlockedURL, match="not a public address"):
        await check_url(f"https://{host}/hook", (), _evil_resolve)


@pytest.mark.parametrize("host", ["[64:ff9b::808:808]", "[2002:808:808::1]", "[::ffff:0:808:808]"])
async def test_ipv6_addresses_carrying_a_public_ipv4_address_are_judged_by_it(host: str) -> None:
    assert await check_url(f"https://{host}/hook", (), _evil_resolve) == [host.strip("[]")]


async def test_an_embedded_address_in_an_allowed_network_is_allowed() -> None:
    allow = networks(["127.0.0.0/8"])
    assert await check_url("http://[64:ff9b::7f00:1]/", allow, _evil_resolve)


async def test_a_refusal_does_not_say_what_a_name_resolved_to() -> None:
    async def internal(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "10.11.12.13"]

    with pytest.raises(BlockedURL) as caught:
        await check_url("https://intranet.example.com/hook", (), internal)
    message = str(caught.value)
    assert "intranet.example.com" in message
    assert "10.11.12.13" not in message and "93.184" not in message


@pytest.mark.parametrize(
    "url",
    [
        "http://93.184.216.34:8080/hook",
        "https://93.184.216.34:22/hook",
        "http://example.com:6379/",
        "https://[2606:4700::1]:8443/hook",
    ],
)
async def test_only_ports_80_and_443_are_allowed_by_default(url: str) -> None:
    with pytest.raises(BlockedURL, match="port"):
        await check_url(url, (), _evil_resolve)


async def test_allow_ports_adds_ports_and_ranges() -> None:
    async def public(host: str, port: int) -> list[str]:
        return ["93.184.216.34"]

    ports = Ports([8080, "9000-9100"])
    for url in ("http://a.example/", "https://a.example/", "http://a.example:8080/"):
        assert await check_url(url, (), public, ports=ports) == ["93.184.216.34"]
    assert await check_url("https://a.example:9100/", (), public, ports=ports)
    with pytest.raises(BlockedURL, match="port 9101"):
        await check_url("https://a.example:9101/", (), public, ports=ports)


@pytest.mark.parametrize("bad", ["http", "0", "70000", "9-8", "1-2-3"])
def test_allow_ports_rejects_what_is_not_a_port(bad: str) -> None:
    with pytest.raises(ConfigError, match="allow_ports"):
        parse_config({"webhooks": {"allow_ports": [bad]}})


@pytest.fixture
async def arq_pool(redis_up: RedisServer) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(
        RedisSettings.from_dsn(redis_up.url), job_serializer=serialize, job_deserializer=deserialize
    )
    yield pool
    await pool.aclose()


@dataclass
class Setup:
    """A deliverer for the job ``j1`` whose webhook URL names EVIL_NAME."""

    deliverer: Deliverer
    job_id: str
    secret: str
    rclient: aioredis.Redis
    prefix: str

    async def job(self) -> dict[str, Any]:
        rec = await self.rclient.hgetall(Keys(self.prefix).job(self.job_id))  # type: ignore[misc]
        return job_object(self.job_id, JobRecord.from_hash(rec))


@pytest.fixture
async def setup(
    tmp_path: Path,
    redis_up: RedisServer,
    prefix: str,
    rclient: aioredis.Redis,
    arq_pool: ArqRedis,
    receiver: Receiver,
    request: pytest.FixtureRequest,
) -> AsyncIterator[Setup]:
    secret = new_webhook_secret()
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    port = receiver.url.split(":")[2].split("/")[0]
    config = parse_config(
        {
            "redis": {"url": redis_up.url, "key_prefix": prefix},
            "webhooks": {
                "secret_file": str(secret_file),
                "retry_schedule_s": [0],
                "allow_ports": [int(port)],
                **request.param,
            },
        }
    )
    deliverer = Deliverer(
        config, rclient, arq_pool, WebhookMetrics(CollectorRegistry()), _EvilResolver()
    )
    fields: dict[str, Any] = {
        "tenant": "default",
        "status": "completed",
        "model": "mock",
        "created_at": time.time(),
        "completed_at": time.time(),
        "result": b'{"object":"chat.completion"}',
        "webhook_url": f"http://{EVIL_NAME}:{port}/hook/rebind",
        "webhook_status": "pending",
        "webhook_attempts": 0,
    }
    await rclient.hset(Keys(prefix).job("j1"), mapping=fields)  # type: ignore[misc]
    await rclient.expire(Keys(prefix).job("j1"), 60)
    yield Setup(deliverer, "j1", secret, rclient, prefix)
    await deliverer.close()


@pytest.mark.parametrize("setup", [{}], indirect=True)
async def test_delivery_refuses_a_name_that_now_resolves_to_loopback(
    setup: Setup, receiver: Receiver
) -> None:
    assert await setup.deliverer.deliver(setup.job_id) == "failed"
    job = await setup.job()
    assert job["webhook"]["status"] == "failed"
    assert "not a public address" in job["webhook"]["last_error"]
    assert receiver.got == {}


@pytest.mark.parametrize("setup", [{"allow_cidrs": ["127.0.0.0/8"]}], indirect=True)
async def test_delivery_reaches_an_allowed_address_signed(setup: Setup, receiver: Receiver) -> None:
    assert await setup.deliverer.deliver(setup.job_id) == "delivered"
    assert await setup.deliverer.deliver(setup.job_id) == "done"  # a second run sends nothing
    secret, job_id = setup.secret, setup.job_id
    [delivery] = receiver.got["rebind"]
    assert delivery.headers["Host"].startswith(EVIL_NAME)
    event = Webhook(secret).verify(delivery.body, delivery.headers)
    assert event["data"]["id"] == job_id and event["data"]["status"] == "completed"


@pytest.mark.parametrize(
    "setup", [{"allow_cidrs": ["127.0.0.0/8"], "allow_ports": []}], indirect=True
)
async def test_delivery_refuses_a_port_not_allowed(setup: Setup, receiver: Receiver) -> None:
    assert await setup.deliverer.deliver(setup.job_id) == "failed"
    job = await setup.job()
    assert "allow_ports" in job["webhook"]["last_error"]
    assert receiver.got == {}
