"""The files of an expert's recovery checkpoint, sealed so that only its own hotkey reads them.

    key = recovery_key(identity)                                        # None: cannot seal or open
    files = sealed_recovery_files(key, prefix, uid, state, moments)     # {name: bytes} to publish
    verified = open_recovery_files(key, verified)                       # the same checkpoint, in the clear

A recovery checkpoint holds `weights.safetensors.sealed` and, once the expert has stepped,
`optimizer.safetensors.sealed` (its AdamW moments), each the plain file sealed with
subnet/sealed.py under the object's own key as context. The signed manifest lists the sealed
bytes, so anyone can still check who wrote them; only that hotkey can open them. Why it matters:
see subnet/sealed.py (a rival that commits a stolen recovery checkpoint first would otherwise
make its owner look like the copier).

`open_recovery_files` also reads recovery checkpoints written in the clear (before sealing
existed): they are the service's own, signed by its own hotkey.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch

from subnet.checkpoints import EXPERT_WEIGHTS_FILE, OPTIMIZER_FILE, VerifiedCheckpoint
from subnet.expert_weights import expert_weights_bytes
from subnet.identity import IdentityError
from subnet.manifest import MANIFEST_NAME
from subnet.optimizer_moments import moments_bytes
from subnet.sealed import SealError, seal, unseal

log = logging.getLogger(__name__)
RECOVERY_KEY_PURPOSE = "expert recovery checkpoints"
SEALED_SUFFIX = ".sealed"
_PLAIN_NAMES = (EXPERT_WEIGHTS_FILE, OPTIMIZER_FILE)


def recovery_key(identity) -> bytes | None:
    """The key that seals and opens this hotkey's recovery checkpoints; None (with a warning) when
    the identity holds no private key bytes: then none are written, and sealed ones are passed over."""
    try:
        return identity.derive_key(RECOVERY_KEY_PURPOSE)
    except IdentityError as e:
        log.warning("recovery checkpoints are off (they are sealed with a key derived from the hotkey): %s", e)
        return None


def sealed_recovery_files(key: bytes, prefix: str, uid: str, state: Mapping[str, torch.Tensor],
                          moments: Mapping[str, torch.Tensor] | None) -> dict[str, bytes]:
    """{name: sealed bytes} for one expert's recovery checkpoint at `prefix` (its folder)."""
    plain = {EXPERT_WEIGHTS_FILE: expert_weights_bytes({uid: state})}
    if moments:
        plain[OPTIMIZER_FILE] = moments_bytes(moments)
    return {name + SEALED_SUFFIX: seal(key, data, f"{prefix}/{name + SEALED_SUFFIX}") for name, data in plain.items()}


def open_recovery_files(key: bytes | None, verified: VerifiedCheckpoint) -> VerifiedCheckpoint:
    """`verified` with its sealed files replaced by their plain contents (under the plain names);
    SealError if one does not open with `key` (None: this service has no key to open them)."""
    sealed = [name for name in verified.files if name.endswith(SEALED_SUFFIX)]
    if not sealed:
        return verified   # written in the clear, before recovery checkpoints were sealed
    prefix = verified.manifest_key[: -len(MANIFEST_NAME) - 1]
    if key is None:
        raise SealError(f"{prefix} is sealed and this service has no key to open it (its hotkey was loaded "
                        f"without the private key bytes)")
    files = dict(verified.files)
    for name in sealed:
        plain = name[: -len(SEALED_SUFFIX)]
        if plain not in _PLAIN_NAMES:
            raise SealError(f"{prefix}/{name}: a recovery checkpoint seals only {', '.join(_PLAIN_NAMES)}")
        files[plain] = unseal(key, files.pop(name), f"{prefix}/{name}")
    return dataclasses.replace(verified, files=files)
