"""An expert service crashes (SIGKILL) or hangs (SIGSTOP) while a router trains through it.

Two services host the same four experts (two replicas of each), so the router can fail over.
The workload is small on purpose (64 tokens per expert, dim 64): the throughput comparison
measures what the fault costs the router (retries, deadlines, failover), not how much compute
one service has left on two shared cores.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from moe.experts import expert_uid
from services.router.remote_experts import GRACE_S
from tests.chaos.harness import LayerTrainer, router_parts, versions
from tests.integration.test_remote_experts import wait_registered

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]  # each runs well under 60 s

LAYER, N_EXPERTS, DIM, INTER, TOKENS = 0, 4, 64, 128, 64
SERVICE_ENV = {"EXPERT_BATCH_WAIT_MS": "0"}
UIDS = [expert_uid(LAYER, i) for i in range(N_EXPERTS)]


def two_replicas(factory):
    """Two services with the same experts and the same initial weights (EXPERT_SEED)."""
    return [factory(UIDS, DIM, INTER, env=SERVICE_ENV) for _ in range(2)]


def check_versions(trainer: LayerTrainer, handle, identity, since_ns: int = 0) -> dict[str, int]:
    """The service's version of each expert equals the ApplySteps the router sent it since `since_ns`,
    and every one of them was acknowledged: none lost, none applied twice."""
    got = versions(handle.endpoint, handle.hotkey, identity)
    acked = {uid: trainer.calls("ApplyStep", endpoint=handle.endpoint, uid=uid, ok=True, since_ns=since_ns)
             for uid in UIDS}
    sent = {uid: trainer.calls("ApplyStep", endpoint=handle.endpoint, uid=uid, since_ns=since_ns) for uid in UIDS}
    assert got == acked == sent, f"{handle.endpoint}: versions {got}, acknowledged {acked}, sent {sent}"
    return got


def test_sigkill_one_of_two_replicas_mid_step(chaos_experts, chaos_redis, dev_wallets, client_identity, ledger,
                                              chaos_report):
    started = time.monotonic()
    survivor, victim = two_replicas(chaos_experts)
    # Enough steps that a few slow ones on this shared machine do not decide the ratio.
    timeout_s, steps = 3.0, 16
    parts = router_parts(chaos_redis.url, dev_wallets.router, suspect_s=2.0, timeout_s=timeout_s)
    try:
        wait_registered(parts.registry, [(survivor, range(N_EXPERTS)), (victim, range(N_EXPERTS))], LAYER)
        parts.replicas.refresh()
        trainer = LayerTrainer(parts, LAYER, N_EXPERTS, DIM, tokens=TOKENS, timeout_s=timeout_s)
        trainer.train_step()  # first calls open the channels
        healthy = trainer.steps_per_s(steps)
        assert trainer.masked() == 0
        for handle in (survivor, victim):  # both replicas share the work
            assert trainer.calls("Forward", endpoint=handle.endpoint, ok=True) > 0

        # SIGKILL after the step's Forwards, before its Backwards: the victim takes the activations
        # of the experts it served with it, so their Backward fails and they get no update this step.
        ledger.add("expert service (killed)", victim.process.pid)
        trainer.train_step(between=victim.kill)
        lost = {uid: int(parts.metrics.masked_count(LAYER, uid, "backward")) for uid in UIDS}
        assert sum(lost.values()) >= 1, "the victim served no expert in the step it was killed in"
        assert trainer.masked("forward") == 0

        # The next step finds the dead replica (a refused connection, retried on the survivor) and
        # marks it suspect; from then on the survivor takes every call: that is the degraded rate.
        trainer.train_step()
        degraded = trainer.steps_per_s(steps)
        assert trainer.masked() == sum(lost.values()), "a replica was left, yet experts were masked"
        retries = trainer.retries()

        # Restart: same port, same hotkey, fresh weights. Fork with no live gRPC connection in this
        # process (grpc/grpc#37259, see test_remote_experts); the pool reopens channels on the next call.
        parts.clients.close()
        restarted_ns = time.time_ns()
        victim.restart()
        rejoin_started = time.monotonic()
        while trainer.calls("ApplyStep", endpoint=victim.endpoint, ok=True, since_ns=restarted_ns) == 0:
            assert time.monotonic() - rejoin_started < 15.0, "the restarted replica was never used again"
            trainer.train_step()
        rejoin_s = time.monotonic() - rejoin_started
        for _ in range(3):
            trainer.train_step()
        assert trainer.masked() == sum(lost.values())

        # Every step applied exactly one update per expert, except the killed one's lost Backwards.
        for uid in UIDS:
            applied = trainer.calls("ApplyStep", uid=uid, ok=True)
            assert applied == trainer.step - lost[uid], f"{uid}: {applied} updates in {trainer.step} steps"
        survivor_versions = check_versions(trainer, survivor, client_identity)
        victim_versions = check_versions(trainer, victim, client_identity, since_ns=restarted_ns)
    finally:
        parts.close()

    ratio = degraded / healthy
    chaos_report.record(
        "sigkill_replica_mid_step", healthy_steps_per_s=healthy, degraded_steps_per_s=degraded,
        throughput_ratio=ratio, throughput_target=0.8, steps=trainer.step, backward_masked_at_kill=sum(lost.values()),
        forward_retries_to_dead_replica=retries, rejoin_s=rejoin_s, survivor_versions=survivor_versions,
        restarted_versions=victim_versions, seconds=time.monotonic() - started)
    # The goal is >= 0.8, reported above (and in the README) rather than asserted: on two shared
    # cores the survivor serves twice the calls, and the ratio is 0.80-0.94 from run to run, so a timed
    # assertion there would fail on noise. What must never happen is failover costing the step its
    # deadline (each step waiting for the dead replica): that is below 0.1, far under this floor.
    assert ratio >= 0.5, f"one of two replicas dead: {degraded:.1f} vs {healthy:.1f} steps/s ({ratio:.2f})"


def test_sigstop_one_replica_for_10_s(chaos_experts, chaos_redis, dev_wallets, client_identity, chaos_report):
    started = time.monotonic()
    survivor, victim = two_replicas(chaos_experts)
    timeout_s, hang_s, suspect_s = 1.5, 10.0, 5.0   # suspect_s: the router's default
    parts = router_parts(chaos_redis.url, dev_wallets.router, suspect_s=suspect_s, timeout_s=timeout_s)
    try:
        wait_registered(parts.registry, [(survivor, range(N_EXPERTS)), (victim, range(N_EXPERTS))], LAYER)
        parts.replicas.refresh()
        trainer = LayerTrainer(parts, LAYER, N_EXPERTS, DIM, tokens=TOKENS, timeout_s=timeout_s)
        for _ in range(4):
            trainer.train_step()
        healthy_max_s = max(trainer.step_seconds)
        healthy_rate = 4 / sum(trainer.step_seconds)
        assert trainer.masked() == 0

        # SIGSTOP mid-step: the victim holds activations for Backwards it will not answer in time.
        pid = victim.process.pid
        first_hang_step = trainer.step
        paused_at = time.monotonic()
        trainer.train_step(between=lambda: os.kill(pid, signal.SIGSTOP))
        try:
            while time.monotonic() - paused_at < hang_s:
                trainer.train_step()
        finally:
            os.kill(pid, signal.SIGCONT)
        resumed_ns = time.time_ns()
        hang_steps = trainer.step_seconds[first_hang_step:]
        masked_forward, masked_backward = trainer.masked("forward"), trainer.masked("backward")

        resumed_at = time.monotonic()
        while trainer.calls("ApplyStep", endpoint=victim.endpoint, ok=True, since_ns=resumed_ns) == 0:
            assert time.monotonic() - resumed_at < 15.0, "the resumed replica was never used again"
            trainer.train_step()
        reuse_s = time.monotonic() - resumed_at
        masked_after = trainer.masked() - masked_forward - masked_backward
        for _ in range(2):
            trainer.train_step()
        survivor_versions = check_versions(trainer, survivor, client_identity)
        victim_versions = check_versions(trainer, victim, client_identity)
    finally:
        parts.close()

    chaos_report.record(
        "sigstop_replica_10s", steps_during_hang=len(hang_steps), max_hang_step_s=max(hang_steps),
        healthy_steps_per_s=healthy_rate, hang_steps_per_s=len(hang_steps) / sum(hang_steps), suspect_s=suspect_s,
        healthy_max_step_s=healthy_max_s, deadline_s=timeout_s, masked_forward=masked_forward,
        masked_backward=masked_backward, masked_after_sigcont=masked_after, reuse_after_sigcont_s=reuse_s,
        survivor_versions=survivor_versions, paused_versions=victim_versions,
        seconds=time.monotonic() - started)
    assert masked_backward >= 1  # the Backwards caught by the SIGSTOP were given up, not waited for
    # At most one deadline per step: a hung Forward is masked (no Backward follows), a hung Backward
    # comes after Forwards that were answered; GradNorm and ApplyStep go only to replicas that answered.
    bound_s = timeout_s + GRACE_S + healthy_max_s + 1.0
    assert max(hang_steps) <= bound_s, f"a step waited {max(hang_steps):.2f} s for a hung service"
    assert len(hang_steps) >= 3
