"""Shared by the tests that build network namespaces with iproute2 (root only): running `ip`, a
free private /24, killing what runs in a namespace, and skipping where namespaces are refused."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess

import pytest


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=30)


def free_subnet(prefix: str) -> str:
    """`<prefix>.X` (prefix such as "10.231") with no address or route of this machine in it
    (another run may hold one)."""
    used = sh("ip", "-o", "-4", "addr").stdout + sh("ip", "-4", "route").stdout
    for x in random.sample(range(256), 256):
        if f"{prefix}.{x}." not in used:
            return f"{prefix}.{x}"
    raise RuntimeError(f"no free {prefix}.X.0/24")


def kill_processes_in(netns: str) -> None:
    """SIGKILL whatever still runs in `netns` (only the test's own processes run there)."""
    for pid in sh("ip", "netns", "pids", netns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def skip_when_refused():
    """A test skips, rather than fails, where this machine does not let it create namespaces."""
    try:
        yield
    except subprocess.CalledProcessError as e:
        if "Operation not permitted" in e.stderr or "Permission denied" in e.stderr:
            pytest.skip(f"cannot create network namespaces here: {e.stderr.strip()}")
        raise
