"""Checks of setting values that several services share, for their config classes' `__post_init__`:
each raises ValueError (a ConfigError once `from_env` has it) naming the variable and what to set,
so a bad value stops the service at start with one line instead of a traceback later."""

from __future__ import annotations

import redis

from subnet.redis_urls import redact

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
GRPC_MAX_MESSAGE_MB = 2047


def check_log_level(name: str, value: str) -> None:
    if value.upper() not in LOG_LEVELS:
        raise ValueError(f"{name}={value!r} is not a logging level; use one of {', '.join(LOG_LEVELS)}")


def check_redis_url(name: str, value: str) -> None:
    """An empty value is the caller's business (often "off"); anything else must parse as a Redis URL."""
    if not value:
        return
    problem = "" if value.startswith(_REDIS_SCHEMES) else f"it must start with {', '.join(_REDIS_SCHEMES)}"
    if not problem:
        try:
            redis.connection.parse_url(value)
        except ValueError as e:
            problem = str(e)
    if problem:
        raise ValueError(f"{name}={redact(value)!r} is not a Redis URL ({problem}); e.g. redis://127.0.0.1:6379/0 "
                         f"or redis://user:password@host:6379/0")


def check_message_mb(name: str, value: float) -> None:
    """gRPC takes message limits as a signed 32-bit byte count."""
    if not 0 < value <= GRPC_MAX_MESSAGE_MB:
        raise ValueError(f"{name}={value:g} must be in (0, {GRPC_MAX_MESSAGE_MB}] (gRPC takes the limit as a "
                         f"32-bit byte count)")


def check_torch_device(name: str, value: str) -> None:
    """A device torch can name and that holds real memory (`meta` computes nothing)."""
    import torch  # here: the other checks serve configs of processes that need no torch

    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a torch device; use cpu, cuda or cuda:<index>") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}={value!r}: only cpu and cuda devices are supported")
