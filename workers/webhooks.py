"""Webhook delivery (``llm-broker webhooks``): signed Standard Webhooks events.

When a job with a ``webhook_url`` becomes final, the script that made it final
adds its id to the webhook event stream. This process relays each event into
arq as the job's first delivery attempt, and arq runs the attempts:

* each attempt POSTs ``{"type": "job.<status>", "timestamp", "data": <job>}``
  with ``webhook-id`` (the same on every attempt), ``webhook-timestamp`` and
  ``webhook-signature`` (``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``,
  one per secret while secrets rotate);
* any 2xx is success; 410 disables the webhook for that job; anything else
  (3xx included: redirects are not followed) schedules the next attempt on the
  retry schedule, with jitter, no sooner than a 429/503's ``Retry-After``;
* each attempt is its own arq job (``wh:{job}:{n}``): arq refuses a second job
  with the same id, so a relay or attempt that runs twice never doubles the
  schedule, and no arq job lives longer than one delay;
* the address connected to is checked on every attempt (DNS rebinding).

arq jobs are serialized with msgspec (MessagePack), not pickle.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Sequence
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from arq.connections import ArqRedis
from arq.worker import Worker, func
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from llm_broker.shared.config import Config, RedisConfig, WebhooksConfig
from llm_broker.shared.health import serve_health
from llm_broker.shared.jobs import event_body
from llm_broker.shared.keys import WEBHOOK_GROUP, Keys
from llm_broker.shared.metrics import WebhookMetrics
from llm_broker.shared.redisio import (
    REDIS_DOWN,
    batcher_for,
    connect,
    connection_pool,
    ensure_group,
    raise_if_cancelling,
)
from llm_broker.shared.ssrf import (
    BlockedURL,
    Network,
    Ports,
    check_addresses,
    is_ip,
    networks,
    split_url,
)
from llm_broker.shared.store import JobStore
from llm_broker.shared.store.records import (
    WEBHOOK_DELIVERED,
    WEBHOOK_DISABLED,
    WEBHOOK_FAILED,
    WEBHOOK_PENDING,
)

log = logging.getLogger("llm_broker.webhooks")

USER_AGENT = "llm-broker-webhooks/1"
#: A relay's event not acknowledged this long (its process died) is taken over.
RELAY_LEASE_MS = 30_000


# ------------------------------------------------------------------ arq serializer


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, BaseException):  # arq stores a failed job's exception as its result
        return repr(obj)
    raise NotImplementedError(f"cannot serialize {type(obj).__name__}")


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def serialize(data: dict[str, Any]) -> bytes:
    return _encoder.encode(data)


def deserialize(data: bytes) -> dict[str, Any]:
    decoded: dict[str, Any] = msgspec.msgpack.decode(data)
    return decoded


# ------------------------------------------------------------------ signing


class Secrets:
    """Signing secrets read from files, read again whenever a file changes."""

    def __init__(self, cfg: WebhooksConfig) -> None:
        self._cfg = cfg
        self._cache: dict[str, tuple[tuple[int, int], list[bytes]]] = {}

    def for_tenant(self, tenant: str) -> list[bytes]:
        path = self._cfg.secret_file_for(tenant)
        if path is None:
            raise ValueError("no webhook signing secret is configured")
        stat = os.stat(path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(path) as f:
            secrets = [parse_secret(token) for token in f.read().split()]
        if not secrets:
            raise ValueError(f"webhook secret file {os.path.basename(path)} holds no secret")
        log.info("read %d webhook secret(s) from %s", len(secrets), os.path.basename(path))
        self._cache[path] = (stamp, secrets)
        return secrets


def parse_secret(text: str) -> bytes:
    """The key bytes of a ``whsec_<base64>`` secret."""
    if not text.startswith("whsec_"):
        raise ValueError("a webhook secret starts with 'whsec_'")
    try:
        key = base64.b64decode(text[len("whsec_") :], validate=True)
    except ValueError as e:
        raise ValueError("a webhook secret is 'whsec_' followed by base64") from e
    if len(key) < 16:
        raise ValueError("a webhook secret holds at least 16 bytes")
    return key


def signature(secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: one ``v1,<base64>`` per secret."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        for key in secrets
    )


# ------------------------------------------------------------------ delivery


class GuardedResolver(AbstractResolver):
    """Resolves names, refusing any that lead to an address webhooks may not reach."""

    def __init__(self, allow: Sequence[Network], inner: AbstractResolver | None = None) -> None:
        self._allow = allow
        self._inner = inner or ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        check_addresses(host, [r["host"] for r in results], self._allow)
        return results

    async def close(self) -> None:
        await self._inner.close()


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` value (seconds or an HTTP date) in seconds from now."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class Deliverer:
    """Runs one delivery attempt of a job's webhook and schedules the next."""

    def __init__(
        self,
        config: Config,
        redis: aioredis.Redis,
        arq: ArqRedis,
        metrics: WebhookMetrics,
        resolver: AbstractResolver | None = None,
    ) -> None:
        self.cfg = config.webhooks
        self.keys = Keys(config.redis.key_prefix, cluster=config.redis.cluster)
        # Webhook bookkeeping is not on a client's path: its Redis calls may wait
        # longer than a request's (a busy Redis must not lose an attempt's record).
        self._batcher = batcher_for(
            config.redis, redis, timeout=max(30.0, config.redis.command_timeout_s)
        )
        self.store = JobStore(config, self._batcher, redis, cluster=config.redis.cluster)
        self.arq = arq
        self.metrics = metrics
        self.secrets = Secrets(self.cfg)
        self.allow = networks(self.cfg.allow_cidrs)
        self.ports = Ports(self.cfg.allow_ports)
        self._resolver = GuardedResolver(self.allow, resolver)
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    resolver=self._resolver, limit=self.cfg.max_concurrency
                ),
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                trust_env=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        await self._batcher.close()

    async def enqueue(self, job_id: str, attempt: int, delay: float = 0.0) -> None:
        await self.arq.enqueue_job(
            "deliver",
            job_id,
            _job_id=self.keys.webhook_attempt(job_id, attempt),
            _defer_by=delay or None,
        )

    async def _post(self, url: str, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        """POST once: the status code and the Retry-After header."""
        host, _port = split_url(url, self.ports)
        if is_ip(host):  # the resolver, which checks names, is not asked for an address
            check_addresses(host, [host], self.allow)
        async with self._client().post(
            url, data=body, headers=headers, allow_redirects=False
        ) as resp:
            return resp.status, resp.headers.get("Retry-After", "")

    async def deliver(self, job_id: str) -> str:
        """One attempt; returns the outcome (delivered, retrying, failed, disabled, or why not)."""
        rec = await self.store.record(job_id)
        if rec is None or rec.webhook_url is None:
            return "gone"
        if rec.webhook_status not in ("", WEBHOOK_PENDING):
            return "done"
        url = rec.webhook_url
        attempt = rec.webhook_attempts + 1
        schedule = self.cfg.retry_schedule_s
        code, error, retry_after = 0, "", ""
        started = time.monotonic()
        try:
            secrets = self.secrets.for_tenant(rec.tenant)
            timestamp = int(time.time())
            body = event_body(job_id, rec)
            msg_id = f"msg_{job_id}"
            headers = {
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "webhook-id": msg_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": signature(secrets, msg_id, timestamp, body),
            }
            code, retry_after = await self._post(url, headers, body)
        except BlockedURL as e:
            error = str(e)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            error = f"{type(e).__name__}: {e}".rstrip(": ")
        self.metrics.delivery_seconds.observe(time.monotonic() - started)
        keep = 0.0
        if 200 <= code < 300:
            status, outcome = WEBHOOK_DELIVERED, "delivered"
        elif code == 410:
            status, outcome = WEBHOOK_DISABLED, "disabled"
        elif attempt < len(schedule):
            status, outcome = WEBHOOK_PENDING, "retrying"
            delay = schedule[attempt] * (1 + random.uniform(-self.cfg.jitter, self.cfg.jitter))
            waited = retry_after_seconds(retry_after) if code in (429, 503) else None
            if waited is not None:
                delay = max(delay, min(waited, self.cfg.max_retry_after_s))
            # The record outlives the attempts still to come.
            keep = delay + self.cfg.timeout_s + 60
            await self.enqueue(job_id, attempt + 1, delay)
        else:
            status, outcome = WEBHOOK_FAILED, "failed"
        state = {
            "webhook_attempts": attempt,
            "webhook_status": status,
            "webhook_code": code or "",
            "webhook_at": time.time(),
            "webhook_error": error,
        }
        try:
            await self.store.webhook_attempt(job_id, int(keep), state)
        except ResponseError as e:  # e.g. the record's key holds another type
            log.warning("job %s: webhook attempt %d not recorded: %s", job_id, attempt, e)
        self.metrics.deliveries.labels(outcome).inc()
        log.info(
            "job %s: webhook attempt %d: %s (%s)", job_id, attempt, outcome, code or error or "-"
        )
        return outcome


async def _deliver_task(ctx: dict[str, Any], job_id: str) -> str:
    deliverer: Deliverer = ctx["deliverer"]
    return await deliverer.deliver(job_id)


# ------------------------------------------------------------------ relay


class Relay:
    """Moves finished jobs from the webhook event stream into arq, at least once."""

    def __init__(self, config: Config, deliverer: Deliverer, metrics: WebhookMetrics) -> None:
        self.config = config
        self.cluster = config.redis.cluster
        self.keys = Keys(config.redis.key_prefix, cluster=self.cluster)
        #: The event stream, or on a Cluster one per provider (each beside the
        #: records of the jobs its provider admitted).
        self.streams = (
            [self.keys.webhook_events(p) for p in config.providers]
            if self.cluster
            else [self.keys.webhook_events()]
        )
        self.deliverer = deliverer
        self.metrics = metrics
        self.consumer = f"{socket.gethostname()}-{os.getpid()}"

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._run(stop, stream) for stream in self.streams))

    async def _run(self, stop: asyncio.Event, stream: str) -> None:
        block_ms = 1000
        reader = connect(
            self.config.redis,
            max_connections=1,
            socket_timeout=block_ms / 1000 + self.config.redis.command_timeout_s,
        )
        backoff = 0.1
        need_group = True
        next_claim = 0.0
        try:
            while not stop.is_set():
                try:
                    if need_group:
                        await ensure_group(reader, stream, WEBHOOK_GROUP)
                        need_group = False
                    if time.monotonic() >= next_claim:
                        _next, claimed, _gone = await reader.xautoclaim(
                            stream, WEBHOOK_GROUP, self.consumer, RELAY_LEASE_MS, "0-0", 100
                        )
                        await self._relay(reader, stream, claimed)
                        next_claim = time.monotonic() + RELAY_LEASE_MS / 3000
                    batches = await reader.xreadgroup(
                        WEBHOOK_GROUP, self.consumer, {stream: ">"}, count=100, block=block_ms
                    )
                    for _stream, entries in batches or ():
                        await self._relay(reader, stream, entries)
                    backoff = 0.1
                except ResponseError as e:
                    if str(e).startswith("UNBLOCKED"):
                        # The stream's slot moved to another node (a Cluster's
                        # resharding): the next read is redirected there.
                        await asyncio.sleep(backoff)
                        continue
                    if "NOGROUP" not in str(e):
                        raise
                    need_group = True  # Redis lost the group (restarted empty)
                except REDIS_DOWN as e:
                    raise_if_cancelling()
                    self.metrics.redis_errors.labels("webhook_relay").inc()
                    log.warning("webhook relay: %s; retrying in %.1fs", e, backoff)
                    await asyncio.sleep(backoff)  # back off while Redis is unreachable
                    backoff = min(backoff * 2, 2.0)
        finally:
            await reader.aclose()

    async def _relay(
        self,
        reader: aioredis.Redis,
        stream: str,
        entries: list[tuple[bytes, dict[bytes, bytes]]],
    ) -> None:
        for entry_id, fields in entries:
            job_id = fields.get(b"i", b"").decode() if fields else ""
            if job_id:
                await self.deliverer.enqueue(job_id, 1)
                self.metrics.events.inc()
            # (a Cluster client's pipeline has no transactions: one key, in order)
            async with reader.pipeline(transaction=not self.cluster) as pipe:
                pipe.xack(stream, WEBHOOK_GROUP, entry_id)
                pipe.xdel(stream, entry_id)
                await pipe.execute()


# ------------------------------------------------------------------ process


async def serve(config: Config, *, metrics_port: int | None = None) -> None:
    """Relay events and deliver webhooks until SIGTERM/SIGINT."""
    registry = CollectorRegistry()
    metrics = WebhookMetrics(registry)
    health = None
    if metrics_port is not None:
        health = await serve_health(registry, "webhooks", metrics_port)
        log.info("webhooks /metrics and /health on :%d", health.addresses[0][1])
    keys = Keys(config.redis.key_prefix, cluster=config.redis.cluster)
    # arq's queue on the broker's own connection (Sentinel, password files, hiredis
    # packing), with a connection for each delivery it may run at once; or on a
    # Redis of its own (webhooks.queue_url, which a Cluster needs).
    queue_redis = config.redis
    if config.webhooks.queue_url is not None:
        queue_redis = RedisConfig(
            url=config.webhooks.queue_url,
            command_timeout_s=config.redis.command_timeout_s,
            connect_timeout_s=config.redis.connect_timeout_s,
        )
    elif config.redis.cluster:
        raise SystemExit("webhooks: a Redis Cluster needs webhooks.queue_url (docs/cluster.md)")
    arq_pool = ArqRedis(
        connection_pool(queue_redis, max_connections=config.webhooks.max_concurrency + 8),
        job_serializer=serialize,
        job_deserializer=deserialize,
        default_queue_name=keys.webhook_queue(),
    )
    arq_pool.auto_close_connection_pool = True  # closing the client closes its pool
    redis = connect(config.redis, max_connections=16)
    deliverer = Deliverer(config, redis, arq_pool, metrics)
    worker = Worker(
        functions=[func(_deliver_task, name="deliver")],
        queue_name=keys.webhook_queue(),
        redis_pool=arq_pool,
        handle_signals=False,
        max_jobs=config.webhooks.max_concurrency,
        job_timeout=config.webhooks.timeout_s + 30,
        poll_delay=config.webhooks.poll_delay_s,
        max_tries=5,
        job_serializer=serialize,
        job_deserializer=deserialize,
        ctx={"deliverer": deliverer},
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    relay = Relay(config, deliverer, metrics)
    tasks = [loop.create_task(relay.run(stop)), loop.create_task(_run_arq(worker, stop))]
    print("webhooks ready", flush=True)
    stopped = loop.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        if t is not stopped and not t.cancelled() and t.exception() is not None:
            log.error("webhook loop died", exc_info=t.exception())
    log.info("webhooks stopping")
    stop.set()
    try:
        await worker.close()  # cancels attempts in progress; arq runs them again later
    except REDIS_DOWN as e:
        log.warning("webhooks: Redis unreachable while stopping (%s)", e)
    await asyncio.gather(*tasks, return_exceptions=True)
    stopped.cancel()
    await deliverer.close()
    await redis.aclose()
    if health is not None:
        await health.cleanup()
    log.info("webhooks stopped")


async def _run_arq(worker: Worker, stop: asyncio.Event) -> None:
    """Run arq's delivery loop; when Redis is unreachable it stops, so start it
    again (with backoff) once Redis answers, until told to stop."""
    backoff = 0.1
    while not stop.is_set():
        try:
            await worker.async_run()
            return
        except REDIS_DOWN as e:
            raise_if_cancelling()
            log.warning("webhook delivery: Redis unreachable (%s); again in %.1fs", e, backoff)
        try:
            await asyncio.wait_for(stop.wait(), backoff)
        except TimeoutError:
            backoff = min(backoff * 2, 2.0)
