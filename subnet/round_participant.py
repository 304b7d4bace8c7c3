"""One service's part in every round: publish a checkpoint and commit it, then reveal it.

    participant = RoundParticipant(chain, schedule, identity, publish=snapshot_and_upload, name="expert-0")
    participant.start()      # a PhaseWatcher thread drives it
    ...
    participant.stop()

In the commit phase of round r it calls `publish(r)`, which snapshots the service's weights,
uploads them as signed checkpoints and returns the *reveal data* (a short string naming what
was published, e.g. `{"0.1": "<manifest sha256>", ...}`); the participant commits
`sha256(reveal data)` to the chain. In the reveal phase of r it reveals that data. A
validator then recomputes the digest, fetches the manifests the data names and checks their
sha256 against it, so nothing published after the commit can be passed off as committed.

Rounds come from chain blocks (subnet.rounds), so every service agrees on them without
talking. Publishing runs on the watcher's thread, never on a service's serving or training
thread: a round boundary does not stall training. Failures are logged and counted; the next
round tries again.

This class does not know what a checkpoint holds (the `publish` callback does) and does not
load anything (validators and services do that through subnet.checkpoints).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from subnet.chain.base import Chain, ChainError
from subnet.chain.signing import commit_payload, digest_of, reveal_payload
from subnet.rounds import PhaseWatcher, RoundPhase, RoundSchedule

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What this service did in one round (for logs, metrics and the stack's summary)."""

    round: int
    data: str = ""
    digest: str = ""
    published_s: float = 0.0
    committed: bool = False
    revealed: bool = False
    error: str = ""


class RoundParticipant:
    """Publish + commit in the commit phase, reveal in the reveal phase, once per round."""

    def __init__(self, chain: Chain, schedule: RoundSchedule, identity, publish: Callable[[int], str], *,
                 name: str, poll_s: float = 0.5, on_phase: Callable[[RoundPhase], None] | None = None,
                 on_record: Callable[[RoundRecord], None] | None = None):
        """`identity`: has `.hotkey` and `.sign(bytes)`. `on_phase` sees every phase change (metrics);
        `on_record` every finished commit or reveal."""
        self.chain, self.schedule, self.identity = chain, schedule, identity
        self.publish, self.name = publish, name
        self.on_phase, self.on_record = on_phase, on_record
        self.records: dict[int, RoundRecord] = {}
        self._lock = threading.Lock()
        self._watcher = PhaseWatcher(chain, schedule, self._changed, poll_s=poll_s)

    def start(self) -> RoundParticipant:
        self._watcher.start()
        return self

    def stop(self) -> None:
        self._watcher.stop()

    def poll(self) -> RoundPhase | None:
        """Read the chain once and act on a phase change (what the watcher thread does)."""
        return self._watcher.poll()

    @property
    def current(self) -> RoundPhase | None:
        return self._watcher.current

    def history(self) -> list[RoundRecord]:
        with self._lock:
            return [self.records[r] for r in sorted(self.records)]

    # -- phases -----------------------------------------------------------------------------

    def _changed(self, now: RoundPhase) -> None:
        if self.on_phase is not None:
            self.on_phase(now)
        if now.phase == "commit":
            self.commit_round(now.round)
        elif now.phase == "reveal":
            self.reveal_round(now.round)

    def commit_round(self, round: int) -> RoundRecord:
        """Publish and commit `round` (once; a second call returns the first result)."""
        with self._lock:
            record = self.records.get(round)
            if record is not None:
                return record
            record = self.records[round] = RoundRecord(round)
        hotkey = self.identity.hotkey
        try:
            started = time.perf_counter()
            record.data = self.publish(round)
            record.published_s = time.perf_counter() - started
            record.digest = digest_of(record.data)
            self.chain.commit(hotkey, round, record.digest,
                              self.identity.sign(commit_payload(hotkey, round, record.digest)))
            record.committed = True
            log.info("%s: round %d published in %.1f s and committed (%s...)", self.name, round,
                     record.published_s, record.digest[:12])
        except ChainError as e:
            record.error = f"commit refused: {e}"
            log.warning("%s: round %d: %s", self.name, round, record.error)
        except Exception as e:  # S3 down, a snapshot that failed: this round is lost, not the service
            record.error = f"publish failed: {type(e).__name__}: {e}"
            log.warning("%s: round %d: %s", self.name, round, record.error)
        self._report(record)
        return record

    def reveal_round(self, round: int) -> RoundRecord | None:
        """Reveal what `round` committed; None when this service committed nothing that round."""
        with self._lock:
            record = self.records.get(round)
        if record is None or not record.committed or record.revealed:
            return record
        hotkey = self.identity.hotkey
        try:
            signature = self.identity.sign(reveal_payload(hotkey, round, record.data))
            self.chain.reveal(hotkey, round, record.data, signature)
            record.revealed = True
            log.info("%s: round %d revealed", self.name, round)
        except ChainError as e:
            record.error = f"reveal refused: {e}"
            log.warning("%s: round %d: %s", self.name, round, record.error)
        except Exception as e:
            record.error = f"reveal failed: {type(e).__name__}: {e}"
            log.warning("%s: round %d: %s", self.name, round, record.error)
        self._report(record)
        return record

    def _report(self, record: RoundRecord) -> None:
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:
                log.exception("round record callback failed")
