"""services.expert.backend against the in-process reference: SwiGLU + autograd + torch AdamW."""

import copy

import pytest
import torch

from moe.experts import SwiGLU
from services.expert.backend import (
    ActivationCache,
    ActivationsMissing,
    BadRequest,
    DuplicateBackward,
    ExpertBackend,
    NonFiniteGradients,
    StepConflict,
    StepNow,
    UnknownExpert,
)
from tests.manual_clock import ManualClock

torch.set_num_threads(1)
DIM, INTER = 16, 32


def _make(n_experts=1, seed=0, **kwargs):
    torch.manual_seed(seed)
    ref = {f"0.{i}": SwiGLU(DIM, INTER) for i in range(n_experts)}
    backend = ExpertBackend({uid: copy.deepcopy(m) for uid, m in ref.items()}, **kwargs)
    return ref, backend


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _autograd(module, x, g):
    """Reference: output, input grad; parameter grads accumulate in module's .grad."""
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(g)
    return y.detach(), x.grad


def _assert_param_grads(ref: SwiGLU, got: SwiGLU, rtol=1e-5, atol=1e-6):
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got.get_parameter(name).grad, p.grad, rtol=rtol, atol=atol, msg=name)


def test_forward_equals_swiglu():
    ref, backend = _make()
    x = _randn(9, DIM, seed=1)
    torch.testing.assert_close(backend.forward("0.0", x), ref["0.0"](x).detach(), rtol=1e-6, atol=1e-6)


def test_batched_forward_splits_back_per_request():
    ref, backend = _make()
    xs = [_randn(n, DIM, seed=n) for n in (1, 5, 3)]
    outs = backend.forward_batch("0.0", xs, [None, None, None])
    assert [o.shape[0] for o in outs] == [1, 5, 3]
    for x, y in zip(xs, outs):
        torch.testing.assert_close(y, ref["0.0"](x).detach(), rtol=1e-5, atol=1e-6)


def test_backward_matches_autograd_and_accumulates_over_calls():
    ref, backend = _make()
    module = ref["0.0"]
    for i in range(3):  # three micro-batches of one step
        x, g = _randn(6 + i, DIM, seed=10 + i), _randn(6 + i, DIM, seed=20 + i)
        y = backend.forward("0.0", x, call_id=f"c{i}")
        dx = backend.backward("0.0", f"c{i}", step=0, grad_out=g)
        y_ref, dx_ref = _autograd(module, x, g)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
    _assert_param_grads(module, backend.module("0.0"))
    sq, calls = backend.grad_sq_norm("0.0", step=0)
    assert calls == 3
    assert sq == pytest.approx(sum(float(p.grad.double().pow(2).sum()) for p in module.parameters()), rel=1e-6)
    assert backend.grad_sq_norm("0.0", step=1) == (0.0, 0)
    assert len(backend.cache) == 0  # a Backward releases its activations


def test_backward_of_a_batched_training_forward():
    ref, backend = _make()
    xs = [_randn(n, DIM, seed=n) for n in (2, 7, 4)]
    gs = [_randn(n, DIM, seed=100 + n) for n in (2, 7, 4)]
    backend.forward_batch("0.0", xs, ["a", None, "c"])  # the middle one is inference
    assert len(backend.cache) == 2
    for call_id, x, g in (("c", xs[2], gs[2]), ("a", xs[0], gs[0])):  # any order
        dx = backend.backward("0.0", call_id, step=3, grad_out=g)
        torch.testing.assert_close(dx, _autograd(ref["0.0"], x, g)[1], rtol=1e-5, atol=1e-6)
    _assert_param_grads(ref["0.0"], backend.module("0.0"))


def test_recompute_path_when_activations_are_gone():
    ref, backend = _make()
    x, g = _randn(5, DIM, seed=1), _randn(5, DIM, seed=2)
    with pytest.raises(ActivationsMissing, match="resend the Backward with `inputs`"):
        backend.backward("0.0", "never-forwarded", step=0, grad_out=g)
    dx = backend.backward("0.0", "never-forwarded", step=0, grad_out=g, inputs=x)
    torch.testing.assert_close(dx, _autograd(ref["0.0"], x, g)[1], rtol=1e-5, atol=1e-6)
    _assert_param_grads(ref["0.0"], backend.module("0.0"))


def test_newer_step_discards_stale_grads_and_older_step_is_refused():
    ref, backend = _make()
    x1, g1 = _randn(4, DIM, seed=1), _randn(4, DIM, seed=2)
    x2, g2 = _randn(3, DIM, seed=3), _randn(3, DIM, seed=4)
    backend.forward("0.0", x1, call_id="old")
    backend.backward("0.0", "old", step=5, grad_out=g1)  # the router died after this
    backend.forward("0.0", x2, call_id="new")
    backend.backward("0.0", "new", step=6, grad_out=g2)
    _autograd(ref["0.0"], x2, g2)  # only step 6's gradient survives
    _assert_param_grads(ref["0.0"], backend.module("0.0"))
    assert backend.grad_sq_norm("0.0", 6)[1] == 1
    with pytest.raises(StepConflict, match="step 5"):
        backend.backward("0.0", "late", step=5, grad_out=g1, inputs=x1)
    with pytest.raises(StepConflict):
        backend.apply_step("0.0", step=5, lr=0.1)


def test_a_new_session_resets_a_crashed_sessions_gradients():
    """A router that crashed between Backward and ApplyStep restarts at a lower step with a new
    session: its Backward is accepted, the stale gradients are dropped, and a late Backward of
    the dead session cannot wipe the new one's."""
    ref, backend = _make()
    x1, g1 = _randn(4, DIM, seed=1), _randn(4, DIM, seed=2)
    x2, g2 = _randn(3, DIM, seed=3), _randn(3, DIM, seed=4)
    backend.forward("0.0", x1, call_id="a:0")
    backend.backward("0.0", "a:0", step=7, grad_out=g1, session_id="a")  # then router "a" dies
    backend.forward("0.0", x2, call_id="b:0")
    backend.backward("0.0", "b:0", step=0, grad_out=g2, session_id="b")
    _autograd(ref["0.0"], x2, g2)
    _assert_param_grads(ref["0.0"], backend.module("0.0"))
    assert backend.grad_sq_norm("0.0", 7, session_id="a") == (0.0, 0)
    assert backend.grad_sq_norm("0.0", 0, session_id="b")[1] == 1
    with pytest.raises(StepConflict, match="replaced by a newer one"):
        backend.backward("0.0", "a:1", step=7, grad_out=g1, inputs=x1, session_id="a")
    with pytest.raises(StepConflict, match="session"):
        backend.apply_step("0.0", step=7, lr=0.1, session_id="a")
    assert backend.apply_step("0.0", step=0, lr=0.1, session_id="b") == 1


def test_a_forward_is_backpropagated_once():
    _, backend = _make()
    x, g = _randn(4, DIM, seed=1), _randn(4, DIM, seed=2)
    backend.forward("0.0", x, call_id="c")
    backend.backward("0.0", "c", step=0, grad_out=g)
    with pytest.raises(DuplicateBackward):
        backend.backward("0.0", "c", step=0, grad_out=g, inputs=x)


def test_grad_rows_must_match_the_forward():
    _, backend = _make()
    backend.forward("0.0", _randn(4, DIM, seed=1), call_id="c")
    with pytest.raises(Exception, match="has 3 tokens but the Forward"):
        backend.backward("0.0", "c", step=0, grad_out=_randn(3, DIM, seed=2))
    assert len(backend.cache) == 1  # a bad request does not destroy the activations


def test_apply_step_equals_torch_adamw_in_process():
    ref, backend = _make(n_experts=2)
    ref_opts = {uid: torch.optim.AdamW(m.parameters(), lr=0.0) for uid, m in ref.items()}
    hyper = {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    for step, (lr, scale) in enumerate([(1e-2, 0.0), (5e-3, 0.5), (2e-3, 1.0), (1e-3, 0.25)]):
        for k, uid in enumerate(ref):
            x, g = _randn(5, DIM, seed=step * 10 + k), _randn(5, DIM, seed=step * 10 + k + 5)
            backend.forward(uid, x, call_id=f"{step}-{k}")
            backend.backward(uid, f"{step}-{k}", step=step, grad_out=g)
            _autograd(ref[uid], x, g)
            opt = ref_opts[uid]
            if scale:
                for p in ref[uid].parameters():
                    p.grad.mul_(scale)
            for group in opt.param_groups:
                group.update(lr=lr, weight_decay=hyper["weight_decay"], betas=(hyper["beta1"], hyper["beta2"]),
                             eps=hyper["eps"])
            opt.step()
            opt.zero_grad(set_to_none=True)
            version = backend.apply_step(uid, step=step, lr=lr, grad_scale=scale, **hyper)
            assert version == step + 1
    for uid, module in ref.items():
        for name, p in module.named_parameters():
            torch.testing.assert_close(backend.module(uid).get_parameter(name), p.detach(),
                                       rtol=1e-5, atol=1e-7, msg=f"{uid}.{name}")
            assert backend.module(uid).get_parameter(name).grad is None
    assert backend.grad_sq_norm("0.0", 3) == (0.0, 0)


def test_an_async_backward_steps_at_once_like_adamw_on_that_calls_gradients():
    """apply_now: every Backward is one AdamW step on its own call's gradients (clipped to max_grad_norm),
    with the moments carried over from call to call, as torch AdamW does it in process. Three Forwards
    go first, so the later Backwards are delayed gradients (hivemind's): the activations their Forward
    kept, the weights as they are when the Backward comes."""
    ref, backend = _make()
    module, opt = ref["0.0"], torch.optim.AdamW(ref["0.0"].parameters(), lr=0.0)
    clip, hyper = 0.5, {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
    xs = [_randn(6, DIM, seed=k) for k in range(3)]
    with torch.no_grad():
        kept = [(x @ module.w1.weight.t(), x @ module.w3.weight.t()) for x in xs]   # what each Forward keeps
    for k, x in enumerate(xs):
        backend.forward("0.0", x, call_id=f"c{k}")
    for k, (x, (a, b), lr) in enumerate(zip(xs, kept, [1e-2, 5e-3, 2e-3])):
        g = _randn(6, DIM, seed=10 + k)
        dx = backend.backward("0.0", f"c{k}", step=0, grad_out=g,
                              apply_now=StepNow(lr=lr, max_grad_norm=clip, **hyper))
        with torch.no_grad():
            w1, w2, w3 = module.w1.weight, module.w2.weight, module.w3.weight
            s, dh = torch.nn.functional.silu(a), g @ w2
            da, db = torch.ops.aten.silu_backward(dh * b, a), dh * s
            grads = {"w1.weight": da.t() @ x, "w2.weight": g.t() @ (s * b), "w3.weight": db.t() @ x}
            torch.testing.assert_close(dx, da @ w1 + db @ w3, rtol=1e-5, atol=1e-6)
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(d) for d in grads.values()])))
        for name, p in module.named_parameters():
            p.grad = grads[name] * min(1.0, clip / (norm + 1e-6))
        for group in opt.param_groups:
            group.update(lr=lr, weight_decay=hyper["weight_decay"], betas=(hyper["beta1"], hyper["beta2"]),
                         eps=hyper["eps"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert backend.version("0.0") == k + 1
    for name, p in module.named_parameters():
        torch.testing.assert_close(backend.module("0.0").get_parameter(name), p.detach(), rtol=1e-5, atol=1e-7,
                                   msg=name)
        assert backend.module("0.0").get_parameter(name).grad is None


def test_an_async_backward_leaves_a_synchronous_sessions_gradients_alone():
    ref, backend = _make()
    x, g = _randn(5, DIM, seed=1), _randn(5, DIM, seed=2)
    backend.forward("0.0", x, call_id="sync")
    backend.backward("0.0", "sync", step=3, grad_out=g, session_id="s")
    pending = {n: p.grad.clone() for n, p in backend.module("0.0").named_parameters()}
    backend.forward("0.0", x, call_id="async")
    backend.backward("0.0", "async", step=0, grad_out=g, session_id="a", apply_now=StepNow(lr=1e-2))
    assert backend.version("0.0") == 1
    for n, p in backend.module("0.0").named_parameters():
        assert torch.equal(p.grad, pending[n]), n
    assert backend.grad_sq_norm("0.0", 3, "s")[1] == 1   # the synchronous step goes on as if nothing happened


def test_an_async_backward_staler_than_max_staleness_answers_its_gradient_but_updates_nothing():
    """Three Forwards, then their Backwards: the k-th Backward comes k updates after its Forward. With
    max_staleness 1 the first two update and the third (2 updates old) does not; its input gradient is
    still the right one (the activations its Forward kept, the weights of the moment)."""
    stale = []
    _, backend = _make(max_staleness=1, on_stale=stale.append)
    m = backend.module("0.0")
    initial = {n: p.clone() for n, p in m.named_parameters()}
    xs = [_randn(4, DIM, seed=k) for k in range(3)]
    for k, x in enumerate(xs):
        backend.forward("0.0", x, call_id=f"c{k}")
    for k in range(2):
        backend.backward("0.0", f"c{k}", step=0, grad_out=_randn(4, DIM, seed=10 + k), apply_now=StepNow(lr=1e-2))
    assert backend.version("0.0") == 2 and stale == []
    now = {n: p.clone() for n, p in m.named_parameters()}
    g = _randn(4, DIM, seed=12)
    dx = backend.backward("0.0", "c2", step=0, grad_out=g, apply_now=StepNow(lr=1e-2))
    assert stale == ["0.0"] and backend.version("0.0") == 2
    for n, p in m.named_parameters():
        assert torch.equal(p, now[n]), n
    with torch.no_grad():
        a, b = xs[2] @ initial["w1.weight"].t(), xs[2] @ initial["w3.weight"].t()
        dh = g @ now["w2.weight"]
        da, db = torch.ops.aten.silu_backward(dh * b, a), dh * torch.nn.functional.silu(a)
        torch.testing.assert_close(dx, da @ now["w1.weight"] + db @ now["w3.weight"], rtol=1e-5, atol=1e-6)
    # Under the default bound (16) the same sequence updates three times.
    _, fresh = _make()
    for k, x in enumerate(xs):
        fresh.forward("0.0", x, call_id=f"c{k}")
    for k in range(3):
        fresh.backward("0.0", f"c{k}", step=0, grad_out=_randn(4, DIM, seed=10 + k), apply_now=StepNow(lr=1e-2))
    assert fresh.version("0.0") == 3


def test_max_staleness_must_not_be_negative():
    with pytest.raises(ValueError, match="max_staleness"):
        _make(max_staleness=-1)


def test_an_async_backward_with_gradients_that_are_not_finite_applies_nothing():
    _, backend = _make()
    before = {n: p.clone() for n, p in backend.module("0.0").named_parameters()}
    backend.forward("0.0", _randn(4, DIM, seed=1) * 3e18, call_id="c")
    with pytest.raises(NonFiniteGradients):
        backend.backward("0.0", "c", step=0, grad_out=_randn(4, DIM, seed=2) * 3e18, apply_now=StepNow(lr=1e-2))
    assert backend.version("0.0") == 0
    for n, p in backend.module("0.0").named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None


def test_apply_step_without_grads_is_a_noop():
    _, backend = _make()
    before = {n: p.clone() for n, p in backend.module("0.0").named_parameters()}
    assert backend.apply_step("0.0", step=0, lr=0.1, weight_decay=0.1) == 0
    for n, p in backend.module("0.0").named_parameters():
        assert torch.equal(p, before[n])


def test_unknown_expert_names_the_hosted_ones():
    _, backend = _make(n_experts=2)
    with pytest.raises(UnknownExpert, match="0.0, 0.1"):
        backend.forward("3.3", _randn(1, DIM, seed=0))


def test_activation_cache_expires_entries_after_ttl():
    clock = ManualClock()
    cache = ActivationCache(max_bytes=10**6, ttl_s=5.0, clock=clock)
    t = torch.zeros(4, 4)
    cache.put(("0.0", "a"), t, t, t)
    clock.now = 3.0
    cache.put(("0.0", "b"), t, t, t)
    clock.now = 5.5
    assert cache.sweep() == 1 and cache.expired == 1
    assert cache.peek(("0.0", "a")) is None
    assert cache.peek(("0.0", "b")) is not None
    clock.now = 8.5
    assert cache.peek(("0.0", "b")) is None  # lookups expire too
    assert cache.nbytes == 0 and len(cache) == 0


def test_activation_cache_evicts_oldest_to_stay_under_its_bound():
    t = torch.zeros(10, 10)  # 400 bytes; an entry is 3 of them
    cache = ActivationCache(max_bytes=3000, ttl_s=100.0)
    for i in range(10):
        assert cache.put(("0.0", str(i)), t, t, t)
        assert cache.nbytes <= 3000
    assert len(cache) == 2 and cache.evicted == 8
    assert cache.peek(("0.0", "9")) is not None and cache.peek(("0.0", "0")) is None
    big = torch.zeros(40, 40)
    assert not cache.put(("0.0", "big"), big, big, big)  # larger than the whole cache: not kept
    assert cache.nbytes <= 3000


def test_backend_memory_stays_bounded_when_backwards_never_come():
    clock = ManualClock()
    _, backend = _make(activation_cache_mb=0.05, activation_ttl_s=10.0, clock=clock)
    for i in range(200):  # a router that died: forwards, never a backward
        backend.forward("0.0", _randn(8, DIM, seed=i), call_id=str(i))
        assert backend.cache.nbytes <= 0.05 * 1024 * 1024
    clock.now = 11.0
    backend.cache.sweep()
    assert backend.cache.nbytes == 0
    with pytest.raises(ActivationsMissing):
        backend.backward("0.0", "199", step=0, grad_out=_randn(8, DIM, seed=0))


def test_backward_refuses_inputs_that_disagree_with_the_forward():
    _, backend = _make()
    x, g = _randn(4, DIM, seed=1), _randn(4, DIM, seed=2)
    backend.forward("0.0", x, call_id="c")
    with pytest.raises(BadRequest, match="inputs has 3 tokens"):
        backend.backward("0.0", "c", step=0, grad_out=g, inputs=_randn(3, DIM, seed=3))


def test_a_late_backward_for_an_applied_step_is_refused():
    _, backend = _make()
    x, g = _randn(4, DIM, seed=1), _randn(4, DIM, seed=2)
    backend.forward("0.0", x, call_id="c1")
    backend.backward("0.0", "c1", step=3, grad_out=g, session_id="s")
    assert backend.apply_step("0.0", step=3, lr=0.1, session_id="s") == 1
    backend.forward("0.0", x, call_id="c2")
    with pytest.raises(StepConflict, match="already applied"):
        backend.backward("0.0", "c2", step=3, grad_out=g, session_id="s")
    backend.backward("0.0", "c2", step=4, grad_out=g, session_id="s")  # the next step is fine
    assert backend.grad_sq_norm("0.0", 4, session_id="s")[1] == 1


def test_committed_weights_answer_exactly_while_the_live_ones_train_on():
    ref, backend = _make(n_experts=2)
    x = _randn(5, DIM, seed=3)
    backend.keep_committed(4, {uid: {k: v.clone() for k, v in m.state_dict().items()} for uid, m in ref.items()})
    with torch.no_grad():
        backend.module("0.0").w1.weight.add_(0.5)   # training moved the live weights since the commit
    want = ref["0.0"](x).detach()
    torch.testing.assert_close(backend.forward_committed("0.0", x, 4), want, rtol=1e-6, atol=1e-6)
    assert (backend.forward("0.0", x) - want).abs().max() > 1e-2   # the live answer differs
    assert backend.forward_committed("0.0", x, 3) is None           # another round: not held
    with pytest.raises(UnknownExpert):
        backend.forward_committed("9.9", x, 4)


def test_a_liar_lies_about_its_committed_weights_too():
    ref, backend = _make(answer=lambda y: torch.zeros_like(y))
    backend.keep_committed(0, {"0.0": ref["0.0"].state_dict()})
    assert backend.forward_committed("0.0", _randn(3, DIM, seed=4), 0).abs().max() == 0
