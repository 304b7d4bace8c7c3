"""subnet/sealed.py and Identity.derive_key: sealed bytes open only with the owner's key, at
the place they were sealed for, and unaltered."""

import pytest

from subnet.identity import Identity, IdentityError, create_dev_wallet, load_identity
from subnet.sealed import SealError, seal, unseal

PLACE = "checkpoints/recovery/0.1/hk/weights.safetensors.sealed"


def test_only_the_same_key_at_the_same_place_opens_unaltered_bytes():
    me, other = Identity.generate(), Identity.generate()
    key = me.derive_key("recovery")
    blob = seal(key, b"weights" * 100, PLACE)
    assert unseal(key, blob, PLACE) == b"weights" * 100
    assert b"weights" not in blob
    with pytest.raises(SealError, match="does not open"):
        unseal(other.derive_key("recovery"), blob, PLACE)
    with pytest.raises(SealError, match="does not open"):
        unseal(me.derive_key("another purpose"), blob, PLACE)
    with pytest.raises(SealError, match="does not open"):
        unseal(key, blob, PLACE.replace("0.1", "0.2"))   # copied to another expert's place
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(SealError, match="does not open"):
        unseal(key, bytes(flipped), PLACE)
    with pytest.raises(SealError, match="not a sealed object"):
        unseal(key, b"plain bytes", PLACE)


def test_a_wallet_derives_the_same_key_every_load_and_a_bare_keypair_none(tmp_path):
    config = create_dev_wallet(tmp_path / "wallets", "miner", "hk")
    first, again = load_identity(config), load_identity(config)
    assert first.derive_key("x") == again.derive_key("x") != first.derive_key("y")
    assert len(first.derive_key("x")) == 32
    other = load_identity(create_dev_wallet(tmp_path / "wallets", "miner", "hk2"))
    assert other.derive_key("x") != first.derive_key("x")
    from bittensor_wallet import Keypair
    bare = Identity(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()))
    with pytest.raises(IdentityError, match="no private key bytes"):
        bare.derive_key("x")
    assert "derive" not in repr(first) and first.hotkey in repr(first)
