"""Part 2d (informative, no target): the decode step of part 2c on the `base` preset.

The issue's latency target is about the `small` preset (part 2c, `latency`). This part measures
the same step, the same way (`bench.latency.measure`: interleaved, logits compared at every step),
on the `base` preset: 8 MoE blocks of dim 512, 16 experts, top-2 and one shared expert per block.
A call to an expert costs about the same whatever the trunk around it, so the remote/in-process
ratio says how much of a step the expert calls are when the router has more of its own work per
layer, part of which (the shared experts, the routing losses) runs while the calls are out.

One remote variant: the service defaults, N expert services of 1 torch thread (N = this process's
torch threads, 2 here), the router on ROUTER_THREADS; the in-process model on N threads, as in part
2c. Fewer steps than part 2c: a `base` step is about six times a `small` one.
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import torch

from bench.latency import measure, reference_model, remote_model
from bench.remote_layer import ROUTER_THREADS
from bench.stack import BenchStack
from services.router.remote_model import export_expert_weights
from subnet.gc_pauses import freeze_startup_objects

PRESET = "base"
WARMUP_STEPS, STEPS = 5, 40   # 53 positions, within block_size 512


def run(rounds: int = 5) -> dict:   # `rounds` unused: STEPS samples per side give the percentiles
    n_threads = torch.get_num_threads()
    cfg, local, tokens, deals = reference_model(PRESET, WARMUP_STEPS + STEPS, n_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="moe-bench-weights-") as tmp, BenchStack() as stack:
            checkpoint = Path(tmp) / "experts.safetensors"
            export_expert_weights(local, checkpoint)
            stack.start_experts(deals, cfg.dim, cfg.moe_inter_dim, checkpoint, threads=1)
            remote, _ = remote_model(cfg, stack, local)
            freeze_startup_objects()   # as the router and expert services do once started
            return measure({"inproc": (local, n_threads), "remote": (remote, ROUTER_THREADS)}, tokens, n_threads,
                           len(deals), warmup=WARMUP_STEPS, steps=STEPS, preset_name=PRESET)
    finally:
        gc.unfreeze()
        torch.set_num_threads(n_threads)
