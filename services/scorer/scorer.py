"""The scorer: validators' results in, scores and EMA in Redis, weights on the chain.

    scorer = Scorer(config, identity, chain, redis_client)
    scorer.consume(timeout_s=1.0)    # score every result available (waits up to 1 s for the first)
    scorer.submit(round)             # fold the round into the EMA, set weights, write the scoreboard
    scorer.run(stop_event)           # both, forever: submit once per round, in its merge phase

When: results arrive during a round's validate phase; at the first tick in its merge phase the
round is closed (folded into the EMA; a result arriving later is "late": stored, not in the EMA)
and the weights are set. The merge phase, not "when all results are in", because the scorer
cannot know how many results a round will get; the validate phase is the validators' deadline.

All-zero EMAs: no weights are set (logged, the scoreboard says why). Uniform weights would pay
every registered hotkey the same for nothing; without a new call the chain keeps the previous
weights (Bittensor lets them age out).

Commit-reveal of weights: `Chain.set_weights` owns it (BittensorChain seals and reveals through
the SDK where the subnet enables it; LocalChain has none), so the scorer calls it the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field

import redis

from services.scorer.config import ScorerConfig
from services.scorer.metrics import ScorerMetrics
from services.scorer.scoreboard import Scoreboard, rows
from services.scorer.scoring import composite_score, passes_gate, weights_by_uid, zero_reason
from services.scorer.store import ScoreStore
from services.scorer.stream import Entry, ResultStream
from subnet.chain.base import Chain, ChainError
from subnet.chain.signing import weights_payload
from subnet.validation_results import ValidationResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    """What `submit` did for one round."""

    round: int
    block: int
    weights: dict[int, float] = field(default_factory=dict)   # {uid: weight}, empty when skipped
    skipped: str = ""                                          # why nothing was set ("" = it was)


class Scorer:
    """Scores results and sets weights. Holds no state that matters across restarts: that is in
    Redis (ScoreStore) and the stream's pending list. One per validator hotkey; several processes
    may share the consuming (one consumer group), each then also tries the round's submission."""

    def __init__(self, config: ScorerConfig, identity, chain: Chain, client: redis.Redis,
                 metrics: ScorerMetrics | None = None):
        """`identity`: has `.hotkey` and `.sign(bytes)` (subnet.identity.Identity)."""
        self.config, self.identity, self.chain, self.redis = config, identity, chain, client
        self.metrics = metrics or ScorerMetrics()
        self.schedule = config.rounds.schedule()
        self.weights = config.score_weights
        self.store = ScoreStore(client, config.key_prefix)
        consumer = config.consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.stream = ResultStream(client, config.validation_prefix + "results", consumer,
                                   config.claim_idle_s, config.batch)
        self.stream.ensure_group()
        self.board = Scoreboard(config.run_dir) if config.run_dir else None
        self._own_pending_checked = False

    # Consuming -----------------------------------------------------------------------------

    def consume(self, timeout_s: float = 0.0) -> int:
        """Score every result available now: this consumer's unacknowledged entries, entries other
        consumers abandoned, then new ones. Waits up to `timeout_s` when there is nothing at all.
        Returns how many entries were handled (duplicates and invalid ones included)."""
        deadline = time.monotonic() + timeout_s
        handled = 0
        while True:
            entries = self._available()
            if not entries and handled == 0:
                wait_ms = int((deadline - time.monotonic()) * 1000)
                if wait_ms > 0:
                    entries = self.stream.new(block_ms=wait_ms)
            if not entries:
                return handled
            for entry in entries:
                try:
                    self.handle(entry)
                except Exception:
                    # Not acknowledged: it comes back through own_pending on the next call.
                    self._own_pending_checked = False
                    raise
                handled += 1

    def _available(self) -> list[Entry]:
        if not self._own_pending_checked:
            entries = self.stream.own_pending()
            if len(entries) < self.stream.batch:
                self._own_pending_checked = True
            if entries:
                return entries
        return self.stream.claim() or self.stream.new()

    def handle(self, entry: Entry) -> str:
        """Score one stream entry, record it, then acknowledge it. Returns the outcome."""
        entry_id, fields = entry
        result = self._result_of(entry_id, fields)
        if result is None:
            outcome = "invalid"
        else:
            score = composite_score(result, self.weights, self.config.loss_scale)
            zero = not passes_gate(result)
            stored = self.store.record(result.round, result.hotkey, score, zero, zero_reason(result),
                                       self.config.ban_ema)
            outcome = ("zero" if zero else "scored") if stored == "recorded" else stored
            if stored == "late":
                log.warning("result of round %d for %s came after the round was closed: stored, not in the EMA",
                            result.round, result.hotkey)
        self.stream.ack(entry_id)  # only now: the score is in Redis (or the entry is unusable)
        self.metrics.results.labels(outcome=outcome).inc()
        return outcome

    def _result_of(self, entry_id: bytes, fields: dict) -> ValidationResult | None:
        """The result an entry points to; None (logged) for an entry no retry can fix."""
        try:
            round = int(_field(fields, "round"))
            hotkey = _field(fields, "hotkey")
            raw = self.redis.hget(f"{self.config.validation_prefix}result:{round}", hotkey)
            if raw is None:
                raise ValueError(f"no stored result for round {round} hotkey {hotkey}")
            result = ValidationResult.from_json(raw)
            if (result.round, result.hotkey) != (round, hotkey):
                raise ValueError(f"stored result is for round {result.round} hotkey {result.hotkey}")
            return result
        except (KeyError, ValueError, TypeError) as e:
            log.warning("skipping results entry %s: %s", entry_id, e)
            return None

    # Submitting ----------------------------------------------------------------------------

    def submit(self, round: int) -> Submission:
        """Close every round up to `round` (fold into the EMA), set weights from the EMA, write the
        scoreboard and metrics. ChainError if the chain refuses the weights (nothing is marked
        submitted then, so the next tick tries again). Call it once the round's results are in."""
        c = self.config
        metagraph = self.chain.metagraph()
        registered = {n.hotkey: n.uid for n in metagraph.neurons}
        for fold in self.store.fold_through(round, registered, c.ema_alpha, c.ban_ema, c.keep_rounds):
            if self.board:
                self.board.append_history(fold.round, fold.ema, registered)
        ema, scores, banned = self.store.ema(), self.store.round_scores(round), self.store.banned()
        weights = weights_by_uid(ema, registered, banned)
        skipped = ""
        if not weights:
            skipped = "every registered miner's EMA is 0 or it is banned"
            log.warning("round %d: %s; setting no weights (the chain keeps the previous ones)", round, skipped)
        else:
            uids, values = list(weights), list(weights.values())
            signature = self.identity.sign(weights_payload(self.identity.hotkey, uids, values))
            self.chain.set_weights(self.identity.hotkey, uids, values, signature)
            self.metrics.weights_submitted.inc()
        block = self.chain.block()
        if weights:
            self.metrics.last_submission_block.set(block)
            log.info("round %d: weights set for %d uids at block %d", round, len(weights), block)
        self.store.set_submitted(self.identity.hotkey, round)
        weight_of = {hk: weights.get(uid, 0.0) for hk, uid in registered.items()}
        self.metrics.set_table(scores, ema, {hk: w for hk, w in weight_of.items() if hk in ema})
        if self.board:
            table = rows(self._results(round), scores, ema, weights, registered, banned)
            self.board.write(round, block, bool(weights), skipped, table)
        return Submission(round=round, block=block, weights=weights, skipped=skipped)

    def _results(self, round: int) -> dict[str, ValidationResult]:
        out = {}
        for hotkey, raw in self.redis.hgetall(f"{self.config.validation_prefix}result:{round}").items():
            try:
                out[_text(hotkey)] = ValidationResult.from_json(raw)
            except (ValueError, TypeError):
                continue  # already logged when its entry was consumed
        return out

    def tick(self) -> Submission | None:
        """Submit for the current round if the chain is in its merge phase and that is not done."""
        now = self.schedule.at(self.chain.block())
        if now.phase != "merge":
            return None
        done = self.store.submitted_round(self.identity.hotkey)
        if done is not None and done >= now.round:
            return None
        return self.submit(now.round)

    def run(self, stop: threading.Event) -> None:
        """Consume and tick until `stop` is set; an outage of Redis or the chain is logged and retried."""
        while not stop.is_set():
            try:
                self.consume(self.config.poll_s)
                self.tick()
            except (redis.RedisError, ChainError) as e:
                log.warning("scorer step failed (retrying in %.1f s): %s", self.config.poll_s, e)
                stop.wait(self.config.poll_s)
                if "NOGROUP" in str(e):  # Redis restarted empty: the stream and group are gone
                    with contextlib.suppress(redis.RedisError):
                        self.stream.ensure_group()


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: dict, name: str) -> str:
    value = fields.get(name.encode(), fields.get(name))
    if value is None:
        raise KeyError(f"entry has no {name!r} field")
    return _text(value)
