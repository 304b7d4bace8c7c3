"""Plots of a training run, drawn from its `metrics.jsonl` into `RUN/plots/`.

    moe plots --run runs/tiny        (also drawn at the end of `moe train`)

- loss.png           train and validation loss per step; validation bits per byte per domain
- expert_load.png    per MoE layer, each expert's share of the evaluation tokens over training (stacked)
- expert_domain.png  per MoE layer, expert x domain heatmap: the share of each domain's tokens
                     that each expert receives (last evaluation); specialization shows as bright cells
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")          # files only: no display on servers and in tests
import matplotlib.pyplot as plt

from moe.train.metrics_log import METRICS_FILE, read_metrics

PLOTS_DIR = "plots"


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _domains(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for r in rows:
        for k in r:
            if k.startswith("val_bpb_") and k[len("val_bpb_"):] not in names:
                names.append(k[len("val_bpb_"):])
    return names


def plot_loss(rows: list[dict], path: Path) -> None:
    fig, (ax_loss, ax_bpb) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation (mean over domains)")):
        steps, values = _series(rows, key)
        ax_loss.plot(steps, values, marker="." if len(steps) < 30 else None, label=label)
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    for domain in _domains(rows):
        steps, values = _series(rows, f"val_bpb_{domain}")
        ax_bpb.plot(steps, values, marker="." if len(steps) < 30 else None, label=domain)
    ax_bpb.set(xlabel="step", ylabel="bits per byte", title="Validation bits per byte by domain")
    ax_bpb.legend()
    ax_bpb.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_load(rows: list[dict], path: Path) -> None:
    rows = [r for r in rows if r.get("expert_load")]
    n_layers = len(rows[-1]["expert_load"]) if rows else 0
    fig, axes = plt.subplots(1, max(1, n_layers), figsize=(4.5 * max(1, n_layers), 3.8), squeeze=False)
    for layer in range(n_layers):
        ax = axes[0][layer]
        steps = [r["step"] for r in rows]
        loads = list(zip(*[r["expert_load"][layer] for r in rows]))      # per expert: its share over time
        ax.stackplot(steps, loads, labels=[f"e{i}" for i in range(len(loads))])
        n = len(loads)
        for i in range(1, n):                                             # where a balanced layer would sit
            ax.axhline(i / n, color="white", lw=0.5, alpha=0.6)
        ax.set(xlabel="step", ylabel="share of assignments", title=f"MoE layer {layer}", ylim=(0, 1))
        if steps:
            ax.set_xlim(min(steps), max(steps))
    if n_layers:
        axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    else:
        axes[0][0].text(0.5, 0.5, "no expert load recorded", ha="center", va="center")
    fig.suptitle("Expert load (evaluation tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_expert_domain(rows: list[dict], path: Path) -> None:
    rows = [r for r in rows if r.get("expert_domain_share")]
    shares = rows[-1]["expert_domain_share"] if rows else []
    n_layers = len(shares)
    fig, axes = plt.subplots(1, max(1, n_layers), figsize=(1.2 + 4.8 * max(1, n_layers), 3.6), squeeze=False,
                             layout="constrained")
    image = None
    for layer, by_domain in enumerate(shares):
        ax = axes[0][layer]
        domains = list(by_domain)
        grid = [by_domain[d] for d in domains]                            # (domains, experts)
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0)
        n_experts = len(grid[0]) if grid else 0
        for d, row in enumerate(grid):
            for e, v in enumerate(row):
                ax.text(e, d, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if v > 0.6 * max(max(r) for r in grid) else "white")
        ax.set_xticks(range(n_experts), [f"e{i}" for i in range(n_experts)])
        ax.set_yticks(range(len(domains)), domains if layer == 0 else [])
        ax.set(xlabel="expert", title=f"MoE layer {layer}")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of the domain's assignments")
    else:
        axes[0][0].text(0.5, 0.5, "no expert/domain shares recorded", ha="center", va="center")
    step = rows[-1]["step"] if rows else 0
    fig.suptitle(f"Which experts each domain's tokens reach (step {step})")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(run_dir: str | os.PathLike) -> list[Path]:
    """Draw every plot of the run in `run_dir`; ValueError when it has no metrics yet."""
    run_dir = Path(run_dir)
    rows = read_metrics(run_dir / METRICS_FILE)
    if not rows:
        raise ValueError(f"{str(run_dir)!r} has no {METRICS_FILE} with rows; is it a training run directory?")
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "loss.png", out / "expert_load.png", out / "expert_domain.png"]
    for draw, path in zip((plot_loss, plot_expert_load, plot_expert_domain), paths):
        tmp = path.with_name(f".{path.stem}.tmp.png")     # a viewer never sees a half-written image
        draw(rows, tmp)
        os.replace(tmp, path)
    return paths
