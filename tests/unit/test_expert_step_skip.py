"""services.expert.backend: a skipped step (ApplyStep skip=true) and gradients that are not finite.

The router skips a step whose global gradient norm is NaN or Inf; the expert then discards the
step's gradients without an update. Gradients that are not finite are never applied, skip or not.
"""

import copy

import pytest
import torch

from moe.experts import SwiGLU
from services.expert.backend import ExpertBackend, NonFiniteGradients, StepConflict

torch.set_num_threads(1)
DIM, INTER = 16, 32


def _backend():
    torch.manual_seed(0)
    return ExpertBackend({"0.0": SwiGLU(DIM, INTER)})


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _weights(backend):
    return {n: p.detach().clone() for n, p in backend.module("0.0").named_parameters()}


def _accumulate(backend, step, call_id="c", session_id="", g=None):
    x, g = _randn(4, DIM, seed=step), _randn(4, DIM, seed=step + 100) if g is None else g
    backend.forward("0.0", x, call_id=call_id)
    backend.backward("0.0", call_id, step=step, grad_out=g, session_id=session_id)
    return x, g


def _assert_unchanged(backend, before):
    for n, p in backend.module("0.0").named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, f"{n} still holds gradients"


def test_skip_discards_the_steps_gradients_without_an_update():
    backend = _backend()
    before = _weights(backend)
    x, g = _accumulate(backend, step=3, session_id="s")
    assert backend.grad_sq_norm("0.0", 3, session_id="s")[1] == 1
    assert backend.skip_step("0.0", step=3, session_id="s") == 0    # version unchanged
    _assert_unchanged(backend, before)
    assert backend.grad_sq_norm("0.0", 3, session_id="s") == (0.0, 0)
    with pytest.raises(StepConflict, match="already applied \\(or skipped\\)"):   # a late Backward
        backend.backward("0.0", "late", step=3, grad_out=g, inputs=x, session_id="s")
    # The next step trains as usual and its update starts from the untouched weights.
    _accumulate(backend, step=4, call_id="d", session_id="s")
    assert backend.apply_step("0.0", step=4, lr=0.1, session_id="s") == 1
    assert any(not torch.equal(p, before[n]) for n, p in backend.module("0.0").named_parameters())


def test_skip_of_a_step_without_gradients_is_a_noop_and_of_another_step_a_conflict():
    backend = _backend()
    assert backend.skip_step("0.0", step=9) == 0
    _accumulate(backend, step=5)
    with pytest.raises(StepConflict, match="holds gradients for step 5, not 6"):
        backend.skip_step("0.0", step=6)
    assert backend.grad_sq_norm("0.0", 5)[1] == 1          # a conflicting skip discards nothing


def test_inf_gradients_are_discarded_not_applied():
    """fp32 overflow in the parameter gradients (huge but finite grad_outputs): one AdamW step on
    them would make every weight NaN; the expert refuses and discards them."""
    backend = _backend()
    before = _weights(backend)
    _accumulate(backend, step=0, g=torch.full((4, DIM), 3e38))    # finite, and so is grad_inputs
    sq, calls = backend.grad_sq_norm("0.0", 0)
    assert calls == 1 and sq == float("inf")
    with pytest.raises(NonFiniteGradients, match="not finite"):
        backend.apply_step("0.0", step=0, lr=0.1, grad_scale=0.5)
    _assert_unchanged(backend, before)


def test_a_grad_scale_that_overflows_the_gradients_is_refused():
    backend = _backend()
    before = _weights(backend)
    _accumulate(backend, step=0)
    with pytest.raises(NonFiniteGradients, match="after grad_scale"):
        backend.apply_step("0.0", step=0, lr=0.1, grad_scale=1e300)
    _assert_unchanged(backend, before)


def test_finite_steps_still_equal_torch_adamw():
    """The finiteness check changes nothing for ordinary gradients."""
    backend = _backend()
    ref = copy.deepcopy(backend.module("0.0")).requires_grad_(True)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    x, g = _accumulate(backend, step=0)
    ref(x).backward(g)
    for p in ref.parameters():
        p.grad.mul_(0.5)
    opt.step()
    backend.apply_step("0.0", step=0, lr=1e-2, grad_scale=0.5, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(backend.module("0.0").get_parameter(n), p.detach(), rtol=1e-5, atol=1e-7)
