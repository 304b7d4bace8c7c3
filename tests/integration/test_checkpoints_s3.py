"""Signed checkpoints in a real S3 (SeaweedFS): published, read back verified, and every kind of
tampering refused with its own error. One SeaweedFS for the session, one bucket per test."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time

import pytest
import torch
from bittensor_wallet import Keypair
from safetensors.torch import save

from moe.experts import SwiGLU
from subnet.checkpoint_loading import (
    InvalidWeightsError,
    load_experts_from_url,
    load_verified_experts,
    parse_s3_url,
)
from subnet.checkpoints import (
    GLOBAL_EXPERTS_FILE,
    LATEST_KEY,
    CheckpointTooLargeError,
    CommitmentMismatchError,
    ConfigMismatchError,
    DigestMismatchError,
    MisplacedManifestError,
    MissingFileError,
    PublishError,
    SignatureError,
    SizeMismatchError,
    publish_checkpoint,
    publish_experts,
    publish_global,
    read_latest_global,
    read_verified,
)
from subnet.expert_weights import expert_weights_bytes, init_expert
from subnet.manifest import config_hash, sign_payload
from subnet.object_store import ObjectNotFoundError, ObjectStore, ObjectTooLargeError, S3Config, StoreError

DIM, INTER = 8, 16
SHAPE = config_hash({"dim": DIM, "inter_dim": INTER, "n_experts": 4})
ENDPOINT = "127.0.0.1:50051"
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def owner() -> Keypair:
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


@pytest.fixture(scope="module")
def other() -> Keypair:
    return Keypair.create_from_mnemonic(Keypair.generate_mnemonic())


@pytest.fixture
def published(object_store, owner):
    """One expert checkpoint of uid 0.1 at round 3: (store, PublishedCheckpoint, SwiGLU)."""
    expert = init_expert("0.1", DIM, INTER, seed=1)
    pub = publish_experts(object_store, owner, {"0.1": expert}, round=3, parent_version=2, config_hash=SHAPE,
                          endpoint=ENDPOINT)[0]
    return object_store, pub, expert


def _read(store, pub, owner, **kw):
    return read_verified(store, pub.manifest_key, expected_hotkey=owner.ss58_address, expected_config_hash=SHAPE,
                         expected_manifest_sha256=pub.manifest_sha256, **kw)


def test_experts_round_trip_verified_and_equal(object_store, owner):
    experts = {uid: init_expert(uid, DIM, INTER, seed=5) for uid in ("0.0", "1.2")}
    pubs = publish_experts(object_store, owner, experts, round=7, parent_version=None, config_hash=SHAPE,
                           endpoint=ENDPOINT)
    assert [p.manifest.uid for p in pubs] == ["0.0", "1.2"]
    prefix = f"checkpoints/experts/1.2/{owner.ss58_address}/7"
    assert pubs[1].keys == (f"{prefix}/weights.safetensors", f"{prefix}/manifest.json")
    assert object_store.list("checkpoints/experts/1.2/") == sorted(pubs[1].keys)
    for pub in pubs:
        verified = _read(object_store, pub, owner)
        assert verified.manifest_sha256 == pub.manifest_sha256
        states = load_verified_experts(verified, [pub.manifest.uid], DIM, INTER)
        for name, p in experts[pub.manifest.uid].named_parameters():
            assert torch.equal(states[pub.manifest.uid][name], p)


def test_flipped_byte_is_refused(published, owner):
    store, pub, _ = published
    key = pub.keys[0]
    data = bytearray(store.get_bytes(key))
    data[len(data) // 2] ^= 0x01
    store.put_bytes(key, bytes(data))
    with pytest.raises(DigestMismatchError, match="sha256"):
        _read(store, pub, owner)


def test_truncated_file_is_refused(published, owner):
    store, pub, _ = published
    store.put_bytes(pub.keys[0], store.get_bytes(pub.keys[0])[:-10])
    with pytest.raises(SizeMismatchError, match="truncated"):
        _read(store, pub, owner)


def test_missing_file_is_refused(published, owner):
    store, pub, _ = published
    store.delete(pub.keys[0])
    with pytest.raises(MissingFileError):
        _read(store, pub, owner)


def test_manifest_signed_by_another_key_is_refused(published, owner, other):
    store, pub, _ = published
    with pytest.raises(SignatureError, match="not by the expected hotkey"):
        _read(store, pub, other)
    # Another key's manifest written over the owner's, claiming the owner's hotkey.
    forged = dataclasses.replace(pub.manifest, signature=sign_payload(other, pub.manifest.payload()))
    store.put_bytes(pub.manifest_key, forged.to_bytes())
    with pytest.raises(SignatureError, match="does not verify"):
        read_verified(store, pub.manifest_key, expected_hotkey=owner.ss58_address)


def test_manifest_for_another_model_config_is_refused(published, owner):
    store, pub, _ = published
    with pytest.raises(ConfigMismatchError):
        read_verified(store, pub.manifest_key, expected_hotkey=owner.ss58_address,
                      expected_config_hash=config_hash({"dim": 16, "inter_dim": 32, "n_experts": 4}))


def test_manifest_not_matching_the_committed_digest_is_refused(published, owner):
    store, pub, _ = published
    with pytest.raises(CommitmentMismatchError, match="committed"):
        read_verified(store, pub.manifest_key, expected_hotkey=owner.ss58_address,
                      expected_manifest_sha256="0" * 64)


def test_valid_manifest_copied_to_another_round_is_refused(published, owner):
    store, pub, _ = published
    moved = [k.replace("/3/", "/4/") for k in pub.keys]
    for src, dst in zip(pub.keys, moved):
        store.put_bytes(dst, store.get_bytes(src))
    with pytest.raises(MisplacedManifestError):
        read_verified(store, moved[-1], expected_hotkey=owner.ss58_address)


class _Spy:
    """Records the keys downloaded through ObjectStore.get_bytes."""

    def __init__(self, store: ObjectStore, monkeypatch):
        self.keys: list[str] = []
        real = store.get_bytes

        def get_bytes(key, max_bytes=None):
            self.keys.append(key)
            return real(key, max_bytes)
        monkeypatch.setattr(store, "get_bytes", get_bytes)


def test_files_over_the_limit_are_refused_before_download(published, owner, monkeypatch):
    store, pub, _ = published
    spy = _Spy(store, monkeypatch)
    manifest_size = len(pub.manifest.to_bytes())
    assert pub.manifest.files["weights.safetensors"].size > manifest_size + 1
    with pytest.raises(CheckpointTooLargeError, match="not downloaded"):
        _read(store, pub, owner, max_bytes=manifest_size + 1)
    assert spy.keys == [pub.manifest_key]  # the weights were never requested
    spy.keys.clear()
    with pytest.raises(CheckpointTooLargeError, match="manifest"):
        _read(store, pub, owner, max_bytes=100)
    assert spy.keys == []
    # The store itself: a HEAD, then a refusal without a GET.
    monkeypatch.setattr(store._client, "get_object", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.raises(ObjectTooLargeError, match="refused before download"):
        store.get_bytes(pub.keys[0], max_bytes=10)


def test_signed_but_unusable_weights_are_refused(object_store, owner):
    def publish(tensors, uid="0.0"):
        pub = publish_checkpoint(object_store, owner, kind="expert", uid=uid, round=1, parent_version=None,
                                 config_hash=SHAPE, files={"weights.safetensors": save(tensors)}, endpoint=ENDPOINT)
        return read_verified(object_store, pub.manifest_key, expected_hotkey=owner.ss58_address)

    good = {f"0.0.{k}": v for k, v in init_expert("0.0", DIM, INTER, seed=0).state_dict().items()}
    with pytest.raises(InvalidWeightsError, match="NaN"):
        load_verified_experts(publish({**good, "0.0.w2.weight": torch.full((DIM, INTER), float("nan"))}),
                              ["0.0"], DIM, INTER)
    with pytest.raises(InvalidWeightsError, match="dtype"):
        load_verified_experts(publish({**good, "0.0.w2.weight": torch.ones(DIM, INTER, dtype=torch.int32)}),
                              ["0.0"], DIM, INTER)
    with pytest.raises(InvalidWeightsError, match="shape"):
        load_verified_experts(publish(good), ["0.0"], DIM, 2 * INTER)
    with pytest.raises(InvalidWeightsError, match="checkpoint of expert 0.1"):
        load_verified_experts(publish(good, uid="0.1"), ["0.1"], DIM, INTER)


def test_expert_service_starts_from_the_latest_global_url(object_store, owner, other):
    experts = {uid: init_expert(uid, DIM, INTER, seed=9) for uid in ("0.0", "0.1", "1.0")}
    publish_global(object_store, owner, version=1, round=4, parent_version=None, config_hash=SHAPE,
                   files={GLOBAL_EXPERTS_FILE: expert_weights_bytes(experts), "config.json": b"{}"})
    url = f"s3://{object_store.bucket}/{LATEST_KEY}"
    assert parse_s3_url(url).key == LATEST_KEY
    loaded = load_experts_from_url(url, object_store.for_bucket("moe-subnet"), ["0.1", "1.0"], DIM, INTER,
                                   trusted_hotkeys={owner.ss58_address}, expected_config_hash=SHAPE)
    assert list(loaded) == ["0.1", "1.0"]
    assert torch.equal(loaded["1.0"].w2.weight, experts["1.0"].w2.weight)
    via_folder = load_experts_from_url(f"s3://{object_store.bucket}/checkpoints/global/1", object_store, ["0.0"],
                                       DIM, INTER, trusted_hotkeys=owner.ss58_address)
    assert isinstance(via_folder["0.0"], SwiGLU)
    with pytest.raises(SignatureError, match="latest"):
        load_experts_from_url(url, object_store, ["0.0"], DIM, INTER, trusted_hotkeys=other.ss58_address)
    with pytest.raises(PublishError, match="not above"):
        publish_global(object_store, owner, version=1, round=5, parent_version=1, config_hash=SHAPE,
                       files={"x": b"1"})
    for bad in ("http://b/k", "s3://bucket", "s3:///key"):
        with pytest.raises(ValueError, match="s3://"):
            parse_s3_url(bad)


def test_reader_racing_a_global_writer_sees_only_complete_versions(object_store, owner, monkeypatch):
    versions = 12
    done = threading.Event()
    errors: list[BaseException] = []
    seen: list[int] = []

    def files(v: int) -> dict[str, bytes]:
        # Sizes change with the version, so a mix of two versions cannot pass the size checks by chance.
        return {f"{part}.bin": f"{part}{v};".encode() * (v + i + 1) for i, part in enumerate("abcd")}

    # The writer uploads slowly (like large files), so the reader runs many times per version.
    slow_store = ObjectStore(object_store.config)
    put_bytes = slow_store.put_bytes

    def slow_put(key, data, content_type="application/octet-stream"):
        time.sleep(0.01)
        put_bytes(key, data, content_type)
    monkeypatch.setattr(slow_store, "put_bytes", slow_put)

    def writer():
        try:
            for v in range(1, versions + 1):
                publish_global(slow_store, owner, version=v, files=files(v), round=v, parent_version=v - 1 or None,
                               config_hash=SHAPE)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            done.set()

    def reader():
        try:
            while not errors:
                try:
                    ckpt = read_latest_global(object_store, expected_hotkey=owner.ss58_address,
                                              expected_config_hash=SHAPE)
                except ObjectNotFoundError:
                    if done.is_set():
                        return
                    continue  # nothing published yet
                v = ckpt.manifest.version
                assert dict(ckpt.files) == files(v), f"version {v} has mixed content"
                assert not seen or v >= seen[-1], "latest went backwards"
                seen.append(v)
                if done.is_set() and v == versions:
                    return
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    # The reads interleaved with the writes (every version seen, most more than once).
    assert seen[-1] == versions and len(set(seen)) >= versions // 2 and len(seen) > 2 * versions, f"reads: {seen}"


def test_store_errors_name_the_place_and_a_stalled_s3_times_out(object_store, s3_server):
    with pytest.raises(ObjectNotFoundError, match=rf"s3://{object_store.bucket}/nope at {s3_server.endpoint}"):
        object_store.get_bytes("nope")
    assert not object_store.exists("nope")
    assert s3_server.secret_key not in repr(object_store.config)  # configs get logged
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        stalled = ObjectStore(S3Config(endpoint=f"127.0.0.1:{silent.getsockname()[1]}", access_key="a",
                                       secret_key="b", bucket="some-bucket", read_timeout_s=0.2))
        began = time.monotonic()
        with pytest.raises(StoreError, match="some-bucket/k"):
            stalled.get_bytes("k")
        assert time.monotonic() - began < 5
