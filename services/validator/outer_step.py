"""The merge arithmetic, as pure functions: which replicas count, their weighted average, and
the outer Nesterov step (DiLoCo) that moves the global expert towards it.

    chosen = select_replicas({"hk1": 0.03, "hk2": 0.01, "hk3": -0.2}, top_k=2)   # [("hk1", .75), ("hk2", .25)]
    average = weighted_average([states["hk1"], states["hk2"]], [0.75, 0.25])
    new, momentum = nesterov_step(global_state, average, momentum, lr=0.7, mu=0.9)

With lr = 1 and mu = 0 the new global expert is exactly the average.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

State = Mapping[str, torch.Tensor]


def select_replicas(scores: Mapping[str, float], top_k: int) -> list[tuple[str, float]]:
    """The best `top_k` hotkeys by score (ties: lower hotkey), then only those with a positive,
    finite score, with weights proportional to their scores (summing to 1). Empty when no
    candidate has a positive score: the global expert is kept."""
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    finite = [(h, float(s)) for h, s in scores.items() if math.isfinite(s)]
    best = sorted(finite, key=lambda hs: (-hs[1], hs[0]))[:top_k]
    positive = [(h, s) for h, s in best if s > 0]
    total = sum(s for _, s in positive)
    return [(h, s / total) for h, s in positive]


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """sum_i w_i * state_i (float32) for states with the same names and shapes; weights sum to 1."""
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state, got {len(states)} states and {len(weights)} weights")
    if abs(sum(weights) - 1.0) > 1e-6 or any(w < 0 for w in weights):
        raise ValueError(f"weights must be >= 0 and sum to 1, got {list(weights)}")
    names = set(states[0])
    for s in states[1:]:
        if set(s) != names:
            raise ValueError(f"states hold different tensors: {sorted(names)} vs {sorted(s)}")
    out = {}
    for name in sorted(names):
        acc = torch.zeros_like(states[0][name], dtype=torch.float32)
        for s, w in zip(states, weights):
            if s[name].shape != acc.shape:
                raise ValueError(f"{name}: shapes {tuple(s[name].shape)} and {tuple(acc.shape)} differ")
            acc += w * s[name].float()
        out[name] = acc
    return out


def nesterov_step(global_state: State, average: State, momentum: State | None, lr: float,
                  mu: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One outer step: delta = global - average (the outer gradient); m = mu * m + delta;
    new = global - lr * (delta + mu * m). Returns (new global state, new momentum); `momentum`
    None starts from zero. Nothing is changed in place."""
    if not (lr > 0 and math.isfinite(lr)) or not 0 <= mu < 1:
        raise ValueError(f"need lr > 0 and 0 <= mu < 1, got lr={lr}, mu={mu}")
    if set(global_state) != set(average) or (momentum is not None and set(momentum) != set(global_state)):
        raise ValueError("global state, average and momentum must hold the same tensors")
    new, new_m = {}, {}
    for name, g in global_state.items():
        g = g.float()
        delta = g - average[name].float()
        m = delta if momentum is None else mu * momentum[name].float() + delta
        new[name] = g - lr * (delta + mu * m)
        new_m[name] = m
    return new, new_m
