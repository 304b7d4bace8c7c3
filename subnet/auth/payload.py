"""The signed-request vocabulary both sides share: metadata keys and the signed payload.

The scheme is defined in protos/subnet/wire/v1/tensor.proto; this module is its only
implementation. The signature covers the exact serialized request bytes, so a receiver
hashes what it received before parsing it, and a sender signs what it sends.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from subnet.identity import Identity

DOMAIN = "moe-subnet/auth/v1"      # first line of every payload: a signature here means nothing elsewhere
HOTKEY_KEY = "x-moe-hotkey"
NONCE_KEY = "x-moe-nonce"
TIMESTAMP_KEY = "x-moe-timestamp-ms"
SIGNATURE_KEY = "x-moe-signature-bin"  # "-bin": gRPC carries the 64 raw bytes (base64 on the wire)
NONCE_HEX_CHARS = 32
SIGNATURE_BYTES = 64


def body_digest(body: bytes) -> str:
    """Hex sha256 of the serialized request."""
    return hashlib.sha256(body).hexdigest()


def signing_payload(method: str, digest: str, nonce: str, timestamp_ms: int | str, receiver: str) -> bytes:
    """What the sender signs: domain, method path ("/moe.v1.Expert/Forward"), body sha256 (hex),
    nonce, timestamp (unix ms) and the receiver's ss58 hotkey, one per line."""
    return f"{DOMAIN}\n{method}\n{digest}\n{nonce}\n{timestamp_ms}\n{receiver}".encode()


def new_nonce() -> str:
    return secrets.token_hex(NONCE_HEX_CHARS // 2)


def sign_metadata(identity: Identity, method: str, body: bytes, receiver: str,
                  now_ms: int | None = None) -> tuple[tuple[str, str | bytes], ...]:
    """The four metadata entries that make `body`, sent to `method` of `receiver`, a signed request."""
    nonce = new_nonce()
    timestamp_ms = int(time.time() * 1000) if now_ms is None else now_ms
    signature = identity.sign(signing_payload(method, body_digest(body), nonce, timestamp_ms, receiver))
    return ((HOTKEY_KEY, identity.hotkey), (NONCE_KEY, nonce), (TIMESTAMP_KEY, str(timestamp_ms)),
            (SIGNATURE_KEY, signature))
