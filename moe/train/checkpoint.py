"""Checkpoints on disk: weights, configs, training state and tokenizer, written atomically.

Layout of a run directory:

    RUN/checkpoints/step-00000200/model.safetensors   local weights (tied tensors stored once)
                                 /config.json         LMConfig, TrainConfig, CorpusConfig, step
                                 /train_state.pt      optimizer, sampler, RNG, counters
                                 /tokenizer.json      copy of the corpus tokenizer
    RUN/checkpoints/latest                            name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place, then
`latest` is replaced (os.replace) to point at it: a crash at any moment leaves either the
old or the new checkpoint, never half of one. `train_state.pt` holds only tensors and plain
data, so it is read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "moe-checkpoint/1"


class CheckpointError(ValueError):
    """A path that is not a usable checkpoint; the message says what is missing."""


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: torch.nn.Module, config: dict,
                    train_state: dict | None = None, tokenizer_path: str | os.PathLike | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoint `step` of `model` under RUN/checkpoints/ and point `latest` at it.

    `config` is the JSON-able description (lm_config at least); `train_state` is what a
    resume needs beyond the weights. Keeps the newest `keep` checkpoints.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
    try:
        save_model(model, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "step": str(step)})
        (tmp / CONFIG_FILE).write_text(json.dumps({"format": FORMAT, "step": step, **config}, indent=2) + "\n")
        if train_state is not None:
            torch.save(train_state, tmp / STATE_FILE)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        for f in tmp.iterdir():
            _fsync_file(f)
        final = root / name
        if final.exists():                       # the same step saved twice (e.g. an interrupt at an eval step)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    pointer = root / f".{LATEST_FILE}.tmp"
    pointer.write_text(name + "\n")
    _fsync_file(pointer)
    os.replace(pointer, root / LATEST_FILE)
    _prune(root, keep, newest=name)
    return final


def _prune(root: Path, keep: int, newest: str) -> None:
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name != newest)
    for old in done[:max(0, len(done) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.iterdir():                  # temporaries of a writer that crashed
        if stale.is_dir() and stale.name.startswith(".step-"):
            shutil.rmtree(stale, ignore_errors=True)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory, or a run directory (-> its latest checkpoint); CheckpointError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {str(path)!r} does not exist")
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return path
    pointer = path / CHECKPOINTS_DIR / LATEST_FILE
    if pointer.is_file():
        ckpt = path / CHECKPOINTS_DIR / pointer.read_text().strip()
        if (ckpt / CONFIG_FILE).is_file() and (ckpt / WEIGHTS_FILE).is_file():
            return ckpt
        raise CheckpointError(f"{pointer} points at {ckpt.name!r}, which is not a complete checkpoint")
    raise CheckpointError(f"{str(path)!r} is not a checkpoint: it has neither {CONFIG_FILE} + {WEIGHTS_FILE} "
                          f"nor {CHECKPOINTS_DIR}/{LATEST_FILE}")


def read_config(ckpt: str | os.PathLike) -> dict:
    ckpt = Path(ckpt)
    try:
        config = json.loads((ckpt / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {ckpt / CONFIG_FILE}: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or not isinstance(config.get("lm_config"), dict):
        raise CheckpointError(f"{ckpt / CONFIG_FILE} is not a {FORMAT} config")
    return config


def load_weights(model: torch.nn.Module, ckpt: str | os.PathLike, skip=None) -> None:
    """Load this process's weights into `model` (shapes and names must match exactly).

    `skip(name)` marks checkpoint entries the model is expected not to have (a router's model
    has no in-process routed experts); every other mismatch is a CheckpointError.
    """
    path = Path(ckpt) / WEIGHTS_FILE
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); save the checkpoint again") from None
    except RuntimeError as e:   # load_state_dict: a tensor of another shape
        raise CheckpointError(f"weights in {ckpt} do not fit the model: {str(e).splitlines()[-1].strip()}") from None
    if skip is not None:
        unexpected = [name for name in unexpected if not skip(name)]
    if missing or unexpected:
        raise CheckpointError(f"weights in {ckpt} do not fit the model: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")


def load_train_state(ckpt: str | os.PathLike) -> dict:
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no {STATE_FILE}: it was saved without training state, "
                              "so it cannot be resumed")
    return torch.load(path, weights_only=True)


def load_lm(ckpt: str | os.PathLike, expert_groups=None):
    """(model, config dict) from a checkpoint; the model is in eval mode."""
    from moe.config import LMConfig
    from moe.lm import MoELM

    ckpt = resolve_checkpoint(ckpt)
    config = read_config(ckpt)
    model = MoELM(LMConfig.from_dict(config["lm_config"]), expert_groups=expert_groups)
    load_weights(model, ckpt)
    model.eval()
    return model, config


def load_tokenizer(ckpt: str | os.PathLike):
    """The tokenizer saved with the checkpoint (encode / decode / vocab_size / eos_id)."""
    from moe.data import Corpus

    path = resolve_checkpoint(ckpt) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {TOKENIZER_FILE}; it cannot turn text into tokens")
    return Corpus.load_tokenizer(path)
