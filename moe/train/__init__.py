"""Training of the MoE LM: schedule, loop, evaluation, checkpoints and the metrics file.

    from moe.train import Trainer, TrainConfig
    Trainer(model, corpus, TrainConfig(steps=500), "runs/tiny").train()

The command line (`moe train`) builds the model and corpus and hands them to `Trainer`.
"""

from moe.train.checkpoint import CheckpointError, load_lm, load_tokenizer, resolve_checkpoint, save_checkpoint
from moe.train.config import PRESET_TRAIN_DEFAULTS, TrainConfig
from moe.train.evaluate import bits_per_byte, evaluate
from moe.train.metrics_log import METRICS_FILE, MetricsLog, read_metrics
from moe.train.schedule import lr_at

__all__ = [
    "METRICS_FILE",
    "PRESET_TRAIN_DEFAULTS",
    "CheckpointError",
    "MetricsLog",
    "TrainConfig",
    "Trainer",
    "bits_per_byte",
    "evaluate",
    "load_lm",
    "load_tokenizer",
    "lr_at",
    "read_metrics",
    "resolve_checkpoint",
    "save_checkpoint",
]


def __getattr__(name):
    # The trainer needs moe.data (tokenizers); loading a checkpoint for generation does not.
    if name == "Trainer":
        from moe.train.trainer import Trainer
        return Trainer
    raise AttributeError(f"module 'moe.train' has no attribute {name!r}")
