"""OpenTelemetry spans around expert calls, with the trace context sent in gRPC metadata.

Each expert RPC attempt gets a CLIENT span, a child of whatever span is current in the
router: the layer span (`layer`, one per MoE layer and phase: Forward, Backward, GradNorm,
ApplyStep) inside a generate request, a training step (`training_step`, the root of one
step's trace) or a validation pass during training (`evaluation`). The W3C `traceparent` of the call
span goes out as gRPC metadata, and the expert service's SERVER span continues the trace
(`subnet.telemetry.AioServerTracing`).

Export is set up once per process by `subnet.telemetry.setup_tracing` (OTEL_EXPORTER_OTLP_ENDPOINT).
Without a provider no span is started at all (`subnet.telemetry.spans_recorded`): the calls get
the API's invalid span, which records nothing, and no header is sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from subnet.telemetry import PROPAGATOR, spans_recorded


class ExpertCallTracer:
    """Starts and ends the span of one expert RPC attempt.

    Spans are started without becoming current: the calls of one layer are in flight
    together and each ends in a gRPC callback thread.
    """

    def __init__(self, tracer_provider: trace.TracerProvider | None = None):
        self._tracer = trace.get_tracer("services.router.remote_experts", tracer_provider=tracer_provider)
        self._provider = tracer_provider

    def start(self, rpc: str, *, layer: int, uid: str, endpoint: str,
              tokens: int | None = None) -> tuple[trace.Span, tuple[tuple[str, str], ...]]:
        """The span and the gRPC metadata that carries its context."""
        if not spans_recorded(self._provider):
            return trace.INVALID_SPAN, ()
        attributes = {"rpc.system": "grpc", "rpc.service": "moe.v1.Expert", "rpc.method": rpc,
                      "server.address": endpoint, "moe.layer": layer, "moe.expert_uid": uid}
        if tokens is not None:
            attributes["moe.tokens"] = tokens
        span = self._tracer.start_span(f"moe.v1.Expert/{rpc}", kind=SpanKind.CLIENT, attributes=attributes)
        carrier: dict[str, str] = {}
        PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return span, tuple(carrier.items())

    @contextmanager
    def layer(self, layer: int, rpc: str, calls: int) -> Iterator[trace.Span]:
        """The current span while one MoE layer's `calls` expert RPCs of kind `rpc` are in flight."""
        if not spans_recorded(self._provider):
            yield trace.INVALID_SPAN
            return
        with self._tracer.start_as_current_span(f"moe.layer/{rpc}", attributes={
                "moe.layer": layer, "rpc.method": rpc, "moe.calls": calls}) as span:
            yield span

    @contextmanager
    def training_step(self, step: int, lr: float) -> Iterator[trace.Span]:
        """The current span of training step `step`: a trace's root, parent of every layer span of
        the step (forward, backward through autograd, GradNorm, ApplyStep), so that one step is
        one trace. The caller may add `moe.loss` once it is known."""
        with self._root("moe.train/step", {"moe.step": step, "moe.lr": lr}) as span:
            yield span

    @contextmanager
    def evaluation(self, step: int) -> Iterator[trace.Span]:
        """The current span of the validation pass after step `step`: one trace for all its forwards."""
        with self._root("moe.train/evaluate", {"moe.step": step}) as span:
            yield span

    @contextmanager
    def _root(self, name: str, attributes: dict) -> Iterator[trace.Span]:
        if not spans_recorded(self._provider):
            yield trace.INVALID_SPAN
            return
        # A root whatever is current: steps and evaluations follow each other, none is part of
        # another's trace.
        with self._tracer.start_as_current_span(name, context=trace.set_span_in_context(trace.INVALID_SPAN),
                                                attributes=attributes) as span:
            yield span

    @staticmethod
    def end(span: trace.Span, code: grpc.StatusCode, details: str = "") -> None:
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code is not grpc.StatusCode.OK:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"[:200]))
        span.end()
