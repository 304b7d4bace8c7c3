"""The round schedule: which phase of which round a chain block falls in.

Every service derives the phase from the chain's block number alone, so all processes agree
without talking to each other. Round `r` covers blocks [r * tempo, (r + 1) * tempo), split
into five phases, always in this order:

    train -> commit -> reveal -> validate -> merge

    schedule = from_env(RoundConfig).schedule()
    schedule.at(chain.block())               # RoundPhase(round=3, phase='commit', ...)
    schedule.phase_blocks(3, "reveal")       # range of the blocks of round 3's reveal phase

`PhaseWatcher` polls a chain in a thread and calls back on every (round, phase) change.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from subnet.envconfig import ConfigError, env, variables

log = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("train", "commit", "reveal", "validate", "merge")


@dataclass(frozen=True)
class RoundPhase:
    """Where one block sits in the schedule.

    `blocks_left_in_phase` counts the given block itself, so it is at least 1 and the next
    phase starts at `block + blocks_left_in_phase`.
    """

    round: int
    phase: str
    block_in_round: int
    blocks_left_in_phase: int

    @property
    def phase_index(self) -> int:
        """0 for train ... 4 for merge (e.g. for a Prometheus gauge)."""
        return PHASES.index(self.phase)


@dataclass(frozen=True)
class RoundSchedule:
    """Phase lengths in blocks; pure arithmetic, no I/O. Raises ValueError on a bad schedule."""

    tempo_blocks: int
    phases: Mapping[str, int]

    def __post_init__(self):
        unknown = set(self.phases) - set(PHASES)
        missing = [p for p in PHASES if p not in self.phases]
        if unknown or missing:
            raise ValueError(f"round phases must be exactly {', '.join(PHASES)}; "
                             f"unknown: {sorted(unknown) or 'none'}, missing: {missing or 'none'}")
        for name in PHASES:
            length = self.phases[name]
            if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
                raise ValueError(f"round phase {name!r} must last a positive whole number of blocks, "
                                 f"got {length!r}")
        total = sum(self.phases[p] for p in PHASES)
        if self.tempo_blocks != total:
            raise ValueError(f"round phases sum to {total} blocks but tempo_blocks is {self.tempo_blocks}")
        # Canonical order, whatever order the mapping came in; a copy, so the caller's dict
        # cannot change the schedule later.
        object.__setattr__(self, "phases", {p: self.phases[p] for p in PHASES})

    @classmethod
    def of(cls, **phases: int) -> RoundSchedule:
        """`RoundSchedule.of(train=30, commit=5, ...)`: tempo is the sum of the phases."""
        return cls(sum(phases.values()), phases)

    def at(self, block: int) -> RoundPhase:
        if block < 0:
            raise ValueError(f"block must be >= 0, got {block}")
        rnd, offset = divmod(block, self.tempo_blocks)
        start = 0
        for name in PHASES:
            end = start + self.phases[name]
            if offset < end:
                return RoundPhase(round=rnd, phase=name, block_in_round=offset, blocks_left_in_phase=end - offset)
            start = end
        raise AssertionError("unreachable: phases sum to tempo")

    def round_start(self, round: int) -> int:
        if round < 0:
            raise ValueError(f"round must be >= 0, got {round}")
        return round * self.tempo_blocks

    def phase_start(self, round: int, phase: str) -> int:
        """The first block of `phase` in `round`."""
        if phase not in self.phases:
            raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
        offset = sum(self.phases[p] for p in PHASES[:PHASES.index(phase)])
        return self.round_start(round) + offset

    def phase_blocks(self, round: int, phase: str) -> range:
        """The blocks of `phase` in `round` (`block in schedule.phase_blocks(r, "reveal")`)."""
        start = self.phase_start(round, phase)
        return range(start, start + self.phases[phase])

    def commit_window(self, round: int) -> range:
        """Blocks in which a commitment for `round` counts: its train and commit phases (a miner
        may commit as soon as it has trained)."""
        return range(self.round_start(round), self.phase_start(round, "reveal"))

    def reveal_window(self, round: int) -> range:
        """Blocks in which a reveal for `round` counts: its reveal phase. Not earlier: data
        revealed while others can still commit could be copied and committed as theirs."""
        return self.phase_blocks(round, "reveal")


@dataclass(frozen=True)
class RoundConfig:
    """Phase lengths from the environment. The tempo is their sum, so it cannot disagree.

    The defaults give a 60-block round (one minute at the local chain's 1 s blocks): most of
    it training, short commit and reveal phases, and time for validators to score and merge.
    """

    train_blocks: int = env("ROUND_TRAIN_BLOCKS", 25, "blocks per round in which miners train")
    # 10 s at 1 s blocks: a publisher waits for a step boundary and uploads before it commits.
    commit_blocks: int = env("ROUND_COMMIT_BLOCKS", 10,
                             "blocks in which miners commit the hash of their checkpoint (the commit "
                             "window also includes the train phase)")
    reveal_blocks: int = env("ROUND_REVEAL_BLOCKS", 5, "blocks in which miners reveal what they committed")
    validate_blocks: int = env("ROUND_VALIDATE_BLOCKS", 15, "blocks in which validators score and set weights")
    merge_blocks: int = env("ROUND_MERGE_BLOCKS", 5, "blocks in which the winning checkpoints are merged")

    def __post_init__(self):
        # Checked here, not only by RoundSchedule, so the error names the variable to fix.
        for var in variables(RoundConfig):
            value = getattr(self, var.name.removeprefix("ROUND_").lower())
            if value <= 0:
                raise ConfigError(f"{var.name} must be a positive number of blocks, got {value}")

    def schedule(self) -> RoundSchedule:
        return RoundSchedule.of(train=self.train_blocks, commit=self.commit_blocks, reveal=self.reveal_blocks,
                                validate=self.validate_blocks, merge=self.merge_blocks)


class BlockSource(Protocol):
    def block(self) -> int: ...


@dataclass
class PhaseWatcher:
    """Polls `chain.block()` every `poll_s` in a daemon thread and calls `on_change(RoundPhase)`
    on each (round, phase) transition; the first poll reports the phase it starts in.

    Phases that begin and end between two polls are not replayed: a callback only ever hears
    about the phase the chain is in now. The callback runs on the watcher thread; an asyncio
    service hands it over with `loop.call_soon_threadsafe`. A failing poll (chain unreachable)
    or callback is logged and the watcher carries on.
    """

    chain: BlockSource
    schedule: RoundSchedule
    on_change: Callable[[RoundPhase], None]
    poll_s: float = 0.5
    current: RoundPhase | None = field(default=None, init=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.poll_s <= 0:
            raise ValueError(f"poll_s must be positive, got {self.poll_s}")

    def poll(self) -> RoundPhase | None:
        """Read the block once; call back and return the new phase if it changed, else None."""
        now = self.schedule.at(self.chain.block())
        if self.current is not None and (now.round, now.phase) == (self.current.round, self.current.phase):
            self.current = now
            return None
        self.current = now
        try:
            self.on_change(now)
        except Exception:
            log.exception("phase callback failed for round %d phase %s", now.round, now.phase)
        return now

    def start(self) -> PhaseWatcher:
        if self._thread is not None:
            raise RuntimeError("this PhaseWatcher is already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="phase-watcher", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as e:  # a chain outage must not end the watcher
                log.warning("phase poll failed (retrying in %.2f s): %s", self.poll_s, e)
            self._stop.wait(self.poll_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None


def wait_for_phase(chain: BlockSource, schedule: RoundSchedule, phase: str, round: int | None = None,
                   timeout_s: float = 60.0, poll_s: float = 0.25) -> RoundPhase:
    """Block until the chain is in `phase` (of `round`, if given); TimeoutError after `timeout_s`.

    Raises ValueError at once if `round` has already gone past that phase.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are {', '.join(PHASES)}")
    deadline = time.monotonic() + timeout_s
    while True:
        now = schedule.at(chain.block())
        if now.phase == phase and (round is None or now.round == round):
            return now
        if round is not None and (now.round, now.phase_index) > (round, PHASES.index(phase)):
            raise ValueError(f"round {round} phase {phase} is over (now round {now.round} phase {now.phase})")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"chain did not reach phase {phase}"
                               f"{'' if round is None else f' of round {round}'} within {timeout_s} s "
                               f"(now round {now.round} phase {now.phase})")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
