"""The adversarial test miners (services/expert/adversary.py) really cheat, only when allowed, and
an honest service follows a merged global version at the start of a round."""

import json
import time
import uuid

import pytest
import redis
import torch

from services.expert.adversary import copycat, noisy
from services.expert.config import ExpertConfig
from services.expert.publisher import ExpertPublisher
from subnet.checkpoints import GLOBAL_EXPERTS_FILE, publish_global
from subnet.envconfig import from_env
from subnet.expert_client import ExpertClientPool
from subnet.expert_weights import expert_weights_bytes, init_expert
from subnet.identity import Identity
from subnet.manifest import config_hash
from subnet.rounds import RoundSchedule
from subnet.tensor_codec import decode, encode

pytestmark = pytest.mark.integration
DIM, INTER = 16, 32
UIDS = ["0.0", "0.1"]


def test_an_adversary_needs_the_test_flag():
    with pytest.raises(ValueError, match="EXPERT_ALLOW_ADVERSARY=1"):
        from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", "EXPERT_ADVERSARY": "lazy"})
    with pytest.raises(ValueError, match="choose one of"):
        from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", "EXPERT_ADVERSARY": "sneaky", "EXPERT_ALLOW_ADVERSARY": "1"})


def _client(service, identity):
    pool = ExpertClientPool(identity=identity)
    return pool, pool.get(service.endpoint, service.hotkey)


def _train_once(client, x, g):
    client.forward("0.0", encode(x), call_id="c", step=1, training=True, timeout_s=10).result()
    client.backward("0.0", encode(g), call_id="c", step=1, session_id="s", timeout_s=10).result()
    client.apply_step("0.0", step=1, lr=0.05, grad_scale=1.0, weight_decay=0.0, beta1=0.9, beta2=0.95, eps=1e-8,
                      session_id="s", timeout_s=10).result()


def test_lazy_never_steps_and_liar_answers_at_random(expert_service_factory, client_identity):
    gen = torch.Generator().manual_seed(0)
    x, g, probe = (torch.randn(6, DIM, generator=gen) for _ in range(3))
    flags = {"EXPERT_ALLOW_ADVERSARY": "1", "EXPERT_SEED": "3"}
    lazy = expert_service_factory(UIDS, DIM, INTER, env={**flags, "EXPERT_ADVERSARY": "lazy"})
    liar = expert_service_factory(UIDS, DIM, INTER, env={**flags, "EXPERT_ADVERSARY": "liar"})
    want = init_expert("0.0", DIM, INTER, seed=3)(probe).detach()

    pool, client = _client(lazy, client_identity)
    _train_once(client, x, g)
    got = decode(client.forward("0.0", encode(probe), call_id="", step=0, training=False, timeout_s=10)
                 .result().outputs)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the step was acknowledged, not applied
    pool.close()

    pool, client = _client(liar, client_identity)
    got = decode(client.forward("0.0", encode(probe), call_id="", step=0, training=False, timeout_s=10)
                 .result().outputs)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
    assert abs(float(cosine)) < 0.5  # not the weights it publishes
    pool.close()


def test_noisy_and_copycat_publish_what_they_should_not(object_store):
    honest, cheat = Identity.generate(), Identity.generate()
    weights = {uid: init_expert(uid, DIM, INTER, seed=1).state_dict() for uid in UIDS}
    noisy_take = noisy(lambda: weights, scale=5.0)()
    for uid in UIDS:
        for name, t in weights[uid].items():
            assert (noisy_take[uid][name] - t).std() > 3 * t.std()

    schedule = RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1)

    class Block:  # a chain that stays in round 2
        def block(self):
            return 24

    # A recovery checkpoint taken while round 2 trains is not where round 2's work is looked up:
    # before the honest miner's commit-phase publish there is nothing to steal.
    ExpertPublisher(object_store, honest, lambda: weights, DIM, INTER, "127.0.0.1:50051").publish_recovery(2)
    with pytest.raises(RuntimeError, match="nobody else published"):
        copycat(object_store, cheat.hotkey, UIDS, DIM, INTER, schedule, Block(), wait_s=1)()
    ExpertPublisher(object_store, honest, lambda: weights, DIM, INTER, "127.0.0.1:50051").publish(2)
    stolen = copycat(object_store, cheat.hotkey, UIDS, DIM, INTER, schedule, Block(), wait_s=2)()
    for uid in UIDS:
        for name, t in weights[uid].items():
            torch.testing.assert_close(stolen[uid][name], t)


def test_an_honest_service_follows_a_newer_global_version(expert_service_factory, redis_server, s3_server,
                                                          object_store, client_identity):
    validator = Identity.generate()
    phases = {"train": 8, "commit": 4, "reveal": 4, "validate": 2, "merge": 2}
    prefix = f"test:follow:{uuid.uuid4().hex[:8]}:"
    env = {**s3_server.env(bucket=object_store.bucket), "CHAIN_REDIS_URL": redis_server.url,
           "CHAIN_KEY_PREFIX": prefix, "CHAIN_BLOCK_S": "0.25", "CHECKPOINT_SIGNERS": validator.hotkey,
           "EXPERT_CHECKPOINT_EVERY_S": "0", **{f"ROUND_{p.upper()}_BLOCKS": str(n) for p, n in phases.items()}}
    service = expert_service_factory(UIDS, DIM, INTER, env=env)
    merged = {uid: init_expert(uid, DIM, INTER, seed=42) for uid in UIDS}
    publish_global(object_store, validator, version=1, files={GLOBAL_EXPERTS_FILE: expert_weights_bytes(merged)},
                   round=0, parent_version=None, config_hash=config_hash({"test": "global"}))
    probe = torch.randn(5, DIM, generator=torch.Generator().manual_seed(1))
    want = merged["0.1"](probe).detach()
    pool, client = _client(service, client_identity)

    def serves_global():
        got = decode(client.forward("0.1", encode(probe), call_id="", step=0, training=False, timeout_s=10)
                     .result().outputs)
        return torch.allclose(got, want, atol=1e-5)

    deadline = time.monotonic() + 15  # a round is 5 s: the next train phase loads it
    while not serves_global():
        assert time.monotonic() < deadline, "the service did not load global version 1"
        time.sleep(0.3)
    assert "loaded the hosted experts from global version 1" in service.log()
    pool.close()
    client_redis = redis.Redis.from_url(redis_server.url)
    for key in client_redis.scan_iter(match=prefix + "*"):
        client_redis.delete(key)
    client_redis.close()
    assert json.loads(object_store.get_bytes("checkpoints/global/latest"))["version"] == 1
