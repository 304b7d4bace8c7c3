"""An expert's AdamW moments as a file, so a restarted expert continues its training where its
recovery checkpoint left it instead of restarting Adam from zero.

    data = moments_bytes(adamw_moments(module, optimizer))      # {} before the first step
    restore_adamw_moments(module, optimizer, parse_moments(data, source="..."))

File format (safetensors, one expert per file; a recovery checkpoint holds it sealed as
`optimizer.safetensors.sealed`, services/expert/recovery_files.py):
for every parameter `p` of the expert (`w1.weight`, `w2.weight`, `w3.weight`), the float32 tensors
`p.exp_avg` and `p.exp_avg_sq` of its shape and `p.step`, a 0-d tensor holding the number of steps
taken (torch keeps it that way). Hyperparameters are not stored: every ApplyStep brings its own.

Why only recovery checkpoints carry it: a round checkpoint is what validators download and merge,
and a merge starts every expert's moments over (`ExpertBackend.replace_weights`); the moments
matter only to the hotkey that resumes its own training.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

FORMAT = "moe-subnet-adamw-moments-v1"
_FIELDS = ("exp_avg", "exp_avg_sq", "step")


class MomentsError(ValueError):
    """The moments do not fit the expert (names, shapes, values); nothing was restored."""


def adamw_moments(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """CPU copies of `optimizer`'s moments of `module`'s parameters; {} while no step was taken."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        state = optimizer.state.get(p)
        if not state:
            return {}   # no step yet (or a fresh optimizer after a merge): nothing to keep
        for field in _FIELDS:
            out[f"{name}.{field}"] = state[field].detach().to("cpu", torch.float32, copy=True).contiguous()
    return out


def moments_bytes(moments: Mapping[str, torch.Tensor]) -> bytes:
    return save(dict(moments), metadata={"format": FORMAT})


def parse_moments(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a moments file; MomentsError if it is not one (`source` names it in messages)."""
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise MomentsError(f"{source} is not a readable safetensors file: {e}") from None
    for key, t in tensors.items():
        if t.dtype != torch.float32:
            raise MomentsError(f"{source}: {key} has dtype {t.dtype}; moments are float32")
    return tensors


def restore_adamw_moments(module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                          tensors: Mapping[str, torch.Tensor], source: str = "moments") -> None:
    """Install `tensors` (from `adamw_moments` or `parse_moments`) as `optimizer`'s state for
    `module`; checks everything first, so on MomentsError the optimizer is left as it was."""
    params = dict(module.named_parameters())
    expected = {f"{name}.{field}" for name in params for field in _FIELDS}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise MomentsError(f"{source} does not fit this expert: missing {missing or 'nothing'}, "
                           f"unexpected {unexpected or 'nothing'}")
    states = {}
    for name, p in params.items():
        exp_avg, exp_avg_sq, step = (tensors[f"{name}.{field}"] for field in _FIELDS)
        for field, t in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            if tuple(t.shape) != tuple(p.shape):
                raise MomentsError(f"{source}: {name}.{field} has shape {list(t.shape)}, the parameter "
                                   f"{list(p.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise MomentsError(f"{source}: {name}.{field} holds values that are not finite")
        if bool((exp_avg_sq < 0).any()):
            raise MomentsError(f"{source}: {name}.exp_avg_sq is negative somewhere; it is a mean of squares")
        if step.numel() != 1 or not bool(torch.isfinite(step).all()) or step.item() < 1 \
                or step.item() != int(step.item()):
            raise MomentsError(f"{source}: {name}.step must be one whole number >= 1, got {step.tolist()}")
        states[p] = {"step": step.reshape(()).clone(),
                     "exp_avg": exp_avg.to(p.device, p.dtype, copy=True),
                     "exp_avg_sq": exp_avg_sq.to(p.device, p.dtype, copy=True)}
    for p, state in states.items():
        optimizer.state[p] = state
