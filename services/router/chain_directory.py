"""Expert replicas found through the chain instead of the Redis registry (ROUTER_DISCOVERY=chain).

Every registered miner publishes where it serves on the chain (`Chain.serve`, Bittensor's
`serve_axon`; the expert service does it at start with EXPERT_SERVE_ON_CHAIN=1). The router reads
those endpoints from its cached metagraph (ChainPolicy, re-read every AUTH_CHAIN_REFRESH_S) and
asks each one what it hosts with a signed Info call addressed to the neuron's hotkey; the answer
must be signed by that hotkey too. Each expert a service names becomes a replica of that hotkey,
with its load and version from the same answer.

What this gives over the registry: miners write nothing the router reads except through the
chain, where only a hotkey can change its own endpoint. A rival cannot delete or overwrite
another miner's listing (as any writer of the shared Redis can), and miners need no access to
the operator's Redis at all. A hotkey that names someone else's endpoint gets nothing: the
service there refuses a request addressed to another hotkey, so no answer is signed for it.

Costs: one Info per serving neuron per refresh (ROUTER_REGISTRY_REFRESH_S), in parallel, each
bounded by `timeout_s`; a refresh waits for the slowest, in the ReplicaSet's background thread,
never in a routing decision. A neuron that does not answer or answers nonsense is left out of
that refresh (counted per reason by `on_skip`); the ReplicaSet keeps what it saw for
ROUTER_REGISTRY_GRACE_S. Before the first metagraph read nothing is routable (fail closed), and
while nothing is routable the metagraph is read every AUTH_CHAIN_RETRY_S instead of every
AUTH_CHAIN_REFRESH_S: a router that starts before its miners have listed finds them in seconds.
New miners otherwise appear within AUTH_CHAIN_REFRESH_S.

    directory = ChainDirectory(ChainPolicy(chain, require_validator_permit=False).start(), probe)
    ReplicaSet(directory, ...)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_all

from subnet.auth.policy import ChainPolicy
from subnet.log_throttle import LogThrottle
from subnet.registry import Replica
from subnet.wire.v1 import expert_pb2

log = logging.getLogger(__name__)

MAX_EXPERTS_PER_SERVICE = 4096   # more in one Info answer is not a service but an attempt to fill our memory
MAX_UID_CHARS = 64               # as the registry bounds it

# (endpoint, hotkey, timeout_s) -> the service's Info answer, signed by `hotkey`.
Probe = Callable[[str, str, float], expert_pb2.InfoResponse]


class ChainDirectory:
    """A ReplicaSource (`all_replicas()`) built from the chain's endpoints and the services' Info."""

    def __init__(self, policy: ChainPolicy, probe: Probe, timeout_s: float = 2.0, workers: int = 16,
                 on_skip: Callable[[str], None] = lambda reason: None, log_interval_s: float = 60.0):
        """`on_skip(reason)`: once per neuron left out per refresh; reasons `unreachable`,
        `malformed`."""
        if timeout_s <= 0 or workers < 1:
            raise ValueError(f"timeout_s must be > 0 and workers >= 1, got {timeout_s} and {workers}")
        self.policy, self.probe, self.timeout_s, self.on_skip = policy, probe, timeout_s, on_skip
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="chain-directory")
        self._log = LogThrottle(log_interval_s)

    def all_replicas(self) -> Mapping[str, Sequence[Replica]]:
        graph = self.policy.metagraph
        if graph is None:
            self.policy.want_read()
            return {}
        # One task per endpoint: several hotkeys naming one endpoint are asked in turn, so each
        # request goes out signed for the hotkey whose answer it is checked against.
        claims: dict[str, list[str]] = {}
        for neuron in graph.neurons:
            if neuron.endpoint:
                claims.setdefault(neuron.endpoint, []).append(neuron.hotkey)
        tasks = [self._pool.submit(self._ask, endpoint, hotkeys) for endpoint, hotkeys in claims.items()]
        wait_all(tasks)   # each probe is bounded by timeout_s
        out: dict[str, list[Replica]] = {}
        failures: list[str] = []
        for task in tasks:
            replicas, failed = task.result()
            failures.extend(failed)
            for replica in replicas:
                out.setdefault(replica.uid, []).append(replica)
        if failures:
            self._log.warning(log, "left out %d endpoint(s) listed on the chain this refresh, e.g. %s",
                              len(failures), failures[0])
        if not out:   # nothing routable: look again within retry_s, not refresh_s (miners list once serving)
            self.policy.want_read()
        return out

    def _ask(self, endpoint: str, hotkeys: list[str]) -> tuple[list[Replica], list[str]]:
        replicas, failures = [], []
        for hotkey in hotkeys:
            try:
                answer = self.probe(endpoint, hotkey, self.timeout_s)
            except Exception as e:  # a miner's service may be down, slow or hostile: skip it, never fail the refresh
                self.on_skip("unreachable")
                failures.append(f"{endpoint} ({hotkey[:16]}...): {type(e).__name__}: {str(e)[:120]}")
                continue
            why = _malformed(answer)
            if why is not None:
                self.on_skip("malformed")
                failures.append(f"{endpoint} ({hotkey[:16]}...): {why}")
                continue
            now_ms = int(time.time() * 1000)
            replicas.extend(Replica(uid=e.uid, endpoint=endpoint, hotkey=hotkey, load=int(e.queued_tokens),
                                    version=int(e.version), updated_ms=now_ms) for e in answer.experts)
        return replicas, failures

    def stop(self) -> None:
        self.policy.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)


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
