"""Container health check over the standard grpc.health.v1 service: exit 0 when SERVING.

    python -m subnet.health_probe 127.0.0.1:50051                          # the server as a whole ("")
    python -m subnet.health_probe 127.0.0.1:50051 --service moe.v1.Expert  # one service of it
    python -m subnet.health_probe 127.0.0.1:50050 127.0.0.1:50051          # healthy when any one is

For Docker HEALTHCHECK and docker-compose, where no grpc_health_probe binary is at hand.
Kubernetes probes the same health service natively (`grpc:` probes) and needs none of this.
One Check per address, each with its own deadline; no retries (the caller's interval and
retry count decide). Exit codes: 0 SERVING, 1 anything else (the reason on stderr), 2 bad
arguments.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_SERVING = health_pb2.HealthCheckResponse.SERVING


def check(address: str, service: str = "", timeout_s: float = 2.0) -> str | None:
    """None when `address` says SERVING for `service`; otherwise a one-line reason."""
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s, wait_for_ready=False)
    except grpc.RpcError as e:
        return f"{address}: {e.code().name} {e.details() or ''}".rstrip()
    if reply.status != _SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m subnet.health_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("addresses", nargs="+", metavar="HOST:PORT")
    parser.add_argument("--service", default="", help='health service name; "" (default) = the whole server')
    parser.add_argument("--timeout-s", type=float, default=2.0, help="deadline of each Check (default 2)")
    args = parser.parse_args(argv)
    if args.timeout_s <= 0:
        parser.error("--timeout-s must be positive")
    reasons = []
    for address in args.addresses:
        reason = check(address, args.service, args.timeout_s)
        if reason is None:
            return 0
        reasons.append(reason)
    print(f"health_probe: not serving{' ' + args.service if args.service else ''}: {'; '.join(reasons)}",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
