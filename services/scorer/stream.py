"""The validators' results stream as one consumer of the `scorers` group sees it.

Delivery is at least once: an entry stays pending until `ack`; one this consumer read and never
acknowledged (it crashed, or scoring failed) comes back through `own_pending`, and one another
consumer left pending longer than the claim idle time comes back through `claim`. The caller
makes processing idempotent (ScoreStore.record) and acknowledges only after recording.
"""

from __future__ import annotations

import redis

from subnet.validation_results import RESULT_GROUP

Entry = tuple[bytes, dict]  # (entry id, fields); fields is {} for an entry deleted from the stream


class ResultStream:
    """XREADGROUP / XAUTOCLAIM / XACK on `<validation prefix>results`; no scoring, no storage."""

    def __init__(self, client: redis.Redis, stream: str, consumer: str, claim_idle_s: float, batch: int):
        self.redis, self.stream, self.consumer = client, stream, consumer
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.batch = batch
        self._cursor = "0-0"

    def ensure_group(self) -> None:
        """Create the group (and the stream) if missing, from the stream's first entry: results
        written before the first scorer started are scored too."""
        try:
            self.redis.xgroup_create(self.stream, RESULT_GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def own_pending(self) -> list[Entry]:
        """Entries delivered to this consumer name and not acknowledged (oldest first)."""
        return self._read("0", block_ms=None)

    def new(self, block_ms: int | None = None) -> list[Entry]:
        """Entries never delivered to any consumer; waits up to `block_ms` for one (None: no wait)."""
        return self._read(">", block_ms)

    def claim(self) -> list[Entry]:
        """One page of entries other consumers left pending longer than the claim idle time."""
        reply = self.redis.xautoclaim(self.stream, RESULT_GROUP, self.consumer, self.claim_idle_ms,
                                      start_id=self._cursor, count=self.batch)
        # Redis 6.2 answers [cursor, entries], 7+ adds the ids of deleted entries.
        cursor, entries = reply[0], reply[1]
        self._cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        return [(eid, fields or {}) for eid, fields in entries]

    def ack(self, entry_id: bytes) -> None:
        self.redis.xack(self.stream, RESULT_GROUP, entry_id)

    def _read(self, start: str, block_ms: int | None) -> list[Entry]:
        reply = self.redis.xreadgroup(RESULT_GROUP, self.consumer, {self.stream: start}, count=self.batch,
                                      block=block_ms)
        if not reply:
            return []
        # RESP2 gives [[stream, entries]], RESP3 {stream: [entries]}.
        streams = reply.values() if isinstance(reply, dict) else [entries for _, entries in reply]
        return [(eid, fields or {}) for entries in streams for eid, fields in entries]
