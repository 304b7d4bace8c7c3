"""Training with remote experts: the router owns the trunk, the experts own their weights.

    python -m services.router init  --preset small --out runs/demo/init     # step-0 checkpoint + expert file
    (start expert services with EXPERT_CHECKPOINT=runs/demo/init/experts.safetensors)
    python -m services.router train --init runs/demo/init --out runs/demo   # trains through the registry

`init` builds the whole model in process once, so the trunk (router) and the experts
(services) start from the very weights an in-process run would start from; with fp32 on
the wire, remote training then follows the in-process loss curve.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch

from moe import MoELM
from moe.config import LMConfig, preset
from moe.data import CorpusConfig, build_corpus
from moe.train import TrainConfig
from moe.train.checkpoint import read_config, resolve_checkpoint, save_checkpoint
from moe.train.trainer import Trainer
from services.router.config import RouterConfig
from services.router.remote_model import (
    RemoteParts,
    build_remote_lm,
    export_expert_weights,
    load_trunk,
    required_expert_uids,
)
from services.router.tracing import ExpertCallTracer
from services.router.trunk_publisher import TrunkSnapshots, trunk_files

log = logging.getLogger(__name__)
EXPERTS_FILE = "experts.safetensors"


def prepare_initial_checkpoint(out: str | Path, preset_name: str, train_cfg: TrainConfig, corpus_cfg: CorpusConfig,
                               seed: int = 0, progress=None, **lm_overrides) -> tuple[Path, Path, LMConfig]:
    """Write a step-0 checkpoint of a freshly initialized model, and its routed experts as an
    expert weight file beside it. Returns (checkpoint dir, expert file, LMConfig)."""
    out = Path(out)
    corpus = build_corpus(corpus_cfg, progress=progress)
    lm_cfg = preset(preset_name, vocab_size=corpus.vocab_size, **lm_overrides)
    torch.manual_seed(seed)
    model = MoELM(lm_cfg)
    config = {"lm_config": lm_cfg.to_dict(), "train_config": train_cfg.to_dict(),
              "corpus_config": dataclasses.asdict(corpus_cfg), "domains": list(corpus.domains),
              "vocab_size": corpus.vocab_size, "eos_id": corpus.eos_id}
    ckpt = save_checkpoint(out, 0, model, config, tokenizer_path=corpus.tokenizer_path, keep=1)
    experts_file = out / EXPERTS_FILE
    export_expert_weights(model, experts_file)
    return ckpt, experts_file, lm_cfg


def wait_for_experts(parts: RemoteParts, uids: list[str], timeout_s: float) -> None:
    """Block until every uid has a replica in the registry; RuntimeError naming the missing ones."""
    deadline = time.monotonic() + timeout_s
    while True:
        parts.replicas.refresh()
        missing = [uid for uid in uids if not parts.replicas.replicas(uid)]
        if not missing:
            return
        if time.monotonic() > deadline:
            how = ("EXPERT_UIDS and EXPERT_SERVE_ON_CHAIN=1 (this router finds them on the chain)"
                   if parts.discovery == "chain" else "EXPERT_UIDS and REDIS_URL")
            raise RuntimeError(f"no expert service registered {len(missing)} of the {len(uids)} experts the "
                               f"model needs (e.g. {', '.join(missing[:6])}) within {timeout_s:.0f}s; start "
                               f"services hosting them with {how}")
        time.sleep(0.2)


class RemoteTrainer(Trainer):
    """The Trainer, plus the router's Prometheus gauges after every step, and trunk snapshots
    for the round publisher taken between steps (`snapshots`, set when S3 is configured)."""

    def __init__(self, *args, metrics, tracer: ExpertCallTracer | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.router_metrics = metrics
        self.tracer = tracer or ExpertCallTracer()
        self.snapshots: TrunkSnapshots | None = None

    def enable_snapshots(self) -> TrunkSnapshots:
        self.snapshots = TrunkSnapshots(lambda: trunk_files(self.model, self._config(), self.step,
                                                            self.corpus.tokenizer_path))
        return self.snapshots

    def train_step(self) -> float:
        started = time.perf_counter()
        if self.snapshots is None:
            loss = self._traced_step()
        else:
            with self.snapshots.step_lock:  # a round's snapshot waits for this step, never the reverse
                loss = self._traced_step()
        tokens = self.cfg.batch_size * self.model.cfg.block_size
        self.router_metrics.training_loss.set(loss)
        self.router_metrics.tokens_per_second.set(tokens / max(time.perf_counter() - started, 1e-9))
        return loss

    def _evaluate_and_save(self) -> dict:
        with self.tracer.evaluation(self.step) as span:
            row = super()._evaluate_and_save()
            span.set_attribute("moe.val_loss", row["val_loss"])
        return row

    def _traced_step(self) -> float:
        """One step under its root span (inside the snapshot lock: the span times the step, not the wait)."""
        with self.tracer.training_step(self.step, self.lr_for(self.step)) as span:
            loss = super().train_step()
            span.set_attribute("moe.loss", loss)
        return loss


def build_remote_trainer(init: str | Path, out: str | Path, config: RouterConfig, *,
                         train_cfg: TrainConfig | None = None, wait_s: float = 60.0, progress: bool = True,
                         parts: RemoteParts | None = None):
    """(trainer, parts, corpus) for a run whose experts are remote, starting from `init`."""
    ckpt = resolve_checkpoint(init)
    saved = read_config(ckpt)
    lm_cfg = LMConfig.from_dict(saved["lm_config"])
    corpus_cfg = CorpusConfig.from_dict(saved["corpus_config"])
    train_cfg = train_cfg or TrainConfig.from_dict(saved["train_config"])
    corpus = build_corpus(corpus_cfg)
    parts = parts or RemoteParts.connect(config)
    wait_for_experts(parts, required_expert_uids(lm_cfg), wait_s)
    model = build_remote_lm(lm_cfg, parts, config)
    load_trunk(model, ckpt)
    trainer = RemoteTrainer(model, corpus, train_cfg, out, corpus_config=corpus_cfg, progress=progress,
                            metrics=parts.metrics, tracer=parts.tracer)
    return trainer, parts, corpus
