"""Jobs, their records and their replies: admission, the state transitions (each
one script), reading records and the tenant's index, sending and reading replies."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from llm_broker.shared import messages as m
from llm_broker.shared.accounts import has_checks
from llm_broker.shared.config import Config, Quota
from llm_broker.shared.errors import NotOnCluster
from llm_broker.shared.keys import GROUP, Keys
from llm_broker.shared.redisio import Commands, Mergeable, execute
from llm_broker.shared.store import scripts
from llm_broker.shared.store.queues import Queues
from llm_broker.shared.store.records import (
    Chunks,
    Failure,
    JobRecord,
    Reply,
    admission_fields,
    decode_reply,
    reply_args,
    reply_fields,
    stamp,
)
from llm_broker.shared.store.values import (
    AccountLimited,
    Admitted,
    AsyncFields,
    BudgetExceeded,
    Cancelled,
    Delivery,
    Full,
    Idempotency,
    KeyConflict,
    KeyInUse,
    ListCursor,
    NotReplicated,
    Outcome,
    Refused,
    Replayed,
    Submitted,
    TenantQueueFull,
    TenantRateLimited,
    Verdict,
)

_NO_QUOTA = Quota()

#: The most entries a reply stream keeps (approximately).
REPLY_MAXLEN = 100_000
#: The consumer group a reply stream's reader keeps its place in.
REPLY_GROUP = "replies"

log = logging.getLogger("llm_broker.store")

#: What an entry that is not a reply (another writer's) reads as: a 502 for its job.
_NO_REPLY = Failure(
    502,
    b'{"error":{"message":"the worker sent a reply this process cannot read",'
    b'"type":"upstream_error","param":null,"code":"bad_reply"}}',
)


def _text(raw: bytes | str | float) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _scored(raw: list[Any]) -> list[tuple[str, str]]:
    """(score, member) pairs of a WITHSCORES reply, flat (RESP2) or paired (RESP3)."""
    if raw and isinstance(raw[0], list):
        return [(_text(s), _text(i)) for i, s in raw]
    return [(_text(raw[n + 1]), _text(raw[n])) for n in range(0, len(raw), 2)]


#: The start script's answers; any other is a final status.
_VERDICTS = {v.value.encode(): v for v in Verdict if v is not Verdict.FINAL}


class JobStore:
    def __init__(
        self, config: Config, batcher: Commands, redis: aioredis.Redis, *, cluster: bool = False
    ) -> None:
        self.keys = Keys(config.redis.key_prefix, cluster=cluster)
        self._fn = scripts.Functions(scripts.CLUSTER_LIBRARY if cluster else scripts.LIBRARY)
        self._batcher = batcher
        #: A synchronous call's functions, whose calls that leave together are one call.
        self._enqueues = Mergeable(self._fn.enqueue, self._fn.enqueue_many)
        self._settles = Mergeable(self._fn.settle, self._fn.settle_many)
        self._redis = redis
        self._wcfg = config.worker
        self._result_ttl = int(config.jobs.result_ttl_s)
        self._config = config
        self._prefix = config.redis.key_prefix
        self._tenant_cache: dict[tuple[str, str], tuple[str, str]] = {}
        #: How old a Cluster's claim of an Idempotency-Key without its job must be
        #: before another request takes it over: longer than an admission's tries.
        self._claim_window = max(5.0, 4 * config.redis.command_timeout_s)
        #: The provider queues' streams and consumer groups.
        self.queues = Queues(self.keys, redis, config.worker.max_deliveries)

    # ------------------------------------------------------------ admission

    def _admission(self, job: m.Job, max_depth: int, acct: bytes, deadline: str) -> tuple[Any, ...]:
        """The scheduler's admission arguments (scripts.py, ``admission``): the job's
        class, its tenant's weight and quotas, overall and on its provider (one
        argument), the job's estimated tokens (``job.tokens``) for the tpm quotas,
        its account (shared/accounts.py; empty for none) and whether admission
        checks it, then the record's model and stream flag (the function writes the
        record: :func:`admission_fields`)."""
        return (
            self._prefix,
            job.provider,
            job.priority,
            self._tenant_args(job.tenant, job.provider)[0],
            job.tokens,
            stamp(time.time()),
            max_depth,
            deadline,
            acct,
            "1" if has_checks(acct) else "",
            job.model,
            "1" if job.stream else "0",
        )

    def _tenant_args(self, tenant: str, provider: str) -> tuple[str, str]:
        """A tenant's weight, in-flight quotas, queued quotas and rates on a provider
        (then overall), as admission takes them: "w fq fqa mq mqa rpm tpm rpma tpma";
        and the in-flight quotas its jobs count in while they run (see :meth:`_held`).
        Worked out once per pair (tenants come from the config, which does not
        change)."""
        found = self._tenant_cache.get((tenant, provider))
        if found is None:
            tcfg = self._config.tenant(tenant)
            mine = tcfg.providers.get(provider, _NO_QUOTA)
            every = tcfg.quotas
            weight, on_provider, overall = self._settings(tenant, provider)
            quotas = [on_provider, overall, mine.max_queued, every.max_queued]
            quotas += [mine.rpm, mine.tpm, every.rpm, every.tpm]
            held = ("p" if on_provider else "") + ("a" if overall else "")
            found = (" ".join((weight, *map(str, quotas))), held)
            self._tenant_cache[(tenant, provider)] = found
        return found

    def _held(self, tenant: str, provider: str) -> str:
        """The tenant's in-flight quotas a job of its counts in while it runs: "p"
        (on the provider), "a" (overall), both or neither."""
        return self._tenant_args(tenant, provider)[1]

    def _settings(self, tenant: str, provider: str) -> tuple[str, int, int]:
        """What dispatch needs of a tenant on a provider: its weight, its in-flight
        quota there and overall."""
        tcfg = self._config.tenant(tenant)
        mine = tcfg.providers.get(provider, _NO_QUOTA)
        return repr(tcfg.weight), mine.max_in_flight, tcfg.quotas.max_in_flight

    async def enqueue(
        self, job: m.Job, *, max_depth: int, ttl_s: int, acct: bytes = b""
    ) -> Refused | None:
        """Admit a synchronous call: its record and its place in the provider's
        waiting lists. None when admitted, else why not (``max_depth`` jobs wait or
        run on the provider, or a quota of the tenant's is reached)."""
        return admission(await self.enqueue_call(job, max_depth=max_depth, ttl_s=ttl_s, acct=acct))

    def enqueue_call(
        self, job: m.Job, *, max_depth: int, ttl_s: int, acct: bytes = b""
    ) -> asyncio.Future[Any]:
        """:meth:`enqueue`'s call, for a caller that takes its answer itself (read by
        :func:`admission`)."""
        self._cluster_can(acct)
        created, deadline = stamp(job.created), stamp(job.deadline)
        return self._batcher.call_merged(
            self._enqueues,
            (self.keys.job(job.id),),
            (
                m.job_encoder.encode(job),
                ttl_s,
                job.id,
                job.tenant,
                created,
                *self._admission(job, max_depth, acct, deadline),
            ),
        )

    async def submit(
        self,
        job: m.Job,
        *,
        max_depth: int,
        ttl_s: int,
        extra: AsyncFields,
        idempotency: Idempotency | None,
        acct: bytes = b"",
        index: str | None = None,
        replicas: int = 0,
    ) -> Submitted:
        """Admit an async job: the key check, its record, its place in the waiting
        lists and the tenant's index (or ``index``: a batch's), in one step.
        ``replicas``: how many replicas must hold the admission (WAIT, on the same
        connection right after it) before it counts as :class:`Admitted`.

        On a Cluster the Idempotency-Key is on a slot of its own: it is claimed
        first (:meth:`_claim`), then the job admitted, and the claim given up if
        the job is refused."""
        self._cluster_can(acct, index)
        claim = claim_key = ""
        if idempotency is not None and self.keys.cluster:
            claim_key = self.keys.idempotency(job.tenant, idempotency.key)
            claimed = await self._claim(job, idempotency, claim_key, ttl_s)
            if not isinstance(claimed, str):
                return claimed
            claim = claimed
            idempotency = None  # (the claim made the key's check)
        keys = self.keys
        created, deadline = stamp(job.created), stamp(job.deadline)
        fields: list[Any] = []  # (the record's other fields: the function writes the rest)
        if extra.metadata:
            fields += ["metadata", msgspec.json.encode(extra.metadata)]
        if extra.webhook_url is not None:
            fields += ["webhook_url", extra.webhook_url, "webhook_status", "pending"]
            fields += ["webhook_attempts", 0]
        if extra.batch_stream is not None:
            fields += ["batch", extra.batch_stream]
        idem_key = keys.job(job.id)  # (unused: the script's one key per slot)
        request_hash = ""
        if idempotency is not None:
            idem_key = keys.idempotency(job.tenant, idempotency.key)
            request_hash = idempotency.request_hash
            fields += ["idem_key", idem_key]
        command = self._fn.submit.command(
            (keys.job(job.id), idem_key, index or keys.tenant_jobs(job.tenant, job.provider)),
            (
                m.job_encoder.encode(job),
                ttl_s,
                "1" if idempotency is not None else "0",
                f"{request_hash} {job.id}",
                min(ttl_s, idempotency.ttl_s) if idempotency is not None else 0,
                job.id,
                created,
                self._prefix,
                job.tenant,
                *self._admission(job, max_depth, acct, deadline),
                *fields,
            ),
        )
        answer, acked = await self._admit_replicated(command, replicas)
        written = [*admission_fields(job, created, deadline), *fields]
        outcome = _submitted(answer, acked, replicas, written)
        if claim and isinstance(outcome, Refused):
            await self._batcher.call(*self._fn.idem_release.command((claim_key,), (claim,)))
        return outcome

    async def _claim(
        self, job: m.Job, idempotency: Idempotency, key: str, ttl_s: int
    ) -> str | Replayed | KeyConflict | KeyInUse:
        """Claims a tenant's Idempotency-Key for ``job`` on a Cluster: the claim's
        value, or the earlier job's (:class:`Replayed`). A claim whose job is not
        there is taken over once it is older than an admission can take (the
        request that made it was refused, or its process died); until then the key
        is :class:`KeyInUse`."""
        ttl = min(ttl_s, idempotency.ttl_s)
        take = ""
        while True:
            mine = f"{idempotency.request_hash} {job.id} {stamp(time.time())}"
            claim = self._fn.idem_claim.command((key,), (mine, ttl, take))
            answer = await self._batcher.call(*claim)
            if answer[0] == b"claimed":
                return mine
            seen = answer[1].decode()
            seen_hash, seen_id, at = [*seen.split(" "), "0", "0"][:3]
            rec = await self.record(seen_id)
            if rec is not None:
                if rec.tenant != job.tenant:
                    return KeyConflict()
                return Replayed(seen_id, seen_hash, rec)
            if take or time.time() - float(at) < self._claim_window:
                return KeyInUse()
            take = seen

    def _cluster_can(self, acct: bytes, index: str | None = None) -> None:
        """Refuse what a Cluster does not do yet: the keys these need are on the
        tenant's shard, not the job's (docs/cluster.md)."""
        if not self.keys.cluster:
            return
        if has_checks(acct):
            raise NotOnCluster(
                "limits and budgets of API keys and tenants kept in Redis are not "
                "enforced on this deployment's Redis Cluster yet"
            )
        if index is not None:
            raise NotOnCluster("batches are not available on a Redis Cluster yet")

    async def _admit_replicated(self, command: tuple[Any, ...], replicas: int) -> tuple[Any, int]:
        """``command``'s answer and, with ``replicas``, how many replicas confirmed it.

        With replicas, the admission and its WAIT go together on a connection of
        their own (WAIT counts the writes made on its connection), not through the
        batcher, whose other callers would wait for the replicas too. A WAIT that
        fails (an ACL without it, say) counts as no replica."""
        if not replicas:
            return await self._batcher.call(*command), 0
        cfg = self._config.redis
        wait = ("WAIT", replicas, cfg.min_replicas_timeout_ms)
        async with asyncio.timeout(cfg.command_timeout_s):
            answer, acked = await execute(self._redis, [command, wait])
        if isinstance(answer, Exception):
            raise answer
        if isinstance(acked, Exception):
            log.warning("WAIT failed after an admission: %s", acked)
            return answer, 0
        return answer, int(acked)

    async def register(self, provider: str, consumer: str, slots: int, ttl_s: float) -> int:
        """Offer a worker's ``slots`` for ``provider`` until ``ttl_s`` from now (0:
        withdraw them), and fill what is free with waiting jobs; returns how many
        moved to the queue."""
        cfg = self._config
        shares = cfg.scheduling.min_share
        command = self._fn.register.command(
            (self.keys.scheduler(provider),),
            (
                self._prefix,
                provider,
                consumer,
                slots,
                ttl_s,
                repr(shares.async_),
                repr(shares.batch),
            ),
        )
        moved: int = await self._batcher.call(*command)
        return moved

    # ------------------------------------------------------------ records

    async def record(self, job_id: str) -> JobRecord | None:
        raw: dict[bytes, bytes] = await self._batcher.call("HGETALL", self.keys.job(job_id))
        return JobRecord.from_hash(raw) if raw else None

    async def records(self, job_ids: list[str]) -> list[JobRecord | None]:
        """The records of ``job_ids`` (None for an expired one), in one round trip."""
        return list(await asyncio.gather(*(self.record(i) for i in job_ids)))

    async def statuses(self, job_ids: list[str]) -> list[str | None]:
        found = await asyncio.gather(
            *(self._batcher.call("HGET", self.keys.job(i), "status") for i in job_ids)
        )
        return [s.decode() if s is not None else None for s in found]

    def _tenant_indexes(self, tenant: str) -> list[str]:
        """The sorted sets that index a tenant's async jobs: one, or on a Cluster one
        per provider (beside its records)."""
        if not self.keys.cluster:
            return [self.keys.tenant_jobs(tenant)]
        return [self.keys.tenant_jobs(tenant, p) for p in self._config.providers]

    def _tenant_index_of(self, tenant: str, job_id: str) -> str:
        """The index that holds ``job_id`` if it is the tenant's."""
        if not self.keys.cluster:
            return self.keys.tenant_jobs(tenant)
        return self.keys.tenant_jobs_beside(tenant, job_id)

    async def tenant_cursor(self, tenant: str, job_id: str) -> ListCursor | None:
        """Where a listing that continues after ``job_id`` starts (None: it is not
        one of the tenant's listed jobs)."""
        score = await self._batcher.call("ZSCORE", self._tenant_index_of(tenant, job_id), job_id)
        return None if score is None else (_text(score), job_id)

    async def tenant_page(
        self, tenant: str, after: ListCursor | None, count: int
    ) -> list[tuple[str, ListCursor]]:
        """Up to ``count`` of a tenant's async jobs, newest first (by creation time,
        then id), after ``after``: each id with the cursor that continues after it.
        On a Cluster the providers' indexes are read together and merged."""
        pages = await asyncio.gather(
            *(self._index_page(i, after, count) for i in self._tenant_indexes(tenant))
        )
        found = [entry for page in pages for entry in page]
        if len(pages) > 1:
            found.sort(key=lambda e: (float(e[0]), e[1]), reverse=True)
        return [(job_id, (score, job_id)) for score, job_id in found[:count]]

    async def _index_page(
        self, index: str, after: ListCursor | None, count: int
    ) -> list[tuple[str, str]]:
        """(score, id) of one index's entries after ``after``, newest first."""
        if after is None:
            raw = await self._batcher.call("ZREVRANGE", index, 0, count - 1, "WITHSCORES")
            return _scored(raw)
        score, last = after
        # Entries created in the same microsecond come in descending id order.
        same, older = await asyncio.gather(
            self._batcher.call("ZRANGEBYSCORE", index, score, score),
            self._batcher.call(
                "ZREVRANGEBYSCORE", index, f"({score}", "-inf", "WITHSCORES", "LIMIT", 0, count
            ),
        )
        tied = sorted((i for i in map(_text, same) if i < last), reverse=True)
        return [(score, i) for i in tied[:count]] + _scored(older)

    async def forget(self, tenant: str, job_ids: list[str]) -> None:
        """Drop expired jobs from the tenant's index."""
        by_index: dict[str, list[str]] = {}
        for job_id in job_ids:
            by_index.setdefault(self._tenant_index_of(tenant, job_id), []).append(job_id)
        await asyncio.gather(*(self._batcher.call("ZREM", i, *ids) for i, ids in by_index.items()))

    # ------------------------------------------------------------ transitions

    async def start(self, delivery: Delivery, *, result_ttl: int) -> Verdict:
        """Mark a delivered job started, unless it must not run (see :class:`Verdict`)."""
        job = delivery.job
        assert job is not None
        command = self._fn.start.command(
            (self.keys.job(job.id), self.keys.job_events(job.id)),
            (
                stamp(time.time()),
                self._wcfg.max_deliveries,
                delivery.deliveries,
                job.id,
                result_ttl,
                delivery.provider,
            ),
        )
        return _VERDICTS.get(await self._batcher.call(*command), Verdict.FINAL)

    async def settle(self, delivery: Delivery, outcome: Outcome, *, consumer: str) -> bool:
        """Close a delivery: the job's final state (unless it has one), the reply to
        a waiting client, the cached answer, a dead-letter summary, then the ack; one
        round trip. True if this call made the job final."""
        job = delivery.job
        keys = self.keys
        queue = keys.queue(delivery.provider)
        reply_to = self._reply_stream(job) if job is not None and job.reply_to else ""
        field = "result" if outcome.status == m.COMPLETED else "error"
        ttl = (job.result_ttl if job is not None else 0) or self._result_ttl
        history = msgspec.json.encode(outcome.history) if outcome.history else b""
        args = (
            GROUP,
            delivery.entry_id,
            job.id if job else "",
            outcome.status,
            stamp(time.time()),
            field,
            outcome.payload,
            outcome.http_status,
            ttl,
            REPLY_MAXLEN,
            history,
            self._prefix,
            delivery.provider,
            job.tenant if job else "",
            job.tokens if job else 0,
            outcome.usage.wire() if outcome.usage is not None else "",
            self._held(job.tenant, delivery.provider) if job else "",
            stamp(outcome.started_at) if outcome.started_at is not None else "",
            *(reply_args(outcome.reply) if job and reply_to and outcome.reply else ()),
        )
        record = keys.job(job.id) if job else queue
        events = keys.job_events(job.id) if job else keys.webhook_events(delivery.provider)
        if job is not None and keys.cluster and job.id[:4] != keys.tag(delivery.provider):
            # A job that fell back here: its record is on its first provider's slot.
            made = await self._batcher.call(
                *self._fn.settle_record.command((record, reply_to or record, events), args)
            )
            await self._batcher.call(*self._fn.settle_queue.command((queue,), args))
            return bool(made)
        call_keys = (record, queue, reply_to or queue, events)
        commands: list[tuple[Any, ...]] = []
        if job is not None and job.cache_key and outcome.status == m.COMPLETED:
            commands.append(("SET", job.cache_key, outcome.payload, "EX", job.cache_ttl))
        if outcome.dead_letter:
            commands += self._dead_letter_commands(delivery, consumer, outcome.payload)
        if not commands:  # the common case: one call, with the others' that leave with it
            return bool(await self._batcher.call_merged(self._settles, call_keys, args))
        commands.append(self._fn.settle.command(call_keys, args))
        futures = [self._batcher.call(*c) for c in commands]
        try:
            results = await asyncio.gather(*futures)
        except BaseException:
            await asyncio.gather(*futures, return_exceptions=True)
            raise
        return bool(results[-1])

    def _dead_letter_commands(
        self, delivery: Delivery, consumer: str, error: bytes
    ) -> list[tuple[Any, ...]]:
        """A bounded summary of a dead-lettered entry, in a stream bounded in length
        and age: the job's id, tenant, model and error, its sizes, and at most
        ``worker.dead_letter_body_bytes`` of its request body."""
        wcfg = self._wcfg
        job = delivery.job
        key = self.keys.dead_letter(delivery.provider)
        limit = wcfg.dead_letter_body_bytes
        raw = delivery.raw
        body = job.body if job is not None else raw
        fields: list[Any] = ["entry", delivery.entry_id, "consumer", consumer, "at", time.time()]
        if job is not None:
            fields += ["job", job.id, "tenant", job.tenant, "model", job.model]
            fields += ["kind", job.kind, "priority", job.priority]
        fields += ["error", error[:2048], "entry_bytes", len(raw), "body_bytes", len(body)]
        fields += ["body", body[:limit], "body_truncated", int(len(body) > limit)]
        ttl = int(wcfg.dead_letter_ttl_s)
        oldest = int((time.time() - ttl) * 1000)
        return [
            ("XADD", key, "MAXLEN", "~", wcfg.dead_letter_maxlen, "*", *fields),
            ("XTRIM", key, "MINID", "~", f"{oldest}-0"),
            ("EXPIRE", key, ttl),
        ]

    async def move(self, delivery: Delivery, moved: m.Job, *, consumer: str) -> bool:
        """Fallback: put the job, as ``moved`` (its next deployment, its history), in
        that deployment's waiting list, and close this delivery. False if the job was
        final, or ``consumer`` no longer holds the entry (another worker took it over)."""
        keys = self.keys
        if keys.cluster:
            return await self._move_in_steps(delivery, moved, consumer)
        command = self._fn.move.command(
            (keys.job(moved.id), keys.queue(delivery.provider)),
            (
                GROUP,
                delivery.entry_id,
                m.job_encoder.encode(moved),
                moved.provider,
                msgspec.json.encode(moved.attempts),
                self._prefix,
                delivery.provider,
                moved.tenant,
                moved.priority,
                time.time(),
                " ".join(map(str, self._settings(moved.tenant, moved.provider))),
                consumer,
                moved.id,
            ),
        )
        return bool(await self._batcher.call(*command))

    async def _move_in_steps(self, delivery: Delivery, moved: m.Job, consumer: str) -> bool:
        """:meth:`move` on a Cluster: the record, the next provider's list and this
        provider's entry are three slots (see ``_MOVE_RECORD`` in scripts.py)."""
        keys, call, fn = self.keys, self._batcher.call, self._fn
        queue = keys.queue(delivery.provider)
        entry = delivery.entry_id
        if not await call(*fn.holds.command((queue,), (GROUP, entry, consumer))):
            return False
        now = time.time()
        history = msgspec.json.encode(moved.attempts)
        found = await call(
            *fn.move_record.command(
                (keys.job(moved.id),), (moved.provider, history, moved.priority)
            )
        )
        if found[0] == 1:
            await call(
                *fn.move_to.command(
                    (keys.scheduler(moved.provider),),
                    (
                        self._prefix,
                        moved.provider,
                        moved.priority,
                        moved.tenant,
                        moved.id,
                        found[1] or stamp(now),
                        m.job_encoder.encode(moved),
                        " ".join(map(str, self._settings(moved.tenant, moved.provider))),
                        stamp(now),
                        stamp(moved.deadline),
                    ),
                )
            )
        await call(
            *fn.move_from.command(
                (queue,),
                (
                    GROUP,
                    entry,
                    consumer,
                    self._prefix,
                    delivery.provider,
                    moved.tenant,
                    moved.id,
                    stamp(now),
                ),
            )
        )
        return bool(found[0] == 1)

    async def expire(self, job: m.Job) -> bool:
        """The client stopped waiting: a job not final yet becomes expired."""
        command = self._fn.expire_job.command(
            (self.keys.job(job.id), self.keys.job_events(job.id)),
            (time.time(), job.id, job.result_ttl or self._result_ttl, self._prefix),
        )
        return bool(await self._batcher.call(*command))

    async def cancel(self, job_id: str, tenant: str, *, result_ttl: int) -> Cancelled | None:
        """Cancel a tenant's job unless it is final; None if there is no such job
        (or it is another tenant's). The worker running it hears of it at once."""
        keys = self.keys
        command = self._fn.cancel.command(
            (keys.job(job_id), keys.job_events(job_id)),
            (time.time(), tenant, result_ttl, keys.cancel_channel(), job_id, self._prefix),
        )
        answer = await self._batcher.call(*command)
        if answer[0] == b"gone":
            return None
        return Cancelled(answer[0] == b"cancelled", JobRecord.from_pairs(answer[1]))

    async def webhook_attempt(self, job_id: str, keep_s: int, state: dict[str, Any]) -> bool:
        """Record a webhook delivery attempt's ``webhook_*`` fields, unless the job is
        gone; the record is kept at least ``keep_s`` more seconds."""
        pairs = [v for item in state.items() for v in item]
        command = self._fn.webhook_attempt.command((self.keys.job(job_id),), (keep_s, *pairs))
        return bool(await self._batcher.call(*command))

    # ------------------------------------------------------------ replies

    async def send(self, job: m.Job, reply: Chunks) -> None:
        """Append stream chunks to the reply stream of the ingress process waiting."""
        if job.reply_to:
            await self._batcher.call(
                "XADD",
                self._reply_stream(job),
                "NOMKSTREAM",
                "MAXLEN",
                "~",
                REPLY_MAXLEN,
                "*",
                *reply_fields(job.id, reply),
            )

    def _reply_stream(self, job: m.Job) -> str:
        """Where a job's replies go: the stream its ingress process named, or on a
        Cluster that process's stream on the job's provider (``reply_to`` names
        the process)."""
        if self.keys.cluster:
            return self.keys.job_reply(job.reply_to, job.id)
        return job.reply_to

    @staticmethod
    async def read_replies(
        reader: Commands, stream: str, after: bytes, *, block_ms: int
    ) -> list[tuple[bytes, bytes, Reply]]:
        """The replies after entry ``after`` (blocking up to ``block_ms``), as
        ``(entry id, job id, reply)``; ``reader`` is the reader's own connection."""
        read = ("XREAD", "COUNT", 1000, "BLOCK", block_ms, "STREAMS", stream, after)
        return JobStore.decode_replies(stream, await reader.call(*read))

    @staticmethod
    def next_replies_command(stream: str, block_ms: int) -> tuple[Any, ...]:
        """The blocking read of the replies after those read before, by the stream's
        one reader (the ingress process it belongs to): its group (REPLY_GROUP) keeps
        where it is, so that reads may be sent before the answers to those before
        them (``Batcher.reads(ahead=…)``). Nothing is kept pending (``NOACK``): the
        reader sets the group back to the last entry it read (``XGROUP SETID``)
        whenever a read may have been lost with its connection."""
        return (
            "XREADGROUP", "GROUP", REPLY_GROUP, "r", "COUNT", 1000, "BLOCK", block_ms,
            "NOACK", "STREAMS", stream, ">",
        )  # fmt: skip

    @staticmethod
    def decode_replies(stream: str, batches: Any) -> list[tuple[bytes, bytes, Reply]]:
        """A read's answer (:meth:`next_replies_command`, :meth:`read_replies`) as
        ``(entry id, job id, reply)``."""
        found: list[tuple[bytes, bytes, Reply]] = []
        for _stream, entries in batches or ():
            for entry_id, fields in entries:
                try:
                    reply = decode_reply(fields)
                except (ValueError, UnicodeDecodeError):
                    log.warning("reply stream %s: entry %s is no reply; skipped", stream, entry_id)
                    reply = _NO_REPLY
                found.append((entry_id, fields.get(b"i", b""), reply))
        return found


def _submitted(answer: Any, acked: int, replicas: int, fields: list[Any]) -> Submitted:
    """What the submit function's answer means (``fields``: the record's, as written)."""
    match answer[0]:
        case b"ok":
            if acked < replicas:
                return NotReplicated(acked, replicas)
            return Admitted(_record_of(fields))
        case b"dup":
            seen_hash, _, seen_id = answer[1].decode().partition(" ")
            return Replayed(seen_id, seen_hash, JobRecord.from_pairs(answer[2]))
        case b"conflict":
            return KeyConflict()
        case _:
            return _refusal(answer)


def admission(answer: list[bytes]) -> Refused | None:
    """What an ``enqueue`` answered: None when it admitted the call, else why not."""
    return None if answer[0] == b"ok" else _refusal(answer)


def _refusal(answer: list[bytes]) -> Refused:
    match answer[0]:
        case b"tenant_queue_full":
            return TenantQueueFull(answer[1].decode())
        case b"tenant_rate_limited":
            return TenantRateLimited(answer[1].decode(), float(answer[2]))
        case b"account_limited":
            return AccountLimited(answer[1].decode(), answer[2].decode(), float(answer[3]))
        case b"budget_exceeded":
            return BudgetExceeded(answer[1].decode(), float(answer[2]))
        case _:
            return Full()


def _record_of(fields: list[Any]) -> JobRecord:
    """The record that a flat field/value list written to Redis makes."""
    values = [v if isinstance(v, bytes) else str(v).encode() for v in fields]
    return JobRecord.from_pairs(values)
