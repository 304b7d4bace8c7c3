"""The total of a prometheus_client Counter over the label sets that match, for tests that count
what a service did (calls, retries, masks) through its own metrics."""

from __future__ import annotations


def counter_total(counter, **labels: str) -> float:
    """Sum of `counter`'s `_total` samples whose labels include every `labels` item."""
    return sum(s.value for m in counter.collect() for s in m.samples
               if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()))
