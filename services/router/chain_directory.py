"""Expert replicas found through the chain instead of the Redis registry (ROUTER_DISCOVERY=chain).

Every registered miner publishes where it serves on the chain (`Chain.serve`, Bittensor's
`serve_axon`; the expert service does it at start with EXPERT_SERVE_ON_CHAIN=1). The router reads
those endpoints from its cached metagraph (ChainPolicy, re-read every AUTH_CHAIN_REFRESH_S) and
asks each one what it hosts with a signed Info addressed to the neuron's hotkey
(services/router/info_probe.py); the answer is taken only with that hotkey's signature. Each
expert a service names becomes a replica of that hotkey, with its load and version from the same
answer.

What this gives over the registry: the router reads nothing that miners write except through
the chain, where (on Bittensor) only a hotkey can change its own endpoint. A rival cannot delete
or overwrite another miner's listing, as any writer of the shared Redis can, and miners need no
access to the operator's Redis at all. A hotkey that lists someone else's endpoint gets nothing:
the service there signs its answer as itself, and the router refuses an answer not signed by
the hotkey it asked.

Costs and bounds: one Info per listed (endpoint, hotkey) per refresh (ROUTER_REGISTRY_REFRESH_S),
`workers` at a time, each bounded by `timeout_s`, and the whole refresh by DEADLINE_FACTOR x
`timeout_s`: what has not answered by then is left out (the ReplicaSet keeps what it saw for
ROUTER_REGISTRY_GRACE_S) and counted per reason by `on_skip`. Endpoints that are IP addresses
outside the public internet (loopback, private, link-local) or hostnames (which may resolve to
such addresses) are not asked unless `private_addresses` (ROUTER_DISCOVERY_PRIVATE=1; the local
stack, compose and k8s set it): otherwise any registered hotkey could make the router call into
its own network every refresh. Refreshes run one
at a time, in the ReplicaSet's background thread, never in a routing decision.

Before the first metagraph read nothing is routable (fail closed), and while nothing is
routable the metagraph is read every AUTH_CHAIN_RETRY_S instead of every AUTH_CHAIN_REFRESH_S: a
router that starts before its miners have listed finds them in seconds. New miners otherwise
appear within AUTH_CHAIN_REFRESH_S.

    directory = ChainDirectory(ChainPolicy(chain, require_validator_permit=False).start(), InfoProbe(identity))
    ReplicaSet(directory, ...)
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all

from subnet.auth.policy import ChainPolicy
from subnet.chain.rules import split_endpoint
from subnet.log_throttle import LogThrottle
from subnet.registry import Replica
from subnet.wire.v1 import expert_pb2

log = logging.getLogger(__name__)

MAX_EXPERTS_PER_SERVICE = 4096   # more in one Info answer is not a service but an attempt to fill our memory
MAX_UID_CHARS = 64               # as the registry bounds it
DEADLINE_FACTOR = 3.0            # a refresh waits at most this many probe timeouts (a queue of silent endpoints)

# (endpoint, hotkey, timeout_s) -> the service's Info answer, signed by `hotkey`.
Probe = Callable[[str, str, float], expert_pb2.InfoResponse]


class ChainDirectory:
    """A ReplicaSource (`all_replicas()`) built from the chain's endpoints and the services' Info."""

    def __init__(self, policy: ChainPolicy, probe: Probe, timeout_s: float = 2.0, workers: int = 16,
                 on_skip: Callable[[str], None] = lambda reason: None, private_addresses: bool = False,
                 log_interval_s: float = 60.0):
        """`on_skip(reason)`: once per (endpoint, hotkey) left out per refresh; reasons `unreachable`,
        `malformed`, `private`, `hostname`. `probe` may have `retain(endpoints)` (InfoProbe), called after each
        refresh with the endpoints still listed."""
        if timeout_s <= 0 or workers < 1:
            raise ValueError(f"timeout_s must be > 0 and workers >= 1, got {timeout_s} and {workers}")
        self.policy, self.probe, self.timeout_s, self.on_skip = policy, probe, timeout_s, on_skip
        self.private_addresses = private_addresses
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chain-directory")
        self._refreshing = threading.Lock()
        self._log = LogThrottle(log_interval_s)

    def all_replicas(self) -> Mapping[str, Sequence[Replica]]:
        with self._refreshing:   # a second caller (start-up's wait for experts) waits rather than doubling the probes
            return self._read()

    def _read(self) -> dict[str, list[Replica]]:
        graph = self.policy.metagraph
        if graph is None:
            self.policy.want_read()
            return {}
        listed = [(n.endpoint, n.hotkey) for n in graph.neurons if n.endpoint]
        failures: list[str] = []
        asked = []
        for endpoint, hotkey in listed:
            why_not = None if self.private_addresses else _not_public(endpoint)
            if why_not is not None:
                self.on_skip(why_not)
                failures.append(f"{endpoint!r} ({hotkey[:16]}...): {_NOT_PUBLIC[why_not]} (ROUTER_DISCOVERY_PRIVATE=0)")
            else:
                asked.append((endpoint, hotkey, self._pool.submit(self._ask, endpoint, hotkey)))
        wait_all([task for *_, task in asked], timeout=DEADLINE_FACTOR * self.timeout_s)
        out: dict[str, list[Replica]] = {}
        for endpoint, hotkey, task in asked:
            if not task.done():
                task.cancel()   # still queued: skip it; a running one ends by its own timeout
                self.on_skip("unreachable")
                failures.append(f"{endpoint!r} ({hotkey[:16]}...): no answer within this refresh")
                continue
            replicas, reason, why = task.result()
            if reason is not None:
                self.on_skip(reason)
                failures.append(why)
            for replica in replicas:
                out.setdefault(replica.uid, []).append(replica)
        retain = getattr(self.probe, "retain", None)
        if retain is not None:
            retain({endpoint for endpoint, _ in listed})
        if failures:
            self._log.warning(log, "left out %d endpoint(s) listed on the chain this refresh, e.g. %s",
                              len(failures), failures[0])
        if not out:   # nothing routable: look again within retry_s, not refresh_s (miners list once serving)
            self.policy.want_read()
        return out

    def _ask(self, endpoint: str, hotkey: str) -> tuple[list[Replica], str | None, str]:
        """(replicas, None, ""), or ([], the skip reason, what to log). Counted by the caller, so that
        a probe finishing after its refresh gave up on it is not counted twice."""
        try:
            answer = self.probe(endpoint, hotkey, self.timeout_s)
        except Exception as e:  # a miner's service may be down, slow or hostile: skip it, never fail the refresh
            # repr: the error text comes from the miner's service and may hold newlines.
            return [], "unreachable", f"{endpoint!r} ({hotkey[:16]}...): {type(e).__name__}: {str(e)[:120]!r}"
        why = _malformed(answer)
        if why is not None:
            return [], "malformed", f"{endpoint!r} ({hotkey[:16]}...): {why}"
        now_ms = int(time.time() * 1000)
        return [Replica(uid=e.uid, endpoint=endpoint, hotkey=hotkey, load=int(e.queued_tokens),
                        version=int(e.version), updated_ms=now_ms) for e in answer.experts], None, ""

    def stop(self) -> None:
        self.policy.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.probe, "close", None)
        if close is not None:
            close()


_NOT_PUBLIC = {"private": "not a public address",
               "hostname": "a hostname, which could resolve into the router's own network"}


def _not_public(endpoint: str) -> str | None:
    """`private` for an IP address outside the public internet (loopback, private, link-local, ...),
    `hostname` for a name: it is not resolved here, since it could resolve to such an address, and
    again to another one when gRPC dials it (only the local chain stores names; Bittensor stores
    IP addresses). None for a public IP address."""
    host, _ = split_endpoint(endpoint)
    try:
        return None if ipaddress.ip_address(host).is_global else "private"
    except ValueError:
        return "hostname"


def _malformed(answer) -> str | None:
    """Why an Info answer cannot be taken as a list of replicas, or None."""
    if not isinstance(answer, expert_pb2.InfoResponse):
        return f"answer is a {type(answer).__name__}, not an InfoResponse"
    if len(answer.experts) > MAX_EXPERTS_PER_SERVICE:
        return f"names {len(answer.experts)} experts (at most {MAX_EXPERTS_PER_SERVICE})"
    if len({e.uid for e in answer.experts}) < len(answer.experts):
        return "names an expert twice"
    for e in answer.experts:
        if not e.uid or len(e.uid) > MAX_UID_CHARS or not e.uid.isprintable():
            return f"expert uid {e.uid[:MAX_UID_CHARS]!r} is empty, longer than {MAX_UID_CHARS} or unprintable"
        if e.version < 0 or e.queued_tokens < 0:
            return f"expert {e.uid}: negative version or load"
    return None
