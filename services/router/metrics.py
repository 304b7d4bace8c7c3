"""Prometheus metrics of the router, in a registry of their own (no process-global state).

    metrics = RouterMetrics()
    metrics.serve(9102)            # http://host:9102/metrics
    metrics.training_loss.set(loss)

Each RemoteExpertGroup records its expert calls here; the trainer sets the loss and
throughput gauges. Two RouterMetrics never collide, so tests build as many as they like.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from subnet.metric_children import Children
from subnet.process_metrics import register_process_metrics
from subnet.round_metrics import RoundMetrics

# Expert calls on loopback take a few ms; across a WAN with a GPU queue, seconds.
CALL_SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RouterMetrics:
    """The router's metrics. `registry` is the CollectorRegistry to expose."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        if registry is None:   # a registry passed in is the caller's, with its own process metrics or none
            register_process_metrics(self.registry)
        self.expert_call_seconds = Histogram(
            "router_expert_call_seconds", "Latency of one expert RPC attempt, by MoE layer and RPC.",
            ["layer", "rpc"], buckets=CALL_SECONDS_BUCKETS, registry=self.registry)
        self.expert_calls = Counter(
            "router_expert_calls", "Expert RPC attempts by MoE layer, RPC and gRPC status code.",
            ["layer", "rpc", "code"], registry=self.registry)
        self.expert_retries = Counter(
            "router_expert_retries", "Expert RPCs sent again (another replica, or with inputs to recompute).",
            ["layer", "rpc"], registry=self.registry)
        self.masked_calls = Counter(
            "router_masked_calls",
            "Expert calls given up on: forward -> expert masked, backward -> zero grad for its tokens.",
            ["layer", "uid", "rpc", "reason"], registry=self.registry)
        self.expert_tokens = Counter(
            "router_expert_tokens", "Tokens sent to experts in Forward calls, by MoE layer.",
            ["layer"], registry=self.registry)
        # Updated on every expert call: the children looked up once (subnet/metric_children.py).
        self.expert_call_seconds_of = Children(self.expert_call_seconds)
        self.expert_calls_of = Children(self.expert_calls)
        self.expert_tokens_of = Children(self.expert_tokens)
        self.tokens_per_second = Gauge(
            "router_tokens_per_second", "Tokens the router processed per second (last step or batch).",
            registry=self.registry)
        self.active_streams = Gauge(
            "router_active_streams", "Generate streams in the decode loop's batch now.", registry=self.registry)
        self.decode_batch = Histogram(
            "router_decode_batch", "Streams advanced by one model step of the decode loop (continuous batching).",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=self.registry)
        self.training_loss = Gauge(
            "router_training_loss", "Training loss of the last step.", registry=self.registry)
        self.registry_skipped = Counter(
            "router_registry_entries_skipped",
            "Registry entries left out of a read, once per entry and read (every ROUTER_REGISTRY_REFRESH_S), by "
            "why: malformed, unsigned, forged (not the named hotkey's signature), stale, unregistered.",
            ["reason"], registry=self.registry)
        self.chain_endpoints_skipped = Counter(
            "router_chain_endpoints_skipped",
            "ROUTER_DISCOVERY=chain: endpoints listed on the chain left out of a refresh, once per endpoint "
            "and hotkey and refresh, by why: unreachable (no signed Info answer in time), malformed, "
            "private or hostname (not asked: ROUTER_DISCOVERY_PRIVATE=0).",
            ["reason"], registry=self.registry)
        self.auth_rejections = Counter(
            "router_auth_rejections", "Generate/Logits requests refused by signature checks, by reason.",
            ["reason"], registry=self.registry)
        r = self.registry
        self.rounds = RoundMetrics(
            Gauge("router_round", "round the chain is in", registry=r),
            Gauge("router_round_phase", "phase: 0 train, 1 commit, 2 reveal, 3 validate, 4 merge", registry=r),
            Counter("router_checkpoints_published", "trunk checkpoints uploaded to S3", registry=r),
            Counter("router_commitments", "commits and reveals by result", ["result"], registry=r))

    def masked_count(self, layer: int, uid: str, rpc: str = "forward") -> float:
        """Masked calls so far for one expert and RPC, all reasons together."""
        total = 0.0
        for metric in self.masked_calls.collect():
            for sample in metric.samples:
                labels = sample.labels
                if (sample.name.endswith("_total") and labels["layer"] == str(layer)
                        and labels["uid"] == uid and labels["rpc"] == rpc):
                    total += sample.value
        return total

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Serve /metrics on `port` from a daemon thread; returns (server, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)
