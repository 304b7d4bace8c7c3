"""Weights and incentive as pure functions: what the local chain computes from the weights
validators set. No I/O; every input is checked for shape, NaN and sign.

Incentive of a uid = the stake-weighted median, over the validators that set weights, of
the weight each gave that uid (0 when it gave none), then normalized to sum 1. A median, not
a mean, so a validator holding less than half the stake cannot raise a uid on its own; this
is the idea of Yuma consensus's clipping, without its bonds and trust.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from subnet.chain.base import ChainError


def normalize_weights(uids: Sequence[int], weights: Sequence[float]) -> dict[int, float]:
    """{uid: weight / sum(weights)}, zeros dropped. ChainError on mismatched lengths, duplicate
    or negative uids, negative or non-finite weights, or weights that are all zero."""
    if len(uids) != len(weights):
        raise ChainError(f"uids and weights differ in length: {len(uids)} vs {len(weights)}")
    if len(set(uids)) != len(uids):
        raise ChainError("duplicate uids in weights; give each uid once")
    if any(int(u) != u or u < 0 for u in uids):
        raise ChainError("uids must be non-negative integers")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise ChainError("weights must be finite and non-negative")
    total = sum(values)
    if total <= 0:
        raise ChainError("all weights are zero; nothing to set")
    return {int(u): w / total for u, w in zip(uids, values) if w > 0}


def stake_weighted_median(values: Sequence[float], stakes: Sequence[float]) -> float:
    """The largest value v such that validators holding more than half the total stake gave
    at least v. With equal stakes this is the ordinary median for an odd count and the lower
    middle value for an even count.

    ValueError on empty input, mismatched lengths, non-finite numbers, negative stakes or a
    zero total stake.
    """
    if len(values) != len(stakes):
        raise ValueError(f"values and stakes differ in length: {len(values)} vs {len(stakes)}")
    if not values:
        raise ValueError("stake_weighted_median of nothing")
    if any(not math.isfinite(v) for v in values) or any(not math.isfinite(s) or s < 0 for s in stakes):
        raise ValueError("values must be finite and stakes finite and non-negative")
    total = float(sum(stakes))
    if total <= 0:
        raise ValueError("total stake is zero")
    # Walk from the largest value down, accumulating the stake of those who gave at least it.
    support = 0.0
    for value, stake in sorted(zip(values, stakes), key=lambda vs: vs[0], reverse=True):
        support += stake
        if support > total / 2:
            return float(value)
    raise AssertionError("unreachable: the full stake is more than half of itself")


def incentives(weights_by_validator: Mapping[int, Mapping[int, float]], stakes: Mapping[int, float],
               uids: Sequence[int]) -> dict[int, float]:
    """{uid: incentive} for every uid in `uids`, summing to 1 (or all 0 when no validator with
    stake gave any weight). `weights_by_validator` is {validator uid: {uid: weight}}; `stakes`
    is {validator uid: stake}; validators missing from `stakes` or with zero stake are ignored.
    """
    voters = [v for v in weights_by_validator if stakes.get(v, 0.0) > 0]
    if not voters:
        return {u: 0.0 for u in uids}
    voter_stakes = [float(stakes[v]) for v in voters]
    raw = {u: stake_weighted_median([float(weights_by_validator[v].get(u, 0.0)) for v in voters], voter_stakes)
           for u in uids}
    total = sum(raw.values())
    if total <= 0:
        return {u: 0.0 for u in uids}
    return {u: r / total for u, r in raw.items()}
