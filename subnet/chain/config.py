"""Which chain a process talks to, from the environment, and the one function that opens it.

    chain = open_chain(from_env(ChainConfig), from_env(RoundConfig).schedule(),
                       wallet=signing_wallet(from_env(ChainConfig), from_env(WalletConfig)))

`CHAIN=local` (the default) is the Redis chain of the local stack; `CHAIN=bittensor` the
Bittensor network named by `CHAIN_NETWORK`, on subnet `CHAIN_NETUID`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bittensor_wallet import Wallet  # not the SDK (slow to import): subnet.identity loads it anyway

from subnet.chain.base import Chain
from subnet.config_checks import check_redis_url
from subnet.envconfig import ConfigError, env
from subnet.identity import WalletConfig
from subnet.rounds import RoundSchedule

KINDS = ("local", "bittensor")


@dataclass(frozen=True)
class ChainConfig:
    chain: str = env("CHAIN", "local", "which chain: `local` (Redis, for the stack and tests) or `bittensor`")
    redis_url: str = env("CHAIN_REDIS_URL", "redis://127.0.0.1:6379/0", "Redis holding the local chain")
    key_prefix: str = env("CHAIN_KEY_PREFIX", "moe:chain:",
                          "prefix of the local chain's Redis keys; another prefix is another chain")
    # 1 s, not Bittensor's 12 s: a local round of 60 blocks then takes a minute, not twelve.
    block_s: float = env("CHAIN_BLOCK_S", 1.0, "seconds per block of the local chain")
    network: str = env("CHAIN_NETWORK", "finney", "Bittensor network: finney, test, local or a ws(s):// URL")
    netuid: int = env("CHAIN_NETUID", 0, "Bittensor subnet uid; required when CHAIN=bittensor")
    timeout_s: float = env("CHAIN_REDIS_TIMEOUT_S", 5.0, "socket timeout of the local chain's Redis client")

    def __post_init__(self):
        if self.chain not in KINDS:
            raise ConfigError(f"CHAIN={self.chain!r} is not one of {', '.join(KINDS)}")
        if not (math.isfinite(self.block_s) and self.block_s > 0):
            raise ConfigError(f"CHAIN_BLOCK_S must be a positive number of seconds, got {self.block_s}")
        if not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise ConfigError(f"CHAIN_REDIS_TIMEOUT_S must be positive, got {self.timeout_s}")
        if self.chain == "local" and not self.redis_url:
            raise ConfigError("CHAIN_REDIS_URL is required when CHAIN=local")
        if self.chain == "local":
            try:
                check_redis_url("CHAIN_REDIS_URL", self.redis_url)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        if self.chain == "bittensor":
            if self.netuid <= 0:
                raise ConfigError("CHAIN_NETUID is required when CHAIN=bittensor (a subnet uid > 0)")
            if not self.network:
                raise ConfigError("CHAIN_NETWORK is required when CHAIN=bittensor")


def open_chain(config: ChainConfig, schedule: RoundSchedule, wallet: Any = None) -> Chain:
    """The configured chain. Connects lazily: an unreachable chain shows as ChainError on first use.
    `wallet` (Bittensor only) signs extrinsics; without one the chain is read-only."""
    if config.chain == "local":
        import redis

        from subnet.chain.local import LocalChain

        client = redis.Redis.from_url(config.redis_url, socket_timeout=config.timeout_s,
                                      socket_connect_timeout=config.timeout_s)
        return LocalChain(client, schedule, block_s=config.block_s, key_prefix=config.key_prefix)
    from subnet.chain.bittensor_chain import BittensorChain

    return BittensorChain(config.network, config.netuid, wallet=wallet, schedule=schedule)


def signing_wallet(config: ChainConfig, wallet: WalletConfig) -> Any:
    """What signs this service's own extrinsics (commitments, weights) on Bittensor: the SDK's wallet
    over the same hotkey file its Identity loads (WALLET_*). None for the local chain, whose records
    the services sign with their Identity. A service that writes to the chain passes it to
    `open_chain`; without it a BittensorChain can only read."""
    if config.chain != "bittensor":
        return None
    return Wallet(name=wallet.name, hotkey=wallet.hotkey, path=str(Path(wallet.path).expanduser()))
