"""ROUTER_DISCOVERY=chain against real parts: a real redis-server holding the local chain (and
nothing else the miners write), an expert service (EXPERT_SERVE_ON_CHAIN=1, no REDIS_URL: it never
touches the registry) and a router built by RemoteParts.connect. The service publishes its
endpoint on the chain, the router finds it there, asks it what it hosts, and its Forwards return
the service's experts' outputs; a hotkey that lists the same endpoint as its own gets nothing."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
import redis
import torch

from moe.experts import SwiGLU
from services.expert.config import ExpertConfig
from services.expert.server import ExpertServer
from services.router.chain_directory import ChainDirectory
from services.router.config import RouterConfig
from services.router.remote_experts import RemoteExpertGroup
from services.router.remote_model import RemoteParts
from subnet.auth.policy import ChainPolicy
from subnet.chain.base import Metagraph, Neuron
from subnet.chain.local import LocalChain
from subnet.chain.signing import serve_payload
from subnet.envconfig import from_env
from subnet.identity import Identity
from subnet.rounds import RoundConfig
from subnet.wire.v1 import expert_pb2

pytestmark = pytest.mark.integration

DIM, INTER = 16, 32


class _Loop:
    """An asyncio loop in a thread, for an in-process expert service beside synchronous router code."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine, timeout_s: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5.0)


def _wait_for(condition, what: str, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_a_router_finds_and_uses_experts_through_the_chain_alone(redis_server):
    prefix = f"moe:chain:discovery-{uuid.uuid4().hex[:8]}:"
    chain_env = {"CHAIN": "local", "CHAIN_REDIS_URL": redis_server.url, "CHAIN_KEY_PREFIX": prefix}
    client = redis.Redis.from_url(redis_server.url)
    chain = LocalChain(client, from_env(RoundConfig, {}).schedule(), key_prefix=prefix)
    miner, squatter, router = Identity.generate(), Identity.generate(), Identity.generate()
    for identity in (miner, squatter, router):
        chain.register(identity.hotkey)
    torch.manual_seed(0)
    experts = {"0.0": SwiGLU(DIM, INTER), "0.1": SwiGLU(DIM, INTER)}
    config = from_env(ExpertConfig, {"EXPERT_UIDS": "0.0,0.1", "EXPERT_DIM": str(DIM), "EXPERT_INTER_DIM": str(INTER),
                                     "EXPERT_PORT": "0", "EXPERT_FRAMES_PORT": "-1", "EXPERT_SERVE_ON_CHAIN": "1",
                                     "AUTH_ALLOWLIST": router.hotkey, **chain_env})
    assert config.redis_url == ""   # this miner writes no registry entry
    loop = _Loop()
    server = ExpertServer(config, experts=experts, identity=miner)
    parts = None
    try:
        loop.run(server.start())
        _wait_for(lambda: server.listing.published, "the service's listing")
        assert chain.metagraph().by_hotkey(miner.hotkey).endpoint == server.endpoint
        # A rival lists the same endpoint as its own: a valid listing, but the service answers for
        # its own hotkey only.
        chain.serve(squatter.hotkey, server.endpoint, squatter.sign(serve_payload(squatter.hotkey, server.endpoint)))

        parts = RemoteParts.connect(from_env(RouterConfig, {
            "REDIS_URL": redis_server.url, "ROUTER_DISCOVERY": "chain", "ROUTER_FOLLOW_SCORES": "0",
            "ROUTER_REGISTRY_REFRESH_S": "0.2", "ROUTER_DISCOVERY_PRIVATE": "1", **chain_env}), identity=router)
        _wait_for(lambda: parts.replicas.replicas("0.1"), "the router to find expert 0.1")
        for uid in ("0.0", "0.1"):
            assert [(r.endpoint, r.hotkey) for r in parts.replicas.replicas(uid)] == [(server.endpoint, miner.hotkey)]
        skipped = parts.metrics.chain_endpoints_skipped.labels("unreachable")
        _wait_for(lambda: skipped._value.get() >= 1, "the squatter's probe to be counted")
        # Refreshes from two threads at once (start-up's wait for experts does that beside the
        # background refresh), each probing the one endpoint for both hotkeys in parallel: the
        # squatter is never credited with the miner's answer.
        seen = []

        def refresh_many():
            for _ in range(5):
                seen.extend((r.uid, r.hotkey) for reps in parts.chain_source.all_replicas().values() for r in reps)

        threads = [threading.Thread(target=refresh_many) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert seen and {hotkey for _, hotkey in seen} == {miner.hotkey}

        group = RemoteExpertGroup(0, 2, DIM, parts.replicas, timeout_s=30.0, clients=parts.clients)
        x = {0: torch.randn(3, DIM), 1: torch.randn(5, DIM)}
        with torch.no_grad():
            out = group.run(x)
            for i, uid in ((0, "0.0"), (1, "0.1")):
                torch.testing.assert_close(out[i], experts[uid](x[i]), rtol=1e-5, atol=1e-6)
    finally:
        if parts is not None:
            parts.close()
        loop.run(server.stop(grace_s=0))
        loop.close()
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


def test_a_listing_deleted_or_redirected_through_redis_is_published_again(redis_server):
    """On the local chain any writer of its Redis can change a listing (only Bittensor stops that):
    the service checks its listing every EXPERT_LISTING_CHECK_S and puts it back."""
    prefix = f"moe:chain:relist-{uuid.uuid4().hex[:8]}:"
    chain_env = {"CHAIN": "local", "CHAIN_REDIS_URL": redis_server.url, "CHAIN_KEY_PREFIX": prefix}
    client = redis.Redis.from_url(redis_server.url)
    chain = LocalChain(client, from_env(RoundConfig, {}).schedule(), key_prefix=prefix)
    miner, router = Identity.generate(), Identity.generate()
    uid = chain.register(miner.hotkey)
    config = from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", "EXPERT_DIM": str(DIM), "EXPERT_INTER_DIM": str(INTER),
                                     "EXPERT_PORT": "0", "EXPERT_FRAMES_PORT": "-1", "EXPERT_SERVE_ON_CHAIN": "1",
                                     "EXPERT_LISTING_CHECK_S": "0.1", "AUTH_ALLOWLIST": router.hotkey, **chain_env})
    loop = _Loop()
    server = ExpertServer(config, experts={"0.0": SwiGLU(DIM, INTER)}, identity=miner)
    published = server.metrics.chain_listings_published

    def listed():
        return chain.metagraph().by_hotkey(miner.hotkey).endpoint

    try:
        loop.run(server.start())
        _wait_for(lambda: listed() == server.endpoint and published._value.get() == 1, "the first listing")
        client.hdel(prefix + "endpoints", str(uid))   # deleted
        _wait_for(lambda: listed() == server.endpoint and published._value.get() == 2, "the listing to come back")
        # Redirected: a stored record that names another endpoint (a write serve() would refuse).
        client.hset(prefix + "endpoints", str(uid), json.dumps({"endpoint": "10.9.9.9:1", "block": 1}))
        _wait_for(lambda: listed() == server.endpoint and published._value.get() == 3
                  and server.metrics.chain_listed._value.get() == 1, "the listing to come back")
    finally:
        loop.run(server.stop(grace_s=0))
        loop.close()
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


# ---- the directory alone, with stand-in probes (no network) ------------------------------------

class _Policy:
    def __init__(self, metagraph):
        self.metagraph, self.asked = metagraph, 0

    def want_read(self):
        self.asked += 1

    def stop(self):
        pass


def _answer(*uids, load=0, version=3):
    return expert_pb2.InfoResponse(experts=[expert_pb2.ExpertInfo(uid=u, version=version, queued_tokens=load)
                                            for u in uids])


def test_directory_takes_what_each_listed_hotkey_answers_and_leaves_out_the_rest():
    a, b, c, d = (Identity.generate().hotkey for _ in range(4))
    graph = Metagraph(block=1, neurons=(Neuron(0, a, endpoint="10.0.0.1:1"), Neuron(1, b, endpoint="10.0.0.2:1"),
                                        Neuron(2, c, endpoint="10.0.0.3:1"), Neuron(3, d)))   # d serves nothing
    answers = {("10.0.0.1:1", a): _answer("0.0", "0.1", load=7),
               ("10.0.0.2:1", b): _answer("0.1", "0.1"),                     # names an expert twice
               ("10.0.0.3:1", c): ConnectionError("refused")}
    asked = []

    def probe(endpoint, hotkey, timeout_s):
        asked.append((endpoint, hotkey))
        answer = answers[(endpoint, hotkey)]
        if isinstance(answer, Exception):
            raise answer
        return answer

    skipped = []
    directory = ChainDirectory(_Policy(graph), probe, timeout_s=1.0, on_skip=skipped.append,
                               private_addresses=True)
    try:
        replicas = directory.all_replicas()
    finally:
        directory.stop()
    assert sorted(asked) == sorted(answers)                     # d lists no endpoint: not asked
    assert {uid: [(r.endpoint, r.hotkey, r.load, r.version) for r in reps] for uid, reps in replicas.items()} == {
        "0.0": [("10.0.0.1:1", a, 7, 3)], "0.1": [("10.0.0.1:1", a, 7, 3)]}
    assert sorted(skipped) == ["malformed", "unreachable"]


def test_directory_asks_for_an_early_metagraph_read_while_nothing_is_routable():
    """A router started before its miners listed (none yet in the metagraph) must not wait
    AUTH_CHAIN_REFRESH_S to find them; once something is routable it does not ask."""
    hotkey = Identity.generate().hotkey
    policy = _Policy(Metagraph(block=1, neurons=(Neuron(0, hotkey),)))   # registered, not listed yet
    directory = ChainDirectory(policy, lambda *args: _answer("0.0"), private_addresses=True)
    try:
        assert directory.all_replicas() == {} and policy.asked == 1
        policy.metagraph = Metagraph(block=2, neurons=(Neuron(0, hotkey, endpoint="10.0.0.1:1"),))
        assert list(directory.all_replicas()) == ["0.0"] and policy.asked == 1
    finally:
        directory.stop()


@pytest.mark.parametrize("experts, why", [
    ([expert_pb2.ExpertInfo(uid="")], "empty"),
    ([expert_pb2.ExpertInfo(uid="x" * 65)], "longer than 64"),
    ([expert_pb2.ExpertInfo(uid="0.\n1")], "unprintable"),
    ([expert_pb2.ExpertInfo(uid="0.1", version=-1)], "negative"),
    ([expert_pb2.ExpertInfo(uid="0.1", queued_tokens=-5)], "negative"),
    ([expert_pb2.ExpertInfo(uid=f"0.{i}") for i in range(4097)], "at most 4096"),
])
def test_directory_refuses_hostile_info_answers(experts, why, caplog):
    hotkey = Identity.generate().hotkey
    graph = Metagraph(block=1, neurons=(Neuron(0, hotkey, endpoint="10.0.0.1:1"),))
    skipped = []
    directory = ChainDirectory(_Policy(graph), lambda *args: expert_pb2.InfoResponse(experts=experts),
                               on_skip=skipped.append, private_addresses=True)
    try:
        with caplog.at_level("WARNING"):
            assert directory.all_replicas() == {}
    finally:
        directory.stop()
    assert skipped == ["malformed"] and why in caplog.text


def test_directory_fails_closed_before_the_metagraph_is_read():
    policy = _Policy(None)
    directory = ChainDirectory(policy, lambda *args: pytest.fail("nothing may be probed"))
    try:
        assert directory.all_replicas() == {}
    finally:
        directory.stop()
    assert policy.asked == 1   # and asks for a read soon


def test_each_hotkey_listing_an_endpoint_is_credited_only_with_its_own_answer():
    """Two hotkeys naming one endpoint: each probe names the hotkey it is for, and what a probe for
    one returns is never credited to the other (the real probe signs for, and checks the answer of,
    exactly that hotkey: InfoProbe)."""
    a, b = Identity.generate().hotkey, Identity.generate().hotkey
    graph = Metagraph(block=1, neurons=(Neuron(0, a, endpoint="10.0.0.1:1"), Neuron(1, b, endpoint="10.0.0.1:1")))

    def probe(endpoint, hotkey, timeout_s):
        time.sleep(0.02)   # both probes in flight at once
        if hotkey != a:
            raise PermissionError(f"the answer is signed by {a}, not by {hotkey}")
        return _answer("0.0")

    directory = ChainDirectory(_Policy(graph), probe, workers=4, private_addresses=True)
    try:
        for _ in range(5):
            assert [(r.endpoint, r.hotkey) for r in directory.all_replicas()["0.0"]] == [("10.0.0.1:1", a)]
    finally:
        directory.stop()


def test_private_addresses_are_not_asked_unless_allowed():
    """A registered hotkey listing 169.254.169.254 or 10.x must not make the router call into its
    own network; nor a hostname (the local chain only), which could resolve to such an address."""
    hotkeys = [Identity.generate().hotkey for _ in range(5)]
    endpoints = ["169.254.169.254:80", "10.0.0.1:50051", "[::1]:50051", "8.8.8.8:50051", "expert-0:50051"]
    graph = Metagraph(block=1, neurons=tuple(Neuron(i, h, endpoint=e)
                                             for i, (h, e) in enumerate(zip(hotkeys, endpoints))))
    for allowed, expect in ((False, {"8.8.8.8:50051"}), (True, set(endpoints))):
        asked, skipped = [], []

        def probe(endpoint, hotkey, timeout_s, asked=asked):
            asked.append(endpoint)
            return _answer(f"0.{len(asked)}")

        directory = ChainDirectory(_Policy(graph), probe, on_skip=skipped.append, private_addresses=allowed)
        try:
            directory.all_replicas()
        finally:
            directory.stop()
        assert set(asked) == expect
        assert sorted(skipped) == ([] if allowed else ["hostname", "private", "private", "private"])


def test_a_refresh_ends_by_its_deadline_whatever_the_endpoints_do():
    """Silent endpoints queue behind the workers: the refresh gives up on them at its deadline
    (3 probe timeouts) instead of waiting for every one."""
    hotkeys = [Identity.generate().hotkey for _ in range(6)]
    graph = Metagraph(block=1, neurons=tuple(Neuron(i, h, endpoint=f"10.0.0.{i}:1") for i, h in enumerate(hotkeys)))
    release = threading.Event()

    def probe(endpoint, hotkey, timeout_s):
        release.wait(5.0)   # a black hole: answers only when the test lets it
        return _answer("0.0")

    skipped = []
    directory = ChainDirectory(_Policy(graph), probe, timeout_s=0.2, workers=2, on_skip=skipped.append,
                               private_addresses=True)
    try:
        started = time.monotonic()
        assert directory.all_replicas() == {}
        took = time.monotonic() - started
    finally:
        release.set()
        directory.stop()
    assert skipped == ["unreachable"] * 6
    assert took < 5.0   # it did not wait for the black holes (the bound, not a speed goal)


def test_chain_policy_keeps_the_metagraph_it_read():
    graph = Metagraph(block=5, neurons=(Neuron(0, Identity.generate().hotkey, endpoint="10.0.0.1:1"),))

    class Chain:
        def metagraph(self):
            return graph

    policy = ChainPolicy(Chain(), require_validator_permit=False)
    assert policy.metagraph is None
    assert policy.refresh() and policy.metagraph is graph
