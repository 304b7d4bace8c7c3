"""Scoring as pure functions: one validation result -> a composite score, scores -> EMA -> weights.

No I/O and no shared state: every function looks at one miner at a time (or normalizes a whole
table at the end), so a NaN, a missing miner or an absurd value from one miner can only change
that miner's own score. Every input is sanitized: NaN and infinities never come out.

Composite score of one miner in one round, in [0, 1]:

    score = gate * improvement(loss_delta)
                 * (w_loss + w_div * unit(diversity) + w_active * unit(active_ratio)) / (w_loss + w_div + w_active)

    improvement(d) = tanh(max(d, 0) / scale)    d = loss_delta in nats/token (> 0 = better than global)
    unit(x)        = x clipped to [0, 1]; NaN -> 0
    gate           = 0 when the result is `zero` (not verified, a copy, or any reason), else 1

It is the weighted sum of the three parts, with the loss part doubling as a gate: only a miner
whose experts make the global model better earns anything, and diversity and activity then
decide how much of its improvement it keeps. A plain weighted sum would pay a lazy miner that
republishes the global experts (d = 0) for the diversity and activity of weights it did nothing
for; here it earns 0, as does a harmful one (d < 0). One `scale` better gives 0.76 of the
bracket, three scales 0.995. With the default weights (0.6, 0.2, 0.2) a miner whose experts are
all active but similar to their neighbours keeps 80% of its improvement score.
EMA over rounds: ema_r = alpha * score_r + (1 - alpha) * ema_{r-1}. A hotkey starts from 0: a new
one, and one whose uid changed (it re-registered, or its uid now belongs to someone else). A
registered hotkey with no result in a round gets score 0 for it, so absent miners fade out.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from subnet.validation_results import ValidationResult

_MAX_EXP = 60.0  # tanh(60) is exactly 1.0 in floats: a cap that keeps 1e30 and inf harmless


@dataclass(frozen=True)
class ScoreWeights:
    """Weights of the three parts of the composite score; finite, >= 0, not all zero."""

    loss: float = 0.6
    diversity: float = 0.2
    active: float = 0.2

    def __post_init__(self):
        parts = (self.loss, self.diversity, self.active)
        if not all(math.isfinite(w) and w >= 0 for w in parts):
            raise ValueError(f"score weights must be finite and >= 0, got {parts}")
        if sum(parts) <= 0:
            raise ValueError("score weights are all zero; give at least one part a positive weight")

    @property
    def total(self) -> float:
        return self.loss + self.diversity + self.active


def unit(x: float) -> float:
    """`x` clipped to [0, 1]; NaN, None and anything not a number give 0."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0
    if math.isnan(x):
        return 0.0
    return min(1.0, max(0.0, x))


def loss_score(loss_delta: float, scale: float) -> float:
    """Improvement (nats/token) mapped to [0, 1]: 0 for no change or worse, tanh(d / scale) above;
    monotone; NaN -> 0."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"loss scale must be a positive number of nats/token, got {scale}")
    try:
        d = float(loss_delta)
    except (TypeError, ValueError):
        return 0.0
    if math.isnan(d):
        return 0.0
    x = min(_MAX_EXP, max(0.0, d / scale))   # +-inf and 1e30 land here without overflow
    return math.tanh(x)


def passes_gate(result: ValidationResult) -> bool:
    # `is True`: a malformed record ("false" as a string) must not pass as verified.
    return result.verified is True and not result.zero


def zero_reason(result: ValidationResult) -> str:
    """Why the result scores 0 ("" when it does not)."""
    if passes_gate(result):
        return ""
    if result.reason:
        return str(result.reason)
    if result.copy_of:
        return f"copy of {result.copy_of}"
    return "not verified"


def composite_score(result: ValidationResult, weights: ScoreWeights, loss_scale: float) -> float:
    """The miner's score for the round, in [0, 1] (see the module docstring)."""
    if not passes_gate(result):
        return 0.0
    bracket = (weights.loss + weights.diversity * unit(result.diversity)
               + weights.active * unit(result.active_ratio)) / weights.total
    return unit(loss_score(result.loss_delta, loss_scale) * bracket)


def ema_step(previous: float | None, score: float | None, alpha: float) -> float:
    """One EMA step; a missing or NaN previous value is 0, a missing or NaN score is 0."""
    if not (math.isfinite(alpha) and 0 < alpha <= 1):
        raise ValueError(f"EMA alpha must be in (0, 1], got {alpha}")
    return alpha * unit(score) + (1 - alpha) * unit(previous)


def fold_round(ema: Mapping[str, float], uid_of_ema: Mapping[str, int], scores: Mapping[str, float],
               registered: Mapping[str, int], alpha: float) -> dict[str, float]:
    """The EMA after one round, for registered hotkeys only.

    ema, uid_of_ema: the EMA before the round and the uid each hotkey had when it was computed.
    scores: hotkey -> composite score of the round (missing = 0 for this round).
    registered: hotkey -> uid in the metagraph now.

    A hotkey whose uid differs from `uid_of_ema` (re-registered, or a new hotkey on a reused uid)
    starts from 0; a hotkey no longer registered is dropped; one never scored gets no entry.
    """
    out = {}
    for hotkey, uid in registered.items():
        previous = ema.get(hotkey) if uid_of_ema.get(hotkey) == uid else None
        score = scores.get(hotkey)
        if previous is None and score is None:
            continue
        out[hotkey] = ema_step(previous, score, alpha)
    return out


def weights_by_uid(ema: Mapping[str, float], registered: Mapping[str, int],
                   banned: Collection[str] = ()) -> dict[int, float]:
    """{uid: weight} summing to 1 over registered hotkeys with a positive EMA that are not `banned`;
    {} when none is left.

    Each EMA is clipped to [0, 1] first, so one absurd stored value can take at most the share
    a perfect miner would have. A banned hotkey (its newest result failed the gate: a copy, not
    verified) keeps its EMA, which decays while it fails, but is paid nothing meanwhile: the EMA
    smooths honest work over rounds, it must not keep paying a miner caught cheating."""
    raw = {uid: unit(ema.get(hotkey)) for hotkey, uid in registered.items() if hotkey not in banned}
    raw = {uid: v for uid, v in raw.items() if v > 0}
    total = sum(raw.values())
    if total <= 0:
        return {}
    return {uid: v / total for uid, v in sorted(raw.items())}


def banned_hotkeys(ema: Mapping[str, float], last_zero: set[str] | frozenset[str], registered: Mapping[str, int],
                   ban_ema: float) -> set[str]:
    """Registered hotkeys the router should avoid: last result scored 0, or EMA below `ban_ema`.
    A hotkey with no EMA yet (never folded) is banned only by its last result."""
    out = set()
    for hotkey in registered:
        if hotkey in last_zero:
            out.add(hotkey)
        elif hotkey in ema and unit(ema[hotkey]) < ban_ema:
            out.add(hotkey)
    return out
