"""Prometheus metrics of the validator, on their own HTTP port (VALIDATOR_METRICS_PORT).

Each `ValidatorMetrics` has its own CollectorRegistry, so several validators in one test
process do not collide.

    validator_round, validator_round_phase      where the chain is (0 train ... 4 merge)
    validator_global_version                    the global version validated against
    validator_tasks_total{result}               tasks finished: verified, failed, copy, duplicate, error
    validator_task_reclaims_total               tasks taken over from a worker that died
    validator_eval_seconds                      histogram, one miner's evaluation
    validator_loss_delta{hotkey}                last loss_delta per miner (nats/token; > 0 = better)
    validator_global_loss                       validation loss of the global model on the round's batches
    validator_merges_total{result}              merge phases: published, skipped, failed
"""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from subnet.metrics_http import MetricsHttp
from subnet.process_metrics import register_process_metrics
from subnet.rounds import RoundPhase
from subnet.validation_results import ValidationResult

_EVAL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)


class ValidatorMetrics(MetricsHttp):
    """The metric objects plus the HTTP server that exposes them (`serve` / `stop`)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        register_process_metrics(r)
        self.round = Gauge("validator_round", "round the chain is in", registry=r)
        self.phase = Gauge("validator_round_phase", "phase: 0 train, 1 commit, 2 reveal, 3 validate, 4 merge",
                           registry=r)
        self.global_version = Gauge("validator_global_version", "global model version validated against",
                                    registry=r)
        self.tasks = Counter("validator_tasks", "validation tasks finished, by result", ["result"], registry=r)
        self.reclaims = Counter("validator_task_reclaims", "tasks reclaimed from a worker that died", registry=r)
        self.eval_seconds = Histogram("validator_eval_seconds", "one miner's evaluation", buckets=_EVAL_BUCKETS,
                                      registry=r)
        self.loss_delta = Gauge("validator_loss_delta", "global loss minus the loss with the miner's experts",
                                ["hotkey"], registry=r)
        self.global_loss = Gauge("validator_global_loss", "validation loss of the global model on the round's batches",
                                 registry=r)
        self.merges = Counter("validator_merges", "merge phases, by result", ["result"], registry=r)

    def on_phase(self, now: RoundPhase) -> None:
        self.round.set(now.round)
        self.phase.set(now.phase_index)

    def on_result(self, result: ValidationResult, stored: bool, seconds: float) -> None:
        if not stored:
            self.tasks.labels(result="duplicate").inc()
            return
        self.eval_seconds.observe(seconds)
        label = "copy" if result.copy_of else ("failed" if result.zero else "verified")
        self.tasks.labels(result=label).inc()
        if math.isfinite(result.loss_delta):
            self.loss_delta.labels(hotkey=result.hotkey).set(result.loss_delta)
        if math.isfinite(result.global_loss):
            self.global_loss.set(result.global_loss)

