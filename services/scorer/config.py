"""Configuration of the scorer, from environment variables only.

    REDIS_URL=redis://127.0.0.1:6379/0 WALLET_NAME=validator python -m services.scorer

`python -m services.scorer --env-table` prints the variables as a markdown table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.scorer.scoring import ScoreWeights
from subnet.chain.config import ChainConfig
from subnet.config_checks import check_log_level, check_redis_url
from subnet.envconfig import REQUIRED, env, nested
from subnet.identity import WalletConfig
from subnet.rounds import RoundConfig
from subnet.validation_results import DEFAULT_PREFIX as VALIDATION_PREFIX

_W = ScoreWeights()


@dataclass(frozen=True)
class ScorerConfig:
    """Everything `services.scorer` reads from the environment; checked at construction."""

    redis_url: str = env("REDIS_URL", REQUIRED, "Redis holding the validators' results and the scores, "
                                                "e.g. `redis://127.0.0.1:6379/0`")
    validation_prefix: str = env("SCORER_VALIDATION_PREFIX", VALIDATION_PREFIX,
                                 "key prefix of the validators' results (subnet/validation_results.py)")
    key_prefix: str = env("SCORER_KEY_PREFIX", "moe:scores:",
                          "key prefix of what the scorer writes; set the same on the routers and validators")
    consumer: str = env("SCORER_CONSUMER", "", "consumer name in the `scorers` group; empty = `<host>-<pid>`")
    w_loss: float = env("SCORER_W_LOSS", _W.loss, "weight of the loss-improvement score in the composite")
    w_diversity: float = env("SCORER_W_DIVERSITY", _W.diversity, "weight of expert diversity in the composite")
    w_active: float = env("SCORER_W_ACTIVE", _W.active, "weight of the active expert ratio in the composite")
    # 0.02 nats/token: a round of training moves a small model's experts by a few hundredths; a
    # miner 0.02 better keeps 76% of its bracket, 0.06 better 99.5%; no change or worse earns 0.
    loss_scale: float = env("SCORER_LOSS_SCALE", 0.02,
                            "nats/token: improvement score = tanh(max(loss_delta, 0) / scale); 0 at no change")
    # 0.3: a miner's weight follows its work within a few rounds (a local round is a minute) while
    # one bad round costs it less than a third.
    ema_alpha: float = env("SCORER_EMA_ALPHA", 0.3, "EMA: ema = alpha * score + (1 - alpha) * previous ema")
    # 0: the banned set holds the hotkeys whose last result failed the gate (not verified, a copy);
    # the router itself leaves near-zero-EMA replicas out while others have earned (ROUTER_MIN_EMA).
    # Banning every zero EMA here would stop training in the first rounds, before anyone improved.
    ban_ema: float = env("SCORER_BAN_EMA", 0.0, "hotkeys with an EMA below this also go in the banned set; "
                         "0 = only those whose last result failed the gate")
    claim_idle_s: float = env("SCORER_CLAIM_IDLE_S", 30.0,
                              "results read but not acknowledged for this long are taken over (a scorer died)")
    batch: int = env("SCORER_BATCH", 64, "stream entries read per call")
    poll_s: float = env("SCORER_POLL_S", 1.0, "longest wait for new results before checking the round phase")
    keep_rounds: int = env("SCORER_KEEP_ROUNDS", 100, "per-round score hashes older than this many rounds are deleted")
    run_dir: str = env("SCORER_RUN_DIR", "runs/scorer",
                       "scoreboards and ema_history.jsonl go here; empty = write none")
    metrics_host: str = env("SCORER_METRICS_HOST", "127.0.0.1", "address the metrics server binds")
    metrics_port: int = env("SCORER_METRICS_PORT", 0, "Prometheus metrics port; 0 = off")
    log_level: str = env("SCORER_LOG_LEVEL", "INFO", "Python logging level")
    # The validator's hotkey: it signs the weights, so it needs a validator permit on the chain.
    wallet: WalletConfig = nested(WalletConfig)
    chain: ChainConfig = nested(ChainConfig)
    rounds: RoundConfig = nested(RoundConfig)

    def __post_init__(self):
        if not self.redis_url:
            raise ValueError("REDIS_URL is empty: the scorer reads results from Redis")
        if not self.key_prefix or not self.validation_prefix:
            raise ValueError("SCORER_KEY_PREFIX and SCORER_VALIDATION_PREFIX must not be empty")
        check_log_level("SCORER_LOG_LEVEL", self.log_level)
        check_redis_url("REDIS_URL", self.redis_url)
        try:
            _ = self.score_weights  # its own checks, named after the variables
        except ValueError as e:
            raise ValueError(f"SCORER_W_LOSS/SCORER_W_DIVERSITY/SCORER_W_ACTIVE: {e}") from None
        positive = {"SCORER_LOSS_SCALE": self.loss_scale, "SCORER_CLAIM_IDLE_S": self.claim_idle_s,
                    "SCORER_BATCH": self.batch, "SCORER_POLL_S": self.poll_s,
                    "SCORER_KEEP_ROUNDS": self.keep_rounds}
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value} must be positive")
        if not (math.isfinite(self.ema_alpha) and 0 < self.ema_alpha <= 1):
            raise ValueError(f"SCORER_EMA_ALPHA={self.ema_alpha} must be in (0, 1]")
        if not (math.isfinite(self.ban_ema) and 0 <= self.ban_ema <= 1):
            raise ValueError(f"SCORER_BAN_EMA={self.ban_ema} must be in [0, 1]")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"SCORER_METRICS_PORT={self.metrics_port} must be in 0..65535")

    @property
    def score_weights(self) -> ScoreWeights:
        return ScoreWeights(loss=self.w_loss, diversity=self.w_diversity, active=self.w_active)
