"""Part 2b: what the tensor paths of an expert call cost against raw loopback TCP, per payload size.

    python -m bench --only wire
    python -m bench.wire serve GRPC_PORT SOCKET_PORT FRAMES_PORT [--reuse-freed-memory]    # both sides of
    python -m bench.wire measure GRPC_PORT SOCKET_PORT FRAMES_PORT [--rounds N] [--reuse-freed-memory]  # a sweep

Frames round trip (`frames`, the TCP path an expert call takes, without the expert; `ratio`):
the client builds a `moe.v1.ForwardRequest` around a float32 tensor as `subnet.expert_client`
does (`encode_view` + `subnet.spliced_wire.build`: the tensor copied once into the body) and
sends it over moe-frames/1 (`subnet.frames`) to a `FramesServer` in another process, which
reads it into one buffer, parses it in place (`SplicedParser`), decodes it (`decode`: checks,
`torch.frombuffer`, finite check) and answers with a `ForwardResponse` built the same way; the
client reads, parses and decodes that.

gRPC round trip (`grpc`, `grpc_ratio`): the same messages in a blocking unary gRPC call to a
grpc.aio server in the same process (the path of clients without moe-frames). `grpc_protobuf`
is that round trip through protobuf's own copies (`encode` into a `moe.v1.Tensor`,
`SerializeToString`, `FromString`, `decode`): the path before spliced_wire, side by side.

Socket round trip (`socket`, the floor): the same payload bytes, with an 8-byte length
prefix, over one loopback TCP connection to the same server process, which reads them into
a buffer and writes them back; the client reads them into a buffer.

Shared memory (`shm`, the same-host path of services/router/remote_experts.py): the client
writes the tensor into a region of a `subnet.shm.ShmRegionPool`, a unary call carries an
`expert_pb2.ForwardRequest` naming where (and a reply area), the server decodes it in the region
(the finite check, no copy: as the expert service reads an inference Forward's inputs), writes it
into the reply area, and the client decodes (copies) the answer out of its region.
`shm_ratio` = shm GB/s / socket GB/s.

`grpc_bytes` (for the analysis, not in `ratio`): the same gRPC call with the payload as
raw bytes in and out, no protobuf and no codec: the transport's share of the cost.
`codec_ms_64MiB` times each codec step alone on one 64 MiB tensor.

Two sweeps, each with a fresh echo server and a fresh client process: first with glibc's
default allocator (`default_malloc`, `codec_ms_64MiB_default_malloc`), then with
`allocator.reuse_freed_memory()` called first thing in both processes (every other key,
`ratio` included). The client is a child process so that the call comes before gRPC starts its
threads and does not leak into the parts that run after this one. The sweeps run one after the
other, not interleaved: compare them knowing the load may have changed in between. The services
get the second sweep's numbers only where their `main()` makes the call.

The server is a generic handler (`grpc.method_handlers_generic_handler`, service `bench.Echo`;
the same handler behind the FramesServer) rather than the real Expert service: the service
would add batching and an expert computation, and it refuses requests above EXPERT_MAX_REQUEST_TOKENS. Message limits
are MAX_MESSAGE_MB on both sides: a 64 MiB tensor plus its protobuf header does not fit in
a 64 MiB limit. Client and server use one torch thread: the codec's work is copies and one
reduction, and idle OpenMP workers spinning after each decode would take the other core
from the server (measured: 2 client threads took 2-8x the CPU time per 1 MiB round trip).

GB/s = payload bytes x 2 (both directions) / round-trip seconds, with GB = 1e9 bytes.
Each size's round trip is the best of interleaved rounds (bench.timing); one timed call
repeats it until at least MIN_BYTES_PER_CALL went each way, so small payloads are not
timed one millisecond at a time. The overall `frames_gbps`, `grpc_gbps`, `socket_gbps` ... are
all bytes moved over all round-trip time across the sizes (one sweep); `ratio` = frames / socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import grpc
import torch

from bench.timing import best_times
from subnet.allocator import reuse_freed_memory
from subnet.envconfig import from_env
from subnet.frames.client import FramesChannel
from subnet.frames.server import FramesServer
from subnet.shm import ShmAttachments, ShmConfig, ShmRegionPool
from subnet.spliced_wire import SplicedParser, build, serialize
from subnet.tensor_codec import all_finite, decode, encode, encode_view, shm_tensor
from subnet.wire.v1 import expert_pb2, tensor_pb2

SIZES_MIB = (1, 4, 16, 64)
MAX_MESSAGE_MB = 80
SERVICE = "bench.Echo"   # methods Tensor (moe.v1.Tensor, through the codec) and Bytes (raw)
MIN_BYTES_PER_CALL = 16 << 20
CLIENT_TIMEOUT_S = 600   # one sweep takes about 10 s here
_HEADER = struct.Struct("<Q")
_CHILD_ENV = {"OMP_NUM_THREADS": "1"}
REUSE_FLAG = "--reuse-freed-memory"
_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_MB << 20),
            ("grpc.max_receive_message_length", MAX_MESSAGE_MB << 20)]


# ---- server (a child process) -----------------------------------------------------------------

def _setup_process(reuse_memory: bool) -> None:
    """What both sides do first: one torch thread (see the module docstring) and, for the second sweep,
    `reuse_freed_memory()` before any gRPC thread exists (threads keep the malloc arena they start with)."""
    torch.set_num_threads(1)
    if reuse_memory and not reuse_freed_memory():
        raise RuntimeError("allocator.reuse_freed_memory() did not apply (not glibc?)")


async def _echo_tensor(request: tensor_pb2.Tensor, context) -> tensor_pb2.Tensor:
    return encode(decode(request), "fp32")


async def _echo_spliced(request, context) -> bytes:
    return build(expert_pb2.ForwardResponse, outputs=encode_view(decode(request.inputs), "fp32"))


async def _echo_bytes(request: bytes, context) -> bytes:
    return request


_ATTACHMENTS: list[ShmAttachments] = []   # the server's one ShmAttachments (made in _serve_grpc)


async def _echo_shm(request: expert_pb2.ForwardRequest, context) -> expert_pb2.ForwardResponse:
    """The same-host path of an inference Forward: the tensor is read in the caller's region (decode checks
    it; no copy, as the expert service reads an inference call's inputs), and written into the reply
    area the call names."""
    shm = _ATTACHMENTS[0]
    x = decode(request.inputs, shm=shm.read, shm_copy=False)
    reply = request.reply_shm
    nbytes = shm.write(reply.region, reply.offset, reply.capacity, x)
    return expert_pb2.ForwardResponse(outputs=shm_tensor("fp32", x.shape, reply.region, reply.offset, nbytes))


async def _serve_grpc(port: int, frames_port: int) -> None:
    server = grpc.aio.server(options=_OPTIONS)
    tensor = grpc.unary_unary_rpc_method_handler(_echo_tensor, request_deserializer=tensor_pb2.Tensor.FromString,
                                                 response_serializer=tensor_pb2.Tensor.SerializeToString)
    raw = grpc.unary_unary_rpc_method_handler(_echo_bytes)   # no (de)serializer: bytes in, bytes out
    _ATTACHMENTS.append(ShmAttachments(from_env(ShmConfig)))
    shm = grpc.unary_unary_rpc_method_handler(_echo_shm,
                                              request_deserializer=expert_pb2.ForwardRequest.FromString,
                                              response_serializer=expert_pb2.ForwardResponse.SerializeToString)
    spliced = grpc.unary_unary_rpc_method_handler(_echo_spliced,
                                                  request_deserializer=SplicedParser(expert_pb2.ForwardRequest),
                                                  response_serializer=serialize)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        SERVICE, {"Tensor": tensor, "Spliced": spliced, "Bytes": raw, "Shm": shm})])
    frames = FramesServer({f"/{SERVICE}/Spliced": spliced}, [], MAX_MESSAGE_MB << 20)
    await frames.start("127.0.0.1", frames_port)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _serve_socket(listener: socket.socket) -> None:
    buf = bytearray()
    while True:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while True:
                header = _recv_exact(conn, memoryview(bytearray(_HEADER.size)))
                if header is None:
                    break
                (n,) = _HEADER.unpack(header)
                if len(buf) < n:
                    buf = bytearray(n)
                view = memoryview(buf)[:n]
                if _recv_exact(conn, view) is None:
                    break
                conn.sendall(view)


def _recv_exact(conn: socket.socket, view: memoryview) -> memoryview | None:
    """Fill `view` from `conn`; None when the peer closed first."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            return None
        got += n
    return view


def serve(grpc_port: int, socket_port: int, frames_port: int, reuse_memory: bool) -> None:
    _setup_process(reuse_memory)
    listener = socket.create_server(("127.0.0.1", socket_port))
    threading.Thread(target=_serve_socket, args=(listener,), daemon=True, name="socket-echo").start()
    asyncio.run(_serve_grpc(grpc_port, frames_port))   # listening on the gRPC port = ready (the part waits for it)


# ---- client (a child process too; `run` starts both) ------------------------------------------

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
    # Imported here: both sides of a sweep run this module too and need none of the router's imports.
    from bench.stack import BenchStack
    from subnet.processes import free_port

    def sweep(name: str, flags: list[str]) -> dict:
        """One sweep with a fresh echo server and a fresh client process, both started with `flags`."""
        grpc_port, socket_port, frames_port = free_port(), free_port(), free_port()
        ports = [str(grpc_port), str(socket_port), str(frames_port)]
        stack.start_python(name, ["-m", "bench.wire", "serve", *ports, *flags], grpc_port, env=_CHILD_ENV)
        args = [sys.executable, "-m", "bench.wire", "measure", *ports, f"--rounds={rounds}", *flags]
        client = subprocess.run(args, capture_output=True, text=True, env={**os.environ, **_CHILD_ENV},
                                timeout=CLIENT_TIMEOUT_S)
        if client.returncode != 0:
            raise RuntimeError(f"the {name} client exited with code {client.returncode}:\n{client.stderr[-2000:]}")
        return json.loads(client.stdout.splitlines()[-1])

    with BenchStack() as stack:
        default = sweep("wire-echo-default-malloc", [])
        out = sweep("wire-echo", [REUSE_FLAG])
    summary = ("frames_gbps", "socket_gbps", "ratio", "grpc_ratio", "grpc_protobuf_ratio", "grpc_bytes_ratio")
    return {**out, "default_malloc": {key: default[key] for key in summary},
            "codec_ms_64MiB_default_malloc": default["codec_ms_64MiB"]}


def measure(grpc_port: int, socket_port: int, frames_port: int, rounds: int, reuse_memory: bool) -> dict:
    """The client side of one sweep, in its own process (started by `run`)."""
    _setup_process(reuse_memory)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}", options=_OPTIONS)
    echo = _SocketEcho(socket_port)
    frames = FramesChannel("127.0.0.1", frames_port, MAX_MESSAGE_MB << 20)
    try:
        return _measure(channel, frames, echo, rounds)
    finally:
        frames.close()
        echo.close()
        channel.close()


def _measure(channel: grpc.Channel, frames: FramesChannel, echo: _SocketEcho, rounds: int) -> dict:
    tensor_call = channel.unary_unary(f"/{SERVICE}/Tensor", request_serializer=tensor_pb2.Tensor.SerializeToString,
                                      response_deserializer=tensor_pb2.Tensor.FromString)
    spliced_call = channel.unary_unary(f"/{SERVICE}/Spliced", request_serializer=serialize,
                                       response_deserializer=SplicedParser(expert_pb2.ForwardResponse))
    bytes_call = channel.unary_unary(f"/{SERVICE}/Bytes")
    shm_call = channel.unary_unary(f"/{SERVICE}/Shm", request_serializer=expert_pb2.ForwardRequest.SerializeToString,
                                   response_deserializer=expert_pb2.ForwardResponse.FromString)
    regions = ShmRegionPool(from_env(ShmConfig))
    try:
        callers = {"frames": _FramesCaller(frames), "grpc": _SplicedCaller(spliced_call),
                   "grpc_protobuf": _ProtobufCaller(tensor_call), "shm": _ShmCaller(shm_call, regions)}
        per_size = {f"{mib}MiB": _round_trips(callers, bytes_call, echo, mib << 20, rounds) for mib in SIZES_MIB}
    finally:
        regions.close()
    paths = ("frames", "grpc", "grpc_protobuf", "grpc_bytes", "shm", "socket")
    total = {path: sum(rt[path] for rt in per_size.values()) for path in paths}
    moved = sum(2 * (mib << 20) for mib in SIZES_MIB)
    gbps = {path: moved / total[path] / 1e9 for path in paths}
    by_size = {f"{path}_gbps_by_size": {size: 2 * (int(size[:-3]) << 20) / rt[path] / 1e9
                                        for size, rt in per_size.items()} for path in paths}
    ratios = {size: rt["socket"] / rt["frames"] for size, rt in per_size.items()}
    return {
        "frames_gbps": gbps["frames"],
        "grpc_gbps": gbps["grpc"],
        "socket_gbps": gbps["socket"],
        "ratio": gbps["frames"] / gbps["socket"],
        "ratio_by_size": ratios,
        "ratio_geomean": math.prod(ratios.values()) ** (1 / len(ratios)),
        **by_size,
        "grpc_ratio": gbps["grpc"] / gbps["socket"],
        "grpc_protobuf_ratio": gbps["grpc_protobuf"] / gbps["socket"],
        "spliced_speedup": gbps["grpc"] / gbps["grpc_protobuf"],
        "grpc_bytes_ratio": gbps["grpc_bytes"] / gbps["socket"],
        "shm_gbps": gbps["shm"],
        "shm_ratio": gbps["shm"] / gbps["socket"],
        "codec_ms_64MiB": codec_stages(64 << 20),
        "definition": "GB/s = payload bytes x 2 (both directions) / round-trip s, GB = 1e9 B; overall = all bytes / "
                      "all round-trip time over the sizes; ratio = frames / socket; frames = the path an expert call "
                      "takes over TCP: ForwardRequest/Response with the tensor spliced over moe-frames/1; grpc = the "
                      "same messages over a gRPC unary call (ratio over socket: grpc_ratio); "
                      "grpc_protobuf = the same through protobuf's copies "
                      "(the path before); grpc_bytes = the same gRPC call "
                      "with raw bytes in and out (no protobuf, no codec); shm = the same-host path (tensor in a "
                      "shared-memory region, gRPC carries only where; read in place by the server, copied out by the "
                      "client); "
                      "shm_ratio = shm / socket; default_malloc = the same sweep before "
                      "reuse_freed_memory() (every other key is after it)",
        "load_avg_1m": os.getloadavg()[0],
    }


def _forward_request(x: torch.Tensor) -> bytes:
    """A ForwardRequest around `x` as the expert client builds it (spliced: one copy)."""
    return build(expert_pb2.ForwardRequest, expert_uid="0.0", inputs=encode_view(x, "fp32"))


class _FramesCaller:
    """The expert call's TCP path: spliced ForwardRequest/Response over moe-frames/1 (subnet/frames)."""

    def __init__(self, channel: FramesChannel):
        self.channel, self.parse = channel, SplicedParser(expert_pb2.ForwardResponse)

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        return decode(self.parse(self.channel.call(f"/{SERVICE}/Spliced", _forward_request(x), (), 60.0)).outputs)


class _SplicedCaller:
    """The same messages over a gRPC unary call."""

    def __init__(self, call):
        self.call = call

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        return decode(self.call(_forward_request(x), timeout=60.0).outputs)


class _ProtobufCaller:
    """A moe.v1.Tensor through protobuf's own copies (the path before subnet/spliced_wire.py)."""

    def __init__(self, call):
        self.call = call

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        return decode(self.call(encode(x, "fp32"), timeout=60.0))


class _ShmCaller:
    """The router's same-host path (services/router/remote_experts.py): a region per call, the tensor
    written into it, a gRPC call carrying only where, the answer decoded (copied) out of the region."""

    def __init__(self, call, regions: ShmRegionPool):
        self.call, self.regions = call, regions

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        with self.regions.lease() as region:
            req = region.write_request(x, output_nbytes=x.numel() * 4)
            inputs = shm_tensor("fp32", x.shape, region.name, req.input_offset, req.input_nbytes)
            reply = tensor_pb2.ShmReply(region=region.name, offset=req.output_offset, capacity=req.output_capacity)
            response = self.call.future(expert_pb2.ForwardRequest(inputs=inputs, reply_shm=reply),
                                        timeout=60.0).result()
            return decode(response.outputs, shm=lambda name, *view: region.view(*view))


def _round_trips(callers: dict, bytes_call, echo: _SocketEcho, nbytes: int, rounds: int) -> dict[str, float]:
    """Seconds of one round trip of `nbytes` on each path (best of `rounds` interleaved rounds)."""
    x = torch.randn(nbytes // 4 // 1024, 1024)
    payload = x.numpy().tobytes()
    reps = max(1, MIN_BYTES_PER_CALL // nbytes)

    def repeated(round_trip):
        def run():
            for _ in range(reps):
                round_trip()
        return run

    mib = nbytes >> 20
    for name, caller in callers.items():
        if not torch.equal(caller.round_trip(x), x):
            raise RuntimeError(f"the {name} echo of {mib} MiB changed the tensor")
    if bytes_call(payload, timeout=60.0) != payload:
        raise RuntimeError(f"the gRPC bytes echo of {mib} MiB changed the bytes")
    echo.round_trip(payload)
    if echo.reply != payload:
        raise RuntimeError(f"the socket echo of {mib} MiB changed the bytes")
    timed = {name: repeated(lambda caller=caller: caller.round_trip(x)) for name, caller in callers.items()}
    timed["grpc_bytes"] = repeated(lambda: bytes_call(payload, timeout=60.0))
    timed["socket"] = repeated(lambda: echo.round_trip(payload))
    times = best_times(timed, rounds=rounds)
    return {path: t / reps for path, t in times.items()}


def codec_stages(nbytes: int, repeats: int = 3) -> dict[str, float]:
    """Milliseconds of each step one side of the gRPC path runs on a tensor of `nbytes` (best of `repeats`),
    in this process: where the time goes besides the transport."""
    x = torch.randn(nbytes // 4 // 1024, 1024)
    msg = encode(x, "fp32")
    wire = msg.SerializeToString()
    parsed = tensor_pb2.Tensor.FromString(wire)
    view = torch.frombuffer(bytearray(parsed.data), dtype=torch.float32)
    body = _forward_request(x)
    spliced = SplicedParser(expert_pb2.ForwardRequest)(body)
    stages = {"spliced_build": lambda: _forward_request(x),                          # one copy: the join
              "spliced_parse": lambda: SplicedParser(expert_pb2.ForwardRequest)(body),   # a scan, no copy
              "spliced_decode": lambda: decode(spliced.inputs),                          # the finite check
              "encode": lambda: encode(x, "fp32"),                         # tobytes + copy into the message
              "serialize": msg.SerializeToString,
              "parse": lambda: tensor_pb2.Tensor.FromString(wire),
              "decode": lambda: decode(parsed),
              "decode_data_copy": lambda: parsed.data,                      # upb copies the field on access
              "decode_finite_check": lambda: all_finite(view),              # what decode runs: one sum
              "exact_finite_check": lambda: bool(torch.isfinite(view).all())}   # its fallback, for non-finite sums
    return {name: min(_seconds(fn) for _ in range(repeats)) * 1e3 for name, fn in stages.items()}


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.wire", description="one side of one sweep (run starts both)")
    parser.add_argument("side", choices=["serve", "measure"])
    parser.add_argument("grpc_port", type=int)
    parser.add_argument("socket_port", type=int)
    parser.add_argument("frames_port", type=int)
    parser.add_argument("--rounds", type=int, default=5, help="measure only")
    parser.add_argument(REUSE_FLAG, dest="reuse", action="store_true", help="call reuse_freed_memory() first")
    cli = parser.parse_args()
    if cli.side == "serve":
        serve(cli.grpc_port, cli.socket_port, cli.frames_port, reuse_memory=cli.reuse)
    else:
        print(json.dumps(measure(cli.grpc_port, cli.socket_port, cli.frames_port, cli.rounds,
                                 reuse_memory=cli.reuse)))
