"""Feed-forward experts: the SwiGLU block that every routed and shared expert uses.

    y = w2(silu(w1 x) * w3 x)

Names follow DeepSeek/Mixtral code (`w1`, `w3`: dim -> inter, `w2`: inter -> dim) so their
checkpoints and habits carry over. Nothing here knows about routing or the network.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """One expert: a gated feed-forward network without biases."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        if dim <= 0 or inter_dim <= 0:
            raise ValueError(f"SwiGLU needs positive sizes, got dim={dim}, inter_dim={inter_dim}")
        self.dim = dim
        self.inter_dim = inter_dim
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, dim) -> (N, dim)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


# The state-dict name of a routed expert's parameters inside MoELM (groups: layer, index): what
# a router's trunk checkpoint leaves out and a validator puts back.
ROUTED_EXPERT_KEY = re.compile(r"^blocks\.(\d+)\.ffn\.experts\.experts\.(\d+)\.")


def expert_uid(layer: int, index: int) -> str:
    """The name of one routed expert on the wire and in the registry: "<layer>.<index>"."""
    return f"{layer}.{index}"


def parse_expert_uid(uid: str) -> tuple[int, int]:
    """Inverse of `expert_uid`; raises ValueError with the offending text."""
    parts = uid.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"expert uid must look like '<layer>.<index>' (e.g. '0.3'), got {uid!r}")
    return int(parts[0]), int(parts[1])
