"""Expert weight files and deterministic initialization.

File format (safetensors, one file may hold any number of experts):

    "<uid>.w1.weight"   (inter_dim, dim)    e.g. "0.3.w1.weight"
    "<uid>.w3.weight"   (inter_dim, dim)
    "<uid>.w2.weight"   (dim, inter_dim)

Any float dtype is accepted and loaded as float32. An expert service loads the uids it
hosts and ignores the others, so one file with the whole model's experts can be handed
to every service (that is how the router's equality tests seed remote experts).
The metadata entry "format" is "moe-expert-weights/v1".
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe.experts import SwiGLU

FORMAT = "moe-expert-weights/v1"
PARAM_NAMES = ("w1.weight", "w2.weight", "w3.weight")


class CheckpointError(ValueError):
    """A weight file that cannot serve the requested experts; the message says what is wrong."""


def save_expert_weights(path: str | Path, experts: Mapping[str, SwiGLU]) -> None:
    """Write `experts` ({uid: SwiGLU}) to `path` in the format above."""
    tensors = {}
    for uid, module in experts.items():
        state = module.state_dict()
        for name in PARAM_NAMES:
            tensors[f"{uid}.{name}"] = state[name].detach().to("cpu", torch.float32).contiguous().clone()
    save_file(tensors, str(path), metadata={"format": FORMAT})


def load_expert_weights(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{uid: {"w1.weight": ..., "w2.weight": ..., "w3.weight": ...}} from `path` (float32, CPU)."""
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"expert checkpoint {path} does not exist") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"expert checkpoint {path} is not a readable safetensors file: {e}") from None
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        uid, sep, name = key.partition(".w")
        if not sep or f"w{name}" not in PARAM_NAMES:
            raise CheckpointError(f"{path}: unexpected key {key!r}; keys look like '0.3.w1.weight'")
        out.setdefault(uid, {})[f"w{name}"] = t.float()
    for uid, state in out.items():
        missing = [n for n in PARAM_NAMES if n not in state]
        if missing:
            raise CheckpointError(f"{path}: expert {uid} lacks {', '.join(f'{uid}.{m}' for m in missing)}")
    return out


def experts_from_checkpoint(path: str | Path, uids: Iterable[str], dim: int, inter_dim: int) -> dict[str, SwiGLU]:
    """SwiGLU modules for `uids` loaded from `path`; CheckpointError on a missing uid or wrong shape."""
    states = load_expert_weights(path)
    missing = [uid for uid in uids if uid not in states]
    if missing:
        raise CheckpointError(f"{path} has no weights for {', '.join(missing)} "
                              f"(it holds {', '.join(sorted(states)) or 'nothing'})")
    experts = {}
    for uid in uids:
        module = SwiGLU(dim, inter_dim)
        expected = {n: tuple(p.shape) for n, p in module.state_dict().items()}
        for name, t in states[uid].items():
            if tuple(t.shape) != expected[name]:
                raise CheckpointError(f"{path}: {uid}.{name} has shape {list(t.shape)}, but this service "
                                      f"is configured for dim={dim}, inter_dim={inter_dim} "
                                      f"(expects {list(expected[name])})")
        module.load_state_dict(states[uid])
        experts[uid] = module
    return experts


def init_expert(uid: str, dim: int, inter_dim: int, seed: int) -> SwiGLU:
    """A SwiGLU whose weights depend only on (seed, uid): nn.Linear's default distribution,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from a generator seeded by a hash of both."""
    digest = hashlib.sha256(f"{seed}:{uid}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    module = SwiGLU(dim, inter_dim)
    with torch.no_grad():
        for name in PARAM_NAMES:  # fixed order: the draw does not depend on dict ordering
            weight = module.get_parameter(name)
            bound = 1.0 / math.sqrt(weight.shape[1])
            weight.uniform_(-bound, bound, generator=gen)
    return module
