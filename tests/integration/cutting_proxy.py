"""A TCP forwarder on loopback that can lose a request the way a broken network path does.

    with CuttingProxy(("127.0.0.1", service_port)) as proxy:
        endpoint = proxy.endpoint                  # give this to the client instead of the service's
        proxy.cut_next()                           # the next bytes a client sends are not forwarded:
                                                   # their connection is reset (RST) on both sides
        proxy.cut_next(1000); ...; proxy.cut_next(0)   # lose everything for a while, then nothing

A connection that is cut never delivers what it carried: the server does not see the request,
the client sees the connection reset. Connections opened afterwards are forwarded as usual.
Threads, one pair per connection; everything is closed on exit.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Self

_LINGER_RESET = struct.pack("ii", 1, 0)   # SO_LINGER on, 0 s: close() sends RST, not FIN


class CuttingProxy:
    def __init__(self, target: tuple[str, int]):
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._cuts_left = 0
        self.cuts = 0   # connections reset so far
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name="cutting-proxy").start()

    def cut_next(self, times: int = 1) -> None:
        """Reset the connections that carry the next `times` client sends (0: forward everything again)."""
        with self._lock:
            self._cuts_left = times

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return   # closed
            try:
                server = socket.create_connection(self.target, timeout=5.0)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(1 << 16)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                if from_client and self._take_cut():
                    self._reset(source, sink)
                    return
                sink.sendall(data)
        except OSError:
            self._reset(source, sink)

    def _take_cut(self) -> bool:
        with self._lock:
            if self._cuts_left <= 0:
                return False
            self._cuts_left -= 1
            self.cuts += 1
            return True

    @staticmethod
    def _reset(*ends: socket.socket) -> None:
        for end in ends:
            try:
                end.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                end.close()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for end in sockets:
            end.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
