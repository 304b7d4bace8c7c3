"""ExpertPublisher and the start-up resume against a real SeaweedFS: a round's reveal data names
exactly what was published, recovery (timer) checkpoints stay out of the rounds' layout, record
the round still open for commitment and carry the AdamW moments, and a restarted service finds
its newest complete checkpoint, round or recovery (and nobody else's)."""

import json
import logging

import pytest
import torch

from services.expert.publisher import (
    ExpertPublisher,
    expert_config_hash,
    latest_own_round,
    load_own_checkpoint,
    open_round,
)
from services.expert.recovery_files import RECOVERY_KEY_PURPOSE, open_recovery_files, sealed_recovery_files
from subnet.checkpoints import (
    OPTIMIZER_FILE,
    MisplacedManifestError,
    publish_checkpoint,
    read_verified,
)
from subnet.expert_weights import init_expert
from subnet.identity import Identity
from subnet.manifest import sha256_hex
from subnet.optimizer_moments import adamw_moments
from subnet.rounds import RoundSchedule
from subnet.sealed import SealError, seal

pytestmark = pytest.mark.integration
DIM, INTER = 8, 16
ENDPOINT = "127.0.0.1:50051"   # where the publishing service says it serves
UIDS = ["0.0", "1.1"]


def key(identity):
    return identity.derive_key(RECOVERY_KEY_PURPOSE)


def experts(seed):
    return {uid: init_expert(uid, DIM, INTER, seed) for uid in UIDS}


def test_round_publish_reveals_the_manifests_it_wrote(object_store):
    me = Identity.generate()
    current = experts(seed=1)
    publisher = ExpertPublisher(object_store, me, lambda: current, DIM, INTER, ENDPOINT)
    data = json.loads(publisher.publish(3))
    assert sorted(data) == UIDS
    for uid, sha in data.items():
        key = f"checkpoints/experts/{uid}/{me.hotkey}/3/manifest.json"
        assert sha256_hex(object_store.get_bytes(key)) == sha
        verified = read_verified(object_store, key, expected_hotkey=me.hotkey, expected_manifest_sha256=sha)
        assert verified.manifest.round == 3


def test_restart_resumes_from_the_newest_complete_own_checkpoint(object_store):
    me, other = Identity.generate(), Identity.generate()
    ExpertPublisher(object_store, me, lambda: experts(seed=1), DIM, INTER, ENDPOINT).publish(1)
    ExpertPublisher(object_store, me, lambda: experts(seed=2), DIM, INTER, ENDPOINT).publish(2)
    # Round 4 is incomplete (one uid only) and another hotkey published round 9: neither is ours to resume.
    ExpertPublisher(object_store, me, lambda: {"0.0": experts(seed=3)["0.0"]}, DIM, INTER, ENDPOINT).publish(4)
    ExpertPublisher(object_store, other, lambda: experts(seed=4), DIM, INTER, ENDPOINT).publish(9)
    assert latest_own_round(object_store, UIDS, me.hotkey) == 2
    round, loaded, parent, moments = load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER)
    assert parent is None  # published without a global version behind it
    assert moments == {}  # round checkpoints carry weights only
    assert round == 2
    want = experts(seed=2)
    for uid in UIDS:
        for name, p in want[uid].state_dict().items():
            torch.testing.assert_close(loaded[uid].state_dict()[name], p)
    assert load_own_checkpoint(object_store, UIDS, Identity.generate().hotkey, DIM, INTER) is None


def test_recovery_checkpoints_record_the_round_still_open_for_commitment():
    schedule = RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1)
    assert [open_round(schedule, b) for b in (0, 3, 4, 5, 6, 9, 10)] == [0, 0, 1, 1, 1, 1, 1]


def test_recovery_checkpoints_stay_out_of_the_rounds_and_cannot_be_passed_off_as_one(object_store):
    me = Identity.generate()
    ExpertPublisher(object_store, me, lambda: experts(seed=5), DIM, INTER, ENDPOINT).publish_recovery(7)
    assert not object_store.list("checkpoints/experts/")  # nothing where a round's submissions are looked up
    for uid in UIDS:
        key = f"checkpoints/recovery/{uid}/{me.hotkey}/manifest.json"
        verified = read_verified(object_store, key, expected_hotkey=me.hotkey)
        assert (verified.manifest.kind, verified.manifest.round, verified.manifest.uid) == ("recovery", 7, uid)
        # Copied byte for byte to where round 7 would be, it is refused: its kind names another place.
        round_prefix = f"checkpoints/experts/{uid}/{me.hotkey}/7"
        for name in ("weights.safetensors.sealed", "manifest.json"):
            object_store.put_bytes(f"{round_prefix}/{name}",
                                   object_store.get_bytes(f"checkpoints/recovery/{uid}/{me.hotkey}/{name}"))
        with pytest.raises(MisplacedManifestError):
            read_verified(object_store, f"{round_prefix}/manifest.json", expected_hotkey=me.hotkey)


@pytest.mark.parametrize("recovery_round, want_seed", [(3, 6), (2, 2), (1, 2)])
def test_restart_takes_the_recovery_checkpoint_only_when_it_is_newer(object_store, recovery_round, want_seed):
    """Recovery taken while round 3 was open beats round 2's checkpoint; taken while round 2 was
    open (before round 2's commit-phase publish) or earlier, it does not."""
    me = Identity.generate()
    ExpertPublisher(object_store, me, lambda: experts(seed=2), DIM, INTER, ENDPOINT).publish(2)
    ExpertPublisher(object_store, me, lambda: experts(seed=6), DIM, INTER, ENDPOINT).publish_recovery(recovery_round)
    round, loaded, _, _ = load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER, recovery_key=key(me))
    assert round == (recovery_round if want_seed == 6 else 2)
    want = experts(seed=want_seed)
    for uid in UIDS:
        torch.testing.assert_close(loaded[uid].state_dict()["w1.weight"], want[uid].state_dict()["w1.weight"])


def test_a_torn_recovery_checkpoint_is_passed_over_for_the_round_one(object_store, caplog):
    me = Identity.generate()
    ExpertPublisher(object_store, me, lambda: experts(seed=2), DIM, INTER, ENDPOINT).publish(2)
    ExpertPublisher(object_store, me, lambda: experts(seed=6), DIM, INTER, ENDPOINT).publish_recovery(3)
    # A crash between the files and the manifest: new weights under the old manifest.
    object_store.put_bytes(f"checkpoints/recovery/1.1/{me.hotkey}/weights.safetensors.sealed", b"torn")
    with caplog.at_level(logging.WARNING):
        round, loaded, _, _ = load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER, recovery_key=key(me))
    assert round == 2
    want = experts(seed=2)["0.0"].state_dict()["w1.weight"]
    torch.testing.assert_close(loaded["0.0"].state_dict()["w1.weight"], want)
    assert "passing over this hotkey's recovery checkpoint" in caplog.text


def test_only_a_recovery_checkpoint_is_enough_to_resume(object_store):
    me = Identity.generate()
    ExpertPublisher(object_store, me, lambda: experts(seed=6), DIM, INTER, ENDPOINT).publish_recovery(0)
    round, loaded, _, _ = load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER, recovery_key=key(me))
    assert round == 0 and sorted(loaded) == UIDS


def trained_with_moments(seed):
    """{uid: SwiGLU} after one AdamW step each, and their moments."""
    modules, moments = experts(seed), {}
    for uid, module in modules.items():
        opt = torch.optim.AdamW(module.parameters(), lr=0.01)
        for p in module.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        moments[uid] = adamw_moments(module, opt)
    return modules, moments


def test_recovery_checkpoints_carry_the_moments_and_round_ones_do_not(object_store):
    me = Identity.generate()
    modules, moments = trained_with_moments(seed=7)
    states = {uid: m.state_dict() for uid, m in modules.items()}
    publisher = ExpertPublisher(object_store, me, lambda: states, DIM, INTER, ENDPOINT,
                                recovery_snapshot=lambda: (states, {"0.0": moments["0.0"]}))
    publisher.publish(1)
    publisher.publish_recovery(2)
    assert not object_store.exists(f"checkpoints/experts/0.0/{me.hotkey}/1/optimizer.safetensors")
    found = load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER, recovery_key=key(me))
    assert found.round == 2 and sorted(found.moments) == ["0.0"]  # 1.1 had not stepped: no file for it
    for name, t in moments["0.0"].items():
        assert torch.equal(found.moments["0.0"][name], t), name


@pytest.mark.parametrize("recovery_round, recovery_parent, takes_moments", [
    (5, 3, True),    # taken while round 5 was open, just before its publish: the usual case
    (4, 3, True),    # taken while the previous round was open
    (3, 3, False),   # two rounds older: too stale
    (5, 2, False),   # from before a merge (another global version): not these weights' moments
])
def test_a_round_checkpoint_takes_the_moments_of_a_close_recovery_checkpoint(object_store, recovery_round,
                                                                             recovery_parent, takes_moments):
    me = Identity.generate()
    modules, moments = trained_with_moments(seed=7)
    states = {uid: m.state_dict() for uid, m in modules.items()}
    ExpertPublisher(object_store, me, lambda: states, DIM, INTER, ENDPOINT, parent_version=lambda: recovery_parent,
                    recovery_snapshot=lambda: (states, moments)).publish_recovery(recovery_round)
    ExpertPublisher(object_store, me, lambda: experts(seed=2), DIM, INTER, ENDPOINT,
                    parent_version=lambda: 3).publish(5)
    found = load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER, recovery_key=key(me))
    assert found.round == 5 and found.parent_version == 3
    want = experts(seed=2)["0.0"].state_dict()["w1.weight"]
    torch.testing.assert_close(found.experts["0.0"].state_dict()["w1.weight"], want)   # the round's weights
    if not takes_moments:
        assert found.moments == {}
        return
    assert sorted(found.moments) == UIDS
    for uid in UIDS:
        for name, t in moments[uid].items():
            assert torch.equal(found.moments[uid][name], t), (uid, name)


def test_signed_moments_that_cannot_be_read_leave_the_weights_resumable(object_store, caplog):
    """A file that passes the manifest's checks (its owner signed and sealed it) but is not a moments file:
    the weights still load and that expert starts Adam over, with a warning."""
    me = Identity.generate()
    modules = experts(seed=8)
    for uid in UIDS:
        prefix = f"checkpoints/recovery/{uid}/{me.hotkey}"
        files = sealed_recovery_files(key(me), prefix, uid, modules[uid].state_dict(), None)
        name = OPTIMIZER_FILE + ".sealed"
        files[name] = seal(key(me), b"not safetensors", f"{prefix}/{name}")
        publish_checkpoint(object_store, me, kind="recovery", uid=uid, round=3, parent_version=None,
                           config_hash=expert_config_hash(DIM, INTER), files=files)
    with caplog.at_level(logging.WARNING):
        found = load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER, recovery_key=key(me))
    assert found.round == 3 and found.moments == {}
    torch.testing.assert_close(found.experts["1.1"].state_dict()["w2.weight"], modules["1.1"].state_dict()["w2.weight"])
    assert "resumes without its AdamW moments" in caplog.text


def test_recovery_checkpoints_are_sealed_for_their_own_hotkey(object_store, caplog):
    """A rival reading the bucket finds the signed manifest and sealed bytes it cannot open, so it
    cannot publish the weights as its own before their owner commits them."""
    me, rival = Identity.generate(), Identity.generate()
    modules, moments = trained_with_moments(seed=9)
    states = {uid: m.state_dict() for uid, m in modules.items()}
    ExpertPublisher(object_store, me, lambda: states, DIM, INTER, ENDPOINT,
                    recovery_snapshot=lambda: (states, moments)).publish_recovery(4)
    manifest_key = f"checkpoints/recovery/0.0/{me.hotkey}/manifest.json"
    verified = read_verified(object_store, manifest_key, expected_hotkey=me.hotkey)   # anyone can check who
    assert sorted(verified.files) == ["optimizer.safetensors.sealed", "weights.safetensors.sealed"]
    for blob in verified.files.values():
        assert b"w1.weight" not in blob   # no safetensors header in the clear
    with pytest.raises(SealError, match="does not open with this hotkey's key"):
        open_recovery_files(key(rival), verified)
    opened = open_recovery_files(key(me), verified)
    assert sorted(opened.files) == ["optimizer.safetensors", "weights.safetensors"]
    # Without the key the owner's own recovery checkpoint is passed over, never loaded half-read.
    with caplog.at_level(logging.WARNING):
        assert load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER) is None
    assert "passing over this hotkey's recovery checkpoint: SealError" in caplog.text
    found = load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER, recovery_key=key(me))
    assert found.round == 4 and sorted(found.moments) == UIDS
    torch.testing.assert_close(found.experts["1.1"].state_dict()["w3.weight"], states["1.1"]["w3.weight"])


def test_without_the_private_key_bytes_no_recovery_checkpoint_is_written(object_store, caplog):
    """Nothing is published in the clear: an identity that cannot derive the sealing key writes none."""
    from bittensor_wallet import Keypair
    bare = Identity(Keypair.create_from_mnemonic(Keypair.generate_mnemonic()))
    with caplog.at_level(logging.WARNING):
        publisher = ExpertPublisher(object_store, bare, lambda: experts(seed=1), DIM, INTER, ENDPOINT)
    assert publisher.publish_recovery(1) is False
    assert object_store.list("checkpoints/recovery/") == []
    assert "recovery checkpoints are off" in caplog.text
    publisher.publish(1)   # round checkpoints do not need the key
    assert object_store.list(f"checkpoints/experts/0.0/{bare.hotkey}/1/")
