"""The job object of the jobs API and of webhook events, built from a job record.

A job record (:class:`~llm_broker.shared.store.records.JobRecord`) is the hash ``job:{id}``.
Ingress answers ``GET /v1/jobs/{id}`` with :func:`job_object`; the webhook
delivery sends it as an event's ``data``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from llm_broker.shared import messages as m
from llm_broker.shared.store.records import WEBHOOK_PENDING, JobRecord

_CANCELLED_ERROR = (
    b'{"error":{"message":"the job was cancelled","type":"cancelled",'
    b'"param":null,"code":"job_cancelled"}}'
)


def _raw(value: bytes | None) -> msgspec.Raw | None:
    return msgspec.Raw(value) if value else None


def _time(value: float | None) -> int | None:
    return int(value) if value else None


def job_object(job_id: str, rec: JobRecord) -> dict[str, Any]:
    """The public view of a job: status, times, result or error, webhook state."""
    error = _raw(rec.error)
    if error is None and rec.status == m.EXPIRED:
        error = msgspec.Raw(m.DEADLINE_ERROR)
    elif error is None and rec.status == m.CANCELLED:
        error = msgspec.Raw(_CANCELLED_ERROR)
    webhook: dict[str, Any] | None = None
    if rec.webhook_url is not None:
        webhook = {
            "url": rec.webhook_url,
            "status": rec.webhook_status or WEBHOOK_PENDING,
            "attempts": rec.webhook_attempts,
            "last_status_code": rec.webhook_code,
            "last_attempt_at": _time(rec.webhook_at),
            "last_error": rec.webhook_error or None,
        }
    return {
        "id": job_id,
        "object": "job",
        "status": rec.status,
        "model": rec.model or None,
        "priority": rec.priority or None,
        "created_at": _time(rec.created_at),
        "started_at": _time(rec.started_at),
        "completed_at": _time(rec.completed_at),
        "attempts": rec.attempts,
        #: Deployments tried, when there was more than one try.
        "history": _raw(rec.history) or [],
        "metadata": _raw(rec.metadata) or {},
        "result": _raw(rec.result),
        "error": error,
        "webhook": webhook,
    }


def event_body(job_id: str, rec: JobRecord) -> bytes:
    """A Standard Webhooks event for a finished job: ``{"type", "timestamp", "data"}``
    (a record holding a prepared event, a batch's, sends that)."""
    if rec.event is not None:
        return rec.event
    finished = rec.completed_at or 0.0
    return msgspec.json.encode(
        {
            "type": f"job.{rec.status}",
            "timestamp": datetime.fromtimestamp(finished, UTC).isoformat().replace("+00:00", "Z"),
            "data": job_object(job_id, rec),
        }
    )
