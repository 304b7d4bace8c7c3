"""Configuration of the validator, from environment variables only.

    REDIS_URL=redis://127.0.0.1:6379/0 S3_ENDPOINT=127.0.0.1:8333 VALIDATOR_INIT_CHECKPOINT=runs/x/init \
        python -m services.validator

`python -m services.validator --env-table` prints the table as markdown (for the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from subnet.chain.config import ChainConfig
from subnet.config_checks import check_log_level, check_redis_url
from subnet.envconfig import ConfigError, env, nested
from subnet.identity import WalletConfig
from subnet.object_store import S3Config
from subnet.rounds import RoundConfig
from subnet.validation_results import DEFAULT_PREFIX


@dataclass(frozen=True)
class ValidatorConfig:
    """Everything `services.validator` reads from the environment; checked at construction."""

    redis_url: str = env("REDIS_URL", "redis://127.0.0.1:6379/0",
                         "Redis holding the validation streams and the scores")
    key_prefix: str = env("VALIDATOR_KEY_PREFIX", DEFAULT_PREFIX,
                          "prefix of the validation streams and result hashes (subnet/validation_results.py); "
                          "the scorer must use the same")
    workers: int = env("VALIDATOR_WORKERS", 2, "worker threads that take validation tasks from the stream")
    claim_idle_s: float = env("VALIDATOR_CLAIM_IDLE_S", 30.0,
                              "a task a worker took and did not finish for this long is reclaimed by another "
                              "(the first one died); longer than one miner's evaluation")
    max_deliveries: int = env("VALIDATOR_MAX_DELIVERIES", 3,
                              "a task that failed this often (validator error, not the miner's) is stored as a "
                              "failed result instead of being retried forever")
    eval_batches: int = env("VALIDATOR_EVAL_BATCHES", 4,
                            "validation batches per miner (the same ones for the global model, per round)")
    eval_batch_size: int = env("VALIDATOR_EVAL_BATCH_SIZE", 8, "sequences per validation batch")
    probe_tokens: int = env("VALIDATOR_PROBE_TOKENS", 256,
                            "hidden states per MoE layer used to compare expert outputs (diversity, copies, "
                            "the live check); at most the tokens of one eval batch")
    active_threshold: float = env("VALIDATOR_ACTIVE_THRESHOLD", 0.02,
                                  "share of a layer's token assignments an expert needs to count as active")
    copy_cosine: float = env("VALIDATOR_COPY_COSINE", 0.999,
                             "output cosine above which a miner's expert is a copy of an earlier commitment's")
    verify_cosine: float = env("VALIDATOR_VERIFY_COSINE", 0.99,
                               "the live service's outputs must have at least this cosine with the published "
                               "weights' outputs")
    verify_max_abs: float = env("VALIDATOR_VERIFY_MAX_ABS", 0.1,
                                "... and differ from them by at most this much anywhere (weights keep training "
                                "between commit and validate, so a little drift is allowed)")
    rpc_timeout_s: float = env("VALIDATOR_RPC_TIMEOUT_S", 10.0, "deadline of one Forward to a miner's live service")
    init_checkpoint: str = env("VALIDATOR_INIT_CHECKPOINT", "",
                               "a `router init` output directory: published as global version 0 when S3 holds no "
                               "global version yet; empty = there must be one")
    run_dir: str = env("VALIDATOR_RUN_DIR", "runs/validator",
                       "where the validator keeps its state (the outer optimizer's momentum)")
    data_cache_dir: str = env("VALIDATOR_DATA_CACHE_DIR", "",
                              "tokenized-corpus cache of the validation data; empty = the one named in the "
                              "global model's config.json")
    host: str = env("VALIDATOR_HOST", "127.0.0.1", "address the metrics server binds; `0.0.0.0` in containers")
    metrics_port: int = env("VALIDATOR_METRICS_PORT", 0, "Prometheus metrics port; 0 = off")
    scores_prefix: str = env("SCORER_KEY_PREFIX", "moe:scores:",
                             "where the scorer writes (its SCORER_KEY_PREFIX): the merge reads <prefix>round:<round>")
    merge_top_k: int = env("MERGE_TOP_K", 2, "per expert, the best this many verified replicas are averaged")
    merge_outer_lr: float = env("MERGE_OUTER_LR", 0.7,
                                "outer learning rate of the merge (DiLoCo); 1 with no momentum = take the average")
    merge_momentum: float = env("MERGE_MOMENTUM", 0.9, "Nesterov momentum of the outer step; 0 = plain SGD")
    trunk_signers: tuple[str, ...] = env("VALIDATOR_TRUNK_SIGNERS", (),
                                         "ss58 hotkeys whose revealed trunk is merged; empty = any hotkey with a "
                                         "validator permit (the router holds stake)")
    threads: int = env("VALIDATOR_THREADS", 0, "torch intra-op threads; 0 = torch's default")
    grace_s: float = env("VALIDATOR_GRACE_S", 30.0,
                         "on SIGTERM, a task in progress gets this long to finish (else it is reclaimed later)")
    log_level: str = env("VALIDATOR_LOG_LEVEL", "INFO", "Python logging level")
    # The validator's hotkey signs the global versions and its probes to the miners' services
    # (they accept it with AUTH_CHAIN=1: it holds a validator permit).
    wallet: WalletConfig = nested(WalletConfig)
    s3: S3Config = nested(S3Config)
    chain: ChainConfig = nested(ChainConfig)
    rounds: RoundConfig = nested(RoundConfig)

    def __post_init__(self):
        if not self.redis_url:
            raise ConfigError("REDIS_URL is required: the validation tasks and results live in Redis")
        if not self.s3.enabled:
            raise ConfigError("S3_ENDPOINT is required: the validator reads the miners' checkpoints and publishes "
                              "the global model in S3")
        if not self.key_prefix:
            raise ConfigError("VALIDATOR_KEY_PREFIX must not be empty")
        check_log_level("VALIDATOR_LOG_LEVEL", self.log_level)
        check_redis_url("REDIS_URL", self.redis_url)
        positive = {"VALIDATOR_WORKERS": self.workers, "VALIDATOR_CLAIM_IDLE_S": self.claim_idle_s,
                    "VALIDATOR_MAX_DELIVERIES": self.max_deliveries, "VALIDATOR_EVAL_BATCHES": self.eval_batches,
                    "VALIDATOR_EVAL_BATCH_SIZE": self.eval_batch_size, "VALIDATOR_PROBE_TOKENS": self.probe_tokens,
                    "VALIDATOR_RPC_TIMEOUT_S": self.rpc_timeout_s, "MERGE_TOP_K": self.merge_top_k,
                    "MERGE_OUTER_LR": self.merge_outer_lr}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{name}={value} must be positive")
        fractions = {"VALIDATOR_ACTIVE_THRESHOLD": self.active_threshold, "VALIDATOR_COPY_COSINE": self.copy_cosine,
                     "VALIDATOR_VERIFY_COSINE": self.verify_cosine}
        for name, value in fractions.items():
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"{name}={value} must be in (0, 1]")
        if not (math.isfinite(self.verify_max_abs) and self.verify_max_abs >= 0):
            raise ConfigError(f"VALIDATOR_VERIFY_MAX_ABS={self.verify_max_abs} must be >= 0")
        if not 0.0 <= self.merge_momentum < 1.0:
            raise ConfigError(f"MERGE_MOMENTUM={self.merge_momentum} must be in [0, 1)")
        if self.merge_outer_lr > 2.0:  # beyond 2 the outer step overshoots the average by more than it moves
            raise ConfigError(f"MERGE_OUTER_LR={self.merge_outer_lr} must be at most 2")
        if self.threads < 0 or self.grace_s < 0:
            raise ConfigError("VALIDATOR_THREADS and VALIDATOR_GRACE_S must be >= 0")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError(f"VALIDATOR_METRICS_PORT={self.metrics_port} must be a port (0 = off)")
        if not self.run_dir:
            raise ConfigError("VALIDATOR_RUN_DIR must not be empty")
