"""What the chaos tests share: a ledger of every process they start, a Redis that can be paused
and restarted in place, a router reduced to one MoE layer, and the numbers they report.

The router side is the router's own wiring (`RemoteParts.connect`: background registry refresh,
Redis client with socket timeouts, signing channel pool, metrics); only the trunk is left out.
Each training step makes the calls a router step makes: Forward and Backward to every expert,
then GradNorm and ApplyStep to the replicas that took a Backward.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moe.boundary import OptimizerSettings
from moe.experts import expert_uid
from services.router.config import RouterConfig
from services.router.remote_experts import RemoteExpertGroup
from services.router.remote_model import RemoteParts
from services.router.tracing import ExpertCallTracer
from subnet.dev.redis_server import RedisServer
from subnet.expert_client import ExpertClientPool
from subnet.identity import Identity
from tests.integration.counter_totals import counter_total

RESULTS_DIR = Path(__file__).resolve().parent / ".results"


def gone(pid: int) -> bool:
    """True when no process `pid` exists any more (a zombie still counts as there)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


class Ledger:
    """Every process a test started, by pid; at the end each must be gone (os.kill(pid, 0) fails)."""

    def __init__(self):
        self.pids: dict[int, str] = {}

    def add(self, what: str, pid: int) -> None:
        self.pids[pid] = what

    def alive(self) -> list[str]:
        return [f"{what} (pid {pid})" for pid, what in self.pids.items() if not gone(pid)]


def resume(pid: int) -> None:
    """SIGCONT, if the process is still there (teardown of a test that failed mid-pause)."""
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


class ChaosRedis:
    """A private `redis-server` that a test may pause (SIGSTOP/SIGCONT) or restart on the same port.
    The url stays the same across restarts; every process it ran goes into the ledger."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self.server = self._start(RedisServer(port=0))
        self.port = self.server.port
        self.url = self.server.url

    def _start(self, server: RedisServer) -> RedisServer:
        server.start()
        self.ledger.add("redis-server", server.process.pid)
        return server

    @property
    def pid(self) -> int:
        return self.server.process.pid

    def stop(self) -> None:
        if self.server.process is not None:
            resume(self.server.process.pid)
        self.server.stop()

    def restart(self) -> None:
        """Stop it and start a fresh (empty) one on the same port, as a restarted container would be."""
        self.stop()
        self.server = self._start(RedisServer(port=self.port))

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=2.0)


def router_parts(redis_url: str, wallet, *, refresh_s: float = 0.5, suspect_s: float = 2.0,
                 timeout_s: float = 3.0) -> RemoteParts:
    """The router's registry view and channels, built as `python -m services.router` builds them."""
    config = RouterConfig(redis_url=redis_url, wallet=wallet, registry_refresh_s=refresh_s, suspect_s=suspect_s,
                          expert_timeout_s=timeout_s)
    return RemoteParts.connect(config)


class LayerTrainer:
    """One MoE layer trained through remote experts, step by step, with every call recorded as a span
    (rpc, expert uid, endpoint, status), so a test can count what the router sent where."""

    def __init__(self, parts: RemoteParts, layer: int, n_experts: int, dim: int, *, tokens: int,
                 timeout_s: float, seed: int = 0):
        self.spans = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.parts, self.layer, self.n_experts, self.dim = parts, layer, n_experts, dim
        self.tokens, self.seed = tokens, seed
        self.group = RemoteExpertGroup(layer, n_experts, dim, parts.replicas, timeout_s=timeout_s,
                                       metrics=parts.metrics, clients=parts.clients,
                                       tracer=ExpertCallTracer(provider))
        self.step = 0
        self.step_seconds: list[float] = []

    def uids(self) -> list[str]:
        return [expert_uid(self.layer, i) for i in range(self.n_experts)]

    def train_step(self, between=None) -> float:
        """One step; `between()` runs after the Forwards and before the Backwards (mid-step).
        Returns the step's wall time in seconds."""
        started = time.monotonic()
        self.group.begin_step(self.step)
        gen = torch.Generator().manual_seed(self.seed + self.step)
        xs = {i: torch.randn(self.tokens, self.dim, generator=gen) for i in range(self.n_experts)}
        ws = {i: torch.randn(self.tokens, self.dim, generator=gen) for i in range(self.n_experts)}
        leaves = {i: x.clone().requires_grad_() for i, x in xs.items()}
        outs = self.group.run(leaves)
        if between is not None:
            between()
        served = [outs[i] * ws[i] for i in outs if outs[i] is not None]
        if served:  # every expert masked: nothing to backpropagate, as in a layer that drops them all
            torch.stack([o.sum() for o in served]).sum().backward()
        self.group.external_grad_sq_norm()
        self.group.apply_external_step(1e-3, 1.0, OptimizerSettings())
        self.step += 1
        elapsed = time.monotonic() - started
        self.step_seconds.append(elapsed)
        return elapsed

    def steps_per_s(self, steps: int, rounds: int = 5) -> float:
        """Median of `rounds` runs of `steps` steps. Not the best run: two rates measured at different
        times are compared, and the luckiest window of one against a typical window of the other
        decided the ratio more than the fault did."""
        rates = []
        for _ in range(rounds):
            started = time.monotonic()
            for _ in range(steps):
                self.train_step()
            rates.append(steps / (time.monotonic() - started))
        return statistics.median(rates)

    def calls(self, rpc: str, *, endpoint: str | None = None, uid: str | None = None, ok: bool | None = None,
              since_ns: int = 0) -> int:
        """Calls sent so far (each attempt counts), filtered by rpc ("Forward", "ApplyStep", ...),
        endpoint, uid, outcome and start time (time.time_ns())."""
        n = 0
        for s in self.spans.get_finished_spans():
            a = s.attributes
            if (s.name == f"moe.v1.Expert/{rpc}" and (endpoint is None or a["server.address"] == endpoint)
                    and (uid is None or a["moe.expert_uid"] == uid) and s.start_time >= since_ns
                    and (ok is None or (a.get("rpc.grpc.status_code") == 0) == ok)):
                n += 1
        return n

    def masked(self, rpc: str | None = None) -> int:
        labels = {"layer": str(self.layer)} | ({"rpc": rpc} if rpc is not None else {})
        return int(counter_total(self.parts.metrics.masked_calls, **labels))

    def retries(self) -> int:
        return int(counter_total(self.parts.metrics.expert_retries, layer=str(self.layer)))


def versions(endpoint: str, hotkey: str, identity: Identity) -> dict[str, int]:
    """{uid: optimizer steps applied} as the service itself reports them (Info)."""
    pool = ExpertClientPool(identity=identity)
    try:
        info = pool.get(endpoint, hotkey).info(timeout_s=10.0)
        return {e.uid: int(e.version) for e in info.experts}
    finally:
        pool.close()


def wait_until(predicate, timeout_s: float, poll_s: float = 0.05, what: str = "condition") -> float:
    """Seconds until `predicate()` held; AssertionError after `timeout_s`."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout_s, f"{what} not reached within {timeout_s:.0f} s"
        time.sleep(poll_s)
    return time.monotonic() - started


@dataclass
class Report:
    """Numbers of the chaos tests of one session: printed per test, written as one JSON at the end."""

    results: dict[str, dict] = field(default_factory=dict)

    def record(self, test: str, **numbers) -> None:
        numbers = {k: round(v, 4) if isinstance(v, float) else v for k, v in numbers.items()}
        self.results[test] = numbers
        print(f"\nchaos {test}: {json.dumps(numbers, sort_keys=True)}")

    def write(self) -> Path:
        RESULTS_DIR.mkdir(exist_ok=True)
        path = RESULTS_DIR / "summary.json"
        path.write_text(json.dumps(self.results, indent=2, sort_keys=True) + "\n")
        return path
