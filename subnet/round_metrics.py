"""Prometheus metrics of a service's part in the rounds (shared by the expert service and the router).

    <prefix>_round                          round the chain is in
    <prefix>_round_phase                    its phase: 0 train, 1 commit, 2 reveal, 3 validate, 4 merge
    <prefix>_checkpoints_published_total    checkpoints uploaded (round and timer ones)
    <prefix>_commitments_total{result}      commits and reveals: committed, revealed, failed
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from subnet.round_participant import RoundRecord
from subnet.rounds import RoundPhase


class RoundMetrics:
    def __init__(self, registry: CollectorRegistry, prefix: str):
        self.round = Gauge(f"{prefix}_round", "round the chain is in", registry=registry)
        self.phase = Gauge(f"{prefix}_round_phase", "phase: 0 train, 1 commit, 2 reveal, 3 validate, 4 merge",
                           registry=registry)
        self.checkpoints = Counter(f"{prefix}_checkpoints_published", "checkpoints uploaded to S3",
                                   registry=registry)
        self.commitments = Counter(f"{prefix}_commitments", "commits and reveals by result", ["result"],
                                   registry=registry)

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
