"""Asynchronous Backwards are bounded in staleness on a real expert service (EXPERT_MAX_STALENESS).

Three training Forwards go first, then their Backwards with `apply_now`, so the k-th Backward comes
k updates after its Forward (as when several routers train one expert). With EXPERT_MAX_STALENESS=0
only the first updates; the others answer their input gradients, leave the version where it is and
are counted in expert_stale_updates_total. Then the same through two routers' asynchronous layers.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from moe.boundary import OptimizerSettings
from services.router.remote_experts import RemoteExpertGroup
from services.router.replicas import ReplicaSet
from subnet.expert_client import ExpertClientPool
from subnet.tensor_codec import decode, encode
from subnet.wire.v1 import expert_pb2
from tests.integration.one_service import OneService
from tests.integration.test_expert_service import _metrics as service_metrics
from tests.integration.test_hostile_battery import Caller, apply_now

pytestmark = pytest.mark.integration
DIM, INTER = 16, 32


@pytest.fixture
def service(expert_service_factory):
    return expert_service_factory(["0.0"], DIM, INTER, env={"EXPERT_MAX_STALENESS": "0", "EXPERT_BATCH_WAIT_MS": "0",
                                                            "REDIS_URL": ""})


def stale_updates(service) -> float:
    return service_metrics(service).get(("expert_stale_updates_total", (("expert", "0.0"),)), 0.0)


def test_backwards_later_than_max_staleness_answer_but_do_not_update(service, client_identity):
    call = Caller(service, client_identity)
    try:
        gen = torch.Generator().manual_seed(0)
        for k in range(3):
            forward = expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(torch.randn(4, DIM, generator=gen)),
                                                call_id=f"c{k}", training=True)
            code, details, _ = call("Forward", forward)
            assert code == grpc.StatusCode.OK, details
        versions, grads = [], []
        for k in range(3):
            backward = expert_pb2.BackwardRequest(expert_uid="0.0", call_id=f"c{k}", step=0, session_id="async",
                                                  grad_outputs=encode(torch.randn(4, DIM, generator=gen)),
                                                  apply_now=apply_now())
            code, details, reply = call("Backward", backward)
            assert code == grpc.StatusCode.OK, details
            answer = expert_pb2.BackwardResponse.FromString(reply)
            versions.append(answer.version)
            grads.append(decode(answer.grad_inputs))
        assert versions == [1, 1, 1]   # the first one updated; the two later ones came 1 update late
        assert all(g.shape == (4, DIM) and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0 for g in grads)
        assert stale_updates(service) == 2
    finally:
        call.channel.close()


def _router(service, client_identity) -> RemoteExpertGroup:
    """One router's asynchronous layer over `service` (its own session, channels and metrics)."""
    replicas = ReplicaSet(OneService(service.endpoint, service.hotkey, ["0.0"]))
    clients = ExpertClientPool(identity=client_identity, hotkeys=replicas.hotkey)
    group = RemoteExpertGroup(0, 1, DIM, replicas, timeout_s=10.0, clients=clients, apply_on_backward=True)
    group.begin_step(0)
    group.step_settings(1e-2, OptimizerSettings(), grad_clip=1.0)
    return group


def _version(group: RemoteExpertGroup) -> int:
    endpoint = group.replicas.replicas("0.0")[0].endpoint
    return next(e.version for e in group.clients.get(endpoint).info(timeout_s=10).experts if e.uid == "0.0")


def test_two_routers_training_one_expert_asynchronously_meet_the_bound(service, client_identity):
    """Delayed gradients end to end: router A's Forward, then router B's whole Forward and Backward
    (one update), then A's Backward, one update late. With EXPERT_MAX_STALENESS=0 that update is
    skipped; A's trunk still gets its input gradient."""
    a, b = _router(service, client_identity), _router(service, client_identity)
    try:
        gen = torch.Generator().manual_seed(1)
        leaf_a = torch.randn(4, DIM, generator=gen).requires_grad_()
        out_a = a.run({0: leaf_a})[0]
        leaf_b = torch.randn(4, DIM, generator=gen).requires_grad_()
        (b.run({0: leaf_b})[0] * torch.randn(4, DIM, generator=gen)).sum().backward()
        assert _version(b) == 1 and stale_updates(service) == 0
        (out_a * torch.randn(4, DIM, generator=gen)).sum().backward()
        assert _version(a) == 1 and stale_updates(service) == 1
        assert leaf_a.grad is not None and float(leaf_a.grad.abs().sum()) > 0
        assert leaf_b.grad is not None and float(leaf_b.grad.abs().sum()) > 0
    finally:
        a.clients.close()
        b.clients.close()
