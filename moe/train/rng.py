"""Capture and restore every random generator a training step may touch (python, numpy, torch).

The captured state holds only tensors, lists and numbers, so `torch.load(weights_only=True)`
reads it back: a checkpoint never needs pickle's arbitrary-code loading.
"""

from __future__ import annotations

import random
from contextlib import contextmanager

import numpy as np
import torch


def capture_rng_state() -> dict:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss},
    }


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


@contextmanager
def preserved_rng():
    """Run a block (evaluation, a plot) without moving any generator the training loop uses."""
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)
