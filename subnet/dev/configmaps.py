"""Copies the deploy files that Kubernetes needs inside ConfigMaps into their manifests.

The Prometheus configuration and rules (deploy/prometheus) and Grafana's provisioning and dashboard
(deploy/grafana) are the files docker compose mounts; the manifests carry them verbatim as block
scalars of a ConfigMap (tests/deploy/test_k8s.py checks they are equal). After changing one of them:

    python -m subnet.dev.configmaps           # rewrite the stale blocks (make k8s-configmaps)
    python -m subnet.dev.configmaps --check   # exit 1 naming the stale ones
"""

from __future__ import annotations

import argparse
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


def with_block(manifest: str, key: str, content: str) -> str:
    """`manifest` with the literal block of `<key>: |` (at the ConfigMap data's indent) holding `content`."""
    lines = manifest.splitlines(keepends=True)
    header = f"{KEY_INDENT}{key}: |\n"
    if lines.count(header) != 1:
        raise ValueError(f"expected one line {header.strip()!r} in the manifest, found {lines.count(header)}")
    start = lines.index(header) + 1
    end = start
    while end < len(lines) and (not lines[end].strip() or lines[end].startswith(BODY_INDENT)):
        end += 1
    if not content.endswith("\n") or content.endswith("\n\n"):
        raise ValueError(f"{key}: a `|` block keeps exactly one final newline; the file must end with one")
    body = "".join(BODY_INDENT + line if line.strip() else "\n" for line in content.splitlines(keepends=True))
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
