"""Part 2f: one slow expert, with and without the router's straggler policy.

    python -m bench --only straggler

One MoE layer (dim 256, inter 512, 8 experts, top-2, 512 tokens) trains through two expert
services: experts 0-6 in one, expert 7 alone in the other. A training step (forward + backward
through `RemoteExpertGroup`, as the router runs it) is timed three ways, best of `rounds`:
- `healthy_step_s`: neither service is slowed down;
- `slow_step_s`: expert 7's service answers every Forward and Backward EXPERT_INJECT_DELAY_MS
  (300) late, and the router waits for it (ROUTER_STRAGGLER_MS=0, the default);
- `policy_step_s`: the same slow service, with ROUTER_STRAGGLER_MS=STRAGGLER_MS: once every token
  has an answer from one of its experts (ROUTER_K_MIN=1; every token of expert 7 has a second
  expert in the fast service), expert 7 gets STRAGGLER_MS more and is then masked for the step
  (its tokens keep their other expert's output, renormalized), so backward does not wait for it either.
`policy_masked_share` = the share of timed policy steps in which expert 7 was masked.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import torch

from bench.remote_layer import CALL_TIMEOUT_S, ROUTER_THREADS, one_session, remote_twin, training_call
from bench.stack import BenchStack
from bench.timing import best_times
from moe.experts import expert_uid
from moe.layer import MoE
from services.router.remote_experts import RemoteExpertGroup
from subnet.expert_weights import save_expert_weights

DIM, INTER, EXPERTS, TOP_K, TOKENS = 256, 512, 8, 2, 512
DELAY_MS, STRAGGLER_MS = 300, 20
SLOW = EXPERTS - 1


def run(rounds: int = 5) -> dict:
    n_threads = torch.get_num_threads()
    torch.manual_seed(0)
    layer = MoE(DIM, EXPERTS, TOP_K, INTER)
    x = torch.randn(TOKENS, DIM)
    deals = [[expert_uid(0, i) for i in range(SLOW)], [expert_uid(0, SLOW)]]
    times: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="moe-bench-straggler-") as tmp:
            checkpoint = Path(tmp) / "experts.safetensors"
            save_expert_weights(checkpoint, {expert_uid(0, i): layer.experts[i] for i in range(EXPERTS)})
            with BenchStack() as stack:
                stack.start_experts(deals, DIM, INTER, checkpoint, threads=1)
                times.update(_time(layer, x, stack, {"healthy": 0.0}, rounds))
            with BenchStack() as stack:
                stack.spawn_experts(deals[:1], DIM, INTER, checkpoint, threads=1)
                stack.spawn_experts(deals[1:], DIM, INTER, checkpoint, threads=1,
                                    env={"EXPERT_INJECT_DELAY_MS": str(DELAY_MS)})
                stack.wait_experts()
                masked: list[bool] = []
                times.update(_time(layer, x, stack, {"slow": 0.0, "policy": STRAGGLER_MS}, rounds, masked))
    finally:
        torch.set_num_threads(n_threads)
    return {"workload": {"dim": DIM, "moe_inter_dim": INTER, "n_experts": EXPERTS, "top_k": TOP_K,
                         "tokens": TOKENS, "slow_expert": SLOW, "delay_ms": DELAY_MS, "straggler_ms": STRAGGLER_MS},
            "healthy_step_s": times["healthy"], "slow_step_s": times["slow"], "policy_step_s": times["policy"],
            "policy_over_healthy": times["policy"] / times["healthy"],
            "slow_over_healthy": times["slow"] / times["healthy"],
            "policy_masked_share": sum(masked) / max(len(masked), 1),
            "load_avg_1m": os.getloadavg()[0]}


def _time(layer: MoE, x: torch.Tensor, stack: BenchStack, variants: dict[str, float], rounds: int,
          masked: list[bool] | None = None) -> dict[str, float]:
    """Seconds per training step of each variant (name -> ROUTER_STRAGGLER_MS), interleaved."""
    steps = itertools.count(1)
    calls = {}
    groups = {name: RemoteExpertGroup(0, EXPERTS, DIM, stack.replicas, timeout_s=CALL_TIMEOUT_S, retries=0,
                                      clients=stack.clients, straggler_ms=straggler_ms)
              for name, straggler_ms in variants.items()}
    one_session(groups.values())
    for name, group in groups.items():
        twin = remote_twin(layer, group)
        step = training_call(twin, x.clone().requires_grad_(True), ROUTER_THREADS, steps, group)

        def call(step=step, twin=twin, name=name):
            step()
            if masked is not None and name == "policy":
                masked.append(SLOW in twin.last_stats.masked_experts)
            elif twin.last_stats.masked_experts:
                raise RuntimeError(f"{name}: experts {twin.last_stats.masked_experts} were masked")
        calls[name] = call
    return best_times(calls, rounds=rounds, warmup=1)
