"""subnet/optimizer_moments.py: AdamW moments saved and restored continue training exactly, and
moments that do not fit the expert are refused with the reason, leaving the optimizer as it was."""

import pytest
import torch

from moe.experts import SwiGLU
from subnet.optimizer_moments import (
    MomentsError,
    adamw_moments,
    moments_bytes,
    parse_moments,
    restore_adamw_moments,
)

DIM, INTER = 8, 16


def expert(seed=0):
    torch.manual_seed(seed)
    return SwiGLU(DIM, INTER)


def step(module, optimizer, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_restored_moments_continue_training_exactly():
    straight = expert()
    opt = torch.optim.AdamW(straight.parameters(), lr=0.05, betas=(0.9, 0.95))
    for s in range(3):
        step(straight, opt, s)

    before = expert()
    opt_before = torch.optim.AdamW(before.parameters(), lr=0.05, betas=(0.9, 0.95))
    for s in range(2):
        step(before, opt_before, s)
    data = moments_bytes(adamw_moments(before, opt_before))

    resumed = expert(seed=1)
    resumed.load_state_dict(before.state_dict())
    opt_resumed = torch.optim.AdamW(resumed.parameters(), lr=0.05, betas=(0.9, 0.95))
    restore_adamw_moments(resumed, opt_resumed, parse_moments(data, "test"))
    step(resumed, opt_resumed, 2)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name

    # Without the moments the third step is Adam's first again: a different update.
    fresh = expert(seed=1)
    fresh.load_state_dict(before.state_dict())
    opt_fresh = torch.optim.AdamW(fresh.parameters(), lr=0.05, betas=(0.9, 0.95))
    step(fresh, opt_fresh, 2)
    assert not torch.equal(fresh.w1.weight, straight.w1.weight)


def test_no_moments_before_the_first_step():
    module = expert()
    assert adamw_moments(module, torch.optim.AdamW(module.parameters())) == {}


def saved():
    module = expert()
    opt = torch.optim.AdamW(module.parameters(), lr=0.01)
    step(module, opt, 0)
    return adamw_moments(module, opt)


def drop(t):
    t.pop("w2.weight.exp_avg")
    return t


def reshape(t):
    t["w1.weight.exp_avg"] = torch.zeros(3, 3)
    return t


def nan(t):
    t["w3.weight.exp_avg"][0, 0] = float("nan")
    return t


def negative(t):
    t["w3.weight.exp_avg_sq"][1, 1] = -1.0
    return t


def zero_step(t):
    t["w1.weight.step"] = torch.tensor(0.0)
    return t


def half_step(t):
    t["w1.weight.step"] = torch.tensor(1.5)
    return t


def extra(t):
    t["w1.bias.exp_avg"] = torch.zeros(INTER)
    return t


@pytest.mark.parametrize("spoil, words", [(drop, "missing ['w2.weight.exp_avg']"), (reshape, "shape [3, 3]"),
                                          (nan, "not finite"), (negative, "negative"),
                                          (zero_step, "whole number >= 1"), (half_step, "whole number >= 1"),
                                          (extra, "unexpected ['w1.bias.exp_avg']")])
def test_moments_that_do_not_fit_are_refused_and_change_nothing(spoil, words):
    module = expert()
    opt = torch.optim.AdamW(module.parameters(), lr=0.01)
    with pytest.raises(MomentsError, match=words.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        restore_adamw_moments(module, opt, spoil(saved()), source="spoiled")
    assert not opt.state   # not even the parameters checked before the bad one


def test_unreadable_or_wrong_dtype_files_are_refused():
    with pytest.raises(MomentsError, match="not a readable safetensors file"):
        parse_moments(b"\x00" * 40, "garbage")
    half = {k: v.half() for k, v in saved().items()}
    with pytest.raises(MomentsError, match="float16"):
        parse_moments(moments_bytes(half), "half")
