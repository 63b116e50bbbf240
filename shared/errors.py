"""Errors and their OpenAI error objects.

::

    BrokerError                 status  type
     ├── BadRequest              400    invalid_request_error
     ├── Unauthorized            401    authentication_error
     ├── NotFound                404    not_found_error / invalid_request_error
     ├── MethodNotAllowed        405    invalid_request_error
     ├── PayloadTooLarge         413    invalid_request_error
     ├── UnsupportedMediaType    415    invalid_request_error
     ├── IdempotencyKeyInUse     409    invalid_request_error (with Retry-After)
     ├── IdempotencyMismatch     422    invalid_request_error
     ├── QueueFull               429    rate_limit_error (with Retry-After)
     ├── UpstreamError           the upstream's status, or 502
     ├── CircuitOpen             503    every deployment of the model has its circuit open
     ├── Unavailable             503    service_unavailable (Redis unreachable, draining)
     ├── Overloaded              503    overloaded_error (this ingress process sheds load)
     └── DeadlineExceeded        504    timeout

Each error knows its HTTP status and renders as ``{"error": {"message", "type",
"param", "code"}}``, plus ``job_id`` when the request may have become a job
although it failed; one middleware in ingress turns them into responses.

Of an upstream's error answer only ``type``, ``code``, ``param`` and the
message reach the client: the message cut to :data:`UPSTREAM_MESSAGE_MAX`
characters, control characters blanked and anything that looks like a
credential (``sk-…``, ``Bearer …``, ``api-key: …``, the key the call was
made with) replaced by ``[redacted]``. A connection error says what failed,
never the upstream's host or port.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Iterable
from typing import Any, ClassVar

import msgspec


class ErrorBody(msgspec.Struct, omit_defaults=False):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class JobErrorBody(ErrorBody, omit_defaults=False):
    """An error of a request that may have become a job: ``job_id`` names it, and
    ``GET /v1/jobs/{job_id}`` tells what became of it (404: it was never admitted)."""

    job_id: str | None = None


class ErrorObject(msgspec.Struct):
    error: ErrorBody


class BrokerError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.error_code = code if code is not None else self.code
        self.headers = headers or {}
        #: Set when the request may have been admitted as this job.
        self.job_id: str | None = None

    @property
    def http_status(self) -> int:
        return self.status

    def body(self) -> ErrorObject:
        if self.job_id is not None:
            return ErrorObject(
                JobErrorBody(self.message, self.type, self.param, self.error_code, self.job_id)
            )
        return ErrorObject(ErrorBody(self.message, self.type, self.param, self.error_code))


class BadRequest(BrokerError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(BrokerError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(BrokerError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"


class NotFound(BrokerError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(BrokerError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(BrokerError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(BrokerError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class Conflict(BrokerError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class IdempotencyKeyInUse(Conflict):
    """Another request with the Idempotency-Key is being admitted (Redis Cluster)."""

    code = "idempotency_key_in_use"


class IdempotencyMismatch(BrokerError):
    status = 422
    type = "invalid_request_error"
    code = "idempotency_key_reused"


class QueueFull(BrokerError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class TenantQueueFull(BrokerError):
    status = 429
    type = "rate_limit_error"
    code = "tenant_queue_full"


class TenantRateLimited(BrokerError):
    status = 429
    type = "rate_limit_error"
    code = "tenant_rate_limited"


class KeyLimited(BrokerError):
    """A limit of the API key's (or of its tenant's, kept with the admin API)."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limited"


class BudgetExceeded(BrokerError):
    status = 429
    type = "rate_limit_error"
    code = "budget_exceeded"


class Unavailable(BrokerError):
    status = 503
    type = "service_unavailable"
    code = "service_unavailable"


class NotOnCluster(BrokerError):
    """What this deployment's Redis Cluster does not do yet (docs/cluster.md)."""

    status = 501
    type = "invalid_request_error"
    code = "not_on_cluster"


class Overloaded(BrokerError):
    """This ingress process is saturated (or its Redis round trips are): retry."""

    status = 503
    type = "overloaded_error"
    code = "overloaded"


class CircuitOpen(BrokerError):
    status = 503
    type = "service_unavailable"
    code = "circuit_open"


class DeadlineExceeded(BrokerError):
    status = 504
    type = "timeout"
    code = "deadline_exceeded"


class UpstreamError(BrokerError):
    """An error from (or on the way to) the upstream provider, with its own status."""

    type = "upstream_error"

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
        self._status = status
        self._type = type or self.type
        #: Worth another try (429, 5xx, timeout, connection error), and how long the
        #: upstream asked to wait first (Retry-After / retry-after-ms), if it did.
        self.retryable = retryable
        self.retry_after_s = retry_after_s

    @property
    def http_status(self) -> int:
        return self._status

    def body(self) -> ErrorObject:
        return ErrorObject(ErrorBody(self.message, self._type, self.param, self.error_code))

    @property
    def deployment_fault(self) -> bool:
        """The deployment, not the request, is at fault: counts against its circuit
        and is worth another deployment (a 429, 5xx, timeout or connection error is
        retryable; rejected credentials are this deployment's own)."""
        return self.retryable


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time (the call's own timeout, or a 504)."""


class UpstreamCredentialsRejected(UpstreamError):
    """The upstream refused the broker's credentials (401/403): the client sees 502."""

    @property
    def deployment_fault(self) -> bool:
        return True


class UpstreamStreamInterrupted(UpstreamError):
    """A stream ended early: some of the answer (and its tokens) was produced."""


_UPSTREAM_STATUS_PASSED_THROUGH = {400, 404, 409, 413, 422, 429}

#: The longest upstream error message passed on to a client, in characters.
UPSTREAM_MESSAGE_MAX = 500
REDACTED = "[redacted]"
_CREDENTIAL = re.compile(
    r"\bbearer\s+[^\s\"',;]+"  # an Authorization header's value
    r"|\b(?:x-)?api[-_ ]?key\b[\"']?\s*[:=]\s*[\"']?[^\s\"',;]+"  # api-key: …, api_key=…
    r"|\b(?:sk|rk|pk)-[a-z0-9_\-*]{6,}"  # OpenAI and Anthropic keys: sk-…, sk-proj-…, sk-ant-…
    r"|\bakia[0-9a-z]{16}\b"  # AWS access key ids
    r"|\baiza[0-9a-z_\-]{30,}"  # Google API keys
    r"|\bey[a-z0-9_\-]{10,}\.[a-z0-9_\-]{10,}(?:\.[a-z0-9_\-]*)?",  # JWTs
    re.IGNORECASE,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# type and code are identifiers; param names a field of the request.
_IDENTIFIER = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
_PARAM = re.compile(r"[A-Za-z0-9_.:\-\[\]]{1,128}")


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with credentials (the given ``secrets`` and anything that looks like
    one) replaced by ``[redacted]`` and control characters (line breaks) blanked."""
    for secret in secrets:
        if len(secret) >= 8:
            text = text.replace(secret, REDACTED)
    return _CONTROL.sub(" ", _CREDENTIAL.sub(REDACTED, text))


def upstream_message(text: str, secrets: Iterable[str] = ()) -> str:
    """An upstream's error message as a client may see it: redacted and bounded."""
    # Cut twice: a huge text is not scanned whole, and redaction may lengthen it.
    text = redact(text[: UPSTREAM_MESSAGE_MAX * 4], secrets)
    return text if len(text) <= UPSTREAM_MESSAGE_MAX else text[:UPSTREAM_MESSAGE_MAX] + "…"


def identifier(value: object, pattern: re.Pattern[str] = _IDENTIFIER) -> str | None:
    """A type, code or param of an upstream error, if it has that shape (no free text)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value)
    if not pattern.fullmatch(text) or _CREDENTIAL.search(text):
        return None
    return text


def retry_after_seconds(retry_after: str | None, retry_after_ms: str | None) -> float | None:
    """The wait an upstream asked for: ``retry-after-ms``, else ``Retry-After`` in
    seconds or as an HTTP date; None if neither is usable."""
    if retry_after_ms:
        try:
            ms = float(retry_after_ms)
            if ms >= 0:
                return ms / 1000
        except ValueError:
            pass
    if retry_after:
        try:
            return max(0.0, float(retry_after))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(retry_after)
            except (TypeError, ValueError):
                return None
            return max(0.0, when.timestamp() - time.time())
    return None


def upstream_status_error(
    status: int,
    payload: Any,
    retry_after: str | None = None,
    retry_after_ms: str | None = None,
    *,
    secrets: Iterable[str] = (),
) -> UpstreamError:
    """Map an upstream HTTP error response to the error the client sees.

    The upstream's client errors (400, 404, 422, 429…) keep their status and its
    message; an upstream 401/403 is our credential problem, not the client's, so
    it becomes 502, as do 5xx answers. 429 and 5xx are worth retrying. Only the
    error's type, code, param and message pass, the message redacted (``secrets``:
    the credentials the call was made with) and bounded.
    """
    error = _upstream_status_error(status, payload, retry_after, tuple(secrets))
    error.retryable = status == 429 or status >= 500
    error.retry_after_s = retry_after_seconds(retry_after, retry_after_ms)
    return error


def _upstream_status_error(
    status: int, payload: Any, retry_after: str | None, secrets: tuple[str, ...]
) -> UpstreamError:
    message = f"upstream returned HTTP {status}"
    etype: str | None = None
    param: str | None = None
    code: str | None = None
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        err = payload["error"]
        if isinstance(err.get("message"), str) and err["message"]:
            message = upstream_message(err["message"], secrets)
        etype = identifier(err.get("type"))
        param = identifier(err.get("param"), _PARAM)
        code = identifier(err.get("code"))
    if status in _UPSTREAM_STATUS_PASSED_THROUGH:
        headers = {"Retry-After": retry_after} if retry_after and status == 429 else None
        return UpstreamError(
            status,
            message,
            type=etype or "invalid_request_error",
            param=param,
            code=code,
            headers=headers,
        )
    if status in (401, 403):
        return UpstreamCredentialsRejected(
            502,
            f"upstream rejected the broker's credentials (HTTP {status})",
            code="upstream_auth_failed",
        )
    if status == 504:
        return UpstreamTimeout(504, message, type="timeout", code="upstream_timeout")
    return UpstreamError(502, message, type=etype or "upstream_error", code="upstream_error")


def upstream_timeout(seconds: float) -> UpstreamError:
    return UpstreamTimeout(
        504,
        f"upstream did not answer within {seconds:g}s",
        type="timeout",
        code="upstream_timeout",
        retryable=True,
    )


def upstream_unreachable(reason: str) -> UpstreamError:
    """The upstream could not be reached; ``reason`` names no host or port."""
    return UpstreamError(
        502,
        f"cannot reach the upstream provider: {reason}",
        code="upstream_connection_error",
        retryable=True,
    )


def upstream_interrupted() -> UpstreamError:
    return UpstreamStreamInterrupted(
        502,
        "upstream closed the stream before it ended",
        code="upstream_stream_interrupted",
        retryable=True,
    )
