"""Run the validator until SIGTERM/SIGINT (see services/validator/config.py for the variables).

    REDIS_URL=redis://127.0.0.1:6379/0 S3_ENDPOINT=127.0.0.1:8333 VALIDATOR_INIT_CHECKPOINT=runs/x/init \
        python -m services.validator
    python -m services.validator --env-table     # the variables as a markdown table

Start-up: load the wallet's hotkey, open the chain, S3 and Redis, publish global version 0
from VALIDATOR_INIT_CHECKPOINT if S3 has no global version, load the latest one and its
validation data, then start the workers and the phase watcher. Exit codes: 0 after a clean
stop, 2 for bad configuration or a start-up failure (one line on stderr).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading

import redis

from services.validator.config import ValidatorConfig
from services.validator.service import ValidatorService
from services.validator.validator import Validator
from subnet.chain.base import ChainError
from subnet.chain.config import open_chain
from subnet.envconfig import ConfigError, from_env, markdown_table
from subnet.identity import IdentityError, load_identity
from subnet.manifest import CheckpointVerificationError
from subnet.object_store import ObjectStore, StoreError

log = logging.getLogger("services.validator")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--env-table" in argv:
        print(markdown_table(ValidatorConfig), end="")
        return 0
    if argv:
        print(f"services.validator: unexpected arguments {argv}; configure it with environment variables "
              f"(--env-table lists them)", file=sys.stderr)
        return 2
    try:
        config = from_env(ValidatorConfig)
    except ConfigError as e:
        print(f"services.validator: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        service = start(config)
    except (IdentityError, ChainError, StoreError, CheckpointVerificationError, FileNotFoundError, ValueError,
            OSError, redis.exceptions.RedisError) as e:
        print(f"services.validator: cannot start: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    stop.wait()
    log.info("signal received: finishing tasks in progress (grace %.0f s)", config.grace_s)
    service.stop()
    log.info("stopped")
    return 0


def start(config: ValidatorConfig) -> ValidatorService:
    """Build every dependency from `config` and start the service (blocking until it is ready)."""
    identity = load_identity(config.wallet)
    chain = open_chain(config.chain, config.rounds.schedule())
    store = ObjectStore(config.s3)
    store.ensure_bucket()
    client = redis.Redis.from_url(config.redis_url, socket_timeout=10.0, socket_connect_timeout=5.0)
    client.ping()
    validator = Validator(config, identity, chain, store, client)
    glob = validator.bootstrap()
    validator.corpus(glob)  # built (or read from its cache) now, not in the first round's validate phase
    return ValidatorService(validator, config).start()


if __name__ == "__main__":
    sys.exit(main())
