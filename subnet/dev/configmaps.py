"""Copies the deploy files that Kubernetes needs inside ConfigMaps into their manifests.

The Prometheus configuration and rules (deploy/prometheus) and Grafana's provisioning and dashboard
(deploy/grafana) are the files docker compose mounts; the manifests carry them verbatim as block
scalars of a ConfigMap (tests/deploy/test_k8s.py checks they are equal). After changing one of them:

    python -m subnet.dev.configmaps           # rewrite the stale blocks (make k8s-configmaps)
    python -m subnet.dev.configmaps --check   # exit 1 naming the stale ones
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# (manifest, ConfigMap key, source file), paths relative to the repository.
SYNCED = (
    ("deploy/k8s/50-prometheus.yaml", "prometheus.yml", "deploy/prometheus/prometheus-k8s.yml"),
    ("deploy/k8s/50-prometheus.yaml", "rules.yml", "deploy/prometheus/rules.yml"),
    ("deploy/k8s/56-grafana.yaml", "datasources.yml", "deploy/grafana/provisioning/datasources/datasources.yml"),
    ("deploy/k8s/56-grafana.yaml", "dashboards.yml", "deploy/grafana/provisioning/dashboards/dashboards.yml"),
    ("deploy/k8s/56-grafana.yaml", "moe-subnet.json", "deploy/grafana/dashboards/moe-subnet.json"),
)
KEY_INDENT, BODY_INDENT = "  ", "    "   # `data:` entries and their block's lines


def _lines(text: str) -> list[str]:
    """`text` split after each newline only (str.splitlines also splits on \\r, form feeds, ...)."""
    return re.split(r"(?<=\n)", text)[:-1] if text.endswith("\n") else re.split(r"(?<=\n)", text)


def check_content(key: str, content: str) -> None:
    """ValueError unless `content` comes back unchanged from a `|` block indented by BODY_INDENT."""
    lines = _lines(content)
    if not content.endswith("\n") or content.endswith("\n\n"):
        raise ValueError(f"{key}: a `|` block keeps exactly one final newline; the file must end with one")
    if "\r" in content:
        raise ValueError(f"{key}: carriage returns (CRLF line ends?) do not survive a YAML block; use \\n")
    if any(line.strip(" \t\n") == "" and line != "\n" for line in lines):
        raise ValueError(f"{key}: a line of only spaces or tabs; empty it (YAML would not keep it as is)")
    first = next((line for line in lines if line != "\n"), None)
    if first is None:
        raise ValueError(f"{key}: the file is empty")
    if first[0] in " \t":
        raise ValueError(f"{key}: the first non-empty line is indented; YAML takes a block's indent from it")


def with_block(manifest: str, key: str, content: str) -> str:
    """`manifest` with the literal block of `<key>: |` (at the ConfigMap data's indent) holding `content`;
    blank lines after the block, and everything else, as they were."""
    check_content(key, content)
    lines = _lines(manifest)
    header = f"{KEY_INDENT}{key}: |\n"
    if lines.count(header) != 1:
        raise ValueError(f"expected one line {header.strip()!r} in the manifest, found {lines.count(header)}")
    start = lines.index(header) + 1
    end = start
    while end < len(lines) and (lines[end] == "\n" or lines[end].startswith(BODY_INDENT)):
        end += 1
    while end > start and lines[end - 1] == "\n":   # blank lines between this block and what follows
        end -= 1
    body = "".join(line if line == "\n" else BODY_INDENT + line for line in _lines(content))
    return "".join(lines[:start]) + body + "".join(lines[end:])


def stale(root: Path = ROOT) -> dict[str, str]:
    """{manifest path: its text with every block synced} for the manifests that differ from their sources."""
    texts: dict[str, str] = {}
    for manifest, key, source in SYNCED:
        current = texts.get(manifest) or (root / manifest).read_text()
        texts[manifest] = with_block(current, key, (root / source).read_text())
    return {m: t for m, t in texts.items() if t != (root / m).read_text()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subnet.dev.configmaps", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a manifest is stale")
    args = parser.parse_args(argv)
    changed = stale()
    for manifest, text in changed.items():
        if args.check:
            print(f"{manifest}: its ConfigMap differs from the files it carries; run "
                  f"`python -m subnet.dev.configmaps`", file=sys.stderr)
        else:
            (ROOT / manifest).write_text(text)
            print(f"updated {manifest}")
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
