"""Prometheus metrics of the scorer, on their own HTTP port and their own registry.

    scorer_score{hotkey}                 composite score of the last submitted round
    scorer_ema{hotkey}                   EMA after that round
    scorer_weight{hotkey}                weight submitted for the hotkey's uid (0 if none)
    scorer_weights_submitted_total       successful set_weights calls
    scorer_last_submission_block         chain block of the last successful set_weights
    scorer_results_total{outcome}        results consumed: scored, zero, duplicate, late, invalid
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

from subnet.metrics_http import MetricsHttp
from subnet.process_metrics import register_process_metrics

OUTCOMES = ("scored", "zero", "duplicate", "late", "invalid")


class ScorerMetrics(MetricsHttp):
    """The metric objects plus the HTTP server that exposes them (`serve` / `stop`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        register_process_metrics(self.registry)
        r = self.registry
        self.score = Gauge("scorer_score", "composite score of the last submitted round", ["hotkey"], registry=r)
        self.ema = Gauge("scorer_ema", "EMA of the composite score", ["hotkey"], registry=r)
        self.weight = Gauge("scorer_weight", "weight submitted for the hotkey's uid", ["hotkey"], registry=r)
        self.weights_submitted = Counter("scorer_weights_submitted", "successful set_weights calls", registry=r)
        self.last_submission_block = Gauge("scorer_last_submission_block",
                                           "chain block of the last successful set_weights", registry=r)
        self.results = Counter("scorer_results", "results consumed, by outcome", ["outcome"], registry=r)
        for outcome in OUTCOMES:  # present at 0 from the start, so rates work before the first event
            self.results.labels(outcome=outcome)

    def set_table(self, scores: Mapping[str, float], ema: Mapping[str, float], weights: Mapping[str, float]) -> None:
        """Replace the per-hotkey gauges: a deregistered hotkey's series disappears."""
        for gauge, values in ((self.score, scores), (self.ema, ema), (self.weight, weights)):
            gauge.clear()
            for hotkey, value in values.items():
                gauge.labels(hotkey=hotkey).set(value)

