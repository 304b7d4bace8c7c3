"""The /metrics HTTP endpoint of a service's own CollectorRegistry, started and stopped with it."""

from __future__ import annotations

from prometheus_client import start_http_server


class MetricsHttp:
    """Mixin for a metrics class that has `self.registry`: `serve` and `stop` its HTTP endpoint."""

    _server = None
    _thread = None

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (/metrics); returns the bound port. OSError if it is taken."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
