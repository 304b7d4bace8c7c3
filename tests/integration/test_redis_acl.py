"""The miners' Redis user (subnet/redis_acl.py) against a real redis-server with the same users
as the local stack: an expert service's own Redis work all goes through (registry, nonces, the
local chain's commit and reveal), and what only the validators and the scorer may write does not
(the task queue, the results stream, the round scores, the EMA the router follows, the bans).
"""

import asyncio

import pytest
import redis
from bittensor_wallet import Keypair

from services.scorer.store import ScoreStore
from services.stack.redis_users import stack_redis_users
from services.validator.task_queue import TaskQueue
from subnet.auth.nonces import RedisNonceStore
from subnet.chain.local import LocalChain
from subnet.chain.signing import commit_payload, digest_of, reveal_payload
from subnet.dev.redis_server import RedisServer
from subnet.redis_acl import MINER_USER, miner_rules
from subnet.registry import ExpertRegistry
from subnet.rounds import RoundSchedule
from subnet.validation_results import DEFAULT_PREFIX as VALIDATION_PREFIX
from tests.manual_clock import ManualClock

pytestmark = pytest.mark.integration

SCHEDULE = RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1)
BLOCK_S = 0.05
MINER_KEY = Keypair.create_from_seed("0x" + "07" * 32)


@pytest.fixture(scope="module")
def server():
    with RedisServer(users=stack_redis_users()) as srv:
        yield srv


@pytest.fixture
def admin(server):
    client = redis.Redis.from_url(server.url)
    yield client
    client.flushall()
    client.close()


@pytest.fixture
def miner(server, admin):
    client = redis.Redis.from_url(server.url_for(MINER_USER))
    yield client
    client.close()


def test_without_a_password_nothing_is_reachable(server):
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(host=server.host, port=server.port).ping()


def test_a_miner_registers_and_reads_the_registry(miner, admin):
    ExpertRegistry(miner, ttl_s=5).register("0.1", "127.0.0.1:50051", hotkey=MINER_KEY.ss58_address, load=3)
    seen = ExpertRegistry(admin).replicas("0.1")
    assert [(r.endpoint, r.load) for r in seen] == [("127.0.0.1:50051", 3)]
    assert [r.endpoint for r in ExpertRegistry(miner).replicas("0.1")] == ["127.0.0.1:50051"]
    ExpertRegistry(miner).deregister("0.1", "127.0.0.1:50051")
    assert ExpertRegistry(admin).replicas("0.1") == []


def test_a_miner_keeps_its_nonces(server, admin):
    store = RedisNonceStore(server.url_for(MINER_USER), ttl_s=30)
    assert store.claim("abc") is True
    assert store.claim("abc") is False   # a replay
    assert asyncio.run(store.aclaim("def")) is True


def test_a_miner_commits_and_reveals_on_the_local_chain(miner, admin):
    clock = ManualClock(1_000_000.0)
    owner = LocalChain(admin, SCHEDULE, block_s=BLOCK_S, clock=clock)   # the stack's side: genesis, registration
    owner.genesis()
    owner.register(MINER_KEY.ss58_address)
    chain = LocalChain(miner, SCHEDULE, block_s=BLOCK_S, clock=clock)
    hotkey, data = MINER_KEY.ss58_address, "manifests/miner/round-0.json"
    clock.now = chain.genesis() + 0.5 * BLOCK_S
    chain.commit(hotkey, 0, digest_of(data), MINER_KEY.sign(commit_payload(hotkey, 0, digest_of(data))))
    clock.now = chain.genesis() + 6.5 * BLOCK_S    # the reveal phase of round 0
    chain.reveal(hotkey, 0, data, MINER_KEY.sign(reveal_payload(hotkey, 0, data)))
    assert [(c.hotkey, c.revealed) for c in owner.commitments(0)] == [(hotkey, data)]
    assert hotkey in {n.hotkey for n in chain.metagraph().neurons}


@pytest.mark.parametrize("write", [
    pytest.param(lambda c: TaskQueue(c, VALIDATION_PREFIX).enqueue(round=1, hotkey="5Fmine", global_version=0),
                 id="enqueue a validation task"),
    pytest.param(lambda c: c.xadd(VALIDATION_PREFIX + "results", {"hotkey": "5Fmine", "score": "1"}),
                 id="add a validation result"),
    pytest.param(lambda c: ScoreStore(c).record(1, "5Fmine", 1.0, zero=False, reason="", ban_ema=0.0),
                 id="record a round score"),
    pytest.param(lambda c: c.hset("moe:scores:ema", "5Fmine", "1.0"), id="set its own EMA"),
    pytest.param(lambda c: c.srem("moe:scores:banned", "5Fmine"), id="lift its ban"),
    pytest.param(lambda c: c.hgetall("moe:scores:ema"), id="read the scores"),
    pytest.param(lambda c: c.eval("return redis.call('HSET', 'moe:scores:ema', 'x', '1')", 0),
             id="write the EMA from a script"),
    pytest.param(lambda c: c.flushall(), id="flush everything"),
    pytest.param(lambda c: c.config_set("requirepass", ""), id="drop the password"),
    pytest.param(lambda c: c.execute_command("ACL", "SETUSER", MINER_USER, "~*"), id="widen its own rules"),
])
def test_a_miner_cannot_touch_what_the_validators_write(miner, admin, write):
    admin.hset("moe:scores:ema", "5Fmine", "0.1")
    with pytest.raises(redis.exceptions.ResponseError, match="permission|NOPERM|no permissions|can.t access"):
        write(miner)
    assert admin.hget("moe:scores:ema", "5Fmine") == b"0.1"
    assert admin.hget("moe:scores:ema", "x") is None
    assert not admin.exists(VALIDATION_PREFIX + "results")


def test_the_same_writes_go_through_as_the_unrestricted_user(admin):
    """The refusals above come from the rules, not from the calls being wrong."""
    assert TaskQueue(admin, VALIDATION_PREFIX).enqueue(round=1, hotkey="5Fmine", global_version=0)
    assert ScoreStore(admin).record(1, "5Fmine", 1.0, zero=False, reason="", ban_ema=0.0)
    admin.hset("moe:scores:ema", "5Fmine", "1.0")


def test_without_the_local_chain_the_chain_keys_are_refused_too(server, admin):
    admin.execute_command("ACL", "SETUSER", "miner-bt", "reset", "on", ">pw", *miner_rules(local_chain=False))
    client = redis.Redis(host=server.host, port=server.port, username="miner-bt", password="pw")
    ExpertRegistry(client).register("0.2", "127.0.0.1:50052")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.hset("moe:chain:stake", "0", "1e9")


def test_prefixes_that_would_widen_the_rules_are_refused():
    for prefix in ("", "moe:*", "a b"):
        with pytest.raises(ValueError, match="ACL key pattern"):
            miner_rules(registry_prefix=prefix)
