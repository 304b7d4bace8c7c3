"""What the validator measures about one miner, as pure functions: no I/O, no model, no Redis.

NaN means "could not be measured" (an expert that got no input, a zero output); it never
turns into a good score, and one NaN never spoils the numbers of the other experts:

    output_cosine(a, b)                  cosine of two experts' outputs on the same probe
    diversity([[cos to others], ...])    1 - mean similarity to the other experts, in [0, 1]
    token_shares(counts)                 share of a layer's token assignments per expert
    active_ratio(shares, threshold)      share of the miner's experts that get enough tokens
    is_copy({uid: cosine}, threshold)    every shared expert computes the same function
    live_mismatch(cos, max_abs, ...)     why a live service does not serve the published weights
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch


def output_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two output tensors of the same shape, flattened (one number per
    pair of experts, dominated by the tokens with large outputs, as the residual stream is).
    NaN when either is all zeros or holds NaN/inf."""
    if a.shape != b.shape:
        raise ValueError(f"outputs of different shapes cannot be compared: {tuple(a.shape)} vs {tuple(b.shape)}")
    a, b = a.detach().double().flatten(), b.detach().double().flatten()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.nan
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return math.nan
    return float((a @ b) / (na * nb))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise |a - b|; NaN when either holds NaN/inf."""
    if a.shape != b.shape:
        raise ValueError(f"outputs of different shapes cannot be compared: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a.detach().double() - b.detach().double()).abs()
    if diff.numel() == 0:
        return 0.0
    return float(diff.max()) if torch.isfinite(diff).all() else math.nan


def _finite_mean(values: Iterable[float]) -> float:
    kept = [float(v) for v in values if math.isfinite(v)]
    return sum(kept) / len(kept) if kept else math.nan


def diversity(similarities: Sequence[Sequence[float]]) -> float:
    """1 - the mean over the miner's experts of each one's mean cosine to the other experts of
    its layer, clipped to [0, 1]. Non-finite cosines are left out; an expert with none left
    is left out; NaN when nothing is left (nothing could be compared)."""
    per_expert = [_finite_mean(row) for row in similarities]
    mean = _finite_mean(per_expert)
    return math.nan if math.isnan(mean) else min(1.0, max(0.0, 1.0 - mean))


def token_shares(counts: Sequence[float] | torch.Tensor) -> list[float]:
    """Per-expert share of one layer's token assignments; all NaN when the layer got none."""
    values = [float(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
    if any(not math.isfinite(c) or c < 0 for c in values):
        raise ValueError(f"assignment counts must be finite and >= 0, got {values}")
    total = sum(values)
    return [c / total if total > 0 else math.nan for c in values]


def active_ratio(shares: Iterable[float], threshold: float) -> float:
    """Share of the miner's experts whose token share is at least `threshold`. A NaN share
    (its layer saw no tokens) is left out; NaN when no share is left."""
    finite = [s for s in shares if math.isfinite(s)]
    if not finite:
        return math.nan
    return sum(1 for s in finite if s >= threshold) / len(finite)


def is_copy(cosines: Mapping[str, float], threshold: float) -> bool:
    """Whether every shared expert's outputs match an earlier commitment's (cosine > threshold).
    No shared expert, or any cosine that is NaN (cannot be compared), is not a copy."""
    return bool(cosines) and all(math.isfinite(c) and c > threshold for c in cosines.values())


def live_mismatch(cosine: float, max_abs: float, min_cosine: float, max_abs_allowed: float) -> str:
    """"" when the live outputs match the published ones within the thresholds, else the reason."""
    if math.isfinite(cosine) and math.isfinite(max_abs) and cosine >= min_cosine and max_abs <= max_abs_allowed:
        return ""
    return f"live service does not serve the published weights (cosine {cosine:.4f}, max abs {max_abs:.4g})"


def loss_delta(global_loss: float, loss: float) -> float:
    """Global loss minus the miner's (> 0: the miner's experts help); NaN if either is not finite."""
    if not (math.isfinite(global_loss) and math.isfinite(loss)):
        return math.nan
    return global_loss - loss
