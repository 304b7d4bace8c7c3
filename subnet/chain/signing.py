"""What a hotkey signs for each chain operation, and the one check of such a signature.

The payloads are canonical bytes, so a signer and any verifier build the same message
from the same arguments:

    signature = keypair.sign(commit_payload(keypair.ss58_address, round, digest))
    chain.commit(keypair.ss58_address, round, digest, signature)

Each payload names its operation and the hotkey, so a signature for one operation (or one
hotkey) never verifies for another. Commit and reveal payloads carry the round, and a round
takes one commitment, so replaying them achieves nothing. A weights payload carries no nonce:
replaying an old one resets a validator's weights to what it once signed. Nor does a serve
payload: replaying an old one points the hotkey back at an old endpoint (on Bittensor the
extrinsic's own nonce prevents that; LocalChain trusts whoever can reach its Redis anyway).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence

from subnet import identity
from subnet.chain.base import ChainError

_VERSION = "moe-chain/v1"


def digest_of(data: str) -> str:
    """The commitment digest of `data`: hex sha256 of its utf-8 bytes."""
    return hashlib.sha256(data.encode()).hexdigest()


def commit_payload(hotkey: str, round: int, digest: str) -> bytes:
    return _canonical("commit", hotkey, int(round), digest)


def reveal_payload(hotkey: str, round: int, data: str) -> bytes:
    return _canonical("reveal", hotkey, int(round), data)


def weights_payload(hotkey: str, uids: Sequence[int], weights: Sequence[float]) -> bytes:
    """The weights as given (before the chain normalizes them); floats in Python's shortest
    round-trip form, so the same numbers always give the same bytes."""
    floats = [float(w) for w in weights]
    if not all(math.isfinite(w) for w in floats):
        raise ChainError("weights must be finite numbers")
    return _canonical("weights", hotkey, [int(u) for u in uids], floats)


def serve_payload(hotkey: str, endpoint: str) -> bytes:
    return _canonical("serve", hotkey, endpoint)


def _canonical(op: str, *fields) -> bytes:
    return json.dumps([_VERSION, op, *fields], separators=(",", ":"), ensure_ascii=True).encode()


def verify_signature(hotkey: str, payload: bytes, signature: bytes, what: str) -> None:
    """ChainError unless `signature` is `hotkey`'s sr25519 signature of `payload`."""
    if not isinstance(signature, bytes | bytearray):
        raise ChainError(f"{what}: signature must be bytes, got {type(signature).__name__}")
    if not identity.verify_signature(hotkey, payload, bytes(signature)):
        raise ChainError(f"{what}: bad signature: not a valid signature by hotkey {hotkey} of this {what}")


def check_hotkey(hotkey: str) -> None:
    """ChainError unless `hotkey` is a valid SS58 address."""
    if not identity.is_hotkey(hotkey):
        raise ChainError(f"{hotkey!r} is not a valid SS58 hotkey address")
