"""Waiting for a gRPC service to say SERVING on the standard grpc.health.v1 service."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def wait_serving(endpoint: str, timeout_s: float, check_alive: Callable[[], None] | None = None,
                 what: str = "service", poll_s: float = 0.1) -> None:
    """Poll health until SERVING. `check_alive` raises when the process behind it died (so a crash
    is reported at once, not after the timeout); TimeoutError when time runs out."""
    deadline = time.monotonic() + timeout_s
    # gRPC backs off reconnecting up to 2 minutes by default; a service that comes up after a
    # long wait (the router trains first) must be seen within a second.
    options = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
               ("grpc.max_reconnect_backoff_ms", 1000)]
    with grpc.insecure_channel(endpoint, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if check_alive is not None:
                check_alive()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass                                # not listening yet, or still loading
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} at {endpoint} did not become SERVING within {timeout_s:.0f}s")
            time.sleep(poll_s)
