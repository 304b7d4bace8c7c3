"""What the int8 wire costs in learning: a preset trained twice from the same seed for the same
number of steps, once with fp32 and once with int8 on the expert wire.

    python -m bench.wire8_learning [--steps 150] [--preset small]    # 8+ minutes on 2 idle cores

No network: `WireExperts` wraps each layer's in-process experts and passes every tensor that
would cross the wire through `encode` -> `decode` in the wire dtype: inputs and outputs in
the forward pass, grad_outputs (into the expert) and grad_inputs (back out) in the backward
pass, as RemoteExpertGroup and the expert service do. With fp32 the round trip is exact, so
that run is the plain in-process run. Validation runs through the same wire (an int8 model
is served through int8); the int8 model is also evaluated through fp32, to separate what
training through int8 cost from what serving through it costs.

Wire bytes per step count the `data` of every tensor a training step sends, both directions,
all MoE layers (protobuf framing left out), for fp32, bf16 and int8 from the same element
counts; the run's own dtype is checked against the bytes it really encoded.
Writes section `wire8_learning` of bench/results/latest.json (other sections are kept).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
import time
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from moe.boundary import ExpertGroup, LocalExperts
from subnet.tensor_codec import decode, encode, int8_nbytes

WIRE_BYTES = {"fp32": lambda n: 4 * n, "bf16": lambda n: 2 * n, "int8": int8_nbytes}


class WireExperts(nn.Module, ExpertGroup):
    """Local experts behind a simulated wire: what goes in and out is what the wire dtype carries.
    Counts the bytes of training traffic (not of evaluation)."""

    def __init__(self, experts: LocalExperts, wire_dtype: str):
        super().__init__()
        self.inner = experts               # a submodule: the trainer's optimizer still owns its weights
        self.n_experts, self.dim = experts.n_experts, experts.dim
        self.wire_dtype = wire_dtype
        self.sent = dict.fromkeys(WIRE_BYTES, 0)   # bytes each dtype would have sent
        self.encoded = 0                           # bytes really encoded in `wire_dtype`

    def run(self, batches: Mapping[int, torch.Tensor],
            token_ids: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor | None]:
        return {i: _Wire.apply(self.inner[i](_Wire.apply(x, self)), self) for i, x in batches.items()}

    def round_trip(self, t: torch.Tensor, count: bool) -> torch.Tensor:
        msg = encode(t, self.wire_dtype)
        if count:
            for name, nbytes in WIRE_BYTES.items():
                self.sent[name] += nbytes(t.numel())
            self.encoded += len(msg.data)
        # A copy: fp32 decode views the message's read-only bytes, and autograd may add into its tensors.
        return decode(msg).to(t.device, copy=True)


class _Wire(torch.autograd.Function):
    """Identity up to the wire: the value goes through it forward, its gradient backward."""

    @staticmethod
    def forward(ctx, t, wire: WireExperts):
        ctx.wire = wire
        return wire.round_trip(t, count=t.requires_grad)   # training traffic only

    @staticmethod
    def backward(ctx, grad):
        return ctx.wire.round_trip(grad, count=True), None


def train(wire_dtype: str, preset_name: str, steps: int, seed: int, corpus, corpus_cfg, log) -> dict:
    """One run; the final metrics row plus wire bytes and timings."""
    from moe.config import preset
    from moe.lm import MoELM
    from moe.train import PRESET_TRAIN_DEFAULTS, TrainConfig
    from moe.train.evaluate import evaluate
    from moe.train.trainer import Trainer

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)                    # the same initial weights in both runs
    model = MoELM(preset(preset_name, vocab_size=corpus.vocab_size))
    wires = []
    for layer in model.moe_layers():
        layer.experts = WireExperts(layer.experts, wire_dtype)
        wires.append(layer.experts)
    defaults = PRESET_TRAIN_DEFAULTS[preset_name]
    cfg = TrainConfig(steps=steps, batch_size=defaults["batch_size"], lr=defaults["lr"],
                      warmup_steps=min(defaults["warmup_steps"], steps // 5),   # leave room to decay in short runs
                      eval_every=max(1, steps // 3), seed=seed)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, corpus, cfg, out, corpus_config=corpus_cfg, progress=False, log=log)
        start = time.perf_counter()
        row = trainer.train()
        seconds = time.perf_counter() - start
    encoded = sum(w.encoded for w in wires)
    sent = {name: sum(w.sent[name] for w in wires) for name in WIRE_BYTES}
    if encoded != sent[wire_dtype]:
        raise RuntimeError(f"{wire_dtype}: encoded {encoded} bytes, the formula says {sent[wire_dtype]}")
    result = {"val_loss": row["val_loss"], "val_bpb": row["val_bpb"], "train_loss_last_interval": row["train_loss"],
              "seconds": seconds, "wire_bytes_per_step": {k: v / steps for k, v in sent.items()},
              "step_losses_first_last": [trainer.step_losses[0], trainer.step_losses[-1]]}
    if wire_dtype != "fp32":
        for w in wires:
            w.wire_dtype = "fp32"
        result["val_loss_fp32_wire"] = evaluate(model, trainer.val_sampler, corpus, cfg.eval_batches)["val_loss"]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only; do not touch bench/results")
    args = parser.parse_args(argv)

    from bench import report
    from moe.data import CorpusConfig, build_corpus

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    corpus_cfg = CorpusConfig()
    corpus = build_corpus(corpus_cfg, progress=log)
    runs = {}
    for wire in ("fp32", "int8"):
        log(f"[wire8_learning] {args.preset}, {args.steps} steps, seed {args.seed}, {wire} on the wire")
        runs[wire] = train(wire, args.preset, args.steps, args.seed, corpus, corpus_cfg, log)
    fp32, int8 = runs["fp32"]["val_loss"], runs["int8"]["val_loss"]
    result = {"preset": args.preset, "steps": args.steps, "seed": args.seed,
              "val_loss_fp32": fp32, "val_loss_int8": int8, "rel_diff": (int8 - fp32) / fp32,
              "within_1pct": bool(abs(int8 - fp32) <= 0.01 * fp32) and math.isfinite(int8),
              "val_loss_int8_trained_fp32_eval": runs["int8"]["val_loss_fp32_wire"],
              "wire_mb_per_step": {k: v / 1e6 for k, v in runs["int8"]["wire_bytes_per_step"].items()},
              "seconds": {wire: run["seconds"] for wire, run in runs.items()},
              "runs": runs,
              "definition": "val_loss: nats/token, mean over domains, after the last step, through each run's own "
                            "wire; rel_diff = (int8 - fp32) / fp32; MB = 1e6 bytes of Tensor data per training "
                            "step, both directions, all MoE layers"}
    import json
    print(json.dumps(result, indent=2))
    if not args.no_write:
        print(f"wrote {report.write({'wire8_learning': result}, merge=True)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
