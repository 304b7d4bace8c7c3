"""The merge phase on real Redis and S3: one replica with outer lr 1 and no momentum becomes the
global expert exactly (the scorer's scores decide who counts), the router's trunk replaces the
old one, and the momentum survives a restart; two replicas trained on different data merge into
a model no worse than they are; the service runs a round by itself as the chain moves."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from safetensors.torch import load, save

from moe.data import BatchSampler
from moe.experts import ROUTED_EXPERT_KEY
from moe.train.checkpoint import WEIGHTS_FILE
from services.router.trunk_publisher import trunk_config_hash
from services.validator.evaluation import run_batches
from services.validator.global_model import set_experts
from services.validator.service import ValidatorService
from services.validator.validator import Validator
from subnet.checkpoints import latest_global_version, publish_checkpoint
from subnet.validation_results import TASK_GROUP, ValidationResult
from tests.integration.test_validator_rounds import World, global_states, init_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration


@pytest.fixture
def make_world(redis_client, object_store, init_dir, tmp_path, client_identity):  # noqa: F811
    torch.set_num_threads(1)
    worlds = []

    def make(**overrides) -> World:
        worlds.append(World(redis_client, object_store, init_dir, tmp_path / "run", client_identity, **overrides))
        return worlds[-1]

    yield make
    for w in worlds:
        w.validator.close()
        for key in redis_client.scan_iter(match=w.prefix + "*"):
            redis_client.delete(key)


def store_results(w: World, round: int, results: list[ValidationResult]) -> None:
    """Results as the validator's workers store them (the gate itself is tested elsewhere)."""
    for r in results:
        w.redis.hset(w.validator.queue.result_key(round), r.hotkey, r.to_json())


def publish_trunk(w: World, router, round: int, shift: float) -> str:
    """The router's trunk for `round`: the global trunk with every weight moved by `shift`."""
    tensors = {k: v + shift for k, v in load(w.glob.files[WEIGHTS_FILE]).items()}
    files = {**w.glob.files, WEIGHTS_FILE: save(tensors, metadata={"format": "pt"})}
    pub = publish_checkpoint(w.store, router, kind="trunk", files=files, round=round, parent_version=0,
                             config_hash=trunk_config_hash(w.glob.config["lm_config"]))
    return json.dumps({"trunk": {"key": pub.manifest_key, "sha256": pub.manifest_sha256}})


def test_one_replica_with_outer_lr_1_and_no_momentum_becomes_the_global_expert(make_world, client_identity):
    w = make_world(merge_outer_lr=1.0, merge_momentum=0.0)
    uids = ["0.1", "1.3"]
    winner, loser, router, impostor = w.miner(), w.miner(), w.miner(stake=1.0), w.miner()
    replica = global_states(w.glob, uids, noise=0.01, seed=1)
    reveals = [(winner, w.publish(winner, 1, replica)),
               (loser, w.publish(loser, 1, global_states(w.glob, uids, noise=0.01, seed=2)))]
    trunk = publish_trunk(w, router, 1, shift=0.001)
    reveals += [(impostor, trunk), (router, trunk)]  # the impostor claims the router's trunk first
    for offset, (who, data) in enumerate(reveals):
        w.commit(who, 1, data, offset=offset)
    w.reveal_all(1, reveals)
    # By loss_delta the loser would weigh more; the scorer's scores rank it out (negative score).
    store_results(w, 1, [ValidationResult(1, winner.hotkey, experts=tuple(uids), verified=True, loss_delta=0.1),
                         ValidationResult(1, loser.hotkey, experts=tuple(uids), verified=True, loss_delta=0.5)])
    w.redis.hset(f"{w.validator.scores_prefix}round:1", mapping={winner.hotkey: 0.2, loser.hotkey: -0.3})
    try:
        w.at(1, "merge")
        outcome = w.validator.merge_round(1)
    finally:
        w.redis.delete(f"{w.validator.scores_prefix}round:1")
    assert outcome.merged == {uid: [(winner.hotkey, 1.0)] for uid in uids} and outcome.trunk_from == router.hotkey

    new = w.validator.global_model()  # read back from S3, verified
    assert (new.version, new.parent_version, new.round) == (1, 0, 1)
    for uid, state in new.experts.items():
        want = replica[uid] if uid in uids else w.glob.experts[uid]
        for name, t in state.items():
            torch.testing.assert_close(t, want[name], rtol=0, atol=1e-7, msg=f"{uid}.{name}")
    assert new.files[WEIGHTS_FILE] != w.glob.files[WEIGHTS_FILE]
    torch.testing.assert_close(new.model.tok_emb.weight, w.glob.model.tok_emb.weight + 0.001)
    assert w.validator.merge_round(1) is None  # already merged

    # A restarted validator continues the outer optimizer: momentum = global - average.
    restarted = Validator(w.config, client_identity, w.chain, w.store, w.redis)
    assert sorted(restarted.merger.momentum) == uids
    torch.testing.assert_close(restarted.merger.momentum["0.1"]["w1.weight"],
                               w.glob.experts["0.1"]["w1.weight"] - replica["0.1"]["w1.weight"], rtol=0, atol=1e-7)
    restarted.close()


def train_experts(glob, corpus, domains: dict[str, float], steps: int, seed: int) -> dict:
    """The global experts after `steps` of training on some domains only (trunk frozen), as a miner would."""
    model = copy.deepcopy(glob.model).train()
    params = [p for n, p in model.named_parameters() if ROUTED_EXPERT_KEY.match(n)]
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    sampler = BatchSampler(corpus, "train", glob.lm_cfg.block_size, 8, seed=seed, domain_weights=domains)
    for _ in range(steps):
        x, y, _ = sampler.next()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return {uid: {n: model.blocks[int(uid[0])].ffn.experts[int(uid[2])].get_parameter(n).detach().clone()
                  for n in glob.experts[uid]} for uid in glob.experts}


def test_merged_model_is_no_worse_than_the_replicas_it_merges(make_world):
    w = make_world(merge_outer_lr=1.0, merge_momentum=0.0, eval_batches=4)
    corpus = w.validator.corpus(w.glob)
    # Different data from the same start: one miner sees prose and scripture, the other code and scripture.
    replicas = {w.miner(): train_experts(w.glob, corpus, d, steps=20, seed=i)
                for i, d in enumerate([{"prose": 1.0, "scripture": 1.0}, {"code": 1.0, "scripture": 1.0}])}
    reveals = [(m, w.publish(m, 1, states)) for m, states in replicas.items()]
    for offset, (m, data) in enumerate(reveals):
        w.commit(m, 1, data, offset=offset)
    w.reveal_all(1, reveals)

    base = w.validator.evaluator.baseline(w.glob, corpus, 1)
    losses = {}
    for m, states in replicas.items():
        model = copy.deepcopy(w.glob.model)
        set_experts(model, states)
        losses[m.hotkey], _ = run_batches(model, base.batches)
    assert all(loss < base.global_loss for loss in losses.values())  # both trained into something better
    (a, b) = replicas.values()
    assert max(float((a[u][n] - b[u][n]).abs().max()) for u in a for n in a[u]) > 1e-3  # into different things
    store_results(w, 1, [ValidationResult(1, h, experts=tuple(w.glob.uids), verified=True, loss=loss,
                                          loss_delta=base.global_loss - loss) for h, loss in losses.items()])
    outcome = w.validator.merge_round(1)
    assert all(len(chosen) == 2 for chosen in outcome.merged.values()) and len(outcome.merged) == 8
    merged_loss, _ = run_batches(outcome.model, base.batches)
    assert merged_loss <= sum(losses.values()) / len(losses), (merged_loss, losses)


def test_service_validates_and_merges_as_the_chain_moves(make_world):
    w = make_world(workers=2, claim_idle_s=1.0)
    miner, router = w.miner(), w.miner(stake=1.0)
    reveals = [(miner, w.publish(miner, 1, global_states(w.glob, ["0.2"]))),
               (router, publish_trunk(w, router, 1, 0.01))]
    for offset, (who, data) in enumerate(reveals):
        w.commit(who, 1, data, offset=offset)
    w.reveal_all(1, reveals)
    queue = w.validator.queue
    w.validator.enqueue_round(1)
    assert [t.hotkey for t in queue.take("crashed-worker", block_ms=100)] == [miner.hotkey]  # and never finished

    service = ValidatorService(w.validator, w.config, poll_s=0.05).start()
    try:
        _wait(lambda: miner.hotkey in queue.results(1), "the reclaimed task's result")
        w.at(1, "merge")
        _wait(lambda: latest_global_version(w.store) == 1, "global version 1")
    finally:
        service.stop(grace_s=10)
    assert "unreachable" in queue.results(1)[miner.hotkey].reason  # evaluated, not merged
    assert w.validator.global_model().files[WEIGHTS_FILE] != w.glob.files[WEIGHTS_FILE]  # the router's trunk
    assert queue.redis.xpending(queue.tasks_key, TASK_GROUP)["pending"] == 0
    assert w.validator.metrics.reclaims._value.get() >= 1
    assert queue.redis.xlen(queue.results_key) == 1  # however often it was taken over, stored once


def _wait(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
