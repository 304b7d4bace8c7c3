"""The router process is SIGKILLed mid-step and started again from its last checkpoint.

The router here is the real one, `python -m services.router train`, as a subprocess (the
in-process variant, a RemoteExpertGroup abandoned mid-step, is test_remote_experts'
test_restarted_router_session_trains_the_experts_again). One expert service hosts the 8 experts
of the `tiny` preset (one corpus domain, to keep evaluations short) and delays every
Forward/Backward by 250 ms, which opens a window of at least that long in which the kill lands
mid-step: after layer 1's Backward (its experts hold gradients of the router's session) and
before the step's ApplySteps.

The restart (`train --init <run dir>`) loads the trunk of the newest checkpoint and starts a new
session at step 0; the experts must accept it (a new session drops the dead one's gradients,
services/expert/backend.py) and training must go on from where the checkpoint left it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moe.data import CorpusConfig
from moe.train import TrainConfig
from moe.train.checkpoint import read_config, resolve_checkpoint
from services.router.train import prepare_initial_checkpoint
from subnet.processes import die_with_parent
from tests.chaos.harness import versions, wait_until
from tests.integration.conftest import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]  # each runs well under 60 s

STEPS, EVAL_EVERY = 3, 2   # killed in the third step, after the checkpoint of step 2
DELAY_MS = 250


def scrape(url: str) -> dict[tuple[str, str, str], float]:
    """{(sample name, expert, rpc): value} of an expert service's Prometheus metrics."""
    with urllib.request.urlopen(url, timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, s.labels.get("expert", ""), s.labels.get("rpc", "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def backward_tokens(metrics: dict, layer: int) -> float:
    return sum(v for (name, expert, rpc), v in metrics.items()
               if name == "expert_tokens_total" and rpc == "Backward" and expert.startswith(f"{layer}."))


def expert_versions(metrics: dict) -> dict[str, int]:
    return {expert: int(v) for (name, expert, _), v in metrics.items() if name == "expert_version"}


def start_router(init: Path, out: Path, redis_url: str, wallet, ledger) -> subprocess.Popen:
    env = {**os.environ, "REDIS_URL": redis_url, "WALLET_PATH": wallet.path, "WALLET_NAME": wallet.name,
           "WALLET_HOTKEY": wallet.hotkey, "ROUTER_THREADS": "1", "ROUTER_REGISTRY_REFRESH_S": "0.5",
           "ROUTER_EXPERT_TIMEOUT_S": "10", "PYTHONUNBUFFERED": "1"}
    with open(out.parent / f"{out.name}.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "services.router", "train", "--init", str(init), "--out", str(out), "--quiet"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent)  # noqa: PLW1509 - the kernel reaps it if pytest dies
    ledger.add(f"router {out.name}", process.pid)
    return process


def rows(run: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_router_sigkilled_mid_step_resumes_from_its_checkpoint(chaos_experts, chaos_redis, dev_wallets,
                                                               client_identity, ledger, tmp_path, chaos_report):
    started = time.monotonic()
    train_cfg = TrainConfig(steps=STEPS, batch_size=8, lr=3e-3, warmup_steps=1, eval_every=EVAL_EVERY,
                            eval_batches=1)
    corpus_cfg = CorpusConfig(vocab_size=512, max_bytes_per_domain=100_000, domains=("prose",),
                              cache_dir=str(tmp_path / "cache"))
    init, experts, lm_cfg = prepare_initial_checkpoint(tmp_path / "init", "tiny", train_cfg, corpus_cfg)
    uids = [f"{layer}.{i}" for layer in lm_cfg.moe_layers() for i in range(lm_cfg.n_experts)]
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    # The router starts first (it waits for the experts to register): both start-ups overlap.
    router = start_router(init, run1, chaos_redis.url, dev_wallets.router, ledger)
    try:
        service = chaos_experts(uids, lm_cfg.dim, lm_cfg.moe_inter_dim,
                                env={"EXPERT_CHECKPOINT": str(experts), "EXPERT_INJECT_DELAY_MS": str(DELAY_MS)})
        # Two steps applied (and the checkpoint of step 2 written before the third begins) ...
        wait_until(lambda: router.poll() is None and set(expert_versions(scrape(service.metrics_url)).values()) == {2},
                   45.0, poll_s=0.05, what="two steps applied")
        at_two = scrape(service.metrics_url)
        # ... then layer 1's Backward of the third step has run: kill before the ApplySteps.
        wait_until(lambda: backward_tokens(scrape(service.metrics_url), 1) > backward_tokens(at_two, 1),
                   20.0, poll_s=0.01, what="layer 1's Backward of the third step")
        router.kill()
        killed_at = time.monotonic()
    finally:
        router.kill()
        router.wait()
    after_kill = scrape(service.metrics_url)
    assert set(expert_versions(after_kill).values()) == {2}, "the kill came after an ApplyStep"
    pending = {layer: backward_tokens(after_kill, layer) - backward_tokens(at_two, layer) for layer in (0, 1)}
    assert pending[1] > 0  # the dead session's gradients wait in layer 1's experts (and perhaps layer 0's)
    assert read_config(resolve_checkpoint(run1))["step"] == 2  # the newest checkpoint: what the restart loads

    router = start_router(run1, run2, chaos_redis.url, dev_wallets.router, ledger)
    try:
        code = router.wait(timeout=50)
    finally:
        router.kill()
        router.wait()
    restart_s = time.monotonic() - killed_at
    log = (tmp_path / "run2.log").read_text(errors="replace")
    assert code == 0, f"the restarted router failed ({code}):\n{log[-3000:]}"

    before, after = rows(run1), rows(run2)
    final = versions(service.endpoint, service.hotkey, client_identity)
    chaos_report.record(
        "router_sigkill_mid_step", val_loss_init=before[0]["val_loss"], val_loss_at_checkpoint=before[2]["val_loss"],
        val_loss_after_restart=after[0]["val_loss"], val_loss_final=after[STEPS]["val_loss"],
        dead_session_backward_tokens={str(k): int(v) for k, v in pending.items()},
        masked_after_restart=sum(r["masked_calls"] for r in after.values()), steps_after_restart=STEPS,
        versions=final, kill_to_restarted_run_done_s=restart_s, seconds=time.monotonic() - started)
    # The restart starts from the checkpoint (and from the experts as they were then: the dead session's
    # gradients were not applied), not from the initial weights.
    assert after[0]["val_loss"] == pytest.approx(before[2]["val_loss"], rel=1e-5)
    assert after[0]["val_loss"] != pytest.approx(before[0]["val_loss"], rel=1e-3)
    # The experts took the new session: nothing masked, and every step applied once to every expert.
    assert all(r["masked_calls"] == 0 for r in after.values())
    assert final == {uid: 2 + STEPS for uid in uids}
