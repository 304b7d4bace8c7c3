"""Write bench results: latest.json and latest.md (a table of the same numbers).

A full run replaces the file; a partial run (`--only`) replaces only its own sections and
keeps the others, each section carrying the time it was measured.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write(sections: dict[str, dict], results_dir: Path = RESULTS_DIR, merge: bool = False,
          allocator: str = "default") -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "latest.json"
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    previous = {}
    if merge and path.exists():
        try:
            previous = {k: v for k, v in json.loads(path.read_text()).items() if k != "meta"}
        except json.JSONDecodeError:
            previous = {}                       # a damaged file is replaced, not merged
    fresh = {name: {**values, "measured_at": now} for name, values in sections.items()}
    doc = {"meta": {"time": now, "python": platform.python_version(),
                    "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                    "machine": platform.machine(), "allocator": allocator}, **previous, **fresh}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    (results_dir / "latest.md").write_text(to_markdown(doc))
    return path


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def to_markdown(doc: dict) -> str:
    lines = ["| section | key | value |", "|---|---|---|"]
    for section, values in doc.items():
        if section == "meta" or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
            lines.append(f"| {section} | {key} | {_fmt(value)} |")
    meta = doc.get("meta")
    if meta:
        lines.append("")
        lines.append(f"Measured {meta['time']} with torch {meta['torch']} on {meta['cpu_threads']} threads "
                     f"(malloc: {meta.get('allocator', 'default')}).")
    return "\n".join(lines) + "\n"
