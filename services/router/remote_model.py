"""Build the LM whose routed experts are remote, and move weights between the two layouts.

    parts = RemoteParts.connect(config)                 # registry, replica set, signing channels, metrics
    model = build_remote_lm(lm_config, parts, config)   # MoELM with a RemoteExpertGroup per MoE block
    load_trunk(model, "runs/demo")                      # everything but the routed experts

The in-process model and the remote one share every parameter name except the routed
experts (`blocks.<L>.ffn.experts.experts.<i>.w*.weight` in process, `<L>.<i>.w*.weight` in
an expert weight file), so one checkpoint serves both.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis

from moe import MoELM
from moe.config import LMConfig
from moe.experts import ROUTED_EXPERT_KEY, expert_uid
from moe.train.checkpoint import load_weights, resolve_checkpoint
from services.router.chain_directory import ChainDirectory
from services.router.config import RouterConfig
from services.router.info_probe import InfoProbe
from services.router.metrics import RouterMetrics
from services.router.registered import RegisteredReplicas
from services.router.remote_experts import RemoteExpertGroup
from services.router.replicas import ReplicaSet
from services.router.scores import RedisScores
from services.router.tracing import ExpertCallTracer
from subnet.auth import service_identity
from subnet.auth.policy import ChainPolicy
from subnet.chain.config import open_chain
from subnet.expert_client import ChannelSettings, ExpertClientPool
from subnet.expert_weights import save_expert_weights
from subnet.identity import Identity
from subnet.registry import ExpertRegistry


@dataclass
class RemoteParts:
    """What every RemoteExpertGroup of one router shares: one registry view, one channel pool
    (signing every expert call with `identity` for the hotkey the registry lists for the endpoint)."""

    registry: ExpertRegistry
    replicas: ReplicaSet
    clients: ExpertClientPool
    metrics: RouterMetrics
    tracer: ExpertCallTracer
    identity: Identity | None = None
    # ROUTER_REGISTERED_EXPERTS_ONLY's filter or ROUTER_DISCOVERY=chain's directory: the replica
    # source that runs a metagraph thread of its own (stopped by close()).
    chain_source: RegisteredReplicas | ChainDirectory | None = None
    discovery: str = "registry"   # ROUTER_DISCOVERY

    @classmethod
    def connect(cls, config: RouterConfig, metrics: RouterMetrics | None = None,
                identity: Identity | None = None) -> RemoteParts:
        """`identity` overrides the wallet (tests). IdentityError when AUTH_MODE=on and the wallet
        cannot be loaded; with AUTH_MODE=off expert calls go unsigned."""
        identity = service_identity(config.auth, config.wallet, identity, what="router")
        # Timeouts: a stalled Redis must fail a registry read, not hang the router's training.
        client = redis.Redis.from_url(config.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
        metrics = metrics or RouterMetrics()

        def count_skipped(reason: str) -> None:   # router_registry_entries_skipped{reason}
            metrics.registry_skipped.labels(reason).inc()

        # With signed calls, signed entries: nobody can list endpoints in another hotkey's name.
        registry = ExpertRegistry(client, require_signed=config.auth.enabled, on_skip=count_skipped)
        source, chain_source, replicas = registry, None, None
        try:
            if config.discovery == "chain" or config.registered_only:
                policy = ChainPolicy(open_chain(config.chain, config.rounds.schedule()),
                                     require_validator_permit=False, refresh_s=config.auth.chain_refresh_s,
                                     retry_s=config.auth.chain_retry_s).start()
                if config.discovery == "chain":   # services/router/chain_directory.py
                    source = chain_source = ChainDirectory(
                        policy, InfoProbe(identity), timeout_s=config.discovery_timeout_s,
                        on_skip=lambda reason: metrics.chain_endpoints_skipped.labels(reason).inc(),
                        private_addresses=config.discovery_private)
                else:   # only hotkeys registered on the chain (services/router/registered.py)
                    source = chain_source = RegisteredReplicas(registry, policy, on_skip=count_skipped)
            replicas = ReplicaSet(source, policy=config.replica_policy, refresh_s=config.registry_refresh_s,
                                  suspect_s=config.suspect_s,
                                  scores=RedisScores(client, config.scores_prefix + "ema",
                                                     config.scores_prefix + "banned") if config.follow_scores else None,
                                  min_ema=config.min_ema, grace_s=config.registry_grace_s,
                                  explore=config.explore).start()
            clients = ExpertClientPool(ChannelSettings(max_message_mb=config.max_message_mb), identity=identity,
                                       hotkeys=replicas.hotkey, shm=config.shm, frames=config.frames == "auto")
            if config.metrics_port:
                metrics.serve(config.metrics_port, addr=config.host)
        except BaseException:   # e.g. the metrics port is taken: stop the threads started so far
            if replicas is not None:
                replicas.stop()
            if chain_source is not None:
                chain_source.stop()
            raise
        return cls(registry, replicas, clients, metrics, ExpertCallTracer(), identity, chain_source, config.discovery)

    def close(self) -> None:
        self.replicas.stop()
        if self.chain_source is not None:
            self.chain_source.stop()
        self.clients.close()


def build_remote_lm(cfg: LMConfig, parts: RemoteParts, config: RouterConfig) -> MoELM:
    """An MoELM whose every MoE block reaches its routed experts through the registry
    (one trace span per layer and phase around its expert calls)."""
    groups = {layer: RemoteExpertGroup(layer, cfg.n_experts, cfg.dim, parts.replicas,
                                       wire_dtype=config.wire_dtype, timeout_s=config.expert_timeout_s,
                                       retries=config.retries, metrics=parts.metrics, clients=parts.clients,
                                       tracer=parts.tracer, forward_many_max_tokens=config.forward_many_max_tokens,
                                       straggler_ms=config.straggler_ms, k_min=config.k_min,
                                       apply_on_backward=config.training == "async")
              for layer in cfg.moe_layers()}
    return MoELM(cfg, expert_groups=groups)


def required_expert_uids(cfg: LMConfig) -> list[str]:
    return [expert_uid(layer, i) for layer in cfg.moe_layers() for i in range(cfg.n_experts)]


def load_trunk(model: MoELM, checkpoint: str | Path) -> Path:
    """Load every local parameter of `model` from a checkpoint; routed-expert weights in it are skipped.

    Raises CheckpointError when a trunk parameter is missing or something else does not fit.
    """
    ckpt = resolve_checkpoint(checkpoint)
    load_weights(model, ckpt, skip=lambda name: bool(ROUTED_EXPERT_KEY.match(name)))
    return ckpt


def export_expert_weights(model: MoELM, path: str | Path) -> list[str]:
    """Write the in-process routed experts of `model` as an expert weight file; returns the uids."""
    experts = {}
    for layer, block in enumerate(model.blocks):
        if block.is_moe:
            for i, module in enumerate(block.ffn.experts):
                experts[expert_uid(layer, i)] = module
    if not experts:
        raise ValueError("the model has no in-process routed experts to export")
    tmp = Path(path).with_suffix(".tmp")
    save_expert_weights(tmp, experts)
    tmp.replace(path)
    return sorted(experts)
