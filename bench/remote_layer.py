"""Part 2a: the standard MoE layer with its experts behind gRPC, against the same layer in process.

Same workload as part 1 (bench/moe_layer.py), same weights on both sides (the in-process
layer's experts are saved with `save_expert_weights` and every service loads them through
EXPERT_CHECKPOINT; the gate is copied), and the same CPU threads in total:

- in process: this process, torch.get_num_threads() = N threads (N = 2 here);
- remote: N expert services with 1 torch thread each, the 8 experts dealt round robin
  (8/N per service), called as the router calls them (moe-frames, tensors through shared memory
  by default: `tensors` in the result says which); this process (the router) does gating, dispatch and combine with
  ROUTER_THREADS torch threads while the remote variants run, and gets its N threads back
  for the in-process variants. The router's work and the experts' compute hardly overlap
  (the router waits for the experts), and idle OpenMP workers of a 2-thread router spin
  while the experts compute: measured 0.45 s per remote forward with 2 router threads
  against 0.37 s with 1.

Every variant is measured in this part, interleaved (bench.timing.best_times), so the
ratios compare runs under the same machine load. fwdbwd is training forward + backward
through autograd (the remote backward sends Backward RPCs); no optimizer step on either
side. Each remote fwdbwd call begins a new step, so the services start fresh gradients
(set_to_none), like the in-process `zero_grad(set_to_none=True)`.

Before timing (this is also the warm-up), the remote outputs, input and gate gradients and
expert gradient norms (GradNorm RPCs) are compared with the in-process ones; fp32 on the
wire must agree to float rounding, or the part fails. After timing, one more call of each
fp32 variant is accounted in CPU seconds per process (/proc), to show where the remote
variant spends CPU that the in-process one does not.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.moe_layer import DIM, EXPERTS, INTER, TOKENS, TOP_K, standard_layer
from bench.stack import BenchStack
from bench.timing import best_times
from moe import MoE, expert_uid
from services.router.remote_experts import RemoteExpertGroup
from services.stack.placement import deal_experts
from subnet.expert_weights import save_expert_weights

ROUTER_THREADS = 1               # see the module docstring
WIRE_DTYPES = ("fp32", "bf16")   # the first is the `remote_moe_layer` section, the others get a suffix
CALL_TIMEOUT_S = 120.0           # never mask an expert because the shared machine is slow
# Largest |remote - in process| / max |in process| accepted per wire dtype.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of process `pid` so far, from /proc (Linux only)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            out[tid] = _stat_cpu_s(f"/proc/{pid}/task/{tid}/stat")
        except FileNotFoundError:   # the thread ended meanwhile
            continue
    return out


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of process `pid` so far, its ended threads included (/proc, Linux only)."""
    return _stat_cpu_s(f"/proc/{pid}/stat")


def _stat_cpu_s(path: str) -> float:
    """utime + stime of a /proc stat file, in seconds."""
    with open(path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def cpu_per_call(calls: dict[str, Callable[[], None]], router_pid: int, expert_pids: list[int]) -> dict[str, float]:
    """Wall seconds of one call of each variant and the CPU seconds it costs: the router (all its
    threads), the expert services (all threads), and the services' busiest threads (their compute
    threads). On 2 cores, CPU beyond the compute threads' is what the remote variant pays extra."""
    out = {}
    for name, fn in calls.items():
        pids = [router_pid, *expert_pids]
        before = {pid: thread_cpu_s(pid) for pid in pids}
        start = time.perf_counter()
        fn()
        out[f"{name}_wall_s"] = time.perf_counter() - start
        deltas = {pid: [t - before[pid].get(tid, 0.0) for tid, t in thread_cpu_s(pid).items()] for pid in pids}
        out[f"{name}_router_s"] = sum(deltas[router_pid])
        out[f"{name}_experts_s"] = sum(sum(deltas[pid]) for pid in expert_pids)
        out[f"{name}_expert_compute_threads_s"] = sum(max(deltas[pid], default=0.0) for pid in expert_pids)
    return out


def remote_twin(layer: MoE, group: RemoteExpertGroup) -> MoE:
    """A layer with `layer`'s gate (and shared experts) whose routed experts are `group`."""
    cfg = layer.cfg
    twin = MoE.from_config(cfg, experts=group)
    local = {k: v for k, v in layer.state_dict().items() if not k.startswith("experts.")}
    twin.load_state_dict(local, strict=True)
    return twin


def _expert_grad_norm(layer: MoE) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in layer.experts.parameters()
                         if p.grad is not None))


def _rel(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that over max |b|)."""
    diff = float((a - b).abs().max())
    return diff, diff / max(float(b.abs().max()), 1e-30)


def outputs_and_grads(layer: MoE, x: torch.Tensor) -> dict[str, torch.Tensor | float]:
    """What the equality check compares: forward output, and after forward+backward the input
    gradient and gate gradient (the expert gradient norm is added by the caller)."""
    with torch.no_grad():
        y, _ = layer(x)
    xg = x.clone().requires_grad_(True)
    y_train, aux = layer(xg)
    (y_train.sum() + aux).backward()
    out = {"y": y, "grad_x": xg.grad, "grad_gate": layer.gate.weight.grad.clone()}
    if isinstance(layer.experts, torch.nn.Module):
        out["expert_grad_norm"] = _expert_grad_norm(layer)
    layer.zero_grad(set_to_none=True)
    return out


def check_equal(reference: dict, remote: MoE, group: RemoteExpertGroup, x: torch.Tensor, step: int) -> dict:
    """Compare `remote` on `x` with the in-process `reference` (outputs_and_grads); raises when
    the relative difference passes TOLERANCE for the group's wire dtype or an expert was masked."""
    group.begin_step(step)
    got = outputs_and_grads(remote, x)
    if remote.last_stats.masked_experts:
        raise RuntimeError(f"remote experts {remote.last_stats.masked_experts} were masked; nothing to compare")
    got["expert_grad_norm"] = math.sqrt(group.external_grad_sq_norm())   # GradNorm RPCs: the services' gradients
    out, worst = {}, 0.0
    for key, label in (("y", "fwd"), ("grad_x", "grad_x"), ("grad_gate", "grad_gate")):
        out[f"max_abs_diff_{label}"], rel = _rel(got[key], reference[key])
        worst = max(worst, rel)
    ref_norm = reference["expert_grad_norm"]
    out["expert_grad_norm_rel_diff"] = abs(got["expert_grad_norm"] - ref_norm) / ref_norm
    out["max_rel_diff"] = max(worst, out["expert_grad_norm_rel_diff"])
    if out["max_rel_diff"] > TOLERANCE[group.wire_dtype]:
        raise RuntimeError(f"remote layer ({group.wire_dtype} on the wire) differs from the in-process layer: "
                           f"relative difference {out['max_rel_diff']:.3g} > {TOLERANCE[group.wire_dtype]:g} ({out})")
    return out


def forward_call(model: MoE, x: torch.Tensor, threads: int) -> Callable[[], None]:
    """One timed inference forward of `model` on `x` with `threads` torch threads."""
    def call():
        torch.set_num_threads(threads)
        with torch.no_grad():
            model(x)
    return call


def training_call(model: MoE, x_grad: torch.Tensor, threads: int, steps,
                  group: RemoteExpertGroup | None = None) -> Callable[[], None]:
    """One timed training forward + backward; a remote `group` begins a new step (from `steps`) first.
    A Backward the group gave up on (its expert's gradient zeroed) fails the run: a refused call
    costs nothing, so timing it would flatter the remote side."""
    def call():
        torch.set_num_threads(threads)
        given_up = 0.0 if group is None else backward_give_ups(group)
        if group is not None:
            group.begin_step(next(steps))
        y, aux = model(x_grad)
        (y.sum() + aux).backward()
        model.zero_grad(set_to_none=True)
        x_grad.grad = None
        if group is not None and backward_give_ups(group) > given_up:
            raise RuntimeError("a Backward was given up while timing (see the log); the step did not run")
    return call


def backward_give_ups(group: RemoteExpertGroup) -> float:
    return sum(sample.value for metric in group.metrics.masked_calls.collect() for sample in metric.samples
               if sample.name.endswith("_total") and sample.labels["rpc"] == "backward")


def one_session(groups) -> None:
    """Groups that take turns training the same experts are one router's work: one training session.
    Each group's own session would retire the other's on the experts (a replaced session's late
    Backward is refused), and every Backward after the first turn would be refused unrun."""
    groups = list(groups)
    for group in groups[1:]:
        group.session_id = groups[0].session_id


def run(rounds: int = 5) -> dict:
    n_threads = torch.get_num_threads()
    layer = standard_layer()
    x = torch.randn(TOKENS, DIM)   # the same input as part 1 (same seed, same order)
    deals = deal_experts([0], EXPERTS, n_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="moe-bench-weights-") as tmp, BenchStack() as stack:
            checkpoint = Path(tmp) / "experts.safetensors"
            save_expert_weights(checkpoint, {expert_uid(0, i): layer.experts[i] for i in range(EXPERTS)})
            stack.start_experts(deals, DIM, INTER, checkpoint, threads=1)
            groups = {dt: RemoteExpertGroup(0, EXPERTS, DIM, stack.replicas, wire_dtype=dt, timeout_s=CALL_TIMEOUT_S,
                                            retries=0, clients=stack.clients) for dt in WIRE_DTYPES}
            one_session(groups.values())
            remotes = {dt: remote_twin(layer, g) for dt, g in groups.items()}
            expert_pids = stack.service_pids()
            sections = _measure(layer, remotes, groups, x, deals, n_threads, rounds, expert_pids)
            tensors = tensor_transport(stack)
            for section in sections.values():
                section["tensors"] = tensors
            return sections
    finally:
        torch.set_num_threads(n_threads)


def tensor_transport(stack: BenchStack) -> str:
    """How the remote variants' tensors travel: as the router's would, through shared memory when the
    pool and the services share this host's (SHM_TRANSPORT=auto, the default), else inside the frames."""
    link = stack.clients.shm
    shared = link is not None and all(link.usable(endpoint) for endpoint in stack.endpoints)
    return "shared memory (SHM_TRANSPORT=auto)" if shared else "inside the moe-frames messages"


def _measure(layer: MoE, remotes: dict[str, MoE], groups: dict[str, RemoteExpertGroup], x: torch.Tensor,
             deals: list[list[str]], n_threads: int, rounds: int, expert_pids: list[int]) -> dict:
    steps = iter(range(1, 1 << 30))
    reference = outputs_and_grads(layer, x)   # also the warm-up of the in-process variants
    torch.set_num_threads(ROUTER_THREADS)
    checks = {dt: check_equal(reference, remote, groups[dt], x, next(steps)) for dt, remote in remotes.items()}
    torch.set_num_threads(n_threads)
    x_grad = x.clone().requires_grad_(True)
    variants = {"inproc_fwd": forward_call(layer, x, n_threads)}
    variants.update({f"remote_{dt}_fwd": forward_call(m, x, ROUTER_THREADS) for dt, m in remotes.items()})
    variants["inproc_fwdbwd"] = training_call(layer, x_grad, n_threads, steps)
    variants.update({f"remote_{dt}_fwdbwd": training_call(m, x_grad, ROUTER_THREADS, steps, groups[dt])
                     for dt, m in remotes.items()})
    times = best_times(variants, rounds=rounds, warmup=0)   # the equality checks ran every variant once
    first = f"remote_{next(iter(remotes))}"
    cpu = cpu_per_call({name: variants[name] for name in ("inproc_fwd", f"{first}_fwd", "inproc_fwdbwd",
                                                          f"{first}_fwdbwd")}, os.getpid(), expert_pids)
    torch.set_num_threads(n_threads)
    for remote in remotes.values():
        if remote.last_stats.masked_experts:
            raise RuntimeError(f"remote experts {remote.last_stats.masked_experts} were masked while timing")

    counts = layer.last_stats.expert_counts.tolist()   # the same routing on both sides
    tokens_per_process = [sum(counts[int(uid.split(".")[1])] for uid in uids) for uids in deals]
    inproc = {"fwd_tokens_per_s": TOKENS / times["inproc_fwd"], "fwdbwd_tokens_per_s": TOKENS / times["inproc_fwdbwd"],
              "fwd_s": times["inproc_fwd"], "fwdbwd_s": times["inproc_fwdbwd"], "threads": n_threads}
    sections = {}
    for i, dt in enumerate(remotes):
        f, fb = times[f"remote_{dt}_fwd"], times[f"remote_{dt}_fwdbwd"]
        sections["remote_moe_layer" if i == 0 else f"remote_moe_layer_{dt}"] = {
            "workload": {"dim": DIM, "moe_inter_dim": INTER, "n_experts": EXPERTS, "top_k": TOP_K,
                         "tokens": TOKENS, "dtype": "fp32"},
            "fwd_tokens_per_s": TOKENS / f,
            "fwdbwd_tokens_per_s": TOKENS / fb,
            "fwd_ratio": times["inproc_fwd"] / f,
            "fwdbwd_ratio": times["inproc_fwdbwd"] / fb,
            "fwd_s": f,
            "fwdbwd_s": fb,
            "experts_per_process": (len(deals[0]) if len({len(d) for d in deals}) == 1
                                    else [len(d) for d in deals]),
            "wire_dtype": dt,
            "inproc": inproc,
            "threads": {"inproc": f"1 process x {n_threads} torch threads",
                        "remote": f"{len(deals)} expert processes x 1 torch thread + router (this process) "
                                  f"x {ROUTER_THREADS} torch thread(s), set while the remote variants run and "
                                  f"reset to {n_threads} for the in-process ones"},
            "tokens_per_process": tokens_per_process,
            "equality": checks[dt],
            **({"cpu_s_per_call": cpu} if i == 0 else {}),
            "load_avg_1m": os.getloadavg()[0],
        }
    return sections
