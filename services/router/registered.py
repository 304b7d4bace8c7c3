"""Replicas whose hotkey is registered on the chain (ROUTER_REGISTERED_EXPERTS_ONLY=1).

A signed registry entry proves who advertised it, not that anyone vouches for that hotkey: a
miner can make fresh hotkeys for free and advertise replicas under each, and a hotkey without a
score yet counts as the median EMA (services/router/replicas.py), so such replicas draw traffic.
Registering on the chain costs something (on Bittensor, a burn), so the router can route only to
registered hotkeys, read from a cached metagraph (subnet.auth.policy.ChainPolicy, refreshed every
AUTH_CHAIN_REFRESH_S in the background; a routing decision never waits on the chain).

Fails closed: until the metagraph has been read once, no replica is routable.

    source = RegisteredReplicas(registry, ChainPolicy(chain, require_validator_permit=False).start())
    ReplicaSet(source, ...)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from subnet.auth.policy import ChainPolicy
from subnet.log_throttle import LogThrottle
from subnet.registry import Replica

log = logging.getLogger(__name__)


class RegisteredReplicas:
    """A ReplicaSource (`all_replicas()`) keeping only the replicas whose hotkey `policy` admits."""

    def __init__(self, source, policy: ChainPolicy, log_interval_s: float = 60.0,
                 on_skip: Callable[[str], None] = lambda category: None):
        """`on_skip("unregistered")`: once per replica left out, per read (for metrics)."""
        self.source, self.policy, self.on_skip = source, policy, on_skip
        self.skipped = 0   # replicas left out so far, one per replica per read
        self._throttle = LogThrottle(log_interval_s)

    def all_replicas(self) -> Mapping[str, Sequence[Replica]]:
        out: dict[str, list[Replica]] = {}
        left_out: dict[str, str] = {}   # hotkey -> why
        skipped = 0
        for uid, replicas in self.source.all_replicas().items():
            kept = []
            for r in replicas:
                why = self.policy.denial(r.hotkey) if r.hotkey else "names no hotkey"
                if why is None:
                    kept.append(r)
                else:
                    left_out[r.hotkey] = why
                    skipped += 1
                    self.on_skip("unregistered")
            if kept:
                out[uid] = kept
        if left_out:
            self.skipped += skipped
            hotkey, why = next(iter(left_out.items()))
            self._throttle.warning(log, "routing around the replicas of %d hotkey(s) the chain does not admit, "
                                   "e.g. %r: %s", len(left_out), hotkey[:48], why)
        return out

    def stop(self) -> None:
        self.policy.stop()
