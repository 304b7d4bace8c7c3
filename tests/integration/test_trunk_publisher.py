"""The router's trunk in S3 (real SeaweedFS): a snapshot handed over at a step boundary while a
"training" thread runs, published as a signed checkpoint, fetched back into a directory the
usual checkpoint loader reads, equal to the model at that step; a tampered trunk is refused."""

import json
import threading
import time

import pytest
import torch

from moe import MoELM
from moe.config import preset
from moe.train.checkpoint import load_lm
from services.router.trunk_publisher import TrunkSnapshots, fetch_trunk, publish_trunk_round, trunk_files
from subnet.identity import Identity
from subnet.manifest import CheckpointVerificationError

pytestmark = pytest.mark.integration


def tiny_model():
    torch.manual_seed(0)
    return MoELM(preset("tiny", vocab_size=64))


def test_trunk_round_trip_through_s3_matches_the_step_it_was_taken_at(object_store, tmp_path):
    model = tiny_model()
    state = {"step": 0}
    snapshots = TrunkSnapshots(lambda: trunk_files(model, {"lm_config": model.cfg.to_dict()}, state["step"], None))
    stop = threading.Event()
    steps_seen = []

    def train():  # stands in for RemoteTrainer: every step runs under the snapshot lock
        while not stop.is_set():
            with snapshots.step_lock:
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.01)
                        time.sleep(0.0005)  # a step takes a while: a torn snapshot would show
                state["step"] += 1
                steps_seen.append(state["step"])
            time.sleep(0.005)

    trainer = threading.Thread(target=train)
    trainer.start()
    me = Identity.generate()
    while len(steps_seen) < 2:
        time.sleep(0.005)
    try:
        data = json.loads(publish_trunk_round(object_store, me, snapshots, model.cfg.to_dict(), round=4))
    finally:
        stop.set()
        trainer.join()
    assert data["trunk"]["key"] == "checkpoints/trunk/4/manifest.json"

    out = fetch_trunk(f"s3://{object_store.bucket}/checkpoints/trunk/4", object_store, tmp_path / "trunk",
                      trusted_hotkeys={me.hotkey})
    loaded, config = load_lm(out)
    step = config["step"]
    assert 0 < step < steps_seen[-1]  # taken while the loop ran, between two of its steps
    initial = tiny_model().state_dict()
    for name, t in loaded.state_dict().items():  # every tensor moved by exactly `step` steps: not torn
        torch.testing.assert_close(t, initial[name] + 0.01 * step, msg=name)

    with pytest.raises(CheckpointVerificationError):  # someone else's trunk is not loaded
        fetch_trunk(f"s3://{object_store.bucket}/checkpoints/trunk/4", object_store, tmp_path / "other",
                    trusted_hotkeys={Identity.generate().hotkey})
    assert not (tmp_path / "other").exists() or not any((tmp_path / "other").iterdir())


def test_snapshot_without_a_training_loop_is_taken_at_once():
    model = tiny_model()
    snapshots = TrunkSnapshots(lambda: trunk_files(model, {"lm_config": model.cfg.to_dict()}, 7, None))
    files = snapshots.request(timeout_s=1)
    assert json.loads(files["config.json"])["step"] == 7 and len(files["model.safetensors"]) > 1000
