"""Configuration of the expert service, from environment variables only.

    EXPERT_UIDS=0.0,0.1 EXPERT_DIM=64 EXPERT_INTER_DIM=128 python -m services.expert

`python -m services.expert --env-table` prints the table below as markdown (for the README).
"""

from __future__ import annotations

from dataclasses import dataclass

from moe.config import LMConfig
from moe.experts import parse_expert_uid
from subnet.auth.config import AuthConfig
from subnet.chain.config import ChainConfig
from subnet.config_checks import check_log_level, check_message_mb, check_redis_url, check_torch_device
from subnet.envconfig import REQUIRED, env, nested
from subnet.identity import WalletConfig
from subnet.object_store import S3Config
from subnet.rounds import RoundConfig
from subnet.shm import ShmConfig
from subnet.telemetry import TracingConfig
from subnet.tensor_codec import parse_wire_dtypes

_LM = LMConfig()

MAX_WIDTH = 1 << 17   # EXPERT_DIM and EXPERT_INTER_DIM: far above any preset, far below a typo


@dataclass(frozen=True)
class ExpertConfig:
    """Everything `services.expert` reads from the environment; checked at construction."""

    uids: tuple[str, ...] = env("EXPERT_UIDS", REQUIRED,
                                "comma-separated expert uids this service hosts, `<layer>.<index>`, "
                                "e.g. `0.0,0.1,1.0`")
    dim: int = env("EXPERT_DIM", _LM.dim, "model width (the LM's `dim`)")
    inter_dim: int = env("EXPERT_INTER_DIM", _LM.moe_inter_dim, "hidden width of each expert")
    host: str = env("EXPERT_HOST", "127.0.0.1", "address the gRPC and metrics servers bind; "
                                                "`0.0.0.0` in containers")
    port: int = env("EXPERT_PORT", 50051, "gRPC port; 0 = any free port")
    frames_port: int = env("EXPERT_FRAMES_PORT", 0,
                           "port of the raw TCP transport for Forward, ForwardMany and Backward "
                           "(moe-frames/1, advertised in Info; routers fall back to gRPC when they cannot "
                           "reach it); 0 = any free port, -1 = off")
    advertise_endpoint: str = env("EXPERT_ADVERTISE_ENDPOINT", "",
                                  "`host:port` routers should dial, written to the registry (and the chain, "
                                  "EXPERT_SERVE_ON_CHAIN); empty = `EXPERT_HOST:port` (set it when binding 0.0.0.0)")
    serve_on_chain: bool = env("EXPERT_SERVE_ON_CHAIN", False,
                               "1 = publish the endpoint on the chain (CHAIN_*; Bittensor's serve_axon, which needs "
                               "an IP address) once serving, for routers with ROUTER_DISCOVERY=chain; needs "
                               "AUTH_MODE=on (the hotkey signs it). Retried every 30 s while it fails")
    listing_check_s: float = env("EXPERT_LISTING_CHECK_S", 300.0,
                                 "with EXPERT_SERVE_ON_CHAIN=1: seconds between checks that the chain still lists "
                                 "this service's endpoint for its hotkey; published again when it does not "
                                 "(deleted or redirected); 0 = never check")
    device: str = env("EXPERT_DEVICE", "cpu", "torch device of the weights: `cpu`, `cuda`, `cuda:1`")
    wire_dtypes: str = env("EXPERT_WIRE_DTYPES", "fp32,bf16,fp16,int8", "wire dtypes accepted in requests")
    max_batch_tokens: int = env("EXPERT_MAX_BATCH_TOKENS", 8192,
                                "dynamic batching merges requests up to this many tokens per computation")
    batch_wait_ms: float = env("EXPERT_BATCH_WAIT_MS", 2.0,
                               "how long the first request of a batch waits for others to join, when it "
                               "arrives while the expert has work; a request to an idle expert does not wait")
    max_request_tokens: int = env("EXPERT_MAX_REQUEST_TOKENS", 4096,
                                  "tokens per request; more is RESOURCE_EXHAUSTED")
    max_queue_tokens: int = env("EXPERT_MAX_QUEUE_TOKENS", 65536,
                                "tokens waiting per expert; more is RESOURCE_EXHAUSTED (overload); 0 = no limit")
    max_pending_tasks: int = env("EXPERT_MAX_PENDING_TASKS", 64,
                                 "Backward, GradNorm and ApplyStep calls waiting for (or on) the one compute "
                                 "thread, all experts together; more is RESOURCE_EXHAUSTED (overload); 0 = no limit")
    max_message_mb: float = env("EXPERT_MAX_MESSAGE_MB", 64.0, "gRPC max send/receive message size")
    activation_ttl_s: float = env("EXPERT_ACTIVATION_TTL_S", 60.0,
                                  "training activations kept for Backward at most this long")
    activation_cache_mb: float = env("EXPERT_ACTIVATION_CACHE_MB", 512.0,
                                     "memory bound of the activation cache; oldest entries are evicted")
    max_staleness: int = env("EXPERT_MAX_STALENESS", 16,
                             "asynchronous training: a Backward whose Forward came more than this many updates of "
                             "its expert ago answers its input gradient but updates nothing (0 = only Backwards "
                             "with no update between them and their Forward update)")
    redis_url: str = env("REDIS_URL", "", "registry Redis, e.g. `redis://127.0.0.1:6379/0`; empty = do not register")
    registry_ttl_s: float = env("EXPERT_REGISTRY_TTL_S", 10.0,
                                "registry entry TTL; refreshed every TTL/3, gone this long after a crash")
    metrics_port: int = env("EXPERT_METRICS_PORT", 0, "Prometheus metrics port; 0 = off")
    checkpoint: str = env("EXPERT_CHECKPOINT", "",
                          "where the weights start: a safetensors file with `<uid>.w1.weight` etc. "
                          "(subnet/expert_weights.py) or a signed checkpoint in S3, "
                          "`s3://<bucket>/checkpoints/global/latest`; empty = initialize from EXPERT_SEED")
    resume: bool = env("EXPERT_RESUME", True,
                       "with S3: start from this hotkey's newest complete checkpoint when there is one "
                       "(wins over EXPERT_CHECKPOINT; a SIGKILLed miner keeps its training)")
    follow_global: bool = env("EXPERT_FOLLOW_GLOBAL", True,
                              "with S3: at the start of each round load the hosted experts from the newest "
                              "merged global version, if it is newer than the one this service started from")
    keep_committed: bool = env("EXPERT_KEEP_COMMITTED", True,
                               "with S3: keep the weights committed last (a CPU copy of the hosted experts) to "
                               "answer validators' probes for that round exactly; 0 = answer them with the live "
                               "weights, which have trained since (the validator then allows less drift than "
                               "early training makes, and may flag an honest miner)")
    adversary: str = env("EXPERT_ADVERSARY", "",
                         "tests and the demo only: play a cheating miner, `lazy`, `noisy`, `copycat` or `liar` "
                         "(services/expert/adversary.py); refused unless EXPERT_ALLOW_ADVERSARY=1")
    allow_adversary: bool = env("EXPERT_ALLOW_ADVERSARY", False, "test flag that permits EXPERT_ADVERSARY")
    adversary_noise: float = env("EXPERT_ADVERSARY_NOISE", 5.0,
                                 "`noisy`: noise std as a multiple of each weight tensor's std")
    checkpoint_every_s: float = env("EXPERT_CHECKPOINT_EVERY_S", 60.0,
                                    "with S3: also publish the hosted experts this often (besides each round's "
                                    "commit phase), bounding what a crash loses; 0 = only per round")
    save_path: str = env("EXPERT_SAVE_PATH", "",
                         "on shutdown, write the hosted experts' current weights here (same format as "
                         "EXPERT_CHECKPOINT, written atomically); empty = don't save")
    seed: int = env("EXPERT_SEED", 0, "initialization seed; each expert's weights depend on (seed, uid)")
    threads: int = env("EXPERT_THREADS", 0, "torch intra-op threads; 0 = torch's default")
    grace_s: float = env("EXPERT_GRACE_S", 5.0, "on SIGTERM, in-flight requests get this long to finish")
    inject_delay_ms: float = env("EXPERT_INJECT_DELAY_MS", 0.0,
                                 "fault injection for tests: delay every Forward/Backward answer")
    log_level: str = env("EXPERT_LOG_LEVEL", "INFO", "Python logging level")
    # The miner's hotkey: requests must be signed for it and the registry advertises it.
    # AUTH_CHAIN accepts validators (hotkeys with a permit); the service checks at start-up
    # that AUTH_MODE=on has someone to accept (AUTH_ALLOWLIST or AUTH_CHAIN).
    wallet: WalletConfig = nested(WalletConfig)
    auth: AuthConfig = nested(AuthConfig)
    # With S3_ENDPOINT set the service publishes a signed checkpoint every round and commits it
    # on the chain (CHAIN_*, ROUND_*); without, it only serves.
    s3: S3Config = nested(S3Config)
    chain: ChainConfig = nested(ChainConfig)
    rounds: RoundConfig = nested(RoundConfig)
    tracing: TracingConfig = nested(TracingConfig)  # OTEL_*: SERVER spans of the RPCs, exported over OTLP
    shm: ShmConfig = nested(ShmConfig)              # SHM_*: tensors from routers on this host via shared memory

    def __post_init__(self):
        if not self.uids:
            raise ValueError("EXPERT_UIDS is empty: list the expert uids to host, e.g. 0.0,0.1")
        for uid in self.uids:
            try:
                parse_expert_uid(uid)
            except ValueError as e:
                raise ValueError(f"EXPERT_UIDS: {e}") from None
        if len(set(self.uids)) != len(self.uids):
            raise ValueError(f"EXPERT_UIDS lists an expert twice: {','.join(self.uids)}")
        positive = {"EXPERT_DIM": self.dim, "EXPERT_INTER_DIM": self.inter_dim,
                    "EXPERT_MAX_BATCH_TOKENS": self.max_batch_tokens,
                    "EXPERT_MAX_REQUEST_TOKENS": self.max_request_tokens,
                    "EXPERT_ACTIVATION_TTL_S": self.activation_ttl_s,
                    "EXPERT_REGISTRY_TTL_S": self.registry_ttl_s}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name}={value} must be positive")
        for name, value in (("EXPERT_DIM", self.dim), ("EXPERT_INTER_DIM", self.inter_dim)):
            if value > MAX_WIDTH:   # a typo (1e9) would otherwise die allocating, with a traceback
                raise ValueError(f"{name}={value} is larger than any model here (at most {MAX_WIDTH})")
        non_negative = {"EXPERT_PORT": self.port, "EXPERT_METRICS_PORT": self.metrics_port,
                        "EXPERT_BATCH_WAIT_MS": self.batch_wait_ms,
                        "EXPERT_MAX_QUEUE_TOKENS": self.max_queue_tokens,
                        "EXPERT_MAX_PENDING_TASKS": self.max_pending_tasks,
                        "EXPERT_ACTIVATION_CACHE_MB": self.activation_cache_mb,
                        "EXPERT_MAX_STALENESS": self.max_staleness,
                        "EXPERT_THREADS": self.threads, "EXPERT_GRACE_S": self.grace_s,
                        "EXPERT_INJECT_DELAY_MS": self.inject_delay_ms,
                        "EXPERT_CHECKPOINT_EVERY_S": self.checkpoint_every_s,
                        "EXPERT_LISTING_CHECK_S": self.listing_check_s}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{name}={value} must be >= 0")
        if self.port > 65535 or self.metrics_port > 65535:
            raise ValueError("EXPERT_PORT and EXPERT_METRICS_PORT must be below 65536")
        if not -1 <= self.frames_port <= 65535:
            raise ValueError(f"EXPERT_FRAMES_PORT={self.frames_port}: a port (0 = any free one) or -1 (off)")
        if self.adversary:
            from services.expert.adversary import MODES
            if self.adversary not in MODES:
                raise ValueError(f"EXPERT_ADVERSARY={self.adversary!r}: choose one of {', '.join(MODES)}")
            if not self.allow_adversary:
                raise ValueError("EXPERT_ADVERSARY is for tests and the demo only; set EXPERT_ALLOW_ADVERSARY=1 "
                                 "to confirm")
            if self.adversary in ("noisy", "copycat") and not self.s3.enabled:
                raise ValueError(f"EXPERT_ADVERSARY={self.adversary} cheats in what it publishes: set S3_ENDPOINT")
        if self.advertise_endpoint:   # the registry and the chain hand it to routers as it is
            from subnet.chain.base import ChainError
            from subnet.chain.rules import check_endpoint
            try:
                check_endpoint(self.advertise_endpoint, "EXPERT_ADVERTISE_ENDPOINT")
            except ChainError as e:
                raise ValueError(str(e)) from None
        try:
            parse_wire_dtypes(self.wire_dtypes)
        except ValueError as e:
            raise ValueError(f"EXPERT_WIRE_DTYPES={self.wire_dtypes!r}: {e}") from None
        check_message_mb("EXPERT_MAX_MESSAGE_MB", self.max_message_mb)
        check_log_level("EXPERT_LOG_LEVEL", self.log_level)
        check_redis_url("REDIS_URL", self.redis_url)
        check_torch_device("EXPERT_DEVICE", self.device)

    @property
    def allowed_dtypes(self) -> tuple[int, ...]:
        return parse_wire_dtypes(self.wire_dtypes)

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)
