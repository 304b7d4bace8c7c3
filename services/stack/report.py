"""What the local stack prints: the training summary, each round's scoreboard as the scorer
writes it, the chain's metagraph and weights, and the history of merged global versions."""

from __future__ import annotations

import json
from pathlib import Path


def training_summary(run: Path, text: str, masked_generate: int, gen_s: float, n_tokens: int) -> None:
    from moe.train.metrics_log import METRICS_FILE, read_metrics

    rows = read_metrics(run / METRICS_FILE)
    last = rows[-1]
    first = rows[0]
    masked_train = sum(r.get("masked_calls") or 0 for r in rows)
    tok_s = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    print("\n" + "=" * 72)
    print(f"sample ({n_tokens} tokens in {gen_s:.1f}s):\n{text}")
    print("-" * 72)
    print(f"steps {last['step']}, {last['tokens']:,} tokens, {last['elapsed_s']:.0f}s")
    print(f"val loss {first['val_loss']:.3f} -> {last['val_loss']:.3f} nats/token, "
          f"val bpb {first['val_bpb']:.3f} -> {last['val_bpb']:.3f}")
    domains = [k[len('val_bpb_'):] for k in last if k.startswith("val_bpb_")]
    print("val bpb by domain: " + ", ".join(f"{d} {last['val_bpb_' + d]:.3f}" for d in domains))
    if tok_s:
        print(f"training throughput: {sum(tok_s) / len(tok_s):,.0f} tokens/s (mean over evaluation intervals)")
    print(f"masked expert calls: {masked_train} in training, {masked_generate} while generating")
    print("expert load per MoE layer (share of validation token assignments):")
    for layer, shares in enumerate(last.get("expert_load") or []):
        print(f"  layer {layer}: " + " ".join(f"{s:.2f}" for s in shares))
    print(f"plots: {run / 'plots'}   metrics: {run / METRICS_FILE}")
    print("-" * 72)


class ScoreboardPrinter:
    """Prints every scoreboard-<round>.md the scorer writes, once, in round order."""

    def __init__(self, scorer_dir: Path):
        self.dir = scorer_dir
        self.printed: set[int] = set()

    def poll(self) -> None:
        for path in sorted(self.dir.glob("scoreboard-*.md"), key=_round_of):
            r = _round_of(path)
            if r in self.printed or r < 0:
                continue
            self.printed.add(r)
            print(f"\n[stack] scoreboard of round {r} ({path}):\n{path.read_text().rstrip()}\n", flush=True)


def _round_of(path: Path) -> int:
    tail = path.stem.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def global_history(store) -> list[str]:
    """One line per merged global version: version, round, parent, signer."""
    lines = []
    keys = sorted((k for k in store.list("checkpoints/global/") if k.endswith("/manifest.json")),
                  key=lambda k: int(k.split("/")[2]) if k.split("/")[2].isdigit() else -1)
    for key in keys:
        try:
            manifest = json.loads(store.get_bytes(key, max_bytes=1 << 20))
        except Exception as e:  # the history is informative: one unreadable entry says so
            lines.append(f"  {key}: unreadable ({e})")
            continue
        lines.append(f"  global v{manifest.get('version')}: round {manifest.get('round')}, parent "
                     f"v{manifest.get('parent_version')}, signed by {str(manifest.get('hotkey'))[:10]}...")
    return lines or ["  (no global version)"]


def chain_status(chain, schedule) -> str:
    from subnet.chain.__main__ import format_status

    return format_status(chain.metagraph(), schedule)
