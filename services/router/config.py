"""Configuration of the router service, from environment variables only.

`python -m services.router --env-table` prints the table as markdown (for the README).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.router.replicas import POLICIES
from subnet.auth.config import AuthConfig
from subnet.chain.config import ChainConfig
from subnet.config_checks import check_log_level, check_message_mb, check_redis_url
from subnet.envconfig import env, nested
from subnet.identity import WalletConfig
from subnet.object_store import S3Config
from subnet.rounds import RoundConfig
from subnet.shm import ShmConfig
from subnet.telemetry import TracingConfig
from subnet.tensor_codec import WIRE_DTYPES


@dataclass(frozen=True)
class RouterConfig:
    """Everything `services.router` reads from the environment; checked at construction."""

    host: str = env("ROUTER_HOST", "127.0.0.1",
                    "address the gRPC, HTTP and metrics servers bind; `0.0.0.0` in containers")
    port: int = env("ROUTER_PORT", 50050, "gRPC port of moe.v1.Router; 0 = any free port")
    redis_url: str = env("REDIS_URL", "redis://127.0.0.1:6379/0", "the expert registry")
    checkpoint: str = env("ROUTER_CHECKPOINT", "",
                          "run or checkpoint directory (from `moe train`) with the trunk weights, "
                          "LM config and tokenizer, or a signed trunk in S3 (`s3://<bucket>/checkpoints/trunk/"
                          "<round>`); required by `serve`")
    wire_dtype: str = env("ROUTER_WIRE_DTYPE", "fp32",
                          "dtype of activations on the wire: fp32 (exact), bf16, fp16, int8 (blockwise)")
    frames: str = env("ROUTER_FRAMES", "auto",
                      "`auto`: Forward, ForwardMany and Backward go over moe-frames/1 (raw TCP, the same "
                      "messages and signatures) to experts whose Info offers it, else gRPC; `off`: gRPC only")
    expert_timeout_s: float = env("ROUTER_EXPERT_TIMEOUT_S", 5.0,
                                  "deadline of all expert calls of one layer; a late expert is masked")
    training: str = env("ROUTER_TRAINING", "sync",
                        "`sync`: experts accumulate a step's gradients and apply them when the router says, with "
                        "global-norm clipping (remote training equals in-process training); `async`: each Backward "
                        "applies its own AdamW step at once (hivemind style: no GradNorm/ApplyStep round trips, "
                        "each call's expert gradients clipped on their own)")
    retries: int = env("ROUTER_RETRIES", 1, "a failed expert call is retried on this many other replicas "
                                         "(GradNorm and ApplyStep: on the same one, which holds the gradients)")
    forward_many_max_tokens: int = env("ROUTER_FORWARD_MANY_MAX_TOKENS", 256,
                                       "serving: the Forwards of one MoE layer to one service go as one ForwardMany "
                                       "call when they hold at most this many tokens together (decode steps); "
                                       "0 = always one Forward per expert")
    straggler_ms: float = env("ROUTER_STRAGGLER_MS", 0.0,
                              "once every token of a layer has answers from ROUTER_K_MIN of its experts, the "
                              "expert calls still out get this much longer, then are masked (hivemind's policy); "
                              "0 = wait for every expert up to ROUTER_EXPERT_TIMEOUT_S")
    k_min: int = env("ROUTER_K_MIN", 1, "answers per token after which ROUTER_STRAGGLER_MS starts counting")
    replica_policy: str = env("ROUTER_REPLICA_POLICY", "least_loaded", "least_loaded or round_robin")
    registry_refresh_s: float = env("ROUTER_REGISTRY_REFRESH_S", 2.0,
                                    "how often the registry snapshot (and the scores) are re-read, in the "
                                    "background: a stalled Redis never holds up routing")
    registry_grace_s: float = env("ROUTER_REGISTRY_GRACE_S", 15.0,
                                  "a replica missing from the registry stays routable this long after it was last "
                                  "seen (a Redis restarted empty must not mask every expert); a dead one fails and is "
                                  "suspected")
    suspect_s: float = env("ROUTER_SUSPECT_S", 5.0,
                           "an expert replica that failed or missed a deadline gets no calls for this long (per "
                           "endpoint and expert; overload answers do not count)")
    discovery: str = env("ROUTER_DISCOVERY", "registry",
                         "where expert replicas are found: `registry` (the Redis registry the expert services "
                         "heartbeat to) or `chain` (the endpoints registered miners publish on the chain, "
                         "EXPERT_SERVE_ON_CHAIN, each asked what it hosts with an Info signed for its hotkey; "
                         "miners need no Redis, and on Bittensor none can touch another's listing; registered "
                         "hotkeys only, as with ROUTER_REGISTERED_EXPERTS_ONLY; needs AUTH_MODE=on)")
    discovery_timeout_s: float = env("ROUTER_DISCOVERY_TIMEOUT_S", 2.0,
                                     "ROUTER_DISCOVERY=chain: each Info to a listed endpoint gives up after this, "
                                     "a whole refresh after 3 times this")
    discovery_private: bool = env("ROUTER_DISCOVERY_PRIVATE", False,
                                  "ROUTER_DISCOVERY=chain: also ask listed endpoints whose address is loopback, "
                                  "private or link-local, or a hostname (the local stack, compose, k8s; a private "
                                  "network of your own); off, only public IP addresses are asked, so a registered "
                                  "hotkey cannot make the router call into its own network")
    registered_only: bool = env("ROUTER_REGISTERED_EXPERTS_ONLY", False,
                                "1 = route only to replicas whose hotkey is registered on the chain (CHAIN_*; the "
                                "metagraph is re-read every AUTH_CHAIN_REFRESH_S, and AUTH_CHAIN_RETRY_S after an "
                                "unregistered hotkey's entry was skipped): fresh hotkeys nobody registered get no "
                                "calls. Fails closed until the metagraph was read once")
    follow_scores: bool = env("ROUTER_FOLLOW_SCORES", True,
                              "skip banned miners (moe:scores:banned) and route serving calls by the scorer's "
                              "EMA (moe:scores:ema); training calls are spread over every non-banned replica by "
                              "the replica policy")
    scores_prefix: str = env("SCORER_KEY_PREFIX", "moe:scores:",
                             "where the scorer writes (its SCORER_KEY_PREFIX): the router reads <prefix>ema and "
                             "<prefix>banned")
    min_ema: float = env("ROUTER_MIN_EMA", 0.01,
                         "with scores: replicas whose EMA is below this get only ROUTER_EXPLORE of the serving "
                         "calls while another replica of the same expert has earned more (see "
                         "services/router/replicas.py)")
    explore: float = env("ROUTER_EXPLORE", 0.1,
                         "share of serving calls spread over non-banned replicas that have not earned (yet), so a "
                         "miner that lost its traffic once can show an improvement again; 0 = none")
    metrics_port: int = env("ROUTER_METRICS_PORT", 0, "Prometheus metrics port; 0 = off")
    # The HTTP API (POST /v1/completions, GET /health, GET /model_info) serves the same model
    # with the same limits; who may call it: services/router/http_api.py.
    http_port: int = env("ROUTER_HTTP_PORT", 0, "port of the HTTP API (OpenAI-style completions); 0 = off")
    http_token: str = env("ROUTER_HTTP_TOKEN", "",
                          "bearer token HTTP completions must send; empty = open when AUTH_MODE=off or "
                          "ROUTER_OPEN_GENERATE=1, else closed (403)")
    http_max_body_kb: int = env("ROUTER_HTTP_MAX_BODY_KB", 64, "larger HTTP request bodies are refused (413)")
    http_timeout_s: float = env("ROUTER_HTTP_TIMEOUT_S", 30.0,
                                "HTTP socket reads and writes, reading a whole request (line, headers, body: 408 "
                                "after), and each wait for the model, give up after this")
    max_new_tokens: int = env("ROUTER_MAX_NEW_TOKENS", 512, "upper limit of Generate's max_new_tokens")
    max_batch: int = env("ROUTER_MAX_BATCH", 64,
                         "Generate streams the decode loop advances together (continuous batching); more wait "
                         "for a free slot")
    max_queued: int = env("ROUTER_MAX_QUEUED", 256,
                          "Generate requests that may wait for a slot; beyond, RESOURCE_EXHAUSTED (HTTP 503)")
    max_message_mb: float = env("ROUTER_MAX_MESSAGE_MB", 64.0, "gRPC max send/receive message size")
    threads: int = env("ROUTER_THREADS", 0, "torch intra-op threads; 0 = torch's default")
    log_level: str = env("ROUTER_LOG_LEVEL", "INFO", "Python logging level")
    open_generate: bool = env("ROUTER_OPEN_GENERATE", False,
                              "1 = anyone may call Generate, signed or not (Logits stays protected)")
    # The router's hotkey signs its expert calls (experts allow it by AUTH_ALLOWLIST or as a
    # validator); its own Generate/Logits accept AUTH_ALLOWLIST or, with AUTH_CHAIN, any
    # hotkey registered on the subnet.
    wallet: WalletConfig = nested(WalletConfig)
    auth: AuthConfig = nested(AuthConfig)
    # With S3_ENDPOINT set, `train` publishes the trunk every round (commit phase) and commits
    # it on the chain (CHAIN_*, ROUND_*); `serve` can start from an s3:// trunk.
    s3: S3Config = nested(S3Config)
    chain: ChainConfig = nested(ChainConfig)
    rounds: RoundConfig = nested(RoundConfig)
    tracing: TracingConfig = nested(TracingConfig)
    shm: ShmConfig = nested(ShmConfig)   # SHM_*: tensors to expert services on this host via shared memory

    def __post_init__(self):
        check_log_level("ROUTER_LOG_LEVEL", self.log_level)
        check_redis_url("REDIS_URL", self.redis_url)
        check_message_mb("ROUTER_MAX_MESSAGE_MB", self.max_message_mb)
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"ROUTER_WIRE_DTYPE={self.wire_dtype!r}: choose one of {sorted(WIRE_DTYPES)}")
        if self.frames not in ("auto", "off"):
            raise ValueError(f"ROUTER_FRAMES={self.frames!r} must be `auto` or `off`")
        if self.replica_policy not in POLICIES:
            raise ValueError(f"ROUTER_REPLICA_POLICY={self.replica_policy!r}: choose one of {list(POLICIES)}")
        if not all(0 <= p < 65536 for p in (self.port, self.metrics_port, self.http_port)):
            raise ValueError("ROUTER_PORT, ROUTER_METRICS_PORT and ROUTER_HTTP_PORT must be in 0..65535")
        if self.http_max_body_kb <= 0 or self.http_timeout_s <= 0:
            raise ValueError("ROUTER_HTTP_MAX_BODY_KB and ROUTER_HTTP_TIMEOUT_S must be positive")
        if not 0 <= self.explore <= 1:
            raise ValueError(f"ROUTER_EXPLORE={self.explore} must be in [0, 1]")
        if self.suspect_s < 0 or self.registry_grace_s < 0:
            raise ValueError("ROUTER_SUSPECT_S and ROUTER_REGISTRY_GRACE_S must be >= 0")
        if self.expert_timeout_s <= 0 or self.registry_refresh_s <= 0:
            raise ValueError("ROUTER_EXPERT_TIMEOUT_S and ROUTER_REGISTRY_REFRESH_S must be positive")
        if self.max_batch < 1 or self.max_queued < 0:
            raise ValueError(f"ROUTER_MAX_BATCH must be >= 1 and ROUTER_MAX_QUEUED >= 0, got {self.max_batch} "
                             f"and {self.max_queued}")
        if self.straggler_ms < 0 or self.k_min < 1:
            raise ValueError(f"ROUTER_STRAGGLER_MS must be >= 0 and ROUTER_K_MIN >= 1, got {self.straggler_ms} "
                             f"and {self.k_min}")
        if self.discovery not in ("registry", "chain"):
            raise ValueError(f"ROUTER_DISCOVERY={self.discovery!r} must be `registry` or `chain`")
        if self.discovery == "chain" and not self.auth.enabled:
            raise ValueError("ROUTER_DISCOVERY=chain needs AUTH_MODE=on: unsigned, any listing naming another "
                             "miner's endpoint would be believed")
        if self.discovery_timeout_s <= 0:
            raise ValueError(f"ROUTER_DISCOVERY_TIMEOUT_S must be positive, got {self.discovery_timeout_s}")
        if self.training not in ("sync", "async"):
            raise ValueError(f"ROUTER_TRAINING={self.training!r} must be sync or async")
        if self.forward_many_max_tokens < 0:
            raise ValueError(f"ROUTER_FORWARD_MANY_MAX_TOKENS must be >= 0 (0 = off), "
                             f"got {self.forward_many_max_tokens}")
        if self.retries < 0 or self.max_new_tokens <= 0 or self.threads < 0:
            raise ValueError("ROUTER_RETRIES and ROUTER_THREADS must be >= 0; ROUTER_MAX_NEW_TOKENS must be "
                             "positive")
