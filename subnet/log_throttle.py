"""A recurring warning logged at most once per interval, saying how many were left out meanwhile: what
a hostile peer can trigger at will (refused frames, bad signatures, unparsable bodies) must not be
able to fill the log.

    throttle = LogThrottle(10.0)
    throttle.warning(log, "refused %s from %s", method, peer)
    # logs "refused ... from ..." at most every 10 s; a line after some were left out ends
    # " (12 more not logged since the last one; one line per 10 s at most)"

`due()` is the bare decision, for callers that do more than log.
"""

from __future__ import annotations

import logging
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

    def warning(self, logger: logging.Logger, message: str, *args) -> bool:
        """`logger.warning(message % args)` when due, saying how many were left out since the last
        one; else only counts it. True when it logged."""
        suppressed = self.due()
        if suppressed is None:
            return False
        logger.warning(message + "%s", *args, self.left_out(suppressed))
        return True

    def left_out(self, suppressed: int) -> str:
        """The suffix of a logged line: how many like it were not logged ("" when none)."""
        return (f" ({suppressed} more not logged since the last one; one line per {self.interval_s:g} s at most)"
                if suppressed else "")
