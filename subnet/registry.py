"""The expert registry in Redis: which replica of which expert lives where, and how busy it is.

One hash per replica, `moe:expert:<uid>:<endpoint>`, fields endpoint, uid, hotkey, load
(tokens queued), version (optimizer steps applied) and updated_ms. Every key carries a TTL;
a live expert service refreshes it (`Heartbeat`), so a dead one disappears by itself.

Readers (the router) call `replicas(uid)` or `all_replicas()`; they use SCAN, never KEYS,
so a big registry does not block Redis. The client is the synchronous `redis.Redis`;
async callers run it in a thread (as `Heartbeat` does).

Every miner can write to this Redis, so a read trusts no entry: one that is not a hash, has
bytes that are not UTF-8, a missing, non-numeric or negative field, or a uid and endpoint other
than its key's is skipped (counted in
`ExpertRegistry.skipped`, logged once per key and reason per `SKIP_LOG_INTERVAL_S`,
truncated) and every other entry is still returned. Only Redis itself failing raises.

Signed entries: a service with a hotkey signs each entry (field `sig`, sr25519 over
`entry_payload`), and a reader built with `require_signed=True` (the router with AUTH_MODE=on)
skips entries that are unsigned, signed by another key than the hotkey they name, or older than
`max_age_s` (a copy of someone's old entry). So an entry is its hotkey's own word: a miner cannot
list endpoints in a rival's name, and what a replica does is held against the hotkey that
advertised it (the scorer's bans apply). Entries can still be deleted by anyone who can write
the registry; the routers keep a replica they saw for ROUTER_REGISTRY_GRACE_S.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import redis

from subnet.chain.rules import ENDPOINT_MAX_CHARS, is_endpoint
from subnet.identity import verify_signature

log = logging.getLogger(__name__)

KEY_PREFIX = "moe:expert:"
SKIP_LOG_INTERVAL_S = 300.0  # a bad entry is logged again after this long if it is still there
_SHOW_CHARS = 200            # how much of a hostile key a log line may quote (keys can be megabytes)
_SHOW_ENTRIES = 10           # new bad entries logged one per line per read; the rest only counted
_GLOB_SPECIAL = str.maketrans({c: "\\" + c for c in "*?[]\\"})
_VERIFIED_CACHE = 4096       # (key, signature) pairs remembered as checked: an unchanged entry is verified once
DEFAULT_MAX_AGE_S = 60.0     # a signed entry refreshed less recently is skipped (clocks may differ by seconds)
# An sr25519 signature is 128 hex digits.
_MAX_CHARS = {"uid": 64, "endpoint": ENDPOINT_MAX_CHARS, "hotkey": 64, "sig": 128}


@dataclass(frozen=True)
class Replica:
    """One running copy of one expert, as last reported by its service."""

    uid: str
    endpoint: str
    hotkey: str
    load: int
    version: int
    updated_ms: int


def replica_key(uid: str, endpoint: str, prefix: str = KEY_PREFIX) -> str:
    return f"{prefix}{uid}:{endpoint}"


def entry_payload(uid: str, endpoint: str, hotkey: str, load: int, version: int, updated_ms: int) -> bytes:
    """The bytes a registry entry's `sig` signs: every field, in a fixed order."""
    return "\n".join(["moe-registry/v1", uid, endpoint, hotkey, str(int(load)), str(int(version)),
                      str(int(updated_ms))]).encode()


class ExpertRegistry:
    """Register, refresh, remove and list expert replicas. Besides the client it holds only the
    count of skipped entries and when each bad key was last logged. Thread-safe."""

    def __init__(self, redis_client: redis.Redis, ttl_s: float = 10.0, prefix: str = KEY_PREFIX,
                 require_signed: bool = False, max_age_s: float = DEFAULT_MAX_AGE_S,
                 on_skip: Callable[[str], None] = lambda category: None):
        """`require_signed`: reads skip entries that their hotkey did not sign, or signed more than
        `max_age_s` ago. `on_skip(category)`: once per skipped entry and read, with one of
        SKIP_CATEGORIES (for metrics)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        if max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive, got {max_age_s}")
        self.redis = redis_client
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.require_signed, self.max_age_s = require_signed, max_age_s
        self.on_skip = on_skip
        self._verified: dict[tuple[bytes, str], bool] = {}   # (signed payload, signature) -> valid
        self.skipped = 0  # unusable entries skipped by reads so far (one per entry per read)
        self._logged: dict[bytes, tuple[str, float]] = {}  # bad key -> (reason, when last logged)
        self._lock = threading.Lock()

    def register(self, uid: str, endpoint: str, hotkey: str = "", load: int = 0, version: int = 0,
                 signer=None) -> None:
        """Create or refresh the replica's hash and reset its TTL (one round trip). `signer` (an
        Identity: `.hotkey`, `.sign(bytes)`) signs the entry; its hotkey is the entry's."""
        key = replica_key(uid, endpoint, self.prefix)
        if signer is not None:
            if hotkey and hotkey != signer.hotkey:
                raise ValueError(f"entry names hotkey {hotkey} but {signer.hotkey} signs it")
            hotkey = signer.hotkey
        fields = {"endpoint": endpoint, "uid": uid, "hotkey": hotkey, "load": int(load),
                  "version": int(version), "updated_ms": int(time.time() * 1000)}
        if signer is not None:
            fields["sig"] = signer.sign(entry_payload(uid, endpoint, hotkey, fields["load"], fields["version"],
                                                      fields["updated_ms"])).hex()
        else:
            fields["sig"] = ""   # a refreshed entry must not keep an older signature
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.pexpire(key, int(self.ttl_s * 1000))
        pipe.execute()

    def deregister(self, uid: str, endpoint: str) -> None:
        self.redis.delete(replica_key(uid, endpoint, self.prefix))

    def replicas(self, uid: str) -> list[Replica]:
        """The live replicas of `uid`, least loaded first."""
        pattern = f"{self.prefix}{uid.translate(_GLOB_SPECIAL)}:*"
        return sorted(self._read(pattern), key=lambda r: (r.load, r.endpoint))

    def all_replicas(self) -> dict[str, list[Replica]]:
        """Every live replica, grouped by expert uid, each list least loaded first."""
        out: dict[str, list[Replica]] = {}
        for r in self._read(f"{self.prefix}*"):
            out.setdefault(r.uid, []).append(r)
        for replicas in out.values():
            replicas.sort(key=lambda r: (r.load, r.endpoint))
        return out

    def _read(self, pattern: str) -> list[Replica]:
        keys = list(self.redis.scan_iter(match=pattern, count=500))
        if not keys:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        out, skipped = [], []
        # raise_on_error=False: a key that is not a hash answers WRONGTYPE for itself only, and
        # must not fail the whole read (anyone who can register can write such a key).
        for key, raw in zip(keys, pipe.execute(raise_on_error=False)):
            if isinstance(raw, redis.exceptions.ResponseError):
                if not str(raw).startswith("WRONGTYPE"):
                    raise raw  # a server-side refusal (ACL, OOM...), not a bad entry
                skipped.append((key, "not a hash"))
                continue
            if not raw:  # expired between SCAN and HGETALL
                continue
            replica = _parse(raw)
            if isinstance(replica, Replica) and replica_key(replica.uid, replica.endpoint, self.prefix).encode() != \
                    (key if isinstance(key, bytes) else key.encode()):
                # replicas(uid) scans by the key: an entry must not claim another expert or endpoint there.
                replica = "its uid and endpoint do not match its key"
            if isinstance(replica, Replica) and self.require_signed:
                replica = self._check_signed(raw, replica)
            if isinstance(replica, Replica):
                out.append(replica)
            else:
                skipped.append((key, replica))
        if skipped:
            self._note_skipped(skipped)
        return out

    def _check_signed(self, raw: dict, replica: Replica) -> Replica | str:
        sig = raw.get(b"sig", raw.get("sig", b""))
        sig = sig.decode("ascii", "replace") if isinstance(sig, bytes) else str(sig)
        if not sig:
            return "not signed (this reader takes signed entries only)"
        if len(sig) != 128:
            return "its signature is not its hotkey's (not 64 bytes)"
        if time.time() * 1000 - replica.updated_ms > self.max_age_s * 1000:
            return f"signed more than {self.max_age_s:g} s ago"
        payload = entry_payload(replica.uid, replica.endpoint, replica.hotkey, replica.load, replica.version,
                                replica.updated_ms)
        cache_key = (payload, sig)   # what is signed and the signature: any change is checked anew
        with self._lock:
            known = self._verified.get(cache_key)
        if known is None:
            try:
                signature = bytes.fromhex(sig)
            except ValueError:
                signature = b""
            known = bool(replica.hotkey) and verify_signature(replica.hotkey, payload, signature)
            with self._lock:
                if len(self._verified) >= _VERIFIED_CACHE:
                    self._verified.clear()
                self._verified[cache_key] = known
        return replica if known else "its signature is not its hotkey's"

    def _note_skipped(self, skipped: list[tuple[bytes, str]]) -> None:
        """Count the skipped entries; log those not logged with the same reason within
        SKIP_LOG_INTERVAL_S, so a bad key costs one line per interval, not one per read."""
        for _, why in skipped:
            self.on_skip(skip_category(why))
        now = time.monotonic()
        with self._lock:
            self.skipped += len(skipped)
            # Forgetting the old ones keeps this no bigger than the bad keys of one interval.
            self._logged = {k: v for k, v in self._logged.items() if now - v[1] < SKIP_LOG_INTERVAL_S}
            new = [(k, why) for k, why in skipped if self._logged.get(k, ("",))[0] != why]
            for k, why in new:
                self._logged[k] = (why, now)
        for k, why in new[:_SHOW_ENTRIES]:
            log.warning("skipping unusable registry entry %s: %s", _show(k), why)
        if len(new) > _SHOW_ENTRIES:
            log.warning("skipping %d more unusable registry entries (not listed)", len(new) - _SHOW_ENTRIES)


SKIP_CATEGORIES = ("malformed", "unsigned", "forged", "stale")


def skip_category(reason: str) -> str:
    """The metric label of a skip reason: `unsigned`, `forged` (a signature that is not the named
    hotkey's: another key, or an altered entry), `stale` (signed too long ago), else `malformed`."""
    if reason.startswith("not signed"):
        return "unsigned"
    if reason.startswith("its signature"):
        return "forged"
    if reason.startswith("signed more than"):
        return "stale"
    return "malformed"


def _show(value: bytes | str) -> str:
    """`value` (a key) quoted for a log line, cut to _SHOW_CHARS: a hostile key may be megabytes."""
    text = repr(value[:_SHOW_CHARS])
    return text if len(value) <= _SHOW_CHARS else f"{text}... ({len(value)} long)"


def _parse(raw: dict) -> Replica | str:
    """The replica in an HGETALL reply, or why it is unusable. The reason never quotes the
    entry, so it stays the same while the entry is bad (one log line) and stays short."""
    try:
        h = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
             for k, v in raw.items()}
    except UnicodeDecodeError:
        return "a field is not UTF-8"
    for name in ("uid", "endpoint"):
        if name not in h:
            return f"no {name!r} field"
    for name, limit in _MAX_CHARS.items():   # what a reader keeps (and caches) stays small
        if len(h.get(name, "")) > limit:
            return f"{name!r} is longer than {limit} characters"
    if not is_endpoint(h["endpoint"]):   # the router dials it: "unix:50051" would reach a socket on its own host
        return "'endpoint' is not host:port"
    numbers = {}
    for name in ("load", "version", "updated_ms"):
        try:
            numbers[name] = int(h.get(name, 0))
        except ValueError:
            return f"{name!r} is not an integer"
        if numbers[name] < 0:  # a negative load would win every least-loaded choice
            return f"{name!r} is negative"
    return Replica(uid=h["uid"], endpoint=h["endpoint"], hotkey=h.get("hotkey", ""), **numbers)


@dataclass(frozen=True)
class HeartbeatEntry:
    """One replica a service keeps alive; `load`/`version` are read at every beat."""

    uid: str
    endpoint: str
    load: Callable[[], int] = lambda: 0
    version: Callable[[], int] = lambda: 0


class Heartbeat:
    """An asyncio task that re-registers a set of replicas every `interval_s` (default TTL/3).

    A Redis outage is logged and retried at the next beat; it never stops the service.
    `stop(deregister=True)` removes the replicas, so routers stop choosing them at once.
    """

    def __init__(self, registry: ExpertRegistry,
                 entries: Iterable[HeartbeatEntry | tuple[str, str, Callable[[], int]]],
                 hotkey: str = "", interval_s: float | None = None, signer=None):
        """`signer` (the service's Identity) signs every entry at every beat."""
        self.registry = registry
        self.signer = signer
        self.entries = [e if isinstance(e, HeartbeatEntry) else HeartbeatEntry(*e) for e in entries]
        self.hotkey = hotkey
        self.interval_s = interval_s if interval_s is not None else registry.ttl_s / 3
        self.beats = 0
        self._task: asyncio.Task | None = None
        # A cancelled beat may still be running in its thread; the lock and flag keep it from
        # re-registering after `stop` deregistered.
        self._lock = threading.Lock()
        self._stopped = False

    async def start(self) -> None:
        """Register every entry once, then keep refreshing. Redis being down at start-up is
        logged, not raised: the service is healthy, and the next beat registers it."""
        try:
            await asyncio.to_thread(self._beat)
        except (redis.exceptions.RedisError, OSError) as e:
            log.warning("registry unreachable, retrying every %.1f s: %s", self.interval_s, e)
        self._task = asyncio.create_task(self._run(), name="registry-heartbeat")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await asyncio.to_thread(self._beat)
            except (redis.exceptions.RedisError, OSError) as e:
                log.warning("registry heartbeat failed (retrying in %.1f s): %s", self.interval_s, e)

    def _beat(self) -> None:
        with self._lock:
            if self._stopped:
                return
            for e in self.entries:
                self.registry.register(e.uid, e.endpoint, hotkey=self.hotkey, load=e.load(),
                                       version=e.version(), signer=self.signer)
            self.beats += 1

    async def stop(self, deregister: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await asyncio.to_thread(self._finish, deregister)
        except (redis.exceptions.RedisError, OSError) as e:
            log.warning("could not deregister from the registry (the TTL will expire it): %s", e)

    def _finish(self, deregister: bool) -> None:
        with self._lock:  # waits for a beat still running in its thread
            self._stopped = True
            if deregister:
                for e in self.entries:
                    self.registry.deregister(e.uid, e.endpoint)
