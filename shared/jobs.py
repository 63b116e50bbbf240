"""The job object of the jobs API and of webhook events, built from a job record.

A job record is the hash ``job:{id}`` (see shared/redisio.py for who writes which
field). Ingress answers ``GET /v1/jobs/{id}`` with :func:`job_object`; the webhook
delivery sends it as an event's ``data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from llm_broker.shared import messages as m

Record = dict[bytes, bytes]

#: Webhook delivery states.
WEBHOOK_PENDING = "pending"
WEBHOOK_DELIVERED = "delivered"
WEBHOOK_FAILED = "failed"
WEBHOOK_DISABLED = "disabled"

_CANCELLED_ERROR = (
    b'{"error":{"message":"the job was cancelled","type":"cancelled",'
    b'"param":null,"code":"job_cancelled"}}'
)


def record_from_pairs(pairs: Sequence[bytes]) -> Record:
    """A record from the flat field/value list that HGETALL returns inside a script."""
    return {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}


def _text(rec: Record, field: bytes) -> str | None:
    value = rec.get(field)
    return value.decode() if value is not None else None


def _time(rec: Record, field: bytes) -> int | None:
    value = rec.get(field)
    return int(float(value)) if value else None


def _raw(rec: Record, field: bytes) -> msgspec.Raw | None:
    value = rec.get(field)
    return msgspec.Raw(value) if value else None


def status_of(rec: Record) -> str:
    return rec.get(b"status", b"").decode()


def is_final(rec: Record) -> bool:
    return status_of(rec) in m.FINAL_STATUSES


def job_object(job_id: str, rec: Record) -> dict[str, Any]:
    """The public view of a job: status, times, result or error, webhook state."""
    status = status_of(rec)
    error = _raw(rec, b"error")
    if error is None and status == m.EXPIRED:
        error = msgspec.Raw(m.DEADLINE_ERROR)
    elif error is None and status == m.CANCELLED:
        error = msgspec.Raw(_CANCELLED_ERROR)
    webhook: dict[str, Any] | None = None
    url = _text(rec, b"webhook_url")
    if url is not None:
        webhook = {
            "url": url,
            "status": _text(rec, b"webhook_status") or WEBHOOK_PENDING,
            "attempts": int(rec.get(b"webhook_attempts", b"0")),
            "last_status_code": int(rec[b"webhook_code"]) if rec.get(b"webhook_code") else None,
            "last_attempt_at": _time(rec, b"webhook_at"),
            "last_error": _text(rec, b"webhook_error") or None,
        }
    return {
        "id": job_id,
        "object": "job",
        "status": status,
        "model": _text(rec, b"model"),
        "created_at": _time(rec, b"created_at"),
        "started_at": _time(rec, b"started_at"),
        "completed_at": _time(rec, b"completed_at"),
        "attempts": int(rec.get(b"attempts", b"0")),
        #: Deployments tried, when there was more than one try.
        "history": _raw(rec, b"history") or [],
        "metadata": _raw(rec, b"metadata") or {},
        "result": _raw(rec, b"result"),
        "error": error,
        "webhook": webhook,
    }


def event_body(job_id: str, rec: Record) -> bytes:
    """A Standard Webhooks event for a finished job: ``{"type", "timestamp", "data"}``."""
    finished = float(rec.get(b"completed_at") or 0)
    return msgspec.json.encode(
        {
            "type": f"job.{status_of(rec)}",
            "timestamp": datetime.fromtimestamp(finished, UTC).isoformat().replace("+00:00", "Z"),
            "data": job_object(job_id, rec),
        }
    )
