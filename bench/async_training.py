"""Synchronous against asynchronous remote training (ROUTER_TRAINING): the same init trained for the
same number of steps through real expert services, the two modes alternating.

    python -m bench.async_training [--steps 100] [--preset small] [--pairs 2]   # ~9 minutes for small

Each run gets fresh expert services (a BenchStack: Redis, 2 services, auth on, experts dealt as
the local stack deals them) that load the init's expert file, and a router-side trainer built as
`python -m services.router train` builds it, on one torch thread. Synchronous runs are
deterministic (remote training equals in-process training), and so are asynchronous ones with one
router, so the pairs differ in time only. Reported per mode: seconds per step (from the trainer's
metrics row: its steps' own times, evaluation left out), the final validation loss and bits per byte, masked calls.
Writes section `async_training` of bench/results/latest.json (other sections are kept).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from bench.stack import BenchStack
from moe.data import CorpusConfig
from moe.train import TrainConfig
from services.router.config import RouterConfig
from services.router.train import build_remote_trainer, prepare_initial_checkpoint
from services.stack.placement import deal_experts

MODES = ("sync", "async")
N_SERVICES = 2


def train_once(mode: str, ckpt: Path, experts: Path, lm_cfg, out: Path) -> dict:
    with BenchStack() as stack:
        stack.spawn_experts(deal_experts(lm_cfg.moe_layers(), lm_cfg.n_experts, N_SERVICES), lm_cfg.dim,
                            lm_cfg.moe_inter_dim, experts, threads=1)
        stack.wait_experts()
        config = RouterConfig(redis_url=stack.redis.url, wire_dtype="fp32", expert_timeout_s=60.0, training=mode)
        trainer, _, _ = build_remote_trainer(ckpt, out, config, progress=False, parts=stack.remote_parts())
        row = trainer.train()
        # One evaluation, at the end: the row's interval is every step, its rate without evaluation.
        tokens_per_step = trainer.cfg.batch_size * lm_cfg.block_size
        return {"s_per_step": tokens_per_step / row["tokens_per_s"], "steps": len(trainer.step_losses),
                "first_loss": trainer.step_losses[0], "val_loss": row["val_loss"], "val_bpb": row["val_bpb"],
                "masked_calls": row["masked_calls"]}


def run(steps: int, preset: str, pairs: int, log=print) -> dict:
    torch.set_num_threads(1)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="moe-bench-async-") as tmp:
        tmp = Path(tmp)
        train_cfg = TrainConfig(steps=steps, warmup_steps=min(10, steps // 2), eval_every=steps, eval_batches=4)
        ckpt, experts, lm_cfg = prepare_initial_checkpoint(tmp / "init", preset, train_cfg, CorpusConfig(), seed=0)
        for i in range(pairs):
            for mode in MODES:
                result = train_once(mode, ckpt, experts, lm_cfg, tmp / f"{mode}-{i}")
                log(f"[async_training] {mode} run {i + 1}: {result}")
                runs[mode].append(result)
    sync_s = statistics.fmean(r["s_per_step"] for r in runs["sync"])
    async_s = statistics.fmean(r["s_per_step"] for r in runs["async"])
    sync_loss, async_loss = runs["sync"][-1]["val_loss"], runs["async"][-1]["val_loss"]
    return {"preset": preset, "steps": steps, "pairs": pairs, "expert_services": N_SERVICES,
            "sync_s_per_step": sync_s, "async_s_per_step": async_s, "async_speedup": sync_s / async_s,
            "sync_val_loss": sync_loss, "async_val_loss": async_loss,
            "async_val_loss_rel_diff": (async_loss - sync_loss) / sync_loss, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--pairs", type=int, default=2, help="sync/async pairs, alternating")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.pairs < 1:
        parser.error("--steps must be >= 2 and --pairs >= 1")
    from subnet.allocator import reuse_freed_memory
    reuse_freed_memory()   # as the router does first thing
    result = run(args.steps, args.preset, args.pairs, log=lambda line: print(line, file=sys.stderr, flush=True))
    from bench import report
    print(f"wrote {report.write({'async_training': result}, merge=True)}", file=sys.stderr)
    print(report.to_markdown({"meta": {}, "async_training": {k: v for k, v in result.items() if k != "runs"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
