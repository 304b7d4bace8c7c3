"""The process's own resources on a service's /metrics: memory, CPU, file descriptors, and the memory
limit its container runs under.

Each service keeps its metrics in a CollectorRegistry of its own (not prometheus_client's global
one), so the standard process metrics are not there unless registered: `register_process_metrics`
adds prometheus_client's ProcessCollector (process_resident_memory_bytes, process_cpu_seconds_total,
process_open_fds, process_max_fds, ...) and `process_memory_limit_bytes`, read from the process's
memory cgroup (a container's `mem_limit` or `resources.limits.memory`), when it has one. Neither the
compose file nor the manifests scrape cAdvisor or the kubelet, so without these the dashboard could
not show how close a service runs to its limit before it is OOM-killed.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

CGROUP_MOUNT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as the largest page-aligned signed 64-bit value; anything this large
# is no limit on a real machine.
UNLIMITED_FROM = 1 << 60


def register_process_metrics(registry: CollectorRegistry) -> None:
    ProcessCollector(registry=registry)
    limit = cgroup_memory_limit()
    if limit is not None:
        Gauge("process_memory_limit_bytes", "Memory limit of this process's cgroup (its container's limit); "
              "over it the kernel OOM-kills the process", registry=registry).set(limit)


def cgroup_memory_limit(proc_cgroup: Path = Path("/proc/self/cgroup"), mount: Path = CGROUP_MOUNT) -> int | None:
    """This process's memory limit in bytes: `memory.max` of its cgroup v2 group, or `memory.limit_in_bytes`
    of its v1 memory group; None when it has none (unlimited, no memory controller, unreadable)."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        path = path.lstrip("/")
        # The group's own path first; then the mount's root, which is the group itself in a container
        # that sees only its own cgroups (Docker, the kubelet) while /proc names the host's path.
        if hierarchy == "0" and controllers == "":     # v2: "0::/<path>"
            candidates = [mount / path / "memory.max", mount / "unified" / path / "memory.max", mount / "memory.max"]
        elif "memory" in controllers.split(","):       # v1: "<n>:memory:/<path>"
            candidates = [mount / "memory" / path / "memory.limit_in_bytes", mount / "memory" / "memory.limit_in_bytes"]
        else:
            continue
        for file in candidates:
            try:
                text = file.read_text().strip()
            except OSError:
                continue
            if text == "max":
                return None
            try:
                value = int(text)
            except ValueError:
                return None
            return value if value < UNLIMITED_FROM else None
    return None
