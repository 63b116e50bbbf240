"""The batch driver: every worker process runs one; a lease in Redis gives each
batch to one driver at a time, and another takes it over when that one dies.

A driver round on a batch it holds, each step bounded:

1. *validating*: read the input file once, line by line (not kept), and count its
   lines; a bad line fails the batch.
2. *collect*: take up to ``COLLECT`` finished lines from the batch's stream (the
   job scripts append each line's job id when it becomes final), write their
   results as the next segment of the output (or error) file, then record the
   stream position, the counts and the segment in one transaction. A driver that
   dies between the two writes the same segment again from the same position.
3. *fill*: read the next lines from the input's byte offset and submit each as an
   async job of class ``batch`` until ``files.window`` are queued or running. A
   line's job id and Idempotency-Key follow from the batch and the line, so a line
   submitted again after a crash is the same job.
4. *end*: a cancelled batch cancels its open lines; at the end of the completion
   window the open lines are cancelled and every line not done is ``expired``;
   once nothing is open the output files are saved and the batch is final.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterable
from typing import Any

import msgspec
import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from llm_broker.shared import accounts
from llm_broker.shared import messages as m
from llm_broker.shared.accounts import AccountKeys, KeyRecord, Principal, principal_of
from llm_broker.shared.anthropic import error_object
from llm_broker.shared.batches import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    Batch,
    BatchStore,
    line_job_id,
    webhook_event,
)
from llm_broker.shared.batchlines import (
    BatchLine,
    LineError,
    decode_messages,
    iter_lines,
    parse_line,
)
from llm_broker.shared.config import Config, Router
from llm_broker.shared.errors import BadRequest
from llm_broker.shared.files import FileRecord, Files
from llm_broker.shared.metrics import BatchMetrics
from llm_broker.shared.redisio import REDIS_DOWN, Script, execute, raise_if_cancelling
from llm_broker.shared.store import (
    AsyncFields,
    Idempotency,
    JobStore,
    Replayed,
    Submitted,
)
from llm_broker.shared.store.values import Admitted

log = logging.getLogger("llm_broker.batches")

#: Finished lines taken into the output per round and batch.
COLLECT = 500
#: Lines longer than this are refused (a batch line is one request).
MAX_LINE = 16 * 1024 * 1024
LEASE_MS = 15_000
#: Errors kept on a failed validation.
MAX_ERRORS = 100

# A line that fails before it becomes a job (no such model) is a finished line all
# the same: once, however often its submission is tried.
_FAIL_ONCE = Script(
    """
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[1]) then
  redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
end
return 1
"""
)


#: The job kind of each endpoint a batch line may call.
_KINDS = {"/v1/embeddings": m.EMBEDDINGS, "/v1/messages": m.MESSAGES}


def _now() -> int:
    return int(time.time())


def _line_error(batch: Batch, job_id: str, cid: str, status: int, body: bytes) -> dict[str, Any]:
    """A failed line in the API's results format."""
    if batch.spec.api == "anthropic":
        err = orjson.loads(body).get("error", {}) if body else {}
        return {
            "custom_id": cid,
            "result": {
                "type": "errored",
                "error": error_object(status, str(err.get("message", "")), err.get("type")),
            },
        }
    return {
        "id": f"batch_req_{job_id}",
        "custom_id": cid,
        "response": {
            "status_code": status,
            "request_id": job_id,
            "body": orjson.Fragment(body) if body else None,
        },
        "error": None,
    }


def _not_run(batch: Batch, job_id: str, cid: str, why: str) -> dict[str, Any]:
    """A line that never ran: ``expired`` (the window ended) or ``canceled``."""
    if batch.spec.api == "anthropic":
        return {"custom_id": cid, "result": {"type": why}}
    message = (
        "This line could not be executed before the batch's completion window ended."
        if why == "expired"
        else "The batch was cancelled before this line ran."
    )
    code = "batch_expired" if why == "expired" else "batch_cancelled"
    return {
        "id": f"batch_req_{job_id}",
        "custom_id": cid,
        "response": None,
        "error": {"code": code, "message": message},
    }


class BatchDriver:
    def __init__(
        self,
        config: Config,
        redis: aioredis.Redis,
        store: JobStore,
        files: Files,
        owner: str,
        metrics: BatchMetrics | None = None,
    ) -> None:
        self.metrics = metrics or BatchMetrics(CollectorRegistry())
        self.config = config
        self.cfg = config.files
        self.redis = redis
        self.store = store
        self.files = files
        self.batches = BatchStore(redis, config.redis.key_prefix, config.files.retention_s)
        self.k = self.batches.k
        self.owner = owner
        self.router = Router(config)
        self.account_keys = AccountKeys(config.redis.key_prefix)
        #: The keys that created the batches of this round (None: gone or revoked).
        self._keys: dict[str, Principal | None] = {}

    # -------------------------------------------------------- the loop

    async def run(self) -> None:
        """Drive the batches this process holds, until cancelled."""
        next_sweep = 0.0
        while True:
            raise_if_cancelling()
            busy = False
            try:
                active = await self.redis.zrange(self.k.active(), 0, -1)
                self.metrics.running.set(len(active))
                for raw in active:
                    batch_id = raw.decode()
                    if await self._hold(batch_id):
                        try:
                            busy = await self.step(batch_id) or busy
                        except REDIS_DOWN:
                            raise
                        except Exception:  # a defect: logged; the other batches go on
                            log.exception("batch %s: a round failed", batch_id)
                if time.monotonic() >= next_sweep:
                    await self.files.sweep(time.time())
                    next_sweep = time.monotonic() + 60
            except REDIS_DOWN as e:
                raise_if_cancelling()
                log.warning("batch driver: Redis unreachable: %s", e)
                busy = False
            # A round right away while there is work moving, else a short pause.
            await asyncio.sleep(0.02 if busy else 0.2)

    async def _hold(self, batch_id: str) -> bool:
        lease = self.k.lease(batch_id)
        if await self.redis.set(lease, self.owner, nx=True, px=LEASE_MS):
            return True
        holder = await self.redis.get(lease)
        if holder is not None and holder.decode() == self.owner:
            await self.redis.pexpire(lease, LEASE_MS)
            return True
        return False

    async def _retire(self, batch_id: str) -> None:
        """Take an ended batch out of the active set; the running gauge follows at once
        (it is set from the set at the start of a round), before any webhook says it ended."""
        if await self.redis.zrem(self.k.active(), batch_id):
            self.metrics.running.dec()

    async def release(self) -> None:
        """Give up every lease this process holds (shutdown): another driver goes on."""
        for raw in await self.redis.zrange(self.k.active(), 0, -1):
            lease = self.k.lease(raw.decode())
            holder = await self.redis.get(lease)
            if holder is not None and holder.decode() == self.owner:
                await self.redis.delete(lease)

    async def step(self, batch_id: str) -> bool:
        """One bounded round on a batch; True if it moved."""
        self._keys.clear()
        batch = await self.batches.get(batch_id)
        if batch is None:
            await self._retire(batch_id)
            return False
        try:
            if batch.status == VALIDATING:
                await self._validate(batch)
                return True
            if batch.status not in (IN_PROGRESS, CANCELLING, FINALIZING):
                await self._retire(batch_id)
                return False
            moved = await self._collect(batch)
            if batch.status == CANCELLING:
                await self._cancel_open(batch)
            elif batch.status == IN_PROGRESS and _now() >= batch.spec.expires_at:
                await self._expire(batch)
            elif batch.status == IN_PROGRESS:
                moved = await self._fill(batch) or moved
            await self._maybe_end(batch)
            return moved
        except (LineError, FileNotFoundError) as e:
            await self._fail(batch, [{"code": "invalid_file", "message": str(e)}])
            return True

    # -------------------------------------------------------- validating

    async def _input(self, batch: Batch) -> FileRecord:
        rec = await self.files.get(batch.spec.tenant, batch.spec.input_file_id)
        if rec is None:
            raise FileNotFoundError(f"the input file {batch.spec.input_file_id} does not exist")
        return rec

    async def _validate(self, batch: Batch) -> None:
        spec = batch.spec
        try:
            rec = await self._input(batch)
        except FileNotFoundError as e:
            await self._fail(batch, [{"code": "invalid_file", "message": str(e)}])
            return
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        total = 0
        async for line_no, raw, _ in iter_lines(self.files.content(rec), MAX_LINE):
            total = line_no
            try:
                cid = self._parse(batch, raw, line_no).custom_id
                if cid in seen:
                    raise LineError(f"custom_id {cid!r} is used twice", line_no, "custom_id")
                seen.add(cid)
            except LineError as e:
                if len(errors) < MAX_ERRORS:
                    errors.append(
                        {
                            "code": "invalid_request",
                            "message": e.message,
                            "param": e.param,
                            "line": e.line,
                        }
                    )
        if total > self.cfg.max_lines:
            errors.append(
                {
                    "code": "too_many_lines",
                    "message": f"the batch has {total} lines; at most {self.cfg.max_lines}",
                    "param": None,
                    "line": None,
                }
            )
        if total == 0:
            errors.append({"code": "empty_file", "message": "the input file has no lines"})
        if errors:
            await self._fail(batch, errors)
            return
        # In progress, unless a cancel came meanwhile (then it ends cancelled).
        key = self.k.batch(spec.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(key)
            status = await pipe.hget(key, "status")  # type: ignore[misc]
            pipe.multi()  # type: ignore[no-untyped-call]
            progress: dict[str, Any] = {"total": total}
            if status == VALIDATING.encode():
                progress |= {"status": IN_PROGRESS, "in_progress_at": _now()}
            pipe.hset(key, mapping=progress)
            try:
                await pipe.execute()
            except aioredis.WatchError:
                return  # the next round looks again
        log.info("batch %s: %d lines, %s", spec.id, total, progress.get("status", "cancelling"))

    def _parse(self, batch: Batch, raw: bytes, line_no: int) -> BatchLine:
        """A line checked: its custom_id, the job's chat or embeddings body, its model."""
        if batch.spec.api == "anthropic":
            # A Messages request, kept as it is: an Anthropic deployment gets it as it
            # came (prompt caching and all), another one translated (workers/native.py).
            try:
                found = orjson.loads(raw)
                cid, params = found["custom_id"], orjson.dumps(found["params"])
                if not isinstance(cid, str):
                    raise TypeError("custom_id must be a string")
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                raise LineError(f"invalid request: {e}", line_no, None) from e
            try:
                request = decode_messages(params)
            except BadRequest as e:
                raise LineError(e.message, line_no, e.param and f"params.{e.param}") from e
            return BatchLine(
                custom_id=cid,
                method="POST",
                url="/v1/messages",
                body=params,
                model=request.model,
                max_tokens=request.max_tokens,
            )
        return parse_line(raw, line_no, batch.spec.endpoint)

    async def _fail(self, batch: Batch, errors: list[dict[str, Any]]) -> None:
        now = _now()
        await self.redis.hset(  # type: ignore[misc]
            self.k.batch(batch.spec.id),
            mapping={
                "status": FAILED,
                "failed_at": now,
                "errors": orjson.dumps(errors),
            },
        )
        await self._retire(batch.spec.id)
        self.metrics.batches.labels(batch.spec.api, FAILED).inc()
        batch.status, batch.failed_at, batch.errors = FAILED, now, errors
        await self._notify(batch)
        log.info("batch %s failed: %s", batch.spec.id, errors[0]["message"])

    # -------------------------------------------------------- collecting

    def _file_id(self, batch: Batch, which: str) -> str:
        """The output or error file's id: the same on every driver."""
        return "file-" + line_job_id(batch.spec.id, -1 if which == "out" else -2)[:24]

    async def _collect(self, batch: Batch) -> bool:
        spec = batch.spec
        entries = await self.redis.xrange(
            self.k.done(spec.id), min=f"({batch.done_id}", max="+", count=COLLECT
        )
        if not entries:
            return False
        ids = [fields[b"i"].decode() for _, fields in entries]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(
                    self.store.keys.job(job_id),
                    ["status", "http_status", "result", "error", "metadata"],
                )
            records = await pipe.execute()
        ending = await self.redis.hget(self.k.batch(spec.id), "ending")  # type: ignore[misc]
        # A line still running when the window ended failed at its deadline (504).
        expiring = ending == b"expired" or _now() >= spec.expires_at
        out: list[bytes] = []
        err: list[bytes] = []
        completed = failed = dropped = 0
        for (_, fields), job_id, rec in zip(entries, ids, records, strict=True):
            status, http_status, result, error, metadata = rec
            if b"e" in fields:  # failed before it became a job
                cid = fields[b"c"].decode()
                line = _line_error(batch, job_id, cid, int(fields[b"s"]), fields[b"e"])
                failed += 1
                (out if spec.api == "anthropic" else err).append(orjson.dumps(line))
                continue
            meta = orjson.loads(metadata) if metadata else {}
            cid = str(meta.get("custom_id", ""))
            state = status.decode() if status else m.EXPIRED
            if state == m.COMPLETED:
                completed += 1
                out.append(orjson.dumps(self._success(batch, job_id, cid, result or b"{}")))
            elif state == m.FAILED and not (expiring and http_status == b"504"):
                failed += 1
                line = _line_error(batch, job_id, cid, int(http_status or 500), error or b"")
                (out if spec.api == "anthropic" else err).append(orjson.dumps(line))
            else:  # cancelled or expired before it ran, or cut off by the window's end
                dropped += 1
                why = "expired" if state != m.CANCELLED or expiring else "canceled"
                if why == "canceled" and spec.api == "openai":
                    continue  # a cancelled batch keeps what finished; the rest is not run
                line = _not_run(batch, job_id, cid, why)
                (out if spec.api == "anthropic" else err).append(orjson.dumps(line))
        lines = self.metrics.lines
        lines.labels("completed").inc(completed)
        lines.labels("failed").inc(failed)
        lines.labels("expired" if ending == b"expired" else "cancelled").inc(dropped)
        changes: dict[str, Any] = {"done_id": entries[-1][0].decode()}
        if out:
            changes |= await self._append(batch, "out", out)
        if err:
            changes |= await self._append(batch, "err", err)
        key = self.k.batch(spec.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=changes)
            pipe.hincrby(key, "completed", completed)
            pipe.hincrby(key, "failed", failed)
            pipe.hincrby(key, "dropped", dropped)
            pipe.zrem(self.k.jobs(spec.id), *ids)
            await pipe.execute()
        for name, value in changes.items():
            setattr(batch, name, value)
        batch.completed += completed
        batch.failed += failed
        batch.dropped += dropped
        return True

    def _success(self, batch: Batch, job_id: str, cid: str, result: bytes) -> dict[str, Any]:
        if batch.spec.api == "anthropic":
            message = orjson.Fragment(result)  # a message already, native or translated
            return {"custom_id": cid, "result": {"type": "succeeded", "message": message}}
        return {
            "id": f"batch_req_{job_id}",
            "custom_id": cid,
            "response": {"status_code": 200, "request_id": job_id, "body": orjson.Fragment(result)},
            "error": None,
        }

    async def _append(self, batch: Batch, which: str, lines: list[bytes]) -> dict[str, int]:
        """Write ``lines`` as the next segment of the output (``which`` "out") or error
        ("err") file; returns the batch fields to record once it is written."""
        n: int = getattr(batch, f"{which}_segments")
        data = b"".join(line + b"\n" for line in lines)

        async def chunks() -> Any:
            yield data

        name = f"files/{self._file_id(batch, which)}/{n}"
        size = await self.files.store.write(name, chunks(), len(data))
        return {
            f"{which}_segments": n + 1,
            f"{which}_bytes": getattr(batch, f"{which}_bytes") + size,
        }

    # -------------------------------------------------------- filling

    async def _fill(self, batch: Batch) -> bool:
        spec = batch.spec
        if batch.submitted >= batch.total:
            return False
        room = self.cfg.window - await self.redis.zcard(self.k.jobs(spec.id))
        if room <= 0:
            return False
        rec = await self._input(batch)
        submitted, cursor = batch.submitted, batch.cursor
        lines = iter_lines(self.files.content(rec, cursor), MAX_LINE)
        try:
            async for _, raw, offset in lines:
                line_no = submitted + 1
                if not await self._submit(batch, line_no, raw):
                    break  # the queue or a quota is full: the next round tries again
                submitted, cursor = line_no, batch.cursor + offset
                room -= 1
                if room <= 0 or submitted >= batch.total:
                    break
        finally:
            await lines.aclose()
        if submitted == batch.submitted:
            return False
        await self.redis.hset(  # type: ignore[misc]
            self.k.batch(spec.id), mapping={"submitted": submitted, "cursor": cursor}
        )
        batch.submitted, batch.cursor = submitted, cursor
        return True

    async def _submit(self, batch: Batch, line_no: int, raw: bytes) -> bool:
        """Submit one line as a job; False when it must wait (the queue is full)."""
        spec = batch.spec
        job_id = line_job_id(spec.id, line_no)
        line = self._parse(batch, raw, line_no)
        cid, body, model = line.custom_id, line.body, line.model
        kind = _KINDS.get(line.url, m.CHAT)
        candidates = self.router.candidates(model)
        if candidates is None:
            await self._fail_line(
                batch, job_id, cid, 404, f"the model {model!r} does not exist", "model_not_found"
            )
            return True
        if not await self._allowed(spec.key_id, model):
            await self._fail_line(
                batch,
                job_id,
                cid,
                403,
                f"the API key that created this batch may not use the model {model!r}",
                "model_not_allowed",
            )
            return True
        (target,) = random.choices(candidates.targets, candidates.weights)
        rest = [t for t in candidates.targets if t != target] if candidates.route.fallback else []
        now = time.time()
        job = m.Job(
            id=job_id,
            tenant=spec.tenant,
            provider=target.provider,
            model=model,
            route=candidates.name,
            upstream_model=target.model,
            reply_to="",
            deadline=float(spec.expires_at),
            created=now,
            body=body,
            kind=kind,
            fallbacks=rest,
            priority=m.BATCH,
            result_ttl=int(self.cfg.retention_s),
        )
        pricing = self.config.pricing
        price = pricing.get(model) or pricing.get(candidates.name)
        cap = self.config.providers[target.provider].max_call_tokens
        acct = accounts.account(
            Principal(tenant=spec.tenant, key_id=spec.key_id),
            self.account_keys,
            self.config.accounts,
            model=model,
            price=price,
            est=accounts.estimate(price, len(body), line.max_tokens, cap),
            now=now,
        )
        keep = spec.expires_at - int(now) + int(self.cfg.retention_s)
        answer: Submitted = await self.store.submit(
            job,
            max_depth=self.config.providers[target.provider].max_queue_depth,
            ttl_s=keep,
            extra=AsyncFields(
                metadata={"custom_id": cid, "batch_id": spec.id, "line": str(line_no)},
                batch_stream=self.k.done(spec.id),
            ),
            idempotency=Idempotency(
                key=f"batch:{spec.id}:{line_no}", request_hash=job_id, ttl_s=keep
            ),
            acct=acct,
            index=self.k.jobs(spec.id),
        )
        return isinstance(answer, Admitted | Replayed)

    async def _allowed(self, key_id: str, model: str) -> bool:
        """Whether the key (kept in Redis) that created the batch may use ``model``;
        its record is read once a round (a revoked or deleted key allows nothing)."""
        if not key_id:
            return True
        if key_id not in self._keys:
            raw = await self.redis.get(self.account_keys.key(key_id))
            key = msgspec.json.decode(raw, type=KeyRecord) if raw else None
            active = key is not None and key.status(time.time()) == "active"
            self._keys[key_id] = principal_of(key, None) if key is not None and active else None
        principal = self._keys[key_id]
        return principal is not None and principal.allows(model)

    async def _fail_line(
        self, batch: Batch, job_id: str, cid: str, status: int, message: str, code: str
    ) -> None:
        """Record a line that cannot become a job as finished, once."""
        kind = "invalid_request_error" if status == 404 else "permission_error"
        body = orjson.dumps(
            {"error": {"message": message, "type": kind, "param": "model", "code": code}}
        )
        keys = (self.k.done(batch.spec.id), f"{self.k.batch(batch.spec.id)}:f:{job_id}")
        args = (self.batches.retention_s, "i", job_id, "c", cid, "s", status, "e", body)
        (result,) = await execute(self.redis, [_FAIL_ONCE.command(keys, args)])
        if isinstance(result, Exception):
            raise result

    async def _notify(self, batch: Batch) -> None:
        """A batch created with a webhook URL: its end goes out as a Standard Webhooks
        event, through the webhook deliverer (a record of its own, under the batch's
        id, holding the prepared event; the same id if sent twice)."""
        spec = batch.spec
        if spec.webhook_url is None:
            return
        key = self.store.keys.job(spec.id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "tenant": spec.tenant,
                    "status": batch.status,
                    "completed_at": time.time(),
                    "webhook_url": spec.webhook_url,
                    "webhook_status": "pending",
                    "webhook_attempts": 0,
                    "event": webhook_event(batch),
                },
            )
            pipe.expire(key, int(self.cfg.retention_s))
            pipe.xadd(self.store.keys.webhook_events(), {"i": spec.id})
            await pipe.execute()

    # -------------------------------------------------------- ending

    async def _open(self, batch: Batch) -> list[str]:
        return [i.decode() for i in await self.redis.zrange(self.k.jobs(batch.spec.id), 0, -1)]

    async def _cancel_jobs(self, batch: Batch, ids: Iterable[str]) -> None:
        ttl = int(self.cfg.retention_s)
        for job_id in ids:
            await self.store.cancel(job_id, batch.spec.tenant, result_ttl=ttl)

    async def _cancel_open(self, batch: Batch) -> None:
        await self._cancel_jobs(batch, await self._open(batch))

    async def _expire(self, batch: Batch) -> None:
        """The completion window ended: open lines are cancelled (written as expired)."""
        await self.redis.hset(self.k.batch(batch.spec.id), "ending", "expired")  # type: ignore[misc]
        await self._cancel_jobs(batch, await self._open(batch))

    async def _maybe_end(self, batch: Batch) -> None:
        spec = batch.spec
        if await self.redis.zcard(self.k.jobs(spec.id)):
            return  # lines still open
        pending = await self.redis.xrange(
            self.k.done(spec.id), min=f"({batch.done_id}", max="+", count=1
        )
        if pending:
            return  # finished lines not yet taken in
        ending = await self.redis.hget(self.k.batch(spec.id), "ending")  # type: ignore[misc]
        if batch.status == CANCELLING:
            final = CANCELLED
            if spec.api == "anthropic":  # every request has a result: canceled
                await self._drop_rest(batch, "canceled")
        elif ending == b"expired" or (batch.submitted < batch.total and _now() >= spec.expires_at):
            final = EXPIRED
            await self._drop_rest(batch, "expired")
        elif batch.submitted >= batch.total:
            final = COMPLETED
        else:
            return
        await self._finalize(batch, final)

    async def _drop_rest(self, batch: Batch, why: str) -> None:
        """Write every line never submitted as ``expired`` or ``canceled`` (in bounded
        segments)."""
        if batch.submitted >= batch.total:
            return
        rec = await self._input(batch)
        lines: list[bytes] = []
        line_no = batch.submitted
        async for _, raw, _ in iter_lines(self.files.content(rec, batch.cursor), MAX_LINE):
            line_no += 1
            try:
                cid = self._parse(batch, raw, line_no).custom_id
            except LineError:
                cid = ""
            line = _not_run(batch, line_job_id(batch.spec.id, line_no), cid, why)
            lines.append(orjson.dumps(line))
            if len(lines) >= COLLECT:
                await self._write_rest(batch, lines)
                lines = []
        if lines:
            await self._write_rest(batch, lines)
        dropped = batch.total - batch.submitted
        self.metrics.lines.labels("expired" if why == "expired" else "cancelled").inc(dropped)
        key = self.k.batch(batch.spec.id)
        await self.redis.hset(key, mapping={"submitted": batch.total})  # type: ignore[misc]
        await self.redis.hincrby(key, "dropped", dropped)  # type: ignore[misc]
        batch.dropped += dropped
        batch.submitted = batch.total

    async def _write_rest(self, batch: Batch, lines: list[bytes]) -> None:
        which = "out" if batch.spec.api == "anthropic" else "err"
        changes = await self._append(batch, which, lines)
        await self.redis.hset(self.k.batch(batch.spec.id), mapping=changes)  # type: ignore[misc]
        for name, value in changes.items():
            setattr(batch, name, value)

    async def _finalize(self, batch: Batch, final: str) -> None:
        spec = batch.spec
        now = _now()
        key = self.k.batch(spec.id)
        await self.redis.hset(key, mapping={"status": FINALIZING, "finalizing_at": now})  # type: ignore[misc]
        changes: dict[str, Any] = {"status": final, f"{final}_at": now}
        expires = now + int(self.cfg.retention_s)
        for which, segments, size, field in (
            ("out", batch.out_segments, batch.out_bytes, "output_file_id"),
            ("err", batch.err_segments, batch.err_bytes, "error_file_id"),
        ):
            if not segments:
                continue
            rec = FileRecord(
                id=self._file_id(batch, which),
                tenant=spec.tenant,
                purpose="batch_output",
                filename=f"{spec.id}_{'output' if which == 'out' else 'error'}.jsonl",
                bytes=size,
                created_at=now,
                expires_at=expires,
                segments=segments,
            )
            await self.files.save(rec)
            changes[field] = rec.id
        await self.redis.hset(key, mapping=changes)  # type: ignore[misc]
        await self._retire(spec.id)
        await self.redis.delete(self.k.done(spec.id))
        self.metrics.batches.labels(spec.api, final).inc()
        batch.status = final
        setattr(batch, f"{final}_at", now)  # the final status's time
        batch.output_file_id = changes.get("output_file_id")
        batch.error_file_id = changes.get("error_file_id")
        await self._notify(batch)
        log.info(
            "batch %s %s: %d completed, %d failed, %d not run",
            spec.id,
            final,
            batch.completed,
            batch.failed,
            batch.dropped,
        )
