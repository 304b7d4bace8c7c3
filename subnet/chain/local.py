"""A chain kept in Redis, for the local stack and the tests. Every process that opens the same
Redis (and key prefix) sees the same chain.

Blocks advance with wall time: block = floor((now - genesis) / block_s), where `now` is the
Redis server's clock (one clock for every process, whatever their hosts' clocks say) and
genesis is written once with SET NX by the first process to ask.

Keys, under `key_prefix` (default `moe:chain:`):

    genesis             string  genesis time, unix seconds (float)
    next_uid            string  INCR counter; uid = value - 1
    uids                hash    hotkey -> uid
    neurons             hash    uid -> json {hotkey, coldkey, registered_block}
    stake               hash    uid -> stake (float)
    weights             hash    validator uid -> json {uids, weights (normalized), block}
    endpoints           hash    uid -> json {endpoint, block}       (where the hotkey serves)
    commit:<round>      hash    hotkey -> json {digest, block}      (expires after KEEP_ROUNDS)
    reveal:<round>      hash    hotkey -> json {data, block}        (expires after KEEP_ROUNDS)

Rules it enforces (each refusal is a ChainError saying which rule):
- only registered hotkeys commit, reveal, set weights or serve, each with a valid sr25519
  signature of the payload from `subnet.chain.signing`;
- an endpoint is `host:port` (`rules.check_endpoint`); serving again replaces it. The metagraph
  shows an unreadable stored endpoint as "" instead of failing: miners can write this Redis;
- a hotkey holds a validator permit while its stake is > 0 (Bittensor gives permits to the
  top-K stakes; here any staked hotkey may validate), and only permit holders set weights;
- commit for round r only in r's commit window (its train and commit phases), once per round;
- reveal for round r only in r's reveal phase, and only data whose sha256 is the committed
  digest. Since the commit window ends before the reveal phase starts, a reveal always comes
  at least one block after its commit. A repeated valid reveal is a no-op.

Incentive is the stake-weighted median of the weights (`subnet.chain.weights.incentives`).
Not a blockchain: no consensus, no history, no fees; Redis is trusted (but for endpoints, above).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator

import redis

from subnet.chain.base import Chain, ChainError, Commitment, Hyperparameters, Metagraph, Neuron
from subnet.chain.rules import (
    check_commit_block,
    check_digest,
    check_endpoint,
    check_reveal_block,
    check_reveal_matches,
    is_endpoint,
)
from subnet.chain.signing import (
    check_hotkey,
    commit_payload,
    reveal_payload,
    serve_payload,
    verify_signature,
    weights_payload,
)
from subnet.chain.weights import incentives, normalize_weights
from subnet.rounds import RoundSchedule

KEY_PREFIX = "moe:chain:"
KEEP_ROUNDS = 100  # commitments of older rounds expire; nobody validates a round that old

# Looks up the hotkey and allocates a uid in one step, so two processes registering the same
# hotkey at once get the same uid and the counter is never bumped twice for it.
_REGISTER = """
local uid = redis.call('HGET', KEYS[1], ARGV[1])
if uid then return tonumber(uid) end
uid = redis.call('INCR', KEYS[2]) - 1
redis.call('HSET', KEYS[1], ARGV[1], uid)
redis.call('HSET', KEYS[3], uid, ARGV[2])
redis.call('HSET', KEYS[4], uid, ARGV[3])
return uid
"""


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LocalChain(Chain):
    """The `Chain` interface over one Redis client. Holds no chain state of its own besides the
    genesis time it read (immutable once set). `clock` replaces the Redis server clock in tests.
    """

    def __init__(self, redis_client: redis.Redis, schedule: RoundSchedule, block_s: float = 1.0,
                 key_prefix: str = KEY_PREFIX, clock: Callable[[], float] | None = None):
        if not (block_s > 0 and math.isfinite(block_s)):
            raise ValueError(f"block_s must be a positive number of seconds, got {block_s}")
        self.redis = redis_client
        self.schedule = schedule
        self.block_s = block_s
        self.prefix = key_prefix
        self._clock = clock
        self._genesis: float | None = None
        self._register = self.redis.register_script(_REGISTER)

    def _key(self, name: str) -> str:
        return self.prefix + name

    @contextlib.contextmanager
    def _redis(self) -> Iterator[None]:
        try:
            yield
        except redis.exceptions.RedisError as e:
            raise ChainError(f"local chain (Redis) unreachable or failing: {e}") from e

    # Blocks ---------------------------------------------------------------------------------

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        seconds, micros = self.redis.time()
        return seconds + micros / 1e6

    def genesis(self) -> float:
        if self._genesis is None:
            with self._redis():
                key = self._key("genesis")
                self.redis.set(key, repr(self._now()), nx=True)
                self._genesis = float(_text(self.redis.get(key)))
        return self._genesis

    def block(self) -> int:
        genesis = self.genesis()
        with self._redis():
            return max(0, math.floor((self._now() - genesis) / self.block_s))

    def hyperparameters(self) -> Hyperparameters:
        return Hyperparameters(tempo=self.schedule.tempo_blocks, commit_reveal_period=0,
                               commit_reveal_enabled=False, block_s=self.block_s,
                               extra={"phases": dict(self.schedule.phases)})

    # Neurons --------------------------------------------------------------------------------

    def register(self, hotkey: str, coldkey: str = "", stake: float = 0.0) -> int:
        """Register `hotkey` and return its uid. Idempotent: registering again returns the same
        uid and changes nothing (use `set_stake` to change the stake)."""
        check_hotkey(hotkey)
        _check_stake(stake)
        record = json.dumps({"hotkey": hotkey, "coldkey": coldkey, "registered_block": self.block()})
        with self._redis():
            return int(self._register(keys=[self._key("uids"), self._key("next_uid"), self._key("neurons"),
                                             self._key("stake")], args=[hotkey, record, repr(float(stake))]))

    def set_stake(self, hotkey: str, stake: float) -> None:
        """Local only (stands in for staking): set a registered hotkey's stake."""
        _check_stake(stake)
        uid = self._uid(hotkey, "set stake")
        with self._redis():
            self.redis.hset(self._key("stake"), str(uid), repr(float(stake)))

    def _uid(self, hotkey: str, what: str) -> int:
        with self._redis():
            uid = self.redis.hget(self._key("uids"), hotkey)
        if uid is None:
            raise ChainError(f"{what}: hotkey {hotkey} is not registered")
        return int(uid)

    def metagraph(self) -> Metagraph:
        block = self.block()
        with self._redis():
            pipe = self.redis.pipeline(transaction=True)  # one consistent snapshot
            pipe.hgetall(self._key("neurons"))
            pipe.hgetall(self._key("stake"))
            pipe.hgetall(self._key("weights"))
            pipe.hgetall(self._key("endpoints"))
            neurons_raw, stake_raw, weights_raw, endpoints_raw = pipe.execute()
        # int(), float() and json.loads() take bytes and str alike, whatever the client decodes.
        records = {int(k): json.loads(v) for k, v in neurons_raw.items()}
        stakes = {int(k): float(v) for k, v in stake_raw.items()}
        rows = {int(k): json.loads(v) for k, v in weights_raw.items()}
        endpoints = _endpoints(endpoints_raw)
        uids = sorted(records)
        # Weights of a validator whose stake has since dropped to 0 no longer count.
        incentive = incentives({v: dict(zip(r["uids"], r["weights"])) for v, r in rows.items()}, stakes, uids)
        neurons = []
        for uid in uids:
            record = records[uid]
            stake = stakes.get(uid, 0.0)
            neurons.append(Neuron(uid=uid, hotkey=record["hotkey"], coldkey=record.get("coldkey", ""), stake=stake,
                                  validator_permit=stake > 0, incentive=incentive[uid],
                                  last_weights_block=rows[uid]["block"] if uid in rows else None,
                                  endpoint=endpoints.get(uid, "")))
        return Metagraph(block=block, neurons=tuple(neurons))

    def serve(self, hotkey: str, endpoint: str, signature: bytes) -> None:
        what = "serve"
        uid = self._uid(hotkey, what)
        check_endpoint(endpoint, what)
        verify_signature(hotkey, serve_payload(hotkey, endpoint), signature, what)
        record = json.dumps({"endpoint": endpoint, "block": self.block()})
        with self._redis():
            self.redis.hset(self._key("endpoints"), str(uid), record)

    # Commitments ----------------------------------------------------------------------------

    def commit(self, hotkey: str, round: int, digest: str, signature: bytes) -> None:
        what = f"commit for round {round}"
        self._uid(hotkey, what)
        verify_signature(hotkey, commit_payload(hotkey, round, digest), signature, what)
        check_digest(digest, what)
        block = self.block()
        check_commit_block(self.schedule, round, block, what)
        key = self._key(f"commit:{round}")
        with self._redis():
            index = self.redis.incr(self._key("commit-index"))   # the order commits were applied in
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(key, hotkey, json.dumps({"digest": digest, "block": block, "index": index}))
            pipe.pexpire(key, self._keep_ms())
            created, _ = pipe.execute()
        if not created:
            raise ChainError(f"{what}: hotkey {hotkey} already committed for round {round}; "
                             f"one commitment per hotkey per round")

    def reveal(self, hotkey: str, round: int, data: str, signature: bytes) -> None:
        what = f"reveal for round {round}"
        self._uid(hotkey, what)
        verify_signature(hotkey, reveal_payload(hotkey, round, data), signature, what)
        block = self.block()
        check_reveal_block(self.schedule, round, block, what)
        with self._redis():
            committed = self.redis.hget(self._key(f"commit:{round}"), hotkey)
        if committed is None:
            raise ChainError(f"{what}: hotkey {hotkey} made no commitment for round {round}")
        check_reveal_matches(data, json.loads(committed)["digest"], what)
        key = self._key(f"reveal:{round}")
        with self._redis():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hsetnx(key, hotkey, json.dumps({"data": data, "block": block}))  # a repeat keeps the first
            pipe.pexpire(key, self._keep_ms())
            pipe.execute()

    def _keep_ms(self) -> int:
        return max(1, int(KEEP_ROUNDS * self.schedule.tempo_blocks * self.block_s * 1000))

    def commitments(self, round: int) -> list[Commitment]:
        with self._redis():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hgetall(self._key(f"commit:{round}"))
            pipe.hgetall(self._key(f"reveal:{round}"))
            commits, reveals = pipe.execute()
        reveals = {_text(k): json.loads(v) for k, v in reveals.items()}
        out = []
        for hotkey, raw in ((_text(k), json.loads(v)) for k, v in commits.items()):
            opened = reveals.get(hotkey)
            out.append(Commitment(hotkey=hotkey, round=round, digest=raw["digest"], commit_block=raw["block"],
                                  revealed=opened["data"] if opened else None,
                                  reveal_block=opened["block"] if opened else None,
                                  commit_index=int(raw.get("index", 0))))
        return sorted(out, key=lambda c: (c.commit_block, c.commit_index, c.hotkey))

    # Weights --------------------------------------------------------------------------------

    def set_weights(self, hotkey: str, uids: list[int], weights: list[float], signature: bytes) -> None:
        what = "set_weights"
        uid = self._uid(hotkey, what)
        verify_signature(hotkey, weights_payload(hotkey, uids, weights), signature, what)
        normalized = normalize_weights(uids, weights)
        with self._redis():
            pipe = self.redis.pipeline(transaction=True)
            pipe.hget(self._key("stake"), str(uid))
            pipe.hkeys(self._key("neurons"))
            stake, registered = pipe.execute()
        if not stake or float(stake) <= 0:
            raise ChainError(f"{what}: hotkey {hotkey} (uid {uid}) has no validator permit (stake 0)")
        unknown = sorted({int(u) for u in uids} - {int(u) for u in registered})
        if unknown:
            raise ChainError(f"{what}: uids {unknown} are not registered")
        row = {"uids": list(normalized), "weights": list(normalized.values()), "block": self.block()}
        with self._redis():
            self.redis.hset(self._key("weights"), str(uid), json.dumps(row))

    def weights(self) -> dict[int, dict[int, float]]:
        with self._redis():
            rows = self.redis.hgetall(self._key("weights"))
        return {int(v): dict(zip(r["uids"], r["weights"])) for v, r in
                ((k, json.loads(raw)) for k, raw in rows.items())}

    def close(self) -> None:
        """Closes the Redis client it was given."""
        self.redis.close()


def _endpoints(raw: dict) -> dict[int, str]:
    """{uid: endpoint} of the endpoints hash, without the entries serve() could not have written."""
    out = {}
    for key, value in raw.items():
        # RecursionError: json.loads of a deeply nested array a hostile writer stored.
        with contextlib.suppress(ValueError, TypeError, KeyError, RecursionError):
            endpoint = json.loads(value)["endpoint"]
            if is_endpoint(endpoint):
                out[int(key)] = endpoint
    return out


def _check_stake(stake: float) -> None:
    if not (math.isfinite(stake) and stake >= 0):
        raise ChainError(f"stake must be a finite number >= 0, got {stake}")
