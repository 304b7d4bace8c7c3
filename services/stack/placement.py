"""Which expert service hosts which experts."""

from __future__ import annotations

from collections.abc import Sequence

from moe.experts import expert_uid


def deal_experts(layers: Sequence[int], n_experts: int, n_services: int) -> list[list[str]]:
    """Expert uids per service, dealt round robin: index i of every layer goes to service i % n_services,
    so every service holds a share of every layer and a layer's calls spread over all services."""
    if n_services < 1:
        raise ValueError(f"n_services must be >= 1, got {n_services}")
    return [[expert_uid(layer, i) for layer in layers for i in range(n_experts) if i % n_services == s]
            for s in range(n_services)]
