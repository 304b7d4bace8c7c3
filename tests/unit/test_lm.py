"""The decoder LM: causality, KV-cache equivalence, losses, input checks."""

import math

import pytest
import torch

from moe import LMConfig, MoELM, preset


def tiny(**kw) -> MoELM:
    torch.manual_seed(0)
    return MoELM(preset("tiny", vocab_size=97, **kw)).eval()


def test_changing_a_future_token_leaves_earlier_logits_unchanged():
    model = tiny()
    idx = torch.randint(0, 97, (2, 30))
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 97
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_kv_cache_steps_equal_full_recompute():
    model = tiny(dense_every=2)
    idx = torch.randint(0, 97, (2, 40))
    full, _ = model(idx)
    cache = model.new_cache(2)
    pieces = [model(idx[:, :25], cache=cache)[0]]
    for t in range(25, 40):
        pieces.append(model(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


def test_generate_with_cache_equals_without():
    model = tiny()
    prompt = torch.randint(0, 97, (1, 5))
    g = torch.Generator().manual_seed(7)
    with_cache = model.generate(prompt, 40, temperature=0.8, top_k=20, generator=g)
    g = torch.Generator().manual_seed(7)
    without = model.generate(prompt, 40, temperature=0.8, top_k=20, use_cache=False, generator=g)
    assert torch.equal(with_cache, without)
    assert with_cache.shape == (1, 45)


def test_loss_is_cross_entropy_plus_weighted_aux():
    model = tiny()
    idx, targets = torch.randint(0, 97, (2, 2, 16))
    _, loss = model(idx, targets)
    s = model.last_stats
    assert s["ce_loss"] == pytest.approx(math.log(97), rel=0.1)      # untrained: near uniform
    aux = sum(m.cfg.aux_loss_coef * m.last_stats.balance_loss + m.cfg.z_loss_coef * m.last_stats.z_loss
              for m in model.moe_layers())
    assert loss.item() == pytest.approx(s["ce_loss"] + aux, rel=1e-5)
    assert s["expert_counts"].shape == (2, 4) and int(s["expert_counts"].sum()) == 2 * 32 * 2


def test_routing_losses_are_computed_only_for_a_loss_or_gradients():
    model = tiny().eval()
    idx, targets = torch.randint(0, 97, (2, 2, 16))
    with torch.no_grad():
        logits_loss, loss = model(idx, targets)
        assert loss is not None and not math.isnan(model.last_stats["aux_loss"])
        logits_plain, none = model(idx)   # serving: no targets, no gradients
        assert none is None
        assert math.isnan(model.last_stats["aux_loss"]) and math.isnan(model.last_stats["z_loss"])
    assert torch.equal(logits_loss, logits_plain)
    model(idx)   # gradients on: the losses may be wanted through some other path
    assert model.last_stats["aux_loss"] >= 1.0 - 1e-6


def test_dense_every_and_tied_head():
    model = MoELM(LMConfig(vocab_size=50, block_size=16, n_layer=4, n_head=2, dim=16, n_experts=4,
                           moe_inter_dim=16, dense_every=2))
    assert [b.is_moe for b in model.blocks] == [True, False, True, False]
    assert model.head.weight is model.tok_emb.weight


@pytest.mark.parametrize("idx, message", [
    (torch.randint(0, 97, (2, 65)), "block_size"),
    (torch.full((1, 4), 97), r"\[0, 97\)"),
    (torch.zeros(1, 4), "torch.long"),
    (torch.zeros(4, dtype=torch.long), r"\(B, T\)"),
])
def test_bad_tokens_get_clear_error(idx, message):
    with pytest.raises(ValueError, match=message):
        tiny()(idx)


def test_bad_config_gets_clear_error():
    with pytest.raises(ValueError, match="n_head"):
        LMConfig(dim=30, n_head=4)
    with pytest.raises(ValueError, match="n_activated_experts"):
        LMConfig(n_experts=2, n_activated_experts=3)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("huge")


def test_sampling_is_safe_at_extreme_temperatures():
    from moe.lm import sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.9]])
    gen = torch.Generator().manual_seed(0)
    for temperature in (1e-45, 1e-30, 1e-6):  # 1e-45 used to overflow to inf and make softmax NaN
        assert sample_next(logits, temperature, None, gen)[:, 0].tolist() == [1, 0]
        assert sample_next(logits, temperature, 2, gen)[:, 0].tolist() == [1, 0]
    spread = sample_next(logits[:1].repeat(2000, 1), 1e30, None, gen)[:, 0]
    assert set(spread.tolist()) == {0, 1, 2}  # a huge temperature is uniform, not an error
