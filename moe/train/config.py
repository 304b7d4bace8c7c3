"""What a training run is asked to do: `TrainConfig`, plus the per-preset defaults the CLI uses."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from moe.boundary import OptimizerSettings
from moe.config import checked_fields

MAX_SEED = 2**32   # numpy's and the data loader's seeds are below this


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Every field is plain data so it round-trips through config.json."""

    steps: int = 0                 # optimizer steps (the cosine horizon); 0 = run until `minutes` is spent
    minutes: float = 0.0           # wall-clock budget including evaluation; 0 = none. With steps, first wins
    batch_size: int = 32           # sequences per step; the context length comes from the LMConfig
    lr: float = 1e-3               # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1      # cosine decays to 10% of the peak, not to 0: the tail still learns
    warmup_steps: int = 50         # linear warmup; keeps Adam's early, noisy second moments from blowing up
    weight_decay: float = 0.1      # applied to 2-D weights only (see MoELM.configure_optimizer)
    beta1: float = 0.9
    beta2: float = 0.95            # 0.95 rather than 0.999: reacts faster to loss spikes (GPT-3 habit)
    eps: float = 1e-8
    grad_clip: float = 1.0         # max global gradient norm, remote experts included; 0 = off
    eval_every: int = 100          # steps between evaluations (also checkpoints and metrics rows)
    eval_batches: int = 8          # validation batches per domain; fixed batches so curves are comparable
    keep_checkpoints: int = 2      # newest checkpoints kept on disk; older ones are deleted
    seed: int = 0                  # batch order; the model's init is seeded by whoever builds it

    def __post_init__(self):
        checks = [
            (self.steps >= 0, f"steps must be >= 0, got {self.steps}"),
            (self.minutes >= 0 and math.isfinite(self.minutes), f"minutes must be >= 0, got {self.minutes}"),
            (self.steps > 0 or self.minutes > 0, "give a step count (steps > 0) or a time budget (minutes > 0)"),
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}"),
            (self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0, "beta1 and beta2 must be in [0, 1)"),
            (self.eps > 0, f"eps must be positive, got {self.eps}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}"),
            (self.eval_every > 0, f"eval_every must be positive, got {self.eval_every}"),
            (self.eval_batches > 0, f"eval_batches must be positive, got {self.eval_batches}"),
            (self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}"),
            (0 <= self.seed < MAX_SEED, f"seed must be in [0, 2**32), got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def optimizer_settings(self) -> OptimizerSettings:
        """The AdamW settings shared with experts that own their optimizer state."""
        return OptimizerSettings(weight_decay=self.weight_decay, beta1=self.beta1, beta2=self.beta2, eps=self.eps)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return cls(**checked_fields(cls, data, "train_config"))

    def with_(self, **changes) -> TrainConfig:
        return replace(self, **changes)


# Defaults per model preset, used by `moe train` where the command line is silent. Smaller
# models tolerate (and need) larger learning rates; the base model wants a longer warmup.
PRESET_TRAIN_DEFAULTS: dict[str, dict] = {
    "tiny": {"lr": 3e-3, "batch_size": 32, "warmup_steps": 30},
    "small": {"lr": 2e-3, "batch_size": 32, "warmup_steps": 100},
    "base": {"lr": 6e-4, "batch_size": 16, "warmup_steps": 300},
}
