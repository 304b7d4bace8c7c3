"""Descriptor limits: the soft limit is raised to what the hard one allows, never lowered, and the
moe-frames connection cap follows it. Each case runs in a child process, whose limits die with it."""

import subprocess
import sys

import pytest

resource = pytest.importorskip("resource")


def run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", "import resource\nfrom subnet.fd_limits import *\n" + code],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def test_the_soft_limit_goes_up_to_the_hard_limit_and_the_cap_follows():
    out = run("resource.setrlimit(resource.RLIMIT_NOFILE, (200, 4000))\n"
              "print(connection_limit(), raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0], "
              "connection_limit())")
    assert out.split() == ["50", "4000", "4000", "256"]


def test_the_target_bounds_the_raise_and_a_higher_soft_limit_is_kept():
    assert run("resource.setrlimit(resource.RLIMIT_NOFILE, (100, 4000))\nprint(raise_fd_limit(target=300))") == "300"
    assert run("resource.setrlimit(resource.RLIMIT_NOFILE, (3000, 4000))\nprint(raise_fd_limit(target=300))") == "3000"


def test_a_tiny_limit_still_leaves_a_few_connections():
    assert run("resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))\nprint(connection_limit())") == "16"
