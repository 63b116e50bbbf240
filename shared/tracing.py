"""W3C trace context and optional OpenTelemetry export.

A client's ``traceparent`` header travels with its job through the queue to
the upstream call, always. With ``tracing.otlp_endpoint`` set (and the
``otel`` extra installed), ingress also records a span per request and the
worker a span per upstream call, child of the request's, and both export them
over OTLP/HTTP; the upstream then receives the worker span's context. Off by
default: no OpenTelemetry import, no cost on the request path.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from llm_broker.shared.config import TracingConfig

log = logging.getLogger("llm_broker.tracing")

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", re.ASCII)


def valid_traceparent(value: str) -> str:
    """``value`` if it is a W3C ``traceparent``, else "" (the spec says to ignore
    an invalid one; passing it on could break the upstream request's headers)."""
    if len(value) == 55 and _TRACEPARENT.fullmatch(value) and not value.startswith("ff"):
        return value
    return ""


class Tracing:
    def __init__(self, cfg: TracingConfig, role: str) -> None:
        self.enabled = cfg.otlp_endpoint is not None
        self._provider: Any = None
        if not self.enabled:
            return
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
            from opentelemetry.trace import SpanKind
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as e:
            raise RuntimeError(
                "tracing.otlp_endpoint is set but OpenTelemetry is not installed: "
                "pip install 'llm-broker[otel]'"
            ) from e
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": f"{cfg.service_name}-{role}"}),
            sampler=ParentBasedTraceIdRatio(cfg.sample_ratio),
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(OTLPSpanExporter(endpoint=cfg.otlp_endpoint))
        )
        self._tracer = self._provider.get_tracer("llm_broker")
        self._propagator = TraceContextTextMapPropagator()
        self._kinds = {"server": SpanKind.SERVER, "client": SpanKind.CLIENT}
        log.info("tracing: exporting spans to %s", cfg.otlp_endpoint)

    @contextmanager
    def span(
        self, name: str, traceparent: str, kind: str, attributes: dict[str, Any]
    ) -> Iterator[str]:
        """A span, child of ``traceparent`` if given; yields the span's own traceparent
        (``traceparent`` unchanged when tracing is off)."""
        if not self.enabled:
            yield traceparent
            return
        parent = self._propagator.extract({"traceparent": traceparent}) if traceparent else None
        with self._tracer.start_as_current_span(
            name, context=parent, kind=self._kinds[kind], attributes=attributes
        ):
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier)
            yield carrier.get("traceparent", traceparent)

    def shutdown(self) -> None:
        """Export what is still buffered."""
        if self._provider is not None:
            self._provider.shutdown()
