"""Configuration of the MoE layer and the decoder LM, plus the named presets.

One frozen dataclass per thing; every default carries the reason it was chosen.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, fields, replace

OVERFLOW_POLICIES = ("drop", "reroute")
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def checked_fields(cls, data: object, what: str) -> dict:
    """`data` (parsed JSON, e.g. a checkpoint's config.json) as keyword arguments for the dataclass
    `cls`: an object of its fields, each of its default's kind (an int where an int is, a number where a
    float is). ValueError naming the field otherwise, rather than a TypeError from deep in __post_init__."""
    if not isinstance(data, dict):
        raise ValueError(f"{what} must be an object of {cls.__name__} fields, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    for name, value in data.items():
        kind = type(known[name].default)
        if known[name].default is MISSING or kind not in _KINDS:
            continue
        if isinstance(value, bool) and kind is not bool:
            ok = False
        else:
            ok = isinstance(value, (int, float)) if kind is float else isinstance(value, kind)
        if not ok:
            raise ValueError(f"{what}.{name} must be {_KINDS[kind]}, got {value!r}")
    return data


@dataclass(frozen=True)
class MoEConfig:
    """One MoE feed-forward layer."""

    dim: int
    n_experts: int
    n_activated_experts: int
    moe_inter_dim: int
    n_shared_experts: int = 0          # DeepSeek-style experts that see every token; 0 = none
    capacity_factor: float = 0.0       # 0 = dropless (default); else slots = cf * tokens * k / E
    overflow: str = "drop"             # over capacity: "drop" the assignment or "reroute" to next-best
    jitter: float = 0.0                # multiplicative input noise in training (Switch style), 0 = off
    aux_loss_coef: float = 0.01        # load balancing; 0.01 is the Switch/Mixtral-era default
    z_loss_coef: float = 1e-3          # router z-loss (ST-MoE); keeps gate logits small

    def __post_init__(self):
        for name in ("dim", "n_experts", "n_activated_experts", "moe_inter_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.n_activated_experts > self.n_experts:
            raise ValueError(
                f"n_activated_experts ({self.n_activated_experts}) cannot exceed n_experts ({self.n_experts})")
        if self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be >= 0, got {self.n_shared_experts}")
        if self.capacity_factor < 0:
            raise ValueError(f"capacity_factor must be >= 0 (0 = dropless), got {self.capacity_factor}")
        if self.overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {self.overflow!r}")
        if self.jitter < 0 or self.aux_loss_coef < 0 or self.z_loss_coef < 0:
            raise ValueError("jitter, aux_loss_coef and z_loss_coef must be >= 0")


@dataclass(frozen=True)
class LMConfig:
    """The decoder LM (nanoGPT layout with RMSNorm, rotary attention and MoE FFN blocks)."""

    vocab_size: int = 8192             # byte-level BPE trained on the bundled corpora
    block_size: int = 256              # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    dim: int = 256
    n_experts: int = 8
    n_activated_experts: int = 2       # top-2: the Mixtral choice, cheap and stable
    moe_inter_dim: int = 512           # per expert; 2 x dim keeps active FLOPs near a dense 4x FFN / 2
    n_shared_experts: int = 0
    dense_every: int = 0               # N > 0: every Nth block uses a dense FFN instead of MoE; 0 = all MoE
    dense_inter_dim: int = 1024        # hidden size of those dense FFNs
    capacity_factor: float = 0.0
    overflow: str = "drop"
    jitter: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    dropout: float = 0.0               # small models on small data overfit late; 0 trains fastest
    rope_theta: float = 10000.0
    init_std: float = 0.02             # GPT-2 init; residual projections get / sqrt(2 * n_layer)

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim % self.n_head or (self.dim // self.n_head) % 2:
            raise ValueError(f"dim ({self.dim}) must split into n_head ({self.n_head}) heads of even size")
        if self.dense_every < 0:
            raise ValueError(f"dense_every must be >= 0, got {self.dense_every}")
        self.moe_config()  # validates the MoE fields

    def moe_config(self) -> MoEConfig:
        return MoEConfig(
            dim=self.dim, n_experts=self.n_experts, n_activated_experts=self.n_activated_experts,
            moe_inter_dim=self.moe_inter_dim, n_shared_experts=self.n_shared_experts,
            capacity_factor=self.capacity_factor, overflow=self.overflow, jitter=self.jitter,
            aux_loss_coef=self.aux_loss_coef, z_loss_coef=self.z_loss_coef)

    def is_moe_block(self, layer: int) -> bool:
        """Block `layer` uses MoE unless it is every `dense_every`-th block (1-based)."""
        return not (self.dense_every and (layer + 1) % self.dense_every == 0)

    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.is_moe_block(i)]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LMConfig:
        return cls(**checked_fields(cls, data, "lm_config"))

    def with_(self, **changes) -> LMConfig:
        return replace(self, **changes)


PRESETS: dict[str, LMConfig] = {
    # tests and smoke runs: trains in seconds
    "tiny": LMConfig(vocab_size=8192, block_size=64, n_layer=2, n_head=2, dim=64, n_experts=4,
                     n_activated_experts=2, moe_inter_dim=128, dense_inter_dim=256),
    # the demo and the 10-minute CPU quality target
    "small": LMConfig(vocab_size=8192, block_size=128, n_layer=4, n_head=4, dim=192, n_experts=8,
                      n_activated_experts=2, moe_inter_dim=384, dense_inter_dim=768),
    # needs a GPU or patience
    "base": LMConfig(vocab_size=8192, block_size=512, n_layer=8, n_head=8, dim=512, n_experts=16,
                     n_activated_experts=2, moe_inter_dim=1024, n_shared_experts=1, dense_inter_dim=2048),
}


def preset(name: str, **overrides) -> LMConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].with_(**overrides)
