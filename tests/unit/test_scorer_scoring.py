"""Scoring as pure functions (services/scorer/scoring.py): composite score, EMA, weights, bans.

The robustness properties: NaN, a missing miner or one absurd value changes only that miner's
own score, and never produces NaN."""

import math

import pytest

from services.scorer.scoring import (
    ScoreWeights,
    banned_hotkeys,
    composite_score,
    ema_step,
    fold_round,
    loss_score,
    unit,
    weights_by_uid,
    zero_reason,
)
from subnet.validation_results import ValidationResult

W = ScoreWeights()           # 0.6 / 0.2 / 0.2
SCALE = 0.05


def result(hotkey="a", loss_delta=0.0, diversity=0.5, active_ratio=1.0, verified=True, **kw):
    return ValidationResult(round=1, hotkey=hotkey, verified=verified, loss_delta=loss_delta,
                            diversity=diversity, active_ratio=active_ratio, **kw)


def scores_of(results):
    return {r.hotkey: composite_score(r, W, SCALE) for r in results}


def test_loss_score_pays_only_improvement_monotone_and_bounded():
    deltas = [-1e30, -1.0, -0.25, -0.05, 0.0, 0.01, 0.05, 0.25, 1.0, 1e30, math.inf]
    values = [loss_score(d, SCALE) for d in deltas]
    assert values == sorted(values)
    assert loss_score(0.0, SCALE) == 0.0                       # republishing the global model earns nothing
    assert loss_score(-0.25, SCALE) == 0.0                     # harmful earns nothing
    assert loss_score(0.05, SCALE) == pytest.approx(math.tanh(0.05 / SCALE))
    assert values[0] == 0.0 and values[-1] == 1.0
    assert loss_score(math.nan, SCALE) == 0.0 and loss_score(-math.inf, SCALE) == 0.0
    with pytest.raises(ValueError, match="loss scale"):
        loss_score(0.1, 0.0)


def test_composite_is_the_documented_formula():
    r = result(loss_delta=0.05, diversity=0.4, active_ratio=0.75)
    expected = math.tanh(0.05 / SCALE) * (0.6 + 0.2 * 0.4 + 0.2 * 0.75)
    assert composite_score(r, W, SCALE) == pytest.approx(expected)
    # Weights are divided by their sum: doubling them all changes nothing.
    assert composite_score(r, ScoreWeights(1.2, 0.4, 0.4), SCALE) == pytest.approx(expected)
    # A lazy miner (no improvement) earns nothing however diverse and active the global experts are.
    assert composite_score(result(loss_delta=0.0, diversity=1.0, active_ratio=1.0), W, SCALE) == 0.0


@pytest.mark.parametrize("gated", [
    dict(verified=False),
    dict(reason="manifest hash mismatch"),
    dict(copy_of="5Fcopied", reason="copy"),
    dict(verified="false"),                    # malformed: a string is not True
])
def test_verification_gate_zeroes_the_score(gated):
    r = result(loss_delta=1.0, diversity=1.0, active_ratio=1.0, **gated)
    assert composite_score(r, W, SCALE) == 0.0
    assert zero_reason(r)
    assert zero_reason(result()) == ""
    assert zero_reason(result(verified=False)) == "not verified"


@pytest.mark.parametrize("bad", [
    dict(loss_delta=math.nan), dict(diversity=math.nan), dict(active_ratio=math.nan),
    dict(loss_delta=math.nan, diversity=math.nan, active_ratio=math.nan),
    dict(loss_delta=1e30), dict(loss_delta=-1e30), dict(diversity=7.0), dict(active_ratio=-3.0),
    dict(loss_delta=math.inf, diversity=-math.inf), dict(diversity=None),
])
def test_one_bad_miner_changes_no_other_score_and_never_gives_nan(bad):
    others = [result("a", 0.02, 0.3, 0.9), result("b", -0.1, 0.8, 0.5), result("c", 0.0, 0.0, 0.0)]
    baseline = scores_of(others)
    mixed = scores_of(others + [result("x", **{**dict(loss_delta=0.0, diversity=0.5, active_ratio=1.0), **bad})])
    assert {k: v for k, v in mixed.items() if k != "x"} == baseline
    assert 0.0 <= mixed["x"] <= 1.0 and not math.isnan(mixed["x"])


def test_nan_inputs_give_zero_for_those_parts():
    # NaN loss counts 0, not 0.5: a miner that could not be measured earns nothing for it.
    assert composite_score(result(loss_delta=math.nan, diversity=math.nan, active_ratio=math.nan), W, SCALE) == 0.0
    assert composite_score(result(loss_delta=math.nan, diversity=1.0, active_ratio=1.0), W, SCALE) == 0.0
    assert composite_score(result(loss_delta=1.0, diversity=math.nan, active_ratio=math.nan), W, SCALE) == \
        pytest.approx(0.6)
    assert unit(math.nan) == 0.0 and unit(7) == 1.0 and unit(-1) == 0.0 and unit("x") == 0.0


def test_score_weights_are_checked():
    for bad in [(-0.1, 0.5, 0.5), (0, 0, 0), (math.nan, 1, 1), (math.inf, 1, 1)]:
        with pytest.raises(ValueError):
            ScoreWeights(*bad)


def test_ema_step():
    assert ema_step(None, 1.0, 0.3) == pytest.approx(0.3)       # starts from 0
    assert ema_step(0.5, 0.0, 0.3) == pytest.approx(0.35)
    assert ema_step(math.nan, math.nan, 0.3) == 0.0
    assert ema_step(0.5, 1e30, 0.3) == pytest.approx(0.65)      # a score is clipped to 1
    with pytest.raises(ValueError, match="alpha"):
        ema_step(0.5, 0.5, 0.0)


def test_fold_round_missing_scores_decay_and_new_hotkeys_start_at_zero():
    ema = {"a": 0.5, "b": 0.4}
    uid_of = {"a": 0, "b": 1}
    registered = {"a": 0, "b": 1, "c": 2, "d": 3}
    out = fold_round(ema, uid_of, {"a": 1.0, "c": 0.6}, registered, alpha=0.5)
    assert out == pytest.approx({"a": 0.75, "b": 0.2, "c": 0.3})  # b missing: decays; d never scored: absent


def test_fold_round_resets_a_re_registered_hotkey_and_drops_deregistered_ones():
    ema = {"old": 0.9, "moved": 0.8, "stay": 0.5}
    uid_of = {"old": 3, "moved": 4, "stay": 5}
    # uid 3 now belongs to "new"; "moved" re-registered on uid 6; "old" is gone.
    registered = {"new": 3, "moved": 6, "stay": 5}
    out = fold_round(ema, uid_of, {"new": 1.0, "moved": 1.0, "stay": 1.0}, registered, alpha=0.5)
    assert out == pytest.approx({"new": 0.5, "moved": 0.5, "stay": 0.75})
    # A hotkey with an EMA but no recorded uid is treated as new too (no score: no entry at all).
    assert fold_round({"x": 0.9}, {}, {}, {"x": 1}, alpha=0.5) == {}
    assert fold_round({"x": 0.9}, {}, {"x": 0.4}, {"x": 1}, alpha=0.5) == pytest.approx({"x": 0.2})


def test_weights_normalize_over_registered_uids_and_resist_bad_values():
    registered = {"a": 0, "b": 1, "c": 2, "gone": 9}
    assert weights_by_uid({"a": 0.3, "b": 0.1, "c": 0.0}, registered) == pytest.approx({0: 0.75, 1: 0.25})
    assert weights_by_uid({"a": 0.0, "b": 0.0}, registered) == {}
    assert weights_by_uid({}, registered) == {}
    # Not registered -> no weight; NaN -> 0; an absurd value is clipped to a perfect miner's share.
    assert weights_by_uid({"a": 0.3, "b": 0.1, "x": 5.0}, registered) == pytest.approx({0: 0.75, 1: 0.25})
    assert weights_by_uid({"a": 0.3, "b": 0.1, "c": math.nan}, registered) == pytest.approx({0: 0.75, 1: 0.25})
    assert weights_by_uid({"a": 1.0, "b": 1e30}, registered) == pytest.approx({0: 0.5, 1: 0.5})
    w = weights_by_uid({"a": 0.2, "b": 0.7, "c": 0.1}, registered)
    assert sum(w.values()) == pytest.approx(1.0) and list(w) == sorted(w)


def test_a_banned_miner_keeps_its_ema_but_gets_no_weight():
    """Caught copying (or unverified) after earning: its EMA decays over the following rounds, but the
    weights leave it out while it is banned, and the others share its part."""
    registered = {"a": 0, "b": 1, "copier": 2}
    ema = {"a": 0.3, "b": 0.1, "copier": 0.2}
    assert weights_by_uid(ema, registered)[2] == pytest.approx(1 / 3)
    assert weights_by_uid(ema, registered, banned={"copier"}) == pytest.approx({0: 0.75, 1: 0.25})
    assert weights_by_uid(ema, registered, banned={"a", "b", "copier"}) == {}


def test_banned_hotkeys():
    registered = {"a": 0, "b": 1, "c": 2, "d": 3}
    ema = {"a": 0.5, "b": 0.001, "c": 0.5}
    assert banned_hotkeys(ema, {"c", "unregistered"}, registered, ban_ema=0.01) == {"b", "c"}
    assert banned_hotkeys(ema, set(), registered, ban_ema=0.0) == set()
