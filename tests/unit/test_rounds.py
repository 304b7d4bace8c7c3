"""The round schedule: block -> (round, phase) arithmetic, its validation, its env config, and the
phase watcher (driven by a fake block source; no chain, no sockets)."""

import threading
import time

import pytest

from subnet.envconfig import ConfigError, from_env
from subnet.rounds import PHASES, PhaseWatcher, RoundConfig, RoundPhase, RoundSchedule, wait_for_phase

SCHEDULE = RoundSchedule(10, {"train": 4, "commit": 2, "reveal": 2, "validate": 1, "merge": 1})


def test_at_maps_blocks_to_round_and_phase():
    assert SCHEDULE.at(0) == RoundPhase(round=0, phase="train", block_in_round=0, blocks_left_in_phase=4)
    assert SCHEDULE.at(3) == RoundPhase(round=0, phase="train", block_in_round=3, blocks_left_in_phase=1)
    assert SCHEDULE.at(4) == RoundPhase(round=0, phase="commit", block_in_round=4, blocks_left_in_phase=2)
    assert SCHEDULE.at(7) == RoundPhase(round=0, phase="reveal", block_in_round=7, blocks_left_in_phase=1)
    assert SCHEDULE.at(8).phase == "validate"
    assert SCHEDULE.at(9) == RoundPhase(round=0, phase="merge", block_in_round=9, blocks_left_in_phase=1)
    assert SCHEDULE.at(10) == RoundPhase(round=1, phase="train", block_in_round=0, blocks_left_in_phase=4)
    assert SCHEDULE.at(1234).round == 123


def test_blocks_left_points_at_the_next_phase_and_phase_start_agrees():
    for block in range(0, 3 * SCHEDULE.tempo_blocks):
        now = SCHEDULE.at(block)
        nxt = SCHEDULE.at(block + now.blocks_left_in_phase)
        assert (nxt.round, nxt.phase_index) == ((now.round, now.phase_index + 1) if now.phase != "merge"
                                                 else (now.round + 1, 0))
        assert SCHEDULE.at(block + now.blocks_left_in_phase - 1).phase == now.phase
        assert block in SCHEDULE.phase_blocks(now.round, now.phase)
        assert SCHEDULE.phase_start(now.round, now.phase) == block - now.block_in_round + \
            sum(SCHEDULE.phases[p] for p in PHASES[:now.phase_index])


def test_windows_commit_before_reveal_and_reveal_is_the_reveal_phase():
    assert SCHEDULE.commit_window(2) == range(20, 26)        # train + commit of round 2
    assert SCHEDULE.reveal_window(2) == range(26, 28)
    assert SCHEDULE.commit_window(2).stop == SCHEDULE.reveal_window(2).start
    assert {SCHEDULE.at(b).phase for b in SCHEDULE.reveal_window(5)} == {"reveal"}


def test_phases_come_in_canonical_order_whatever_the_mapping_order():
    shuffled = RoundSchedule(10, {"merge": 1, "validate": 1, "reveal": 2, "commit": 2, "train": 4})
    assert list(shuffled.phases) == list(PHASES)
    assert shuffled.at(4).phase == "commit"
    assert RoundSchedule.of(train=4, commit=2, reveal=2, validate=1, merge=1) == SCHEDULE


@pytest.mark.parametrize("tempo,phases,match", [
    (10, {"train": 4, "commit": 2, "reveal": 2, "validate": 2}, "missing: \\['merge'\\]"),
    (11, {"train": 4, "commit": 2, "reveal": 2, "validate": 1, "merge": 1, "party": 1}, "unknown: \\['party'\\]"),
    (10, {"train": 5, "commit": 0, "reveal": 3, "validate": 1, "merge": 1}, "'commit' must last a positive"),
    (10, {"train": 5, "commit": -1, "reveal": 4, "validate": 1, "merge": 1}, "'commit' must last a positive"),
    (10, {"train": 4.0, "commit": 2, "reveal": 2, "validate": 1, "merge": 1}, "'train' must last a positive whole"),
    (12, {"train": 4, "commit": 2, "reveal": 2, "validate": 1, "merge": 1}, "sum to 10 blocks but tempo_blocks is 12"),
])
def test_bad_schedules_are_refused_with_the_reason(tempo, phases, match):
    with pytest.raises(ValueError, match=match):
        RoundSchedule(tempo, phases)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="block must be >= 0"):
        SCHEDULE.at(-1)
    with pytest.raises(ValueError, match="unknown phase 'mine'"):
        SCHEDULE.phase_start(0, "mine")
    with pytest.raises(ValueError, match="round must be >= 0"):
        SCHEDULE.round_start(-1)


def test_round_config_from_env():
    assert from_env(RoundConfig, {}).schedule().tempo_blocks == 60
    config = from_env(RoundConfig, {"ROUND_TRAIN_BLOCKS": "3", "ROUND_COMMIT_BLOCKS": "1", "ROUND_REVEAL_BLOCKS": "1",
                                    "ROUND_VALIDATE_BLOCKS": "2", "ROUND_MERGE_BLOCKS": "1"})
    assert config.schedule() == RoundSchedule.of(train=3, commit=1, reveal=1, validate=2, merge=1)
    with pytest.raises(ConfigError, match="ROUND_REVEAL_BLOCKS must be a positive number of blocks, got 0"):
        from_env(RoundConfig, {"ROUND_REVEAL_BLOCKS": "0"})
    with pytest.raises(ConfigError, match="ROUND_MERGE_BLOCKS='x' is not an int"):
        from_env(RoundConfig, {"ROUND_MERGE_BLOCKS": "x"})


class Blocks:
    """A block source the test moves by hand, counting how often it is read."""

    def __init__(self, block=0, fail_first=0):
        self.value = block
        self.reads = 0
        self.fail_first = fail_first

    def block(self):
        self.reads += 1
        if self.reads <= self.fail_first:
            raise ConnectionError("chain unreachable")
        return self.value


def test_watcher_poll_reports_each_transition_once():
    blocks, seen = Blocks(), []
    watcher = PhaseWatcher(blocks, SCHEDULE, seen.append)
    assert watcher.poll().phase == "train"          # the starting phase is reported
    blocks.value = 3
    assert watcher.poll() is None                   # same phase
    blocks.value = 4
    assert watcher.poll().phase == "commit"
    blocks.value = 17                               # skips ahead: only the phase it is in now
    assert watcher.poll() == SCHEDULE.at(17)
    blocks.value = 27
    watcher.poll()
    assert [(p.round, p.phase) for p in seen] == [(0, "train"), (0, "commit"), (1, "reveal"), (2, "reveal")]
    assert watcher.current == SCHEDULE.at(27)


def test_watcher_survives_a_failing_callback_and_chain():
    blocks = Blocks(fail_first=2)
    calls = []

    def callback(phase):
        calls.append(phase)
        raise RuntimeError("callback bug")

    watcher = PhaseWatcher(blocks, SCHEDULE, callback, poll_s=0.01).start()
    try:
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        blocks.value = 5
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        watcher.stop()
    assert [c.phase for c in calls] == ["train", "commit"]


def test_watcher_thread_polls_at_its_interval_not_in_a_busy_loop():
    blocks, seen = Blocks(), []
    watcher = PhaseWatcher(blocks, SCHEDULE, seen.append, poll_s=0.05).start()
    time.sleep(0.3)
    watcher.stop()
    assert 3 <= blocks.reads <= 10                   # ~6 polls in 0.3 s
    assert [p.phase for p in seen] == ["train"]
    assert not any(t.name == "phase-watcher" for t in threading.enumerate())


def test_watcher_refuses_a_bad_interval_and_a_second_start():
    with pytest.raises(ValueError, match="poll_s must be positive"):
        PhaseWatcher(Blocks(), SCHEDULE, print, poll_s=0)
    watcher = PhaseWatcher(Blocks(), SCHEDULE, lambda p: None, poll_s=0.01).start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            watcher.start()
    finally:
        watcher.stop()


class Clocked:
    """A block source that advances one block every `block_s` of real time."""

    def __init__(self, block_s, start=0):
        self.block_s, self.start, self.t0 = block_s, start, time.monotonic()

    def block(self):
        return self.start + int((time.monotonic() - self.t0) / self.block_s)


def test_wait_for_phase_returns_in_the_phase_and_refuses_the_past():
    chain = Clocked(0.01)
    got = wait_for_phase(chain, SCHEDULE, "reveal", round=1, timeout_s=5, poll_s=0.005)
    assert (got.round, got.phase) == (1, "reveal")
    with pytest.raises(ValueError, match="round 0 phase commit is over"):
        wait_for_phase(chain, SCHEDULE, "commit", round=0, timeout_s=5)
    with pytest.raises(TimeoutError, match="did not reach phase merge of round 99"):
        wait_for_phase(Clocked(10.0), SCHEDULE, "merge", round=99, timeout_s=0.05, poll_s=0.01)
