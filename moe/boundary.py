"""The expert boundary: how an MoE layer reaches its routed experts.

The layer does the gating, sorting and combining; an `ExpertGroup` only answers
"here are the tokens for expert i, give me expert i's output". Tensors in, tensors out,
no torch-module internals cross this line, so the same layer runs with the experts in
this process (`LocalExperts`, the reference) or behind gRPC (`services.router`).

Contract of `ExpertGroup.run`:
- `batches` maps expert index -> float tensor of shape (n_i, dim), n_i >= 1.
- `token_ids` (optional) maps the same indices -> (n_i,) long tensor: the token (row of the
  layer's input) each row belongs to. A token appears under each of its experts; a group that
  waits for remote experts uses it to tell when every token has enough answers.
- The result maps every requested index to a tensor of the same shape, or to `None`
  when that expert is unavailable (failed, timed out). The layer then masks the expert:
  drops its gate weight and renormalizes the others.
- The outputs are differentiable with respect to the inputs. Parameter gradients are the
  group's business: local experts accumulate them in `.grad`, remote experts on their server.

`ExpertGroup.run_streaming` (inference) hands each output over as soon as it is there, so the
layer combines the first experts' outputs while the others still compute: for remote experts
that takes the combine off the critical path (their answers arrive one by one).

`ExpertGroup.run_meanwhile` is `run` with the layer's work that does not need the outputs (its
routing losses, its shared experts) done while the experts compute: for remote experts, once the
calls are sent.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from moe.experts import SwiGLU


@dataclass(frozen=True)
class OptimizerSettings:
    """AdamW settings the trainer shares with experts that own their optimizer state."""

    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8


class ExpertGroup(ABC):
    """The routed experts of one MoE layer, addressed by index 0..n_experts-1."""

    n_experts: int
    dim: int

    @abstractmethod
    def run(self, batches: Mapping[int, torch.Tensor],
            token_ids: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor | None]:
        """Run each expert on its token batch (see the module docstring for the contract)."""

    def run_meanwhile(self, batches: Mapping[int, torch.Tensor], token_ids: Mapping[int, torch.Tensor] | None,
                      meanwhile: Callable[[], None]) -> dict[int, torch.Tensor | None]:
        """`run`, calling `meanwhile()` once on this thread while the experts compute. A group whose
        experts are elsewhere calls it once its calls are out, so that the work hides behind the
        wait; this default (experts that compute on this thread) calls it after `run`."""
        outputs = self.run(batches, token_ids)
        meanwhile()
        return outputs

    #: Whether `run_streaming` hands outputs over as they arrive; the MoE layer uses it without
    #: autograd only when it does (for the in-process reference, one combine at the end is faster).
    streams_outputs: bool = False

    def run_streaming(self, batches: Mapping[int, torch.Tensor], token_ids: Mapping[int, torch.Tensor] | None,
                      on_output: Callable[[int, torch.Tensor], None],
                      meanwhile: Callable[[], None] | None = None) -> tuple[int, ...]:
        """`run` without autograd, handing each expert's output to `on_output(i, out)` once it is there
        (in any order, on the calling thread; `out` may be valid only during that call). Returns the
        experts that gave none (masked), sorted. `meanwhile()`: as in `run_meanwhile`. This default
        runs `run`, then `meanwhile`, then hands everything over."""
        outputs = self.run(batches, token_ids)
        if meanwhile is not None:
            meanwhile()
        for i, out in outputs.items():
            if out is not None:
                on_output(i, out)
        return tuple(sorted(i for i, out in outputs.items() if out is None))

    # Training hooks for experts whose parameters live outside this process (remote
    # experts own their optimizer). The local reference keeps the defaults: its parameters
    # are in the trainer's own optimizer, so there is nothing external to do.
    def begin_step(self, step: int) -> None:  # noqa: B027 (a no-op default, on purpose)
        """Called before the forward pass of training step `step`."""

    def step_settings(self, lr: float, settings: OptimizerSettings, grad_clip: float) -> None:  # noqa: B027
        """Called after `begin_step`: the step's learning rate, AdamW settings and clipping norm. A group
        that steps its experts during backward (remote asynchronous training) needs them then; the
        others get lr and settings again with `apply_external_step`."""

    def external_grad_sq_norm(self) -> float:
        """Squared L2 norm of the gradients accumulated outside this process this step."""
        return 0.0

    def apply_external_step(self, lr: float, grad_scale: float, settings: OptimizerSettings) -> None:  # noqa: B027
        """Apply the optimizer step outside this process (grads scaled by `grad_scale` first)."""

    def skip_external_step(self) -> None:  # noqa: B027
        """Discard this step's gradients outside this process without an update: the trainer skips
        a step whose global gradient norm is NaN or Inf, here as in its own optimizer."""


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

    def run(self, batches: Mapping[int, torch.Tensor],
            token_ids: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor | None]:
        return {i: self.experts[i](x) for i, x in batches.items()}
