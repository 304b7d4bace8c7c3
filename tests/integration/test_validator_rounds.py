"""The validator on real Redis (streams, local chain) and real S3, with a tiny model: miners publish
signed expert checkpoints, commit and reveal them on the chain (a fake clock walks the phases),
and `validate_round` scores them: unchanged experts -> loss_delta 0, noisy experts -> worse,
a later identical commitment -> copy, a checkpoint changed after the commit -> not verified,
and the live service must serve what was published."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import torch

from moe.data import CorpusConfig, build_corpus
from moe.train import TrainConfig
from moe.train.checkpoint import load_lm
from moe.train.trainer import Trainer
from services.expert.publisher import expert_config_hash, reveal_data
from services.router.remote_model import export_expert_weights
from services.router.train import prepare_initial_checkpoint
from services.validator.config import ValidatorConfig
from services.validator.validator import Validator
from subnet.chain.local import LocalChain
from subnet.chain.signing import commit_payload, digest_of, reveal_payload
from subnet.checkpoints import publish_experts
from subnet.expert_weights import save_expert_weights
from subnet.identity import Identity, WalletConfig, load_identity
from subnet.registry import ExpertRegistry
from subnet.rounds import RoundConfig

pytestmark = pytest.mark.integration
ROUNDS = RoundConfig(train_blocks=4, commit_blocks=2, reveal_blocks=2, validate_blocks=2, merge_blocks=2)
SCHEDULE = ROUNDS.schedule()


PRETRAIN_STEPS = 40
_BUILT: dict[str, Path] = {}  # the other validator test modules import `init_dir`: built once per session


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """A `router init` output of the tiny preset on a small corpus, trained for a few steps first:
    an untrained model is uniform, so even random experts would not make it worse."""
    if "init" not in _BUILT:
        _BUILT["init"] = _pretrained_init(tmp_path_factory.mktemp("validator-init"))
    return _BUILT["init"]


def _pretrained_init(out: Path) -> Path:
    torch.set_num_threads(1)
    corpus_cfg = CorpusConfig(vocab_size=512, max_bytes_per_domain=60_000, cache_dir=str(out / "cache"))
    train_cfg = TrainConfig(steps=PRETRAIN_STEPS, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=PRETRAIN_STEPS,
                            eval_batches=1, keep_checkpoints=1)
    ckpt, experts_file, _ = prepare_initial_checkpoint(out / "init", "tiny", train_cfg, corpus_cfg, seed=0)
    model, _ = load_lm(ckpt)
    Trainer(model, build_corpus(corpus_cfg), train_cfg, out / "init", corpus_config=corpus_cfg, progress=False).train()
    export_expert_weights(model, experts_file)  # `latest` now names the trained step, and these are its experts
    return out / "init"


NOBODY = "127.0.0.1:9"   # the endpoint miners without a live service declare: refused at once


class World:
    """A local chain on a fake clock, a validator, and helpers to publish and commit as miners."""

    def __init__(self, redis_client, object_store, init_dir, run_dir, identity, **overrides):
        self.store, self.redis = object_store, redis_client
        self.prefix = f"test:validator:{uuid.uuid4().hex[:8]}:"
        self.now = 1000.0
        self.chain = LocalChain(redis_client, SCHEDULE, block_s=1.0, key_prefix=self.prefix + "chain:",
                                clock=lambda: self.now)
        self.chain.genesis()
        self.chain.register(identity.hotkey, stake=1.0)  # the validator holds a permit
        settings = {"eval_batches": 2, "eval_batch_size": 4, "probe_tokens": 64, "rpc_timeout_s": 5.0,
                    "claim_idle_s": 5.0, **overrides}
        self.config = ValidatorConfig(redis_url="redis://unused.invalid:6379/0",   # redis_client is passed
                                      key_prefix=self.prefix, s3=object_store.config, rounds=ROUNDS,
                                      init_checkpoint=str(init_dir), run_dir=str(run_dir), **settings)
        self.validator = Validator(self.config, identity, self.chain, object_store, redis_client)
        self.glob = self.validator.bootstrap()

    def at(self, round: int, phase: str, offset: int = 0) -> None:
        """Move the chain's clock into `phase` of `round` (plus `offset` blocks)."""
        self.now = self.chain.genesis() + SCHEDULE.phase_start(round, phase) + offset + 0.5

    def miner(self, identity: Identity | None = None, stake: float = 0.0) -> Identity:
        identity = identity or Identity.generate()
        self.chain.register(identity.hotkey, stake=stake)
        return identity

    def publish(self, miner: Identity, round: int, experts: dict, endpoint: str = NOBODY) -> str:
        cfg = self.glob.lm_cfg
        published = publish_experts(self.store, miner, experts, round=round, parent_version=self.glob.version,
                                    config_hash=expert_config_hash(cfg.dim, cfg.moe_inter_dim), endpoint=endpoint)
        return reveal_data(published)

    def commit(self, miner: Identity, round: int, data: str, offset: int = 0) -> None:
        self.at(round, "train", offset)  # the commit window is the train and commit phases
        self.chain.commit(miner.hotkey, round, digest_of(data), miner.sign(commit_payload(miner.hotkey, round,
                                                                                          digest_of(data))))

    def reveal_all(self, round: int, reveals: list[tuple[Identity, str]]) -> None:
        self.at(round, "reveal")
        for miner, data in reveals:
            self.chain.reveal(miner.hotkey, round, data, miner.sign(reveal_payload(miner.hotkey, round, data)))
        self.at(round, "validate")


def global_states(glob, uids, noise: float = 0.0, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {uid: {n: t + noise * torch.randn(t.shape, generator=gen) for n, t in glob.experts[uid].items()}
            for uid in uids}


@pytest.fixture
def world(redis_client, object_store, init_dir, tmp_path, client_identity):
    torch.set_num_threads(1)
    w = World(redis_client, object_store, init_dir, tmp_path / "run", client_identity)
    yield w
    w.validator.close()
    for key in redis_client.scan_iter(match=w.prefix + "*"):
        redis_client.delete(key)


def test_validate_round_scores_unchanged_noisy_copied_and_tampered_miners(world):
    uids = ["0.0", "0.1", "1.2"]
    same, noisy, original, copier, tamper, same_again = (world.miner() for _ in range(6))
    trained = global_states(world.glob, uids, noise=0.02, seed=5)  # stands in for a round of training
    reveals = []
    for offset, (miner, states) in enumerate([(same, global_states(world.glob, uids)),
                                              (noisy, global_states(world.glob, uids, noise=0.5)),
                                              (original, trained),
                                              (copier, trained),
                                              (tamper, global_states(world.glob, uids)),
                                              (same_again, global_states(world.glob, uids))]):
        data = world.publish(miner, 1, states)
        world.commit(miner, 1, data, offset=offset)  # one block apart: `same` is the earliest
        reveals.append((miner, data))
    world.publish(tamper, 1, global_states(world.glob, uids, noise=0.01))  # changed after its commit
    world.reveal_all(1, reveals)

    results = world.validator.validate_round(1, timeout_s=120)
    assert set(results) == {m.hotkey for m in (same, noisy, original, copier, tamper, same_again)}

    r = results[same.hotkey]
    assert r.experts == tuple(uids) and r.uid >= 0 and r.copy_of == ""
    assert abs(r.loss_delta) < 1e-6 and math.isfinite(r.global_loss)
    assert 0.0 <= r.diversity <= 1.0 and 0.0 <= r.active_ratio <= 1.0
    assert set(r.details["shares"]) == set(uids)
    # No live service serves these experts where the manifest says: the gate fails, the numbers remain.
    assert not r.verified and "live service 127.0.0.1:9 of expert" in r.reason and "unreachable" in r.reason

    assert results[noisy.hotkey].loss_delta < -0.01
    assert results[noisy.hotkey].copy_of == ""
    assert results[original.hotkey].copy_of == ""
    assert results[copier.hotkey].copy_of == original.hotkey
    assert f"copy of {original.hotkey}" in results[copier.hotkey].reason
    # The record says how close it came: the copier matches the original exactly, the original
    # (trained a little) is further from the global experts than the copy threshold.
    assert results[copier.hotkey].details["copy_check"]["earlier"][original.hotkey] > 0.999999
    assert results[original.hotkey].details["copy_check"]["global"] < 0.999
    # Republishing the global experts is nobody's work: not a copy (the loss score pays it nothing).
    assert results[same_again.hotkey].copy_of == "" and abs(results[same_again.hotkey].loss_delta) < 1e-6
    assert results[same_again.hotkey].details["copy_check"]["compared"] == "changes from the global experts"
    t = results[tamper.hotkey]
    assert not t.verified and "checkpoint not verified" in t.reason and "committed digest" in t.reason
    assert math.isnan(t.loss) and math.isnan(t.loss_delta) and math.isnan(t.diversity)

    # Stored once each, announced once each; a second run and a duplicate task change nothing.
    q = world.validator.queue
    assert q.redis.xlen(q.results_key) == 6
    assert world.validator.validate_round(1, timeout_s=30) == results
    q.redis.xadd(q.tasks_key, {"round": 1, "hotkey": noisy.hotkey, "global_version": 0})
    assert world.validator.work_once("test-dup", block_ms=100) == 1
    assert q.redis.xlen(q.results_key) == 6 and q.results(1) == results
    assert q.redis.xpending(q.tasks_key, "validators")["pending"] == 0


def test_a_copy_of_a_checkpoint_that_barely_moved_is_still_a_copy(world):
    """A first round trains little: every miner's experts stay within the copy threshold of the
    global ones, so outputs alone cannot tell a copy from an honest miner with the same start. The
    changes can: the copier's equal its source's, another honest miner's point elsewhere."""
    uids = ["0.0", "0.1", "1.2"]
    original, copier, honest = (world.miner() for _ in range(3))
    little = global_states(world.glob, uids, noise=2e-4, seed=5)   # a few small steps
    reveals = []
    for offset, (miner, states) in enumerate([(original, little), (copier, little),
                                              (honest, global_states(world.glob, uids, noise=2e-4, seed=6))]):
        data = world.publish(miner, 2, states)
        world.commit(miner, 2, data, offset=offset)
        reveals.append((miner, data))
    world.reveal_all(2, reveals)

    results = world.validator.validate_round(2, timeout_s=120)
    for miner in (original, copier, honest):   # all three within the threshold of the global experts
        check = results[miner.hotkey].details["copy_check"]
        assert check["global"] > world.validator.evaluator.settings.copy_cosine
        assert check["compared"] == "changes from the global experts"
    assert results[original.hotkey].copy_of == "" and results[honest.hotkey].copy_of == ""
    assert results[copier.hotkey].copy_of == original.hotkey
    assert results[copier.hotkey].details["copy_check"]["earlier"][original.hotkey] > 0.999999
    assert results[honest.hotkey].details["copy_check"]["earlier"][original.hotkey] < 0.5


def test_a_copy_is_a_copy_even_where_its_source_left_some_experts_untouched(world):
    """A miner that hosts every expert but was routed no tokens for some of them in a round publishes
    those unchanged (seen in `make demo`: round 0's copy went unflagged and was paid its source's
    score). An expert neither changed says nothing either way; the ones that changed must match.
    One changed by one miner and left as it was by the other differs."""
    original, copier, honest, partial = (world.miner() for _ in range(4))
    trained = global_states(world.glob, ["0.0", "0.1"], noise=2e-4, seed=5)
    untouched = global_states(world.glob, ["1.2"])   # exactly the global expert
    source = {**trained, **untouched}
    other = {**global_states(world.glob, ["0.0", "0.1"], noise=2e-4, seed=6), **untouched}
    # Copies what the source trained, but trains 1.2 itself: not the same function there.
    mixed = {**trained, **global_states(world.glob, ["1.2"], noise=2e-4, seed=7)}
    reveals = []
    for offset, (miner, states) in enumerate([(original, source), (copier, source), (honest, other),
                                              (partial, mixed)]):
        data = world.publish(miner, 2, states)
        world.commit(miner, 2, data, offset=offset)
        reveals.append((miner, data))
    world.reveal_all(2, reveals)

    results = world.validator.validate_round(2, timeout_s=120)
    assert results[copier.hotkey].copy_of == original.hotkey
    assert results[original.hotkey].copy_of == "" and results[honest.hotkey].copy_of == ""
    assert results[partial.hotkey].copy_of == ""
    assert results[partial.hotkey].details["copy_check"]["earlier"][original.hotkey] == 0.0


def test_live_service_must_serve_the_published_weights(world, expert_service_factory, tmp_path):
    uids = ["1.0", "1.1"]
    service, miner = _serving_miner(world, expert_service_factory, tmp_path, uids)

    def validate(round, states):
        data = world.publish(miner, round, states, endpoint=service.endpoint)
        world.commit(miner, round, data)
        world.reveal_all(round, [(miner, data)])
        return world.validator.validate_round(round, timeout_s=60)[miner.hotkey]

    ok = validate(1, global_states(world.glob, uids))  # what the service serves
    assert ok.verified and ok.reason == "", ok.reason
    assert all(c["cosine"] > 0.9999 and c["max_abs"] < 1e-4 for c in ok.details["live"]["1.0"])

    other = validate(2, global_states(world.glob, uids, noise=0.05))  # not what it serves
    assert not other.verified and "live service does not serve the published weights" in other.reason
    assert math.isfinite(other.loss_delta)

    service.kill()  # the endpoint its manifest names: the probe finds nobody there
    gone = validate(3, global_states(world.glob, uids))
    assert not gone.verified and "unreachable" in gone.reason


def test_a_rival_writing_the_registry_cannot_fail_a_miners_live_check(world, expert_service_factory, tmp_path,
                                                                      redis_client):
    """Every miner can write the registry. Before the live check went by the manifest's endpoint, a rival
    that deleted a miner's entries ("no live service registered") or added one in its name pointing
    nowhere ("unreachable") failed it, and the miner scored 0."""
    uids = ["1.0", "1.1"]
    service, miner = _serving_miner(world, expert_service_factory, tmp_path, uids)
    registry = ExpertRegistry(redis_client)
    for uid in uids:
        registry.register(uid, "127.0.0.1:9", hotkey=miner.hotkey)       # in its name, pointing nowhere
    for round in (1, 2):
        for uid in uids:
            registry.deregister(uid, service.endpoint)                   # its own entries gone (until it beats)
        data = world.publish(miner, round, global_states(world.glob, uids), endpoint=service.endpoint)
        world.commit(miner, round, data)
        world.reveal_all(round, [(miner, data)])
        result = world.validator.validate_round(round, timeout_s=60)[miner.hotkey]
        assert result.verified and result.reason == "", result.reason
        assert [c["endpoint"] for c in result.details["live"]["1.0"]] == [service.endpoint]


def test_a_miner_that_names_another_miners_endpoint_fails_the_live_check(world, expert_service_factory, tmp_path):
    """The endpoint is the publisher's own word: naming a rival's service (which serves exactly the weights
    it copied) gets the probe addressed to its own hotkey there, which that service refuses."""
    uids = ["1.0", "1.1"]
    service, owner = _serving_miner(world, expert_service_factory, tmp_path, uids)
    squatter = world.miner()
    states = global_states(world.glob, uids)
    reveals = [(owner, world.publish(owner, 1, states, endpoint=service.endpoint)),
               (squatter, world.publish(squatter, 1, states, endpoint=service.endpoint))]
    for offset, (miner, data) in enumerate(reveals):
        world.commit(miner, 1, data, offset=offset)
    world.reveal_all(1, reveals)
    results = world.validator.validate_round(1, timeout_s=60)
    assert results[owner.hotkey].verified, results[owner.hotkey].reason
    assert not results[squatter.hotkey].verified
    assert f"live service {service.endpoint} of expert 1.0" in results[squatter.hotkey].reason


def _serving_miner(world, expert_service_factory, tmp_path, uids):
    """An expert service serving the global weights of `uids`, and its wallet registered as a miner."""
    cfg = world.glob.lm_cfg
    served = tmp_path / "served.safetensors"
    save_expert_weights(served, {uid: _module(world.glob.experts[uid], cfg) for uid in uids})
    service = expert_service_factory(uids, cfg.dim, cfg.moe_inter_dim, env={"EXPERT_CHECKPOINT": str(served)})
    e = service.env
    miner = world.miner(load_identity(WalletConfig(name=e["WALLET_NAME"], hotkey=e["WALLET_HOTKEY"],
                                                   path=e["WALLET_PATH"])))
    return service, miner


def _module(state, cfg):
    from moe.experts import SwiGLU

    module = SwiGLU(cfg.dim, cfg.moe_inter_dim)
    module.load_state_dict(state)
    return module
