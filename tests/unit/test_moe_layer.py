"""The MoE layer against a naive per-token reference, plus its options and its errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from moe import MoE, SwiGLU
from moe import layer as moe_layer
from moe.boundary import LocalExperts
from moe.gating import expert_capacity, load_balance_loss, router_z_loss


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Token by token, straight from the definition, using the layer's own weights."""
    outs = []
    for t in range(x.shape[0]):
        probs = F.softmax(moe.gate.weight @ x[t], dim=-1)
        top_p, top_e = probs.topk(moe.k)
        w = top_p / top_p.sum()
        y = sum(w[j] * moe.experts[int(top_e[j])](x[t:t + 1])[0] for j in range(moe.k))
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(x[t:t + 1])[0]
        outs.append(y)
    return torch.stack(outs)


@pytest.mark.parametrize("n_shared", [0, 1])
def test_output_and_gradients_match_naive_reference(n_shared):
    torch.manual_seed(0)
    moe = MoE(dim=24, n_experts=6, n_activated_experts=2, moe_inter_dim=40, n_shared_experts=n_shared)
    x = torch.randn(4, 9, 24, requires_grad=True)
    y, _ = moe(x)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = naive_moe(moe, x_ref.reshape(-1, 24)).reshape(4, 9, 24)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)

    probe = torch.randn_like(y)
    grads = torch.autograd.grad((y * probe).sum(), [x, *moe.parameters()])
    grads_ref = torch.autograd.grad((y_ref * probe).sum(), [x_ref, *moe.parameters()], allow_unused=True)
    for name, g, g_ref in zip(["input", *(n for n, _ in moe.named_parameters())], grads, grads_ref):
        g_ref = torch.zeros_like(g) if g_ref is None else g_ref
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=f"gradient of {name}")


def test_single_expert_equals_plain_swiglu():
    torch.manual_seed(1)
    moe = MoE(dim=16, n_experts=1, n_activated_experts=1, moe_inter_dim=32)
    ffn = SwiGLU(16, 32)
    ffn.load_state_dict(moe.experts[0].state_dict())
    x = torch.randn(7, 16)
    torch.testing.assert_close(moe(x)[0], ffn(x), rtol=1e-6, atol=1e-6)


def test_familiar_names_and_shapes():
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=12)
    assert moe.gate.weight.shape == (4, 8)
    assert moe.experts[3].w1.weight.shape == (12, 8)
    assert moe.experts[3].w3.weight.shape == (12, 8)
    assert moe.experts[3].w2.weight.shape == (8, 12)


def test_balance_loss_is_one_when_balanced_and_grows_with_collapse():
    n_experts = 4
    # Token i is a one-hot on expert i % 4 and the gate is the identity: by symmetry every
    # expert gets 1/4 of the assignments and 1/4 of the mean probability.
    x = torch.eye(n_experts).repeat(8, 1) * 3.0
    probs = (x @ torch.eye(n_experts)).softmax(-1)
    top = probs.topk(1, dim=-1).indices
    assert load_balance_loss(probs, top, n_experts).item() == pytest.approx(1.0, abs=1e-6)

    losses = []
    for sharpness in [0.0, 1.0, 3.0, 10.0]:
        logits = torch.zeros(32, n_experts)
        logits[:, 0] = sharpness          # every token leans to expert 0, more and more
        p = logits.softmax(-1)
        losses.append(load_balance_loss(p, torch.zeros(32, 1, dtype=torch.long), n_experts).item())
    assert losses == sorted(losses) and losses[-1] == pytest.approx(n_experts, rel=1e-3)


def test_z_loss_matches_its_formula_and_layer_reports_both():
    logits = torch.randn(10, 5)
    expected = torch.stack([torch.log(torch.exp(row).sum()) ** 2 for row in logits]).mean()
    torch.testing.assert_close(router_z_loss(logits), expected)

    torch.manual_seed(2)
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=8, aux_loss_coef=0.5, z_loss_coef=0.25)
    x = torch.randn(16, 8)
    _, aux = moe(x)
    s = moe.last_stats
    logits = x @ moe.gate.weight.T
    assert s.z_loss == pytest.approx(router_z_loss(logits).item(), rel=1e-5)
    assert aux.item() == pytest.approx(0.5 * s.balance_loss + 0.25 * s.z_loss, rel=1e-5)
    assert int(s.expert_counts.sum()) == 16 * 2


def test_routing_losses_off_gives_the_same_outputs_and_no_losses():
    torch.manual_seed(3)
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=8, aux_loss_coef=0.5, z_loss_coef=0.25,
              capacity_factor=0.5)   # some assignments dropped: the count must not depend on the losses
    x = torch.randn(16, 8)
    y_on, aux_on = moe(x)
    on = moe.last_stats
    y_off, aux_off = moe(x, routing_losses=False)
    off = moe.last_stats
    assert torch.equal(y_on, y_off)
    assert aux_on.item() > 0 and aux_off.item() == 0.0
    assert math.isnan(off.balance_loss) and math.isnan(off.z_loss)   # not computed, not "balanced"
    assert off.dropped == on.dropped > 0
    assert torch.equal(off.expert_counts, on.expert_counts)


def test_capacity_drop_limits_load_and_zeroes_dropped_slots():
    torch.manual_seed(3)
    dropless = MoE(dim=16, n_experts=4, n_activated_experts=2, moe_inter_dim=16)
    capped = MoE(dim=16, n_experts=4, n_activated_experts=2, moe_inter_dim=16, capacity_factor=0.75)
    capped.load_state_dict(dropless.state_dict())
    with torch.no_grad():
        capped.gate.weight[0] += 2.0       # crowd expert 0 so that capacity binds
    dropless.load_state_dict(capped.state_dict())
    x = torch.randn(64, 16).abs()
    routing = capped.gate(x)
    cap = expert_capacity(64, 4, 2, 0.75)
    y, _ = capped(x)
    counts = capped.last_stats.expert_counts
    assert int(counts.max()) <= cap and capped.last_stats.dropped > 0
    assert torch.all(routing.weights[~routing.kept] == 0)
    # Tokens that lost no slot get exactly the dropless output.
    intact = routing.kept.all(dim=1)
    assert intact.any()
    torch.testing.assert_close(y[intact], dropless(x)[0][intact], rtol=1e-5, atol=1e-6)
    # First choices are served before second choices: an expert that turned a first choice
    # away holds no second choice.
    for e in range(4):
        first_dropped = ((routing.experts[:, 0] == e) & ~routing.kept[:, 0]).any()
        second_kept = ((routing.experts[:, 1] == e) & routing.kept[:, 1]).any()
        assert not (first_dropped and second_kept)


def test_capacity_reroute_moves_overflow_to_next_best_expert_with_room():
    gate_w = torch.eye(4) * 5.0
    moe = MoE(dim=4, n_experts=4, n_activated_experts=1, moe_inter_dim=8, capacity_factor=1.0, overflow="reroute")
    with torch.no_grad():
        moe.gate.weight.copy_(gate_w)
    # 4 tokens all prefer expert 0; their second preferences are experts 1, 2, 3, 1.
    x = torch.tensor([[1.0, 0.5, 0.0, 0.0], [1.0, 0.0, 0.5, 0.0], [1.0, 0.0, 0.0, 0.5], [1.0, 0.5, 0.0, 0.0]])
    routing = moe.gate(x)
    assert routing.kept.all()                          # capacity 1 each, 4 slots, nothing lost
    assert routing.experts[:, 0].tolist() == [0, 2, 3, 1]
    torch.testing.assert_close(routing.weights, torch.ones(4, 1))

    dropper = MoE(dim=4, n_experts=4, n_activated_experts=1, moe_inter_dim=8, capacity_factor=1.0, overflow="drop")
    with torch.no_grad():
        dropper.gate.weight.copy_(gate_w)
    assert dropper.gate(x).kept[:, 0].tolist() == [True, False, False, False]


def test_jitter_only_in_training():
    torch.manual_seed(4)
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=8, jitter=0.5)
    x = torch.randn(32, 8)
    moe.eval()
    torch.testing.assert_close(moe(x)[0], moe(x)[0])
    moe.train()
    assert not torch.equal(moe.gate(x).logits, moe.gate(x).logits)


class MaskingExperts(LocalExperts):
    """The in-process experts, except that some report themselves unavailable (as a dead server would)."""

    def __init__(self, *args, dead=()):
        super().__init__(*args)
        self.dead = set(dead)

    def run(self, batches, token_ids=None):
        return {i: (None if i in self.dead else self.experts[i](x)) for i, x in batches.items()}


def test_masked_expert_weight_dropped_and_rest_renormalized():
    torch.manual_seed(5)
    group = MaskingExperts(4, 8, 16, dead={1})
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=16, experts=group)
    x = torch.randn(20, 8)
    y, _ = moe(x)
    assert moe.last_stats.masked_experts == (1,)
    routing = moe.gate(x)
    for t in range(20):
        alive = [(int(e), float(w)) for e, w in zip(routing.experts[t], routing.weights[t].detach()) if int(e) != 1]
        total = sum(w for _, w in alive)
        expected = sum(w / total * group[e](x[t:t + 1])[0] for e, w in alive) if alive else torch.zeros(8)
        torch.testing.assert_close(y[t], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda m: m(torch.randn(3, 7)), "shape"),
    (lambda m: m(torch.ones(3, 8, dtype=torch.long)), "floating point"),
    (lambda m: m(torch.full((3, 8), float("nan"))), "NaN"),
])
def test_bad_input_gets_clear_error(make, message):
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=8)
    with pytest.raises(ValueError, match=message):
        make(moe)


def test_bad_configuration_gets_clear_error():
    with pytest.raises(ValueError, match="n_activated_experts"):
        MoE(dim=8, n_experts=2, n_activated_experts=3, moe_inter_dim=8)
    with pytest.raises(ValueError, match="overflow"):
        MoE(dim=8, n_experts=2, n_activated_experts=1, moe_inter_dim=8, capacity_factor=1.0, overflow="spill")
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE(dim=8, n_experts=2, n_activated_experts=1, moe_inter_dim=8, capacity_factor=-1.0)


class EarlyExperts(LocalExperts):
    """Calls `meanwhile` before computing, twice, as a group whose experts are elsewhere calls it once
    its calls are out (and as a careless one might call it again)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.order = []

    def run_meanwhile(self, batches, token_ids, meanwhile):
        self.order.append("meanwhile")
        meanwhile()
        meanwhile()
        self.order.append("run")
        return self.run(batches, token_ids)


@pytest.mark.parametrize("n_shared", [0, 1])
def test_work_done_while_the_experts_run_gives_the_same_results(n_shared):
    """The routing losses and the shared experts, computed while the routed experts run (a remote
    group's calls are out) instead of after: the same outputs, losses, statistics and gradients."""
    torch.manual_seed(3)
    x = torch.randn(24, 8)
    kw = {"dim": 8, "n_experts": 4, "n_activated_experts": 2, "moe_inter_dim": 16, "n_shared_experts": n_shared}
    ref = MoE(**kw, experts=LocalExperts(4, 8, 16))
    early = MoE(**kw, experts=EarlyExperts(4, 8, 16))
    early.load_state_dict(ref.state_dict())
    got = []
    for moe in (ref, early):
        leaf = x.clone().requires_grad_()
        y, aux = moe(leaf)
        (y.square().sum() + 100 * aux).backward()
        got.append((y, aux, leaf.grad, moe.gate.weight.grad) +
                   ((moe.shared_experts.w1.weight.grad,) if n_shared else ()))
    assert early.experts.order == ["meanwhile", "run"]
    for want, have in zip(*got):
        torch.testing.assert_close(have, want)   # outputs, aux loss, input, gate (and shared expert) gradients
    assert early.last_stats.balance_loss == ref.last_stats.balance_loss > 0
    assert early.last_stats.z_loss == ref.last_stats.z_loss > 0


class StreamingExperts(MaskingExperts):
    """Hands outputs over one by one, last expert first, each in a buffer that is overwritten with
    NaN once `on_output` returns (like a shared-memory region going back to its pool)."""
    streams_outputs = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.streamed = self.ran = 0

    def run(self, batches, token_ids=None):
        self.ran += 1
        return super().run(batches, token_ids)

    def run_streaming(self, batches, token_ids, on_output, meanwhile=None):
        self.streamed += 1
        if meanwhile is not None:   # as a remote group does: once its calls are out
            meanwhile()
        for i in sorted(batches, reverse=True):
            if i not in self.dead:
                buffer = self.experts[i](batches[i]).detach().clone()
                on_output(i, buffer)
                buffer.fill_(float("nan"))
        return tuple(sorted(i for i in batches if i in self.dead))


@pytest.fixture
def stream_everything(monkeypatch):
    """Stream outputs however few values the layer routes (the tests' layers are small)."""
    monkeypatch.setattr(moe_layer, "STREAM_MIN_ELEMENTS", 0)


@pytest.mark.parametrize("k, n_shared", [(2, 0), (3, 0), (2, 1)])
def test_streaming_combine_equals_the_one_shot_combine(k, n_shared, stream_everything):
    torch.manual_seed(6)
    streaming = StreamingExperts(6, 8, 16)
    one_shot = MaskingExperts(6, 8, 16)
    one_shot.load_state_dict(streaming.state_dict())
    layers = [MoE(dim=8, n_experts=6, n_activated_experts=k, moe_inter_dim=16, n_shared_experts=n_shared,
                  experts=g) for g in (streaming, one_shot)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(50, 8)
    with torch.no_grad():
        y_stream, aux_stream = layers[0](x)
        y_once, aux_once = layers[1](x)
    assert streaming.streamed == 1 and streaming.ran == 0
    assert torch.equal(aux_stream, aux_once)   # computed while the (fake) calls were out, the same
    assert torch.isfinite(y_stream).all()   # nothing read from a buffer after it was handed back
    if k == 2:
        assert torch.equal(y_stream, y_once)   # each token adds two terms: the order cannot matter
    else:
        torch.testing.assert_close(y_stream, y_once, rtol=1e-6, atol=1e-6)


def test_streaming_combine_renormalizes_over_the_experts_that_answered(stream_everything):
    torch.manual_seed(5)
    group = StreamingExperts(4, 8, 16, dead={1})
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=16, experts=group)
    x = torch.randn(20, 8)
    with torch.no_grad():
        y, _ = moe(x)
        routing = moe.gate(x)
    assert group.streamed == 1 and moe.last_stats.masked_experts == (1,)
    for t in range(20):
        alive = [(int(e), float(w)) for e, w in zip(routing.experts[t], routing.weights[t]) if int(e) != 1]
        total = sum(w for _, w in alive)
        with torch.no_grad():
            expected = sum(w / total * group[e](x[t:t + 1])[0] for e, w in alive) if alive else torch.zeros(8)
        torch.testing.assert_close(y[t], expected, rtol=1e-5, atol=1e-6)


def test_small_inference_batches_are_combined_at_once():
    """A decode step's few tokens: one combine costs less than handing outputs over one by one."""
    group = StreamingExperts(4, 8, 16)
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=16, experts=group)
    with torch.no_grad():
        moe(torch.randn(16, 8))
    assert group.ran == 1 and group.streamed == 0
    with torch.no_grad():
        moe(torch.randn(moe_layer.STREAM_MIN_ELEMENTS // (2 * 8), 8))   # k x tokens x dim routed values
    assert group.streamed == 1


def test_training_forward_does_not_stream(stream_everything):
    """With autograd the outputs must stay in the graph: the group's `run` serves them."""
    torch.manual_seed(7)
    group = StreamingExperts(4, 8, 16)
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=16, experts=group)
    y, _ = moe(torch.randn(10, 8, requires_grad=True))
    y.sum().backward()
    assert group.ran == 1 and group.streamed == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_training_input_check_finds_one_bad_value_among_many(bad):
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=8)
    x = torch.randn(500, 8)
    x[321, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        moe(x)


def test_training_input_check_accepts_large_finite_values_whose_sum_overflows():
    moe = MoE(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=8)
    x = torch.full((4, 8), 3e38)   # finite, but their sum is not: the exact check must decide
    moe(x)   # no error (the outputs may overflow; the input is valid)
