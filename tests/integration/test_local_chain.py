"""LocalChain against a real redis-server: registration, blocks, commit-reveal, weights and
incentive, and two chain objects (two "processes") sharing one Redis.

Each test gets its own key prefix, so tests sharing the session's Redis never see each other.
Most tests drive a fake clock, so windows are hit exactly and nothing sleeps; one test checks
that blocks really advance with the Redis server's clock.
"""

import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
import redis
from bittensor_wallet import Keypair
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.validator.submissions import round_submissions
from subnet.chain.base import ChainError
from subnet.chain.config import ChainConfig, open_chain
from subnet.chain.local import LocalChain
from subnet.chain.signing import commit_payload, digest_of, reveal_payload, serve_payload, weights_payload
from subnet.envconfig import from_env
from subnet.rounds import RoundSchedule
from tests.manual_clock import ManualClock

pytestmark = pytest.mark.integration

BLOCK_S = 0.05
SCHEDULE = RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1)  # round r: blocks 10r..10r+9
KEYS = [Keypair.create_from_seed("0x" + f"{i + 1:02x}" * 32) for i in range(5)]
DATA = "manifests/miner-0/round-0.json"


@pytest.fixture
def prefix():
    return f"test:chain:{uuid.uuid4().hex[:8]}:"


@pytest.fixture
def clock():
    return ManualClock(1_000_000.0)


@pytest.fixture
def chain(redis_client, prefix, clock):
    chain = LocalChain(redis_client, SCHEDULE, block_s=BLOCK_S, key_prefix=prefix, clock=clock)
    chain.genesis()  # genesis = the clock's current time
    yield chain
    for key in redis_client.scan_iter(match=prefix + "*"):
        redis_client.delete(key)


def goto(chain, clock, block):
    """Move the fake clock to the middle of `block`."""
    clock.now = chain.genesis() + (block + 0.5) * BLOCK_S
    assert chain.block() == block


def commit(chain, key, round, data=DATA):
    digest = digest_of(data)
    chain.commit(key.ss58_address, round, digest, key.sign(commit_payload(key.ss58_address, round, digest)))


def reveal(chain, key, round, data=DATA):
    chain.reveal(key.ss58_address, round, data, key.sign(reveal_payload(key.ss58_address, round, data)))


def set_weights(chain, key, uids, weights):
    chain.set_weights(key.ss58_address, uids, weights, key.sign(weights_payload(key.ss58_address, uids, weights)))


def test_register_is_idempotent_and_uids_are_dense(chain):
    a, b = KEYS[0].ss58_address, KEYS[1].ss58_address
    assert chain.register(a, coldkey="cold-a", stake=5.0) == 0
    assert chain.register(b) == 1
    assert chain.register(a, stake=99.0) == 0                 # again: same uid, nothing changed
    graph = chain.metagraph()
    assert [(n.uid, n.hotkey, n.coldkey, n.stake, n.validator_permit) for n in graph.neurons] == \
        [(0, a, "cold-a", 5.0, True), (1, b, "", 0.0, False)]
    assert graph.validator_hotkeys == {a} and graph.hotkeys == {a, b}
    with pytest.raises(ChainError, match="not a valid SS58"):
        chain.register("not-a-hotkey")


def test_concurrent_registrations_get_one_uid_per_hotkey(chain):
    results = []
    threads = [threading.Thread(target=lambda k=k: results.append((k.ss58_address, chain.register(k.ss58_address))))
               for k in KEYS for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_hotkey = {}
    for hotkey, uid in results:
        by_hotkey.setdefault(hotkey, set()).add(uid)
    assert all(len(uids) == 1 for uids in by_hotkey.values())
    assert sorted(uid for (uid,) in by_hotkey.values()) == list(range(len(KEYS)))


def test_blocks_advance_with_the_redis_clock(redis_client, prefix):
    chain = LocalChain(redis_client, SCHEDULE, block_s=BLOCK_S, key_prefix=prefix)
    try:
        first = chain.block()
        time.sleep(0.3)                                       # 6 blocks of 50 ms
        second = chain.block()
        assert 4 <= second - first <= 12
    finally:
        redis_client.delete(prefix + "genesis")


def test_commit_then_matching_reveal_is_accepted(chain, clock, redis_client, prefix):
    chain.register(KEYS[0].ss58_address)
    goto(chain, clock, 12)                                    # round 1, train
    commit(chain, KEYS[0], 1)
    goto(chain, clock, 16)                                    # round 1, first reveal block
    reveal(chain, KEYS[0], 1)
    reveal(chain, KEYS[0], 1)                                 # a retried reveal is a no-op
    [c] = chain.commitments(1)
    assert (c.hotkey, c.round, c.digest, c.commit_block, c.revealed, c.reveal_block) == \
        (KEYS[0].ss58_address, 1, digest_of(DATA), 12, DATA, 16)
    assert chain.commitments(0) == [] and chain.commitments(2) == []
    assert 0 < redis_client.pttl(prefix + "commit:1")          # old rounds expire


def test_commitments_of_one_block_keep_the_order_they_were_made_in(chain, clock):
    """Who copied whom is decided by commitment order: within one block it must be the order the chain
    applied them, not the hotkeys' (a copier with a smaller hotkey would otherwise come first)."""
    first, second = sorted(KEYS[:2], key=lambda k: k.ss58_address, reverse=True)   # the larger hotkey first
    for key in (first, second):
        chain.register(key.ss58_address)
    goto(chain, clock, 12)
    commit(chain, first, 1)
    commit(chain, second, 1)                                  # same block
    goto(chain, clock, 16)
    for key in (first, second):
        reveal(chain, key, 1)
    made = chain.commitments(1)
    assert [c.commit_block for c in made] == [12, 12]
    assert [c.hotkey for c in made] == [first.ss58_address, second.ss58_address]
    assert made[0].commit_index < made[1].commit_index
    miners, _ = round_submissions(made)
    assert [s.hotkey for s in sorted(miners, key=lambda s: s.order)] == [first.ss58_address, second.ss58_address]


def test_mismatched_reveal_is_rejected(chain, clock):
    chain.register(KEYS[0].ss58_address)
    goto(chain, clock, 5)
    commit(chain, KEYS[0], 0)
    goto(chain, clock, 6)
    with pytest.raises(ChainError, match="revealed data does not match the commitment"):
        reveal(chain, KEYS[0], 0, data="manifests/someone-else.json")
    assert chain.commitments(0)[0].revealed is None


def test_reveal_outside_the_window_is_rejected(chain, clock):
    chain.register(KEYS[0].ss58_address)
    goto(chain, clock, 4)
    commit(chain, KEYS[0], 0)
    for block in (5, 8, 16):                                  # still committing, validating, next round's reveal
        goto(chain, clock, block)
        with pytest.raises(ChainError, match=rf"at block {block} is outside its reveal window: blocks 6..7"):
            reveal(chain, KEYS[0], 0)
    goto(chain, clock, 7)                                     # last block of the window still counts
    reveal(chain, KEYS[0], 0)


def test_commit_outside_its_window_and_reveal_without_commit_are_rejected(chain, clock):
    chain.register(KEYS[0].ss58_address)
    goto(chain, clock, 6)
    with pytest.raises(ChainError, match="block 6 is outside its commit window: blocks 0..5"):
        commit(chain, KEYS[0], 0)
    with pytest.raises(ChainError, match="outside its commit window: blocks 10..15"):
        commit(chain, KEYS[0], 1)                             # a future round
    with pytest.raises(ChainError, match="made no commitment for round 0"):
        reveal(chain, KEYS[0], 0)


def test_second_commit_in_the_same_round_is_rejected(chain, clock):
    chain.register(KEYS[0].ss58_address)
    goto(chain, clock, 1)
    commit(chain, KEYS[0], 0)
    goto(chain, clock, 5)
    with pytest.raises(ChainError, match="already committed for round 0"):
        commit(chain, KEYS[0], 0, data="manifests/better.json")
    assert chain.commitments(0)[0].digest == digest_of(DATA)
    goto(chain, clock, 11)
    commit(chain, KEYS[0], 1, data="manifests/better.json")   # the next round takes a new one


def test_bad_signature_is_rejected(chain, clock):
    chain.register(KEYS[0].ss58_address, stake=1.0)
    goto(chain, clock, 1)
    digest = digest_of(DATA)
    forged = KEYS[1].sign(commit_payload(KEYS[0].ss58_address, 0, digest))
    with pytest.raises(ChainError, match="commit for round 0: bad signature"):
        chain.commit(KEYS[0].ss58_address, 0, digest, forged)
    replayed = KEYS[0].sign(commit_payload(KEYS[0].ss58_address, 7, digest))   # signed for another round
    with pytest.raises(ChainError, match="bad signature"):
        chain.commit(KEYS[0].ss58_address, 0, digest, replayed)
    with pytest.raises(ChainError, match="set_weights: bad signature"):
        chain.set_weights(KEYS[0].ss58_address, [0], [1.0], KEYS[0].sign(weights_payload(KEYS[0].ss58_address,
                                                                                          [0], [0.5])))
    assert chain.commitments(0) == [] and chain.weights() == {}


def test_unregistered_hotkey_is_rejected(chain, clock):
    goto(chain, clock, 1)
    with pytest.raises(ChainError, match="hotkey .* is not registered"):
        commit(chain, KEYS[3], 0)
    goto(chain, clock, 6)
    with pytest.raises(ChainError, match="hotkey .* is not registered"):
        reveal(chain, KEYS[3], 0)
    with pytest.raises(ChainError, match="hotkey .* is not registered"):
        set_weights(chain, KEYS[3], [0], [1.0])
    with pytest.raises(ChainError, match="hotkey .* is not registered"):
        chain.set_stake(KEYS[3].ss58_address, 1.0)


def test_set_weights_needs_a_permit_and_registered_uids(chain, clock):
    miner = chain.register(KEYS[0].ss58_address)
    chain.register(KEYS[1].ss58_address, stake=10.0)
    with pytest.raises(ChainError, match=rf"uid {miner}\) has no validator permit"):
        set_weights(chain, KEYS[0], [miner], [1.0])
    with pytest.raises(ChainError, match=r"uids \[7\] are not registered"):
        set_weights(chain, KEYS[1], [miner, 7], [1.0, 0.0])
    with pytest.raises(ChainError, match="all weights are zero"):
        set_weights(chain, KEYS[1], [miner], [0.0])
    goto(chain, clock, 3)
    set_weights(chain, KEYS[1], [miner], [4.0])
    assert chain.weights() == {1: {miner: 1.0}}
    assert chain.metagraph().by_hotkey(KEYS[1].ss58_address).last_weights_block == 3
    chain.set_stake(KEYS[1].ss58_address, 0.0)                # losing the stake loses the permit
    with pytest.raises(ChainError, match="no validator permit"):
        set_weights(chain, KEYS[1], [miner], [1.0])


def test_incentive_follows_the_stake_weighted_median(chain):
    m0, m1, m2 = (chain.register(k.ss58_address) for k in KEYS[:3])
    v_small, v_mid, v_big = KEYS[3], KEYS[4], Keypair.create_from_seed("0x" + "99" * 32)
    for key, stake in ((v_small, 1.0), (v_mid, 2.0), (v_big, 2.0)):
        chain.register(key.ss58_address, stake=stake)
    set_weights(chain, v_small, [m0, m1], [1.0, 0.0])          # a small validator backs m0 alone
    set_weights(chain, v_mid, [m1, m2], [3.0, 1.0])
    set_weights(chain, v_big, [m1, m2], [1.0, 1.0])
    # m0: (1.0, 0, 0) -> 0; m1: (0, .75, .5) -> .5; m2: (0, .25, .5) -> .25 (4 of 5 stake gave >= .25).
    graph = chain.metagraph()
    got = {n.uid: n.incentive for n in graph.neurons}
    assert got[m0] == 0.0
    assert got[m1] == pytest.approx(2 / 3) and got[m2] == pytest.approx(1 / 3)
    assert sum(got.values()) == pytest.approx(1.0)
    chain.set_stake(v_small.ss58_address, 10.0)                # now it holds the majority on its own
    got = {n.uid: n.incentive for n in chain.metagraph().neurons}
    assert got[m0] == pytest.approx(1.0) and got[m1] == 0.0


def test_two_chain_objects_over_one_redis_agree(chain, clock, redis_server, prefix):
    # Another "process": its own client (decoding replies to str, unlike the fixture's), its own
    # clock that started much later; it must still find the first one's genesis and state.
    other_client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    other_clock = ManualClock(clock.now + 500.0)
    other = LocalChain(other_client, SCHEDULE, block_s=BLOCK_S, key_prefix=prefix, clock=other_clock)
    try:
        assert other.genesis() == chain.genesis()
        other_clock.now = clock.now = chain.genesis() + 13.5 * BLOCK_S
        assert chain.block() == other.block() == 13
        uid = chain.register(KEYS[0].ss58_address)
        assert other.register(KEYS[0].ss58_address) == uid
        assert other.register(KEYS[1].ss58_address, stake=1.0) == uid + 1
        commit(other, KEYS[0], 1)
        with pytest.raises(ChainError, match="already committed"):
            commit(chain, KEYS[0], 1)
        other_clock.now = clock.now = chain.genesis() + 16.5 * BLOCK_S
        reveal(chain, KEYS[0], 1)
        set_weights(other, KEYS[1], [uid], [1.0])
        assert chain.commitments(1) == other.commitments(1)
        assert chain.metagraph() == other.metagraph()
        assert chain.weights() == other.weights() == {uid + 1: {uid: 1.0}}
    finally:
        other_client.close()


def test_an_unreachable_redis_is_a_chain_error():
    # No retries: redis-py's default backoff would only make the test slow.
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))
    chain = LocalChain(client, SCHEDULE, block_s=BLOCK_S)
    with pytest.raises(ChainError, match="unreachable"):
        chain.block()
    with pytest.raises(ChainError, match="unreachable"):
        chain.metagraph()


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "subnet.chain", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_cli_registers_and_shows_the_metagraph(redis_server, redis_client, prefix):
    # Long blocks: the chain stays at block 0 however slowly the subprocesses start.
    env = {"CHAIN_REDIS_URL": redis_server.url, "CHAIN_KEY_PREFIX": prefix, "CHAIN_BLOCK_S": "1000"}
    try:
        validator, miner = KEYS[0].ss58_address, KEYS[1].ss58_address
        assert cli("register", "--hotkey", validator, "--stake", "12.5", env=env).stdout.strip() == \
            f"{validator} has uid 0"
        assert cli("register", "--hotkey", miner, env=env).returncode == 0
        LocalChain(redis_client, SCHEDULE, block_s=1000, key_prefix=prefix).serve(
            miner, "10.0.0.7:50051", KEYS[1].sign(serve_payload(miner, "10.0.0.7:50051")))
        status = cli("status", env=env)
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0].startswith("block 0  round 0  phase train")
        assert lines[1].split()[-1] == "endpoint"
        assert lines[2].split() == ["0", f"{validator[:6]}…{validator[-5:]}", "validator", "12.500", "0.0000", "-",
                                    "-"]   # weights never set, nothing served
        assert lines[3].split()[2] == "miner" and lines[3].split()[-1] == "10.0.0.7:50051"
        assert cli("stake", "--hotkey", miner, "--stake", "1", env=env).returncode == 0
        assert cli("weights", env=env).stdout.strip() == "(no weights set)"
    finally:
        for key in redis_client.scan_iter(match=prefix + "*"):
            redis_client.delete(key)


def test_cli_errors_are_one_line_without_a_traceback():
    down = cli("status", env={"CHAIN_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert down.returncode == 1
    assert down.stderr.startswith("error: local chain (Redis) unreachable") and len(down.stderr.splitlines()) == 1
    bad_config = cli("status", env={"CHAIN": "ethereum"})
    assert (bad_config.returncode, bad_config.stderr.strip()) == (1, "error: CHAIN='ethereum' is not one of local, "
                                                                   "bittensor")
    bad_args = cli("register", "--stake", "1", env={})
    assert bad_args.returncode == 2 and "the following arguments are required: --hotkey" in bad_args.stderr
    assert "Traceback" not in down.stderr + bad_config.stderr + bad_args.stderr


def test_open_chain_from_env_config_reaches_the_local_chain(redis_server, redis_client, prefix):
    config = from_env(ChainConfig, {"CHAIN_REDIS_URL": redis_server.url, "CHAIN_KEY_PREFIX": prefix,
                                    "CHAIN_BLOCK_S": "0.5"})
    chain = open_chain(config, SCHEDULE)
    try:
        assert isinstance(chain, LocalChain) and chain.block_s == 0.5
        assert chain.register(KEYS[0].ss58_address) == 0
        assert redis_client.hget(prefix + "uids", KEYS[0].ss58_address) == b"0"
        assert chain.hyperparameters().tempo == SCHEDULE.tempo_blocks
    finally:
        chain.close()
        for key in redis_client.scan_iter(match=prefix + "*"):
            redis_client.delete(key)


def serve(chain, key, endpoint):
    chain.serve(key.ss58_address, endpoint, key.sign(serve_payload(key.ss58_address, endpoint)))


def endpoints(chain):
    return {n.hotkey: n.endpoint for n in chain.metagraph().neurons}


def test_serve_publishes_the_endpoint_of_that_neuron_and_serving_again_replaces_it(chain):
    a, b = KEYS[0].ss58_address, KEYS[1].ss58_address
    chain.register(a)
    chain.register(b)
    assert endpoints(chain) == {a: "", b: ""}
    serve(chain, KEYS[0], "expert-0:50051")
    assert endpoints(chain) == {a: "expert-0:50051", b: ""}
    serve(chain, KEYS[0], "[::1]:50052")
    assert endpoints(chain) == {a: "[::1]:50052", b: ""}


def test_serve_is_refused_without_a_valid_signature_or_registration(chain):
    a = KEYS[0].ss58_address
    chain.register(a)
    serve(chain, KEYS[0], "10.0.0.1:50051")
    forged = KEYS[1].sign(serve_payload(a, "10.6.6.6:50051"))              # another identity's signature
    with pytest.raises(ChainError, match="serve: bad signature"):
        chain.serve(a, "10.6.6.6:50051", forged)
    other_endpoint = KEYS[0].sign(serve_payload(a, "10.0.0.2:50051"))      # signed for another endpoint
    with pytest.raises(ChainError, match="serve: bad signature"):
        chain.serve(a, "10.6.6.6:50051", other_endpoint)
    with pytest.raises(ChainError, match="serve: signature must be bytes"):
        chain.serve(a, "10.6.6.6:50051", "not bytes")
    with pytest.raises(ChainError, match="serve: hotkey .* is not registered"):
        serve(chain, KEYS[3], "10.0.0.3:50051")
    assert endpoints(chain) == {a: "10.0.0.1:50051"}


@pytest.mark.parametrize("endpoint", ["", "nohost", ":50051", "host:", "host:0", "host:70000", "host:12a", "host:+1",
                                      "host:١٢", "a b:1", "user@host:1", "host/x:1", "::1:50051", "[nothex]:1",
                                      "[::1:50051", "h" * 295 + ":50051", None, 50051,
                                      "unix:50051", "UNIX-abstract:4242", "dns:50051", "vsock:1"])   # gRPC schemes
def test_malformed_endpoints_are_refused(chain, endpoint):
    a = KEYS[0].ss58_address
    chain.register(a)
    signature = KEYS[0].sign(serve_payload(a, endpoint)) if isinstance(endpoint, str) else b"x" * 64
    with pytest.raises(ChainError, match="serve: endpoint "):
        chain.serve(a, endpoint, signature)
    assert endpoints(chain) == {a: ""}


@pytest.mark.parametrize("endpoint", ["[::1]:50051", "10.0.0.1:50051", "expert-0:50051", "a:65535",
                                      "expert-0.experts.moe.svc.cluster.local:1", "h" * 294 + ":50051"])
def test_well_formed_endpoints_are_accepted(chain, endpoint):
    chain.register(KEYS[0].ss58_address)
    serve(chain, KEYS[0], endpoint)
    assert endpoints(chain) == {KEYS[0].ss58_address: endpoint}


@pytest.mark.parametrize("stored", [b"not json", b"\xff\xfe", b"[]", b"\"expert-0:1\"", b"{}", b"{\"endpoint\": 5}",
                                    b"{\"endpoint\": \"a b:1\"}", b"[" * 100_000])
def test_garbage_in_the_endpoints_hash_reads_as_no_endpoint(chain, redis_client, prefix, stored):
    """Miners can write the chain's Redis: what one stores there by hand must not break everyone's metagraph."""
    a, b = (chain.register(k.ss58_address) for k in KEYS[:2])
    serve(chain, KEYS[1], "expert-1:50051")
    redis_client.hset(prefix + "endpoints", mapping={str(a): stored, "not-a-uid": b"{\"endpoint\": \"x:1\"}"})
    assert endpoints(chain) == {KEYS[0].ss58_address: "", KEYS[1].ss58_address: "expert-1:50051"}
