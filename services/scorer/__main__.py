"""Run the scorer until SIGTERM/SIGINT (see services/scorer/config.py for the variables).

    REDIS_URL=redis://127.0.0.1:6379/0 WALLET_NAME=validator python -m services.scorer
    python -m services.scorer --env-table     # the variables as a markdown table

Exit codes: 0 after a clean stop, 2 for bad configuration, a missing hotkey, Redis unreachable
at start-up or a metrics port in use (one line on stderr).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import redis

from services.scorer.config import ScorerConfig
from services.scorer.metrics import ScorerMetrics
from services.scorer.scorer import Scorer
from subnet.chain.base import ChainError
from subnet.chain.config import open_chain, signing_wallet
from subnet.envconfig import ConfigError, from_env, markdown_table
from subnet.identity import IdentityError, load_identity

log = logging.getLogger("services.scorer")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--env-table" in argv:
        print(markdown_table(ScorerConfig), end="")
        return 0
    if argv:
        print(f"services.scorer: unexpected arguments {argv}; configure it with environment variables "
              f"(--env-table lists them)", file=sys.stderr)
        return 2
    try:
        config = from_env(ScorerConfig)
        identity = load_identity(config.wallet)
    except (ConfigError, IdentityError) as e:
        print(f"services.scorer: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The socket timeout must outlast the stream read's BLOCK (poll_s).
    client = redis.Redis.from_url(config.redis_url, socket_timeout=config.poll_s + 10.0, socket_connect_timeout=5.0)
    chain = open_chain(config.chain, config.rounds.schedule(), wallet=signing_wallet(config.chain, config.wallet))
    metrics = ScorerMetrics()
    try:
        scorer = Scorer(config, identity, chain, client, metrics)  # creates the consumer group: fails fast
        if config.metrics_port:
            metrics.serve(config.metrics_host, config.metrics_port)
    except (redis.RedisError, OSError) as e:
        print(f"services.scorer: cannot start: {e}", file=sys.stderr)
        chain.close()
        client.close()
        return 2
    _warn_without_permit(chain, identity.hotkey)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("scoring as %s (consumer %s)", identity.hotkey, scorer.stream.consumer)
    try:
        scorer.run(stop)
    finally:
        log.info("stopping")
        metrics.stop()
        chain.close()
        client.close()
    return 0


def _warn_without_permit(chain, hotkey: str) -> None:
    # A warning, not an exit: in the local stack the validator may be staked after the scorer starts.
    try:
        neuron = chain.metagraph().by_hotkey(hotkey)
    except ChainError as e:
        log.warning("chain unreachable at start-up (%s); weights will be retried each round", e)
        return
    if neuron is None or not neuron.validator_permit:
        log.warning("hotkey %s has no validator permit on the chain: set_weights will be refused", hotkey)


if __name__ == "__main__":
    sys.exit(main())
