"""Memory limits in the rehearsals (tests/deploy/rehearsal.py): the sizes the manifests and the compose
file write, and the cgroups that hold each container to its limit."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time

import pytest

from subnet.process_metrics import cgroup_memory_limit
from tests.deploy.rehearsal import MemoryLimits, compose_bytes, k8s_bytes, peak_rss_bytes


def test_kubernetes_quantities():
    assert k8s_bytes("4Gi") == 4 << 30 and k8s_bytes("512Mi") == 512 << 20 and k8s_bytes("64Ki") == 64 << 10
    assert k8s_bytes("1G") == 10**9 and k8s_bytes("1500M") == 1.5e9 and k8s_bytes(1024) == 1024
    for bad in ("4GB", "4 Gi", "-1Gi", "1.5Gi", ""):
        with pytest.raises(AssertionError, match="not one the rehearsal reads"):
            k8s_bytes(bad)


def test_compose_sizes():
    assert compose_bytes("4g") == 4 << 30 and compose_bytes("512M") == 512 << 20
    assert compose_bytes("1024k") == 1 << 20 and compose_bytes("100b") == 100 and compose_bytes(7) == 7
    assert compose_bytes("4gb") == 4 << 30 and compose_bytes("2MB") == 2 << 20
    for bad in ("4Gi", "4gib", "1.5g", ""):
        with pytest.raises(AssertionError, match="not one the rehearsal reads"):
            compose_bytes(bad)


def _run_in(group, allocate_mib: int) -> subprocess.Popen:
    """A Python process in `group` that fills `allocate_mib` MiB (bytearray touches every page), says so,
    then waits to be killed."""
    code = f"import sys, time; b = bytearray({allocate_mib} << 20); print('filled', flush=True); time.sleep(60)"
    return subprocess.Popen(MemoryLimits.joined(group, [sys.executable, "-c", code]), stdout=subprocess.PIPE,
                            text=True)


def test_a_container_over_its_limit_is_oom_killed_and_one_under_it_runs():
    memory = MemoryLimits(secrets.token_hex(3))
    if not memory.enforced:
        pytest.skip("no writable cgroup v1 memory controller here (not root, or another cgroup layout)")
    started: list[subprocess.Popen] = []
    try:
        started.append(under := _run_in(memory.group("under", 256 << 20), 32))
        started.append(over := _run_in(memory.group("over", 96 << 20), 512))
        try:
            assert under.stdout.readline().strip() == "filled"
            assert memory.member("under", under.pid) and not memory.member("over", under.pid)
            assert 32 << 20 <= peak_rss_bytes(under.pid) < 256 << 20
            assert over.wait(60) == -9, "a process over its cgroup's limit was not killed"
            deadline = time.monotonic() + 5   # the counter may trail the kill by a moment
            while memory.oom_kills()["over"] < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert memory.oom_kills() == {"under": 0, "over": 1}
            with pytest.raises(AssertionError, match=r"OOM-killed under its memory limit: over 1 time\(s\) "
                                                     r"\(limit 96 MiB\)"):
                memory.check()
            assert under.poll() is None
        finally:
            for p in started:
                p.kill()
                p.wait()
    finally:
        for p in started:   # one that started before the other failed to
            if p.poll() is None:
                p.kill()
                p.wait()
        memory.close()
    assert not memory.root.exists()


def test_a_service_reads_the_memory_limit_of_its_cgroup():
    """subnet.process_metrics reads the limit a runtime set (here the rehearsal's cgroup) and exports it."""
    memory = MemoryLimits(secrets.token_hex(3))
    if not memory.enforced:
        pytest.skip("no writable cgroup v1 memory controller here (not root, or another cgroup layout)")
    code = ("from prometheus_client import CollectorRegistry, generate_latest\n"
            "from subnet.process_metrics import register_process_metrics\n"
            "r = CollectorRegistry(); register_process_metrics(r)\n"
            "print(generate_latest(r).decode())")
    try:
        limited = subprocess.run(MemoryLimits.joined(memory.group("limited", 300 << 20), [sys.executable, "-c", code]),
                                 capture_output=True, text=True, timeout=60)
        free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    finally:
        memory.close()

    def limit(text: str) -> float | None:
        values = [float(line.split()[1]) for line in text.splitlines()
                  if line.startswith("process_memory_limit_bytes ")]
        return values[0] if values else None

    assert limited.returncode == 0 and free.returncode == 0, limited.stderr + free.stderr
    assert limit(limited.stdout) == 300 << 20
    assert "process_resident_memory_bytes" in limited.stdout
    assert limit(free.stdout) == cgroup_memory_limit()   # this test's own cgroup's (None: unlimited)

