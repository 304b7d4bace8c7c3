"""The client side of part 2e (`bench.serving`): C concurrent Generate streams against a router.

    python -m bench.serving_clients ENDPOINT STREAMS PROMPT_TOKENS TOKENS   # prints one JSON line

It runs in a process of its own, as a router's clients do: Python client threads inside the
router's process would take its GIL for every token they receive (about 5% of the 16-stream
throughput in a side-by-side run), which no deployment pays. Arrival times are taken here, so
the numbers are what a client sees.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import grpc

from bench.timing import percentiles
from subnet.wire.v1 import router_pb2, router_pb2_grpc

READY_TIMEOUT_S, STREAM_TIMEOUT_S = 30, 600


def measure(endpoint: str, streams: int, prompt_tokens: int, tokens: int) -> dict:
    """Open `streams` Generate streams at one moment (a barrier, once every channel is ready), greedy,
    `tokens` new tokens each; tokens/s, per-token gaps p50/p99 (first token left out) and its TTFT."""
    barrier = threading.Barrier(streams + 1)
    arrivals: list[list[float]] = [[] for _ in range(streams)]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        request = router_pb2.GenerateRequest(prompt_tokens=[(7 * i + j) % 4096 + 1 for j in range(prompt_tokens)],
                                             max_new_tokens=tokens, temperature=0.0)
        try:
            with grpc.insecure_channel(endpoint, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
                grpc.channel_ready_future(channel).result(timeout=READY_TIMEOUT_S)
                stub = router_pb2_grpc.RouterStub(channel)
                barrier.wait()
                for _ in stub.Generate(request, timeout=STREAM_TIMEOUT_S):
                    arrivals[i].append(time.perf_counter())
        except BaseException as e:   # noqa: BLE001 (reported below, with the others)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass   # a client failed before the start: its error is raised below
    started = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {streams} streams failed: {errors[0]!r}")
    if any(len(a) != tokens for a in arrivals):
        raise RuntimeError(f"streams ended early: {[len(a) for a in arrivals]} tokens")
    gaps = [b - a for times in arrivals for a, b in zip(times, times[1:])]
    ttft = [times[0] - started for times in arrivals]
    wall = max(times[-1] for times in arrivals) - started
    ms = {k: v * 1e3 for k, v in percentiles(gaps, (50, 99)).items()}
    return {"streams": streams, "tokens_per_s": streams * tokens / wall, "token_p50_ms": ms["p50"],
            "token_p99_ms": ms["p99"], "ttft_p50_ms": percentiles(ttft, (50,))["p50"] * 1e3, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("endpoint")
    for name in ("streams", "prompt_tokens", "tokens"):
        parser.add_argument(name, type=int)
    args = parser.parse_args()
    if min(args.streams, args.prompt_tokens, args.tokens) < 1:
        parser.error("streams, prompt_tokens and tokens must be at least 1")
    print(json.dumps(measure(args.endpoint, args.streams, args.prompt_tokens, args.tokens)), flush=True)


if __name__ == "__main__":
    main()
