"""What the shared-memory tensor path (subnet.shm) costs against raw loopback TCP, per payload size.

    python -m bench.shm serve CONTROL_PORT SOCKET_PORT SHM_DIR                  # both sides, started by run()
    python -m bench.shm measure CONTROL_PORT SOCKET_PORT SHM_DIR [--rounds N]

Shared-memory round trip (`shm`): the client writes a float32 tensor into its region
(`ShmRegion.write_request`, one copy) and sends a small control message (4-byte length + JSON:
region, offsets, dtype, shape; the size of the control RPC a gRPC call would carry) over one
loopback TCP connection to a server process, which maps the region (`ShmAttachments`, cached after
the first call), views the input without a copy, writes it back into the client's response area
(one copy) and answers with a control message; the client then takes a zero-copy view of the
response. The server writes the input itself, so that the time is the transport's, not an expert's.

Socket round trip (`socket`, the reference, measured as bench/wire.py measures its floor): the same
payload bytes, with an 8-byte length prefix, over another loopback TCP connection to the same server
process, which reads them into a buffer and writes them back; the client reads them into a buffer.

`copies` (for the analysis, not in `shm_ratio`): the two copies of the shm path (into the region,
then into the response area) in one process, without the control messages and the other process:
the floor of the shm path.

GB/s = payload bytes x 2 (both directions) / round-trip seconds, with GB = 1e9 bytes. Each size's
round trip is the best of interleaved rounds (bench.timing); one timed call repeats it until at
least MIN_BYTES_PER_CALL went each way. The overall `shm_gbps` / `socket_gbps` are all bytes moved
over all round-trip time across the sizes, and `shm_ratio` = shm / socket. Both processes use one
torch thread, as in bench/wire.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading

import torch

from bench.timing import best_times
from subnet.shm import ShmAttachments, ShmConfig, ShmError, ShmRegion

SIZES_MIB = (1, 4, 16, 64)
MIN_BYTES_PER_CALL = 16 << 20
CLIENT_TIMEOUT_S = 600
_CONTROL = struct.Struct("<I")   # control messages: length, then JSON
_HEADER = struct.Struct("<Q")    # socket echo: payload length, then the payload
_CHILD_ENV = {"OMP_NUM_THREADS": "1"}


def _recv_exact(conn: socket.socket, view: memoryview) -> memoryview | None:
    """Fill `view` from `conn`; None when the peer closed first."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return view


def _send_control(conn: socket.socket, message: dict) -> None:
    data = json.dumps(message).encode()
    conn.sendall(_CONTROL.pack(len(data)) + data)


def _recv_control(conn: socket.socket) -> dict | None:
    header = _recv_exact(conn, memoryview(bytearray(_CONTROL.size)))
    if header is None:
        return None
    body = _recv_exact(conn, memoryview(bytearray(_CONTROL.unpack(header)[0])))
    return None if body is None else json.loads(bytes(body))


# ---- server (a child process) -----------------------------------------------------------------

def _answer(attachments: ShmAttachments, request: dict) -> dict:
    """Echo one shm request: view the input, write it into the response area. A function, so that
    the input view is gone before the next request (as in a servicer)."""
    try:
        x = attachments.read(request["region"], request["input_offset"], request["input_nbytes"], torch.float32,
                             request["shape"])
        nbytes = attachments.write(request["region"], request["output_offset"], request["output_capacity"], x)
    except ShmError as e:
        return {"error": str(e)}
    return {"offset": request["output_offset"], "nbytes": nbytes, "shape": request["shape"]}


def _serve_control(listener: socket.socket, directory: str) -> None:
    attachments = ShmAttachments(ShmConfig(directory=directory))
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while (request := _recv_control(conn)) is not None:
                _send_control(conn, _answer(attachments, request))


def _serve_socket(listener: socket.socket) -> None:
    buf = bytearray()
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while (header := _recv_exact(conn, memoryview(bytearray(_HEADER.size)))) is not None:
                (n,) = _HEADER.unpack(header)
                if len(buf) < n:
                    buf = bytearray(n)
                view = memoryview(buf)[:n]
                if _recv_exact(conn, view) is None:
                    break
                conn.sendall(view)


def serve(control_port: int, socket_port: int, directory: str) -> None:
    torch.set_num_threads(1)
    echo = socket.create_server(("127.0.0.1", socket_port))
    threading.Thread(target=_serve_socket, args=(echo,), daemon=True, name="socket-echo").start()
    _serve_control(socket.create_server(("127.0.0.1", control_port)), directory)   # listening = ready


# ---- client (a child process too; `run` starts both) ------------------------------------------

class _ShmClient:
    def __init__(self, port: int, directory: str):
        self.conn = socket.create_connection(("127.0.0.1", port))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.region = ShmRegion.create(1, directory)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        request = self.region.write_request(x, output_nbytes=x.numel() * x.element_size())
        _send_control(self.conn, {**dataclasses.asdict(request), "shape": list(x.shape)})
        reply = _recv_control(self.conn)
        if reply is None or "error" in reply:
            raise RuntimeError(f"the shm echo server failed: {reply}")
        return self.region.view(reply["offset"], reply["nbytes"], x.dtype, reply["shape"])

    def close(self) -> None:
        self.conn.close()
        self.region.close()


class _SocketEcho:
    def __init__(self, port: int):
        self.conn = socket.create_connection(("127.0.0.1", port))
        self.conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reply = bytearray()

    def round_trip(self, payload: bytes) -> None:
        if len(self.reply) != len(payload):
            self.reply = bytearray(len(payload))
        self.conn.sendall(_HEADER.pack(len(payload)))
        self.conn.sendall(payload)
        if _recv_exact(self.conn, memoryview(self.reply)) is None:
            raise ConnectionError("the socket echo server closed the connection")

    def close(self) -> None:
        self.conn.close()


def run(rounds: int = 5) -> dict:
    # Imported here: both sides run this module too and need none of the stack's imports.
    from bench.stack import BenchStack
    from subnet.envconfig import from_env
    from subnet.processes import free_port

    directory = from_env(ShmConfig).directory
    control_port, socket_port = free_port(), free_port()
    args = [str(control_port), str(socket_port), directory]
    with BenchStack(auth=False) as stack:
        stack.start_python("shm-echo", ["-m", "bench.shm", "serve", *args], control_port, env=_CHILD_ENV)
        client = subprocess.run([sys.executable, "-m", "bench.shm", "measure", *args, f"--rounds={rounds}"],
                                capture_output=True, text=True, env={**os.environ, **_CHILD_ENV},
                                timeout=CLIENT_TIMEOUT_S)
    if client.returncode != 0:
        raise RuntimeError(f"the shm client exited with code {client.returncode}:\n{client.stderr[-2000:]}")
    return json.loads(client.stdout.splitlines()[-1])


def measure(control_port: int, socket_port: int, directory: str, rounds: int) -> dict:
    """The client side, in its own process (started by `run`)."""
    torch.set_num_threads(1)
    shm, echo = _ShmClient(control_port, directory), _SocketEcho(socket_port)
    try:
        per_size = {f"{mib}MiB": _round_trips(shm, echo, mib << 20, rounds) for mib in SIZES_MIB}
    finally:
        shm.close()
        echo.close()
    paths = ("shm", "socket", "copies")
    moved = sum(2 * (mib << 20) for mib in SIZES_MIB)
    gbps = {path: moved / sum(rt[path] for rt in per_size.values()) / 1e9 for path in paths}
    by_size = {f"{path}_gbps_by_size": {size: 2 * (int(size[:-3]) << 20) / rt[path] / 1e9
                                        for size, rt in per_size.items()} for path in paths}
    ratios = {size: rt["socket"] / rt["shm"] for size, rt in per_size.items()}
    return {
        "shm_gbps": gbps["shm"],
        "socket_gbps": gbps["socket"],
        "shm_ratio": gbps["shm"] / gbps["socket"],
        "shm_ratio_by_size": ratios,
        "shm_ratio_geomean": math.prod(ratios.values()) ** (1 / len(ratios)),
        **by_size,
        "shm_round_trip_us_by_size": {size: rt["shm"] * 1e6 for size, rt in per_size.items()},
        "definition": "GB/s = payload bytes x 2 (both directions) / round-trip s, GB = 1e9 B; overall = all bytes / "
                      "all round-trip time over the sizes; shm_ratio = shm / socket; copies = the shm path's two "
                      "copies in one process, without control messages (its floor)",
        "load_avg_1m": os.getloadavg()[0],
    }


def _round_trips(shm: _ShmClient, echo: _SocketEcho, nbytes: int, rounds: int) -> dict[str, float]:
    """Seconds of one round trip of `nbytes` on each path (best of `rounds` interleaved rounds)."""
    x = torch.randn(nbytes // 4 // 1024, 1024)
    payload = x.numpy().tobytes()
    staging, response = torch.empty_like(x), torch.empty_like(x)
    reps = max(1, MIN_BYTES_PER_CALL // nbytes)

    def shm_round_trips():
        for _ in range(reps):
            shm.round_trip(x)

    def socket_round_trips():
        for _ in range(reps):
            echo.round_trip(payload)

    def copies():
        for _ in range(reps):
            staging.copy_(x)
            response.copy_(staging)

    mib = nbytes >> 20
    if not torch.equal(shm.round_trip(x), x):
        raise RuntimeError(f"the shm echo of {mib} MiB changed the tensor")
    echo.round_trip(payload)
    if echo.reply != payload:
        raise RuntimeError(f"the socket echo of {mib} MiB changed the bytes")
    times = best_times({"shm": shm_round_trips, "socket": socket_round_trips, "copies": copies}, rounds=rounds)
    return {path: t / reps for path, t in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.shm", description="one side of the benchmark")
    parser.add_argument("side", choices=["serve", "measure"])
    parser.add_argument("control_port", type=int)
    parser.add_argument("socket_port", type=int)
    parser.add_argument("directory", help="SHM_DIR of both sides")
    parser.add_argument("--rounds", type=int, default=5, help="measure only")
    cli = parser.parse_args()
    if cli.side == "serve":
        serve(cli.control_port, cli.socket_port, cli.directory)
    else:
        print(json.dumps(measure(cli.control_port, cli.socket_port, cli.directory, cli.rounds)))
