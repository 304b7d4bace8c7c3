"""Look at (and, on the local chain, change) the chain the environment points at.

    python -m subnet.chain status                                  # block, round, phase, metagraph, endpoints
    python -m subnet.chain register --hotkey 5F... --stake 10     # local: register (idempotent)
    python -m subnet.chain stake --hotkey 5F... --stake 0         # local: change a stake
    python -m subnet.chain weights                                 # the weights validators set

Configured by the CHAIN_* and ROUND_* variables (see `subnet.chain.config`, `subnet.rounds`).
Errors are one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys

from subnet.chain.base import Chain, ChainError, Metagraph
from subnet.chain.config import ChainConfig, open_chain
from subnet.envconfig import ConfigError, from_env
from subnet.rounds import RoundConfig, RoundSchedule


def short(hotkey: str) -> str:
    return hotkey if len(hotkey) <= 13 else f"{hotkey[:6]}…{hotkey[-5:]}"


def format_status(graph: Metagraph, schedule: RoundSchedule) -> str:
    at = schedule.at(graph.block)
    lines = [f"block {graph.block}  round {at.round}  phase {at.phase} "
             f"({at.blocks_left_in_phase} blocks left; block {at.block_in_round} of {schedule.tempo_blocks} "
             f"in the round)",
             f"{'uid':>4}  {'hotkey':<13}  {'role':<9}  {'stake':>12}  {'incentive':>9}  {'weights set at':>14}  "
             f"endpoint"]
    for n in graph.neurons:
        role = "validator" if n.validator_permit else "miner"
        weights_at = "-" if n.last_weights_block is None else str(n.last_weights_block)
        lines.append(f"{n.uid:>4}  {short(n.hotkey):<13}  {role:<9}  {n.stake:>12.3f}  {n.incentive:>9.4f}  "
                     f"{weights_at:>14}  {n.endpoint or '-'}")
    if not graph.neurons:
        lines.append("(no neurons registered)")
    return "\n".join(lines)


def format_weights(weights: dict[int, dict[int, float]]) -> str:
    if not weights:
        return "(no weights set)"
    return "\n".join(f"validator {v}: " + ", ".join(f"{u}={w:.4f}" for u, w in sorted(row.items()))
                     for v, row in sorted(weights.items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m subnet.chain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="block, round, phase and the metagraph")
    register = sub.add_parser("register", help="register a hotkey (local chain); idempotent")
    register.add_argument("--hotkey", required=True, help="SS58 address of the hotkey")
    register.add_argument("--coldkey", default="", help="SS58 address of its coldkey (informational)")
    register.add_argument("--stake", type=float, default=0.0, help="stake; > 0 gives a validator permit")
    stake = sub.add_parser("stake", help="set a registered hotkey's stake (local chain)")
    stake.add_argument("--hotkey", required=True, help="SS58 address of the hotkey")
    stake.add_argument("--stake", type=float, required=True, help="new stake; 0 removes the validator permit")
    sub.add_parser("weights", help="the weights each validator last set")
    args = parser.parse_args(argv)
    if getattr(args, "stake", 0.0) < 0:
        parser.error("--stake must be >= 0")
    return args


def run(args: argparse.Namespace, chain: Chain, schedule: RoundSchedule) -> str:
    if args.command == "status":
        return format_status(chain.metagraph(), schedule)
    if args.command == "register":
        uid = chain.register(args.hotkey, coldkey=args.coldkey, stake=args.stake)
        return f"{args.hotkey} has uid {uid}"
    if args.command == "stake":
        if not hasattr(chain, "set_stake"):
            raise ChainError("stake can only be set on the local chain (CHAIN=local)")
        chain.set_stake(args.hotkey, args.stake)
        return f"{args.hotkey} now has stake {args.stake}"
    if args.command == "weights":
        return format_weights(chain.weights())
    raise AssertionError(f"unhandled command {args.command}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = from_env(ChainConfig)
        schedule = from_env(RoundConfig).schedule()
        chain = open_chain(config, schedule)
    except (ConfigError, ChainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(run(args, chain, schedule))
        return 0
    except ChainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        chain.close()


if __name__ == "__main__":
    sys.exit(main())
