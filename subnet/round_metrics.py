"""Prometheus metrics of a service's part in the rounds (shared by the expert service and the router).

    <prefix>_round                          round the chain is in
    <prefix>_round_phase                    its phase: 0 train, 1 commit, 2 reveal, 3 validate, 4 merge
    <prefix>_checkpoints_published_total    checkpoints uploaded (round and timer ones)
    <prefix>_commitments_total{result}      commits and reveals: committed, revealed, failed
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from subnet.round_participant import RoundRecord
from subnet.rounds import RoundPhase


class RoundMetrics:
    """Wraps the four metric objects a service declares (with literal names, so the deploy checks
    can find them) and updates them from phase changes and round records."""

    def __init__(self, round: Gauge, phase: Gauge, checkpoints: Counter, commitments: Counter):
        self.round, self.phase, self.checkpoints, self.commitments = round, phase, checkpoints, commitments

    def on_phase(self, now: RoundPhase) -> None:
        self.round.set(now.round)
        self.phase.set(now.phase_index)

    def on_record(self, record: RoundRecord) -> None:
        if record.error:
            self.commitments.labels(result="failed").inc()
        elif record.revealed:
            self.commitments.labels(result="revealed").inc()
        elif record.committed:
            self.commitments.labels(result="committed").inc()
