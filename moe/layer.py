"""The MoE feed-forward layer: gate, dispatch to an expert group, combine.

    moe = MoE(dim=512, n_experts=8, n_activated_experts=2, moe_inter_dim=1024)
    y, aux_loss = moe(x)          # x: (..., dim)

Dispatch is vectorized: token-to-expert assignments are sorted by expert, each expert
runs once on all of its tokens, and the outputs are scattered back with index_add_.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from moe.boundary import ExpertGroup, LocalExperts
from moe.config import MoEConfig
from moe.experts import SwiGLU
from moe.gating import Gate, load_balance_loss, router_z_loss

# Inference combines outputs as they arrive (`_combine_streaming`) from this many routed values on
# (rows x dim, about 1 MiB of fp32): below it the combine is cheaper than handing each expert's output
# over on its own (a decode step routes a few tokens: one index_add beats one per expert).
STREAM_MIN_ELEMENTS = 1 << 18


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element is finite: a finite sum proves it in one read (a NaN or Inf makes the sum
    NaN or Inf); only a sum that is not finite (that, or large finite values overflowing) needs the exact
    element-wise check. 0.35 ms instead of 6-7 ms for the benchmark layer's 2048 x 1024 input, one thread.
    Also the wire's check for tensors past its small-tensor path (subnet.tensor_codec.all_finite)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


@dataclass
class LayerStats:
    """What the last forward pass routed; read by metrics and plots."""

    expert_counts: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    balance_loss: float = 0.0          # raw load-balance loss, 1.0 = balanced; NaN = not computed
    z_loss: float = 0.0                # raw router z-loss; NaN = not computed
    dropped: int = 0                   # assignments dropped by capacity
    masked_experts: tuple[int, ...] = ()   # experts that did not answer (remote only)


class MoE(nn.Module):
    """Mixture-of-Experts FFN returning `(y, aux_loss)`.

    `aux_loss` is already weighted: aux_loss_coef * balance + z_loss_coef * z; add it to the
    training loss. `forward(x, routing_losses=False)` skips computing it (a zero, and NaN in
    `last_stats`): for a pass whose loss nobody takes, such as a decode step.

    Pass `experts=` to reach the routed experts some other way (remote); by default they live
    in this process as `LocalExperts` (`moe.experts[i]` is a SwiGLU).
    """

    def __init__(self, dim: int, n_experts: int, n_activated_experts: int, moe_inter_dim: int,
                 n_shared_experts: int = 0, capacity_factor: float = 0.0, overflow: str = "drop",
                 jitter: float = 0.0, aux_loss_coef: float = 0.01, z_loss_coef: float = 1e-3,
                 experts: ExpertGroup | None = None):
        super().__init__()
        self.cfg = MoEConfig(dim, n_experts, n_activated_experts, moe_inter_dim, n_shared_experts,
                             capacity_factor, overflow, jitter, aux_loss_coef, z_loss_coef)
        self.dim, self.n_experts, self.k = dim, n_experts, n_activated_experts
        self.gate = Gate(dim, n_experts, n_activated_experts, capacity_factor, overflow, jitter)
        if experts is None:
            experts = LocalExperts(n_experts, dim, moe_inter_dim)
        elif experts.n_experts != n_experts or experts.dim != dim:
            raise ValueError(f"expert group has n_experts={experts.n_experts}, dim={experts.dim}; "
                             f"layer needs n_experts={n_experts}, dim={dim}")
        self.experts = experts
        # Shared experts see every token; one wider SwiGLU is the same function as n of them summed.
        self.shared_experts = (SwiGLU(dim, n_shared_experts * moe_inter_dim) if n_shared_experts else None)
        self.last_stats = LayerStats()

    @classmethod
    def from_config(cls, cfg: MoEConfig, experts: ExpertGroup | None = None) -> MoE:
        return cls(cfg.dim, cfg.n_experts, cfg.n_activated_experts, cfg.moe_inter_dim, cfg.n_shared_experts,
                   cfg.capacity_factor, cfg.overflow, cfg.jitter, cfg.aux_loss_coef, cfg.z_loss_coef, experts)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"MoE input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise ValueError(f"MoE input must be floating point, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"MoE input must have shape (..., {self.dim}), got {tuple(x.shape)}")
        # Only where gradients flow: the check guards training against NaN, and a full pass over
        # the input costs a no-grad forward (evaluation, serving in train mode) for nothing.
        if self.training and torch.is_grad_enabled() and not all_finite(x.detach()):
            raise ValueError("MoE training input contains NaN or Inf")

    def forward(self, x: torch.Tensor, routing_losses: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x)
        shape = x.shape
        x = x.reshape(-1, self.dim)                                 # (N, dim)
        n = x.shape[0]
        routing = self.gate(x)

        # Sort the kept (token, slot) assignments by expert: each expert then owns one
        # contiguous run of rows, and runs once on all of them.
        flat_expert = routing.experts.flatten()                     # (N*k,)
        flat_token = torch.arange(n, device=x.device).repeat_interleave(self.k)
        kept = routing.kept.flatten()
        all_kept = bool(kept.all())
        if not all_kept:
            flat_expert, flat_token = flat_expert[kept], flat_token[kept]
            flat_weight = routing.weights.flatten()[kept]
        else:
            flat_weight = routing.weights.flatten()
        order = torch.argsort(flat_expert, stable=True)
        token_of_row = flat_token[order]                            # (M,)
        weight_of_row = flat_weight[order]
        counts = torch.bincount(flat_expert, minlength=self.n_experts)
        rows = x.index_select(0, token_of_row)                      # (M, dim)
        sizes = counts.tolist()
        chunks = rows.split(sizes)
        batches = {e: chunk for e, chunk in enumerate(chunks) if chunk.shape[0] > 0}
        token_ids = {e: ids for e, ids in enumerate(token_of_row.split(sizes)) if ids.shape[0] > 0}

        local: list[tuple[torch.Tensor, float, float, int, torch.Tensor | None]] = []

        def local_work() -> None:
            """What needs no routed expert's output (the routing losses and their parts, the drops, the
            shared experts): once, while the routed experts compute (`ExpertGroup.run_meanwhile`)."""
            if local:
                return
            shared = self.shared_experts(x) if self.shared_experts is not None else None
            dropped = 0 if all_kept else int((~kept).sum())
            if not routing_losses:   # a quarter of a one-token layer's own work in process: skipped
                local.append((x.new_zeros(()), math.nan, math.nan, dropped, shared))
                return
            balance = load_balance_loss(routing.probs, routing.experts, self.n_experts)
            z = router_z_loss(routing.logits)
            local.append((self.cfg.aux_loss_coef * balance + self.cfg.z_loss_coef * z,
                          float(balance.detach()), float(z.detach()), dropped, shared))

        if self.experts.streams_outputs and not torch.is_grad_enabled() and rows.numel() >= STREAM_MIN_ELEMENTS:
            y, masked = self._combine_streaming(x, batches, token_ids, token_of_row, weight_of_row, counts,
                                                local_work)
        else:
            outputs = self.experts.run_meanwhile(batches, token_ids, local_work)
            masked = tuple(sorted(e for e, out in outputs.items() if out is None))
            if masked:
                weight_of_row = self._mask_weights(weight_of_row, token_of_row, counts, masked, n)
            parts = [outputs[e] if outputs[e] is not None else torch.zeros_like(batches[e])
                     for e in sorted(batches)]
            expert_out = torch.cat(parts) if parts else rows            # (M, dim)
            y = torch.zeros_like(x).index_add_(0, token_of_row, expert_out * weight_of_row[:, None])
        local_work()   # if the group did not
        aux_loss, balance, z, dropped, shared = local[0]
        if shared is not None:
            y = y + shared
        self.last_stats = LayerStats(expert_counts=counts.detach(), balance_loss=balance, z_loss=z, dropped=dropped,
                                     masked_experts=masked)
        return y.reshape(shape), aux_loss

    def _combine_streaming(self, x: torch.Tensor, batches: dict[int, torch.Tensor], token_ids: dict[int, torch.Tensor],
                           token_of_row: torch.Tensor, weight_of_row: torch.Tensor, counts: torch.Tensor,
                           meanwhile: Callable[[], None]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """The combine of `forward`, one expert at a time as its output arrives (inference with a
        group that `streams_outputs`): the experts still computing hide it. The same sums as the
        one-shot combine (with top-2, bit for bit: each token adds two terms). When experts are masked,
        each token's sum is then divided by the gate weight of its experts that answered, which is
        `_mask_weights`' renormalization applied after the sum instead of before."""
        starts = [0, *itertools.accumulate(counts.tolist())]
        combined: list[torch.Tensor] = []   # made at the first output: while the first experts compute

        def add(e: int, out: torch.Tensor) -> None:
            if not combined:
                combined.append(torch.zeros_like(x))
            rows = slice(starts[e], starts[e + 1])
            combined[0].index_add_(0, token_of_row[rows], out.to(x.dtype) * weight_of_row[rows, None])

        masked = self.experts.run_streaming(batches, token_ids, add, meanwhile)
        y = combined[0] if combined else torch.zeros_like(x)
        if masked:
            y /= self._answered_weights(weight_of_row, token_of_row, counts, masked, x.shape[0])[1][:, None]
        return y, masked

    def _mask_weights(self, weight_of_row: torch.Tensor, token_of_row: torch.Tensor, counts: torch.Tensor,
                      masked: tuple[int, ...], n_tokens: int) -> torch.Tensor:
        """Drop the gate weight of experts that did not answer and renormalize per token.

        A token whose every expert was masked keeps zero weights (residual pass-through).
        """
        w, per_token = self._answered_weights(weight_of_row, token_of_row, counts, masked, n_tokens)
        return w / per_token[token_of_row]

    def _answered_weights(self, weight_of_row: torch.Tensor, token_of_row: torch.Tensor, counts: torch.Tensor,
                          masked: tuple[int, ...], n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's gate weight, 0 where its expert was masked, and their sum per token (at least the
        smallest positive float, so that dividing by it leaves a token whose experts were all masked at 0)."""
        expert_of_row = torch.repeat_interleave(torch.arange(self.n_experts, device=counts.device), counts)
        alive = ~torch.isin(expert_of_row, torch.tensor(masked, device=counts.device))
        w = weight_of_row * alive
        per_token = torch.zeros(n_tokens, dtype=w.dtype, device=w.device).index_add_(0, token_of_row, w)
        return w, per_token.clamp_min(torch.finfo(w.dtype).tiny)
