"""OpenTelemetry for every service: the tracing variables, the exporter, and SERVER spans for gRPC.

    provider = setup_tracing(config.tracing, "expert")     # None, and nothing installed, when off
    server = grpc.aio.server(interceptors=[AioServerTracing(), auth.aio_interceptor()])
    ...
    shutdown_tracing(provider)                             # exports what is still queued

Spans leave the process over OTLP/gRPC only when OTEL_EXPORTER_OTLP_ENDPOINT is set
(TRACE_CONSOLE=1 also prints them, for debugging). Otherwise no provider is installed: the
API hands out no-op spans, nothing is printed and nothing is sent, and the interceptors here
start none (`spans_recorded`). The SDK's own variables
(OTEL_BSP_SCHEDULE_DELAY, OTEL_TRACES_SAMPLER, OTEL_EXPORTER_OTLP_HEADERS, ...) apply as usual.

A server span continues the caller's trace: the W3C `traceparent` in the request metadata
(the router's `ExpertCallTracer` sends it) becomes its parent. The tracing interceptor goes
first in the list (outermost), so a request the auth interceptor rejects still gets a span,
with ERROR status and the rejection's code. Health checks get no span (probes every few
seconds would bury the traces worth reading).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from subnet.envconfig import env

log = logging.getLogger(__name__)

# W3C traceparent/tracestate, explicitly: the services must agree on the header whatever
# OTEL_PROPAGATORS says in one of them.
PROPAGATOR = TraceContextTextMapPropagator()
HEALTH_PREFIX = "/grpc.health.v1.Health/"


@dataclass(frozen=True)
class TracingConfig:
    """Tracing settings of every service (nested in each service's config)."""

    otlp_endpoint: str = env("OTEL_EXPORTER_OTLP_ENDPOINT", "",
                             "OTLP/gRPC collector, `http://host:4317` (plaintext) or `https://...`; "
                             "empty = no spans exported")
    service_name: str = env("OTEL_SERVICE_NAME", "",
                            "service.name of the spans; empty = the service's own (`router`, `expert`)")
    console: bool = env("TRACE_CONSOLE", False, "1 = also print every span to stdout (debugging)")

    def __post_init__(self):
        # Without a scheme the gRPC exporter silently picks TLS, and a plaintext collector then
        # never receives a span: refuse that at start-up instead.
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ValueError(f"OTEL_EXPORTER_OTLP_ENDPOINT={self.otlp_endpoint!r} needs a scheme: "
                             f"http://host:4317 (plaintext) or https://host:4317 (TLS)")


class OsRandomIds(IdGenerator):
    """Trace and span ids from the operating system's generator. The SDK's default draws them from
    Python's `random`, whose state training restores after every evaluation (moe.train.rng keeps
    runs reproducible): the router's spans after an evaluation then got the ids its first spans
    had, and Jaeger merged a training step into an evaluation's trace."""

    def generate_span_id(self) -> int:
        return secrets.randbits(64) or 1      # 0 is the invalid id

    def generate_trace_id(self) -> int:
        return secrets.randbits(128) or 1


def tracer_provider(config: TracingConfig, default_service_name: str) -> TracerProvider | None:
    """A provider exporting as configured, not installed globally; None when nothing is configured."""
    exporters = []
    if config.otlp_endpoint:
        # Imported here: it pulls in the OTLP protos, which a service without tracing never needs.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        exporters.append(OTLPSpanExporter(endpoint=config.otlp_endpoint))
    if config.console:
        exporters.append(ConsoleSpanExporter())
    if not exporters:
        return None
    name = config.service_name or default_service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}), id_generator=OsRandomIds())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup_tracing(config: TracingConfig, default_service_name: str) -> TracerProvider | None:
    """Install the process-wide tracer provider when export is configured; returns it, or None."""
    provider = tracer_provider(config, default_service_name)
    if provider is not None:
        trace.set_tracer_provider(provider)
        log.info("tracing on: spans of %s go to %s", config.service_name or default_service_name,
                 ", ".join(filter(None, [config.otlp_endpoint, "stdout" if config.console else ""])))
    return provider


def shutdown_tracing(provider: TracerProvider | None, timeout_s: float = 5.0) -> None:
    """Export the spans still queued (bounded: an unreachable collector must not hold up a stop)."""
    if provider is not None:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()


# ---- SERVER spans ----------------------------------------------------------------------------


def spans_recorded(tracer_provider: trace.TracerProvider | None = None) -> bool:
    """Whether a span started now could be recorded: a provider was given, or one is installed for
    the process (`setup_tracing`). Otherwise the API hands out no-op spans, and the work around them
    (metadata scans, context objects, attributes) is skipped: on a decode-sized expert call it was
    about a sixth of the service's own Python time (2026-12-06, in process, 290 -> 225 us a call)."""
    return tracer_provider is not None or not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


class _ServerSpans:
    """Starts the SERVER span of one RPC, as a child of the context the caller sent in metadata."""

    def __init__(self, tracer_provider: trace.TracerProvider | None):
        self._tracer = trace.get_tracer(__name__, tracer_provider=tracer_provider)
        self._provider = tracer_provider

    def recorded(self) -> bool:
        return spans_recorded(self._provider)

    def start(self, method: str, context) -> tuple[trace.Span, otel_context.Context]:
        carrier = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
        parent = PROPAGATOR.extract(carrier)
        service, _, rpc = method.lstrip("/").partition("/")
        span = self._tracer.start_span(method.lstrip("/"), context=parent, kind=SpanKind.SERVER, attributes={
            # A context of another transport names it (subnet/frames: "moe-frames"); grpc.aio's has none.
            "rpc.system": getattr(context, "rpc_system", "grpc"), "rpc.service": service, "rpc.method": rpc,
            "client.address": context.peer()})
        return span, trace.set_span_in_context(span, parent)


def _end(span: trace.Span, context, error: BaseException | None) -> None:
    """Record the status the RPC ends with: what abort/set_code said, else what the error implies."""
    code = context.code()
    if not isinstance(code, grpc.StatusCode):
        if error is None:
            code = grpc.StatusCode.OK
        elif isinstance(error, (asyncio.CancelledError, GeneratorExit)):   # the client went away
            code = grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        details = context.details() or (repr(error) if error is not None else "")
        if isinstance(details, bytes):
            details = details.decode("utf-8", "replace")
        span.set_status(Status(StatusCode.ERROR, f"{code.name}: {details}"[:200]))
    span.end()


class _Handlers:
    """The wrapped handler of each method, cached: interceptors run on every call."""

    def __init__(self, wrap):
        self._wrap = wrap
        self._cache: dict[str, tuple[object, object]] = {}

    def get(self, method: str, handler):
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        cached = self._cache.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._cache[method] = (handler, self._wrap(method, handler))
        return cached[1]


class AioServerTracing(grpc.aio.ServerInterceptor):
    """grpc.aio: one SERVER span per unary-unary RPC (what moe.v1.Expert has); other kinds pass through."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None):
        self._spans = _ServerSpans(tracer_provider)
        self._handlers = _Handlers(self._wrap)

    async def intercept_service(self, continuation, details):
        return self._handlers.get(details.method, await continuation(details))

    def _wrap(self, method: str, handler):
        if handler.request_streaming or handler.response_streaming or \
                not inspect.iscoroutinefunction(handler.unary_unary):
            return handler
        spans, inner = self._spans, handler.unary_unary

        async def unary_unary(request, context):
            if not spans.recorded():
                return await inner(request, context)
            span, ctx = spans.start(method, context)
            token, error = otel_context.attach(ctx), None
            try:
                return await inner(request, context)
            except BaseException as e:  # AbortError included: the span gets the abort's code
                error = e
                raise
            finally:
                otel_context.detach(token)
                _end(span, context, error)
        return handler._replace(unary_unary=unary_unary)


class ServerTracing(grpc.ServerInterceptor):
    """Sync gRPC: one SERVER span per unary request (unary or server-streaming response)."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None):
        self._spans = _ServerSpans(tracer_provider)
        self._handlers = _Handlers(self._wrap)

    def intercept_service(self, continuation, details):
        return self._handlers.get(details.method, continuation(details))

    def _wrap(self, method: str, handler):
        spans = self._spans
        if handler.request_streaming:
            return handler
        if not handler.response_streaming:
            inner = handler.unary_unary

            def unary_unary(request, context):
                if not spans.recorded():
                    return inner(request, context)
                span, ctx = spans.start(method, context)
                token, error = otel_context.attach(ctx), None
                try:
                    return inner(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    otel_context.detach(token)
                    _end(span, context, error)
            return handler._replace(unary_unary=unary_unary)
        inner_stream = handler.unary_stream

        def unary_stream(request, context):
            if not spans.recorded():
                yield from inner_stream(request, context)
                return
            span, ctx = spans.start(method, context)
            error = None
            try:
                yield from in_context(ctx, lambda: inner_stream(request, context))
            except BaseException as e:
                error = e
                raise
            finally:
                _end(span, context, error)
        return handler._replace(unary_stream=unary_stream)


def in_context(ctx: otel_context.Context, make: Callable[[], Iterable]) -> Iterator:
    """Iterate `make()` with `ctx` current while each item is computed, not while it is consumed.

    Holding a context attached across a `yield` would leak it into whatever the consuming
    thread does next, and an iterator closed from another thread could not detach it.
    """
    token = otel_context.attach(ctx)
    try:
        iterator = iter(make())
    finally:
        otel_context.detach(token)
    try:
        while True:
            token = otel_context.attach(ctx)
            try:
                item = next(iterator)
            except StopIteration:
                return
            finally:
                otel_context.detach(token)
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()
