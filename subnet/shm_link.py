"""The caller's side of the shared-memory transport: which endpoints take it, and a region per call.

    link = ShmLink(from_env(ShmConfig), peer_host_id=lambda ep: pool.get(ep).info(timeout_s=2).shm_host_id)
    if link.usable(endpoint):            # decided once per endpoint (one Info call), then cached
        region = link.acquire()          # one region per call in flight
        ...                              # the call; then link.release(region), or link.discard(region)
    link.refused(endpoint)               # it answered that it cannot attach: inline from now on

An endpoint is usable when SHM_TRANSPORT=auto and it advertises the same `subnet.shm.host_id`
as this process (same kernel boot, same tmpfs, same uid); everything else (another host,
another container's /dev/shm, Info failing, an old expert without the field) goes inline. A
"no" is asked again after `retry_s`, so an expert restarted with shared memory is picked up.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from subnet.shm import ShmConfig, ShmRegion, ShmRegionPool, host_id

log = logging.getLogger(__name__)


class ShmLink:
    def __init__(self, config: ShmConfig, peer_host_id: Callable[[str], str], retry_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._peer_host_id = peer_host_id
        self._retry_s, self._clock = retry_s, clock
        self._host = host_id(config.directory) if config.enabled else ""
        self.pool = ShmRegionPool(config) if self._host else None
        self._decided: dict[str, tuple[bool, float]] = {}   # endpoint -> (usable, when decided)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.pool is not None

    def usable(self, endpoint: str) -> bool:
        """Whether calls to `endpoint` should carry their tensors in shared memory."""
        if self.pool is None:
            return False
        with self._lock:
            decided = self._decided.get(endpoint)
        now = self._clock()
        if decided is not None and (decided[0] or now - decided[1] < self._retry_s):
            return decided[0]
        try:
            usable = self._peer_host_id(endpoint) == self._host
        except Exception as e:   # Info failed (the expert is down, or old): inline, ask again later
            log.debug("shared memory with %s undecided (%s): inline for now", endpoint, e)
            usable = False
        with self._lock:
            self._decided[endpoint] = (usable, now)
        if usable and decided is None:
            log.info("tensors to and from %s go through shared memory (%s)", endpoint, self.config.directory)
        return usable

    def refused(self, endpoint: str) -> None:
        """The endpoint could not attach a region: inline for `retry_s`."""
        log.warning("%s cannot attach shared memory; sending tensors inline for %.0f s", endpoint, self._retry_s)
        with self._lock:
            self._decided[endpoint] = (False, self._clock())

    def acquire(self) -> ShmRegion:
        return self.pool.acquire()

    def release(self, region: ShmRegion) -> None:
        self.pool.release(region)

    def discard(self, region: ShmRegion) -> None:
        self.pool.discard(region)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
