"""Part 1: one in-process MoE layer against a plain matmul on the same cores.

Workload (the issue's standard): dim 1024, moe_inter_dim 2816, 8 experts, top-2,
2048 tokens, fp32, all cores.
"""

from __future__ import annotations

import torch

from bench.timing import best_times
from moe import MoE

DIM, INTER, EXPERTS, TOP_K, TOKENS = 1024, 2816, 8, 2, 2048


def expert_flops(tokens: int = TOKENS, k: int = TOP_K, dim: int = DIM, inter: int = INTER) -> float:
    """Forward FLOPs of the routed experts: 3 matmuls of 2*dim*inter per token assignment."""
    return tokens * k * 3 * 2 * dim * inter


def standard_layer(seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    return MoE(dim=DIM, n_experts=EXPERTS, n_activated_experts=TOP_K, moe_inter_dim=INTER)


def run(rounds: int = 5) -> dict:
    layer = standard_layer()
    x = torch.randn(TOKENS, DIM)
    x_grad = x.clone().requires_grad_(True)
    # The plain matmul has the shape of one expert projection over the whole batch.
    a, b = torch.randn(TOKENS, DIM), torch.randn(DIM, INTER)

    def forward():
        with torch.no_grad():
            layer(x)

    def forward_backward():
        y, aux = layer(x_grad)
        (y.sum() + aux).backward()
        layer.zero_grad(set_to_none=True)
        x_grad.grad = None

    times = best_times({"matmul": lambda: a @ b, "fwd": forward, "fwdbwd": forward_backward}, rounds=rounds)
    matmul_gflops = 2 * TOKENS * DIM * INTER / times["matmul"] / 1e9
    fwd_gflops = expert_flops() / times["fwd"] / 1e9
    fwdbwd_gflops = 3 * expert_flops() / times["fwdbwd"] / 1e9   # backward = 2x forward FLOPs
    return {
        "workload": {"dim": DIM, "moe_inter_dim": INTER, "n_experts": EXPERTS, "top_k": TOP_K,
                     "tokens": TOKENS, "dtype": "fp32", "threads": torch.get_num_threads()},
        "fwd_tokens_per_s": TOKENS / times["fwd"],
        "fwdbwd_tokens_per_s": TOKENS / times["fwdbwd"],
        "fwd_s": times["fwd"],
        "fwdbwd_s": times["fwdbwd"],
        "matmul_gflops": matmul_gflops,
        "fwd_gflops": fwd_gflops,
        "fwdbwd_gflops": fwdbwd_gflops,
        "peak_fraction": fwd_gflops / matmul_gflops,
        "fwdbwd_peak_fraction": fwdbwd_gflops / matmul_gflops,
    }
