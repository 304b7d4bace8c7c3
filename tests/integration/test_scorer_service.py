"""The scorer against a real redis-server and a LocalChain: results written as a validator writes
them are scored, weights land on the chain, and a crashed scorer's entries are taken over with
nothing lost or counted twice.

Each test has its own key prefixes (chain, results, scores), so tests sharing the session's Redis
never see each other; the chain runs on a fake clock, so phases are hit exactly and nothing sleeps
longer than a claim idle time.
"""

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from bittensor_wallet import Keypair

from services.scorer.config import ScorerConfig
from services.scorer.plot import plot_ema
from services.scorer.scorer import Scorer
from services.scorer.scoring import ScoreWeights, composite_score
from subnet.chain.local import LocalChain
from subnet.identity import load_identity
from subnet.processes import die_with_parent
from subnet.rounds import RoundConfig
from subnet.validation_results import RESULT_GROUP, ValidationResult
from tests.manual_clock import ManualClock

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BLOCK_S = 0.05
ROUNDS = RoundConfig(train_blocks=4, commit_blocks=2, reveal_blocks=2, validate_blocks=1, merge_blocks=1)
MERGE = 9                                            # round r's merge phase is block 10r + 9
MINERS = [Keypair.create_from_seed("0x" + f"{i + 0x41:02x}" * 32).ss58_address for i in range(4)]
ALPHA = 0.3


@pytest.fixture
def env(redis_client, tmp_path, dev_wallets):
    """Prefixes, a staked validator, four registered miners, and a scorer factory."""
    tag = uuid.uuid4().hex[:8]
    clock = ManualClock(1_000_000.0)
    chain = LocalChain(redis_client, ROUNDS.schedule(), block_s=BLOCK_S, key_prefix=f"test:scorer:{tag}:chain:",
                       clock=clock)
    chain.genesis()
    validator = load_identity(dev_wallets.create("scorer-validator"))
    validator_uid = chain.register(validator.hotkey, stake=10.0)
    uids = {hk: chain.register(hk) for hk in MINERS}
    config = ScorerConfig(redis_url="redis://unused", validation_prefix=f"test:scorer:{tag}:val:",
                          key_prefix=f"test:scorer:{tag}:scores:", ema_alpha=ALPHA, run_dir=str(tmp_path / "run"),
                          claim_idle_s=0.1, rounds=ROUNDS)

    class Env:
        pass

    e = Env()
    e.chain, e.clock, e.config, e.validator, e.validator_uid, e.uids = chain, clock, config, validator, \
        validator_uid, uids
    e.redis = redis_client

    def scorer(**overrides):
        c = ScorerConfig(**{**config.__dict__, **overrides})
        return Scorer(c, validator, chain, redis_client)

    def goto(block):
        clock.now = chain.genesis() + (block + 0.5) * BLOCK_S
        assert chain.block() == block

    def write(r: ValidationResult):
        """As the validator does: the result once (HSETNX), then a stream entry pointing to it."""
        redis_client.hsetnx(f"{config.validation_prefix}result:{r.round}", r.hotkey, r.to_json())
        redis_client.xadd(f"{config.validation_prefix}results", {"round": r.round, "hotkey": r.hotkey})

    e.scorer, e.goto, e.write = scorer, goto, write
    yield e
    for key in redis_client.scan_iter(match=f"test:scorer:{tag}:*"):
        redis_client.delete(key)


def result(round, miner, loss_delta=0.0, diversity=0.5, active_ratio=1.0, verified=True, **kw):
    return ValidationResult(round=round, hotkey=MINERS[miner], uid=miner + 1, verified=verified,
                            loss_delta=loss_delta, diversity=diversity, active_ratio=active_ratio, **kw)


def score(r):
    return composite_score(r, ScoreWeights(), 0.02)  # SCORER_LOSS_SCALE default


def outcomes(scorer):
    get = scorer.metrics.registry.get_sample_value
    return {o: get("scorer_results_total", {"outcome": o}) for o in ("scored", "zero", "duplicate", "late", "invalid")}


def test_results_are_scored_and_weights_land_on_the_chain(env):
    round0 = [result(0, 0, loss_delta=0.05), result(0, 1, loss_delta=0.0),
              result(0, 2, loss_delta=0.2, verified=False), result(0, 3, loss_delta=math.nan, diversity=7.0)]
    for r in round0:
        env.write(r)
    scorer = env.scorer()
    env.goto(7)                                                # validate phase: scores, no weights yet
    assert scorer.consume(timeout_s=0.5) == 4
    assert scorer.tick() is None and env.chain.weights() == {}
    assert scorer.store.round_scores(0) == pytest.approx({r.hotkey: score(r) for r in round0})
    assert scorer.store.banned() == {MINERS[2]}                # failed verification: banned at once
    assert outcomes(scorer) == {"scored": 3, "zero": 1, "duplicate": 0, "late": 0, "invalid": 0}

    env.goto(MERGE)
    sub = scorer.tick()
    assert sub is not None and sub.round == 0 and not sub.skipped
    ema = {r.hotkey: ALPHA * score(r) for r in round0}
    assert scorer.store.ema() == pytest.approx(ema) and ema[MINERS[2]] == 0.0
    total = sum(ema.values())
    expected = {env.uids[hk]: v / total for hk, v in ema.items() if v > 0}
    assert env.chain.weights() == {env.validator_uid: pytest.approx(expected)}
    # One staked validator: incentive follows its weights.
    incentive = {n.uid: n.incentive for n in env.chain.metagraph().neurons if n.uid in expected}
    assert incentive == pytest.approx(expected)
    assert scorer.tick() is None                               # once per round
    get = scorer.metrics.registry.get_sample_value
    assert get("scorer_weights_submitted_total") == 1 and get("scorer_last_submission_block") == MERGE
    assert get("scorer_weight", {"hotkey": MINERS[0]}) == pytest.approx(expected[env.uids[MINERS[0]]])

    run = Path(env.config.run_dir)
    board = json.loads((run / "scoreboard-0.json").read_text())
    by_hotkey = {row["hotkey"]: row for row in board["rows"]}
    assert board["submitted"] and set(by_hotkey) == set(MINERS)
    assert by_hotkey[MINERS[2]]["reason"] == "not verified" and by_hotkey[MINERS[2]]["weight"] == 0.0
    assert by_hotkey[MINERS[3]]["loss_delta"] is None and by_hotkey[MINERS[3]]["diversity"] == 7.0
    assert (run / "scoreboard.md").read_text() == (run / "scoreboard-0.md").read_text()
    assert "| uid | hotkey |" in (run / "scoreboard.md").read_text()
    history = [json.loads(line) for line in (run / "ema_history.jsonl").read_text().splitlines()]
    assert {(h["round"], h["hotkey"]) for h in history} == {(0, hk) for hk in MINERS}
    assert plot_ema(run / "ema_history.jsonl", run / "scores.png").stat().st_size > 1000


def test_a_crashed_scorer_loses_nothing_and_counts_nothing_twice(env):
    round0 = [result(0, i, loss_delta=0.02 * i, diversity=0.1 * (i + 1)) for i in range(3)]
    for r in round0:
        env.write(r)
    env.write(round0[0])                                       # a validator retried: same result, two entries
    env.goto(7)

    crashed = env.scorer(consumer="crashed", batch=1)

    def killed(entry_id):
        raise RuntimeError("killed before XACK")
    crashed.stream.ack = killed                                # records the first entry, dies before acking
    with pytest.raises(RuntimeError, match="killed"):
        crashed.consume()
    # Another crashed reader took the rest of the stream and never acknowledged it either.
    stream = f"{env.config.validation_prefix}results"
    assert len(env.redis.xreadgroup(RESULT_GROUP, "crashed-too", {stream: ">"})[0][1]) == 3
    del crashed
    pending = env.redis.xpending(stream, RESULT_GROUP)
    assert pending["pending"] == 4 and pending["consumers"] == [{"name": b"crashed", "pending": 1},
                                                                {"name": b"crashed-too", "pending": 3}]

    survivor = env.scorer(consumer="survivor")
    assert survivor.consume() == 0                             # nothing idle long enough yet
    time.sleep(0.15)                                           # > SCORER_CLAIM_IDLE_S
    assert survivor.consume() == 4
    assert env.redis.xpending(stream, RESULT_GROUP)["pending"] == 0
    assert outcomes(survivor)["duplicate"] == 2 and outcomes(survivor)["scored"] == 2
    assert survivor.store.round_scores(0) == pytest.approx({r.hotkey: score(r) for r in round0})

    env.goto(MERGE)
    survivor.tick()
    round1 = [result(1, 0, loss_delta=-0.1), result(1, 1, loss_delta=0.1), result(1, 3, loss_delta=0.0)]
    for r in round1:
        env.write(r)
    env.goto(17)
    assert survivor.consume() == 3
    env.goto(10 + MERGE)
    survivor.tick()
    # By hand: round 0 gives alpha * s0; round 1 folds alpha * s1 + (1 - alpha) * ema0; miner 2 had no
    # result in round 1 and decays; miner 3 first appears in round 1.
    s0 = {r.hotkey: score(r) for r in round0}
    s1 = {r.hotkey: score(r) for r in round1}
    expected = {hk: ALPHA * s1.get(hk, 0.0) + (1 - ALPHA) * ALPHA * s0.get(hk, 0.0) for hk in set(s0) | set(s1)}
    assert survivor.store.ema() == pytest.approx(expected)

    env.write(result(1, 2, loss_delta=0.3))                     # after round 1 was closed
    assert survivor.consume() == 1 and outcomes(survivor)["late"] == 1
    assert survivor.store.ema() == pytest.approx(expected)


def test_a_restarted_scorer_resumes_its_own_pending_entries_at_once(env):
    for i in range(2):
        env.write(result(0, i))
    first = env.scorer(consumer="scorer-0", claim_idle_s=60.0)
    first.stream.new()                                         # read, then "crash" before scoring
    del first
    again = env.scorer(consumer="scorer-0", claim_idle_s=60.0)  # same name, e.g. a pod restarted
    assert again.consume() == 2
    assert set(again.store.round_scores(0)) == {MINERS[0], MINERS[1]}


def test_all_zero_scores_set_no_weights(env):
    for i in range(3):
        env.write(result(0, i, verified=False, reason="live service does not match its checkpoint"))
    env.write(ValidationResult(round=0, hotkey="not-in-the-hash"))  # entry without a stored result
    env.redis.hdel(f"{env.config.validation_prefix}result:0", "not-in-the-hash")
    scorer = env.scorer()
    assert scorer.consume() == 4 and outcomes(scorer)["zero"] == 3 and outcomes(scorer)["invalid"] == 1
    env.goto(MERGE)
    sub = scorer.tick()
    assert sub.weights == {} and "EMA is 0" in sub.skipped
    assert env.chain.weights() == {}
    assert scorer.store.banned() == set(MINERS[:3])
    assert "no weights submitted" in (Path(env.config.run_dir) / "scoreboard.md").read_text()
    assert scorer.tick() is None                               # decided for this round: not retried


def test_main_scores_results_and_stops_on_sigterm(redis_server, redis_client, dev_wallets, tmp_path):
    tag = uuid.uuid4().hex[:8]
    wallet = dev_wallets.create("scorer-main")
    vprefix, sprefix = f"test:scorer:{tag}:val:", f"test:scorer:{tag}:scores:"
    process_env = {**os.environ, "REDIS_URL": redis_server.url, "CHAIN_REDIS_URL": redis_server.url,
                   "CHAIN_KEY_PREFIX": f"test:scorer:{tag}:chain:", "SCORER_VALIDATION_PREFIX": vprefix,
                   "SCORER_KEY_PREFIX": sprefix, "SCORER_POLL_S": "0.2", "SCORER_RUN_DIR": str(tmp_path),
                   "WALLET_PATH": wallet.path, "WALLET_NAME": wallet.name, "WALLET_HOTKEY": wallet.hotkey}
    proc = subprocess.Popen([sys.executable, "-m", "services.scorer"], cwd=ROOT, env=process_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)  # noqa: PLW1509
    try:
        r = ValidationResult(round=0, hotkey=MINERS[0], verified=True, loss_delta=0.0, diversity=1.0,
                             active_ratio=1.0)
        redis_client.hsetnx(f"{vprefix}result:0", r.hotkey, r.to_json())
        redis_client.xadd(f"{vprefix}results", {"round": 0, "hotkey": r.hotkey})
        deadline = time.monotonic() + 15
        while redis_client.hget(f"{sprefix}round:0", r.hotkey) is None:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the scorer did not score the result"
            time.sleep(0.05)
        assert float(redis_client.hget(f"{sprefix}round:0", r.hotkey)) == pytest.approx(score(r))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
        for key in redis_client.scan_iter(match=f"test:scorer:{tag}:*"):
            redis_client.delete(key)


def test_fold_resets_a_hotkey_seen_on_another_uid_and_drops_deregistered_ones(env):
    # LocalChain never reuses a uid, so the metagraph is given directly to the store here.
    store = env.scorer().store
    a, b, gone = MINERS[:3]
    for hotkey, s in ((a, 1.0), (b, 1.0), (gone, 0.0)):
        store.record(0, hotkey, s, zero=s == 0.0, reason="", ban_ema=0.01)
    store.fold(0, {a: 1, b: 2, gone: 3}, ALPHA, 0.01, keep_rounds=100)
    assert store.ema() == pytest.approx({a: 0.3, b: 0.3, gone: 0.0}) and store.banned() == {gone}
    store.record(1, b, 1.0, zero=False, reason="", ban_ema=0.01)
    store.fold(1, {a: 1, b: 5}, ALPHA, 0.01, keep_rounds=100)   # b re-registered on uid 5; `gone` left
    assert store.ema() == pytest.approx({a: 0.7 * 0.3, b: 0.3}) and store.banned() == set()
    assert store.fold(1, {a: 1, b: 5}, ALPHA, 0.01, keep_rounds=100) is None   # a round folds once


def test_run_recreates_its_group_after_redis_lost_the_stream(env):
    scorer = env.scorer(poll_s=0.05)
    env.goto(7)
    env.redis.delete(f"{env.config.validation_prefix}results")   # e.g. Redis restarted without persistence
    env.write(result(0, 0))                                      # XADD makes a stream without the group
    stop = threading.Event()
    thread = threading.Thread(target=scorer.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 5
        while MINERS[0] not in scorer.store.round_scores(0):
            assert time.monotonic() < deadline, "the scorer did not recover its consumer group"
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_router_and_validator_read_what_a_scorer_with_another_key_prefix_writes(redis_server, redis_client):
    """SCORER_KEY_PREFIX is one variable for the three services: the router's replica scores and the
    validator's merge read under the prefix the scorer writes under."""
    from services.router.config import RouterConfig
    from services.router.remote_model import RemoteParts
    from services.scorer.store import ScoreStore
    from services.validator.config import ValidatorConfig
    from subnet.envconfig import from_env

    prefix = f"other-{uuid.uuid4().hex[:6]}:"
    store = ScoreStore(redis_client, prefix)
    store.record(3, "hk-good", 0.8, zero=False, reason="", ban_ema=0.01)
    store.record(3, "hk-bad", 0.0, zero=True, reason="not verified", ban_ema=0.01)
    store.fold(3, {"hk-good": 1, "hk-bad": 2}, alpha=1.0, ban_ema=0.01, keep_rounds=4)
    env = {"SCORER_KEY_PREFIX": prefix, "REDIS_URL": redis_server.url, "AUTH_MODE": "off"}
    parts = RemoteParts.connect(from_env(RouterConfig, env))
    try:
        ema, banned = parts.replicas._scores.scores()
    finally:
        parts.close()
    assert ema["hk-good"] > 0 and "hk-bad" in banned
    validator_config = from_env(ValidatorConfig, {**env, "S3_ENDPOINT": "127.0.0.1:1"})   # not reached
    assert redis_client.hgetall(f"{validator_config.scores_prefix}round:3")[b"hk-good"] == b"0.8"
