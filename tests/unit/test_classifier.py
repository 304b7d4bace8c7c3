"""MoEClassifier learns the clustered task and its experts specialize by cluster."""

import pytest
import torch

from moe import MoEClassifier
from moe.classifier import specialization_demo


def test_experts_specialize_by_cluster():
    report = specialization_demo(steps=300, seed=0)
    assert report["accuracy_after"] > 0.8 > report["accuracy_before"]
    # Each cluster sends most of its assignments to its own favourite experts.
    assert float(report["top_k_share"].mean()) > 2.4 * report["uniform_top_k_share"]


def test_classifier_shapes_and_errors():
    model = MoEClassifier(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=16, n_classes=3)
    logits, loss = model(torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1]))
    assert logits.shape == (5, 3) and loss.dim() == 0
    with pytest.raises(ValueError, match="n_classes"):
        MoEClassifier(dim=8, n_experts=4, n_activated_experts=2, moe_inter_dim=16, n_classes=1)
