"""Descriptor limits of a server process: raise the soft limit once, and size connection caps by it.

    raise_fd_limit()                      # first thing in main(): soft limit up to the hard one
    FramesServer(..., max_connections=connection_limit())

Linux starts most processes with a soft RLIMIT_NOFILE of 1024 while the hard limit is far higher;
a server that holds one descriptor per client connection (gRPC, moe-frames, Redis, shared-memory
regions) should take what it is allowed, as Redis and nginx do. A cap on connections that ignores
the limit lets a flood of idle connections use every descriptor, and then gRPC's own accepts fail.
"""

from __future__ import annotations

import resource

TARGET = 65536        # no need for more; some kernels make select()-based code slow past this
DEFAULT_CAP = 256     # moe-frames connections a server accepts when descriptors are plenty
SHARE = 4             # ... and at most this fraction (1/SHARE) of the soft limit: the rest is gRPC's and the files'
MINIMUM = 16


def raise_fd_limit(target: int = TARGET) -> int:
    """Raise the soft RLIMIT_NOFILE to min(hard limit, target) if it is lower; returns the soft
    limit in force afterwards. Never lowers it, never fails (a refusal leaves it as it was)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


def connection_limit(cap: int = DEFAULT_CAP) -> int:
    """Connections a server should accept on one port: `cap`, but at most a SHARE-th of the soft
    descriptor limit (at least MINIMUM)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return cap
    return max(MINIMUM, min(cap, soft // SHARE))
