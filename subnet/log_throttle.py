"""A recurring warning logged at most once per interval, saying how many were left out meanwhile: what
a hostile peer can trigger at will (refused frames, bad signatures, unparsable bodies) must not be
able to fill the log.

    throttle = LogThrottle(10.0)
    suppressed = throttle.due()
    if suppressed is not None:
        log.warning("refused ...%s", f" ({suppressed} more not logged)" if suppressed else "")
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class LogThrottle:
    """Thread-safe: the sync gRPC servers note events from their worker threads."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._logged_at = float("-inf")
        self._unlogged = 0

    def due(self) -> int | None:
        """None: do not log this one (it is counted); else log it, with this many left out since the last."""
        now = self._clock()
        with self._lock:
            if now - self._logged_at < self.interval_s:
                self._unlogged += 1
                return None
            suppressed, self._unlogged, self._logged_at = self._unlogged, 0, now
            return suppressed
