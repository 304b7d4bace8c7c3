"""Checkpoints in S3: published with a signed manifest, read back only after verification.

Key layout (in the S3_BUCKET bucket; manifests are described in subnet.manifest):

    checkpoints/experts/<uid>/<hotkey>/<round>/weights.safetensors + manifest.json
    checkpoints/recovery/<uid>/<hotkey>/weights.safetensors + manifest.json   (one, overwritten)
    checkpoints/trunk/<round>/<any files, e.g. weights.safetensors, config.json> + manifest.json
    checkpoints/global/<version>/<any files; experts in experts.safetensors> + manifest.json
    checkpoints/global/latest    signed JSON pointer: version, manifest_key, manifest_sha256

Writers upload the files first, the manifest after them, and (global) the `latest` pointer
last; global versions are immutable. So a reader that follows `latest` sees a complete
version, old or new, never a half-written one. A recovery checkpoint (an expert service's
restart point between rounds, kind `recovery`) lives outside the rounds: nothing committed can
name it, so work a service has not committed yet never sits where a round's submissions are
looked up.

    pub = publish_experts(store, hotkey, {"0.3": swiglu}, round=12, parent_version=6,
                          config_hash=config_hash(shape))[0]
    chain.commit(pub.manifest_sha256)                       # the caller's job
    ckpt = read_verified(store, pub.manifest_key, expected_hotkey=miner_ss58,
                         expected_config_hash=config_hash(shape), expected_manifest_sha256=committed)

`read_verified` returns nothing unless every check passed; each failed check raises its own
CheckpointVerificationError subclass. Turning verified bytes into expert weights is
subnet.checkpoint_loading's job.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection, Mapping

import torch

from moe.experts import SwiGLU
from subnet.expert_weights import expert_weights_bytes
from subnet.manifest import (
    EXPERT_KINDS,
    MANIFEST_NAME,
    CheckpointVerificationError,
    MalformedManifestError,
    Manifest,
    Signer,
    build_manifest,
    canonical_json,
    is_plain_name,
    parse_manifest,
    sha256_hex,
    sign_payload,
    signer_hotkey,
    verify_config,
    verify_payload,
    verify_signature,
)
from subnet.manifest import ConfigMismatchError as ConfigMismatchError  # re-exported: callers import
from subnet.manifest import SignatureError as SignatureError  # every verification error from here
from subnet.object_store import ObjectNotFoundError, ObjectStore, ObjectTooLargeError

ROOT = "checkpoints"
LATEST_KEY = f"{ROOT}/global/latest"
EXPERT_WEIGHTS_FILE = "weights.safetensors"  # of one expert checkpoint
GLOBAL_EXPERTS_FILE = "experts.safetensors"  # of a global checkpoint: every expert of the model
OPTIMIZER_FILE = "optimizer.safetensors"  # beside an expert's weights: its AdamW moments (recovery only)
MANIFEST_MAX_BYTES = 1024 * 1024  # a manifest lists a few files; anything bigger is not one
POINTER_FORMAT = "moe-checkpoint-latest"


class CheckpointTooLargeError(CheckpointVerificationError):
    """A manifest or file over the size limit; refused before it was downloaded."""


class CommitmentMismatchError(CheckpointVerificationError):
    """The manifest's sha256 is not the digest committed on chain (or named by `latest`)."""


class MisplacedManifestError(CheckpointVerificationError):
    """The manifest's kind/uid/hotkey/round/version do not match the key it was read from
    (a valid manifest copied to another place, e.g. an old round replayed as a new one)."""


class MissingFileError(CheckpointVerificationError):
    """A file the manifest lists is not in the store."""


class SizeMismatchError(CheckpointVerificationError):
    """A file's size differs from the manifest's (truncated or appended to)."""


class DigestMismatchError(CheckpointVerificationError):
    """A file's sha256 differs from the manifest's (changed content)."""


class PublishError(ValueError):
    """A publish that would break the layout's guarantees (e.g. rewriting a global version)."""


@dataclasses.dataclass(frozen=True)
class PublishedCheckpoint:
    manifest_key: str
    manifest_sha256: str  # what the publisher commits to the chain
    keys: tuple[str, ...]  # every key written, manifest last
    manifest: Manifest


@dataclasses.dataclass(frozen=True)
class VerifiedCheckpoint:
    manifest_key: str
    manifest_sha256: str
    manifest: Manifest
    files: Mapping[str, bytes]  # every file the manifest lists, each checked against it


def checkpoint_prefix(kind: str, *, round: int | None = None, hotkey: str | None = None,
                      uid: str | None = None, version: int | None = None) -> str:
    """The folder of one checkpoint (see the layout above); ValueError on a missing or unsafe part."""
    if kind == "expert":
        if uid is None or hotkey is None or round is None:
            raise ValueError("an expert checkpoint needs uid, hotkey and round")
        parts = ["experts", uid, hotkey, str(round)]
    elif kind == "recovery":
        if uid is None or hotkey is None:
            raise ValueError("a recovery checkpoint needs uid and hotkey")
        parts = ["recovery", uid, hotkey]
    elif kind == "trunk":
        if round is None:
            raise ValueError("a trunk checkpoint needs a round")
        parts = ["trunk", str(round)]
    elif kind == "global":
        if version is None:
            raise ValueError("a global checkpoint needs a version")
        parts = ["global", str(version)]
    else:
        raise ValueError(f"unknown checkpoint kind {kind!r}")
    if not all(is_plain_name(p) for p in parts):
        raise ValueError(f"unsafe key part in {parts!r}")
    return "/".join([ROOT, *parts])


def _prefix_of(manifest: Manifest) -> str:
    return checkpoint_prefix(manifest.kind, round=manifest.round, hotkey=manifest.hotkey,
                             uid=manifest.uid, version=manifest.version)


def publish_checkpoint(store: ObjectStore, keypair: Signer, *, kind: str, files: Mapping[str, bytes],
                       round: int, parent_version: int | None, config_hash: str, uid: str | None = None,
                       version: int | None = None, created_at: str | None = None,
                       endpoint: str | None = None) -> PublishedCheckpoint:
    """Upload `files` ({name: bytes}) and then their manifest signed by `keypair`. `endpoint`: where
    the publisher serves the expert (kind `expert`; see subnet.manifest)."""
    manifest = build_manifest(keypair, kind=kind, files=files, round=round, parent_version=parent_version,
                              config_hash=config_hash, uid=uid, version=version, created_at=created_at,
                              endpoint=endpoint)
    prefix = _prefix_of(manifest)
    keys = []
    for name in sorted(files):
        store.put_bytes(f"{prefix}/{name}", files[name])
        keys.append(f"{prefix}/{name}")
    manifest_key = f"{prefix}/{MANIFEST_NAME}"
    store.put_bytes(manifest_key, manifest.to_bytes(), content_type="application/json")
    return PublishedCheckpoint(manifest_key=manifest_key, manifest_sha256=manifest.sha256,
                               keys=(*keys, manifest_key), manifest=manifest)


def publish_experts(store: ObjectStore, keypair: Signer, experts: Mapping[str, SwiGLU | Mapping[str, torch.Tensor]],
                    *, round: int, parent_version: int | None, config_hash: str,
                    kind: str = "expert", endpoint: str | None = None) -> list[PublishedCheckpoint]:
    """One checkpoint per expert uid (the layout is per uid), in uid order; `kind` "recovery"
    for a service's restart point instead of a round's submission (in the clear: the expert
    service seals its own, services/expert/recovery_files.py). `endpoint` (kind `expert`, required
    there): where the publisher's live service answers for these experts."""
    if kind not in EXPERT_KINDS:
        raise ValueError(f"kind {kind!r}: experts are published as one of {', '.join(EXPERT_KINDS)}")
    return [publish_checkpoint(store, keypair, kind=kind, uid=uid, round=round, parent_version=parent_version,
                               config_hash=config_hash, endpoint=endpoint if kind == "expert" else None,
                               files={EXPERT_WEIGHTS_FILE: expert_weights_bytes({uid: experts[uid]})})
            for uid in sorted(experts)]


def read_verified(store: ObjectStore, manifest_key: str, *, expected_hotkey: str | Collection[str],
                  expected_config_hash: str | None = None, expected_manifest_sha256: str | None = None,
                  max_bytes: int | None = None) -> VerifiedCheckpoint:
    """The manifest at `manifest_key` and every file it lists, after checking, in this order:
    manifest size, its sha256 against the commitment, its structure, its signer, its model
    config, its location; then each file's declared and stored size (before downloading it)
    and its sha256. `max_bytes` (default S3_MAX_OBJECT_MB) limits each file."""
    limit = store.config.max_object_bytes if max_bytes is None else max_bytes
    if not manifest_key.endswith(f"/{MANIFEST_NAME}"):
        raise ValueError(f"{manifest_key!r} is not a manifest key (.../{MANIFEST_NAME})")
    data = _get_limited(store, manifest_key, min(limit, MANIFEST_MAX_BYTES), "manifest")
    digest = sha256_hex(data)
    if expected_manifest_sha256 is not None and digest != expected_manifest_sha256.lower():
        raise CommitmentMismatchError(f"{store.where(manifest_key)} has sha256 {digest}, but the committed "
                                      f"digest is {expected_manifest_sha256}")
    manifest = parse_manifest(data)
    verify_signature(manifest, expected_hotkey)
    verify_config(manifest, expected_config_hash)
    prefix = manifest_key[: -len(MANIFEST_NAME) - 1]
    if _prefix_of(manifest) != prefix:
        raise MisplacedManifestError(f"manifest at {manifest_key} describes {_prefix_of(manifest)}; "
                                     f"refusing a manifest outside its own place")
    files = {}
    for name, entry in sorted(manifest.files.items()):
        key = f"{prefix}/{name}"
        if entry.size > limit:
            raise CheckpointTooLargeError(f"{store.where(key)}: manifest declares {entry.size} bytes, over the "
                                          f"limit of {limit} bytes; not downloaded")
        try:
            stored = store.size(key)
        except ObjectNotFoundError:
            raise MissingFileError(f"{store.where(key)} is listed in the manifest but missing") from None
        if stored != entry.size:
            raise SizeMismatchError(f"{store.where(key)} is {stored} bytes, the manifest says {entry.size} "
                                    f"({'truncated' if stored < entry.size else 'appended to'}); not downloaded")
        try:
            content = store.get_bytes(key, max_bytes=entry.size)
        except ObjectTooLargeError as e:  # it grew between the size check and the download
            raise SizeMismatchError(str(e)) from None
        if len(content) != entry.size:
            raise SizeMismatchError(f"{store.where(key)}: downloaded {len(content)} bytes, the manifest says "
                                    f"{entry.size}")
        if sha256_hex(content) != entry.sha256:
            raise DigestMismatchError(f"{store.where(key)}: sha256 {sha256_hex(content)} differs from the "
                                      f"manifest's {entry.sha256}; the content was changed")
        files[name] = content
    return VerifiedCheckpoint(manifest_key=manifest_key, manifest_sha256=digest, manifest=manifest, files=files)


def _get_limited(store: ObjectStore, key: str, limit: int, what: str) -> bytes:
    size = store.size(key)
    if size > limit:
        raise CheckpointTooLargeError(f"{what} {store.where(key)} is {size} bytes, over the limit of {limit} "
                                      f"bytes; not downloaded")
    try:
        return store.get_bytes(key, max_bytes=limit)
    except ObjectTooLargeError as e:
        raise CheckpointTooLargeError(str(e)) from None


def publish_global(store: ObjectStore, keypair: Signer, *, version: int, files: Mapping[str, bytes], round: int,
                   parent_version: int | None, config_hash: str) -> PublishedCheckpoint:
    """Global version `version`: files, manifest, then the signed `latest` pointer. Versions are
    immutable and increase: PublishError for an existing version or one not above `latest`."""
    current = latest_global_version(store)
    if current is not None and version <= current:
        raise PublishError(f"global version {version} is not above the latest published version {current}")
    if store.exists(f"{checkpoint_prefix('global', version=version)}/{MANIFEST_NAME}"):
        raise PublishError(f"global version {version} already exists in {store.where()}; versions are immutable")
    published = publish_checkpoint(store, keypair, kind="global", version=version, files=files, round=round,
                                   parent_version=parent_version, config_hash=config_hash)
    payload = {"format": POINTER_FORMAT, "version": version, "manifest_key": published.manifest_key,
               "manifest_sha256": published.manifest_sha256, "hotkey": signer_hotkey(keypair)}
    pointer = canonical_json({**payload, "signature": sign_payload(keypair, payload)})
    store.put_bytes(LATEST_KEY, pointer, content_type="application/json")
    return dataclasses.replace(published, keys=(*published.keys, LATEST_KEY))


def _parse_pointer(data: bytes) -> dict:
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedManifestError(f"{LATEST_KEY} is not JSON: {e}") from None
    fields = {"format": str, "version": int, "manifest_key": str, "manifest_sha256": str, "hotkey": str,
              "signature": str}
    if not isinstance(obj, dict) or set(obj) != set(fields) or obj["format"] != POINTER_FORMAT \
            or not all(isinstance(obj[k], t) and not isinstance(obj[k], bool) for k, t in fields.items()):
        raise MalformedManifestError(f"{LATEST_KEY} is not a {POINTER_FORMAT} pointer with fields {sorted(fields)}")
    return obj


def latest_global_version(store: ObjectStore) -> int | None:
    """The version `latest` points to, unverified (None if nothing is published): for publishers
    and progress displays, never for choosing weights."""
    try:
        return _parse_pointer(_get_limited(store, LATEST_KEY, MANIFEST_MAX_BYTES, "pointer"))["version"]
    except ObjectNotFoundError:
        return None


def read_latest_global(store: ObjectStore, *, expected_hotkey: str | Collection[str],
                       expected_config_hash: str | None = None, max_bytes: int | None = None) -> VerifiedCheckpoint:
    """The global version `latest` points to, verified like read_verified; the pointer's own
    signature and the manifest digest it names are checked too. ObjectNotFoundError if none."""
    pointer = _parse_pointer(_get_limited(store, LATEST_KEY, MANIFEST_MAX_BYTES, "pointer"))
    payload = {k: v for k, v in pointer.items() if k != "signature"}
    verify_payload(payload, pointer["hotkey"], pointer["signature"], expected_hotkey, what=LATEST_KEY)
    verified = read_verified(store, pointer["manifest_key"], expected_hotkey=expected_hotkey,
                             expected_config_hash=expected_config_hash,
                             expected_manifest_sha256=pointer["manifest_sha256"], max_bytes=max_bytes)
    if verified.manifest.kind != "global" or verified.manifest.version != pointer["version"]:
        raise MisplacedManifestError(f"{LATEST_KEY} names version {pointer['version']}, but its manifest is "
                                     f"{verified.manifest.kind} version {verified.manifest.version}")
    return verified
