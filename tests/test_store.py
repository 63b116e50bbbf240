"""The job store alone, on a real Redis: every state transition, and every race
that a script exists to prevent."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import redis.asyncio as aioredis

from llm_broker.shared import messages as m
from llm_broker.shared.config import Target, parse_config
from llm_broker.shared.redisio import Batcher
from llm_broker.shared.store import (
    Admitted,
    AsyncFields,
    Delivery,
    Full,
    Idempotency,
    JobStore,
    KeyConflict,
    Outcome,
    Replayed,
    Verdict,
)
from llm_broker.shared.store.records import Chunks, Failure, JobRecord, Result, Usage
from tests.helpers import make_job, read_once

CONSUMER = "worker-a"


@pytest.fixture
async def store(rclient: aioredis.Redis, prefix: str) -> AsyncIterator[JobStore]:
    config = parse_config(
        {
            "redis": {"key_prefix": prefix},
            "worker": {"max_deliveries": 2, "dead_letter_body_bytes": 8},
        }
    )
    batcher = Batcher(rclient, timeout=5.0)
    store = JobStore(config, batcher, rclient)
    # A worker's free slots: admitted jobs go to the queue at once.
    for provider in ("mock", "other"):
        await store.register(provider, CONSUMER, 100, 600)
    yield store
    await batcher.close()


def waiting_job(reply_to: str, **changes: object) -> m.Job:
    job = msgspec.structs.replace(make_job(), reply_to=reply_to)
    return msgspec.structs.replace(job, **changes) if changes else job


async def delivered(store: JobStore, rclient: aioredis.Redis, job: m.Job) -> Delivery:
    """``job`` admitted and read by CONSUMER."""
    await store.queues.ensure_group(job.provider)
    assert await store.enqueue(job, max_depth=100, ttl_s=600) is None
    (delivery,) = await read_once(
        rclient, lambda r: store.queues.read(r, job.provider, CONSUMER, count=10, block_ms=100)
    )
    assert delivery.job == job and delivery.deliveries == 1
    return delivery


async def record(store: JobStore, job_id: str) -> JobRecord:
    found = await store.record(job_id)
    assert found is not None
    return found


async def pending(rclient: aioredis.Redis, store: JobStore, provider: str) -> tuple[int, int]:
    """(entries in the queue, entries pending in the group)."""
    queue = store.keys.queue(provider)
    info = await rclient.xpending(queue, "workers")
    return await rclient.xlen(queue), int(info["pending"])


# ------------------------------------------------------------------ admission


async def test_enqueue_admits_until_the_queue_is_full(store: JobStore) -> None:
    first, second = make_job(), make_job()
    assert await store.enqueue(first, max_depth=1, ttl_s=60) is None
    assert await store.enqueue(second, max_depth=1, ttl_s=60) == Full()
    rec = await record(store, first.id)
    assert (rec.status, rec.tenant, rec.model, rec.attempts) == ("queued", "default", "mock", 0)
    assert await store.record(second.id) is None


async def test_admissions_sent_together_are_one_call_each_answered_as_alone(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    """Calls admitted in the same loop turn leave as one call of the batch form;
    each is admitted or refused as it would be on its own, in order."""
    jobs = [make_job() for _ in range(4)]
    await rclient.config_resetstat()
    answers = await asyncio.gather(*(store.enqueue(j, max_depth=3, ttl_s=60) for j in jobs))
    assert answers == [None, None, None, Full()]
    assert (await rclient.info("commandstats"))["cmdstat_fcall"]["calls"] == 1
    assert [(await record(store, j.id)).status for j in jobs[:3]] == ["queued"] * 3
    assert await store.record(jobs[3].id) is None


async def test_admissions_sent_together_fill_the_free_slots_then_wait(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    """In one call of the batch form, the calls that find a free slot go to the
    stream, the next wait for one, in order; the depth counts both."""
    await store.register("mock", CONSUMER, 2, 600)
    jobs = [make_job() for _ in range(5)]
    answers = await asyncio.gather(*(store.enqueue(j, max_depth=4, ttl_s=60) for j in jobs))
    assert answers == [None, None, None, None, Full()]
    await store.queues.ensure_group("mock")
    first = await store.queues.read(store._batcher, "mock", CONSUMER, count=10, block_ms=10)
    assert [d.job.id for d in first if d.job] == [j.id for j in jobs[:2]]
    # Each settle frees a slot: the next waiting job takes it.
    for n, delivery in enumerate(first):
        await store.settle(delivery, Outcome(status=m.COMPLETED, payload=b"{}"), consumer=CONSUMER)
        (after,) = await store.queues.read(store._batcher, "mock", CONSUMER, count=10, block_ms=10)
        assert after.job is not None and after.job.id == jobs[2 + n].id


async def test_submit_writes_record_index_and_honours_the_idempotency_key(
    store: JobStore,
) -> None:
    job = make_job()
    key = Idempotency(key="k1", request_hash="h1", ttl_s=600)
    extra = AsyncFields(metadata={"a": "b"}, webhook_url="https://example.com/h")
    admitted = await store.submit(job, max_depth=10, ttl_s=600, extra=extra, idempotency=key)
    assert isinstance(admitted, Admitted)
    assert admitted.record == await record(store, job.id)
    assert admitted.record.metadata == b'{"a":"b"}'
    assert admitted.record.webhook_url == "https://example.com/h"
    assert [i for i, _ in await store.tenant_page("default", None, 10)] == [job.id]

    again = await store.submit(make_job(), max_depth=10, ttl_s=600, extra=extra, idempotency=key)
    assert isinstance(again, Replayed)
    assert (again.job_id, again.request_hash) == (job.id, "h1")
    assert again.record.status == "queued"
    # Only the first submission was queued.
    assert [i for i, _ in await store.tenant_page("default", None, 10)] == [job.id]


async def test_another_tenants_key_is_a_conflict_and_a_full_queue_is_full(
    store: JobStore,
) -> None:
    key = Idempotency(key="shared", request_hash="h", ttl_s=600)
    first = await store.submit(
        make_job(), max_depth=1, ttl_s=600, extra=AsyncFields(), idempotency=key
    )
    assert isinstance(first, Admitted)
    other = msgspec.structs.replace(make_job(), tenant="other")
    # The key names are per tenant: the other tenant's own "shared" key is free,
    # but the queue is full.
    full = await store.submit(other, max_depth=1, ttl_s=600, extra=AsyncFields(), idempotency=key)
    assert isinstance(full, Full)


async def test_a_key_whose_job_is_another_tenants_is_a_conflict(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    job = make_job()
    key = Idempotency(key="k", request_hash="h", ttl_s=600)
    await store.submit(job, max_depth=10, ttl_s=600, extra=AsyncFields(), idempotency=key)
    # The key's job record now says another tenant (as if the id were reused).
    await rclient.hset(store.keys.job(job.id), "tenant", "intruder")  # type: ignore[misc]
    again = await store.submit(
        make_job(), max_depth=10, ttl_s=600, extra=AsyncFields(), idempotency=key
    )
    assert isinstance(again, KeyConflict)


# ------------------------------------------------------------------ start


async def test_start_runs_a_job_once_and_counts_its_attempts(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    job = make_job()
    delivery = await delivered(store, rclient, job)
    assert await store.start(delivery, result_ttl=60) is Verdict.RUN
    rec = await record(store, job.id)
    assert (rec.status, rec.attempts) == ("in_progress", 1)
    assert rec.started_at is not None


async def test_a_delivery_settled_without_a_start_records_when_it_began(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    """A synchronous call's first delivery runs without the start function: its
    settlement records when it began and counts the attempt; over a job made final
    meanwhile it records nothing."""
    job = make_job()
    delivery = await delivered(store, rclient, job)
    began = time.time()
    outcome = Outcome(status=m.COMPLETED, payload=b"{}", started_at=began)
    assert await store.settle(delivery, outcome, consumer=CONSUMER)
    rec = await record(store, job.id)
    assert (rec.status, rec.attempts) == ("completed", 1)
    assert rec.started_at == pytest.approx(began, abs=1e-5)

    gone = make_job()
    late = await delivered(store, rclient, gone)
    assert await store.cancel(gone.id, gone.tenant, result_ttl=60)
    outcome = Outcome(status=m.COMPLETED, payload=b"{}", started_at=began)
    assert not await store.settle(late, outcome, consumer=CONSUMER)
    rec = await record(store, gone.id)
    assert (rec.status, rec.attempts, rec.started_at) == ("cancelled", 0, None)


async def test_start_refuses_what_must_not_run(store: JobStore, rclient: aioredis.Redis) -> None:
    late = make_job()
    expired = await delivered(store, rclient, late)
    # Its deadline passes while the delivery is on its way.
    await rclient.hset(store.keys.job(late.id), "deadline", str(time.time() - 1))  # type: ignore[misc]
    assert await store.start(expired, result_ttl=60) is Verdict.EXPIRED
    rec = await record(store, late.id)
    assert (rec.status, rec.http_status) == ("expired", 504)
    # A job made final is never started again.
    assert await store.start(expired, result_ttl=60) is Verdict.EXPIRED
    done = make_job()
    finished = await delivered(store, rclient, done)
    await store.settle(finished, Outcome(status=m.COMPLETED, payload=b"{}"), consumer=CONSUMER)
    assert await store.start(finished, result_ttl=60) is Verdict.FINAL

    job = make_job()
    poisoned = msgspec.structs.replace(await delivered(store, rclient, job), deliveries=3)
    assert await store.start(poisoned, result_ttl=60) is Verdict.POISON  # max_deliveries: 2
    assert (await record(store, job.id)).status == "queued"

    lost = make_job()
    gone = await delivered(store, rclient, lost)
    await rclient.delete(store.keys.job(lost.id))
    assert await store.start(gone, result_ttl=60) is Verdict.GONE


# ------------------------------------------------------------------ settle


async def test_settle_records_replies_and_acknowledges_in_one_step(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    replies = f"{store.keys.prefix}r:pod"
    await rclient.xadd(replies, {"k": "init"})
    job = waiting_job(replies, result_ttl=60)
    delivery = await delivered(store, rclient, job)
    await store.start(delivery, result_ttl=60)
    await store.send(job, Chunks(b"data: 1\n\n"))
    outcome = Outcome(
        status=m.COMPLETED,
        payload=b'{"ok":true}',
        reply=Result(usage=Usage(3, 4)),
        history=[m.Attempt(deployment="mock/a", status=502, error="upstream_error")],
    )
    assert await store.settle(delivery, outcome, consumer=CONSUMER) is True
    rec = await record(store, job.id)
    assert (rec.status, rec.result, rec.http_status) == ("completed", b'{"ok":true}', 200)
    assert msgspec.json.decode(rec.history or b"")[0]["deployment"] == "mock/a"
    assert 0 < await rclient.ttl(store.keys.job(job.id)) <= 60
    found = await read_once(
        rclient, lambda r: JobStore.read_replies(r, replies, b"0-0", block_ms=10)
    )
    assert [(job_id, reply) for _, job_id, reply in found if job_id] == [
        (job.id.encode(), Chunks(b"data: 1\n\n")),
        (job.id.encode(), Result(b'{"ok":true}', Usage(3, 4))),
    ]
    assert await pending(rclient, store, job.provider) == (0, 0)


async def test_settles_sent_together_are_one_call_each_closing_its_own_delivery(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    """Deliveries settled in the same loop turn leave as one call of the batch
    form: each job gets its own final state and reply, a job already final stays
    as it was (its call answers False), and every entry is acknowledged."""
    replies = f"{store.keys.prefix}r:pod"
    await rclient.xadd(replies, {"k": "init"})
    jobs = [waiting_job(replies, result_ttl=60) for _ in range(3)]
    deliveries = [await delivered(store, rclient, j) for j in jobs]
    cancelled = await store.cancel(jobs[1].id, jobs[1].tenant, result_ttl=60)
    assert cancelled is not None and cancelled.cancelled
    outcomes = [
        Outcome(status=m.COMPLETED, payload=b'{"n":%d}' % i, reply=Result(usage=Usage(i, 1)))
        for i in range(3)
    ]
    await rclient.config_resetstat()
    made = await asyncio.gather(
        *(store.settle(d, o, consumer=CONSUMER) for d, o in zip(deliveries, outcomes, strict=True))
    )
    assert made == [True, False, True]
    assert (await rclient.info("commandstats"))["cmdstat_fcall"]["calls"] == 1
    states = [(await record(store, j.id)) for j in jobs]
    assert [(r.status, r.result) for r in states] == [
        ("completed", b'{"n":0}'),
        ("cancelled", None),
        ("completed", b'{"n":2}'),
    ]
    found = await read_once(
        rclient, lambda r: JobStore.read_replies(r, replies, b"0-0", block_ms=10)
    )
    assert [(job_id, reply) for _, job_id, reply in found if job_id] == [
        (jobs[0].id.encode(), Result(b'{"n":0}', Usage(0, 1))),
        (jobs[1].id.encode(), Result(b'{"n":1}', Usage(1, 1))),
        (jobs[2].id.encode(), Result(b'{"n":2}', Usage(2, 1))),
    ]
    assert await pending(rclient, store, jobs[0].provider) == (0, 0)


async def test_a_late_duplicate_never_overwrites_a_final_state(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    job = make_job()
    delivery = await delivered(store, rclient, job)
    await store.start(delivery, result_ttl=60)
    cancelled = await store.cancel(job.id, job.tenant, result_ttl=60)
    assert cancelled is not None and cancelled.cancelled
    # The worker finishes anyway: the entry is closed, the record stays cancelled.
    done = Outcome(status=m.COMPLETED, payload=b"{}", reply=Result())
    assert await store.settle(delivery, done, consumer=CONSUMER) is False
    assert (await record(store, job.id)).status == "cancelled"
    assert await pending(rclient, store, job.provider) == (0, 0)
    again = await store.cancel(job.id, job.tenant, result_ttl=60)
    assert again is not None and not again.cancelled


async def test_a_failure_replies_with_its_status_and_is_dead_lettered_when_asked(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    replies = f"{store.keys.prefix}r:pod"
    await rclient.xadd(replies, {"k": "init"})
    job = waiting_job(replies, body=b'{"model":"mock","messages":[]}')
    delivery = await delivered(store, rclient, job)
    outcome = Outcome(
        status=m.FAILED,
        payload=b'{"error":{}}',
        http_status=429,
        reply=Failure(429, retry_after="7"),
        dead_letter=True,
    )
    await store.settle(delivery, outcome, consumer=CONSUMER)
    found = await read_once(
        rclient, lambda r: JobStore.read_replies(r, replies, b"0-0", block_ms=10)
    )
    assert found[-1][2] == Failure(429, b'{"error":{}}', "7")
    rec = await record(store, job.id)
    assert (rec.status, rec.error, rec.http_status) == ("failed", b'{"error":{}}', 429)
    [(_, fields)] = await rclient.xrange(store.keys.dead_letter(job.provider))
    assert fields[b"job"] == job.id.encode() and fields[b"consumer"] == CONSUMER.encode()
    assert fields[b"body"] == job.body[:8] and fields[b"body_truncated"] == b"1"


async def test_an_entry_that_is_no_job_is_read_and_dead_lettered(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    await store.queues.ensure_group("mock")
    await rclient.xadd(store.keys.queue("mock"), {"j": b"\xc1 not msgpack"})
    (delivery,) = await read_once(
        rclient, lambda r: store.queues.read(r, "mock", CONSUMER, count=10, block_ms=100)
    )
    assert delivery.job is None and delivery.raw == b"\xc1 not msgpack"
    await store.settle(delivery, Outcome(dead_letter=True), consumer=CONSUMER)
    [(_, fields)] = await rclient.xrange(store.keys.dead_letter("mock"))
    assert fields[b"body"] == b"\xc1 not ms"
    assert await pending(rclient, store, "mock") == (0, 0)


# ------------------------------------------------------------------ move, expire, cancel


async def test_move_sends_a_running_job_to_its_next_deployment(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    job = msgspec.structs.replace(make_job(), fallbacks=[Target("other", "m2")])
    delivery = await delivered(store, rclient, job)
    await store.start(delivery, result_ttl=60)
    attempt = m.Attempt(deployment="mock/mock", status=502)
    moved = msgspec.structs.replace(
        job, provider="other", upstream_model="m2", fallbacks=[], attempts=[attempt]
    )
    assert await store.move(delivery, moved, consumer=CONSUMER) is True
    assert await pending(rclient, store, "mock") == (0, 0)
    await store.queues.ensure_group("other")
    (there,) = await read_once(
        rclient, lambda r: store.queues.read(r, "other", CONSUMER, count=10, block_ms=100)
    )
    assert there.job == moved
    rec = await record(store, job.id)
    assert rec.provider == "other" and rec.history is not None

    # A job made final meanwhile is not moved; its entry is closed all the same.
    await store.expire(moved)
    assert await store.move(there, moved, consumer=CONSUMER) is False
    assert await rclient.xlen(store.keys.queue("other")) == 0


async def test_expire_and_cancel_only_touch_jobs_not_final(store: JobStore) -> None:
    job = make_job()
    await store.enqueue(job, max_depth=10, ttl_s=600)
    assert await store.cancel(job.id, "someone-else", result_ttl=60) is None
    assert await store.expire(job) is True
    assert (await record(store, job.id)).status == "expired"
    assert await store.expire(job) is False
    found = await store.cancel(job.id, job.tenant, result_ttl=60)
    assert found is not None and not found.cancelled and found.record.status == "expired"
    assert await store.cancel("no-such-job", job.tenant, result_ttl=60) is None


async def test_cancel_tells_the_worker_running_the_job(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    job = make_job()
    await store.enqueue(job, max_depth=10, ttl_s=600)
    pubsub = rclient.pubsub()
    await pubsub.subscribe(store.keys.cancel_channel())
    try:
        found = await store.cancel(job.id, job.tenant, result_ttl=60)
        assert found is not None and found.cancelled
        async with asyncio.timeout(5):
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    break
        assert message["data"] == job.id.encode()
        assert await store.statuses([job.id, "gone"]) == ["cancelled", None]
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------ leases


async def test_reclaim_takes_over_an_idle_entry_and_refresh_keeps_it(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    kept, lost = make_job(), make_job()
    await store.queues.ensure_group("mock")
    for job in (kept, lost):
        await store.enqueue(job, max_depth=10, ttl_s=600)
    first = await read_once(
        rclient, lambda r: store.queues.read(r, "mock", CONSUMER, count=10, block_ms=100)
    )
    assert [d.job for d in first] == [kept, lost]
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 0.06:  # noqa: ASYNC110 - idle time must pass
        await asyncio.sleep(0.02)
    await store.queues.refresh("mock", CONSUMER, {first[0].entry_id})
    _, taken = await store.queues.reclaim("mock", "worker-b", idle_ms=50, count=10)
    assert [(d.job, d.deliveries) for d in taken] == [(lost, 2)]
    # The consumer that lost its only entry holds nothing, and goes when idle.
    await store.settle(taken[0], Outcome(), consumer="worker-b")
    assert await store.queues.forget_consumers("mock", "worker-b", idle_ms=0) == []
    await rclient.xgroup_createconsumer(store.keys.queue("mock"), "workers", "idle-one")
    assert await store.queues.forget_consumers("mock", "worker-b", idle_ms=-1) == ["idle-one"]


async def test_reclaim_walks_past_long_calls_of_live_workers(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    """Redis looks at ten pending entries per entry asked for: a dead worker's entry
    behind many long calls of live ones is reached by going on from the cursor."""
    jobs = [make_job() for _ in range(31)]
    await store.queues.ensure_group("mock")
    for job in jobs:
        await store.enqueue(job, max_depth=100, ttl_s=600)
    live = await read_once(
        rclient, lambda r: store.queues.read(r, "mock", CONSUMER, count=30, block_ms=100)
    )
    (dead,) = await read_once(
        rclient, lambda r: store.queues.read(r, "mock", "dead-worker", count=1, block_ms=100)
    )
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < 0.06:  # noqa: ASYNC110 - idle time must pass
        await asyncio.sleep(0.02)
    await store.queues.refresh("mock", CONSUMER, {d.entry_id for d in live})  # alive
    # From the start every time: the first ten entries only, never the dead one.
    for _ in range(5):
        start, taken = await store.queues.reclaim("mock", "worker-b", idle_ms=50, count=1)
        assert taken == [] and start != b"0-0"
    # Going on from the cursor reaches it.
    start, found = b"0-0", list[Delivery]()
    for _ in range(4):
        start, found = await store.queues.reclaim(
            "mock", "worker-b", idle_ms=50, count=1, start=start
        )
        if found:
            break
    assert [d.entry_id for d in found] == [dead.entry_id]


async def test_webhook_attempts_are_recorded_only_while_the_job_exists(store: JobStore) -> None:
    job = make_job()
    await store.enqueue(job, max_depth=10, ttl_s=600)
    state = {"webhook_attempts": 1, "webhook_status": "pending", "webhook_code": 500}
    assert await store.webhook_attempt(job.id, 0, state) is True
    rec = await record(store, job.id)
    assert (rec.webhook_attempts, rec.webhook_code) == (1, 500)
    assert await store.webhook_attempt("gone", 0, state) is False


async def test_an_entry_too_deep_to_decode_costs_only_itself(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    """A job packed with an unknown field nested 200,000 levels deep: the reader
    gets a delivery with no job (dead-lettered), not an exception."""
    fields = msgspec.structs.asdict(make_job())
    packed = b"\xde" + (len(fields) + 1).to_bytes(2, "big")  # a map: the job's fields + 1
    for key, value in fields.items():
        packed += msgspec.msgpack.encode(key) + msgspec.msgpack.encode(value)
    packed += msgspec.msgpack.encode("unknown") + b"\x91" * 200_000 + b"\xc0"
    await store.queues.ensure_group("mock")
    await rclient.xadd(store.keys.queue("mock"), {"j": packed})
    (delivery,) = await read_once(
        rclient, lambda r: store.queues.read(r, "mock", CONSUMER, count=10, block_ms=100)
    )
    assert delivery.job is None and delivery.raw == packed


async def test_a_reply_entry_that_cannot_be_read_fails_its_call_only(
    store: JobStore, rclient: aioredis.Redis
) -> None:
    replies = f"{store.keys.prefix}r:pod"
    await rclient.xadd(replies, {"i": "a", "k": "e", "s": "not-a-status", "d": "x"})
    await rclient.xadd(replies, {"i": "b", "k": "c", "d": "data: 1\n\n"})
    found = await read_once(
        rclient, lambda r: JobStore.read_replies(r, replies, b"0-0", block_ms=10)
    )
    (_, first, bad), (_, second, good) = found
    assert (first, second) == (b"a", b"b")
    assert isinstance(bad, Failure) and bad.status == 502
    assert good == Chunks(b"data: 1\n\n")
