"""Expert weight files and deterministic initialization.

File format (safetensors, one file may hold any number of experts):

    "<uid>.w1.weight"   (inter_dim, dim)    e.g. "0.3.w1.weight"
    "<uid>.w3.weight"   (inter_dim, dim)
    "<uid>.w2.weight"   (dim, inter_dim)

Any float dtype is accepted and loaded as float32. An expert service loads the uids it
hosts and ignores the others, so one file with the whole model's experts can be handed
to every service (that is how the router's equality tests seed remote experts).
The metadata entry "format" is "moe-expert-weights/v1".

`expert_weights_bytes` / `parse_expert_weights` are the in-memory forms used for checkpoints
downloaded from S3 (subnet.checkpoints); parsing bytes is strict, since they may come from
anyone: float32/bf16/fp16 only, finite values only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save, save_file

from moe.experts import SwiGLU

FORMAT = "moe-expert-weights/v1"
PARAM_NAMES = ("w1.weight", "w2.weight", "w3.weight")
# What an untrusted file may hold: integer or float64 tensors would be a malformed checkpoint.
ALLOWED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class CheckpointError(ValueError):
    """A weight file that cannot serve the requested experts; the message says what is wrong."""


def _flat_tensors(experts: Mapping[str, SwiGLU | Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    tensors = {}
    for uid, module in experts.items():
        state = module.state_dict() if isinstance(module, torch.nn.Module) else module
        for name in PARAM_NAMES:
            tensors[f"{uid}.{name}"] = state[name].detach().to("cpu", torch.float32).contiguous().clone()
    return tensors


def save_expert_weights(path: str | Path, experts: Mapping[str, SwiGLU]) -> None:
    """Write `experts` ({uid: SwiGLU}) to `path` in the format above."""
    save_file(_flat_tensors(experts), str(path), metadata={"format": FORMAT})


def expert_weights_bytes(experts: Mapping[str, SwiGLU | Mapping[str, torch.Tensor]]) -> bytes:
    """`experts` ({uid: SwiGLU or its state dict}) as the bytes of a file in the format above."""
    return save(_flat_tensors(experts), metadata={"format": FORMAT})


def load_expert_weights(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """{uid: {"w1.weight": ..., "w2.weight": ..., "w3.weight": ...}} from `path` (float32, CPU)."""
    if Path(path).is_dir():
        raise CheckpointError(f"expert checkpoint {path} is a directory; give the .safetensors file in it "
                              f"(e.g. {Path(path) / 'experts.safetensors'})")
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"expert checkpoint {path} does not exist") from None
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"expert checkpoint {path} is not a readable safetensors file: {e}") from None
    return _group_by_uid(tensors, str(path))


def parse_expert_weights(data: bytes, source: str = "expert weights") -> dict[str, dict[str, torch.Tensor]]:
    """Like load_expert_weights, from the bytes of a file; also refuses dtypes other than
    float32/bf16/fp16 and non-finite values. `source` names the data in error messages."""
    try:
        tensors = load(data)
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{source} is not a readable safetensors file: {e}") from None
    for key, t in tensors.items():
        if t.dtype not in ALLOWED_DTYPES:
            raise CheckpointError(f"{source}: {key} has dtype {t.dtype}; only float32, bfloat16 and float16 "
                                  f"are accepted")
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{source}: {key} holds NaN or infinite values")
    return _group_by_uid(tensors, source)


def _group_by_uid(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        uid, sep, name = key.partition(".w")
        if not sep or f"w{name}" not in PARAM_NAMES:
            raise CheckpointError(f"{source}: unexpected key {key!r}; keys look like '0.3.w1.weight'")
        out.setdefault(uid, {})[f"w{name}"] = t.float()
    for uid, state in out.items():
        missing = [n for n in PARAM_NAMES if n not in state]
        if missing:
            raise CheckpointError(f"{source}: expert {uid} lacks {', '.join(f'{uid}.{m}' for m in missing)}")
    return out


def experts_from_checkpoint(path: str | Path, uids: Iterable[str], dim: int, inter_dim: int) -> dict[str, SwiGLU]:
    """SwiGLU modules for `uids` loaded from `path`; CheckpointError on a missing uid or wrong shape."""
    return experts_from_states(load_expert_weights(path), uids, dim, inter_dim, str(path))


def experts_from_states(states: Mapping[str, Mapping[str, torch.Tensor]], uids: Iterable[str], dim: int,
                        inter_dim: int, source: str = "expert weights") -> dict[str, SwiGLU]:
    """SwiGLU modules for `uids` from {uid: state dict}; CheckpointError on a missing uid or wrong shape."""
    uids = list(uids)
    missing = [uid for uid in uids if uid not in states]
    if missing:
        raise CheckpointError(f"{source} has no weights for {', '.join(missing)} "
                              f"(it holds {', '.join(sorted(states)) or 'nothing'})")
    experts = {}
    for uid in uids:
        module = SwiGLU(dim, inter_dim)
        expected = {n: tuple(p.shape) for n, p in module.state_dict().items()}
        for name, t in states[uid].items():
            if tuple(t.shape) != expected[name]:
                raise CheckpointError(f"{source}: {uid}.{name} has shape {list(t.shape)}, but this service "
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
