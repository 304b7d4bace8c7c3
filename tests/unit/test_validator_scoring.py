"""The validator's pure functions: output similarity, diversity, token shares, active ratio, copy
and live-check decisions (NaN never counts as good), and the merge arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from services.validator.merge import replica_scores
from services.validator.outer_step import nesterov_step, select_replicas, weighted_average
from services.validator.scoring import (
    active_ratio,
    diversity,
    is_copy,
    live_mismatch,
    loss_delta,
    max_abs_diff,
    output_cosine,
    token_shares,
)
from subnet.validation_results import ValidationResult

NAN = math.nan


def test_output_cosine_same_opposite_orthogonal_and_undefined():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert output_cosine(a, 3 * a) == pytest.approx(1.0)
    assert output_cosine(a, -a) == pytest.approx(-1.0)
    assert output_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])) == pytest.approx(0.0)
    assert math.isnan(output_cosine(a, torch.zeros_like(a)))
    assert math.isnan(output_cosine(a, torch.tensor([[1.0, NAN], [0.0, 1.0]])))
    with pytest.raises(ValueError, match="different shapes"):
        output_cosine(a, a[:1])


def test_max_abs_diff():
    a = torch.zeros(3, 2)
    b = a.clone()
    b[1, 1] = -0.25
    assert max_abs_diff(a, b) == pytest.approx(0.25)
    assert math.isnan(max_abs_diff(a, b.fill_(math.inf)))


def test_diversity_is_one_minus_mean_similarity_clipped_and_skips_nan():
    assert diversity([[0.2, 0.4], [0.0]]) == pytest.approx(1 - (0.3 + 0.0) / 2)
    assert diversity([[1.0, 1.0]]) == 0.0                  # a copy of its neighbours
    assert diversity([[-0.5, -0.9]]) == 1.0                # anti-correlated clips to 1
    assert diversity([[NAN, 0.5], [NAN]]) == pytest.approx(0.5)  # NaN entries and all-NaN experts left out
    assert math.isnan(diversity([[NAN]])) and math.isnan(diversity([]))


def test_token_shares_and_active_ratio():
    assert token_shares(torch.tensor([6, 2, 0, 0])) == [0.75, 0.25, 0.0, 0.0]
    assert all(math.isnan(s) for s in token_shares([0, 0]))  # the layer saw no tokens
    with pytest.raises(ValueError):
        token_shares([1, -1])
    assert active_ratio([0.5, 0.03, 0.01], threshold=0.02) == pytest.approx(2 / 3)
    assert active_ratio([0.02], threshold=0.02) == 1.0
    assert active_ratio([NAN, 0.5], threshold=0.02) == 1.0
    assert math.isnan(active_ratio([NAN], 0.02)) and math.isnan(active_ratio([], 0.02))


def test_copy_needs_every_shared_expert_above_the_threshold():
    assert is_copy({"0.1": 0.9999, "1.2": 0.99995}, 0.999)
    assert not is_copy({"0.1": 0.9999, "1.2": 0.98}, 0.999)   # one expert of its own: not a copy
    assert not is_copy({"0.1": NAN}, 0.999)                   # cannot be compared: not a copy
    assert not is_copy({}, 0.999)                              # nothing shared


def test_live_mismatch_thresholds_and_nan():
    assert live_mismatch(0.995, 0.05, 0.99, 0.1) == ""
    assert "cosine 0.9800" in live_mismatch(0.98, 0.05, 0.99, 0.1)
    assert "max abs 0.2" in live_mismatch(0.999, 0.2, 0.99, 0.1)
    assert live_mismatch(NAN, 0.0, 0.99, 0.1).startswith("live service does not serve the published weights")


def test_loss_delta_sign_and_nan():
    assert loss_delta(3.0, 2.5) == pytest.approx(0.5)
    assert math.isnan(loss_delta(3.0, NAN)) and math.isnan(loss_delta(math.inf, 2.0))


def test_select_replicas_top_k_positive_only_weighted_by_score():
    chosen = select_replicas({"a": 0.3, "b": 0.1, "c": 0.05}, top_k=2)
    assert [h for h, _ in chosen] == ["a", "b"] and [w for _, w in chosen] == pytest.approx([0.75, 0.25])
    assert select_replicas({"a": 0.3, "b": -0.1}, top_k=2) == [("a", 1.0)]
    assert select_replicas({"a": -0.3, "b": 0.0, "c": NAN}, top_k=3) == []   # keep the global expert
    assert select_replicas({"b": 0.2, "a": 0.2}, top_k=1) == [("a", 1.0)]    # ties: lower hotkey
    with pytest.raises(ValueError):
        select_replicas({"a": 1.0}, top_k=0)


def test_weighted_average():
    s1, s2 = {"w": torch.ones(2, 2)}, {"w": torch.full((2, 2), 3.0)}
    torch.testing.assert_close(weighted_average([s1, s2], [0.75, 0.25])["w"], torch.full((2, 2), 1.5))
    with pytest.raises(ValueError):
        weighted_average([s1, s2], [0.5, 0.6])
    with pytest.raises(ValueError):
        weighted_average([s1, {"v": torch.ones(2, 2)}], [0.5, 0.5])


def test_nesterov_step_lr_1_without_momentum_lands_on_the_average():
    g, avg = {"w": torch.tensor([1.0, -2.0])}, {"w": torch.tensor([0.5, 4.0])}
    new, m = nesterov_step(g, avg, None, lr=1.0, mu=0.0)
    torch.testing.assert_close(new["w"], avg["w"])
    torch.testing.assert_close(m["w"], g["w"] - avg["w"])


def test_nesterov_step_uses_and_updates_momentum():
    g, avg = {"w": torch.tensor([1.0])}, {"w": torch.tensor([0.0])}     # delta = 1
    new, m = nesterov_step(g, avg, {"w": torch.tensor([2.0])}, lr=0.5, mu=0.9)
    torch.testing.assert_close(m["w"], torch.tensor([0.9 * 2.0 + 1.0]))
    torch.testing.assert_close(new["w"], torch.tensor([1.0 - 0.5 * (1.0 + 0.9 * 2.8)]))
    assert torch.equal(g["w"], torch.tensor([1.0]))                    # nothing changed in place
    with pytest.raises(ValueError):
        nesterov_step(g, avg, None, lr=0.5, mu=1.0)


def test_replica_scores_keep_verified_non_copies_with_finite_scores():
    ok = ValidationResult(1, "ok", experts=("0.1", "1.0"), verified=True, loss_delta=0.2)
    results = {"ok": ok,
               "unverified": ValidationResult(1, "unverified", experts=("0.1",), verified=False, loss_delta=0.5),
               "copy": ValidationResult(1, "copy", experts=("0.1",), verified=True, loss_delta=0.5, copy_of="ok",
                                        reason="copy of ok"),
               "nan": ValidationResult(1, "nan", experts=("0.1",), verified=True)}
    assert replica_scores(results, None) == {"0.1": {"ok": 0.2}, "1.0": {"ok": 0.2}}
    assert replica_scores(results, {"ok": -1.0, "copy": 9.0}) == {"0.1": {"ok": -1.0}, "1.0": {"ok": -1.0}}
    assert replica_scores({"ok": ok}, {}) == {}   # the scorer scored it: no score, no merge
