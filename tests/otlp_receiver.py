"""An OTLP/gRPC trace collector for tests: a real gRPC server that keeps every span it is sent."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    status: int
    grpc_code: int | None
    rpc_system: str = ""


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it, with the `service.name` of its resource."""

    def __init__(self):
        self.spans: list[Span] = []
        self.url = ""
        self._lock = threading.Lock()
        self._server: grpc.Server | None = None

    def Export(self, request, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value for a in resource_spans.resource.attributes}
                service = attrs["service.name"].string_value
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        code = next((a.value.int_value for a in s.attributes if a.key == "rpc.grpc.status_code"), None)
                        system = next((a.value.string_value for a in s.attributes if a.key == "rpc.system"), "")
                        self.spans.append(Span(service, s.name, s.kind, s.trace_id.hex(), s.span_id.hex(),
                                               s.parent_span_id.hex(), s.status.code, code, system))
        return trace_service_pb2.ExportTraceServiceResponse()

    def snapshot(self) -> list[Span]:
        with self._lock:
            return list(self.spans)

    def traces_joining(self, services: set[str]) -> set[str]:
        """The trace ids that hold spans of every one of `services` (their context crossed the calls)."""
        services_of: dict[str, set[str]] = {}
        for span in self.snapshot():
            services_of.setdefault(span.trace_id, set()).add(span.service)
        return {trace for trace, present in services_of.items() if services <= present}

    def wait_for_joined_trace(self, services: set[str], wait: Callable[[Callable[[], bool], str], None]) -> None:
        """`wait(condition, what)` until a trace joins `services`; its failure names who sent spans."""
        try:
            wait(lambda: bool(self.traces_joining(services)), f"a trace with spans of {sorted(services)}")
        except AssertionError as e:
            raise AssertionError(f"{e}; spans came from {sorted({s.service for s in self.snapshot()})}") from None

    def start(self, host: str = "127.0.0.1", port: int = 0) -> Receiver:
        """Serve on host:port (0 = a free port); `url` is what OTEL_EXPORTER_OTLP_ENDPOINT takes."""
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise RuntimeError(f"the OTLP receiver cannot listen on {host}:{port}")
        self._server.start()
        self.url = f"http://{host}:{bound}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)
