"""What the scorer keeps in Redis, and the two atomic steps that change it: record one result,
fold one round into the EMA. Scoring itself is in `services.scorer.scoring`.

Keys, under SCORER_KEY_PREFIX (default `moe:scores:`):

    round:<r>       hash    hotkey -> composite score of round r, in [0, 1]. HSETNX per consumed result,
                            so it is also the "applied" marker: a result consumed twice counts once.
                            Fills during the validate phase; read by the validator's merge.
    rounds          zset    the rounds that have a round:<r> hash (member = score = r); hashes older
                            than SCORER_KEEP_ROUNDS rounds are deleted at fold time
    ema             hash    hotkey -> EMA of the composite score, in [0, 1], registered hotkeys only.
                            Changes once per round, when the round is folded (merge phase). Read by
                            the router.
    ema_uid         hash    hotkey -> the uid its EMA belongs to; a hotkey seen on another uid restarts at 0
    folded          string  the last round folded into `ema`; a result of a round <= this is "late":
                            stored in round:<r> but not in the EMA (its round has been closed)
    last            hash    hotkey -> JSON {round, zero, reason} of the hotkey's newest result
    banned          set     hotkeys whose newest result scored 0 (not verified, a copy, any reason;
                            added as soon as that result is consumed) or whose EMA is below
                            SCORER_BAN_EMA (at fold time). Read by the router; gets no weight.
    submitted       hash    scorer hotkey -> the last round it set weights for (or chose not to)

Recording and folding are atomic (a Lua script; WATCH/MULTI), so a scorer killed at any point
leaves either all or nothing of a step, and a restarted one neither loses nor double-counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from services.scorer.scoring import banned_hotkeys, fold_round

# Returns 0: already recorded; 1: recorded; 2: recorded, but its round is already folded.
_RECORD = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
local r = tonumber(ARGV[3])
redis.call('ZADD', KEYS[2], r, ARGV[3])
local last = redis.call('HGET', KEYS[3], ARGV[1])
if (not last) or cjson.decode(last)['round'] <= r then
  redis.call('HSET', KEYS[3], ARGV[1], cjson.encode({round = r, zero = (ARGV[4] == '1'), reason = ARGV[5]}))
  if ARGV[4] == '1' then
    redis.call('SADD', KEYS[4], ARGV[1])
  else
    local ema = redis.call('HGET', KEYS[5], ARGV[1])
    if (not ema) or tonumber(ema) >= tonumber(ARGV[6]) then redis.call('SREM', KEYS[4], ARGV[1]) end
  end
end
local folded = redis.call('GET', KEYS[6])
if folded and tonumber(folded) >= r then return 2 end
return 1
"""
_OUTCOMES = {0: "duplicate", 1: "recorded", 2: "late"}


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Fold:
    """One round folded into the EMA."""

    round: int
    scores: dict[str, float]     # the round's composite scores
    ema: dict[str, float]        # the EMA after it
    banned: set[str]


class ScoreStore:
    """The scorer's Redis keys (module docstring). Knows nothing about streams or the chain."""

    def __init__(self, client: redis.Redis, prefix: str = "moe:scores:"):
        self.redis = client
        self.prefix = prefix
        self._record = client.register_script(_RECORD)

    def key(self, name: str) -> str:
        return self.prefix + name

    def record(self, round: int, hotkey: str, score: float, zero: bool, reason: str, ban_ema: float) -> str:
        """Store one result's score once: "recorded", "duplicate" or "late" (see `folded`)."""
        keys = [self.key(f"round:{round}"), self.key("rounds"), self.key("last"), self.key("banned"),
                self.key("ema"), self.key("folded")]
        code = self._record(keys=keys, args=[hotkey, repr(float(score)), int(round), "1" if zero else "0",
                                             reason, repr(float(ban_ema))])
        return _OUTCOMES[int(code)]

    # Folding --------------------------------------------------------------------------------

    def folded_round(self) -> int | None:
        value = self.redis.get(self.key("folded"))
        return None if value is None else int(value)

    def fold_through(self, round: int, registered: Mapping[str, int], alpha: float, ban_ema: float,
                     keep_rounds: int) -> list[Fold]:
        """Fold every round not folded yet, in order, up to `round`. The first fold ever starts at
        the oldest round with scores; a scorer down for longer than `keep_rounds` skips the rounds
        before that (their weight in the EMA would be below (1 - alpha) ** keep_rounds anyway)."""
        folded = self.folded_round()
        if folded is None:
            oldest = self.redis.zrange(self.key("rounds"), 0, 0)
            start = min(int(oldest[0]), round) if oldest else round
        else:
            start = folded + 1
        start = max(start, round - keep_rounds + 1)
        folds = []
        for r in range(start, round + 1):
            fold = self.fold(r, registered, alpha, ban_ema, keep_rounds)
            if fold is not None:
                folds.append(fold)
        return folds

    def fold(self, round: int, registered: Mapping[str, int], alpha: float, ban_ema: float,
             keep_rounds: int) -> Fold | None:
        """Fold `round`'s scores into the EMA, atomically; None if it (or a later round) already was."""
        watched = [self.key(n) for n in ("folded", f"round:{round}", "ema", "ema_uid", "last", "banned")]
        with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(*watched)
                    folded = pipe.get(self.key("folded"))
                    if folded is not None and int(folded) >= round:
                        pipe.unwatch()
                        return None
                    scores = _floats(pipe.hgetall(self.key(f"round:{round}")))
                    ema = _floats(pipe.hgetall(self.key("ema")))
                    uid_of = {_text(k): int(v) for k, v in pipe.hgetall(self.key("ema_uid")).items()}
                    last = {_text(k): json.loads(v) for k, v in pipe.hgetall(self.key("last")).items()}
                    old = [int(r) for r in pipe.zrangebyscore(self.key("rounds"), "-inf", round - keep_rounds)]
                    new_ema = fold_round(ema, uid_of, scores, registered, alpha)
                    last_zero = {hk for hk, rec in last.items() if rec.get("zero")}
                    banned = banned_hotkeys(new_ema, last_zero, registered, ban_ema)
                    pipe.multi()
                    pipe.delete(self.key("ema"), self.key("ema_uid"), self.key("banned"))
                    if new_ema:
                        pipe.hset(self.key("ema"), mapping={hk: repr(v) for hk, v in new_ema.items()})
                        pipe.hset(self.key("ema_uid"), mapping={hk: registered[hk] for hk in new_ema})
                    if banned:
                        pipe.sadd(self.key("banned"), *sorted(banned))
                    gone = [hk for hk in last if hk not in registered]
                    if gone:
                        pipe.hdel(self.key("last"), *gone)
                    for r in old:
                        pipe.delete(self.key(f"round:{r}"))
                    pipe.zremrangebyscore(self.key("rounds"), "-inf", round - keep_rounds)
                    pipe.set(self.key("folded"), round)
                    pipe.execute()
                    return Fold(round=round, scores=scores, ema=new_ema, banned=banned)
                except redis.WatchError:
                    continue  # a result or another scorer changed something under us: read again

    # Reads ----------------------------------------------------------------------------------

    def round_scores(self, round: int) -> dict[str, float]:
        return _floats(self.redis.hgetall(self.key(f"round:{round}")))

    def ema(self) -> dict[str, float]:
        return _floats(self.redis.hgetall(self.key("ema")))

    def banned(self) -> set[str]:
        return {_text(m) for m in self.redis.smembers(self.key("banned"))}

    def submitted_round(self, hotkey: str) -> int | None:
        value = self.redis.hget(self.key("submitted"), hotkey)
        return None if value is None else int(value)

    def set_submitted(self, hotkey: str, round: int) -> None:
        self.redis.hset(self.key("submitted"), hotkey, int(round))


def _floats(raw: Mapping) -> dict[str, float]:
    return {_text(k): float(v) for k, v in raw.items()}
