"""The run's metrics file: one JSON object per evaluation, appended to `DIR/metrics.jsonl`.

Each line is complete JSON written with one call and flushed, so a reader (the plots, a
tail -f) never sees half a row. Non-finite floats are written as null: strict JSON has no NaN.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def _plain(value):
    """JSON-safe copy: tensors and numpy scalars become Python numbers, NaN/inf become None."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricsLog:
    """Appends rows to a jsonl file; knows nothing about what the rows mean."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> None:
        line = json.dumps(_plain(row), allow_nan=False, separators=(",", ":"))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()

    def keep_until(self, step: int) -> None:
        """Drop rows after `step`: a run resumed from step N rewrites what came after N."""
        rows = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, allow_nan=False, separators=(",", ":")) + "\n" for r in rows)
        os.replace(tmp, self.path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every complete row of a metrics file (a torn last line from a crash is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):   # what the trainer writes; anything else is not a metrics row
                rows.append(row)
    return rows
