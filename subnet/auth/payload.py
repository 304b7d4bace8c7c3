"""The signed-request vocabulary both sides share: metadata keys and the signed payloads.

The scheme is defined in protos/subnet/wire/v1/tensor.proto; this module is its only
implementation. The signature covers the exact serialized request bytes, so a receiver
hashes what it received before parsing it, and a sender signs what it sends. The receiver's
answer to a signed unary request is signed the same way (`answer_payload`, in the trailing
metadata entry ANSWER_SIGNATURE_KEY), bound to that request by its nonce.
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
ANSWER_SIGNATURE_KEY = "x-moe-answer-signature-bin"   # trailing metadata of a signed request's OK answer
ANSWER_DOMAIN = "moe-subnet/auth/v1/answer"
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
                  now_ms: int | None = None, digest: str | None = None) -> tuple[tuple[str, str | bytes], ...]:
    """The four metadata entries that make `body`, sent to `method` of `receiver`, a signed request
    (`digest`: body_digest(body), when the caller has it already)."""
    nonce = new_nonce()
    timestamp_ms = int(time.time() * 1000) if now_ms is None else now_ms
    signature = identity.sign(signing_payload(method, digest or body_digest(body), nonce, timestamp_ms, receiver))
    return ((HOTKEY_KEY, identity.hotkey), (NONCE_KEY, nonce), (TIMESTAMP_KEY, str(timestamp_ms)),
            (SIGNATURE_KEY, signature))


def answer_payload(method: str, nonce: str, request_digest: str, caller: str, receiver: str, digest: str) -> bytes:
    """What the receiver signs in its OK answer to a signed request: answer domain, method, the request's
    nonce and body sha256 (hex), the caller's and the receiver's ss58 hotkeys, and the answer body's sha256
    (hex), one per line. The request's digest binds the answer to that request's bytes even where the
    receiver does not check the request's signature (its open methods)."""
    return f"{ANSWER_DOMAIN}\n{method}\n{nonce}\n{request_digest}\n{caller}\n{receiver}\n{digest}".encode()


def stream_digest(message_digests: list[bytes]) -> str:
    """The answer digest of a streamed answer: hex sha256 of its messages' raw sha256 digests, in order (the
    boundaries count, so messages cannot be split, joined or reordered under the signature)."""
    return hashlib.sha256(b"".join(message_digests)).hexdigest()


def request_claim(metadata) -> tuple[str, str] | None:
    """(caller hotkey, nonce) of a request carrying one of each, as strings; None otherwise."""
    found: dict[str, list] = {HOTKEY_KEY: [], NONCE_KEY: []}
    for key, value in metadata or ():
        if key in found:
            found[key].append(value)
    hotkeys, nonces = found[HOTKEY_KEY], found[NONCE_KEY]
    if len(hotkeys) != 1 or len(nonces) != 1 or not isinstance(hotkeys[0], str) or not isinstance(nonces[0], str):
        return None
    return hotkeys[0], nonces[0]
