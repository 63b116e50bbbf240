"""Typed values of the job store: the job record, a reply, the tokens a call used.

The record is the hash ``job:{id}``; a reply is one entry of an ingress process's
reply stream. Both keep their wire form (flat fields, so that ingress and
workers of different versions interoperate during a rolling update); this
module is the one place that turns them into typed values and back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

from llm_broker.shared import messages as m


class Usage(msgspec.Struct, frozen=True):
    """Tokens a call used; on the wire ``"<input> <output>"``."""

    input: int
    output: int

    @classmethod
    def reported(cls, input_tokens: int, output_tokens: int) -> Usage:
        """An upstream's count: a negative one is taken as 0, so that nothing that
        adds usage up (metrics, budgets, the day's usage) ever counts down."""
        return cls(max(0, input_tokens), max(0, output_tokens))

    @property
    def total(self) -> int:
        return self.input + self.output

    def wire(self) -> bytes:
        return b"%d %d" % (self.input, self.output)

    @classmethod
    def parse(cls, raw: bytes) -> Usage | None:
        parts = raw.split()
        if len(parts) != 2 or not (parts[0].isdigit() and parts[1].isdigit()):
            return None
        return cls(int(parts[0]), int(parts[1]))


# ---------------------------------------------------------------- replies


class Chunks(msgspec.Struct, frozen=True, tag="c"):
    """Stream frames (SSE), ready to write to the client."""

    data: bytes


class Result(msgspec.Struct, frozen=True, tag="r"):
    """The final answer: a JSON body, or a stream's closing frames. ``data`` None
    means "the result recorded with it" (sent once to Redis, not twice)."""

    data: bytes | None = None
    usage: Usage | None = None


class Failure(msgspec.Struct, frozen=True, tag="e"):
    """An error object (JSON) and its HTTP status; ``data`` None as in :class:`Result`."""

    status: int
    data: bytes | None = None
    retry_after: str = ""


Reply = Chunks | Result | Failure


def reply_args(reply: Reply) -> list[Any]:
    """A reply as the settle function takes it, which writes the fields
    :func:`reply_fields` names: its kind, status, then its usage (a result) or
    Retry-After (a failure) ('' for none), then its data unless the data is the
    recorded payload."""
    kind = reply.__struct_config__.tag
    match reply:
        case Chunks():
            args: list[Any] = [kind, 200, ""]
        case Result(usage=usage):
            args = [kind, 200, usage.wire() if usage is not None else ""]
        case Failure(status=status, retry_after=retry_after):
            args = [kind, status, retry_after]
    if reply.data is not None:
        args.append(reply.data)
    return args


#: The field of :func:`reply_args`'s third value, by kind.
_EXTRA = {"r": "u", "e": "ra"}


def reply_fields(job_id: str, reply: Reply) -> list[Any]:
    """A reply's stream entry fields, ``d`` (the data) last and left out when the
    data is the recorded payload."""
    kind, status, extra, *data = reply_args(reply)
    fields: list[Any] = ["i", job_id, "k", kind, "s", status]
    if extra:
        fields += [_EXTRA[kind], extra]
    if data:
        fields += ["d", data[0]]
    return fields


def decode_reply(fields: Mapping[bytes, bytes]) -> Reply:
    """The reply of a stream entry (as :func:`reply_fields` and older workers write it)."""
    kind = fields.get(b"k", b"")
    data = fields.get(b"d", b"")
    if kind == b"c":
        return Chunks(data)
    if kind == b"r":
        usage = fields.get(b"u")
        return Result(data, Usage.parse(usage) if usage else None)
    return Failure(int(fields.get(b"s", b"500")), data, fields.get(b"ra", b"").decode())


# ---------------------------------------------------------------- the record

#: Webhook delivery states.
WEBHOOK_PENDING = "pending"
WEBHOOK_DELIVERED = "delivered"
WEBHOOK_FAILED = "failed"
WEBHOOK_DISABLED = "disabled"


class JobRecord(msgspec.Struct, kw_only=True):
    """A job's record. Who writes what: admission writes the first block (and
    ``metadata``, ``webhook_*`` and ``idem_key`` for async jobs); the start script
    ``started_at`` and ``attempts``; the script that makes the job final ``status``,
    ``completed_at``, ``http_status``, ``result`` or ``error``, and ``history``; the
    webhook deliverer the ``webhook_*`` state."""

    tenant: str = ""
    status: str = ""
    model: str = ""
    provider: str = ""
    created_at: float = 0.0
    deadline: float = 0.0
    attempts: int = 0
    stream: bool = False
    started_at: float | None = None
    completed_at: float | None = None
    http_status: int | None = None
    #: JSON as recorded: the answer, the error object, the attempts, the metadata.
    result: bytes | None = None
    error: bytes | None = None
    history: bytes | None = None
    metadata: bytes | None = None
    webhook_url: str | None = None
    webhook_status: str = ""
    webhook_attempts: int = 0
    webhook_code: int | None = None
    webhook_at: float | None = None
    webhook_error: str = ""
    idem_key: str | None = None
    #: The priority class it was admitted with.
    priority: str = ""
    #: A prepared webhook event (a batch's end: shared/batches.py), sent as it is.
    event: bytes | None = None

    @property
    def final(self) -> bool:
        return self.status in m.FINAL_STATUSES

    @classmethod
    def from_hash(cls, raw: Mapping[bytes, bytes]) -> JobRecord:
        """The record of a hash as HGETALL returns it (unknown fields ignored)."""
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.decode()
            kind = _FIELD_KINDS.get(name)
            if kind is None or (not value and kind is not str):
                continue
            if kind is bytes:
                values[name] = value
            elif kind is str:
                values[name] = value.decode()
            elif kind is bool:
                values[name] = value not in (b"0", b"")
            else:
                values[name] = kind(float(value)) if kind is int else kind(value)
        return cls(**values)

    @classmethod
    def from_pairs(cls, pairs: Sequence[bytes]) -> JobRecord:
        """The record from the flat field/value list that HGETALL returns in a script."""
        return cls.from_hash({pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)})


def stamp(t: float) -> str:
    """A time for a function argument or a record field, to the microsecond: a
    float packed by the Redis client costs about twice as much as this string.
    (``%`` formats it as ``f"{t:.6f}"`` does, in two thirds of the time: the
    f-string parses its format spec on every call.)"""
    return "%.6f" % t  # noqa: UP031 (the faster form, see above)


def admission_fields(job: m.Job, created: str, deadline: str) -> list[Any]:
    """The record's fields at admission (its account apart), as a flat field/value
    list (``created`` and ``deadline``: the job's times as :func:`stamp` writes
    them). The admission functions write these fields from their arguments
    (scripts.py, ``admitted``): what an async submission answers is what they wrote."""
    return [
        "tenant",
        job.tenant,
        "priority",
        job.priority,
        "status",
        m.QUEUED,
        "model",
        job.model,
        "provider",
        job.provider,
        "created_at",
        created,
        "deadline",
        deadline,
        "attempts",
        0,
        "stream",
        int(job.stream),
    ]


def _field_kind(annotation: Any) -> type:
    """The scalar type a record field is decoded to (``T | None`` counts as ``T``)."""
    for kind in (bytes, bool, int, float):
        if annotation is kind or kind in getattr(annotation, "__args__", ()):
            return kind
    return str


_FIELD_KINDS: dict[str, type] = {
    f.name: _field_kind(f.type) for f in msgspec.structs.fields(JobRecord)
}
