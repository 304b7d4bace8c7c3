"""The straggler policy (ROUTER_STRAGGLER_MS, ROUTER_K_MIN) against real expert services, one of
them slowed down by EXPERT_INJECT_DELAY_MS: once every token has answers from k_min of its
experts, the slow ones are masked (counted as `straggler`) instead of costing the layer its
deadline; the answers that came are exact, in serving and in training. No timing is asserted:
the masks and the metric say which path ran (`python -m bench --only straggler` measures it)."""

from __future__ import annotations

import pytest
import torch

from moe.experts import expert_uid
from services.router.remote_experts import _Coverage
from tests.integration import test_remote_experts
from tests.integration.test_remote_experts import TOL, inputs, reference, start, wait_registered

pytestmark = pytest.mark.integration
make_group, registry = test_remote_experts.make_group, test_remote_experts.registry   # its fixtures, here too
LAYER = 30
# Tokens 0-3 go to experts 0 (fast service) and 2 (slow one); tokens 4-5 to 1 (fast) and 3 (slow).
TOKEN_IDS = {0: torch.tensor([0, 1, 2, 3]), 1: torch.tensor([4, 5]), 2: torch.tensor([0, 1, 2, 3]),
             3: torch.tensor([4, 5])}


def _masked(group, uid_index: int, reason: str) -> float:
    return group.metrics.registry.get_sample_value("router_masked_calls_total", {
        "layer": str(LAYER), "uid": expert_uid(LAYER, uid_index), "rpc": "forward", "reason": reason}) or 0.0


@pytest.fixture
def services(expert_service_factory, registry, tmp_path):  # noqa: F811 (registry is the fixture)
    local, ckpt = reference(LAYER, tmp_path)
    fast = start(expert_service_factory, LAYER, [0, 1], ckpt)
    slow = start(expert_service_factory, LAYER, [2, 3], ckpt, EXPERT_INJECT_DELAY_MS="1500")
    wait_registered(registry, [(fast, [0, 1]), (slow, [2, 3])], LAYER)
    return local, {fast.endpoint, slow.endpoint}


def test_slow_experts_are_masked_once_every_token_has_an_answer(services, make_group):
    local, endpoints = services
    xs = inputs({i: len(ids) for i, ids in TOKEN_IDS.items()})
    group = make_group(endpoints, LAYER, timeout_s=10.0, straggler_ms=50, forward_many_max_tokens=256)
    with torch.no_grad():
        outs = group.run(xs, TOKEN_IDS)
    for i in (0, 1):
        torch.testing.assert_close(outs[i], local[i](xs[i]).detach(), **TOL)
    assert outs[2] is None and outs[3] is None
    assert _masked(group, 2, "straggler") == _masked(group, 3, "straggler") == 1

    # Training: the same cut, and backward reaches the experts that answered.
    leaves = {i: x.clone().requires_grad_() for i, x in xs.items()}
    group.begin_step(1)
    outs = group.run(leaves, TOKEN_IDS)
    assert outs[2] is None and outs[3] is None
    sum(outs[i].sum() for i in (0, 1)).backward()
    for i in (0, 1):
        x = xs[i].clone().requires_grad_()
        local[i](x).sum().backward()
        torch.testing.assert_close(leaves[i].grad, x.grad, **TOL)


def test_k_min_two_waits_for_both_experts_and_no_policy_waits_for_all(services, make_group):
    local, endpoints = services
    xs = inputs({i: len(ids) for i, ids in TOKEN_IDS.items()})
    for group in (make_group(endpoints, LAYER, timeout_s=10.0, straggler_ms=50, k_min=2),
                  make_group(endpoints, LAYER, timeout_s=10.0)):
        with torch.no_grad():
            outs = group.run(xs, TOKEN_IDS)
        for i in xs:
            torch.testing.assert_close(outs[i], local[i](xs[i]).detach(), **TOL)
        assert _masked(group, 2, "straggler") == 0


def test_coverage_counts_answers_per_token_up_to_what_each_token_has():
    class Answer:
        def __init__(self, done):
            self.answered = done

    ids = {0: torch.tensor([0, 1]), 1: torch.tensor([0]), 2: torch.tensor([2])}   # token 2 has one expert
    assert _Coverage({0: Answer(True), 1: Answer(False), 2: Answer(True)}, ids, k_min=1)()
    assert not _Coverage({0: Answer(True), 1: Answer(False), 2: Answer(True)}, ids, k_min=2)()   # token 0: 1 of 2
    assert _Coverage({0: Answer(True), 1: Answer(True), 2: Answer(True)}, ids, k_min=2)()   # token 2 needs its one
    assert not _Coverage({0: Answer(True), 1: Answer(True), 2: Answer(False)}, ids, k_min=1)()
    assert not _Coverage({0: Answer(False), 1: Answer(False), 2: Answer(False)}, ids, k_min=1)()
