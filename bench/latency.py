"""Part 2c: latency of one decode step through the router, remote experts against in-process ones.

One decode step = batch 1, one new token, with a KV cache: `model(token, cache=cache)`
on the `small` preset (4 MoE blocks, 8 experts, top-2), so every step makes one round of
expert calls per block, one after the other. The in-process model is built first; its
experts are exported (`export_expert_weights`) and served by N expert services (1 torch
thread each, index i of every layer on service i % N, as `services.stack` deals them); the
remote model is `build_remote_lm` with the same trunk weights loaded. The thread layout
is part 2a's: N torch threads for the in-process model, ROUTER_THREADS for the router.

Each remote variant is measured in a pass of its own against the in-process model (`_paired`):
the two decode the same fixed token sequence, one step each in turn (the order alternates, so
neither always runs right after the other), WARMUP_STEPS untimed, then STEPS timed. Logits of
the two are compared at every step; fp32 on the wire must agree to float rounding or the part
fails. Each variant's ratio is against the in-process p50 of its own pass.

`one_call_p50_ms`: the floor under those expert calls, one signed one-token Forward to one service,
back to back (see `_one_call`). `loopback_round_trip_*`: the floor under that, the same bytes to
another process over loopback TCP and back with nothing done at either end, both on one CPU and on
two (bench/loopback_echo.py).

`cpu_ms_per_step`: after the timed steps, CPU_STEPS more steps of each model alone, with the CPU
each process spent on them (/proc): this process ("router"; for "inproc" the whole model, on its
threads, idle OpenMP workers spinning included), and for a remote variant its expert services
("experts"), the expert calls a step made ("calls_per_step": a Forward, or a ForwardMany for the
experts of a layer on one service) and the services' CPU per call ("experts_us_per_call"). The
services and the router mostly take turns, so a remote step's wall time follows its CPU.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import torch

from bench.loopback_echo import round_trip_us
from bench.remote_layer import ROUTER_THREADS, process_cpu_s
from bench.stack import BenchStack
from bench.timing import percentiles
from moe import preset
from moe.config import LMConfig
from moe.lm import MoELM
from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.remote_model import RemoteParts, build_remote_lm, export_expert_weights
from services.stack.placement import deal_experts
from subnet.gc_pauses import freeze_startup_objects
from subnet.tensor_codec import decode, encode_view

PRESET = "small"
PROMPT_TOKENS, WARMUP_STEPS, STEPS = 8, 10, 100   # 118 positions: fits block_size 128 without a cache reset
CPU_STEPS = 100   # the CPU accounting's steps per model (from the same prompt, after the timed ones)
CALL_TIMEOUT_S = 60.0
TOLERANCE = 1e-4    # max |logits remote - in process| / max |logits in process|
# Each remote variant gets its own Redis and services. A decode step's requests arrive alone, so
# they skip EXPERT_BATCH_WAIT_MS (default 2; services/expert/batcher.py): the second variant, with
# no window at all, checks that the default costs a decode step nothing. The third has the experts
# offer no moe-frames port (EXPERT_FRAMES_PORT=-1), so its calls are gRPC unary calls, as before it.
REMOTE_VARIANTS = {"remote": {}, "remote_batch_wait_0": {"EXPERT_BATCH_WAIT_MS": "0"},
                   "remote_grpc": {"EXPERT_FRAMES_PORT": "-1"}}


def run(rounds: int = 5) -> dict:   # `rounds` unused: STEPS samples per side give the percentiles
    n_threads = torch.get_num_threads()
    cfg, local, tokens, deals = reference_model(PRESET, WARMUP_STEPS + STEPS, n_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="moe-bench-weights-") as tmp, ExitStack() as exits:
            checkpoint = Path(tmp) / "experts.safetensors"
            export_expert_weights(local, checkpoint)
            stacks = {name: exits.enter_context(BenchStack()) for name in REMOTE_VARIANTS}
            for name, env in REMOTE_VARIANTS.items():   # all services start side by side
                stacks[name].spawn_experts(deals, cfg.dim, cfg.moe_inter_dim, checkpoint, threads=1, env=env)
            models = {"inproc": (local, n_threads)}
            call_counts = {}
            for name, stack in stacks.items():
                stack.wait_experts()
                remote, parts = remote_model(cfg, stack, local)
                call_counts[name] = partial(_expert_calls, parts.metrics)
                models[name] = (remote, ROUTER_THREADS)
            freeze_startup_objects()   # as the router and expert services do once started
            out = _paired(models, tokens, n_threads, len(deals))
            out.update(_one_call(stacks["remote"], deals[0][0], cfg.dim))
            out.update(round_trip_us())
            out["cpu_ms_per_step"] = _cpu_per_step(models, tokens, {name: stack.service_pids()
                                                                    for name, stack in stacks.items()}, call_counts)
            return out
    finally:
        gc.unfreeze()   # the parts after this one start as they would alone
        torch.set_num_threads(n_threads)


def reference_model(preset_name: str, steps: int, n_services: int) -> tuple[LMConfig, MoELM, torch.Tensor, list]:
    """The in-process model (seed 0), the fixed tokens every model decodes (PROMPT_TOKENS, then
    `steps`), and its experts dealt over `n_services` services as `services.stack` deals them."""
    cfg = preset(preset_name)
    torch.manual_seed(0)
    local = MoELM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, PROMPT_TOKENS + steps))
    return cfg, local, tokens, deal_experts(cfg.moe_layers(), cfg.n_experts, n_services)


def remote_model(cfg: LMConfig, stack: BenchStack, local: MoELM) -> tuple[MoELM, RemoteParts]:
    """The router's model on `stack`'s services (which serve `local`'s experts), with `local`'s trunk."""
    router_cfg = RouterConfig(wire_dtype="fp32", expert_timeout_s=CALL_TIMEOUT_S, retries=0)
    parts = stack.remote_parts()
    remote = build_remote_lm(cfg, parts, router_cfg).eval()
    missing, unexpected = remote.load_state_dict(local.state_dict(), strict=False)
    unexpected = [k for k in unexpected if ".ffn.experts.experts." not in k]
    if missing or unexpected:
        raise RuntimeError(f"trunk does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return remote, parts


def _paired(models: dict[str, tuple[MoELM, int]], tokens: torch.Tensor, n_threads: int, n_services: int) -> dict:
    """`measure` once per remote variant, each interleaved with the in-process model alone (its own
    pass): a variant's services then run every other step, as a router's do while it decodes, and not
    once in every len(models) steps with every other variant's services in between (run that way
    until 2026-12-08, the remote steps read 12.5-14 ms against 10.5-11.6 ms paired, the in-process ones
    4.5-4.8 against 4.0-4.6 ms; most likely the caches, which every other process has been through
    since a service last ran). Each ratio is against the in-process p50 of its own pass; the
    `inproc_*` keys are those of the first pass (`remote`)."""
    out: dict = {}
    worst = 0.0
    for name in REMOTE_VARIANTS:
        one = measure({"inproc": models["inproc"], name: models[name]}, tokens, n_threads, n_services)
        worst = max(worst, one["logits_max_rel_diff"])
        out.update(one if not out else {k: v for k, v in one.items() if k.startswith(name)})
        out[f"{name}_inproc_p50_ms"] = one["inproc_p50_ms"]
    out["logits_max_rel_diff"] = worst
    out["pairing"] = "each remote variant interleaved with the in-process model alone, in a pass of its own"
    return out


def _cpu_per_step(models: dict[str, tuple[MoELM, int]], tokens: torch.Tensor, service_pids: dict[str, list[int]],
                  call_counts: dict[str, Callable[[], float]]) -> dict[str, dict[str, float]]:
    """CPU ms per decode step of each model run alone: this process ("router", which is the whole
    model in process) and, for a remote variant, its expert services together ("experts"), with the
    calls a step made and the services' CPU per call."""
    out = {}
    with torch.no_grad():
        for name, (model, threads) in models.items():
            torch.set_num_threads(threads)
            cache = model.new_cache(1)
            model(tokens[:, :PROMPT_TOKENS], cache=cache)
            pids = service_pids.get(name, [])
            calls = call_counts.get(name, lambda: 0.0)
            calls_before = calls()
            before, services_before = time.process_time(), sum(process_cpu_s(pid) for pid in pids)
            steps = min(CPU_STEPS, tokens.shape[1] - PROMPT_TOKENS)
            for pos in range(PROMPT_TOKENS, PROMPT_TOKENS + steps):
                model(tokens[:, pos:pos + 1], cache=cache)
            out[name] = {"router": round((time.process_time() - before) / steps * 1e3, 3)}
            if pids:   # /proc counts clock ticks (10 ms): over CPU_STEPS steps, +-0.1 ms a step
                services_s = sum(process_cpu_s(pid) for pid in pids) - services_before
                out[name]["experts"] = round(services_s / steps * 1e3, 2)
                n_calls = calls() - calls_before
                out[name]["calls_per_step"] = round(n_calls / steps, 2)
                out[name]["experts_us_per_call"] = round(services_s / n_calls * 1e6) if n_calls else None
    return out


def _expert_calls(metrics: RouterMetrics) -> float:
    """Expert call attempts the router has made so far, every layer, RPC and status together."""
    return sum(sample.value for family in metrics.registry.collect() if family.name == "router_expert_calls"
               for sample in family.samples if sample.name.endswith("_total"))


def _one_call(stack: BenchStack, uid: str, dim: int) -> dict:
    """The floor under a decode step's expert calls: one signed Forward of one token to one service,
    each sent as soon as the one before is answered (as a decode step's calls of one layer are), over
    the path a decode step takes (moe-frames, sent and read on this thread)."""
    client = stack.clients.get(stack.replicas.replicas(uid)[0].endpoint)
    x = torch.randn(1, dim)
    samples = []
    for i in range(WARMUP_STEPS + 5 * STEPS):
        start = time.perf_counter()
        answer = client.forward(uid, encode_view(x), call_id="", step=0, training=False, timeout_s=CALL_TIMEOUT_S,
                                inline=True).result()
        if i >= WARMUP_STEPS:
            samples.append(time.perf_counter() - start)
    decode(answer.outputs, expected_dim=dim)
    ms = {k: v * 1e3 for k, v in percentiles(samples, (50, 99)).items()}
    return {"one_call_p50_ms": ms["p50"], "one_call_p99_ms": ms["p99"]}


def measure(models: dict[str, tuple[MoELM, int]], tokens: torch.Tensor, n_threads: int, n_services: int,
            warmup: int = WARMUP_STEPS, steps: int = STEPS, preset_name: str = PRESET) -> dict:
    """Decode step latencies of every model, interleaved, after `warmup` untimed steps; the first model
    is the reference. `tokens` holds PROMPT_TOKENS + warmup + steps tokens."""
    names = list(models)
    caches = {name: m.new_cache(1) for name, (m, _) in models.items()}
    samples: dict[str, list[float]] = {name: [] for name in models}
    worst = 0.0
    with torch.no_grad():
        for name, (model, threads) in models.items():
            torch.set_num_threads(threads)
            model(tokens[:, :PROMPT_TOKENS], cache=caches[name])
        for step in range(warmup + steps):
            pos = PROMPT_TOKENS + step
            token = tokens[:, pos:pos + 1]
            logits = {}
            shift = step % len(names)   # rotate who goes first
            for name in names[shift:] + names[:shift]:
                model, threads = models[name]
                torch.set_num_threads(threads)
                start = time.perf_counter()
                logits[name], _ = model(token, cache=caches[name])
                elapsed = time.perf_counter() - start
                if step >= warmup:
                    samples[name].append(elapsed)
                if model.last_stats["masked_calls"]:
                    raise RuntimeError(f"{name}, step {step}: {model.last_stats['masked_calls']} expert calls masked")
            ref = logits[names[0]]
            for name in names[1:]:
                worst = max(worst, float((logits[name] - ref).abs().max()) / float(ref.abs().max()))
    torch.set_num_threads(n_threads)
    if worst > TOLERANCE:
        raise RuntimeError(f"remote logits differ from in-process ones: relative {worst:.3g} > {TOLERANCE:g}")
    ms = {name: {k: v * 1e3 for k, v in percentiles(s, (50, 90, 99)).items()} for name, s in samples.items()}
    cfg = models[names[0]][0].cfg
    out = {"model": f"preset {preset_name}: {cfg.n_layer} MoE blocks, dim {cfg.dim}, {cfg.n_experts} experts "
                    f"top-{cfg.n_activated_experts}, {cfg.n_shared_experts} shared, batch 1, one token per step "
                    f"with a KV cache", "steps": steps}
    for name in names:
        out[f"{name}_p50_ms"] = ms[name]["p50"]
        out[f"{name}_p99_ms"] = ms[name]["p99"]
    for name in names[1:]:
        out[f"{name}_p50_ratio"] = ms[name]["p50"] / ms[names[0]]["p50"]
    out.update({f"{name}_ms": ms[name] for name in names})
    out["threads"] = {"inproc": n_threads, "router": ROUTER_THREADS, "expert_services": n_services,
                      "threads_per_service": 1}
    out["remote_variants"] = {name: " ".join(f"{k}={v}" for k, v in env.items()) or "service defaults"
                              for name, env in REMOTE_VARIANTS.items()}
    out["logits_max_rel_diff"] = worst
    out["load_avg_1m"] = os.getloadavg()[0]
    return out
