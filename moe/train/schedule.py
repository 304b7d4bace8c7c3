"""Learning-rate schedule: linear warmup, then cosine decay to a floor. A pure function of the step."""

from __future__ import annotations

import math


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step `step` (0-based).

    - warmup: steps 0..warmup_steps-1 ramp linearly to the peak, (step + 1) / warmup_steps * peak,
      so step 0 already moves the weights and the last warmup step uses the peak;
    - decay: from the peak at step `warmup_steps` along a half cosine to min_lr_ratio * peak at
      step `total_steps`;
    - after `total_steps` (a run extended on resume) the rate stays at the floor.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if peak_lr <= 0 or warmup_steps < 0 or total_steps < 0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"bad schedule: peak_lr={peak_lr}, warmup_steps={warmup_steps}, "
                         f"total_steps={total_steps}, min_lr_ratio={min_lr_ratio}")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    floor = peak_lr * min_lr_ratio
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0 or step >= total_steps:
        return floor
    progress = (step - warmup_steps) / decay_steps                 # 0 at the peak, -> 1 at the end
    return floor + 0.5 * (peak_lr - floor) * (1.0 + math.cos(math.pi * progress))
