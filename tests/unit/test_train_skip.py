"""Trainer: a step whose global gradient norm is NaN or Inf is skipped by the trunk and by every
expert group (no clip factor of 0 read as "no clipping"), and the metrics row stays valid JSON."""

from __future__ import annotations

import math

import pytest
import torch

from moe.boundary import ExpertGroup
from moe.train import TrainConfig, read_metrics
from tests.unit.test_train import corpus, corpus_cfg, make_trainer, tiny_model  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


class StepSpy(ExpertGroup):
    """An external expert group whose gradients have squared norm `norms[step]`."""

    n_experts, dim = 4, 64

    def __init__(self, norms):
        self.norms, self.step, self.calls = norms, 0, []

    def run(self, batches, token_ids=None):
        raise AssertionError("not used")

    def begin_step(self, step):
        self.step = step

    def external_grad_sq_norm(self):
        return self.norms[self.step]

    def apply_external_step(self, lr, grad_scale, settings):
        self.calls.append(("apply", self.step, grad_scale))

    def skip_external_step(self):
        self.calls.append(("skip", self.step))


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0])   # -1: a lying group; sqrt would raise
def test_a_non_finite_global_norm_skips_the_trunk_and_the_experts(corpus, tmp_path, bad):  # noqa: F811
    model = tiny_model(0)
    spy = StepSpy({0: bad, 1: 4.0})
    model.expert_groups = lambda: [spy]
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-3, warmup_steps=0, grad_clip=1.0, eval_every=10)
    trainer = make_trainer(corpus, tmp_path, cfg, model)
    before = _params(model)
    trainer.train_step()
    assert spy.calls == [("skip", 0)]
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} was updated on a skipped step"
    assert not math.isfinite(trainer._last_grad_norm)
    trainer.step = 1
    trainer.train_step()                           # the next step is an ordinary one
    assert spy.calls[1][:2] == ("apply", 1) and 0 < spy.calls[1][2] < 1
    assert any(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_skipped_steps_are_counted_and_the_metrics_row_stays_finite(corpus, tmp_path):  # noqa: F811
    model = tiny_model(0)
    spy = StepSpy({0: 1.0, 1: math.inf, 2: 1.0})
    model.expert_groups = lambda: [spy]
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, grad_clip=1.0, eval_every=3, eval_batches=1)
    trainer = make_trainer(corpus, tmp_path, cfg, model)
    row = trainer.train()
    assert [c[0] for c in spy.calls] == ["apply", "skip", "apply"]
    assert row["skipped_steps"] == 1 and math.isfinite(row["grad_norm"])
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["skipped_steps"] == 1   # written (allow_nan=False)
