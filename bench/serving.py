"""Part 2e: serving, the router's continuous batching under concurrent Generate streams.

    python -m bench --only serving

The `small` preset with random weights (speed does not depend on what the weights say); its
routed experts are served by N expert services (1 torch thread each, dealt as the local stack
deals them, signed calls as in production); the router's gRPC server (RouterServicer +
RouterServer, the same objects `python -m services.router serve` runs) lives in this process
with ROUTER_THREADS torch threads.

For each concurrency C in CONCURRENCY, C client threads (a channel each) open a Generate
stream at the same moment (a barrier): PROMPT_TOKENS prompt ids, TOKENS new tokens, greedy.
The clients run in a process of their own (`bench.serving_clients`), not in the router's.
- `c{C}_tokens_per_s`: every token received / (last token's arrival - the barrier);
- `c{C}_token_p50_ms`, `c{C}_token_p99_ms`: per-token latency, the gaps between consecutive
  tokens of one stream as the client sees them, over every stream; the first token is left
  out (it includes the wait for a slot and the prefill) and reported as `c{C}_ttft_p50_ms`.
Each concurrency runs twice on the same router: the first (cold) burst's p99 is reported as
`c{C}_cold_token_p99_ms`, every other number comes from the second.
`unbatched_c{U}_tokens_per_s` runs C=U with ROUTER_MAX_BATCH=1, i.e. one stream after the
other, which is what the router's throughput was before continuous batching (it served one
request's token at a time under a lock).

Targets (issue 10): `speedup_16` = c16 / c1 tokens/s >= 8, and `p99_16_over_p50_1` = c16's p99
per-token latency / c1's p50 <= 3.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.remote_layer import ROUTER_THREADS
from bench.stack import BenchStack
from moe import preset
from moe.lm import MoELM
from services.router.config import RouterConfig
from services.router.remote_model import build_remote_lm, export_expert_weights
from services.router.server import RouterServer
from services.router.servicer import RouterServicer
from services.stack.placement import deal_experts
from subnet.gc_pauses import freeze_startup_objects

PRESET = "small"
CONCURRENCY = (1, 4, 16, 64)
UNBATCHED = 16
PROMPT_TOKENS, TOKENS = 8, 32
CALL_TIMEOUT_S = 60.0
CLIENTS_TIMEOUT_S = 900   # one burst, client start-up included
TARGET_SPEEDUP_16, TARGET_P99_OVER_P50 = 8.0, 3.0


class _Ids:
    """Token ids as text: the bench measures the model, not a tokenizer."""

    def encode(self, text):
        return [ord(c) % 256 for c in text]

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


def run(rounds: int = 5) -> dict:   # `rounds` unused: every stream's token gaps are the samples
    n_threads = torch.get_num_threads()
    cfg = preset(PRESET)
    torch.manual_seed(0)
    local = MoELM(cfg).eval()
    deals = deal_experts(cfg.moe_layers(), cfg.n_experts, n_threads)
    results: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="moe-bench-serving-") as tmp, BenchStack() as stack:
            checkpoint = Path(tmp) / "experts.safetensors"
            export_expert_weights(local, checkpoint)
            stack.start_experts(deals, cfg.dim, cfg.moe_inter_dim, checkpoint, threads=1)
            router_cfg = RouterConfig(wire_dtype="fp32", expert_timeout_s=CALL_TIMEOUT_S, retries=0)
            parts = stack.remote_parts()
            remote = build_remote_lm(cfg, parts, router_cfg).eval()
            remote.load_state_dict(local.state_dict(), strict=False)
            torch.set_num_threads(ROUTER_THREADS)
            freeze_startup_objects()   # as `python -m services.router serve` does before serving
            variants = [(f"c{c}", c, 64) for c in CONCURRENCY] + [(f"unbatched_c{UNBATCHED}", UNBATCHED, 1)]
            for name, streams, max_batch in variants:
                # Unbatched streams run one after the other, each warming up the next.
                results[name] = _serve_and_measure(remote, parts, streams, max_batch, warm_up=max_batch > 1)
                print(f"[bench] serving {name}: {results[name]['tokens_per_s']:.0f} tokens/s, "
                      f"p50 {results[name]['token_p50_ms']:.1f} ms, p99 {results[name]['token_p99_ms']:.1f} ms",
                      flush=True)
            deal_count = len(deals)
    finally:
        gc.unfreeze()   # the parts after this one start as they would alone
        torch.set_num_threads(n_threads)
    return _summary(results, cfg, deal_count)


def _serve_and_measure(model: MoELM, parts, streams: int, max_batch: int, warm_up: bool = True) -> dict:
    servicer = RouterServicer(model, _Ids(), parts.replicas, parts.metrics, max_new_tokens=TOKENS,
                              max_batch=max_batch, max_queued=256)
    server = RouterServer(servicer, "127.0.0.1", 0, max_message_mb=4).start()
    try:
        # The first burst at a new concurrency also pays one-time costs (threads of the gRPC server and
        # of the expert calls, the cache's slots): a served router is warm, so that run is reported
        # apart (`cold_token_p99_ms`) and the second one is measured.
        cold = _clients(server.endpoint, streams) if warm_up else None
        result = _clients(server.endpoint, streams)
        result["cold_token_p99_ms"] = (cold or result)["token_p99_ms"]
        return result
    finally:
        server.stop(grace_s=1)


def _clients(endpoint: str, streams: int) -> dict:
    """One burst of `streams` streams from a client process of its own (`bench.serving_clients`)."""
    command = [sys.executable, "-m", "bench.serving_clients", endpoint, str(streams), str(PROMPT_TOKENS), str(TOKENS)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CLIENTS_TIMEOUT_S,
                          cwd=Path(__file__).resolve().parent.parent)
    if done.returncode != 0:
        raise RuntimeError(f"serving clients ({streams} streams) failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _summary(results: dict, cfg, n_services: int) -> dict:
    out = {"model": f"preset {PRESET}: {cfg.n_layer} MoE blocks, dim {cfg.dim}, {cfg.n_experts} experts "
                    f"top-{cfg.n_activated_experts}; {PROMPT_TOKENS} prompt + {TOKENS} new tokens per stream, greedy"}
    for name, r in results.items():
        for key in ("tokens_per_s", "token_p50_ms", "token_p99_ms", "cold_token_p99_ms", "ttft_p50_ms"):
            out[f"{name}_{key}"] = r[key]
    one, sixteen = results["c1"], results["c16"]
    out["speedup_16"] = sixteen["tokens_per_s"] / one["tokens_per_s"]
    out["p99_16_over_p50_1"] = sixteen["token_p99_ms"] / one["token_p50_ms"]
    out["batched_over_unbatched_16"] = sixteen["tokens_per_s"] / results[f"unbatched_c{UNBATCHED}"]["tokens_per_s"]
    out["targets"] = {"speedup_16": f">= {TARGET_SPEEDUP_16:g}", "p99_16_over_p50_1": f"<= {TARGET_P99_OVER_P50:g}"}
    out["threads"] = {"router": ROUTER_THREADS, "expert_services": n_services, "threads_per_service": 1}
    out["load_avg_1m"] = os.getloadavg()[0]
    return out
