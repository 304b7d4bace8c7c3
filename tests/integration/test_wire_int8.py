"""Training through a real expert service with the int8 wire: activations and gradients in 8 bits.

The router side is RemoteExpertGroup(wire_dtype="int8"): inputs and grad_outputs go out in int8
and the service answers outputs and grad_inputs in the request's dtype, int8 too. A few training
steps must follow the in-process fp32 reference (LocalExperts + AdamW) within the quantization
error, and the steps must really have moved the weights.
"""

from __future__ import annotations

import pytest
import torch

from moe.boundary import LocalExperts, OptimizerSettings
from moe.experts import expert_uid
from services.router.metrics import RouterMetrics
from services.router.remote_experts import RemoteExpertGroup
from services.router.replicas import ReplicaSet
from subnet.expert_client import ExpertClientPool
from subnet.expert_weights import save_expert_weights
from tests.integration.one_service import OneService

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

LAYER, DIM, INTER, N_EXPERTS = 9, 64, 128, 3
STEPS, LR = 3, 1e-3
SETTINGS = OptimizerSettings()
UIDS = [expert_uid(LAYER, i) for i in range(N_EXPERTS)]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_int8_wire_trains_like_fp32_in_process(expert_service_factory, client_identity, tmp_path):
    torch.manual_seed(0)
    local = LocalExperts(N_EXPERTS, DIM, INTER)
    ckpt = tmp_path / "experts.safetensors"
    save_expert_weights(ckpt, {expert_uid(LAYER, i): local[i] for i in range(N_EXPERTS)})
    service = expert_service_factory([expert_uid(LAYER, i) for i in range(N_EXPERTS)], DIM, INTER,
                                     env={"EXPERT_CHECKPOINT": str(ckpt), "EXPERT_WIRE_DTYPES": "fp32,int8",
                                          "EXPERT_BATCH_WAIT_MS": "0", "REDIS_URL": ""})
    replicas = ReplicaSet(OneService(service.endpoint, service.hotkey, UIDS))
    clients = ExpertClientPool(identity=client_identity, hotkeys=replicas.hotkey)
    int8 = RemoteExpertGroup(LAYER, N_EXPERTS, DIM, replicas, wire_dtype="int8", timeout_s=10.0,
                             metrics=RouterMetrics(), clients=clients)
    fp32 = RemoteExpertGroup(LAYER, N_EXPERTS, DIM, replicas, wire_dtype="fp32", timeout_s=10.0,
                             metrics=RouterMetrics(), clients=clients)   # reads the weights exactly
    optimizer = torch.optim.AdamW(local.parameters(), lr=LR, betas=(SETTINGS.beta1, SETTINGS.beta2),
                                  eps=SETTINGS.eps, weight_decay=SETTINGS.weight_decay)
    gen = torch.Generator().manual_seed(1)
    probe = {i: torch.randn(16, DIM, generator=gen) for i in range(N_EXPERTS)}
    with torch.no_grad():
        before = local.run(probe)
    try:
        for step in range(STEPS):
            xs = {i: torch.randn(12 + i, DIM, generator=gen) for i in range(N_EXPERTS)}
            w = {i: torch.randn(12 + i, DIM, generator=gen) for i in range(N_EXPERTS)}   # = grad_outputs
            int8.begin_step(step)
            got, got_grads = train_pass(int8, xs, w)
            optimizer.zero_grad()
            want, want_grads = train_pass(local, xs, w)
            for i in range(N_EXPERTS):
                assert got[i] is not None and not torch.equal(got[i], want[i])   # really 8 bits
                assert rel_err(got[i], want[i]) < 2e-2     # ~1% expected: inputs and outputs quantized
                assert rel_err(got_grads[i], want_grads[i]) < 3e-2   # grad_outputs and grad_inputs too
            local_sq = sum(float(p.grad.square().sum()) for p in local.parameters())
            assert int8.external_grad_sq_norm() == pytest.approx(local_sq, rel=1e-2)
            int8.apply_external_step(LR, 1.0, SETTINGS)
            optimizer.step()

        with torch.no_grad():
            after_remote, after_local = fp32.run(probe), local.run(probe)
        for i in range(N_EXPERTS):
            moved = (after_local[i] - before[i]).norm()
            assert moved > 1e-2 * before[i].norm()                         # the steps did something
            assert (after_remote[i] - after_local[i]).norm() < 0.1 * moved  # and int8 did nearly the same
    finally:
        clients.close()


def train_pass(experts, xs, weights):
    """Forward + backward of sum(out * w) through `experts`; returns (outputs, input grads)."""
    leaves = {i: x.clone().requires_grad_() for i, x in xs.items()}
    outs = experts.run(leaves)
    sum((outs[i] * weights[i]).sum() for i in outs).backward()
    return {i: o.detach() for i, o in outs.items()}, {i: leaves[i].grad for i in leaves}
