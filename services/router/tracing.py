"""OpenTelemetry spans around expert calls, with the trace context sent in gRPC metadata.

Each expert RPC attempt gets a CLIENT span, a child of whatever span is current in the
router (a training step, a generate request), and the W3C `traceparent` header of that
span goes out as gRPC metadata, so the expert service continues the same trace.

Export is off unless configured (`setup_tracing(from_env(TracingConfig))`):
- `OTEL_EXPORTER_OTLP_ENDPOINT` set: OTLP exporter, when an OTLP exporter package is
  installed; otherwise a log line says so and spans are not exported.
- `ROUTER_TRACE_CONSOLE=1`: spans printed to stdout (debugging).
Without a provider the API hands out no-op spans: starting one costs next to nothing and
no header is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from subnet.envconfig import env

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()  # W3C traceparent/tracestate, whatever OTEL_PROPAGATORS says


@dataclass(frozen=True)
class TracingConfig:
    """Tracing settings, read with `subnet.envconfig.from_env(TracingConfig)`."""

    otlp_endpoint: str = env("OTEL_EXPORTER_OTLP_ENDPOINT", "", "OTLP collector address; empty = no export")
    console: bool = env("ROUTER_TRACE_CONSOLE", False, "1 = print spans to stdout (debugging)")
    service_name: str = env("OTEL_SERVICE_NAME", "router", "service.name of the spans")


def _otlp_exporter(endpoint: str):
    """The OTLP span exporter if one is installed (grpc first, then http/protobuf), else None."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint)
    except ImportError:
        pass
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    except ImportError:
        return None


def setup_tracing(config: TracingConfig) -> TracerProvider | None:
    """Install the global tracer provider when export is configured; returns it (call `.shutdown()`).

    Returns None, and installs nothing, when no exporter is configured or available.
    """
    exporters = []
    if config.otlp_endpoint:
        exporter = _otlp_exporter(config.otlp_endpoint)
        if exporter is None:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT=%s but no OTLP exporter package is installed "
                        "(opentelemetry-exporter-otlp); spans are not exported", config.otlp_endpoint)
        else:
            exporters.append(exporter)
    if config.console:
        exporters.append(ConsoleSpanExporter())
    if not exporters:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": config.service_name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing on: %s", ", ".join(type(e).__name__ for e in exporters))
    return provider


class ExpertCallTracer:
    """Starts and ends the span of one expert RPC attempt.

    Spans are started without becoming current: the calls of one layer are in flight
    together and each ends in a gRPC callback thread.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None):
        self._tracer = trace.get_tracer("services.router.remote_experts", tracer_provider=tracer_provider)

    def start(self, rpc: str, *, layer: int, uid: str, endpoint: str,
              tokens: int | None = None) -> tuple[trace.Span, tuple[tuple[str, str], ...]]:
        """The span and the gRPC metadata that carries its context."""
        attributes = {"rpc.system": "grpc", "rpc.service": "moe.v1.Expert", "rpc.method": rpc,
                      "server.address": endpoint, "moe.layer": layer, "moe.expert_uid": uid}
        if tokens is not None:
            attributes["moe.tokens"] = tokens
        span = self._tracer.start_span(f"moe.v1.Expert/{rpc}", kind=SpanKind.CLIENT, attributes=attributes)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return span, tuple(carrier.items())

    @staticmethod
    def end(span: trace.Span, code: grpc.StatusCode, details: str = "") -> None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"[:200]))
        span.end()
