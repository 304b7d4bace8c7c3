"""Which expert endpoints take moe-frames/1, and their channels (the caller's side).

    link = FramesLink(frames_port=lambda ep: pool.get(ep).info(timeout_s=2).frames_port, max_body_bytes=...)
    channel = link.channel(endpoint)     # a FramesChannel, or None: use gRPC (decided once, then cached)
    link.unreachable(endpoint)           # a connect failed: gRPC for `retry_s`

An endpoint takes frames when its Info advertises a `frames_port`; it is dialled on the host of
its gRPC endpoint. A "no" (Info failed, an older service) is asked again after `retry_s`. When the
port cannot be reached, Info is asked again at the next call: a restarted service may have a new
port (EXPERT_FRAMES_PORT=0); the same port again (a container that does not publish it, a
firewall) is a "no" for `retry_s`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from subnet.frames.client import FramesChannel

log = logging.getLogger(__name__)


class FramesLink:
    def __init__(self, frames_port: Callable[[str], int], max_body_bytes: int, retry_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self._frames_port = frames_port
        self.max_body_bytes = max_body_bytes
        self._retry_s, self._clock = retry_s, clock
        self._channels: dict[str, FramesChannel] = {}
        self._refused: dict[str, float] = {}   # endpoint -> when it was found without frames
        self._unreachable: dict[str, tuple[int, float]] = {}   # endpoint -> (port that failed, when)
        self._lock = threading.Lock()

    def channel(self, endpoint: str) -> FramesChannel | None:
        with self._lock:
            channel = self._channels.get(endpoint)
            refused_at = self._refused.get(endpoint)
        if channel is not None:
            return channel
        now = self._clock()
        if refused_at is not None and now - refused_at < self._retry_s:
            return None
        try:
            port = self._frames_port(endpoint)
        except Exception as e:   # Info failed (the expert is down, or older): gRPC, ask again later
            log.debug("moe-frames to %s undecided (%s): gRPC for now", endpoint, e)
            port = 0
        with self._lock:
            failed = self._unreachable.get(endpoint)
            if failed is not None and failed[0] == port and now - failed[1] < self._retry_s:
                port = 0   # the port that just failed: not again for a while
            if not port:
                self._refused[endpoint] = now
                return None
            channel = self._channels.get(endpoint)
            if channel is None:
                channel = self._channels[endpoint] = FramesChannel(_host(endpoint), port, self.max_body_bytes)
                self._refused.pop(endpoint, None)
                log.info("tensor calls to %s go over moe-frames (port %d)", endpoint, port)
        return channel

    def unreachable(self, endpoint: str) -> None:
        """A connection to the endpoint's frames port failed: ask its Info again at the next call."""
        with self._lock:
            channel = self._channels.pop(endpoint, None)
            if channel is not None:
                self._unreachable[endpoint] = (channel.address[1], self._clock())
        if channel is not None:
            log.warning("moe-frames port of %s (%s:%d) cannot be reached; using gRPC unless Info names "
                        "another port", endpoint, *channel.address)
            channel.close()

    def close(self) -> None:
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


def _host(endpoint: str) -> str:
    """"10.0.0.5:50051" -> "10.0.0.5"; "[::1]:50051" -> "::1"."""
    host = endpoint.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host
