"""ROUTER_REGISTERED_EXPERTS_ONLY against a real Redis (registry and local chain): replicas of
hotkeys nobody registered on the chain are not routable, and become routable once registered
(within AUTH_CHAIN_RETRY_S of being seen, not AUTH_CHAIN_REFRESH_S); before the metagraph has
been read, nothing is (fail closed)."""

import time
import uuid

import pytest

from services.router.registered import RegisteredReplicas
from services.router.replicas import ReplicaSet
from subnet.auth.policy import ChainPolicy
from subnet.chain.local import LocalChain
from subnet.identity import Identity
from subnet.registry import ExpertRegistry
from subnet.rounds import RoundSchedule

pytestmark = pytest.mark.integration

SCHEDULE = RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1)
MINER, SYBIL = Identity.generate(), Identity.generate()


@pytest.fixture
def world(redis_client):
    prefix = f"test:registered:{uuid.uuid4().hex[:8]}:"
    chain = LocalChain(redis_client, SCHEDULE, block_s=1.0, key_prefix=prefix + "chain:")
    chain.genesis()
    registry = ExpertRegistry(redis_client, ttl_s=30.0, prefix=prefix + "expert:", require_signed=True)
    yield chain, registry
    for key in redis_client.scan_iter(match=prefix + "*"):
        redis_client.delete(key)


def test_only_registered_hotkeys_are_routable(world):
    chain, registry = world
    chain.register(MINER.hotkey)
    registry.register("0.1", "10.0.0.1:50051", signer=MINER)
    registry.register("0.1", "10.0.0.2:50051", signer=SYBIL)     # signed, but never registered
    registry.register("0.2", "10.0.0.2:50051", signer=SYBIL)
    policy = ChainPolicy(chain, require_validator_permit=False, refresh_s=3600).start()
    seen = []
    source = RegisteredReplicas(registry, policy, on_skip=seen.append)
    try:
        replicas = ReplicaSet(source, refresh_s=0.0)
        assert [r.endpoint for r in replicas.replicas("0.1")] == ["10.0.0.1:50051"]
        assert replicas.choose("0.2") is None
        assert source.skipped >= 1 and set(seen) == {"unregistered"}   # the Sybil's replicas
        chain.register(SYBIL.hotkey)     # registered now: routable after the next metagraph read
        assert policy.refresh()
        assert sorted(r.endpoint for r in replicas.replicas("0.1")) == ["10.0.0.1:50051", "10.0.0.2:50051"]
        assert replicas.choose("0.2").endpoint == "10.0.0.2:50051"
    finally:
        source.stop()


def test_nothing_is_routable_before_the_metagraph_is_read(world):
    chain, registry = world
    chain.register(MINER.hotkey)
    registry.register("0.1", "10.0.0.1:50051", signer=MINER)

    class DownChain:
        def metagraph(self):
            raise ConnectionError("chain unreachable")

    source = RegisteredReplicas(registry, ChainPolicy(DownChain(), require_validator_permit=False,
                                                      refresh_s=3600).start())
    try:
        assert source.all_replicas() == {}
    finally:
        source.stop()


def test_a_miner_registered_after_the_routers_read_is_routable_without_waiting_for_the_refresh(world):
    """What a Kubernetes router meets when it starts before the chain Job registers the miners: its
    first read finds nobody; the miner's entry being skipped makes the policy read again within
    retry_s, not refresh_s (an hour here)."""
    chain, registry = world
    registry.register("0.1", "10.0.0.1:50051", signer=MINER)
    policy = ChainPolicy(chain, require_validator_permit=False, refresh_s=3600, retry_s=0.05).start()
    source = RegisteredReplicas(registry, policy)
    try:
        replicas = ReplicaSet(source, refresh_s=0.0)
        assert replicas.choose("0.1") is None
        chain.register(MINER.hotkey)
        started = time.monotonic()
        deadline = started + 30.0
        while replicas.choose("0.1") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert replicas.choose("0.1").endpoint == "10.0.0.1:50051"
        assert policy.reads <= 2 + (time.monotonic() - started) / 0.05   # at most one read per retry_s
    finally:
        source.stop()
