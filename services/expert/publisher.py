"""An expert service's checkpoints in S3: every round (committed) and on a timer (recovery).

    checkpoints/experts/<uid>/<hotkey>/<round>/weights.safetensors + manifest.json

Round checkpoints: in the commit phase of round r the service publishes each hosted expert
under round r and commits `sha256(reveal data)`, where the reveal data names each manifest's
sha256 (`{"0.1": "<sha256>", ...}`); validators fetch by the layout and check the sha256.

Timer checkpoints (`EXPERT_CHECKPOINT_EVERY_S`) bound what a SIGKILL loses. They go to the
round that is still open for commitment: r while r trains, r + 1 once r's commit phase has
begun, so a committed checkpoint is never overwritten (the commit-phase publish of r + 1
replaces the timer's). On start-up `latest_own_round` finds the newest one this hotkey
signed, and the service resumes from it (optimizer moments are not saved: Adam restarts).

Snapshots run on the compute worker, the only thread that touches the weights, so a
checkpoint never holds half of an optimizer step.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping

import torch

from subnet.checkpoints import checkpoint_prefix, publish_experts, read_verified
from subnet.manifest import MANIFEST_NAME, config_hash
from subnet.object_store import ObjectStore, StoreError
from subnet.rounds import RoundSchedule

log = logging.getLogger(__name__)
ExpertStates = dict[str, dict[str, torch.Tensor]]


def expert_config_hash(dim: int, inter_dim: int) -> str:
    """What an expert checkpoint is compatible with: the SwiGLU's shape."""
    return config_hash({"kind": "expert", "dim": dim, "inter_dim": inter_dim, "activation": "swiglu"})


def reveal_data(published: Iterable) -> str:
    """The string a service reveals for a round: uid -> manifest sha256, canonical JSON."""
    return json.dumps({p.manifest.uid: p.manifest_sha256 for p in published}, sort_keys=True, separators=(",", ":"))


def open_round(schedule: RoundSchedule, block: int) -> int:
    """The round whose commitment is still ahead at `block`: where a timer checkpoint may go."""
    now = schedule.at(block)
    return now.round if now.phase == "train" else now.round + 1


class ExpertPublisher:
    """Uploads snapshots of the hosted experts. Thread-safe: one upload at a time."""

    def __init__(self, store: ObjectStore, identity, snapshot: Callable[[], ExpertStates], dim: int, inter_dim: int,
                 parent_version: Callable[[], int | None] = lambda: None,
                 on_published: Callable[[int, list], None] | None = None):
        self.store, self.identity, self.snapshot = store, identity, snapshot
        self.config_hash = expert_config_hash(dim, inter_dim)
        self.parent_version = parent_version
        self.on_published = on_published
        self._lock = threading.Lock()

    def publish(self, round: int) -> str:
        """Snapshot and publish every hosted expert under `round`; returns the reveal data."""
        with self._lock:
            states = self.snapshot()
            published = publish_experts(self.store, self.identity, states, round=round,
                                        parent_version=self.parent_version(), config_hash=self.config_hash)
        if self.on_published is not None:
            self.on_published(round, published)
        return reveal_data(published)


def latest_own_round(store: ObjectStore, uids: Iterable[str], hotkey: str) -> int | None:
    """The newest round under which this hotkey published *every* uid in `uids`, or None."""
    common: set[int] | None = None
    for uid in uids:
        prefix = checkpoint_prefix("expert", uid=uid, hotkey=hotkey, round=0).rsplit("/", 1)[0] + "/"
        rounds = set()
        for key in store.list(prefix):
            part = key[len(prefix):].split("/", 1)[0]
            if part.isdigit() and key.endswith(MANIFEST_NAME):
                rounds.add(int(part))
        common = rounds if common is None else common & rounds
    return max(common) if common else None


def load_own_checkpoint(store: ObjectStore, uids: Iterable[str], hotkey: str, dim: int,
                        inter_dim: int) -> tuple[int, Mapping[str, object], int | None] | None:
    """(round, {uid: SwiGLU}, parent global version) from this hotkey's newest complete checkpoint,
    verified; None if there is none. A checkpoint that fails verification is an error, not
    silently skipped."""
    from subnet.checkpoint_loading import load_verified_experts
    from subnet.expert_weights import experts_from_states

    uids = list(uids)
    try:
        round = latest_own_round(store, uids, hotkey)
    except StoreError as e:
        log.warning("cannot list own checkpoints (%s); starting without them", e)
        return None
    if round is None:
        return None
    states: ExpertStates = {}
    parent = None
    for uid in uids:
        key = f"{checkpoint_prefix('expert', uid=uid, hotkey=hotkey, round=round)}/{MANIFEST_NAME}"
        verified = read_verified(store, key, expected_hotkey=hotkey,
                                 expected_config_hash=expert_config_hash(dim, inter_dim))
        states.update(load_verified_experts(verified, [uid], dim, inter_dim))
        parent = verified.manifest.parent_version
    experts = experts_from_states(states, uids, dim, inter_dim, source=f"own checkpoints of round {round}")
    return round, experts, parent
