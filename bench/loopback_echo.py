"""The transport's floor under an expert call: one small message to another process over loopback TCP
and back, both ends blocking in the kernel between messages as the router and an expert service do.

    python -m bench.loopback_echo FD     # the echo end, on the listening socket FD (started by `round_trip_us`)

`round_trip_us` starts the echo end as a child process, sends a one-token Forward's worth of bytes
(ROUND_TRIP_BYTES) and waits for it back, ROUND_TRIPS times, and returns the p50 and p99 in
microseconds, twice: with both ends pinned to one CPU (each wake-up switches to the other end on
that CPU) and to two (each wake-up reaches an idle CPU, which on a virtual machine may be halted
and must be woken through the hypervisor). Unpinned, the scheduler picks either, so a run reads
one or the other. What `latency.one_call_p50_ms` takes beyond this is the work of our two ends
(framing, signatures, decode, the batcher, the matmuls, encode, metrics).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from bench.timing import percentiles
from subnet.processes import die_with_parent

ROUND_TRIP_BYTES = 1024   # a one-token Forward of the small preset: 192 fp32 values plus the frame
ROUND_TRIPS, WARMUP = 3000, 200
START_TIMEOUT_S = 30.0


def round_trip_us() -> dict[str, float]:
    """`loopback_round_trip_{same,cross}_cpu_{p50,p99}_us` (cross only where this process may use two CPUs)."""
    allowed = sorted(os.sched_getaffinity(0))
    out = {}
    try:
        for name, cpus in (("same", (allowed[0], allowed[0])), ("cross", tuple(allowed[:2]))):
            if len(set(cpus)) == (1 if name == "same" else 2):
                us = _pinned_round_trips(*cpus)
                out.update({f"loopback_round_trip_{name}_cpu_{k}_us": v for k, v in us.items()})
    finally:
        os.sched_setaffinity(0, allowed)
    return out


def _pinned_round_trips(own_cpu: int, echo_cpu: int) -> dict[str, float]:
    os.sched_setaffinity(0, {own_cpu})
    with socket.create_server(("127.0.0.1", 0)) as listener:   # handed to the child: no port to race for
        child = subprocess.Popen([sys.executable, "-m", "bench.loopback_echo", str(listener.fileno())],
                                 pass_fds=(listener.fileno(),), preexec_fn=die_with_parent)
        port = listener.getsockname()[1]
    os.sched_setaffinity(child.pid, {echo_cpu})
    try:
        conn = _connect(port, child)
        with conn:
            message, answer = b"x" * ROUND_TRIP_BYTES, bytearray(ROUND_TRIP_BYTES)
            samples = []
            for i in range(WARMUP + ROUND_TRIPS):
                start = time.perf_counter()
                conn.sendall(message)
                _read_exactly(conn, memoryview(answer))
                if i >= WARMUP:
                    samples.append(time.perf_counter() - start)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    return {k: v * 1e6 for k, v in percentiles(samples, (50, 99)).items()}


def _connect(port: int, child: subprocess.Popen) -> socket.socket:
    """A connection to the echo end (the listening socket is open from the start: the connect waits in
    its backlog until the child accepts), blocking with no timeout, as the services' sockets are: a
    socket with a timeout polls before every send and receive."""
    conn = socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT_S)
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if child.poll() is not None:
        conn.close()
        raise RuntimeError(f"the loopback echo process exited with {child.returncode}")
    return conn


def _read_exactly(conn: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise RuntimeError("the loopback echo process closed the connection")
        got += n


def _echo(listener_fd: int) -> None:
    with socket.socket(fileno=listener_fd) as listener:
        conn, _ = listener.accept()
    with conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = bytearray(64 << 10)
        while n := conn.recv_into(buffer):
            conn.sendall(memoryview(buffer)[:n])


if __name__ == "__main__":
    _echo(int(sys.argv[1]))
