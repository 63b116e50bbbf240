"""The worker process: one pool per provider, one shared HTTP session."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import time

from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from llm_broker.shared import logs
from llm_broker.shared.config import Config
from llm_broker.shared.files import Files, open_store
from llm_broker.shared.health import serve_health
from llm_broker.shared.keys import Keys
from llm_broker.shared.metrics import FastHistogram, WorkerMetrics
from llm_broker.shared.redisio import (
    REDIS_DOWN,
    AnyBatcher,
    batcher_for,
    connect,
    raise_if_cancelling,
    subscriber,
)
from llm_broker.shared.store import JobStore
from llm_broker.shared.store.queues import backlog
from llm_broker.shared.tracing import Tracing
from llm_broker.workers.batches import BatchDriver
from llm_broker.workers.heartbeat import Heartbeat
from llm_broker.workers.pool import ProviderPool
from llm_broker.workers.upstream import make_upstream

log = logging.getLogger("llm_broker.worker")


async def listen_for_cancels(config: Config, pools: list[ProviderPool]) -> None:
    """Abort the upstream call of every job cancelled while this process runs it."""
    channel = Keys(config.redis.key_prefix, cluster=config.redis.cluster).cancel_channel()
    backoff = 0.1
    while True:
        # (On a Cluster any node will do: a publication reaches every node.)
        client = subscriber(config.redis)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel)
            backoff = 0.1
            while True:
                raise_if_cancelling()
                # Bounded, so that a cancellation swallowed on the way is seen.
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                job_id = message["data"].decode()
                for pool in pools:
                    if pool.cancel(job_id):
                        log.info("job %s: cancelled; aborting its upstream call", job_id)
        except REDIS_DOWN as e:
            raise_if_cancelling()
            log.warning("cancel channel: %s; resubscribing in %.1fs", e, backoff)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
            await client.aclose()
        await asyncio.sleep(backoff)  # back off while Redis is unreachable
        backoff = min(backoff * 2, 2.0)


QUEUE_EXPORT_EVERY_S = 5.0


async def export_queues(
    config: Config, providers: list[str], batcher: AnyBatcher, metrics: WorkerMetrics
) -> None:
    """Export depth, pending and lag of each provider stream this process serves.

    Every worker does it for its providers, so Prometheus sees the same value
    from every pod: aggregate with ``max by (provider)``, never ``sum``.
    """
    keys = Keys(config.redis.key_prefix, cluster=config.redis.cluster)
    while True:
        raise_if_cancelling()
        for provider in providers:
            try:
                found = await backlog(batcher, keys, provider, time.time())
            except (*REDIS_DOWN, ResponseError) as e:  # type: ignore[misc]
                raise_if_cancelling()
                log.debug("queue metrics for %s unavailable: %s", provider, e)
                continue
            for w in found.waiting:
                metrics.queue_waiting.labels(provider, w.priority).set(w.count)
                metrics.queue_oldest_age.labels(provider, w.priority).set(w.oldest_s)
            metrics.queue_depth.labels(provider).set(found.depth)
            metrics.queue_pending.labels(provider).set(found.pending)
            metrics.queue_lag.labels(provider).set(found.lag)
        await asyncio.sleep(QUEUE_EXPORT_EVERY_S)  # export period


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def serve(
    config: Config,
    providers: list[str],
    *,
    metrics_port: int | None = None,
    ready_line: bool = True,
    reuse_port: bool = False,
) -> None:
    """Run pools for ``providers`` until SIGTERM/SIGINT, then drain within the grace period."""
    registry = CollectorRegistry()
    metrics = WorkerMetrics(registry)
    health = None
    if metrics_port is not None:
        health = await serve_health(registry, "worker", metrics_port, reuse_port=reuse_port)
        log.info("worker /metrics and /health on :%d", health.addresses[0][1])
    total = sum(config.providers[p].max_concurrency for p in providers)
    redis = connect(config.redis, max_connections=max(8, min(total, 64)))
    batcher = batcher_for(
        config.redis,
        redis,
        timeout=config.redis.command_timeout_s * 2,
        round_trip=FastHistogram(metrics.redis_seconds.labels("worker")),
    )
    consumer = consumer_name()
    tracing = Tracing(config.tracing, "worker")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pools = [
        ProviderPool(
            provider=p,
            config=config,
            upstream=make_upstream(p, config.providers[p]),
            redis=redis,
            batcher=batcher,
            consumer=consumer,
            metrics=metrics,
            tracing=tracing,
        )
        for p in providers
    ]
    # One job in hand: its Redis commands (its settlement) leave at once.
    batcher.quiet = lambda: sum(pool.consumer.running for pool in pools) <= 1
    tasks = [loop.create_task(pool.consumer.read_loop()) for pool in pools]
    tasks += [loop.create_task(pool.consumer.maintain_loop()) for pool in pools]
    heartbeat = Heartbeat(config, redis, consumer, pools)
    beating = loop.create_task(heartbeat.run())
    cancels = loop.create_task(listen_for_cancels(config, pools))
    # Every worker process drives batches (workers/batches.py); leases share them out.
    file_store = open_store(config.files)
    driver = BatchDriver(
        config,
        redis,
        JobStore(config, batcher, redis, cluster=config.redis.cluster),
        Files(redis, config.redis.key_prefix, file_store, config.files),
        consumer,
        metrics.batch,
    )
    driving = loop.create_task(driver.run())
    if metrics_port is not None:
        tasks.append(loop.create_task(export_queues(config, providers, batcher, metrics)))
    if ready_line:
        logs.announce(f"worker ready consumer={consumer} providers={','.join(providers)}")
    stopped = loop.create_task(stop.wait())
    done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        if t is not stopped and t.exception() is not None:
            log.error("worker loop died", exc_info=t.exception())
    log.info(
        "worker stopping: no new jobs; waiting up to %.0fs for in-flight ones",
        config.worker.grace_period_s,
    )
    for pool in pools:
        pool.consumer.stop_reading()
    # A read in progress returns within block_ms; what it brings is run too.
    await asyncio.wait(
        tasks[: len(pools)],
        timeout=config.worker.block_ms / 1000 + config.redis.command_timeout_s,
    )
    results = await asyncio.gather(
        *(pool.consumer.wait_idle(config.worker.grace_period_s) for pool in pools)
    )
    if not all(results):
        log.warning("grace period over: abandoning unfinished jobs to other workers")
    for pool in pools:
        await pool.consumer.abandon()
        pool.abort_calls()  # a call task its delivery's run no longer awaits
    driving.cancel()
    beating.cancel()
    await asyncio.gather(driving, beating, return_exceptions=True)
    await heartbeat.stop()
    try:
        async with asyncio.timeout(config.redis.command_timeout_s * 4):
            await driver.release()  # another process goes on with its batches now
    except (*REDIS_DOWN, ResponseError) as e:  # type: ignore[misc]
        log.warning("could not release the batches' leases: %s", e)
    await file_store.close()
    stopped.cancel()
    cancels.cancel()
    for t in tasks:
        t.cancel()
    await asyncio.gather(stopped, cancels, *tasks, return_exceptions=True)
    for pool in pools:
        pool.upstream.close()
    await batcher.close()
    await redis.aclose()
    tracing.shutdown()
    if health is not None:
        await health.cleanup()
    log.info("worker stopped")
