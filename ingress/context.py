"""What ingress learns about one request while handling it, in one typed place.

The error middleware creates it, handlers fill it in, and the metrics, the error
answer and the access log read it.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from llm_broker.shared.store.records import Usage


@dataclass(slots=True)
class RequestContext:
    #: The API the client speaks: errors are answered in its shape.
    api: str = "openai"
    tenant: str | None = None
    #: The job (X-Request-Id) once there is one.
    job_id: str | None = None
    #: The model name the client asked for, and the configured route it matched
    #: (metric labels use the route: a wildcard route would make one per name).
    requested_model: str = ""
    route: str = ""
    provider: str = ""
    #: The sampling temperature, when the request is a chat request with one.
    temperature: float | None = None
    #: "hit" or "miss" when the response cache was consulted.
    cache: str | None = None
    usage: Usage | None = None
    error_type: str | None = None
    #: The job's account (shared/accounts.py), written with its record.
    acct: bytes = b""


CONTEXT = web.RequestKey("context", RequestContext)
