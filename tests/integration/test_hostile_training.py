"""Training edge cases through a real expert service and RemoteExpertGroup:

- a replica whose gradients are not finite is left out of the global norm and skips its step
  explicitly (ApplyStep skip=true), so the others' step goes on: its weights and version do not
  move, a late Backward for it is refused, the next step trains as usual; an ApplyStep without
  skip on such gradients is refused (the old "clip factor 0 = no clipping");
- with an fp16 activation wire, gradients travel as bf16, so a gradient at the 1e-8 scale
  (below fp16's range) comes back instead of underflowing to zero.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from moe.boundary import LocalExperts, OptimizerSettings
from moe.experts import expert_uid
from services.router.metrics import RouterMetrics
from services.router.remote_experts import RemoteExpertGroup
from services.router.replicas import ReplicaSet
from subnet.auth import SigningChannel
from subnet.expert_client import ExpertClientPool
from subnet.expert_weights import save_expert_weights
from subnet.tensor_codec import encode
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc
from tests.integration.one_service import OneService

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

LAYER, DIM, INTER, N_EXPERTS = 11, 32, 64, 2
WIRE_LAYER = 12   # the fp16 test's experts: the same weights, never trained by the other tests
UIDS = [expert_uid(layer, i) for layer in (LAYER, WIRE_LAYER) for i in range(N_EXPERTS)]
SETTINGS = OptimizerSettings()


def huge_batch(gen, tokens=256):
    """(inputs, grad_outputs) whose expert parameter gradients overflow fp32 while the outputs and
    input gradients stay finite: one row of size 3e18 repeated, so the per-token terms (~1e37) add
    up coherently in x^T da, summed over tokens, and nowhere else."""
    x, g = torch.randn(1, DIM, generator=gen) * 3e18, torch.randn(1, DIM, generator=gen)
    return x.repeat(tokens, 1), g.repeat(tokens, 1)
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def setup(expert_service_module_factory, client_identity, tmp_path_factory):
    torch.manual_seed(0)
    local = LocalExperts(N_EXPERTS, DIM, INTER)
    ckpt = tmp_path_factory.mktemp("hostile-training") / "experts.safetensors"
    save_expert_weights(ckpt, {uid: local[int(uid.split(".")[1])] for uid in UIDS})
    service = expert_service_module_factory(UIDS, DIM, INTER,
                                            env={"EXPERT_CHECKPOINT": str(ckpt), "EXPERT_BATCH_WAIT_MS": "0",
                                                 "REDIS_URL": ""})
    replicas = ReplicaSet(OneService(service.endpoint, service.hotkey, UIDS))
    clients = ExpertClientPool(identity=client_identity, hotkeys=replicas.hotkey)
    yield local, service, replicas, clients
    clients.close()


def group(setup, wire_dtype="fp32", layer=LAYER):
    _, _, replicas, clients = setup
    return RemoteExpertGroup(layer, N_EXPERTS, DIM, replicas, wire_dtype=wire_dtype, timeout_s=10.0,
                             metrics=RouterMetrics(), clients=clients)


def train_pass(experts, xs, weights):
    """Forward + backward of sum(out * w) through `experts`; returns (outputs, input grads)."""
    leaves = {i: x.clone().requires_grad_() for i, x in xs.items()}
    outs = experts.run(leaves)
    sum((outs[i] * weights[i]).sum() for i in outs).backward()
    return {i: o.detach() for i, o in outs.items()}, {i: leaves[i].grad for i in leaves}


def versions(service, clients) -> dict[str, int]:
    return {e.uid: e.version for e in clients.get(service.endpoint).info(timeout_s=10).experts
            if e.uid.startswith(f"{LAYER}.")}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_a_non_finite_step_is_skipped_by_the_experts_and_the_next_one_trains(setup):
    _, service, _, clients = setup
    experts = group(setup)
    gen = torch.Generator().manual_seed(1)
    probe = {i: torch.randn(8, DIM, generator=gen) for i in range(N_EXPERTS)}
    with torch.no_grad():
        before = experts.run(probe)
    v0 = versions(service, clients)

    # Step 0: huge but finite activations; outputs and input gradients stay finite, the experts'
    # parameter gradients (x^T da, summed over tokens) overflow to Inf.
    experts.begin_step(0)
    batches = {i: huge_batch(gen) for i in range(N_EXPERTS)}
    _, grads = train_pass(experts, {i: b[0] for i, b in batches.items()}, {i: b[1] for i, b in batches.items()})
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())   # Backward answered
    # Their Inf norms are left out of the global one (finite: the trunk's step is not held up) ...
    assert experts.external_grad_sq_norm() == 0.0
    experts.apply_external_step(1e-2, 1.0, SETTINGS)   # ... and these replicas skip their own step
    assert versions(service, clients) == v0
    with torch.no_grad():
        after = experts.run(probe)
    for i in range(N_EXPERTS):
        assert torch.equal(after[i], before[i]), "a skipped step changed the weights"

    # Step 1 trains as usual, from the untouched weights.
    experts.begin_step(1)
    train_pass(experts, {i: torch.randn(6, DIM, generator=gen) for i in range(N_EXPERTS)},
               {i: torch.randn(6, DIM, generator=gen) for i in range(N_EXPERTS)})
    assert 0 < experts.external_grad_sq_norm() < float("inf")
    experts.apply_external_step(1e-2, 1.0, SETTINGS)
    assert versions(service, clients) == {uid: v + 1 for uid, v in v0.items()}
    with torch.no_grad():
        moved = experts.run(probe)
    assert all(not torch.equal(moved[i], before[i]) for i in range(N_EXPERTS))


def _stub(setup):
    _, service, _, clients = setup
    channel = grpc.insecure_channel(service.endpoint)
    return channel, expert_pb2_grpc.ExpertStub(SigningChannel(channel, clients.identity, service.hotkey))


def test_skip_on_the_wire_and_inf_gradients_are_never_applied(setup):
    uid = expert_uid(LAYER, 0)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, DIM, generator=gen)
    huge_x, g = huge_batch(gen)
    channel, stub = _stub(setup)
    try:
        def accumulate(step, call_id):   # Inf parameter gradients (see huge_batch)
            stub.Forward(expert_pb2.ForwardRequest(expert_uid=uid, inputs=encode(huge_x), call_id=call_id,
                                                   step=step, training=True), timeout=10)
            stub.Backward(expert_pb2.BackwardRequest(expert_uid=uid, call_id=call_id, step=step, session_id="wire",
                                                     grad_outputs=encode(g)), timeout=10)

        def forward():
            return stub.Forward(expert_pb2.ForwardRequest(expert_uid=uid, inputs=encode(x)), timeout=10).outputs.data

        before = forward()
        version = stub.Info(expert_pb2.InfoRequest(), timeout=10).experts[0].version
        # Inf gradients with the old "grad_scale 0" (what an Inf norm made the clip factor): refused.
        accumulate(100, "inf-a")
        norm = stub.GradNorm(expert_pb2.GradNormRequest(expert_uid=uid, step=100, session_id="wire"), timeout=10)
        assert norm.sq_norm == float("inf") and norm.backward_calls == 1
        with pytest.raises(grpc.RpcError) as info:
            stub.ApplyStep(expert_pb2.ApplyStepRequest(expert_uid=uid, step=100, lr=0.1, grad_scale=0.0, eps=1e-8,
                                                       session_id="wire"), timeout=10)
        assert info.value.code() == Code.FAILED_PRECONDITION and "not finite" in info.value.details()
        assert forward() == before

        # skip=true: the hyperparameters are ignored (even NaN), nothing moves, a late Backward is refused.
        accumulate(101, "inf-b")
        reply = stub.ApplyStep(expert_pb2.ApplyStepRequest(expert_uid=uid, step=101, lr=float("nan"), skip=True,
                                                           session_id="wire"), timeout=10)
        assert reply.version == version
        assert forward() == before
        assert stub.GradNorm(expert_pb2.GradNormRequest(expert_uid=uid, step=101, session_id="wire"),
                             timeout=10).backward_calls == 0
        with pytest.raises(grpc.RpcError) as info:
            stub.Backward(expert_pb2.BackwardRequest(expert_uid=uid, call_id="late", step=101, session_id="wire",
                                                     grad_outputs=encode(torch.ones(4, DIM)), inputs=encode(x)),
                          timeout=10)
        assert info.value.code() == Code.FAILED_PRECONDITION and "skipped" in info.value.details()
    finally:
        channel.close()


def test_fp16_wire_carries_gradients_at_the_1e_8_scale(setup):
    """fp16's smallest subnormal is 6e-8: sent as fp16, these gradients would be (mostly) zero."""
    local = setup[0]
    experts = group(setup, wire_dtype="fp16", layer=WIRE_LAYER)
    gen = torch.Generator().manual_seed(3)
    xs = {i: torch.randn(10, DIM, generator=gen) for i in range(N_EXPERTS)}
    w = {i: torch.randn(10, DIM, generator=gen) * 1e-8 for i in range(N_EXPERTS)}
    experts.begin_step(0)
    _, got = train_pass(experts, xs, w)
    for p in local.parameters():
        p.grad = None
    _, want = train_pass(local, xs, w)
    for i in range(N_EXPERTS):
        assert want[i].abs().max() < 6e-8                      # really below fp16's range
        assert rel_err(got[i], want[i]) < 2e-2, f"expert {i}: gradient lost on the wire"
    local_sq = sum(float(p.grad.double().square().sum()) for p in local.parameters())
    assert experts.external_grad_sq_norm() == pytest.approx(local_sq, rel=2e-2)
