"""An expert service's checkpoints in S3: every round (committed) and on a timer (recovery).

    checkpoints/experts/<uid>/<hotkey>/<round>/weights.safetensors + manifest.json      (round)
    checkpoints/recovery/<uid>/<hotkey>/weights.safetensors.sealed, optimizer.safetensors.sealed
                                                           + manifest.json            (recovery)

Round checkpoints: in the commit phase of round r the service publishes each hosted expert
under round r and commits `sha256(reveal data)`, where the reveal data names each manifest's
sha256 (`{"0.1": "<sha256>", ...}`); validators fetch by the layout and check the sha256.

Recovery checkpoints (`EXPERT_CHECKPOINT_EVERY_S`, and on SIGTERM) bound what a SIGKILL loses.
They are never put under a round: a snapshot taken while round r trains, left where r's
submissions are looked up, is work anybody could take and commit before its owner does (the
end-to-end copycat did, and scored). Their manifest records the round still open for
commitment when they were taken (r while r trains, r + 1 once r's commit phase has begun), so
on start-up `load_own_checkpoint` can tell which is newer: this hotkey's newest complete round
checkpoint or its recovery checkpoint. A recovery checkpoint also carries each expert's AdamW
moments (subnet/optimizer_moments.py) when the service gives a `recovery_snapshot`, so a
resumed expert takes its next step as if it had never stopped; a round checkpoint carries
weights only (what validators download), so resuming from one restarts Adam. Recovery files
are sealed with a key only this hotkey derives (services/expert/recovery_files.py): they sit
in the bucket while their round trains, and must not be anybody else's to commit.

Snapshots run on the compute worker, the only thread that touches the weights, so a
checkpoint never holds half of an optimizer step.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import torch

from services.expert.recovery_files import open_recovery_files, recovery_key, sealed_recovery_files
from subnet.checkpoints import OPTIMIZER_FILE, checkpoint_prefix, publish_checkpoint, publish_experts, read_verified
from subnet.manifest import MANIFEST_NAME, CheckpointVerificationError, config_hash
from subnet.object_store import ObjectStore, StoreError
from subnet.optimizer_moments import MomentsError, parse_moments
from subnet.rounds import RoundSchedule
from subnet.sealed import SealError

log = logging.getLogger(__name__)
ExpertStates = dict[str, dict[str, torch.Tensor]]
Moments = dict[str, dict[str, torch.Tensor]]   # {uid: AdamW moments}, see subnet/optimizer_moments.py


class OwnCheckpoint(NamedTuple):
    """What a restarting service resumes from (`load_own_checkpoint`)."""
    round: int
    experts: Mapping[str, object]           # {uid: SwiGLU}
    parent_version: int | None              # the global version its weights came from
    moments: Moments                        # the uids whose AdamW moments were saved with them


def expert_config_hash(dim: int, inter_dim: int) -> str:
    """What an expert checkpoint is compatible with: the SwiGLU's shape."""
    return config_hash({"kind": "expert", "dim": dim, "inter_dim": inter_dim, "activation": "swiglu"})


def reveal_data(published: Iterable) -> str:
    """The string a service reveals for a round: uid -> manifest sha256, canonical JSON."""
    return json.dumps({p.manifest.uid: p.manifest_sha256 for p in published}, sort_keys=True, separators=(",", ":"))


def open_round(schedule: RoundSchedule, block: int) -> int:
    """The round whose commitment is still ahead at `block`: what a recovery checkpoint records
    (it is newer than this hotkey's round checkpoints up to the round before)."""
    now = schedule.at(block)
    return now.round if now.phase == "train" else now.round + 1


class ExpertPublisher:
    """Uploads snapshots of the hosted experts. Thread-safe: one upload at a time."""

    def __init__(self, store: ObjectStore, identity, snapshot: Callable[[], ExpertStates], dim: int, inter_dim: int,
                 endpoint: str, parent_version: Callable[[], int | None] = lambda: None,
                 on_published: Callable[[int, list], None] | None = None,
                 on_round_published: Callable[[int, ExpertStates], None] | None = None,
                 recovery_snapshot: Callable[[], tuple[ExpertStates, Moments]] | None = None):
        """`on_round_published(round, states)`: after a round's publish (the one its commitment names),
        with the snapshot published (ExpertBackend.keep_committed keeps it). `recovery_snapshot()`:
        the weights and the AdamW moments taken together (no step between them), for recovery
        checkpoints; without it they hold `snapshot()`'s weights only. `endpoint`: where this service
        answers (its advertised host:port), named in every round manifest: validators probe it there."""
        self.store, self.identity, self.snapshot, self.endpoint = store, identity, snapshot, endpoint
        self.recovery_snapshot = recovery_snapshot
        self.recovery_key = recovery_key(identity)
        self.config_hash = expert_config_hash(dim, inter_dim)
        self.parent_version = parent_version
        self.on_published = on_published
        self.on_round_published = on_round_published
        self._lock = threading.Lock()

    def publish(self, round: int) -> str:
        """Snapshot and publish every hosted expert under `round`; returns the reveal data."""
        published, states = self._publish(round)
        if self.on_round_published is not None:
            self.on_round_published(round, states)
        return reveal_data(published)

    def publish_recovery(self, open_round: int) -> bool:
        """Snapshot every hosted expert into this hotkey's recovery checkpoint (outside the rounds),
        sealed, recording `open_round`, the round still open for commitment. False (nothing
        published) without a key to seal it with."""
        if self.recovery_key is None:
            return False
        with self._lock:
            if self.recovery_snapshot is not None:
                states, moments = self.recovery_snapshot()
            else:
                states, moments = self.snapshot(), {}
            published = []
            for uid in sorted(states):
                prefix = checkpoint_prefix("recovery", uid=uid, hotkey=self.identity.hotkey)
                files = sealed_recovery_files(self.recovery_key, prefix, uid, states[uid], moments.get(uid))
                published.append(publish_checkpoint(
                    self.store, self.identity, kind="recovery", uid=uid, round=open_round,
                    parent_version=self.parent_version(), config_hash=self.config_hash, files=files))
        if self.on_published is not None:
            self.on_published(open_round, published)
        return True

    def _publish(self, round: int) -> tuple[list, ExpertStates]:
        with self._lock:
            states = self.snapshot()
            published = publish_experts(self.store, self.identity, states, round=round,
                                        parent_version=self.parent_version(), config_hash=self.config_hash,
                                        endpoint=self.endpoint)
        if self.on_published is not None:
            self.on_published(round, published)
        return published, states


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
                        inter_dim: int, recovery_key: bytes | None = None) -> OwnCheckpoint | None:
    """This hotkey's newest checkpoint: its newest complete round checkpoint, or its recovery
    checkpoint when that was taken later (while a later round was open; on a tie the round
    checkpoint, published after it). None if there is neither. A round checkpoint (weights only)
    takes the AdamW moments of a recovery checkpoint taken while the same or the previous round was
    open, from the same merged global version. A round checkpoint that fails
    verification is an error, not silently skipped; a recovery checkpoint that does (e.g. a crash
    between its files and its manifest) is passed over with a warning: the round checkpoint is
    still there; so is one that does not open with `recovery_key` (the publisher's, derived from
    the hotkey). Moments that are signed but unreadable are dropped with a warning (Adam restarts
    for that expert; its weights still load)."""
    uids = list(uids)
    try:
        round = latest_own_round(store, uids, hotkey)
    except StoreError as e:
        log.warning("cannot list own checkpoints (%s); starting without them", e)
        return None
    recovery = _own_recovery(store, uids, hotkey, dim, inter_dim, recovery_key)
    if recovery is not None and (round is None or recovery.round > round):
        return recovery
    if round is None:
        return None
    keys = [f"{checkpoint_prefix('expert', uid=uid, hotkey=hotkey, round=round)}/{MANIFEST_NAME}" for uid in uids]
    own = _load_own(store, keys, uids, hotkey, dim, inter_dim, f"own checkpoints of round {round}")
    if recovery is not None and not own.moments and recovery.moments and \
            recovery.parent_version == own.parent_version and recovery.round >= own.round - 1:
        # Round checkpoints carry weights only. The recovery checkpoint's moments were taken at most
        # one recovery interval before these weights, on the same line of descent (no merge between):
        # closer to the truth than zeros, whose first Adam steps are full-size steps of the sign.
        log.info("resuming the AdamW moments of %s from the recovery checkpoint of round %d", ", ".join(
            sorted(recovery.moments)), recovery.round)
        own = own._replace(moments=recovery.moments)
    return own


def _own_recovery(store: ObjectStore, uids: list[str], hotkey: str, dim: int, inter_dim: int, key: bytes | None):
    keys = [f"{checkpoint_prefix('recovery', uid=uid, hotkey=hotkey)}/{MANIFEST_NAME}" for uid in uids]
    try:
        if not all(store.exists(k) for k in keys):
            return None
        return _load_own(store, keys, uids, hotkey, dim, inter_dim, "own recovery checkpoint", key)
    except (StoreError, CheckpointVerificationError, SealError) as e:  # InvalidWeightsError is one of those
        log.warning("passing over this hotkey's recovery checkpoint: %s: %s", type(e).__name__, e)
        return None


def _load_own(store: ObjectStore, keys: list[str], uids: list[str], hotkey: str, dim: int, inter_dim: int,
              source: str, recovery_key: bytes | None = None) -> OwnCheckpoint:
    """One manifest per uid; the oldest round among them (a recovery checkpoint's uids are written
    one after another)."""
    from subnet.checkpoint_loading import load_verified_experts
    from subnet.expert_weights import experts_from_states

    states: ExpertStates = {}
    moments: Moments = {}
    rounds, parent = [], None
    for uid, key in zip(uids, keys):
        verified = read_verified(store, key, expected_hotkey=hotkey,
                                 expected_config_hash=expert_config_hash(dim, inter_dim))
        if verified.manifest.kind == "recovery":
            verified = open_recovery_files(recovery_key, verified)
        states.update(load_verified_experts(verified, [uid], dim, inter_dim))
        rounds.append(verified.manifest.round)
        parent = verified.manifest.parent_version
        if OPTIMIZER_FILE in verified.files:
            where = store.where(key[: -len(MANIFEST_NAME)] + OPTIMIZER_FILE)
            try:
                moments[uid] = parse_moments(verified.files[OPTIMIZER_FILE], where)
            except MomentsError as e:
                log.warning("expert %s resumes without its AdamW moments: %s", uid, e)
    return OwnCheckpoint(min(rounds), experts_from_states(states, uids, dim, inter_dim, source=source), parent, moments)
