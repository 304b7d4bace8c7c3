"""Expert weights out of verified checkpoints, and checkpoints named by s3:// URLs.

    EXPERT_CHECKPOINT=s3://moe-subnet/checkpoints/global/latest
    experts = load_experts_from_url(url, store, uids, dim, inter_dim, trusted_hotkeys={owner_ss58})

A URL's key may be `checkpoints/global/latest` (follow the signed pointer), a manifest key
(`.../manifest.json`) or a checkpoint folder (`checkpoints/global/7`). Only verified bytes are
parsed (subnet.checkpoints.read_verified), and parsed tensors are checked again: names,
shapes for this model config, float dtypes, finite values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable

import torch

from moe.experts import SwiGLU
from subnet.checkpoints import (
    EXPERT_WEIGHTS_FILE,
    GLOBAL_EXPERTS_FILE,
    LATEST_KEY,
    VerifiedCheckpoint,
    read_latest_global,
    read_verified,
)
from subnet.expert_weights import CheckpointError, experts_from_states, parse_expert_weights
from subnet.manifest import EXPERT_KINDS, MANIFEST_NAME, CheckpointVerificationError
from subnet.object_store import ObjectStore


class InvalidWeightsError(CheckpointVerificationError):
    """Verified bytes that are not usable expert weights for this model (names, shapes, dtypes,
    NaN/inf, or the wrong experts)."""


@dataclasses.dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str


def parse_s3_url(url: str) -> S3Url:
    """`s3://<bucket>/<key>` -> S3Url; ValueError naming the expected form otherwise."""
    scheme, sep, rest = url.partition("://")
    bucket, _, key = rest.partition("/")
    if scheme != "s3" or not sep or not bucket or not key.strip("/"):
        raise ValueError(f"{url!r} is not an s3://<bucket>/<key> URL "
                         f"(e.g. s3://moe-subnet/checkpoints/global/latest)")
    return S3Url(bucket=bucket, key=key.rstrip("/"))


def load_verified_experts(verified: VerifiedCheckpoint, uids: Iterable[str] | None, dim: int, inter_dim: int,
                          file_name: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """{uid: {"w1.weight", "w2.weight", "w3.weight": float32 tensor}} for `uids` (None = every
    expert in the file) from an expert checkpoint (its weights.safetensors) or a global one (its
    experts.safetensors). InvalidWeightsError if any tensor does not fit dim/inter_dim."""
    m = verified.manifest
    name = file_name or {"expert": EXPERT_WEIGHTS_FILE, "recovery": EXPERT_WEIGHTS_FILE,
                         "global": GLOBAL_EXPERTS_FILE}.get(m.kind)
    if name is None or name not in verified.files:
        raise InvalidWeightsError(f"{verified.manifest_key}: a {m.kind} checkpoint with files "
                                  f"{sorted(verified.files)} has no expert weights file {name or ''}")
    source = f"{verified.manifest_key[: -len(MANIFEST_NAME)]}{name}"
    try:
        states = parse_expert_weights(verified.files[name], source)
    except CheckpointError as e:
        raise InvalidWeightsError(str(e)) from None
    # An expert (or recovery) checkpoint is signed for one uid: weights for any other uid are refused.
    if m.kind in EXPERT_KINDS and set(states) != {m.uid}:
        raise InvalidWeightsError(f"{source} is the checkpoint of expert {m.uid} but holds "
                                  f"{', '.join(sorted(states))}")
    wanted = sorted(states) if uids is None else list(uids)
    missing = [uid for uid in wanted if uid not in states]
    if missing:
        raise InvalidWeightsError(f"{source} has no weights for {', '.join(missing)} "
                                  f"(it holds {', '.join(sorted(states)) or 'nothing'})")
    expected = {"w1.weight": (inter_dim, dim), "w3.weight": (inter_dim, dim), "w2.weight": (dim, inter_dim)}
    for uid in wanted:
        for pname, t in states[uid].items():
            if tuple(t.shape) != expected[pname]:
                raise InvalidWeightsError(f"{source}: {uid}.{pname} has shape {list(t.shape)}, expected "
                                          f"{list(expected[pname])} for dim={dim}, inter_dim={inter_dim}")
    return {uid: states[uid] for uid in wanted}


def read_checkpoint_url(url: str, store: ObjectStore, *, trusted_hotkeys: str | Collection[str],
                        expected_config_hash: str | None = None, max_bytes: int | None = None) -> VerifiedCheckpoint:
    """The verified checkpoint an s3:// URL names (see the module docstring). `store` supplies
    endpoint and credentials; the URL's bucket wins over S3_BUCKET."""
    parsed = parse_s3_url(url)
    if parsed.bucket != store.bucket:
        store = store.for_bucket(parsed.bucket)
    if parsed.key == LATEST_KEY:
        return read_latest_global(store, expected_hotkey=trusted_hotkeys, expected_config_hash=expected_config_hash,
                                  max_bytes=max_bytes)
    key = parsed.key if parsed.key.endswith(f"/{MANIFEST_NAME}") else f"{parsed.key}/{MANIFEST_NAME}"
    return read_verified(store, key, expected_hotkey=trusted_hotkeys, expected_config_hash=expected_config_hash,
                         max_bytes=max_bytes)


def load_experts_from_url(url: str, store: ObjectStore, uids: Iterable[str], dim: int, inter_dim: int, *,
                          trusted_hotkeys: str | Collection[str], expected_config_hash: str | None = None,
                          max_bytes: int | None = None) -> dict[str, SwiGLU]:
    """SwiGLU modules for `uids` from the verified checkpoint at `url` (an expert service's start-up)."""
    return load_experts_and_manifest(url, store, uids, dim, inter_dim, trusted_hotkeys=trusted_hotkeys,
                                     expected_config_hash=expected_config_hash, max_bytes=max_bytes)[0]


def load_experts_and_manifest(url: str, store: ObjectStore, uids: Iterable[str], dim: int, inter_dim: int, *,
                              trusted_hotkeys: str | Collection[str], expected_config_hash: str | None = None,
                              max_bytes: int | None = None) -> tuple[dict[str, SwiGLU], VerifiedCheckpoint]:
    """load_experts_from_url, with the verified checkpoint they came from (which `latest` named, its
    manifest's digest and signer), so that the caller can say what it loaded."""
    verified = read_checkpoint_url(url, store, trusted_hotkeys=trusted_hotkeys,
                                   expected_config_hash=expected_config_hash, max_bytes=max_bytes)
    uids = list(uids)
    states = load_verified_experts(verified, uids, dim, inter_dim)
    return experts_from_states(states, uids, dim, inter_dim, source=url), verified
