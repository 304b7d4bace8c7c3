"""The expert boundary: how an MoE layer reaches its routed experts.

The layer does the gating, sorting and combining; an `ExpertGroup` only answers
"here are the tokens for expert i, give me expert i's output". Tensors in, tensors out,
no torch-module internals cross this line, so the same layer runs with the experts in
this process (`LocalExperts`, the reference) or behind gRPC (`services.router`).

Contract of `ExpertGroup.run`:
- `batches` maps expert index -> float tensor of shape (n_i, dim), n_i >= 1.
- The result maps every requested index to a tensor of the same shape, or to `None`
  when that expert is unavailable (failed, timed out). The layer then masks the expert:
  drops its gate weight and renormalizes the others.
- The outputs are differentiable with respect to the inputs. Parameter gradients are the
  group's business: local experts accumulate them in `.grad`, remote experts on their server.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import nn

from moe.experts import SwiGLU


class ExpertGroup(ABC):
    """The routed experts of one MoE layer, addressed by index 0..n_experts-1."""

    n_experts: int
    dim: int

    @abstractmethod
    def run(self, batches: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor | None]:
        """Run each expert on its token batch (see the module docstring for the contract)."""


class LocalExperts(nn.Module, ExpertGroup):
    """The in-process reference: the experts are modules of this process.

    Indexable like a ModuleList (`moe.experts[i]`), so code written for DeepSeek/Mixtral
    layers keeps working.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.n_experts = n_experts
        self.dim = dim
        self.inter_dim = inter_dim
        self.experts = nn.ModuleList(SwiGLU(dim, inter_dim) for _ in range(n_experts))

    def __getitem__(self, index: int) -> SwiGLU:
        return self.experts[index]

    def __len__(self) -> int:
        return self.n_experts

    def __iter__(self):
        return iter(self.experts)

    def run(self, batches: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor | None]:
        return {i: self.experts[i](x) for i, x in batches.items()}
