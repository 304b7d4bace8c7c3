"""Process and port helpers shared by the services, the local stack and the test fixtures."""

from __future__ import annotations

import ctypes
import signal
import socket
import sys

# Resolved here, not in the forked child: the child of a threaded parent should do as little
# as possible before exec.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for child processes: the kernel kills the child when this process dies,
    so a crashed test run or stack leaves no orphan servers behind (Linux only; no-op elsewhere).
    Start children from the main thread: the signal fires when the *thread* that forked exits."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller must still handle a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server already listens on `port` (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False
