"""Per-domain validation: loss, bits per byte, and which experts each domain's tokens reach.

    result = evaluate(model, val_sampler, corpus, max_batches=8)

Uses the sampler's fixed validation batches, so numbers from different steps (and from a
resumed run) are comparable. Does not touch any random generator the training loop uses.
"""

from __future__ import annotations

import math

import torch

from moe.train.rng import preserved_rng


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Cross-entropy in nats per token -> bits per byte of the original text."""
    return loss_nats / math.log(2) / bytes_per_token


def _shares(counts: torch.Tensor) -> list[list[float]]:
    """(L, E) assignment counts -> per-layer fractions summing to 1 (uniform when a layer saw nothing)."""
    totals = counts.sum(dim=1, keepdim=True).clamp_min(1)
    return (counts.double() / totals).tolist()


@torch.no_grad()
def evaluate(model, val_sampler, corpus, max_batches: int) -> dict:
    """Metrics of the model on up to `max_batches` validation batches of every corpus domain.

    Returns `val_loss` (nats/token, mean over domains), `val_bpb` (mean over domains of each
    domain's bits per byte), `val_loss_<d>`, `val_bpb_<d>`, `expert_load` (per MoE layer,
    per-expert share of all eval assignments) and `expert_domain_share` (per MoE layer,
    domain -> per-expert share of that domain's assignments). Domains without validation
    text are left out.
    """
    was_training = model.training
    model.eval()
    n_layers, n_experts = len(model.cfg.moe_layers()), model.cfg.n_experts
    device = next(model.parameters()).device
    all_counts = torch.zeros(n_layers, n_experts, dtype=torch.long)
    domain_share: list[dict[str, list[float]]] = [{} for _ in range(n_layers)]
    out: dict = {}
    losses, bpbs = [], []
    try:
        with preserved_rng():
            for domain in corpus.domains:
                nats, tokens = 0.0, 0
                counts = torch.zeros(n_layers, n_experts, dtype=torch.long)
                for x, y in val_sampler.eval_batches(domain, max_batches):
                    model(x.to(device), y.to(device))
                    stats = model.last_stats
                    nats += stats["ce_loss"] * y.numel()      # ce_loss is a mean; weight by batch size
                    tokens += y.numel()
                    counts += stats["expert_counts"].cpu()
                if tokens == 0:
                    continue
                loss = nats / tokens
                bpb = bits_per_byte(loss, corpus.bytes_per_token("val", domain))
                out[f"val_loss_{domain}"], out[f"val_bpb_{domain}"] = loss, bpb
                losses.append(loss)
                bpbs.append(bpb)
                all_counts += counts
                for layer, share in enumerate(_shares(counts)):
                    domain_share[layer][domain] = share
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("no validation batches in any domain; the validation split is empty")
    out["val_loss"] = sum(losses) / len(losses)
    out["val_bpb"] = sum(bpbs) / len(bpbs)
    out["expert_load"] = _shares(all_counts)
    out["expert_domain_share"] = domain_share
    return out
