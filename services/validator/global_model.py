"""The global model: what one version in S3 holds, and the same model in this process.

    checkpoints/global/<version>/model.safetensors   the trunk (no routed experts), as the router publishes it
                                /config.json         LMConfig, corpus settings (as the router publishes it)
                                /tokenizer.json
                                /experts.safetensors every routed expert (subnet/expert_weights.py format)
                                /manifest.json       signed by a validator; `latest` points at the newest

    bootstrap_global(store, identity, "runs/x/init")      # version 0 from `router init`, unless one exists
    glob = read_global(store, trusted_hotkeys)            # the latest version, verified
    glob.model                                            # MoELM with in-process experts, eval mode

Expert services start from `s3://<bucket>/checkpoints/global/latest` (their experts) and a
router from the same URL (its trunk): one version serves both.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from moe import MoELM
from moe.config import LMConfig
from moe.data import Corpus, CorpusConfig, build_corpus
from moe.experts import ROUTED_EXPERT_KEY, expert_uid, parse_expert_uid
from moe.train.checkpoint import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, read_config, resolve_checkpoint
from subnet.checkpoint_loading import InvalidWeightsError, load_verified_experts
from subnet.checkpoints import (
    GLOBAL_EXPERTS_FILE,
    PublishedCheckpoint,
    VerifiedCheckpoint,
    checkpoint_prefix,
    latest_global_version,
    publish_global,
    read_latest_global,
    read_verified,
)
from subnet.expert_weights import PARAM_NAMES, expert_weights_bytes, parse_expert_weights
from subnet.manifest import MANIFEST_NAME, ConfigMismatchError, config_hash
from subnet.object_store import ObjectStore

TRUNK_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)
ExpertStates = dict[str, dict[str, torch.Tensor]]


def global_config_hash(lm_config: Mapping) -> str:
    """What a global version is compatible with: the whole LM's shape."""
    return config_hash({"kind": "global", "lm_config": dict(lm_config)})


def trunk_only(weights: bytes, source: str) -> bytes:
    """`weights` (a model.safetensors) without routed-expert tensors; unchanged when it has none,
    so a trunk the router published is kept byte for byte."""
    try:
        tensors = load(weights)
    except (SafetensorError, ValueError, OSError) as e:
        raise InvalidWeightsError(f"{source} is not a readable safetensors file: {e}") from None
    if not any(ROUTED_EXPERT_KEY.match(name) for name in tensors):
        return weights
    return save({k: v for k, v in tensors.items() if not ROUTED_EXPERT_KEY.match(k)}, metadata={"format": "pt"})


def set_experts(model: MoELM, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Copy {uid: SwiGLU state} into the model's in-process experts (in place, no_grad)."""
    with torch.no_grad():
        for uid, state in states.items():
            layer, index = parse_expert_uid(uid)
            module = model.blocks[layer].ffn.experts[index]
            for name in PARAM_NAMES:
                module.get_parameter(name).copy_(state[name])


def build_model(lm_cfg: LMConfig, trunk_weights: bytes, experts: ExpertStates, source: str) -> MoELM:
    """An in-process MoELM (eval mode) from trunk weights and every routed expert's state."""
    model = MoELM(lm_cfg)
    want = {expert_uid(layer, i) for layer in lm_cfg.moe_layers() for i in range(lm_cfg.n_experts)}
    if set(experts) != want:
        raise InvalidWeightsError(f"{source}: experts {sorted(set(experts) ^ want)} missing or unknown; the model "
                                  f"needs exactly {len(want)} routed experts")
    try:
        state = load(trunk_weights)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise InvalidWeightsError(f"{source}: trunk weights do not fit the model: {e}") from None
    # A tied tensor (head = embedding) is stored once: the other name counts as loaded.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {p.data_ptr() for name, p in params.items() if name in state}
    missing = [m for m in missing if not ROUTED_EXPERT_KEY.match(m)
               and not (m in params and params[m].data_ptr() in loaded)]
    unexpected = [u for u in unexpected if not ROUTED_EXPERT_KEY.match(u)]
    if missing or unexpected:
        raise InvalidWeightsError(f"{source}: trunk weights do not fit the model: missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}")
    set_experts(model, experts)
    return model.eval()


@dataclasses.dataclass
class GlobalModel:
    """One verified global version and the model built from it. `files` are the trunk files
    as stored (a merge republishes them unchanged when no new trunk comes)."""

    version: int
    round: int
    parent_version: int | None
    files: dict[str, bytes]
    config: dict
    lm_cfg: LMConfig
    experts: ExpertStates
    model: MoELM

    @property
    def uids(self) -> list[str]:
        return sorted(self.experts, key=parse_expert_uid)


def trunk_config(files: Mapping[str, bytes], source: str) -> dict:
    """The parsed config.json of a trunk, checked to hold an lm_config."""
    try:
        config = json.loads(files[CONFIG_FILE])
        LMConfig.from_dict(config["lm_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise InvalidWeightsError(f"{source}: {CONFIG_FILE} is not a model config: {e}") from None
    return config


def load_global(verified: VerifiedCheckpoint) -> GlobalModel:
    """Build the model of a verified global checkpoint; InvalidWeightsError if it is not usable."""
    source = verified.manifest_key
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE, GLOBAL_EXPERTS_FILE) if n not in verified.files]
    if missing:
        raise InvalidWeightsError(f"{source}: a global version needs {', '.join(missing)}")
    config = trunk_config(verified.files, source)
    if verified.manifest.config_hash != global_config_hash(config["lm_config"]):
        raise ConfigMismatchError(f"{source}: manifest config hash does not match its {CONFIG_FILE}")
    lm_cfg = LMConfig.from_dict(config["lm_config"])
    experts = load_verified_experts(verified, None, lm_cfg.dim, lm_cfg.moe_inter_dim)
    files = {n: verified.files[n] for n in TRUNK_FILES if n in verified.files}
    model = build_model(lm_cfg, files[WEIGHTS_FILE], experts, source)
    m = verified.manifest
    return GlobalModel(version=m.version, round=m.round, parent_version=m.parent_version, files=files,
                       config=config, lm_cfg=lm_cfg, experts=experts, model=model)


def read_global(store: ObjectStore, trusted_hotkeys: Collection[str], version: int | None = None) -> GlobalModel:
    """The latest global version (or `version`), verified against `trusted_hotkeys`."""
    if version is None:
        verified = read_latest_global(store, expected_hotkey=trusted_hotkeys)
    else:
        key = f"{checkpoint_prefix('global', version=version)}/{MANIFEST_NAME}"
        verified = read_verified(store, key, expected_hotkey=trusted_hotkeys)
    return load_global(verified)


def publish_global_version(store: ObjectStore, identity, *, version: int, round: int, parent_version: int | None,
                           trunk_files: Mapping[str, bytes], experts: ExpertStates) -> PublishedCheckpoint:
    """Upload trunk files + experts.safetensors as `version`, `latest` last (subnet.checkpoints)."""
    config = trunk_config(trunk_files, f"global version {version}")
    files = {n: bytes(trunk_files[n]) for n in TRUNK_FILES if n in trunk_files}
    files[GLOBAL_EXPERTS_FILE] = expert_weights_bytes(experts)
    return publish_global(store, identity, version=version, files=files, round=round, parent_version=parent_version,
                          config_hash=global_config_hash(config["lm_config"]))


def init_files(init_dir: str | Path) -> tuple[dict[str, bytes], ExpertStates]:
    """Trunk files and expert states of a `router init` output directory (its step-0 checkpoint
    and experts.safetensors beside it)."""
    init_dir = Path(init_dir)
    ckpt = resolve_checkpoint(init_dir)
    read_config(ckpt)  # a CheckpointError now rather than a puzzling one later
    experts_path = init_dir / GLOBAL_EXPERTS_FILE
    if not experts_path.is_file():
        raise FileNotFoundError(f"{experts_path} does not exist: VALIDATOR_INIT_CHECKPOINT must be the output "
                                f"directory of `python -m services.router init`")
    files = {n: (ckpt / n).read_bytes() for n in TRUNK_FILES if (ckpt / n).is_file()}
    files[WEIGHTS_FILE] = trunk_only(files[WEIGHTS_FILE], str(ckpt / WEIGHTS_FILE))
    return files, parse_expert_weights(experts_path.read_bytes(), str(experts_path))


def bootstrap_global(store: ObjectStore, identity, init_dir: str | Path | None) -> int:
    """Publish global version 0 from `init_dir` unless a version exists; returns the latest version.
    The init model is built once first, so a version 0 that does not load is never published."""
    current = latest_global_version(store)
    if current is not None:
        return current
    if not init_dir:
        raise FileNotFoundError(f"{store.where()} holds no global version and VALIDATOR_INIT_CHECKPOINT is empty: "
                                f"set it to a `python -m services.router init` output directory")
    files, experts = init_files(init_dir)
    config = trunk_config(files, str(init_dir))
    build_model(LMConfig.from_dict(config["lm_config"]), files[WEIGHTS_FILE], experts, str(init_dir))
    publish_global_version(store, identity, version=0, round=0, parent_version=None, trunk_files=files,
                           experts=experts)
    return 0


def validation_corpus(config: Mapping, cache_dir: str = "") -> Corpus:
    """The corpus the model was trained on (its config.json's corpus settings; cached on disk)."""
    if not config.get("corpus_config"):
        raise ValueError(f"the global model's {CONFIG_FILE} has no corpus_config: no validation data to use")
    corpus_cfg = CorpusConfig.from_dict(config["corpus_config"])
    if cache_dir:
        corpus_cfg = dataclasses.replace(corpus_cfg, cache_dir=cache_dir)
    corpus = build_corpus(corpus_cfg)
    if corpus.vocab_size != config["lm_config"]["vocab_size"]:
        raise ValueError(f"validation corpus has vocab {corpus.vocab_size}, the model "
                         f"{config['lm_config']['vocab_size']}: not the data it was trained on")
    return corpus
