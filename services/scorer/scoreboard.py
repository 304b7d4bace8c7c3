"""The per-round scoreboard a person reads, and the EMA history a plot is drawn from.

Under SCORER_RUN_DIR:

    scoreboard-<round>.json   {"round", "block", "submitted", "skipped", "rows": [...]}
    scoreboard-<round>.md     the same as a markdown table
    scoreboard.md             the latest round's markdown
    ema_history.jsonl         one line per (folded round, hotkey): {"round", "hotkey", "uid", "ema"};
                              `python -m services.scorer.plot` draws scores.png from it

Files are replaced atomically (write, then rename), so a reader never sees half a table.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

from services.scorer.scoring import zero_reason
from subnet.validation_results import ValidationResult

COLUMNS = ("uid", "hotkey", "loss_delta", "diversity", "active_ratio", "verified", "score", "ema", "weight",
           "banned", "reason")
NO_RESULT = "no result this round"


def rows(results: Mapping[str, ValidationResult], scores: Mapping[str, float], ema: Mapping[str, float],
         weights: Mapping[int, float], registered: Mapping[str, int], banned: set[str]) -> list[dict]:
    """One row per registered hotkey that has a result this round or an EMA, by uid."""
    out = []
    for hotkey, uid in sorted(registered.items(), key=lambda kv: kv[1]):
        result = results.get(hotkey)
        if result is None and hotkey not in ema and hotkey not in scores:
            continue
        out.append({"uid": uid, "hotkey": hotkey,
                    "loss_delta": _finite(result.loss_delta) if result else None,
                    "diversity": _finite(result.diversity) if result else None,
                    "active_ratio": _finite(result.active_ratio) if result else None,
                    "verified": bool(result.verified is True) if result else None,
                    "score": scores.get(hotkey), "ema": ema.get(hotkey, 0.0), "weight": weights.get(uid, 0.0),
                    "banned": hotkey in banned,
                    "reason": zero_reason(result) if result else NO_RESULT})
    return out


def markdown(round: int, block: int, submitted: bool, skipped: str, table: list[dict]) -> str:
    status = "weights submitted" if submitted else f"no weights submitted: {skipped}"
    lines = [f"# Scoreboard, round {round}", "", f"Block {block}; {status}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table:
        lines.append("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


class Scoreboard:
    """Writes the files above into one directory (created on first write)."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)

    @property
    def history_path(self) -> Path:
        return self.dir / "ema_history.jsonl"

    def write(self, round: int, block: int, submitted: bool, skipped: str, table: list[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        doc = {"round": round, "block": block, "submitted": submitted, "skipped": skipped, "rows": table}
        text = markdown(round, block, submitted, skipped, table)
        _atomic_write(self.dir / f"scoreboard-{round}.json", json.dumps(doc, indent=1))
        _atomic_write(self.dir / f"scoreboard-{round}.md", text)
        _atomic_write(self.dir / "scoreboard.md", text)

    def append_history(self, round: int, ema: Mapping[str, float], registered: Mapping[str, int]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.history_path, "a+b") as f:
            # A scorer killed mid-write left a line without its newline: end it, so this round's rows
            # start on lines of their own instead of continuing the torn one.
            if f.tell() and (f.seek(-1, 2), f.read(1))[1] != b"\n":
                f.write(b"\n")
        with open(self.history_path, "a") as f:
            for hotkey, value in sorted(ema.items()):
                f.write(json.dumps({"round": round, "hotkey": hotkey, "uid": registered.get(hotkey, -1),
                                    "ema": value}) + "\n")


def _finite(x) -> float | None:
    # NaN is not JSON; None says "not measured" in both the JSON and the table.
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "/")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
