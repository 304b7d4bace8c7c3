"""Bytes only their owner can read back: AES-256-GCM under a key the owner derives from its
hotkey's secret (`Identity.derive_key`), bound to where the bytes are stored.

    key = identity.derive_key("expert recovery checkpoints")
    blob = seal(key, data, context="checkpoints/recovery/0.1/<hotkey>/weights.safetensors.sealed")
    data = unseal(key, blob, context=...)     # SealError: another key, another place, or altered

Why: an expert's recovery checkpoints sit in the shared bucket while the round they belong to
is still training. In the clear, a rival could read one, publish it as its own and commit it
before its owner does, and the validators' copy check (which goes by commit order) would then
blame the owner. Sealed, the objects are still listed and still carry their signed manifest,
but only the owner can turn them back into weights.

Layout: MAGIC, a 12-byte random nonce, the 16-byte tag, the ciphertext. The context is the
GCM associated data, so a blob copied to another key of the store does not open.
"""

from __future__ import annotations

import os

from Crypto.Cipher import AES

MAGIC = b"moe-sealed-v1\n"
_NONCE, _TAG = 12, 16


class SealError(ValueError):
    """The blob is not sealed, or does not open with this key at this place."""


def seal(key: bytes, data: bytes, context: str) -> bytes:
    nonce = os.urandom(_NONCE)
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(context.encode())
    ciphertext, tag = cipher.encrypt_and_digest(data)
    return MAGIC + nonce + tag + ciphertext


def unseal(key: bytes, blob: bytes, context: str) -> bytes:
    head = len(MAGIC) + _NONCE + _TAG
    if len(blob) < head or not blob.startswith(MAGIC):
        raise SealError(f"{context} is not a sealed object (no {MAGIC!r} header)")
    nonce, tag = blob[len(MAGIC):len(MAGIC) + _NONCE], blob[len(MAGIC) + _NONCE:head]
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(context.encode())
    try:
        return cipher.decrypt_and_verify(memoryview(blob)[head:], tag)
    except ValueError:
        raise SealError(f"{context} does not open with this hotkey's key: sealed by another hotkey, for "
                        f"another place, or altered") from None
