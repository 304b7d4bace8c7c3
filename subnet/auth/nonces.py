"""Which nonces a receiver has seen within the time window, so a captured request cannot be replayed.

A nonce only needs remembering while its timestamp is inside the receiver's window: a
replay after that is stale anyway. Entries therefore live 2 x window (clock skew either way).

- `MemoryNonceStore`: one process; bounded (oldest entries go first when full, with a
  warning, because a flood of valid signed requests must not grow memory without end).
- `RedisNonceStore`: `SET key 1 NX PX ttl`, shared by every process that uses the same
  Redis (replicas of one miner behind one hotkey see each other's nonces).

`claim(key)` is True the first time a key is seen, False after. Callers build the key
from the sender's hotkey and nonce; only requests with a valid signature reach a store.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import redis
import redis.asyncio

from subnet.redis_urls import redact

log = logging.getLogger(__name__)

REDIS_PREFIX = "moe:auth:nonce:"


class NonceStoreError(RuntimeError):
    """The store could not answer (Redis down); the request is refused, not let through."""


class NonceStore(Protocol):
    def claim(self, key: str) -> bool: ...

    async def aclaim(self, key: str) -> bool: ...


class MemoryNonceStore:
    """Nonces seen in the last `ttl_s` seconds, at most `max_entries`. Thread-safe."""

    def __init__(self, ttl_s: float, max_entries: int = 200_000, clock: Callable[[], float] = time.monotonic):
        if ttl_s <= 0 or max_entries <= 0:
            raise ValueError(f"ttl_s and max_entries must be positive, got {ttl_s}, {max_entries}")
        self.ttl_s, self.max_entries = ttl_s, max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._expiry: OrderedDict[str, float] = OrderedDict()  # insertion order = expiry order (one TTL)
        self.evicted = 0           # entries dropped before expiry because the store was full
        self._warned_at = float("-inf")

    def __len__(self) -> int:
        return len(self._expiry)

    def claim(self, key: str) -> bool:
        now = self._clock()
        with self._lock:
            while self._expiry:
                oldest, expires = next(iter(self._expiry.items()))
                if expires > now:
                    break
                del self._expiry[oldest]
            if key in self._expiry:
                return False
            if len(self._expiry) >= self.max_entries:
                self._expiry.popitem(last=False)
                self.evicted += 1
                if now - self._warned_at > 60.0:
                    self._warned_at = now
                    log.warning("nonce store full (%d entries): forgetting nonces before they expire, so "
                                "replay protection is shorter than the window; %d evicted so far",
                                self.max_entries, self.evicted)
            self._expiry[key] = now + self.ttl_s
            return True

    async def aclaim(self, key: str) -> bool:
        return self.claim(key)


class RedisNonceStore:
    """Nonces in Redis, each key expiring after `ttl_s`. Sync and asyncio clients, made on first use."""

    def __init__(self, url: str, ttl_s: float, prefix: str = REDIS_PREFIX, timeout_s: float = 1.0):
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.url, self.prefix = url, prefix
        self._ttl_ms = max(1, int(ttl_s * 1000))
        self._timeout_s = timeout_s
        self._sync: redis.Redis | None = None
        self._async: redis.asyncio.Redis | None = None

    def claim(self, key: str) -> bool:
        if self._sync is None:
            self._sync = redis.Redis.from_url(self.url, socket_timeout=self._timeout_s,
                                              socket_connect_timeout=self._timeout_s)
        try:
            return bool(self._sync.set(self.prefix + key, 1, nx=True, px=self._ttl_ms))
        except (redis.exceptions.RedisError, OSError) as e:
            raise NonceStoreError(f"nonce store {redact(self.url)} unreachable: {e}") from None

    async def aclaim(self, key: str) -> bool:
        # The asyncio client belongs to the event loop that first uses it (the server's loop).
        if self._async is None:
            self._async = redis.asyncio.Redis.from_url(self.url, socket_timeout=self._timeout_s,
                                                       socket_connect_timeout=self._timeout_s)
        try:
            return bool(await self._async.set(self.prefix + key, 1, nx=True, px=self._ttl_ms))
        except (redis.exceptions.RedisError, OSError) as e:
            raise NonceStoreError(f"nonce store {redact(self.url)} unreachable: {e}") from None

    def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def aclose(self) -> None:
        self.close()
        if self._async is not None:
            await self._async.aclose()
            self._async = None
