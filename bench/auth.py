"""Part 2d: what request signing costs the remote MoE layer: AUTH_MODE=on against off, same run.

    python -m bench --only auth

Part 2a's workload and thread layout (bench/remote_layer.py): the standard layer, its 8
experts dealt over N expert services with 1 torch thread each, the router (this process)
on ROUTER_THREADS. Two stacks run side by side: one with auth on (every Forward/Backward
signed by this process's dev hotkey and verified by the services, nonces in memory), one
with AUTH_MODE=off. Their fwd and fwd+bwd calls are interleaved (bench.timing.best_times),
so both see the same machine load; `fwd_ratio` = tokens/s with auth / tokens/s without
(target >= 0.95). Both are first checked against the in-process layer (fp32, 1e-4).

`costs` times the pieces alone on this machine: one sr25519 sign and verify (of a payload,
which has a fixed size), sha256 of a 4 MiB body, and the receiver's whole check of a signed
4 MiB request (parse metadata, hash, verify, nonce, allow-list).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch

from bench.moe_layer import DIM, EXPERTS, INTER, TOKENS, standard_layer
from bench.remote_layer import (
    CALL_TIMEOUT_S,
    ROUTER_THREADS,
    check_equal,
    forward_call,
    outputs_and_grads,
    remote_twin,
    training_call,
)
from bench.stack import BenchStack
from bench.timing import best_times
from moe import expert_uid
from services.router.remote_experts import RemoteExpertGroup
from services.stack.placement import deal_experts
from subnet.auth import AllowList, MemoryNonceStore, Verifier, sign_metadata, signing_payload
from subnet.auth.payload import body_digest
from subnet.expert_weights import save_expert_weights
from subnet.identity import Identity, verify_signature

TARGET_RATIO = 0.95
VARIANTS = {"auth_on": True, "auth_off": False}


def _per_call_us(fn, n: int) -> float:
    """Best of 5 batches of `n` calls, in microseconds per call (the machine is shared and noisy)."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - start) / n)
    return best * 1e6


def costs() -> dict[str, float]:
    caller, receiver = Identity.generate(), Identity.generate()
    method = "/moe.v1.Expert/Forward"
    body = os.urandom(4 << 20)
    payload = signing_payload(method, body_digest(body), "0" * 32, 1, receiver.hotkey)
    signature = caller.sign(payload)
    verifier = Verifier(receiver.hotkey, AllowList([caller.hotkey]), MemoryNonceStore(20.0))
    requests = iter([sign_metadata(caller, method, body, receiver.hotkey) for _ in range(25)])
    return {
        "sign_us": _per_call_us(lambda: caller.sign(payload), 200),
        "verify_us": _per_call_us(lambda: verify_signature(caller.hotkey, payload, signature), 200),
        "sha256_4MiB_ms": _per_call_us(lambda: body_digest(body), 5) / 1e3,
        "client_sign_4MiB_request_ms": _per_call_us(lambda: sign_metadata(caller, method, body, receiver.hotkey),
                                                    5) / 1e3,
        # Each timed check gets its own signed request (a new nonce): a replay is refused early.
        "server_check_4MiB_request_ms": _per_call_us(lambda: verifier.verify(method, body, next(requests)), 5) / 1e3,
    }


def run(rounds: int = 5) -> dict:
    n_threads = torch.get_num_threads()
    layer = standard_layer()
    x = torch.randn(TOKENS, DIM)
    deals = deal_experts([0], EXPERTS, n_threads)
    try:
        with tempfile.TemporaryDirectory(prefix="moe-bench-weights-") as tmp, ExitStack() as exits:
            checkpoint = Path(tmp) / "experts.safetensors"
            save_expert_weights(checkpoint, {expert_uid(0, i): layer.experts[i] for i in range(EXPERTS)})
            stacks = {name: exits.enter_context(BenchStack(auth=auth)) for name, auth in VARIANTS.items()}
            for stack in stacks.values():     # both sets of services start side by side
                stack.spawn_experts(deals, DIM, INTER, checkpoint, threads=1)
            groups = {}
            for name, stack in stacks.items():
                stack.wait_experts()
                groups[name] = RemoteExpertGroup(0, EXPERTS, DIM, stack.replicas, wire_dtype="fp32",
                                                 timeout_s=CALL_TIMEOUT_S, retries=0, clients=stack.clients)
            return _measure(layer, groups, x, rounds, n_threads, len(deals))
    finally:
        torch.set_num_threads(n_threads)


def _measure(layer, groups: dict[str, RemoteExpertGroup], x: torch.Tensor, rounds: int, n_threads: int,
             n_services: int) -> dict:
    steps = itertools.count(1)
    reference = outputs_and_grads(layer, x)
    torch.set_num_threads(ROUTER_THREADS)
    remotes = {name: remote_twin(layer, group) for name, group in groups.items()}
    # Also the warm-up: every variant has run once, and the signed one agrees with the layer.
    checks = {name: check_equal(reference, remotes[name], groups[name], x, next(steps)) for name in remotes}
    x_grad = x.clone().requires_grad_(True)
    variants = {}
    for name, model in remotes.items():
        variants[f"{name}_fwd"] = forward_call(model, x, ROUTER_THREADS)
        variants[f"{name}_fwdbwd"] = training_call(model, x_grad, ROUTER_THREADS, steps, groups[name])
    times = best_times(variants, rounds=rounds, warmup=0)
    torch.set_num_threads(n_threads)
    for name, model in remotes.items():
        if model.last_stats.masked_experts:
            raise RuntimeError(f"{name}: experts {model.last_stats.masked_experts} were masked while timing")

    counts = layer.last_stats.expert_counts.tolist()
    out = {"workload": {"dim": DIM, "moe_inter_dim": INTER, "n_experts": EXPERTS, "tokens": TOKENS,
                        "wire_dtype": "fp32", "signed_forwards_per_call": sum(1 for c in counts if c),
                        "mean_request_mib": sum(counts) * DIM * 4 / max(1, sum(1 for c in counts if c)) / 2**20}}
    for mode in ("fwd", "fwdbwd"):
        on, off = times[f"auth_on_{mode}"], times[f"auth_off_{mode}"]
        out[f"{mode}_tokens_per_s_auth_on"] = TOKENS / on
        out[f"{mode}_tokens_per_s_auth_off"] = TOKENS / off
        out[f"{mode}_ratio"] = off / on
    out["target_ratio"] = TARGET_RATIO
    out["costs"] = costs()
    out["threads"] = {"router": ROUTER_THREADS, "expert_services_per_variant": n_services,
                      "threads_per_service": 1}
    out["equality_max_rel_diff"] = {name: check["max_rel_diff"] for name, check in checks.items()}
    out["load_avg_1m"] = os.getloadavg()[0]
    return out
