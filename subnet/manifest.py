"""Checkpoint manifests: what a checkpoint holds, who published it, and the proof.

A manifest is a JSON object stored next to the files it describes:

    {"format": "moe-checkpoint-manifest", "format_version": 2,
     "kind": "expert" | "recovery" | "trunk" | "global",
     "uid": "0.3" (expert, recovery) or null,  "version": 7 (global) or null,
     "endpoint": "10.0.0.5:50051" (expert: where the publisher serves it) or null,
     "round": 12, "parent_version": 6 or null,
     "config_hash": "<sha256 hex of the model shape config, see config_hash()>",
     "files": {"weights.safetensors": {"sha256": "<hex>", "size": 1234}},
     "hotkey": "<ss58>", "created_at": "2025-01-01T00:00:00Z",
     "signature": "<hex sr25519 signature by hotkey over canonical_json(everything else)>"}

It is stored as canonical JSON (sorted keys, no whitespace, ASCII); the sha256 of those exact
bytes (`Manifest.sha256`) is what a publisher commits to the chain. Parsing checks the
structure; `verify_signature` checks the signer. Neither touches storage: subnet.checkpoints
reads the bytes and checks the files against `files`.

`endpoint` (format 2): the miner's own statement of where its live service of the expert answers,
signed with the weights. Validators probe that endpoint, not what the Redis registry lists, which
every miner can write: a rival could otherwise delete a miner's entries or add some in its name
that point nowhere, and fail its live check. Format 1 manifests (no endpoint) still parse and
verify; an expert one then declares no endpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from bittensor_wallet import Keypair

FORMAT = "moe-checkpoint-manifest"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)   # 1: before `endpoint`
KINDS = ("expert", "recovery", "trunk", "global")
# Kinds that hold one expert, named by uid. A `recovery` checkpoint is an expert service's private
# restart point, never a round's submission: its kind keeps it out of the round layout for good.
EXPERT_KINDS = ("expert", "recovery")
MANIFEST_NAME = "manifest.json"
# A plain file name: it becomes the last part of an S3 key next to the manifest.
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FIELDS_V1 = {"format", "format_version", "kind", "uid", "version", "round", "parent_version", "config_hash",
              "files", "hotkey", "created_at", "signature"}
_FIELDS = {1: _FIELDS_V1, 2: _FIELDS_V1 | {"endpoint"}}
# host:port, the host a DNS name, IPv4 address or bracketed IPv6 address
_ENDPOINT = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]):[0-9]{1,5}$")


class Signer(Protocol):
    """What signs a manifest: a bittensor_wallet.Keypair, or anything with `sign(bytes) -> bytes`
    and the ss58 hotkey as `.hotkey` (subnet.identity.Identity) or `.ss58_address` (Keypair)."""

    def sign(self, data: bytes) -> bytes: ...


def signer_hotkey(signer: Signer) -> str:
    hotkey = getattr(signer, "hotkey", None) or getattr(signer, "ss58_address", None)
    if not isinstance(hotkey, str):
        raise TypeError(f"{type(signer).__name__} has neither .hotkey nor .ss58_address")
    return hotkey


class CheckpointVerificationError(ValueError):
    """A checkpoint that must not be used; the subclass says which check failed."""


class MalformedManifestError(CheckpointVerificationError):
    """Not valid JSON, or fields missing, extra or of the wrong type."""


class SignatureError(CheckpointVerificationError):
    """Not signed by the expected hotkey (another signer, or a signature that does not verify)."""


class ConfigMismatchError(CheckpointVerificationError):
    """The checkpoint is for another model shape config."""


def canonical_json(obj: Any) -> bytes:
    """The one byte encoding that gets hashed and signed: sorted keys, no whitespace, ASCII, no NaN."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of a model shape config, e.g. {"dim": 64, "n_experts": 8}.
    Only JSON types are accepted, so the hash never depends on a Python repr."""
    return sha256_hex(canonical_json(dict(config)))


def is_plain_name(name: str) -> bool:
    """Whether `name` is safe as one path part of an S3 key (no '/', no '..', no leading dot)."""
    return bool(_FILE_NAME.match(name)) and ".." not in name


@dataclasses.dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclasses.dataclass(frozen=True)
class Manifest:
    kind: str
    uid: str | None
    version: int | None
    round: int
    parent_version: int | None
    config_hash: str
    files: Mapping[str, FileEntry]
    hotkey: str
    created_at: str
    signature: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    endpoint: str | None = None

    def payload(self) -> dict[str, Any]:
        """Every field but the signature: what is signed (a format 1 manifest has no `endpoint`)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name in _FIELDS.get(self.format_version, _FIELDS[FORMAT_VERSION]) and f.name != "signature"}
        out["files"] = {name: {"sha256": e.sha256, "size": e.size} for name, e in sorted(self.files.items())}
        return out

    def to_bytes(self) -> bytes:
        """The stored form (canonical JSON, signature included)."""
        return canonical_json({**self.payload(), "signature": self.signature})

    @property
    def sha256(self) -> str:
        """The digest a publisher commits to the chain."""
        return sha256_hex(self.to_bytes())


def build_manifest(keypair: Signer, *, kind: str, files: Mapping[str, bytes], round: int,
                   parent_version: int | None, config_hash: str, uid: str | None = None,
                   version: int | None = None, created_at: str | None = None,
                   endpoint: str | None = None) -> Manifest:
    """A manifest for `files` ({name: content}), signed by `keypair` (its ss58 is the hotkey).
    `endpoint`: where the publisher serves the expert (kind `expert` only; required there)."""
    entries = {name: FileEntry(sha256=sha256_hex(data), size=len(data)) for name, data in files.items()}
    created = created_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    unsigned = Manifest(kind=kind, uid=uid, version=version, round=round, parent_version=parent_version,
                        config_hash=config_hash, files=entries, hotkey=signer_hotkey(keypair), created_at=created,
                        endpoint=endpoint)
    _check(unsigned.payload())  # a publisher gets the reader's error before anything is uploaded
    return dataclasses.replace(unsigned, signature=sign_payload(keypair, unsigned.payload()))


def parse_manifest(data: bytes) -> Manifest:
    """The manifest in `data`; MalformedManifestError unless every field is present and well typed."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MalformedManifestError(f"manifest is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise MalformedManifestError(f"manifest is a JSON {type(obj).__name__}, not an object")
    _check(obj)
    if not isinstance(obj.get("signature"), str) or not re.fullmatch(r"[0-9a-f]{128}", obj["signature"]):
        raise MalformedManifestError("manifest signature must be 128 lowercase hex characters (64 bytes)")
    files = {name: FileEntry(sha256=e["sha256"], size=e["size"]) for name, e in obj["files"].items()}
    return Manifest(**{**obj, "files": files})


def _check(obj: Mapping[str, Any]) -> None:
    def fail(msg: str) -> None:
        raise MalformedManifestError(f"malformed manifest: {msg}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    version_of = obj.get("format_version")
    if obj.get("format") != FORMAT or isinstance(version_of, bool) or version_of not in READABLE_VERSIONS:
        fail(f"format {obj.get('format')!r} v{version_of!r}; this reader knows {FORMAT!r} "
             f"v{', v'.join(map(str, READABLE_VERSIONS))}")
    fields = _FIELDS[version_of]
    if set(obj) - {"signature"} != fields - {"signature"}:
        missing, extra = fields - {"signature"} - set(obj), set(obj) - fields
        fail(f"missing fields {sorted(missing)}, unexpected fields {sorted(extra)}")
    if obj["kind"] not in KINDS:
        fail(f"kind {obj['kind']!r} is not one of {', '.join(KINDS)}")
    if version_of >= 2:
        endpoint = obj["endpoint"]
        if obj["kind"] == "expert":
            if not (isinstance(endpoint, str) and _ENDPOINT.match(endpoint)
                    and 0 < int(endpoint.rsplit(":", 1)[1]) < 65536):
                fail(f"endpoint {endpoint!r}: an expert manifest names where its publisher serves it, as host:port")
        elif endpoint is not None:
            fail(f"endpoint {endpoint!r}: only an expert manifest names one; {obj['kind']} manifests have null")
    uid, version = obj["uid"], obj["version"]
    if (uid is not None and not (isinstance(uid, str) and is_plain_name(uid))) or \
            (obj["kind"] in EXPERT_KINDS) != (uid is not None):
        fail(f"uid {uid!r}: an expert or recovery manifest needs a plain uid like '0.3', other kinds null")
    if (version is not None and not is_int(version)) or (obj["kind"] == "global") != (version is not None):
        fail(f"version {version!r}: a global manifest needs an int >= 0, other kinds null")
    if not is_int(obj["round"]):
        fail(f"round {obj['round']!r} is not an int >= 0")
    if obj["parent_version"] is not None and not is_int(obj["parent_version"]):
        fail(f"parent_version {obj['parent_version']!r} is neither null nor an int >= 0")
    if not isinstance(obj["config_hash"], str) or not _HEX64.match(obj["config_hash"]):
        fail("config_hash is not a sha256 hex digest")
    if not isinstance(obj["hotkey"], str) or not obj["hotkey"]:
        fail("hotkey is not an ss58 address")
    if not isinstance(obj["created_at"], str):
        fail("created_at is not a string")
    files = obj["files"]
    if not isinstance(files, dict) or not files:
        fail("files is not a non-empty object")
    for name, e in files.items():
        if not is_plain_name(name) or name == MANIFEST_NAME:
            fail(f"file name {name!r} is not a plain file name")
        if not isinstance(e, dict) or set(e) != {"sha256", "size"} or not is_int(e["size"]) \
                or not isinstance(e["sha256"], str) or not _HEX64.match(e["sha256"]):
            fail(f"entry of {name!r} must be {{\"sha256\": <hex>, \"size\": <int>}}, got {e!r}")


def sign_payload(keypair: Signer, payload: Mapping[str, Any]) -> str:
    """Hex sr25519 signature of canonical_json(payload)."""
    return bytes(keypair.sign(canonical_json(payload))).hex()


def verify_payload(payload: Mapping[str, Any], hotkey: str, signature: str,
                   expected_hotkeys: str | Collection[str], what: str = "manifest") -> None:
    """SignatureError unless `hotkey` is one of `expected_hotkeys` and signed canonical_json(payload)."""
    trusted = {expected_hotkeys} if isinstance(expected_hotkeys, str) else set(expected_hotkeys)
    if hotkey not in trusted:
        raise SignatureError(f"{what} is signed by {hotkey}, not by the expected hotkey "
                             f"{' or '.join(sorted(trusted)) or '(none given)'}")
    try:
        ok = Keypair(ss58_address=hotkey).verify(canonical_json(payload), bytes.fromhex(signature))
    except ValueError as e:  # a malformed address or signature
        raise SignatureError(f"{what} signature of {hotkey} cannot be checked: {e}") from None
    if not ok:
        raise SignatureError(f"{what} signature does not verify for hotkey {hotkey}: it was signed by "
                             f"another key or changed after signing")


def verify_signature(manifest: Manifest, expected_hotkeys: str | Collection[str]) -> None:
    """SignatureError unless `manifest` names one of `expected_hotkeys` and that key signed it."""
    verify_payload(manifest.payload(), manifest.hotkey, manifest.signature, expected_hotkeys)


def verify_config(manifest: Manifest, expected_config_hash: str | None) -> None:
    """ConfigMismatchError if the manifest is for another model config (None = accept any)."""
    if expected_config_hash is not None and manifest.config_hash != expected_config_hash:
        raise ConfigMismatchError(f"checkpoint is for model config {manifest.config_hash[:16]}..., this "
                                  f"model's config is {expected_config_hash[:16]}...; shapes would not match")
