"""The gate: softmax over experts, top-k, renormalized weights, capacity and aux losses.

Routing is computed for a flat batch of N tokens; nothing here touches expert weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    """Where each token goes. Shapes use N tokens, E experts, k activated experts."""

    experts: torch.Tensor     # (N, k) long: chosen expert per slot
    weights: torch.Tensor     # (N, k) float: combine weight per slot; 0 for a dropped slot
    kept: torch.Tensor        # (N, k) bool: slot is dispatched (False = dropped by capacity)
    probs: torch.Tensor       # (N, E) softmax of the gate logits
    logits: torch.Tensor      # (N, E)


def load_balance_loss(probs: torch.Tensor, topk_experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """E * sum_i f_i * P_i: exactly 1.0 when assignments and probabilities are uniform.

    f_i: fraction of the N*k token-to-expert assignments chosen for expert i (not
    differentiable); P_i: mean gate probability of expert i (carries the gradient).
    """
    counts = torch.bincount(topk_experts.flatten(), minlength=n_experts).to(probs.dtype)
    f = counts / topk_experts.numel()
    p = probs.mean(dim=0)
    return n_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean(logsumexp(logits)^2): penalizes large gate logits (ST-MoE)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def expert_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(cf * N * k / E); at least 1."""
    return max(1, math.ceil(capacity_factor * n_tokens * k / n_experts))


class Gate(nn.Module):
    """Linear gate -> softmax -> top-k, with optional jitter and capacity limits.

    `weight` has shape (n_experts, dim), as in DeepSeek/Mixtral code.
    """

    def __init__(self, dim: int, n_experts: int, k: int, capacity_factor: float = 0.0,
                 overflow: str = "drop", jitter: float = 0.0):
        super().__init__()
        self.dim, self.n_experts, self.k = dim, n_experts, k
        self.capacity_factor, self.overflow, self.jitter = capacity_factor, overflow, jitter
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> Routing:  # x: (N, dim)
        if self.training and self.jitter > 0:
            # Multiplicative input noise (Switch Transformer): explores near-tied experts.
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        logits = F.linear(x, self.weight)                          # (N, E)
        probs = logits.softmax(dim=-1, dtype=torch.float32).to(x.dtype)
        top_p, top_e = probs.topk(self.k, dim=-1)                   # (N, k)
        kept = torch.ones_like(top_e, dtype=torch.bool)
        if self.capacity_factor > 0:
            capacity = expert_capacity(x.shape[0], self.n_experts, self.k, self.capacity_factor)
            top_e, kept = self._apply_capacity(probs, top_e, capacity)
            top_p = probs.gather(1, top_e)
        # Renormalize over the slots that survive; a fully dropped token gets all-zero weights
        # and passes through the block on the residual stream only.
        top_p = top_p * kept
        weights = top_p / top_p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(top_p.dtype).tiny)
        return Routing(experts=top_e, weights=weights, kept=kept, probs=probs, logits=logits)

    @torch.no_grad()
    def _apply_capacity(self, probs: torch.Tensor, top_e: torch.Tensor, capacity: int):
        """Fill expert slots rank by rank (all first choices before any second choice).

        drop: an assignment past its expert's capacity is dropped.
        reroute: it moves to the token's next-best expert (by probability) that still has room
        and is not already used by that token; dropped only when no expert has room.
        Loops run over k ranks and E candidates, never over tokens.
        """
        n, k = top_e.shape
        experts = top_e.clone()
        kept = torch.zeros_like(top_e, dtype=torch.bool)
        load = torch.zeros(self.n_experts, dtype=torch.long, device=probs.device)
        for rank in range(k):
            kept[:, rank] = self._claim(experts[:, rank], torch.ones(n, dtype=torch.bool), load, capacity)
        if self.overflow == "reroute":
            ranked = probs.argsort(dim=-1, descending=True)         # (N, E) candidates, best first
            for rank in range(k):
                for cand in range(self.n_experts):
                    pending = ~kept[:, rank]
                    if not pending.any():
                        break
                    choice = ranked[:, cand]
                    in_use = ((experts == choice[:, None]) & kept).any(dim=-1)
                    want = pending & ~in_use & (load[choice] < capacity)
                    granted = self._claim(choice, want, load, capacity)
                    experts[granted, rank] = choice[granted]
                    kept[:, rank] |= granted
        return experts, kept

    @staticmethod
    def _claim(choice: torch.Tensor, want: torch.Tensor, load: torch.Tensor, capacity: int) -> torch.Tensor:
        """Grant slots in token order to the tokens in `want`; updates `load` in place."""
        onehot = F.one_hot(choice, load.numel()) * want[:, None]   # (N, E)
        position = onehot.cumsum(dim=0) - 1 + load                 # slot index if granted
        granted = want & (position.gather(1, choice[:, None]).squeeze(1) < capacity)
        load += torch.bincount(choice[granted], minlength=load.numel())
        return granted
