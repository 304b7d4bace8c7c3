"""Which replica of an expert the router calls next.

The router keeps a snapshot of the Redis registry (`subnet.registry.ExpertRegistry`),
refreshed when it is older than `refresh_s` at the moment of a choice, never once per
call. Each choice skips endpoints that failed within the last `suspect_s` (so a dead or
slow service does not cost a deadline on every step) and the caller's `exclude` set (the
endpoints a retry already tried).

Policies:
- `least_loaded`: smallest registry load (tokens queued at its last heartbeat) + the tokens
  of this router's calls in flight to the endpoint; ties rotate so equal replicas share
  the work.
- `round_robin`: the available replicas of a uid in turn.

Scores (the router listens to the scorer): with a `scores` source, a replica whose hotkey is
banned (its last result failed the verification gate: live weights differ from the published
ones, a copy, an unverifiable checkpoint) gets no traffic; a uid whose every replica is banned
is masked, since a banned replica may serve random weights.

Among the others, training and serving differ:
- Training calls (`by_score=False`) are the miners' work: every non-banned replica gets its
  share by the replica policy (ARCHITECTURE section 4: replicas train on disjoint token shares
  and the validator merges them). Following the EMA here would be rich-get-richer: a replica
  that lost one round by noise would get too few tokens to ever show an improvement again
  (seen in CI: an honest miner starved by the first earner, ending with weight 0).
- Serving calls (`by_score=True`, inference for users) go to the earners in proportion to
  their EMA (a hotkey without a score yet counts as the median); replicas whose EMA is below
  `min_ema` get only an exploration share (`explore`, default 10%) while a replica of the same
  expert has earned more. When nobody has earned yet the replica policy decides.

Suspicion is per (endpoint, expert uid): one failing expert does not mask the other experts
that service hosts. Overload answers (RESOURCE_EXHAUSTED) are not failures.

With `start()` the registry (and the scores) are re-read by a background thread every
`refresh_s`, so a stalled Redis never holds up a choice: the router keeps routing on the last
snapshot while Redis is away. Without it (tests), a choice refreshes a stale snapshot inline.

This class only chooses. It makes no RPC; the caller reports `begin_call`/`end_call` and
`mark_failed`.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from subnet.log_throttle import LogThrottle

if TYPE_CHECKING:
    from subnet.registry import Replica

log = logging.getLogger(__name__)

POLICIES = ("least_loaded", "round_robin")
REGISTRY_DOWN_LOG_S = 60.0  # while the registry fails, how often to say it still does


class ReplicaSource(Protocol):
    """What the choice needs from the registry (ExpertRegistry has it)."""

    def all_replicas(self) -> Mapping[str, Sequence[Replica]]: ...


class ScoreSource(Protocol):
    """(EMA per hotkey, banned hotkeys) as the scorer last wrote them (services/scorer)."""

    def scores(self) -> tuple[Mapping[str, float], Collection[str]]: ...


class ReplicaSet:
    """Replica choice per expert uid from a periodically refreshed registry snapshot. Thread-safe."""

    def __init__(self, registry: ReplicaSource, *, policy: str = "least_loaded", refresh_s: float = 2.0,
                 suspect_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 scores: ScoreSource | None = None, rng: random.Random | None = None, min_ema: float = 0.01,
                 grace_s: float = 0.0, explore: float = 0.1):
        if policy not in POLICIES:
            raise ValueError(f"replica policy must be one of {POLICIES}, got {policy!r}")
        if refresh_s < 0 or suspect_s < 0:
            raise ValueError(f"refresh_s and suspect_s must be >= 0, got {refresh_s}, {suspect_s}")
        self.policy = policy
        self._registry = registry
        self._refresh_s = refresh_s
        self._suspect_s = suspect_s
        self._clock = clock
        self._scores_log = LogThrottle(REGISTRY_DOWN_LOG_S, clock=clock)   # "scores unavailable": not once per refresh
        self._lock = threading.Lock()
        self._snapshot: dict[str, list[Replica]] = {}
        self._hotkeys: dict[str, str] = {}   # endpoint -> hotkey, from the same snapshot
        self._refreshed_at: float | None = None
        self._in_flight: dict[str, int] = defaultdict(int)
        self._suspect_until: dict[tuple[str, str | None], float] = {}
        self._turns: dict[str, itertools.count] = defaultdict(itertools.count)
        self._scores = scores
        self._grace_s = grace_s   # vanished replicas stay this long (see _with_recently_seen)
        self._last_seen: dict[tuple[str, str], tuple[float, Replica]] = {}
        self._min_ema = min_ema
        self._explore = explore
        self._ema: dict[str, float] = {}
        self._banned: frozenset[str] = frozenset()
        self._rng = rng or random.Random()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # While the registry fails: since when, and when that was last logged (clock times).
        self._registry_down_since: float | None = None
        self._registry_down_logged: float | None = None

    def refresh(self) -> None:
        """Read the registry now. On error keep the last snapshot and try again after `refresh_s`."""
        now = self._clock()
        try:
            snapshot = {uid: sorted(reps, key=lambda r: r.endpoint)
                        for uid, reps in self._registry.all_replicas().items()}
        except Exception as e:  # the registry is another process; its failure must not stop the router
            self._note_registry_down(e, now)
            with self._lock:
                self._refreshed_at = now
            return
        hotkeys = {r.endpoint: r.hotkey for reps in snapshot.values() for r in reps if r.hotkey}
        ema, banned = self._read_scores()
        with self._lock:
            down_since, self._registry_down_since = self._registry_down_since, None
            self._snapshot = self._with_recently_seen(snapshot, now)
            # Hotkeys are remembered, not replaced: a step's Backward/GradNorm/ApplyStep must still be
            # signed for a replica whose registry entry vanished mid-step.
            self._hotkeys.update(hotkeys)
            self._refreshed_at = now
            if ema is not None:
                self._ema, self._banned = ema, banned
        if down_since is not None:
            log.info("registry answers again after %.0f s", now - down_since)

    def _note_registry_down(self, e: Exception, now: float) -> None:
        """One line when the registry stops answering, then one per REGISTRY_DOWN_LOG_S: an outage
        otherwise logs a traceback every `refresh_s` (the cause does not change between refreshes).
        The traceback goes to DEBUG, for a failure that is a bug rather than an outage."""
        error = f"{type(e).__name__}: {str(e)[:200]}"
        with self._lock:
            first = self._registry_down_since is None
            if first:
                self._registry_down_since = self._registry_down_logged = now
            elif now - self._registry_down_logged < REGISTRY_DOWN_LOG_S:
                return
            self._registry_down_logged = now
            down_s, known = now - self._registry_down_since, len(self._snapshot)
        if first:
            log.warning("registry unreachable (%s); routing on the %d experts known until it answers",
                        error, known)
            log.debug("registry refresh failed", exc_info=e)
        else:
            log.warning("registry still unreachable after %.0f s (%s)", down_s, error)

    def _with_recently_seen(self, snapshot: dict[str, list[Replica]], now: float) -> dict[str, list[Replica]]:
        """`snapshot` plus the replicas seen within the last `grace_s` that it lacks: a Redis that
        restarted empty (or lost keys) must not mask every expert until the next heartbeats. A
        replica that is really gone fails its next call and is suspected like any other."""
        for uid, reps in snapshot.items():
            for r in reps:
                self._last_seen[(uid, r.endpoint)] = (now, r)
        merged = {uid: list(reps) for uid, reps in snapshot.items()}
        for (uid, endpoint), (seen, replica) in list(self._last_seen.items()):
            if now - seen > self._grace_s:
                del self._last_seen[(uid, endpoint)]
            elif all(r.endpoint != endpoint for r in merged.get(uid, ())):
                merged.setdefault(uid, []).append(replica)
        return {uid: sorted(reps, key=lambda r: r.endpoint) for uid, reps in merged.items()}

    def _read_scores(self) -> tuple[dict[str, float] | None, frozenset[str]]:
        if self._scores is None:
            return None, frozenset()
        try:
            ema, banned = self._scores.scores()
        except Exception as e:  # keep the last scores; routing must not depend on the scorer being up
            self._scores_log.warning(log, "scores unavailable (%s: %s); keeping the last ones", type(e).__name__,
                                     str(e)[:200])
            return None, frozenset()
        parsed = {}
        for hotkey, value in ema.items():   # one bad value (the Redis is shared) must not void the others
            try:
                score = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(score):
                parsed[hotkey] = score
        return parsed, frozenset(banned)

    def start(self) -> ReplicaSet:
        """Refresh in a background thread from now on (first read inline)."""
        self.refresh()
        self._thread = threading.Thread(target=self._refresh_forever, name="replica-refresh", daemon=True)
        self._thread.start()
        return self

    def _refresh_forever(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _refresh_if_stale(self) -> None:
        if self._thread is not None:
            return  # the background thread keeps it fresh; a choice never waits for Redis
        with self._lock:
            stale = self._refreshed_at is None or self._clock() - self._refreshed_at >= self._refresh_s
        if stale:
            self.refresh()

    def replicas(self, uid: str) -> list[Replica]:
        """The replicas of `uid` in the current snapshot (suspects included)."""
        self._refresh_if_stale()
        with self._lock:
            return list(self._snapshot.get(uid, ()))

    def choose(self, uid: str, exclude: Collection[str] = (), by_score: bool = True) -> Replica | None:
        """A replica of `uid` that is not excluded, banned or suspect; None when there is none.
        `by_score`: follow the EMA (serving); False spreads by the policy (training, see above)."""
        self._refresh_if_stale()
        now = self._clock()
        with self._lock:
            candidates = [r for r in self._snapshot.get(uid, ())
                          if r.endpoint not in exclude and r.hotkey not in self._banned
                          and self._suspect_until.get((r.endpoint, uid), 0.0) <= now
                          and self._suspect_until.get((r.endpoint, None), 0.0) <= now]
            if not candidates:
                return None
            if by_score and self._ema:
                earned = self._earned(candidates)
                if earned:
                    others = [r for r in candidates if r not in earned]
                    if others and self._rng.random() < self._explore:
                        return others[self._rng.randrange(len(others))]
                    return self._by_score(earned)
            turn = next(self._turns[uid])
            if self.policy == "round_robin":
                return candidates[turn % len(candidates)]
            loads = [float(r.load) + self._in_flight[r.endpoint] for r in candidates]
            lightest = [r for r, load in zip(candidates, loads) if load == min(loads)]
            return lightest[turn % len(lightest)]

    def hotkey(self, endpoint: str) -> str | None:
        """The hotkey the registry lists for `endpoint` (whom a signed call to it is for); None if unknown.
        Reads the current snapshot only: it is asked on every call, right after `choose` refreshed it."""
        with self._lock:
            return self._hotkeys.get(endpoint)

    def begin_call(self, endpoint: str, tokens: int = 1) -> None:
        """Count a call in flight to `endpoint`, weighted by its tokens (the registry's load unit)."""
        with self._lock:
            self._in_flight[endpoint] += tokens

    def end_call(self, endpoint: str, tokens: int = 1) -> None:
        with self._lock:
            self._in_flight[endpoint] = max(0, self._in_flight[endpoint] - tokens)

    def in_flight(self, endpoint: str) -> int:
        with self._lock:
            return self._in_flight[endpoint]

    def _ema_of(self, hotkey: str) -> float:
        known = sorted(self._ema.values())
        return self._ema.get(hotkey, known[len(known) // 2] if known else 0.0)

    def _earned(self, candidates: list[Replica]) -> list[Replica]:
        return [r for r in candidates if self._ema_of(r.hotkey) >= self._min_ema and self._ema_of(r.hotkey) > 0]

    def _by_score(self, candidates: list[Replica]) -> Replica:
        weights = [self._ema_of(r.hotkey) for r in candidates]
        return self._rng.choices(candidates, weights=weights)[0]

    def mark_failed(self, endpoint: str, uid: str | None = None) -> None:
        """Skip `endpoint` for `suspect_s` (it just failed or missed a deadline) for expert `uid`,
        or for every expert it hosts when `uid` is None."""
        with self._lock:
            self._suspect_until[(endpoint, uid)] = self._clock() + self._suspect_s

    def mark_answered(self, endpoint: str, uid: str) -> None:
        """`endpoint` answered a call for `uid` after failing one: it is not suspect for `uid` any more
        (a GradNorm or ApplyStep sent again to the same replica, which cannot go elsewhere)."""
        with self._lock:
            self._suspect_until.pop((endpoint, uid), None)

    def is_suspect(self, endpoint: str, uid: str | None = None) -> bool:
        with self._lock:
            now = self._clock()
            return (self._suspect_until.get((endpoint, uid), 0.0) > now
                    or self._suspect_until.get((endpoint, None), 0.0) > now)

    def banned(self) -> frozenset[str]:
        with self._lock:
            return self._banned
