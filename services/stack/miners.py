"""The stack's miners: honest expert services that each host every routed expert (replicas, so
the router spreads tokens over them and the validator merges them back), plus the adversarial
test miners named in STACK_ADVERSARIES (services/expert/adversary.py), on the following ports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moe.experts import expert_uid
from services.stack.wallets import StackWallets


@dataclass(frozen=True)
class Miner:
    name: str          # "expert-0", "copycat-0", ...
    wallet: str        # wallet name under the stack's wallet path
    port: int
    adversary: str = ""

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


def plan_miners(honest_ports: list[int], adversaries: tuple[str, ...]) -> list[Miner]:
    miners = [Miner(f"expert-{i}", f"stack-expert-{i}", port) for i, port in enumerate(honest_ports)]
    next_port = max(honest_ports) + 1
    for i, mode in enumerate(adversaries):
        miners.append(Miner(f"{mode}-{i}", f"stack-{mode}-{i}", next_port + i, adversary=mode))
    return miners


def miner_env(miner: Miner, index: int, cfg, lm_cfg, redis_url: str, checkpoint: Path, run: Path,
              wallets: StackWallets, subnet_env: dict[str, str]) -> dict[str, str]:
    uids = [expert_uid(layer, i) for layer in lm_cfg.moe_layers() for i in range(lm_cfg.n_experts)]
    env = {"EXPERT_UIDS": ",".join(uids), "EXPERT_DIM": str(lm_cfg.dim),
           "EXPERT_INTER_DIM": str(lm_cfg.moe_inter_dim), "EXPERT_PORT": str(miner.port),
           "REDIS_URL": redis_url, "EXPERT_CHECKPOINT": str(checkpoint),
           "EXPERT_SAVE_PATH": str(run / f"{miner.name}.safetensors"),
           "EXPERT_THREADS": str(cfg.expert_threads), "EXPERT_METRICS_PORT": str(cfg.metrics_port(1 + index)),
           # The router by allow-list; validators (stake on the chain) by AUTH_CHAIN.
           **wallets.env(miner.wallet, allow=wallets.router.hotkey), "AUTH_CHAIN": "1",
           # A fresh start each run: the S3 data is the run's own anyway.
           "EXPERT_RESUME": "0", **subnet_env,
           # The local chain is in the same Redis; the miner reaches it as the restricted user too.
           "CHAIN_REDIS_URL": redis_url}
    if cfg.discovery == "chain":   # the router finds it on the chain: no registry entry to write
        env.update({"EXPERT_SERVE_ON_CHAIN": "1", "REDIS_URL": ""})
    if miner.adversary:
        env.update({"EXPERT_ADVERSARY": miner.adversary, "EXPERT_ALLOW_ADVERSARY": "1"})
    return env
