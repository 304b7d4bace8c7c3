"""Sampling against temperatures a request could send: one that is 0 in float32 (1e-46, 1e-320)
used to divide the logits 0/0 = NaN and make torch.multinomial raise inside the router's decode
loop. The router now refuses them (check_params), and the sampling itself stays finite."""

from __future__ import annotations

import pytest
import torch

from moe import MoELM, preset
from moe.lm import sample_next
from services.router.decode_loop import END, DecodeLoop, SamplingParams
from services.router.generation import MIN_TEMPERATURE, GenerateParams, RequestError, check_params


@pytest.mark.parametrize("temperature", [1e-46, 1e-320, 5e-324])
def test_a_temperature_below_float32s_range_samples_the_argmax(temperature):
    logits = torch.tensor([[1.0, 3.0, 2.0], [5.0, -1.0, 4.9]])
    gen = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature, None, gen)[:, 0].tolist() == [1, 0]
    assert sample_next(logits, temperature, 2, gen)[:, 0].tolist() == [1, 0]


def test_the_decode_loop_samples_a_float32_zero_temperature_as_greedy():
    torch.manual_seed(0)
    model = MoELM(preset("tiny", vocab_size=97, block_size=32)).eval()
    loop = DecodeLoop(model, max_batch=2)
    try:
        items = []
        stream = loop.submit([1, 2, 3], SamplingParams(4, 1e-46, None, torch.Generator().manual_seed(0)))
        while (item := stream.out.get(timeout=30)) is not END:
            assert not isinstance(item, BaseException), item
            items.append(item[0])
    finally:
        loop.close()
    greedy = [int(t[0]) for t in model.stream(torch.tensor([[1, 2, 3]]), 4, temperature=0)]
    assert items == greedy


@pytest.mark.parametrize("temperature", [1e-46, 1e-320, 1e-5, MIN_TEMPERATURE / 2, -0.5, float("nan"),
                                         float("inf")])
def test_check_params_refuses_a_temperature_that_is_neither_0_nor_in_range(temperature):
    with pytest.raises(RequestError) as info:
        check_params(GenerateParams(max_new_tokens=1, temperature=temperature), max_new_tokens=8,
                     names={"temperature": "temperature"})
    assert str(info.value).startswith(f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE:g}")


@pytest.mark.parametrize("temperature", [0.0, MIN_TEMPERATURE, 1.0, 1e308])
def test_check_params_takes_0_and_the_range(temperature):
    check_params(GenerateParams(max_new_tokens=1, temperature=temperature), max_new_tokens=8)
