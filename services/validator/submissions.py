"""What was committed for a round, and the verified expert weights behind each miner's reveal.

A miner reveals `{"<uid>": "<manifest sha256>", ...}` (services/expert/publisher.py) and the
router `{"trunk": {"key": ..., "sha256": ...}}` (services/router/trunk_publisher.py). The
chain already checked that the revealed data hashes to the committed digest; it is checked
again here, since a validator should not have to trust the chain's Redis.

    miners, trunks = round_submissions(chain.commitments(round))
    loaded = load_submission(store, miners[0], lm_cfg)   # .states {uid: SwiGLU state}, .endpoints; or SubmissionError
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Iterable

import torch

from moe.config import LMConfig
from moe.experts import parse_expert_uid
from services.expert.publisher import expert_config_hash
from services.router.trunk_publisher import trunk_config_hash
from subnet.chain.base import Commitment
from subnet.chain.signing import digest_of
from subnet.checkpoint_loading import load_verified_experts
from subnet.checkpoints import VerifiedCheckpoint, checkpoint_prefix, read_verified
from subnet.manifest import MANIFEST_NAME, CheckpointVerificationError, is_plain_name
from subnet.object_store import ObjectNotFoundError, ObjectStore

TRUNK_KEY = "trunk"


class SubmissionError(CheckpointVerificationError):
    """A miner's reveal or checkpoint that cannot be used; the miner's fault, scored 0."""


@dataclasses.dataclass(frozen=True)
class Submission:
    """One revealed commitment. `order` sorts commitments: earlier commit block first, then the chain's
    order within the block (`Commitment.commit_index`), then hotkey."""

    hotkey: str
    round: int
    digest: str
    commit_block: int
    data: str
    commit_index: int = 0

    @property
    def order(self) -> tuple[int, int, str]:
        return (self.commit_block, self.commit_index, self.hotkey)

    def is_trunk(self) -> bool:
        try:
            parsed = json.loads(self.data)
        except json.JSONDecodeError:
            return False
        return isinstance(parsed, dict) and TRUNK_KEY in parsed


def round_submissions(commitments: Iterable[Commitment]) -> tuple[list[Submission], list[Submission]]:
    """(miners, trunks): the revealed commitments, each list in commitment order. Unrevealed
    commitments are left out (there is nothing to validate)."""
    subs = sorted((Submission(c.hotkey, c.round, c.digest, c.commit_block, c.revealed, c.commit_index)
                   for c in commitments if c.revealed is not None), key=lambda s: s.order)
    return [s for s in subs if not s.is_trunk()], [s for s in subs if s.is_trunk()]


def _check_digest(sub: Submission) -> None:
    if digest_of(sub.data) != sub.digest:
        raise SubmissionError(f"revealed data of {sub.hotkey} for round {sub.round} hashes to "
                              f"{digest_of(sub.data)[:16]}..., not to the committed {sub.digest[:16]}...")


def manifests_of(sub: Submission, lm_cfg: LMConfig) -> dict[str, str]:
    """{uid: manifest sha256} from a miner's reveal, each uid one of the model's routed experts."""
    _check_digest(sub)
    try:
        manifests = json.loads(sub.data)
    except json.JSONDecodeError as e:
        raise SubmissionError(f"revealed data of {sub.hotkey} is not JSON: {e}") from None
    if not isinstance(manifests, dict) or not manifests or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in manifests.items()):
        raise SubmissionError(f"revealed data of {sub.hotkey} is not a non-empty {{uid: manifest sha256}} object")
    for uid in manifests:
        try:
            layer, index = parse_expert_uid(uid)
        except ValueError as e:
            raise SubmissionError(f"revealed data of {sub.hotkey}: {e}") from None
        if layer not in lm_cfg.moe_layers() or index >= lm_cfg.n_experts or not is_plain_name(uid):
            raise SubmissionError(f"revealed data of {sub.hotkey} names expert {uid}, which the model does not have")
    return manifests


@dataclasses.dataclass(frozen=True)
class LoadedSubmission:
    states: dict[str, dict[str, torch.Tensor]]   # uid -> SwiGLU state
    endpoints: dict[str, str | None]              # uid -> where the miner serves it (its manifest; None: format 1)


def load_submission(store: ObjectStore, sub: Submission, lm_cfg: LMConfig) -> LoadedSubmission:
    """The state of every expert the miner revealed and the endpoint its signed manifest names, each
    checkpoint verified (signed by the miner, the committed manifest sha256, this model's expert
    shape, file digests, tensors). SubmissionError / CheckpointVerificationError when anything
    fails; StoreError (S3 down) passes."""
    dim, inter = lm_cfg.dim, lm_cfg.moe_inter_dim
    states, endpoints = {}, {}
    for uid, sha in sorted(manifests_of(sub, lm_cfg).items()):
        key = f"{checkpoint_prefix('expert', uid=uid, hotkey=sub.hotkey, round=sub.round)}/{MANIFEST_NAME}"
        try:
            verified = read_verified(store, key, expected_hotkey=sub.hotkey, expected_manifest_sha256=sha,
                                     expected_config_hash=expert_config_hash(dim, inter))
        except ObjectNotFoundError as e:
            raise SubmissionError(f"checkpoint of expert {uid} revealed by {sub.hotkey} is missing: {e}") from None
        states.update(load_verified_experts(verified, [uid], dim, inter))
        endpoints[uid] = verified.manifest.endpoint
    return LoadedSubmission(states, endpoints)


def load_trunk(store: ObjectStore, sub: Submission, lm_config: dict,
               trusted: Collection[str]) -> VerifiedCheckpoint:
    """The verified trunk a router revealed for its round: its hotkey must be in `trusted`, and
    the checkpoint signed by it, for this LM config, of this round."""
    _check_digest(sub)
    if sub.hotkey not in trusted:
        raise SubmissionError(f"trunk revealed by {sub.hotkey}, which is not a trusted trunk signer")
    try:
        ref = json.loads(sub.data)[TRUNK_KEY]
        key, sha = ref["key"], ref["sha256"]
        if not (isinstance(key, str) and isinstance(sha, str)):
            raise TypeError("key and sha256 must be strings")
    except (KeyError, TypeError) as e:
        raise SubmissionError(f"trunk reveal of {sub.hotkey} is not {{'trunk': {{'key', 'sha256'}}}}: {e}") from None
    if key != f"{checkpoint_prefix('trunk', round=sub.round)}/{MANIFEST_NAME}":
        raise SubmissionError(f"trunk reveal of {sub.hotkey} for round {sub.round} names {key}, not that round's trunk")
    return read_verified(store, key, expected_hotkey=sub.hotkey, expected_manifest_sha256=sha,
                         expected_config_hash=trunk_config_hash(lm_config))
