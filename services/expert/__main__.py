"""Run one expert service until SIGTERM/SIGINT (see services/expert/config.py for the variables).

    EXPERT_UIDS=0.0,0.1 EXPERT_DIM=64 EXPERT_INTER_DIM=128 python -m services.expert
    python -m services.expert --env-table     # the variables as a markdown table

Exit codes: 0 after a clean stop, 2 for bad configuration or a port in use (one line on stderr).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from services.expert.config import ExpertConfig
from services.expert.server import ExpertServer, StartupError
from subnet.allocator import reuse_freed_memory
from subnet.envconfig import ConfigError, from_env, markdown_table
from subnet.fd_limits import raise_fd_limit
from subnet.gc_pauses import freeze_startup_objects
from subnet.telemetry import setup_tracing, shutdown_tracing

log = logging.getLogger("services.expert")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--env-table" in argv:
        print(markdown_table(ExpertConfig), end="")
        return 0
    if argv:
        print(f"services.expert: unexpected arguments {argv}; configure it with environment variables "
              f"(--env-table lists them)", file=sys.stderr)
        return 2
    try:
        config = from_env(ExpertConfig)
    except ConfigError as e:
        print(f"services.expert: {e}", file=sys.stderr)
        return 2
    reuse_freed_memory()   # before any thread: payload-sized buffers are reused, not faulted in afresh
    raise_fd_limit()       # one descriptor per connection: take the hard limit, not the 1024 default
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    provider = setup_tracing(config.tracing, "expert")
    try:
        return asyncio.run(serve(config))
    except StartupError as e:
        print(f"services.expert: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown_tracing(provider)  # the last requests' spans, still queued for export
        # Stopped already: a repeated SIGTERM during interpreter shutdown must not turn a
        # clean exit into "killed by signal".
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


async def serve(config: ExpertConfig) -> int:
    """Start, wait for SIGTERM/SIGINT, drain and stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = ExpertServer(config)
    try:
        await server.start()
    except BaseException:
        await server.stop(grace_s=0)
        raise
    freeze_startup_objects()   # the weights and the libraries: full GC passes stop walking them
    await stop.wait()
    log.info("signal received: deregistering and draining (grace %.1f s)", config.grace_s)
    await server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
