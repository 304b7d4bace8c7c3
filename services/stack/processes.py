"""Child processes of the local stack: started with their own environment, stopped together.

Every child gets PR_SET_PDEATHSIG (it dies if the stack dies, even by SIGKILL) and the
stack stops them in reverse start order: SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from subnet import health
from subnet.processes import die_with_parent, port_in_use


@dataclass
class Child:
    name: str
    process: subprocess.Popen
    log_path: Path | None = None


@dataclass
class ProcessGroup:
    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, args: list[str], env: dict[str, str], show_output: bool = False) -> Child:
        """Start `python args...` with `env` added to this environment; output to a log file
        unless `show_output` (the router's progress bar belongs on the terminal)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = None if show_output else self.log_dir / f"{name}.log"
        out = None if show_output else open(log_path, "wb")
        process = subprocess.Popen([sys.executable, *args], env={**os.environ, **env}, stdout=out,
                                   stderr=subprocess.STDOUT if out else None, preexec_fn=die_with_parent)
        if out:
            out.close()
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        for child in self.children:
            code = child.process.poll()
            if code is not None:
                where = f"; see {child.log_path}" if child.log_path else ""
                raise RuntimeError(f"{child.name} exited with code {code}{where}")

    def stop(self, grace_s: float = 10.0) -> None:
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.terminate()
            deadline = time.monotonic() + grace_s
            while child.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if child.process.poll() is None:
                child.process.kill()
                child.process.wait()
        self.children.clear()


def check_ports_distinct(ports: dict[str, int]) -> None:
    """ValueError naming every port that two or more of the processes to start were given."""
    users: dict[int, list[str]] = {}
    for name, port in ports.items():
        if port:
            users.setdefault(port, []).append(name)
    shared = [f"port {port} for {' and '.join(names)}" for port, names in users.items() if len(names) > 1]
    if shared:
        raise ValueError(f"the same port twice: {'; '.join(shared)}. Choose distinct STACK_REDIS_PORT, "
                         f"STACK_ROUTER_PORT, STACK_S3_PORT, STACK_EXPERT_PORTS (adversaries take the "
                         f"ports after the highest one) and STACK_METRICS_BASE_PORT (and the ports after it)")
    too_high = [f"{name} port {port}" for name, port in ports.items() if port > 65535]
    if too_high:
        raise ValueError(f"ports above 65535: {', '.join(too_high)}")


def check_ports_free(ports: dict[str, int]) -> None:
    """RuntimeError naming every configured port that is already taken (before anything starts)."""
    taken = [f"{name} port {port}" for name, port in ports.items() if port and port_in_use(port)]
    if taken:
        raise RuntimeError(f"already in use: {', '.join(taken)}. Stop whatever holds them or choose "
                           f"others (STACK_REDIS_PORT, STACK_ROUTER_PORT, STACK_EXPERT_PORTS, "
                           f"STACK_METRICS_BASE_PORT)")


def wait_serving(endpoint: str, group: ProcessGroup, timeout_s: float, what: str) -> None:
    """Health SERVING at `endpoint`, or RuntimeError when a child of `group` dies first."""
    try:
        health.wait_serving(endpoint, timeout_s, check_alive=group.check_alive, what=what, poll_s=0.25)
    except TimeoutError as e:
        raise RuntimeError(str(e)) from None
