"""The end of a training step survives a lost request: GradNorm and ApplyStep are sent again.

Both go to the one replica that holds the step's gradients, over gRPC. Here that replica is a real
expert service behind a TCP forwarder (tests/integration/cutting_proxy.py) that loses one request
the way a broken path does: the connection is reset, the service never sees the request, the
router gets UNAVAILABLE. Before these calls were retried, a lost ApplyStep left the replica a step
behind for good, and a lost GradNorm made it skip the step. Now the call goes again (waiting for
the channel to reconnect) and the step is applied exactly once.
"""

from __future__ import annotations

import pytest
import torch

from moe.boundary import OptimizerSettings
from moe.experts import expert_uid
from services.router.metrics import RouterMetrics
from services.router.remote_experts import RemoteExpertGroup
from services.router.replicas import ReplicaSet
from subnet.expert_client import ExpertClientPool
from tests.integration.counter_totals import counter_total
from tests.integration.cutting_proxy import CuttingProxy
from tests.integration.one_service import OneService

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

LAYER, DIM, INTER, N_EXPERTS = 0, 32, 64, 2
UIDS = [expert_uid(LAYER, i) for i in range(N_EXPERTS)]


@pytest.fixture
def behind_proxy(expert_service_factory, client_identity):
    service = expert_service_factory(UIDS, DIM, INTER, env={"EXPERT_BATCH_WAIT_MS": "0", "REDIS_URL": ""})
    with CuttingProxy(("127.0.0.1", service.port)) as proxy:
        replicas = ReplicaSet(OneService(proxy.endpoint, service.hotkey, UIDS))
        clients = ExpertClientPool(identity=client_identity, hotkeys=replicas.hotkey)
        metrics = RouterMetrics()
        # Two retries: the lost request is gone for good, yet on a loaded machine a retry can still be
        # picked onto the connection being reset (the router pauses first, RETRY_PAUSE_S, which makes
        # that rare; a CI run once hit it with one retry). The tests are about the request being sent
        # again and applied once, so they allow that second chance.
        group = RemoteExpertGroup(LAYER, N_EXPERTS, DIM, replicas, timeout_s=10.0, retries=2, metrics=metrics,
                                  clients=clients)
        try:
            yield group, proxy, clients, metrics
        finally:
            clients.close()


def train(group: RemoteExpertGroup, step: int) -> None:
    """Forward + backward of one step: the service then holds gradients of (session, step)."""
    group.begin_step(step)
    gen = torch.Generator().manual_seed(step)
    leaves = {i: torch.randn(8, DIM, generator=gen).requires_grad_() for i in range(N_EXPERTS)}
    outs = group.run(leaves)
    sum((outs[i] * torch.randn(8, DIM, generator=gen)).sum() for i in outs).backward()


def versions(group: RemoteExpertGroup, clients: ExpertClientPool) -> dict[str, int]:
    endpoint = group.replicas.replicas(UIDS[0])[0].endpoint
    return {e.uid: e.version for e in clients.get(endpoint).info(timeout_s=10).experts}


def counted(metric, rpc: str) -> int:
    return int(counter_total(metric, rpc=rpc))


def test_a_lost_apply_step_is_sent_again_and_applied_once(behind_proxy):
    group, proxy, clients, metrics = behind_proxy
    train(group, 0)
    assert group.external_grad_sq_norm() > 0
    before = versions(group, clients)
    proxy.cut_next()
    group.apply_external_step(1e-2, 1.0, OptimizerSettings())
    assert proxy.cuts == 1
    assert versions(group, clients) == {uid: v + 1 for uid, v in before.items()}
    assert counted(metrics.expert_retries, "applystep") >= 1
    assert counted(metrics.masked_calls, "applystep") == 0
    # The next step trains on from there: nothing of step 0 is left behind on the service.
    train(group, 1)
    assert group.external_grad_sq_norm() > 0
    group.apply_external_step(1e-2, 1.0, OptimizerSettings())
    assert versions(group, clients) == {uid: v + 2 for uid, v in before.items()}


def test_a_lost_grad_norm_is_sent_again_and_the_step_is_not_skipped(behind_proxy):
    group, proxy, clients, metrics = behind_proxy
    train(group, 0)
    before = versions(group, clients)
    proxy.cut_next()
    norm = group.external_grad_sq_norm()
    assert proxy.cuts == 1
    assert norm > 0 and norm == group.external_grad_sq_norm()   # the same norm as asked without a fault
    assert counted(metrics.expert_retries, "gradnorm") >= 1
    assert counted(metrics.masked_calls, "gradnorm") == 0
    group.apply_external_step(1e-2, 1.0, OptimizerSettings())   # not a skip: every replica had its norm
    assert versions(group, clients) == {uid: v + 1 for uid, v in before.items()}


def test_a_call_lost_on_every_attempt_is_given_up_and_the_replica_skips(behind_proxy):
    """Retries are bounded: with the request lost on both attempts, GradNorm is given up, that replica
    is left out of the norm and told to skip (as before retries), and nothing hangs."""
    group, proxy, clients, metrics = behind_proxy
    train(group, 0)
    before = versions(group, clients)

    proxy.cut_next(1000)   # every request of this phase is lost, and every reconnect
    try:
        norm = group.external_grad_sq_norm()
    finally:
        proxy.cut_next(0)
    assert norm == 0.0
    assert counted(metrics.masked_calls, "gradnorm") == N_EXPERTS
    group.apply_external_step(1e-2, 1.0, OptimizerSettings())   # skip=true for both replicas
    assert versions(group, clients) == before
