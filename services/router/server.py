"""The router's gRPC server: moe.v1.Router plus grpc.health.v1, with a start/stop lifecycle.

With AUTH_MODE=on (`router_auth`), Generate and Logits must be signed for the router's
hotkey by an allowed caller; Info and Health are open, and Generate too with ROUTER_OPEN_GENERATE.
Every RPC but Health gets a SERVER span (continuing the caller's trace when it sent one), the
parent of the layer and expert-call spans the request causes.
"""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.servicer import RouterServicer
from subnet.auth import ServerAuth, build_server_auth
from subnet.decode_guard import SyncDecodeGuard
from subnet.identity import Identity
from subnet.telemetry import ServerTracing
from subnet.wire.v1 import router_pb2_grpc

log = logging.getLogger(__name__)
ROUTER_SERVICE = "moe.v1.Router"


def router_auth(config: RouterConfig, identity: Identity | None, metrics: RouterMetrics) -> ServerAuth | None:
    """The checks of the router's own RPCs; None with AUTH_MODE=off."""
    if not config.auth.enabled:
        return None
    if identity is None:
        raise ValueError("AUTH_MODE=on: the router needs its identity (WALLET_*) to check requests")
    open_methods = {f"/{ROUTER_SERVICE}/Info"}
    if config.open_generate:
        open_methods.add(f"/{ROUTER_SERVICE}/Generate")
    return build_server_auth(config.auth, identity, open_methods=open_methods, validator_permit=False,
                             on_reject=lambda reason: metrics.auth_rejections.labels(reason=reason).inc())


class RouterServer:
    """Serves a RouterServicer. Health says SERVING only once `start` has a model to serve.
    `auth` (see `router_auth`) checks signed requests; None serves everyone. `tracer_provider`:
    where the RPCs' spans go (default: the process's, see subnet.telemetry.setup_tracing)."""

    def __init__(self, servicer: RouterServicer, host: str, port: int, max_message_mb: float,
                 workers: int | None = None, auth: ServerAuth | None = None, tracer_provider=None):
        max_bytes = int(max_message_mb * 1024 * 1024)
        self._servicer = servicer
        # A Generate holds its worker thread while it streams (the thread mostly waits for the decode
        # loop's tokens): enough workers for a full batch plus those queued, or gRPC itself would queue
        # the streams the batch has room for.
        loop = servicer.engine.loop
        workers = workers or loop.max_batch + min(loop.max_queued, 64) + 8
        self._auth = auth
        # Tracing outermost: a request the auth check rejects still gets its (ERROR) span. The decode guard
        # parses bodies itself, so garbage is INVALID_ARGUMENT with no traceback logged (subnet.decode_guard).
        interceptors = [ServerTracing(tracer_provider), SyncDecodeGuard()] + ([auth.interceptor()] if auth else [])
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=interceptors,
                                   options=[("grpc.max_send_message_length", max_bytes),
                                            ("grpc.max_receive_message_length", max_bytes)])
        router_pb2_grpc.add_RouterServicer_to_server(servicer, self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"cannot bind the router to {host}:{port} (port in use?); set ROUTER_PORT to a free port")
        self.endpoint = f"{host}:{self.port}"

    def _set_health(self, status) -> None:
        for name in ("", ROUTER_SERVICE):
            self._health.set(name, status)

    def start(self) -> RouterServer:
        self._server.start()
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("router serving on %s", self.endpoint)
        return self

    def wait(self) -> None:
        self._server.wait_for_termination()

    def stop(self, grace_s: float = 5.0) -> None:
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self._server.stop(grace_s).wait()
        self._servicer.engine.close()
        if self._auth is not None:
            self._auth.close()
