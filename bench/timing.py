"""Timing helpers shared by every benchmark.

The machine is shared and noisy, so each benchmark interleaves the variants it compares
(round robin, several rounds) and keeps the best time of each: interference only ever
adds time, so the minimum is the least disturbed measurement of each variant.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def best_times(variants: dict[str, Callable[[], None]], rounds: int = 5, warmup: int = 1) -> dict[str, float]:
    """Seconds per call of each variant: best over `rounds` interleaved rounds."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    best = {name: float("inf") for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def percentiles(samples: list[float], qs=(50, 99)) -> dict[str, float]:
    ordered = sorted(samples)
    out = {}
    for q in qs:
        pos = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        out[f"p{q}"] = ordered[pos]
    return out
