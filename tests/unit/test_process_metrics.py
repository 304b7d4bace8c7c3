"""subnet.process_metrics: the memory limit read from a cgroup file system laid out as v1 or v2 (here
in a temporary folder; tests/deploy/test_rehearsal_memory.py reads a real cgroup's)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from subnet.process_metrics import cgroup_memory_limit, register_process_metrics


def _layout(root, proc_lines: str, files: dict[str, str]):
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    proc = root / "proc-self-cgroup"
    proc.write_text(proc_lines)
    return proc


def test_v2_group_limit_and_max(tmp_path):
    proc = _layout(tmp_path, "0::/kubepods/pod1/c1\n", {"cg/kubepods/pod1/c1/memory.max": "8589934592\n"})
    assert cgroup_memory_limit(proc, tmp_path / "cg") == 8 << 30
    (tmp_path / "cg/kubepods/pod1/c1/memory.max").write_text("max\n")
    assert cgroup_memory_limit(proc, tmp_path / "cg") is None


def test_v1_memory_line_among_others_and_unlimited(tmp_path):
    lines = "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n"
    proc = _layout(tmp_path, lines, {"cg/memory/docker/abc/memory.limit_in_bytes": "4294967296\n"})
    assert cgroup_memory_limit(proc, tmp_path / "cg") == 4 << 30
    (tmp_path / "cg/memory/docker/abc/memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(proc, tmp_path / "cg") is None


def test_a_container_that_sees_only_its_own_group_reads_the_mounts_root(tmp_path):
    # /proc names the host's path, /sys/fs/cgroup/memory is the container's own group
    proc = _layout(tmp_path, "4:memory:/kubepods/burstable/pod9/c9\n",
                   {"cg/memory/memory.limit_in_bytes": "1073741824\n"})
    assert cgroup_memory_limit(proc, tmp_path / "cg") == 1 << 30


def test_nothing_readable_is_no_limit(tmp_path):
    assert cgroup_memory_limit(tmp_path / "missing", tmp_path) is None
    proc = _layout(tmp_path, "4:memory:/a\n", {"cg/memory/a/memory.limit_in_bytes": "garbage\n"})
    assert cgroup_memory_limit(proc, tmp_path / "cg") is None


def test_the_registry_gets_the_process_metrics():
    registry = CollectorRegistry()
    register_process_metrics(registry)
    text = generate_latest(registry).decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_max_fds"):
        assert f"\n{name} " in text, name
