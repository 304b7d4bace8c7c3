"""Draw each miner's EMA over rounds from the scorer's ema_history.jsonl.

    python -m services.scorer.plot runs/scorer      # writes runs/scorer/scores.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load_history(path: Path) -> dict[str, dict[int, float]]:
    """{label: {round: ema}}; a round written twice (a scorer restarted mid-write) keeps the last line,
    and a torn line (a scorer killed mid-write: not JSON) is skipped. ValueError naming the line for a
    JSON line that is not a row the scorer writes."""
    series: dict[str, dict[int, float]] = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        try:
            label = f"uid {int(row.get('uid', -1))} {str(row['hotkey'])[:8]}"
            point = int(row["round"]), float(row["ema"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{path}:{number} is not a row of the scorer's EMA history ({e.__class__.__name__}: "
                             f"{e}); each line is {{\"round\", \"uid\", \"hotkey\", \"ema\"}}") from None
        series.setdefault(label, {})[point[0]] = point[1]
    return series


def plot_ema(history: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and in tests
    import matplotlib.pyplot as plt

    series = load_history(history)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in sorted(series.items()):
        rounds = sorted(points)
        ax.plot(rounds, [points[r] for r in rounds], marker="o", markersize=3, label=label)
    ax.set_xlabel("round")
    ax.set_ylabel("EMA of composite score")
    ax.set_ylim(0, 1)
    ax.set_title("Miner scores over rounds")
    if series:
        ax.legend(fontsize="small", loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    run_dir = Path(argv[0] if argv else "runs/scorer")
    history = run_dir / "ema_history.jsonl"
    if not history.is_file():
        print(f"services.scorer.plot: {history} does not exist; the scorer writes it under SCORER_RUN_DIR",
              file=sys.stderr)
        return 2
    try:
        print(plot_ema(history, run_dir / "scores.png"))
    except ValueError as e:
        print(f"services.scorer.plot: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
