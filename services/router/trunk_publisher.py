"""The router's checkpoint each round: the trunk (everything but the routed experts) in S3.

A published trunk is a complete `moe` checkpoint directory without the training state:

    checkpoints/trunk/<round>/model.safetensors   trunk and gate weights
                             /config.json         LMConfig, corpus settings, step
                             /tokenizer.json
                             /manifest.json       sha256 of each, signed by the router's hotkey

so `ROUTER_CHECKPOINT=s3://<bucket>/checkpoints/trunk/<round>` (see `fetch_trunk`) loads it
like a local checkpoint.

The snapshot is taken between two optimizer steps, so it never holds half of a step: the
round participant's thread asks (`TrunkSnapshots.request`) and gets the weights as soon as
the step in progress, if any, is done.
"""

from __future__ import annotations

import json
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from moe.train.checkpoint import CONFIG_FILE, FORMAT, TOKENIZER_FILE, WEIGHTS_FILE
from subnet.checkpoint_loading import parse_s3_url, read_checkpoint_url
from subnet.checkpoints import publish_checkpoint
from subnet.manifest import config_hash
from subnet.object_store import ObjectStore

Files = dict[str, bytes]


def trunk_files(model, config: dict, step: int, tokenizer_path: str | Path | None) -> Files:
    """The files of a trunk checkpoint of `model` as it is now (call between steps)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="trunk-") as tmp:
        path = Path(tmp) / WEIGHTS_FILE
        save_model(model, str(path), metadata={"format": "pt", "step": str(step)})
        files = {WEIGHTS_FILE: path.read_bytes()}
    files[CONFIG_FILE] = (json.dumps({"format": FORMAT, "step": step, **config}, indent=2) + "\n").encode()
    if tokenizer_path is not None:
        files[TOKENIZER_FILE] = Path(tokenizer_path).read_bytes()
    return files


def trunk_config_hash(lm_config: dict) -> str:
    """What a trunk checkpoint is compatible with: the LM's shape, nothing about training."""
    return config_hash({"kind": "trunk", "lm_config": lm_config})


class TrunkSnapshots:
    """Consistent snapshots of a model that a training loop updates in another thread.

    The loop holds `step_lock` while it runs an optimizer step (`RemoteTrainer.train_step`);
    a snapshot takes the same lock, so it waits for at most one step (never for an
    evaluation, which does not change the weights) and never sees half of one.
    """

    def __init__(self, take: Callable[[], Files]):
        self._take = take
        self.step_lock = threading.Lock()

    def request(self, timeout_s: float = 120.0) -> Files:
        if not self.step_lock.acquire(timeout=timeout_s):
            raise TimeoutError(f"the training loop did not finish its step within {timeout_s:.0f} s")
        try:
            return self._take()
        finally:
            self.step_lock.release()


def publish_trunk_round(store: ObjectStore, identity, snapshots: TrunkSnapshots, lm_config: dict,
                        round: int, parent_version: int | None = None) -> str:
    """Snapshot, upload and sign the trunk for `round`; returns the reveal data (JSON naming
    the manifest's key and sha256)."""
    files = snapshots.request()
    published = publish_checkpoint(store, identity, kind="trunk", files=files, round=round,
                                   parent_version=parent_version, config_hash=trunk_config_hash(lm_config))
    return json.dumps({"trunk": {"key": published.manifest_key, "sha256": published.manifest_sha256}},
                      sort_keys=True, separators=(",", ":"))


def fetch_trunk(url: str, store: ObjectStore, out_dir: str | Path, trusted_hotkeys) -> Path:
    """Download a verified trunk checkpoint (`s3://bucket/checkpoints/trunk/<round>` or a global
    version) into `out_dir`, so the usual checkpoint loader reads it. Nothing unverified is written."""
    parse_s3_url(url)  # a clear error for a malformed URL before any request
    verified = read_checkpoint_url(url, store, trusted_hotkeys=trusted_hotkeys)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = [name for name in (WEIGHTS_FILE, CONFIG_FILE) if name not in verified.files]
    if missing:
        raise ValueError(f"{url} is not a trunk checkpoint: it lacks {', '.join(missing)}")
    for name, data in verified.files.items():
        (out / name).write_bytes(data)
    return out
