"""ExpertPublisher and the start-up resume against a real SeaweedFS: a round's reveal data names
exactly what was published, timer checkpoints go to the round still open for commitment, and a
restarted service finds its newest complete checkpoint (and nobody else's)."""

import json

import pytest
import torch

from services.expert.publisher import ExpertPublisher, latest_own_round, load_own_checkpoint, open_round
from subnet.checkpoints import read_verified
from subnet.expert_weights import init_expert
from subnet.identity import Identity
from subnet.manifest import sha256_hex
from subnet.rounds import RoundSchedule

pytestmark = pytest.mark.integration
DIM, INTER = 8, 16
UIDS = ["0.0", "1.1"]


def experts(seed):
    return {uid: init_expert(uid, DIM, INTER, seed) for uid in UIDS}


def test_round_publish_reveals_the_manifests_it_wrote(object_store):
    me = Identity.generate()
    current = experts(seed=1)
    publisher = ExpertPublisher(object_store, me, lambda: current, DIM, INTER)
    data = json.loads(publisher.publish(3))
    assert sorted(data) == UIDS
    for uid, sha in data.items():
        key = f"checkpoints/experts/{uid}/{me.hotkey}/3/manifest.json"
        assert sha256_hex(object_store.get_bytes(key)) == sha
        verified = read_verified(object_store, key, expected_hotkey=me.hotkey, expected_manifest_sha256=sha)
        assert verified.manifest.round == 3


def test_restart_resumes_from_the_newest_complete_own_checkpoint(object_store):
    me, other = Identity.generate(), Identity.generate()
    ExpertPublisher(object_store, me, lambda: experts(seed=1), DIM, INTER).publish(1)
    ExpertPublisher(object_store, me, lambda: experts(seed=2), DIM, INTER).publish(2)
    # Round 4 is incomplete (one uid only) and another hotkey published round 9: neither is ours to resume.
    ExpertPublisher(object_store, me, lambda: {"0.0": experts(seed=3)["0.0"]}, DIM, INTER).publish(4)
    ExpertPublisher(object_store, other, lambda: experts(seed=4), DIM, INTER).publish(9)
    assert latest_own_round(object_store, UIDS, me.hotkey) == 2
    round, loaded, parent = load_own_checkpoint(object_store, UIDS, me.hotkey, DIM, INTER)
    assert parent is None  # published without a global version behind it
    assert round == 2
    want = experts(seed=2)
    for uid in UIDS:
        for name, p in want[uid].state_dict().items():
            torch.testing.assert_close(loaded[uid].state_dict()[name], p)
    assert load_own_checkpoint(object_store, UIDS, Identity.generate().hotkey, DIM, INTER) is None


def test_timer_checkpoints_never_go_to_a_committed_round():
    schedule = RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1)
    assert [open_round(schedule, b) for b in (0, 3, 4, 5, 6, 9, 10)] == [0, 0, 1, 1, 1, 1, 1]
