"""MoEClassifier and a synthetic task on which experts visibly specialize.

    python -m moe.classifier        # trains on clustered data, prints the cluster x expert table

The data: points drawn around C cluster centres; each cluster has its own random linear
labelling rule. One linear head cannot serve every rule at once, so the gate learns to
send each cluster to the experts that model its rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe.layer import MoE


class MoEClassifier(nn.Module):
    """features (B, dim) -> MoE block with residual -> RMSNorm -> linear head (B, n_classes)."""

    def __init__(self, dim: int, n_experts: int, n_activated_experts: int, moe_inter_dim: int, n_classes: int,
                 **moe_kwargs):
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes}")
        self.moe = MoE(dim, n_experts, n_activated_experts, moe_inter_dim, **moe_kwargs)
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        h, aux = self.moe(x)
        logits = self.head(self.norm(x + h))
        loss = None if labels is None else F.cross_entropy(logits, labels) + aux
        return logits, loss


@dataclass(frozen=True)
class ClusteredData:
    x: torch.Tensor          # (N, dim)
    labels: torch.Tensor     # (N,) class per point
    clusters: torch.Tensor   # (N,) cluster per point


def make_clustered_data(n: int, dim: int, n_clusters: int, n_classes: int, seed: int = 0,
                        sample_seed: int = 0, spread: float = 0.3) -> ClusteredData:
    """Points around centres of norm 3; labels from a per-cluster random linear rule.

    `seed` fixes the task (centres and rules); `sample_seed` the points drawn from it, so a
    test set is the same task with fresh points.
    """
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, dim, generator=g), dim=-1) * 3.0
    rules = torch.randn(n_clusters, dim, n_classes, generator=g)
    g = torch.Generator().manual_seed(1_000_003 * (sample_seed + 1) + seed)
    clusters = torch.randint(0, n_clusters, (n,), generator=g)
    offsets = torch.randn(n, dim, generator=g) * spread
    x = centres[clusters] + offsets
    labels = torch.einsum("nd,ndc->nc", offsets, rules[clusters]).argmax(dim=-1)
    return ClusteredData(x=x, labels=labels, clusters=clusters)


def train_classifier(model: MoEClassifier, data: ClusteredData, steps: int = 400, batch_size: int = 256,
                     lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Plain AdamW loop on random minibatches; returns the loss per step."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, data.x.shape[0], (batch_size,), generator=g)
        _, loss = model(data.x[idx], data.labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def cluster_expert_share(model: MoEClassifier, data: ClusteredData, n_clusters: int) -> torch.Tensor:
    """(n_clusters, n_experts): share of each cluster's assignments that each expert receives."""
    model.eval()
    routing = model.moe.gate(data.x)
    table = torch.zeros(n_clusters, model.moe.n_experts)
    for slot in range(routing.experts.shape[1]):
        table.index_put_((data.clusters, routing.experts[:, slot]), torch.ones(data.x.shape[0]), accumulate=True)
    return table / table.sum(dim=1, keepdim=True)


@torch.no_grad()
def accuracy(model: MoEClassifier, data: ClusteredData) -> float:
    model.eval()
    logits, _ = model(data.x)
    return float((logits.argmax(dim=-1) == data.labels).float().mean())


def specialization_demo(dim: int = 16, n_experts: int = 8, k: int = 2, n_clusters: int = 4, n_classes: int = 4,
                        steps: int = 400, seed: int = 0) -> dict:
    """Train on clustered data; report accuracy and how concentrated each cluster's routing is."""
    torch.manual_seed(seed)
    train = make_clustered_data(8192, dim, n_clusters, n_classes, seed=seed, sample_seed=0)
    test = make_clustered_data(2048, dim, n_clusters, n_classes, seed=seed, sample_seed=1)
    model = MoEClassifier(dim, n_experts, k, 4 * dim, n_classes)
    before = accuracy(model, test)
    losses = train_classifier(model, train, steps=steps, seed=seed)
    share = cluster_expert_share(model, test, n_clusters)
    # Share of a cluster's assignments that land on its k favourite experts; k/E if routing ignored clusters.
    top_k_share = share.topk(k, dim=1).values.sum(dim=1)
    return {"accuracy_before": before, "accuracy_after": accuracy(model, test), "first_loss": losses[0],
            "last_loss": sum(losses[-20:]) / 20, "cluster_expert_share": share, "top_k_share": top_k_share,
            "uniform_top_k_share": k / n_experts}


def format_report(report: dict) -> str:
    share = report["cluster_expert_share"]
    lines = [f"accuracy {report['accuracy_before']:.3f} -> {report['accuracy_after']:.3f}, "
             f"loss {report['first_loss']:.3f} -> {report['last_loss']:.3f}",
             "share of each cluster's token assignments per expert:",
             "cluster " + " ".join(f"  e{e}" for e in range(share.shape[1])) + "   top-k share"]
    for c, row in enumerate(share):
        lines.append(f"{c:>7} " + " ".join(f"{v:4.2f}" for v in row) + f"   {float(report['top_k_share'][c]):.2f}")
    lines.append(f"(a gate that ignored clusters would give top-k share {report['uniform_top_k_share']:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_report(specialization_demo()))
