"""The merge phase: the next global version from the round's best verified replicas.

Per routed expert uid: the verified, non-copy results of the round that published it, ranked
by score (the scorer's `moe:scores:round:<round>` when it wrote one, else loss_delta); the
top MERGE_TOP_K with a positive score are averaged, weighted by score, and the global expert
takes one outer Nesterov step towards that average (services/validator/outer_step.py). An
expert without such a replica stays as it is. The trunk is the router's trunk revealed this
round (verified, signed by a trusted hotkey), else the previous version's.

The outer momentum is kept per expert in memory and in VALIDATOR_RUN_DIR, so a restarted
validator continues the same optimizer; it is saved only after the version is published.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moe.train.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from services.validator.global_model import (
    ExpertStates,
    GlobalModel,
    build_model,
    publish_global_version,
    trunk_config,
    trunk_only,
)
from services.validator.outer_step import nesterov_step, select_replicas, weighted_average
from services.validator.submissions import Submission, load_trunk
from subnet.checkpoints import PublishedCheckpoint
from subnet.expert_weights import CheckpointError, expert_weights_bytes, load_expert_weights
from subnet.manifest import CheckpointVerificationError
from subnet.object_store import ObjectNotFoundError
from subnet.validation_results import ValidationResult

log = logging.getLogger(__name__)
MOMENTUM_FILE = "outer_momentum.safetensors"


class MomentumStore:
    """The outer optimizer's momentum, {uid: state}, in one file (expert weight format)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / MOMENTUM_FILE

    def load(self) -> ExpertStates:
        if not self.path.exists():
            return {}
        try:
            return load_expert_weights(self.path)
        except CheckpointError as e:  # a corrupt file costs the momentum, not the validator
            log.warning("outer momentum in %s is unreadable (%s); starting from zero", self.path, e)
            return {}

    def save(self, momentum: ExpertStates) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(expert_weights_bytes(momentum))
        os.replace(tmp, self.path)


def replica_scores(results: Mapping[str, ValidationResult],
                   scores: Mapping[str, float] | None) -> dict[str, dict[str, float]]:
    """{uid: {hotkey: score}} of every result that may be merged: verified, no reason, not a copy,
    a finite score (the scorer's when given, else loss_delta)."""
    out: dict[str, dict[str, float]] = {}
    for hotkey, r in results.items():
        if r.zero or r.copy_of:
            continue
        score = r.loss_delta if scores is None else scores.get(hotkey, math.nan)
        if not math.isfinite(score):
            continue
        for uid in r.experts:
            out.setdefault(uid, {})[hotkey] = float(score)
    return out


@dataclass
class MergeOutcome:
    round: int
    parent_version: int
    merged: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # uid -> [(hotkey, weight)]
    trunk_from: str = ""                    # hotkey whose trunk was taken; "" = the previous version's
    experts: ExpertStates = field(default_factory=dict)
    trunk_files: dict[str, bytes] = field(default_factory=dict)
    model: object = None                    # the merged MoELM (eval mode)
    published: PublishedCheckpoint | None = None


class Merger:
    """Builds and publishes global version v + 1. Not thread-safe: one merge at a time."""

    def __init__(self, store, identity, run_dir: str | Path, top_k: int, outer_lr: float, momentum: float):
        self.store, self.identity = store, identity
        self.top_k, self.outer_lr, self.mu = top_k, outer_lr, momentum
        self.momentum_store = MomentumStore(run_dir)
        self.momentum = self.momentum_store.load()

    def merge(self, glob: GlobalModel, round: int, results: Mapping[str, ValidationResult],
              scores: Mapping[str, float] | None, miners: Mapping[str, Submission], trunks: Sequence[Submission],
              trunk_signers: Collection[str], states_of: Callable[[Submission], ExpertStates]) -> MergeOutcome:
        """Publish version glob.version + 1 for `round` (`outcome.published`), unless no expert had a
        replica to merge and no new trunk came (then nothing is published). `miners` maps hotkey ->
        its submission, `states_of(sub)` gives its verified expert states. PublishError if another
        validator published that version first."""
        outcome = MergeOutcome(round=round, parent_version=glob.version)
        experts = {uid: dict(state) for uid, state in glob.experts.items()}
        momentum = dict(self.momentum)
        for uid, by_hotkey in sorted(replica_scores(results, scores).items()):
            if uid not in experts:
                continue
            chosen = select_replicas(by_hotkey, self.top_k)
            states, used = [], []
            for hotkey, weight in chosen:
                try:
                    states.append(states_of(miners[hotkey])[uid])
                    used.append((hotkey, weight))
                except (KeyError, CheckpointVerificationError) as e:  # validated, then gone or changed
                    log.warning("merge of round %d: replica %s of %s left out: %s", round, hotkey, uid, e)
            if not states:
                continue
            total = sum(w for _, w in used)
            used = [(h, w / total) for h, w in used]
            average = weighted_average(states, [w for _, w in used])
            experts[uid], momentum[uid] = nesterov_step(experts[uid], average, self.momentum.get(uid),
                                                        self.outer_lr, self.mu)
            outcome.merged[uid] = used
        outcome.experts = experts
        outcome.trunk_files, outcome.trunk_from = self.round_trunk(glob, trunks, trunk_signers)
        if not outcome.merged and not outcome.trunk_from:
            return outcome  # nothing changed: no new version
        outcome.model = build_model(glob.lm_cfg, outcome.trunk_files[WEIGHTS_FILE], experts,
                                    f"merged global version {glob.version + 1}")
        outcome.published = publish_global_version(self.store, self.identity, version=glob.version + 1, round=round,
                                                   parent_version=glob.version, trunk_files=outcome.trunk_files,
                                                   experts=experts)
        self.momentum = momentum
        self.momentum_store.save(momentum)
        return outcome

    def round_trunk(self, glob: GlobalModel, trunks: Sequence[Submission],
               trusted: Collection[str]) -> tuple[dict[str, bytes], str]:
        """The first revealed trunk that verifies and fits, else the previous version's files."""
        for sub in trunks:
            try:
                verified = load_trunk(self.store, sub, glob.config["lm_config"], trusted)
                files = dict(verified.files)
                if WEIGHTS_FILE not in files:
                    raise CheckpointVerificationError(f"{verified.manifest_key} has no {WEIGHTS_FILE}")
                files[WEIGHTS_FILE] = trunk_only(files[WEIGHTS_FILE], verified.manifest_key)
                config = trunk_config(files, verified.manifest_key)
                if config["lm_config"] != glob.config["lm_config"]:
                    raise CheckpointVerificationError(f"{verified.manifest_key} is for another model shape")
                if _data_of(config) != _data_of(glob.config):  # the validation data would change under us
                    raise CheckpointVerificationError(f"{verified.manifest_key} was trained on other corpus settings")
                files.setdefault(TOKENIZER_FILE, glob.files.get(TOKENIZER_FILE, b""))
                build_model(glob.lm_cfg, files[WEIGHTS_FILE], glob.experts, verified.manifest_key)
                return {n: files[n] for n in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE) if files.get(n)}, sub.hotkey
            except (CheckpointVerificationError, ObjectNotFoundError) as e:
                log.warning("trunk of %s for round %d not used: %s", sub.hotkey, sub.round, e)
        return dict(glob.files), ""


def _data_of(config: Mapping) -> dict:
    """The corpus settings that decide the validation split (where it is cached does not)."""
    return {k: v for k, v in (config.get("corpus_config") or {}).items() if k != "cache_dir"}
