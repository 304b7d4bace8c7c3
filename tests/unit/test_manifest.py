"""subnet.manifest: canonical JSON, config hashes, signing and parsing (no storage, no sockets)."""

import dataclasses
import hashlib
import json

import pytest
from bittensor_wallet import Keypair

from subnet.manifest import (
    ConfigMismatchError,
    MalformedManifestError,
    SignatureError,
    build_manifest,
    canonical_json,
    config_hash,
    parse_manifest,
    sign_payload,
    verify_config,
    verify_signature,
)

CONFIG = {"dim": 64, "inter_dim": 128, "n_layers": 2, "n_experts": 8}


@pytest.fixture(scope="module")
def alice() -> Keypair:
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


@pytest.fixture(scope="module")
def mallory() -> Keypair:
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


ENDPOINT = "10.0.0.5:50051"


def _manifest(keypair, **overrides):
    kwargs = dict(kind="expert", uid="0.3", files={"weights.safetensors": b"\x00weights"}, round=12,
                  parent_version=6, config_hash=config_hash(CONFIG), created_at="2025-01-01T00:00:00Z",
                  endpoint=ENDPOINT if overrides.get("kind", "expert") == "expert" else None)
    return build_manifest(keypair, **{**kwargs, **overrides})


def test_canonical_json_is_sorted_compact_ascii_and_rejects_nan():
    assert canonical_json({"b": 1, "a": [1, "é"], "c": None}) == b'{"a":[1,"\\u00e9"],"b":1,"c":null}'
    assert canonical_json({"x": 1, "y": 2}) == canonical_json({"y": 2, "x": 1})
    with pytest.raises(ValueError):
        canonical_json({"lr": float("nan")})


def test_config_hash_is_sha256_of_the_canonical_json_and_order_independent():
    expected = hashlib.sha256(b'{"dim":64,"inter_dim":128,"n_experts":8,"n_layers":2}').hexdigest()
    assert config_hash(CONFIG) == expected
    assert config_hash(dict(reversed(list(CONFIG.items())))) == expected
    assert config_hash({**CONFIG, "dim": 65}) != expected
    assert config_hash({**CONFIG, "dim": 64.0}) != expected  # 64.0 is another config than 64


def test_manifest_is_stored_canonically_and_its_digest_covers_the_stored_bytes(alice):
    m = _manifest(alice)
    data = m.to_bytes()
    assert data == canonical_json(json.loads(data))
    assert m.sha256 == hashlib.sha256(data).hexdigest()
    assert m.hotkey == alice.ss58_address
    assert m.files["weights.safetensors"].size == 8
    assert m.files["weights.safetensors"].sha256 == hashlib.sha256(b"\x00weights").hexdigest()
    assert parse_manifest(data) == m
    verify_signature(parse_manifest(data), alice.ss58_address)


def test_signature_covers_every_field(alice):
    m = _manifest(alice)
    for change in ({"round": 13}, {"parent_version": None}, {"uid": "0.4"}, {"created_at": "2030-01-01T00:00:00Z"},
                   {"config_hash": config_hash({**CONFIG, "dim": 65})}, {"endpoint": "10.0.0.6:50051"}):
        tampered = parse_manifest(dataclasses.replace(m, **change).to_bytes())
        with pytest.raises(SignatureError, match="does not verify"):
            verify_signature(tampered, alice.ss58_address)


def test_wrong_signer_is_refused(alice, mallory):
    by_mallory = _manifest(mallory)
    with pytest.raises(SignatureError, match="not by the expected hotkey"):
        verify_signature(by_mallory, alice.ss58_address)
    # Mallory claims to be Alice: the hotkey matches but the signature does not.
    forged = dataclasses.replace(by_mallory, hotkey=alice.ss58_address)
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(forged, alice.ss58_address)
    verify_signature(by_mallory, {alice.ss58_address, mallory.ss58_address})  # a set of trusted keys


def test_any_signer_with_a_hotkey_attribute_signs(alice):
    class Identity:  # the shape of subnet.identity.Identity: .hotkey and .sign, no .ss58_address
        hotkey = alice.ss58_address

        def sign(self, data: bytes) -> bytes:
            return alice.sign(data)

    m = _manifest(Identity())
    assert m.hotkey == alice.ss58_address
    verify_signature(m, alice.ss58_address)


def test_config_mismatch_is_refused(alice):
    m = _manifest(alice)
    verify_config(m, config_hash(CONFIG))
    verify_config(m, None)
    with pytest.raises(ConfigMismatchError, match="another model config|model config"):
        verify_config(m, config_hash({**CONFIG, "n_experts": 16}))


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.pop("round"), "missing fields"),
    (lambda o: o.update(extra=1), "unexpected fields"),
    (lambda o: o.update(round=True), "round"),
    (lambda o: o.update(round=-1), "round"),
    (lambda o: o.update(kind="optimizer"), "kind"),
    (lambda o: o.update(uid=None), "uid"),
    (lambda o: o.update(uid="../0.3"), "uid"),
    (lambda o: o.update(version=3), "version"),
    (lambda o: o.update(format_version=3), "format"),
    (lambda o: o.update(format_version=True), "format"),
    (lambda o: o.update(format_version=1), "unexpected fields"),   # format 1 has no endpoint
    (lambda o: o.pop("endpoint"), "missing fields"),
    (lambda o: o.update(endpoint=None), "endpoint"),
    (lambda o: o.update(endpoint="10.0.0.5"), "endpoint"),
    (lambda o: o.update(endpoint="10.0.0.5:0"), "endpoint"),
    (lambda o: o.update(endpoint="10.0.0.5:70000"), "endpoint"),
    (lambda o: o.update(endpoint="a b:50051"), "endpoint"),
    (lambda o: o.update(endpoint="http://x:1/"), "endpoint"),
    (lambda o: o.update(endpoint=["10.0.0.5:50051"]), "endpoint"),
    (lambda o: o.update(kind="recovery", endpoint=ENDPOINT), "endpoint"),
    (lambda o: o.update(files={}), "files"),
    (lambda o: o.update(files={"../escape": {"sha256": "0" * 64, "size": 1}}), "file name"),
    (lambda o: o.update(files={"manifest.json": {"sha256": "0" * 64, "size": 1}}), "file name"),
    (lambda o: o.update(files={"w": {"sha256": "xyz", "size": 1}}), "entry"),
    (lambda o: o.update(config_hash="abc"), "config_hash"),
    (lambda o: o.update(signature="00"), "signature"),
])
def test_malformed_manifests_are_refused(alice, edit, message):
    obj = json.loads(_manifest(alice).to_bytes())
    edit(obj)
    with pytest.raises(MalformedManifestError, match=message):
        parse_manifest(json.dumps(obj).encode())


def test_non_json_is_malformed():
    for data in (b"\xff\xfe", b"{not json", b"[1, 2]"):
        with pytest.raises(MalformedManifestError):
            parse_manifest(data)


def test_publisher_gets_the_readers_error_before_uploading(alice):
    with pytest.raises(MalformedManifestError, match="uid"):
        _manifest(alice, uid=None)
    with pytest.raises(MalformedManifestError, match="file name"):
        _manifest(alice, files={"a/b": b""})
    global_manifest = _manifest(alice, kind="global", uid=None, version=7)
    assert parse_manifest(global_manifest.to_bytes()).version == 7


def test_endpoints_a_publisher_may_name(alice):
    for endpoint in ("expert-0:50051", "10.0.0.5:1", "[::1]:65535", "expert-1.moe-subnet.svc.cluster.local:50051"):
        assert parse_manifest(_manifest(alice, endpoint=endpoint).to_bytes()).endpoint == endpoint


def test_a_format_1_manifest_still_parses_and_verifies_and_names_no_endpoint(alice):
    """Written before the endpoint existed: its signature covers the fields it has, and no other."""
    unsigned = dataclasses.replace(_manifest(alice), format_version=1, endpoint=None, signature="")
    assert "endpoint" not in unsigned.payload()
    old = dataclasses.replace(unsigned, signature=sign_payload(alice, unsigned.payload()))
    parsed = parse_manifest(old.to_bytes())
    assert parsed.format_version == 1 and parsed.endpoint is None
    verify_signature(parsed, alice.ss58_address)
    # Declaring an endpoint in it afterwards breaks the signature, as any other change does.
    with pytest.raises(SignatureError, match="does not verify"):
        verify_signature(dataclasses.replace(parsed, format_version=2, endpoint=ENDPOINT), alice.ss58_address)
