"""The receiver's check of one signed request, in a fixed order, each failure with its own message.

    verifier = Verifier(my_hotkey, policy, MemoryNonceStore(ttl_s=20), window_s=10)
    rejection = verifier.verify("/moe.v1.Expert/Forward", raw_bytes, metadata)   # None = accepted

Order (cheap and unauthenticated first; the nonce only after the signature, so junk cannot
burn nonces; the policy last, so its message is only ever given to the key's owner):
1. the four x-moe-* entries are present and well-formed        UNAUTHENTICATED
2. the timestamp is within ±window_s of this receiver's clock  UNAUTHENTICATED
3. the signature is the claimed hotkey's, over the payload built with THIS receiver's
   hotkey (a request signed for another receiver fails here)  UNAUTHENTICATED
4. the nonce was not seen within the window                    UNAUTHENTICATED
5. the policy allows the hotkey                                 PERMISSION_DENIED

This class only decides. It does not log, count or abort (see `subnet.auth.server`).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from subnet.auth.nonces import NonceStore, NonceStoreError
from subnet.auth.payload import (
    HOTKEY_KEY,
    NONCE_KEY,
    SIGNATURE_BYTES,
    SIGNATURE_KEY,
    TIMESTAMP_KEY,
    body_digest,
    signing_payload,
)
from subnet.auth.policy import Policy
from subnet.identity import is_hotkey, verify_signature

_KEYS = (HOTKEY_KEY, NONCE_KEY, TIMESTAMP_KEY, SIGNATURE_KEY)
_NONCE = re.compile(r"[0-9a-f]{32}")
_TIMESTAMP = re.compile(r"[0-9]{1,15}")
# Hashing a body this big would hold the event loop for about a millisecond (~2.4 ms per
# 4 MiB here); hashlib releases the GIL, so a worker thread does it while the loop serves others.
HASH_IN_THREAD_BYTES = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class Rejection:
    code: grpc.StatusCode
    reason: str      # metrics label: missing_metadata, malformed_metadata, stale_timestamp, ...
    message: str


@dataclass(frozen=True)
class _Claim:
    hotkey: str
    nonce: str
    timestamp: str
    signature: bytes


def unauthenticated(reason: str, message: str) -> Rejection:
    return Rejection(grpc.StatusCode.UNAUTHENTICATED, reason, message)


def policy_rejection(policy: Policy, hotkey: str) -> Rejection | None:
    """PERMISSION_DENIED when `policy` does not allow `hotkey` (a signed request's, or a session's)."""
    denial = policy.denial(hotkey)
    if denial is None:
        return None
    return Rejection(grpc.StatusCode.PERMISSION_DENIED, "not_allowed", f"hotkey {hotkey} {denial}")


async def digest_off_loop(body: bytes, digest: Callable[[bytes], T] = body_digest) -> T:
    """`digest(body)` for an asyncio server: a body of HASH_IN_THREAD_BYTES or more on a worker thread."""
    if len(body) >= HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(digest, body)
    return digest(body)


class Verifier:
    """Checks signed requests addressed to `receiver_hotkey`. Thread-safe if its store is."""

    def __init__(self, receiver_hotkey: str, policy: Policy, nonces: NonceStore, window_s: float = 10.0,
                 clock: Callable[[], float] = time.time):
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.receiver_hotkey = receiver_hotkey
        self.policy = policy
        self.nonces = nonces
        self.window_s = window_s
        self._clock = clock

    def verify(self, method: str, body: bytes, metadata: Iterable[tuple[str, str | bytes]]) -> Rejection | None:
        return self.check(method, body, metadata)[0]

    def check(self, method: str, body: bytes,
              metadata: Iterable[tuple[str, str | bytes]]) -> tuple[Rejection | None, str | None]:
        """(`verify`'s answer, the body's digest once it was computed: the receiver's answer signature uses it)."""
        claim = self._parse(metadata)
        if isinstance(claim, Rejection):
            return claim, None
        digest = body_digest(body)
        rejection = self._check_signature(claim, method, digest)
        if rejection is not None:
            return rejection, digest
        try:
            fresh = self.nonces.claim(f"{claim.hotkey}:{claim.nonce}")
        except NonceStoreError as e:
            return Rejection(grpc.StatusCode.UNAVAILABLE, "nonce_store_unavailable", str(e)), digest
        return self._admit(claim, fresh), digest

    async def averify(self, method: str, body: bytes,
                      metadata: Iterable[tuple[str, str | bytes]]) -> Rejection | None:
        """`verify` for an asyncio server: big bodies are hashed off the loop, the nonce store awaited."""
        return (await self.acheck(method, body, metadata))[0]

    async def acheck(self, method: str, body: bytes,
                     metadata: Iterable[tuple[str, str | bytes]]) -> tuple[Rejection | None, str | None]:
        """`check` for an asyncio server (as `averify`)."""
        claim = self._parse(metadata)
        if isinstance(claim, Rejection):
            return claim, None
        digest = await digest_off_loop(body)
        rejection = self._check_signature(claim, method, digest)
        if rejection is not None:
            return rejection, digest
        try:
            fresh = await self.nonces.aclaim(f"{claim.hotkey}:{claim.nonce}")
        except NonceStoreError as e:
            return Rejection(grpc.StatusCode.UNAVAILABLE, "nonce_store_unavailable", str(e)), digest
        return self._admit(claim, fresh), digest

    # ---- the steps --------------------------------------------------------------------------

    def _parse(self, metadata) -> _Claim | Rejection:
        found: dict[str, str | bytes] = {}
        for key, value in metadata:
            if key in _KEYS:
                if key in found:
                    return unauthenticated("malformed_metadata", f"{key} appears more than once")
                found[key] = value
        missing = [k for k in _KEYS if k not in found]
        if len(missing) == len(_KEYS):
            return unauthenticated("missing_metadata", "request is not signed: no x-moe-* metadata (sign it with "
                                                        "the caller's hotkey, see protos/subnet/wire/v1/tensor.proto)")
        if missing:
            return unauthenticated("missing_metadata", f"signed request lacks {', '.join(missing)}")
        hotkey, nonce, timestamp, signature = (found[k] for k in _KEYS)
        if not isinstance(hotkey, str) or not is_hotkey(hotkey):
            return unauthenticated("malformed_metadata", f"{HOTKEY_KEY} is not an ss58 address")
        if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
            return unauthenticated("malformed_metadata", f"{NONCE_KEY} must be 32 lowercase hex characters")
        if not isinstance(timestamp, str) or not _TIMESTAMP.fullmatch(timestamp):
            return unauthenticated("malformed_metadata", f"{TIMESTAMP_KEY} must be unix milliseconds (digits)")
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_BYTES:
            return unauthenticated("malformed_metadata", f"{SIGNATURE_KEY} must be {SIGNATURE_BYTES} bytes")
        skew_s = int(timestamp) / 1000 - self._clock()
        if abs(skew_s) > self.window_s:
            return unauthenticated("stale_timestamp",
                                    f"stale timestamp: {TIMESTAMP_KEY} is {skew_s:+.1f} s from the receiver's "
                                    f"clock, outside the ±{self.window_s:g} s window (check the caller's clock)")
        return _Claim(hotkey, nonce, timestamp, signature)

    def _check_signature(self, claim: _Claim, method: str, digest: str) -> Rejection | None:
        payload = signing_payload(method, digest, claim.nonce, claim.timestamp, self.receiver_hotkey)
        if verify_signature(claim.hotkey, payload, claim.signature):
            return None
        return unauthenticated("bad_signature",
                                f"bad signature: not {claim.hotkey}'s signature of this request to {method} "
                                f"for receiver {self.receiver_hotkey} (was it signed for another receiver, "
                                f"or changed on the way?)")

    def _admit(self, claim: _Claim, fresh_nonce: bool) -> Rejection | None:
        if not fresh_nonce:
            return unauthenticated("replayed_nonce", f"replayed nonce {claim.nonce} from {claim.hotkey}: "
                                                      f"every request needs a new one")
        return policy_rejection(self.policy, claim.hotkey)
