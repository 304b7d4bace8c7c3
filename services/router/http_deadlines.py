"""A deadline for reading each HTTP request whole (request line, headers and body).

    deadlines = ReadDeadlines(limit_s=30.0).start()
    deadlines.watch(handler)      # when its connection is accepted
    deadlines.done(handler)       # once its request is read; an expired handler has `read_expired` set
    deadlines.stop()

The socket timeout bounds each read, not the request: a client that sends a byte every few
seconds would keep a connection, and the thread serving it, forever, and the router serves at
most MAX_CONNECTIONS at once (a slow-header attack takes them all with a few dozen sockets). One
thread looks at the deadlines every `tick_s`; a handler past its deadline gets `read_expired` set
and its socket shut for reading, which ends the read its thread is blocked in (it returns what
arrived, or end of file). The handler then answers 408, or closes when it has nothing to answer.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

TICK_S = 0.5


class ReadDeadlines:
    def __init__(self, limit_s: float, tick_s: float = TICK_S):
        if limit_s <= 0:
            raise ValueError(f"limit_s must be positive, got {limit_s}")
        self.limit_s, self.tick_s = limit_s, tick_s
        self.expired = 0   # requests cut off so far (tests and metrics read it)
        self._due: dict[Any, float] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ReadDeadlines:
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name="http-read-deadlines", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def watch(self, handler: Any) -> None:
        """`handler` (with `.connection`, a socket) must have read its request within `limit_s` from now."""
        handler.read_expired = False
        with self._lock:
            self._due[handler] = time.monotonic() + self.limit_s

    def done(self, handler: Any) -> None:
        """`handler` has read its request (or is gone): no deadline any more."""
        with self._lock:
            self._due.pop(handler, None)

    def _run(self) -> None:
        while not self._stopped.wait(self.tick_s):
            now = time.monotonic()
            # Under the lock, so that a handler's `done` comes either before (its request is in: it is
            # left alone) or after (it finds `read_expired` set): never between, with its socket shut
            # for reading while it serves the request (its client would look gone).
            with self._lock:
                for handler in [handler for handler, due in self._due.items() if due <= now]:
                    del self._due[handler]
                    self.expired += 1
                    handler.read_expired = True
                    try:
                        handler.connection.shutdown(socket.SHUT_RD)
                    except OSError:   # already closed by its thread
                        pass
