"""SlotCache: sequences at different positions advance in one forward and each row equals the same
sequence decoded alone (what the router's continuous batching relies on)."""

from __future__ import annotations

import pytest
import torch

from moe import MoELM, preset
from moe.slot_cache import SlotCache


def _model():
    torch.manual_seed(0)
    return MoELM(preset("tiny", vocab_size=97, block_size=32)).eval()


def _alone(model, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    """Logits of the last position after the prompt and after each fed token, one sequence, KVCache."""
    cache = model.new_cache(1)
    out = [model(torch.tensor([prompt]), cache=cache)[0][0, -1]]
    for tok in steps:
        out.append(model(torch.tensor([[tok]]), cache=cache)[0][0, -1])
    return out


@torch.no_grad()
def test_rows_at_different_positions_equal_each_sequence_decoded_alone():
    model = _model()
    prompts = {0: [5, 6, 7, 8, 9, 10, 11], 1: [3], 2: [40, 41, 42]}
    steps = {0: [12, 13, 14], 1: [4, 5, 6], 2: [43, 44, 45]}
    expected = {s: _alone(model, prompts[s], steps[s]) for s in prompts}
    cache = SlotCache.for_model(model, slots=1)
    cache.ensure(3)                       # grows; nothing cached yet to keep
    got = {s: [] for s in prompts}
    for slot in (2, 0, 1):                # prefills one by one, in any slot order
        cache.bind([slot])
        got[slot].append(model(torch.tensor([prompts[slot]]), cache=cache)[0][0, -1])
    for i in range(3):                    # then every step advances all three together
        cache.bind([1, 2, 0])
        logits = model(torch.tensor([[steps[1][i]], [steps[2][i]], [steps[0][i]]]), cache=cache)[0]
        for row, slot in enumerate((1, 2, 0)):
            got[slot].append(logits[row, -1])
    for s in prompts:
        for a, b in zip(got[s], expected[s]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert cache.lengths[:3] == [10, 4, 6]


@torch.no_grad()
def test_a_reset_slot_starts_a_new_sequence_and_growth_keeps_cached_keys():
    model = _model()
    cache = SlotCache.for_model(model, slots=1)
    cache.bind([0])
    model(torch.tensor([[1, 2, 3, 4, 5, 6]]), cache=cache)     # a longer, older sequence in slot 0
    cache.reset(0)
    cache.bind([0])
    fresh = model(torch.tensor([[7, 8]]), cache=cache)[0][0, -1]
    torch.testing.assert_close(fresh, _alone(model, [7, 8], [])[0], atol=1e-5, rtol=1e-4)
    cache.ensure(5)                                             # reallocates: slot 0 must survive
    cache.bind([0])
    step = model(torch.tensor([[9]]), cache=cache)[0][0, -1]
    torch.testing.assert_close(step, _alone(model, [7, 8], [9])[1], atol=1e-5, rtol=1e-4)


def test_bind_refuses_repeated_or_unknown_slots_and_rows_must_match():
    model = _model()
    cache = SlotCache.for_model(model, slots=2)
    for rows in ([], [0, 0], [2], [-1]):
        with pytest.raises(ValueError, match="distinct slots"):
            cache.bind(rows)
    cache.bind([0, 1])
    with pytest.raises(ValueError, match="bound to 2 slots"):
        model(torch.tensor([[1]]), cache=cache)


def test_a_slot_cannot_run_past_the_context():
    model = _model()
    cache = SlotCache.for_model(model, slots=2)
    cache.bind([1])
    model(torch.tensor([list(range(30))]), cache=cache)
    cache.bind([0, 1])
    with pytest.raises(ValueError, match="block_size"):
        model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache=cache)
