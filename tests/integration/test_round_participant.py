"""RoundParticipant over a LocalChain in a real redis-server: publish + commit in the commit phase,
reveal in the reveal phase, once per round; a failed publish loses that round only.

A fake clock drives the chain's blocks, so every phase is hit exactly and nothing sleeps."""

import uuid

import pytest

from subnet.chain.local import LocalChain
from subnet.chain.signing import digest_of
from subnet.identity import Identity
from subnet.round_participant import RoundParticipant
from subnet.rounds import RoundSchedule
from tests.manual_clock import ManualClock

pytestmark = pytest.mark.integration

BLOCK_S = 1.0
SCHEDULE = RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1)  # round r: blocks 10r..10r+9


@pytest.fixture
def chain_and_clock(redis_client):
    prefix = f"test:participant:{uuid.uuid4().hex[:8]}:"
    clock = ManualClock(5_000_000.0)
    chain = LocalChain(redis_client, SCHEDULE, block_s=BLOCK_S, key_prefix=prefix, clock=clock)
    chain.genesis()
    yield chain, clock
    for key in redis_client.scan_iter(match=prefix + "*"):
        redis_client.delete(key)


def at_block(clock, block):
    clock.now = 5_000_000.0 + block * BLOCK_S + 0.5


def test_publish_commit_reveal_each_round_once(chain_and_clock):
    chain, clock = chain_and_clock
    identity = Identity.generate()
    chain.register(identity.hotkey)
    published = []

    def publish(round):
        published.append(round)
        return f'{{"round": {round}, "manifest": "sha-{round}"}}'

    participant = RoundParticipant(chain, SCHEDULE, identity, publish, name="test")
    for round in (0, 1):
        at_block(clock, 10 * round + 1)   # train: nothing happens
        participant.poll()
        assert published == list(range(round))
        at_block(clock, 10 * round + 4)   # commit: publish + commit
        participant.poll()
        at_block(clock, 10 * round + 5)   # still commit: no second publish
        participant.poll()
        assert published == list(range(round + 1))
        commitments = {c.hotkey: c for c in chain.commitments(round)}
        assert commitments[identity.hotkey].digest == digest_of(publish(round))
        published.pop()
        assert commitments[identity.hotkey].revealed is None
        at_block(clock, 10 * round + 6)   # reveal
        participant.poll()
        revealed = {c.hotkey: c for c in chain.commitments(round)}[identity.hotkey].revealed
        assert revealed == publish(round)
        published.pop()
    assert [(r.round, r.committed, r.revealed, r.error) for r in participant.history()] == \
        [(0, True, True, ""), (1, True, True, "")]


def test_a_failed_publish_loses_that_round_only(chain_and_clock):
    chain, clock = chain_and_clock
    identity = Identity.generate()
    chain.register(identity.hotkey)
    calls = []

    def publish(round):
        calls.append(round)
        if round == 0:
            raise OSError("S3 is down")
        return "ok"

    participant = RoundParticipant(chain, SCHEDULE, identity, publish, name="test")
    at_block(clock, 4)
    participant.poll()
    at_block(clock, 6)
    participant.poll()
    at_block(clock, 14)
    participant.poll()
    at_block(clock, 16)
    participant.poll()
    records = participant.history()
    assert records[0].committed is False and "S3 is down" in records[0].error
    assert records[1].committed and records[1].revealed
    assert chain.commitments(0) == []


def test_an_unregistered_hotkey_is_refused_by_the_chain_and_says_so(chain_and_clock):
    chain, clock = chain_and_clock
    participant = RoundParticipant(chain, SCHEDULE, Identity.generate(), lambda r: "x", name="test")
    at_block(clock, 4)
    participant.poll()
    record = participant.history()[0]
    assert not record.committed and "commit refused" in record.error
