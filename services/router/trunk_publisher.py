"""The router's checkpoint each round: the trunk (everything but the routed experts) in S3.

A published trunk is a complete `moe` checkpoint directory without the training state:

    checkpoints/trunk/<round>/model.safetensors   trunk and gate weights
                             /config.json         LMConfig, corpus settings, step
                             /tokenizer.json
                             /manifest.json       sha256 of each, signed by the router's hotkey

so `ROUTER_CHECKPOINT=s3://<bucket>/checkpoints/trunk/<round>` (see `fetch_trunk`) loads it
like a local checkpoint.

The snapshot is taken on the thread that trains, between two optimizer steps, so it never
holds half of a step: the round participant's thread asks (`TrunkSnapshots.request`), the
training loop answers at its next step boundary (`serve_pending`). When nothing trains
(`serve` mode) the request is answered at once under the model lock.
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
    """Hands a consistent snapshot from the training thread to a publishing thread."""

    def __init__(self, take: Callable[[], Files], lock: threading.Lock | None = None):
        """`take` builds the files; `lock` (the serving model lock) guards a snapshot taken
        when no training loop is running."""
        self._take = take
        self._lock = lock or threading.Lock()
        self._cond = threading.Condition()
        self._pending = False
        self._result: Files | BaseException | None = None
        self.training = False  # set by the training loop while it runs

    def request(self, timeout_s: float = 120.0) -> Files:
        if not self.training:
            with self._lock:
                return self._take()
        with self._cond:
            self._pending, self._result = True, None
            if not self._cond.wait_for(lambda: self._result is not None or not self.training, timeout_s):
                self._pending = False
                raise TimeoutError(f"the training loop did not reach a step boundary within {timeout_s:.0f} s")
            result, self._result, self._pending = self._result, None, False
        if result is None:  # training ended while we waited: take it directly
            with self._lock:
                return self._take()
        if isinstance(result, BaseException):
            raise result
        return result

    def serve_pending(self) -> None:
        """Called by the training loop between steps: answer a waiting request, if any."""
        with self._cond:
            if not self._pending or self._result is not None:
                return
            try:
                self._result = self._take()
            except Exception as e:  # reported to the requester, never to the training loop
                self._result = e
            self._cond.notify_all()

    def training_stopped(self) -> None:
        with self._cond:
            self.training = False
            self._cond.notify_all()


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
