"""Process-wide malloc settings for processes that move large tensors (router, expert services).

    from subnet.allocator import reuse_freed_memory
    reuse_freed_memory()       # first thing in main(), before any thread starts

Measured with bench/wire.py (64 MiB tensor round trips through gRPC): each payload-sized
buffer used to be a fresh mmap, faulted in page by page, which cost about 4x the copy itself;
with these settings the gRPC tensor path went from 0.07 to 0.25-0.28 of a raw socket's rate.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD_BYTES = 256 << 20   # above any one message (ROUTER_MAX_MESSAGE_MB and the client default are 64)
TRIM_THRESHOLD_BYTES = 1 << 30     # a 64 MiB round trip frees several payload buffers at once: 256 MiB trimmed them


def reuse_freed_memory() -> bool:
    """Make this process's malloc keep freed buffers of up to MMAP_THRESHOLD_BYTES for reuse instead of
    returning each one to the kernel; returns whether it applied (glibc only, elsewhere it does nothing).

    glibc serves a large allocation with its own mmap and unmaps it on free, so every payload-sized
    buffer (the bytes of a tensor, the protobuf arena, the serialized message, gRPC's copies) starts as
    fresh pages that fault in one at a time: at 64 MiB that is 16,384 page faults, about 4x the time of
    the copy itself. It also limits malloc to one arena: a thread's own arena grows in heaps of at most
    64 MiB and mmaps anything larger regardless of the threshold, and gRPC receives on its own threads.
    The costs: up to TRIM_THRESHOLD_BYTES of freed memory stays with the process instead of going back
    to the system, and threads share one malloc lock (Python threads mostly hold the GIL anyway).
    Call it first thing in `main()`, before any thread starts (a thread keeps the arena it began with).
    It changes the whole process, not just this module.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                (_M_ARENA_MAX, 1))
    return all([mallopt(param, value) == 1 for param, value in settings])   # a list: try every one
