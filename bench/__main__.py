"""Run every benchmark and write bench/results/latest.{json,md}.

    python -m bench [--rounds N] [--only moe_layer,...]
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# Benchmarks fork expert services while gRPC threads run (see tests/conftest.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

# Each part is a module with run(rounds) -> dict (or -> dict of sections when it returns several).
PARTS = {"moe_layer": "bench.moe_layer", "remote_moe_layer": "bench.remote_layer", "wire": "bench.wire",
         "latency": "bench.latency", "latency_base": "bench.latency_base", "serving": "bench.serving",
         "straggler": "bench.straggler", "auth": "bench.auth", "wire8": "bench.wire8"}
MULTI_SECTION = {"remote_moe_layer"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per measurement")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {sorted(PARTS)}")
    args = parser.parse_args(argv)
    # As the router and expert services do first thing (subnet/allocator.py), so this process, which
    # plays the router and the in-process model alike, allocates as a deployed router does.
    from subnet.allocator import reuse_freed_memory
    allocator = "reuse_freed_memory" if reuse_freed_memory() else "default (mallopt unavailable)"
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    chosen = [p for p in args.only.split(",") if p] or list(PARTS)
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {sorted(PARTS)}")

    from bench import report
    sections: dict[str, dict] = {}
    for name in chosen:
        print(f"[bench] {name} ...", flush=True)
        result = importlib.import_module(PARTS[name]).run(rounds=args.rounds)
        sections.update(result if name in MULTI_SECTION else {name: result})
    path = report.write(sections, merge=bool(args.only), allocator=allocator)
    print(report.to_markdown({"meta": {}, **sections}))
    print(f"[bench] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
