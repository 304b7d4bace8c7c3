"""Prometheus metrics of one expert service, on their own HTTP port.

Each `ExpertMetrics` has its own CollectorRegistry (not the process-global one), so several
servers in one test process do not collide.

    expert_rpc_latency_seconds{rpc}         histogram, every RPC, errors included
    expert_rpc_errors_total{rpc,code}       answers with a non-OK status
    expert_tokens_total{expert,rpc}         tokens processed (Forward, Backward)
    expert_batch_tokens{expert}             histogram, tokens per forward computation
    expert_batch_requests{expert}           histogram, requests merged per forward computation
    expert_queue_tokens{expert}             tokens accepted and not yet answered (the load)
    expert_version{expert}                  optimizer steps applied
    expert_activation_cache_bytes           memory held for pending Backwards
    expert_auth_rejections_total{reason}    requests refused by signature checks (subnet.auth)
    expert_frames_connections               open moe-frames connections (subnet/frames)
    expert_frames_refused_total{reason}     frames refused before their call ran: busy, protocol, shutting_down
    expert_frames_sessions_total            authenticated sessions opened on moe-frames connections (subnet.auth)
    expert_chain_listed                     1 when the last publication or check found this service's endpoint
                                            listed for its hotkey, 0 after a failed one (EXPERT_SERVE_ON_CHAIN;
                                            0 in a service that does not publish)
    expert_chain_listings_published_total   endpoints sent to the chain (serve_axon), the first and every republication
    expert_round, expert_round_phase, expert_checkpoints_published_total, expert_commitments_total{result}
                                            rounds (subnet.round_metrics)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from subnet.metric_children import Children
from subnet.metrics_http import MetricsHttp
from subnet.process_metrics import register_process_metrics
from subnet.round_metrics import RoundMetrics

_TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536)
_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ExpertMetrics(MetricsHttp):
    """The metric objects plus the HTTP server that exposes them (`serve` / `stop`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        register_process_metrics(self.registry)
        r = self.registry
        self.rpc_latency = Histogram("expert_rpc_latency_seconds", "RPC latency", ["rpc"],
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.rpc_errors = Counter("expert_rpc_errors", "RPCs answered with a non-OK status",
                                  ["rpc", "code"], registry=r)
        self.tokens = Counter("expert_tokens", "tokens processed", ["expert", "rpc"], registry=r)
        self.batch_tokens = Histogram("expert_batch_tokens", "tokens per forward computation", ["expert"],
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_requests = Histogram("expert_batch_requests", "requests merged per forward computation",
                                        ["expert"], buckets=_REQUEST_BUCKETS, registry=r)
        self.queue_tokens = Gauge("expert_queue_tokens", "tokens accepted and not yet answered",
                                  ["expert"], registry=r)
        self.version = Gauge("expert_version", "optimizer steps applied", ["expert"], registry=r)
        self.stale_updates = Counter("expert_stale_updates", "asynchronous Backwards whose update was skipped: "
                                     "more than EXPERT_MAX_STALENESS updates after their Forward", ["expert"],
                                     registry=r)
        self.activation_cache_bytes = Gauge("expert_activation_cache_bytes",
                                            "bytes of activations held for pending Backwards", registry=r)
        self.auth_rejections = Counter("expert_auth_rejections", "requests refused by signature checks, by reason",
                                       ["reason"], registry=r)
        self.frames_connections = Gauge("expert_frames_connections", "open moe-frames connections", registry=r)
        self.frames_sessions = Counter("expert_frames_sessions", "authenticated sessions opened on moe-frames "
                                       "connections (one signed key exchange each)", registry=r)
        self.frames_refused = Counter("expert_frames_refused", "moe-frames frames refused before their call ran, "
                                      "by reason (busy, protocol, shutting_down)", ["reason"], registry=r)
        self.chain_listed = Gauge("expert_chain_listed", "1 when the last publication or check found this service's "
                                  "endpoint listed on the chain for its hotkey, 0 after a failed one "
                                  "(EXPERT_SERVE_ON_CHAIN; 0 in a service that does not publish)", registry=r)
        self.chain_listings_published = Counter("expert_chain_listings_published", "endpoints sent to the chain "
                                                "(serve_axon): the first and every republication", registry=r)
        self.rounds = RoundMetrics(
            Gauge("expert_round", "round the chain is in", registry=r),
            Gauge("expert_round_phase", "phase: 0 train, 1 commit, 2 reveal, 3 validate, 4 merge", registry=r),
            Counter("expert_checkpoints_published", "expert checkpoints uploaded to S3", registry=r),
            Counter("expert_commitments", "commits and reveals by result", ["result"], registry=r))
        # The children updated on every call, looked up once (subnet/metric_children.py).
        self.rpc_latency_of, self.tokens_of = Children(self.rpc_latency), Children(self.tokens)
        self.queue_tokens_of = Children(self.queue_tokens)
        self._batch_requests_of, self._batch_tokens_of = Children(self.batch_requests), Children(self.batch_tokens)

    def observe_batch(self, uid: str, requests: int, tokens: int) -> None:
        self._batch_requests_of(uid).observe(requests)
        self._batch_tokens_of(uid).observe(tokens)

