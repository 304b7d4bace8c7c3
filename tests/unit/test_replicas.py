"""Replica choice policy (services.router.replicas) against an in-memory registry: no sockets."""

from __future__ import annotations

import pytest

from services.router.replicas import ReplicaSet
from subnet.registry import Replica
from tests.manual_clock import ManualClock


class FakeRegistry:
    """In-memory stand-in for ExpertRegistry: `entries` is what Redis would hold now."""

    def __init__(self, entries: dict[str, list[Replica]]):
        self.entries = entries
        self.reads = 0
        self.fail = False

    def all_replicas(self):
        self.reads += 1
        if self.fail:
            raise ConnectionError("redis is down")
        return {uid: list(reps) for uid, reps in self.entries.items()}


def rep(uid: str, endpoint: str, load: int = 0) -> Replica:
    return Replica(uid=uid, endpoint=endpoint, hotkey="hk", load=load, version=0, updated_ms=0)


def make(entries, **kw):
    registry, clock = FakeRegistry(entries), ManualClock(1000.0)
    kw.setdefault("refresh_s", 2.0)
    kw.setdefault("suspect_s", 5.0)
    return ReplicaSet(registry, clock=clock, **kw), registry, clock


def test_least_loaded_prefers_lowest_registry_load():
    replicas, _, _ = make({"0.1": [rep("0.1", "a:1", load=50), rep("0.1", "b:1", load=3),
                                   rep("0.1", "c:1", load=9)]})
    assert {replicas.choose("0.1").endpoint for _ in range(5)} == {"b:1"}


def test_least_loaded_counts_this_routers_tokens_in_flight():
    replicas, _, _ = make({"0.1": [rep("0.1", "a:1", load=0), rep("0.1", "b:1", load=10)]})
    replicas.begin_call("a:1", tokens=32)
    assert replicas.choose("0.1").endpoint == "b:1"
    replicas.end_call("a:1", tokens=32)
    assert replicas.in_flight("a:1") == 0
    assert replicas.choose("0.1").endpoint == "a:1"


def test_least_loaded_rotates_between_equal_replicas():
    replicas, _, _ = make({"0.1": [rep("0.1", "a:1"), rep("0.1", "b:1")]})
    chosen = [replicas.choose("0.1").endpoint for _ in range(4)]
    assert chosen.count("a:1") == 2 and chosen.count("b:1") == 2


def test_round_robin_visits_every_replica_in_turn_regardless_of_load():
    replicas, _, _ = make({"0.1": [rep("0.1", "c:1", 0), rep("0.1", "a:1", 99), rep("0.1", "b:1", 5)]},
                          policy="round_robin")
    assert [replicas.choose("0.1").endpoint for _ in range(6)] == ["a:1", "b:1", "c:1"] * 2


def test_exclude_skips_tried_endpoints_and_none_when_nothing_is_left():
    replicas, _, _ = make({"0.1": [rep("0.1", "a:1"), rep("0.1", "b:1", load=7)]})
    assert replicas.choose("0.1", exclude={"a:1"}).endpoint == "b:1"
    assert replicas.choose("0.1", exclude={"a:1", "b:1"}) is None
    assert replicas.choose("9.9") is None  # unknown expert


def test_suspect_endpoint_is_skipped_until_its_cooldown_ends():
    replicas, _, clock = make({"0.1": [rep("0.1", "a:1"), rep("0.1", "b:1", load=7)],
                               "0.2": [rep("0.2", "a:1")]})
    replicas.mark_failed("a:1")
    assert replicas.is_suspect("a:1")
    assert replicas.choose("0.1").endpoint == "b:1"
    assert replicas.choose("0.2") is None  # its only replica is suspect: mask rather than wait on it
    clock.now += 5.0
    assert not replicas.is_suspect("a:1")
    assert replicas.choose("0.1").endpoint == "a:1"
    assert replicas.choose("0.2").endpoint == "a:1"


def test_registry_is_read_once_per_refresh_period_not_per_choice():
    replicas, registry, clock = make({"0.1": [rep("0.1", "a:1")]}, refresh_s=2.0)
    for _ in range(10):
        replicas.choose("0.1")
    assert registry.reads == 1
    registry.entries = {"0.1": [rep("0.1", "b:1")]}  # a:1 died, b:1 registered
    clock.now += 1.9
    assert replicas.choose("0.1").endpoint == "a:1"  # still the old snapshot
    clock.now += 0.1
    assert replicas.choose("0.1").endpoint == "b:1"
    assert registry.reads == 2


def test_registry_failure_keeps_the_last_snapshot_and_backs_off():
    replicas, registry, clock = make({"0.1": [rep("0.1", "a:1")]}, refresh_s=2.0)
    assert replicas.choose("0.1").endpoint == "a:1"
    registry.fail = True
    clock.now += 2.0
    assert replicas.choose("0.1").endpoint == "a:1"
    assert replicas.choose("0.1").endpoint == "a:1"
    assert registry.reads == 2  # failed once, not again within the period
    registry.fail = False
    registry.entries = {}
    clock.now += 2.0
    assert replicas.choose("0.1") is None


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="least_loaded"):
        make({}, policy="random")


def keyed(uid: str, endpoint: str, hotkey: str) -> Replica:
    return Replica(uid=uid, endpoint=endpoint, hotkey=hotkey, load=0, version=0, updated_ms=0)


def test_a_failure_suspects_that_expert_only_not_the_whole_service():
    replicas, _, clock = make({"0.1": [keyed("0.1", "a:1", "A")], "0.2": [keyed("0.2", "a:1", "A")]})
    replicas.mark_failed("a:1", "0.1")
    assert replicas.choose("0.1") is None
    assert replicas.choose("0.2").endpoint == "a:1"  # the service's other experts keep working
    clock.now += 6
    assert replicas.choose("0.1").endpoint == "a:1"


class Scores:
    def __init__(self, ema, banned=()):
        self.ema, self.banned, self.fail = ema, set(banned), False

    def scores(self):
        if self.fail:
            raise ConnectionError("redis is down")
        return self.ema, self.banned


def test_banned_miners_get_no_traffic_and_the_rest_follow_their_ema():
    import random

    entries = {"0.1": [keyed("0.1", "a:1", "A"), keyed("0.1", "b:1", "B"), keyed("0.1", "c:1", "C")]}
    replicas, _, _ = make(entries, scores=Scores({"A": 0.6, "B": 0.2, "C": 0.9}, banned={"C"}),
                          rng=random.Random(0), explore=0.0)
    picks = [replicas.choose("0.1").endpoint for _ in range(4000)]
    assert "c:1" not in picks
    assert picks.count("a:1") / picks.count("b:1") == pytest.approx(3.0, rel=0.15)
    only_banned, _, _ = make({"0.2": [keyed("0.2", "c:1", "C")]}, scores=Scores({"C": 0.9}, banned={"C"}))
    assert only_banned.choose("0.2") is None  # masked rather than served by a cheater


def test_scores_that_cannot_be_read_keep_the_last_ones():
    entries = {"0.1": [keyed("0.1", "a:1", "A"), keyed("0.1", "b:1", "B")]}
    scores = Scores({"A": 1.0, "B": 1.0}, banned={"B"})
    replicas, _, clock = make(entries, scores=scores)
    assert replicas.choose("0.1").endpoint == "a:1"
    scores.fail = True
    clock.now += 3
    assert {replicas.choose("0.1").endpoint for _ in range(20)} == {"a:1"}


def test_an_unreadable_score_is_skipped_and_an_outage_logged_once_a_minute(caplog):
    """The scores' Redis is shared: one value that is not a number must not void the others (it had
    made the router drop every update), and an outage is not a warning per refresh."""
    import random

    entries = {"0.1": [keyed("0.1", "a:1", "A"), keyed("0.1", "b:1", "B")]}
    scores = Scores({"A": 0.9, "B": 0.001}, banned=set())
    replicas, _, clock = make(entries, scores=scores, rng=random.Random(0), explore=0.0)
    assert {replicas.choose("0.1").endpoint for _ in range(50)} == {"a:1"}   # B has not earned yet
    scores.ema = {"A": 0.9, "B": 0.9, "C": b"lots", "D": "nan"}   # B earned; C and D are garbage
    clock.now += 3
    assert {replicas.choose("0.1").endpoint for _ in range(200)} == {"a:1", "b:1"}
    scores.fail = True
    with caplog.at_level("WARNING", logger="services.router.replicas"):
        for _ in range(10):
            clock.now += 3
            replicas.choose("0.1")
    assert len([r for r in caplog.records if "scores unavailable" in r.getMessage()]) == 1


def test_background_refresh_never_makes_a_choice_wait_for_a_stalled_registry():
    import threading
    import time

    class Stalling(FakeRegistry):
        def __init__(self, entries):
            super().__init__(entries)
            self.release = threading.Event()
            self.callers = []

        def all_replicas(self):
            self.callers.append(threading.current_thread().name)
            if self.reads >= 1:
                self.release.wait(30)  # Redis under SIGSTOP
            return super().all_replicas()

    registry = Stalling({"0.1": [rep("0.1", "a:1")]})
    replicas = ReplicaSet(registry, refresh_s=0.01).start()
    try:
        while len(registry.callers) < 2:  # the background thread is now stuck in the registry
            time.sleep(0.01)
        for _ in range(100):
            assert replicas.choose("0.1").endpoint == "a:1"  # the last known snapshot
        assert not registry.release.is_set()
        assert registry.callers[1:] == ["replica-refresh"]  # no choice ever read the registry itself
    finally:
        registry.release.set()
        replicas.stop()


def test_before_anyone_earned_the_policy_decides_and_zero_ema_is_avoided_only_when_others_earned():
    entries = {"0.1": [keyed("0.1", "a:1", "A"), keyed("0.1", "b:1", "B")]}
    cold, _, _ = make(entries, scores=Scores({"A": 0.0, "B": 0.0}))
    assert {cold.choose("0.1").endpoint for _ in range(10)} == {"a:1", "b:1"}  # training can start
    import random

    warm, _, _ = make(entries, scores=Scores({"A": 0.0, "B": 0.4}), rng=random.Random(1), explore=0.1)
    picks = [warm.choose("0.1").endpoint for _ in range(4000)]
    # The zero-EMA replica gets only the exploration share: enough to show an improvement, if it makes one.
    assert picks.count("a:1") / len(picks) == pytest.approx(0.1, abs=0.02)
    strict, _, _ = make(entries, scores=Scores({"A": 0.0, "B": 0.4}), explore=0.0)
    assert {strict.choose("0.1").endpoint for _ in range(50)} == {"b:1"}


def test_replicas_that_vanish_from_the_registry_stay_routable_for_the_grace_period():
    entries = {"0.1": [keyed("0.1", "a:1", "A")]}
    replicas, registry, clock = make(entries, grace_s=10.0)
    assert replicas.choose("0.1").endpoint == "a:1"
    registry.entries = {}          # Redis restarted empty: no heartbeat has come back yet
    clock.now += 3
    assert replicas.choose("0.1").endpoint == "a:1"
    assert replicas.hotkey("a:1") == "A"  # calls to it are still signed for its hotkey
    clock.now += 11
    assert replicas.choose("0.1") is None  # gone for longer than the grace period
    assert replicas.hotkey("a:1") == "A"


def test_training_calls_spread_over_every_replica_that_is_not_banned_whatever_its_ema():
    # A replica that lost a round must still get its share of the training tokens, or it can never
    # show an improvement again; banned replicas get nothing either way.
    entries = {"0.1": [keyed("0.1", "a:1", "A"), keyed("0.1", "b:1", "B"), keyed("0.1", "c:1", "C")]}
    replicas, _, _ = make(entries, scores=Scores({"A": 0.0, "B": 0.9, "C": 0.9}, banned={"C"}), explore=0.0)
    training = [replicas.choose("0.1", by_score=False).endpoint for _ in range(40)]
    assert training.count("a:1") == training.count("b:1") == 20
    assert {replicas.choose("0.1").endpoint for _ in range(40)} == {"b:1"}  # serving follows the EMA
