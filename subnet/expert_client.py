"""Client side of `moe.v1.Expert`: one pooled channel per endpoint, a deadline on every call.

    pool = ExpertClientPool(identity=my_identity, hotkeys=replicas.hotkey)
    client = pool.get("127.0.0.1:50051")          # or pool.get(endpoint, hotkey) when you know it
    future = client.forward("0.3", encode(x), call_id="c1", step=0, training=False, timeout_s=2.0)
    outputs = decode(future.result().outputs, expected_dim=x.shape[1])

Every request is signed with the pool's `identity` for the hotkey that serves the endpoint
(`subnet.auth.SigningChannel`: serialized once, the sha256 of those bytes signed). The
hotkey is looked up on every call, pinned by `get(endpoint, hotkey)` or else asked of
`hotkeys(endpoint)` (the router passes `ReplicaSet.hotkey`, from the registry), because
which miner serves an endpoint can change. `identity=None` sends unsigned requests
(receivers with AUTH_MODE=off). Over moe-frames, each connection opens a session with one
such signed request and its calls then carry a MAC instead (`subnet.auth.sessions`).

Concurrency model: every call returns at once with a `concurrent.futures.Future` (result =
the response; a failed call raises its `grpc.RpcError`), so the caller puts the N calls of
one MoE layer in flight from the thread that runs autograd and then waits on the futures.
Each call is a blocking sync-stub call on one of the pool's long-lived call threads, which
stay idle between calls. Not `stub.X.future()`: gRPC runs such calls on a polling thread per
channel that it starts with the first call and ends when no call is left, so a decode step,
whose layers call one after the other, started a fresh thread per channel and layer (1 to
2 ms of a 5 ms layer, measured on two busy cores). There is no event-loop thread to keep alive, no
hand-off of torch tensors between threads (only requests and responses), and the same code
works when autograd runs backward on a worker thread. `cancel()` takes back a call that has
not started; a started one ends at its deadline.

`inline=True` (the router's MoE layers pass it): a small tensor call to an endpoint that takes
moe-frames is sent from the calling thread instead, and comes back as an `InlineCall`, whose
answer the caller reads itself once its socket is readable (services.router.call_inbox). No
call thread is involved: a decode step's calls skip two thread hand-offs each.

This module only turns arguments into requests and requests into futures. It does not
choose replicas, retry, or decode tensors (see `services.router.remote_experts`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Self

import grpc

from subnet.auth.client import SigningChannel
from subnet.auth.sessions import FramesAuth
from subnet.frames.client import FramesChannel, PendingCall, Unreachable
from subnet.frames.link import FramesLink
from subnet.frames.protocol import EXPERT_RPCS, RPC_SYSTEM, FrameError
from subnet.identity import Identity
from subnet.shm import ShmConfig
from subnet.shm_link import ShmLink
from subnet.spliced_wire import SplicedParser, SplicingChannel, WireTensor, build, serialize
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2

Metadata = Sequence[tuple[str, str]]
SHM_INFO_TIMEOUT_S = 2.0   # the one Info call that tells whether an endpoint shares this host's memory
TRANSPORT_INFO_REUSE_S = 1.0   # and whether it takes moe-frames: one answer for both links
# Calls in flight at once per pool; more wait for a free thread (their deadline runs meanwhile).
# Threads start only when that many calls overlap, and then stay for the next layer.
MAX_CALLS_IN_FLIGHT = 256
SERVICE = expert_pb2.DESCRIPTOR.services_by_name["Expert"].full_name
# The calls that go over moe-frames/1 when the endpoint offers it, and how their answers are parsed.
FRAMES_RESPONSES = {rpc: SplicedParser(getattr(expert_pb2, f"{rpc}Response")) for rpc in EXPERT_RPCS}
# An `inline` call this small is sent from the caller's thread (see InlineCall): sendall returns at once.
INLINE_MAX_BYTES = 256 << 10


@dataclass(frozen=True)
class ChannelSettings:
    """gRPC channel options shared by every expert channel."""

    max_message_mb: float = 64.0           # one micro-batch of one expert; 64 MB = 16M fp32 values
    keepalive_time_s: float = 30.0         # ping a connection that carries a call this long without data
    keepalive_timeout_s: float = 10.0      # a ping unanswered this long closes the connection
    initial_reconnect_backoff_s: float = 0.2  # a restarted expert is reachable again quickly
    max_reconnect_backoff_s: float = 2.0   # gRPC's default (120 s) would hide a restarted expert for minutes

    @property
    def max_bytes(self) -> int:
        return int(self.max_message_mb * 1024 * 1024)

    def options(self) -> list[tuple[str, int]]:
        max_bytes = self.max_bytes
        return [
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.keepalive_time_ms", int(self.keepalive_time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_s * 1000)),
            # Pings only while calls are in flight: servers answer idle pings with GOAWAY.
            ("grpc.keepalive_permit_without_calls", 0),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", int(self.initial_reconnect_backoff_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(self.initial_reconnect_backoff_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(self.max_reconnect_backoff_s * 1000)),
        ]


class ExpertClient:
    """The RPCs of one expert endpoint. Every method needs `timeout_s`: no call without a deadline.
    With an `identity`, requests are signed for the hotkey `receiver()` names at each call."""

    def __init__(self, endpoint: str, channel: grpc.Channel, calls: ThreadPoolExecutor,
                 identity: Identity | None = None, receiver: Callable[[], str | None] = lambda: None,
                 shm: ShmLink | None = None, frames: FramesLink | None = None):
        """`calls`: the threads that carry the calls (the pool's, shared by all its clients)."""
        self.endpoint = endpoint
        self.shm = shm   # the pool's shared-memory link (None = every tensor inline)
        self.frames = frames   # the pool's moe-frames link (None = gRPC only)
        self._calls = calls
        self._signer = SigningChannel(channel, identity, receiver)
        # moe-frames calls: a session per connection (one signed key exchange, then a MAC per call)
        self._frames_auth = FramesAuth(self._signer) if identity is not None else None
        # Signed over the exact bytes sent; tensors copied once on the way out and none on the way in.
        self._stub = expert_pb2_grpc.ExpertStub(SplicingChannel(self._signer))

    def forward(self, uid: str, inputs: tensor_pb2.Tensor | WireTensor, *, call_id: str, step: int, training: bool,
                timeout_s: float, metadata: Metadata = (), reply_shm: tensor_pb2.ShmReply | None = None,
                inline: bool = False, committed_round: int | None = None) -> Future:
        """`reply_shm`: where the expert writes the outputs (its inputs came through shared memory too).
        `inline`: the caller completes the call itself when it may (see InlineCall). `committed_round`
        (validators): ask for the weights the service committed in that round, not its live ones."""
        extra = {} if committed_round is None else {"committed_round": committed_round}
        request = build(expert_pb2.ForwardRequest, expert_uid=uid, inputs=inputs, call_id=call_id, step=step,
                        training=training, reply_shm=reply_shm, **extra)
        return self._start("Forward", request, timeout_s, metadata, inline)

    def forward_many(self, uids: Sequence[str], tokens: Sequence[int], inputs: tensor_pb2.Tensor | WireTensor, *,
                     step: int, timeout_s: float, metadata: Metadata = (), inline: bool = False) -> Future:
        """Inference Forward of several experts of this endpoint: `inputs` holds their rows one after
        the other, `tokens[i]` rows for `uids[i]`; the answer's outputs are in the same order."""
        request = build(expert_pb2.ForwardManyRequest, expert_uids=uids, tokens=tokens, inputs=inputs, step=step)
        return self._start("ForwardMany", request, timeout_s, metadata, inline)

    def backward(self, uid: str, grad_outputs: tensor_pb2.Tensor | WireTensor, *, call_id: str, step: int,
                 timeout_s: float, inputs: tensor_pb2.Tensor | WireTensor | None = None, session_id: str = "",
                 metadata: Metadata = (), reply_shm: tensor_pb2.ShmReply | None = None,
                 inline: bool = False, apply_now: expert_pb2.ApplyNow | None = None) -> Future:
        """`inputs` only when the expert answered FAILED_PRECONDITION (it lost the activations).
        `apply_now`: asynchronous training, the expert steps on this call's gradients at once."""
        request = build(expert_pb2.BackwardRequest, expert_uid=uid, call_id=call_id, step=step,
                        grad_outputs=grad_outputs, inputs=inputs, session_id=session_id, reply_shm=reply_shm,
                        apply_now=apply_now)
        return self._start("Backward", request, timeout_s, metadata, inline)

    def grad_norm(self, uid: str, *, step: int, timeout_s: float, session_id: str = "",
                  metadata: Metadata = (), wait_for_ready: bool = False) -> Future:
        """`wait_for_ready`: wait (within the timeout) for a channel that is reconnecting, instead of
        failing at once with UNAVAILABLE (gRPC's default), as for ApplyStep."""
        request = expert_pb2.GradNormRequest(expert_uid=uid, step=step, session_id=session_id)
        return self._start("GradNorm", request, timeout_s, metadata, wait_for_ready=wait_for_ready)

    def apply_step(self, uid: str, *, step: int, lr: float, grad_scale: float, weight_decay: float,
                   beta1: float, beta2: float, eps: float, timeout_s: float, session_id: str = "",
                   skip: bool = False, metadata: Metadata = (), wait_for_ready: bool = False) -> Future:
        """`skip`: discard the step's gradients without an update (the other numbers are then ignored).
        `wait_for_ready`: as for `grad_norm`."""
        request = expert_pb2.ApplyStepRequest(expert_uid=uid, step=step, lr=lr, grad_scale=grad_scale,
                                              weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps,
                                              session_id=session_id, skip=skip)
        return self._start("ApplyStep", request, timeout_s, metadata, wait_for_ready=wait_for_ready)

    def info(self, *, timeout_s: float, metadata: Metadata = ()) -> expert_pb2.InfoResponse:
        """Blocking: Info is for probes and start-up checks, not the hot path."""
        return self._stub.Info(expert_pb2.InfoRequest(), timeout=timeout_s, metadata=metadata)

    def _start(self, rpc: str, request: Any, timeout_s: float, metadata: Metadata, inline: bool = False,
               wait_for_ready: bool = False) -> Future:
        """The call on a call thread, over moe-frames when it is a tensor call and the endpoint takes them,
        else gRPC; the deadline counts from now, not from when a thread is free. `inline` and a small
        frames request: sent from this thread instead, as an InlineCall. `wait_for_ready` (gRPC calls):
        a channel that is not connected is waited for until the deadline, not failed at once."""
        deadline = time.monotonic() + timeout_s
        method = getattr(self._stub, rpc)
        channel = self.frames.channel(self.endpoint) if self.frames is not None and rpc in FRAMES_RESPONSES else None
        if channel is None:
            return self._calls.submit(_call, method, request, deadline, metadata, wait_for_ready)
        if inline and _size(request) <= INLINE_MAX_BYTES:
            future = self._start_inline(channel, rpc, method, request, deadline, metadata)
        else:
            future = self._calls.submit(self._call_frames, channel, rpc, method, request, deadline, metadata)
        future.rpc_system = RPC_SYSTEM   # for the caller's trace span (gRPC when no attribute: a fallback
        return future                    # to gRPC after "busy" or a failed connect is not told apart)

    def _framed(self, rpc: str, request: Any, metadata: Metadata) -> tuple[str, bytes, tuple]:
        """(path, body, metadata) of a moe-frames call; the channel adds what authenticates it (`_frames_auth`)."""
        return f"/{SERVICE}/{rpc}", serialize(request), tuple(metadata)

    def _call_frames(self, channel: FramesChannel, rpc: str, method: Callable[..., Any], request: Any,
                     deadline: float, metadata: Metadata, framed: tuple[str, bytes, tuple] | None = None) -> Any:
        """The call over moe-frames (`framed`: its `_framed` form, when the caller has it already)."""
        path, body, extra = framed or self._framed(rpc, request, metadata)
        try:
            pending = channel.start(path, body, extra, max(deadline - time.monotonic(), 0.001), self._frames_auth)
        except Unreachable:   # no connection: nothing was sent
            return self._over_grpc(method, request, deadline, metadata)
        return self._finish_frames(pending, rpc, method, request, deadline, metadata)

    def _finish_frames(self, pending: PendingCall, rpc: str, method: Callable[..., Any], request: Any,
                       deadline: float, metadata: Metadata) -> Any:
        try:
            answer = pending.finish()
        except Unreachable:   # refused as busy before it was processed
            return self._over_grpc(method, request, deadline, metadata)
        return FRAMES_RESPONSES[rpc](answer)

    def _over_grpc(self, method: Callable[..., Any], request: Any, deadline: float, metadata: Metadata) -> Any:
        """A call moe-frames did not process, over gRPC instead (signed afresh); the link uses gRPC for a while."""
        self.frames.unreachable(self.endpoint)
        return _call(method, request, deadline, metadata)

    def _start_inline(self, channel: FramesChannel, rpc: str, method: Callable[..., Any], request: Any,
                      deadline: float, metadata: Metadata) -> Future:
        """Sent from this thread when that cannot block: on a kept connection (no connect here), the frame
        taken by the socket at once. Otherwise a call thread connects, or sends the rest, and reads."""
        framed = self._framed(rpc, request, metadata)
        try:
            pending = channel.try_start(*framed, max(deadline - time.monotonic(), 0.001), self._frames_auth)
        except FrameError as e:
            failed: Future = Future()
            failed.set_exception(e)
            return failed
        if pending is None:   # connects there, with the request serialized here
            return self._calls.submit(self._call_frames, channel, rpc, method, request, deadline, metadata, framed)
        if pending.unsent:
            return self._calls.submit(self._finish_frames, pending, rpc, method, request, deadline, metadata)

        def over_grpc() -> Future:   # refused as busy (nothing processed): over gRPC, on a call thread
            return self._calls.submit(self._over_grpc, method, request, deadline, metadata)
        return InlineCall(pending, rpc, over_grpc)


class InlineCall(Future):
    """A small moe-frames call sent from the caller's own thread, whose answer that thread reads too:
    it watches `fileno()` and calls `on_readable()` each time it is readable (services.router.call_inbox),
    so no call thread is involved. `result()` and `exception()` complete it themselves when nobody has.
    `cancel()` gives it up (the connection is closed) and fails it with DEADLINE_EXCEEDED."""

    def __init__(self, pending: PendingCall, rpc: str, fall_back: Callable[[], Future]):
        super().__init__()
        self._pending, self._rpc, self._fall_back = pending, rpc, fall_back
        self._taken = threading.Lock()   # complete() runs once

    def fileno(self) -> int:
        return self._pending.fileno()

    def on_readable(self) -> bool:
        """Take in what has arrived (never waits); True once the call is settled, False while its answer is
        still partial: a peer that sends half an answer and stalls cannot hold up the caller's thread,
        which keeps watching it until the caller's deadline or straggler cut gives it up."""
        if self.done():
            return True
        try:
            if not self._pending.read_available():
                return False
        except FrameError as e:
            if self._taken.acquire(blocking=False):
                self._settle(exception=e)
            return True
        self.complete()   # the answer is whole: this does not wait
        return True

    def complete(self) -> None:
        """Read the answer (blocking until it is whole, or the deadline) and settle the future."""
        if not self._taken.acquire(blocking=False):
            return
        try:
            answer = self._pending.finish()
        except Unreachable:   # refused as busy before it was processed: over gRPC instead
            self._fall_back().add_done_callback(self._adopt)
            return
        except FrameError as e:
            self._settle(exception=e)
            return
        try:
            self._settle(result=FRAMES_RESPONSES[self._rpc](answer))
        except Exception as e:   # noqa: BLE001 - a parse failure is the call's failure
            self._settle(exception=e)

    def cancel(self) -> bool:
        if self._taken.acquire(blocking=False):
            self._pending.abandon()
            self._settle(exception=FrameError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                              "given up by the caller (moe-frames)"))
        return False   # like a running call: it is not "cancelled", it failed

    def result(self, timeout: float | None = None) -> Any:
        self.complete()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.complete()
        return super().exception(timeout)

    def _adopt(self, other: Future) -> None:
        if other.cancelled():   # the pool was closed
            self._settle(exception=FrameError(grpc.StatusCode.CANCELLED, "the client pool was closed"))
            return
        error = other.exception()
        self._settle(exception=error) if error is not None else self._settle(result=other.result())

    def _settle(self, result: Any = None, exception: BaseException | None = None) -> None:
        if self.done():
            return
        if exception is not None:
            self.set_exception(exception)
        else:
            self.set_result(result)


def _size(request: Any) -> int:
    """Bytes of a request: `build`'s bytes, or a message."""
    return len(request) if isinstance(request, bytes) else request.ByteSize()


def _call(method: Callable[..., Any], request: Any, deadline: float, metadata: Metadata,
          wait_for_ready: bool = False) -> Any:
    # Past the deadline already (it waited for a thread): gRPC answers DEADLINE_EXCEEDED itself.
    timeout = max(deadline - time.monotonic(), 0.0)
    if wait_for_ready:
        return method(request, timeout=timeout, metadata=metadata, wait_for_ready=True)
    return method(request, timeout=timeout, metadata=metadata)


class ExpertClientPool:
    """One channel per endpoint, created on first use and reused by every call and every layer.

    Thread-safe. A channel reconnects by itself when its server comes back, so a failed
    endpoint keeps its channel. `close()` closes them all; a later `get` opens a fresh one.
    """

    def __init__(self, settings: ChannelSettings = ChannelSettings(), identity: Identity | None = None,
                 hotkeys: Callable[[str], str | None] | None = None, shm: ShmConfig | None = None,
                 frames: bool = True):
        """`identity`: who signs (None = unsigned). `hotkeys(endpoint)`: the hotkey serving an endpoint.
        `shm`: tensors to experts on this host through shared memory (SHM_TRANSPORT); None = never.
        `frames`: Forward, ForwardMany and Backward over moe-frames/1 to endpoints that offer it."""
        self._settings = settings
        self.identity = identity
        self._hotkeys = hotkeys
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._clients: dict[str, ExpertClient] = {}
        self._pinned: dict[str, str] = {}
        self._calls: ThreadPoolExecutor | None = None   # started by the first `get`
        self._infos: dict[str, tuple[expert_pb2.InfoResponse, float, set[str]]] = {}   # see _transport_info
        self.shm = ShmLink(shm, self._shm_host_id) if shm is not None and shm.enabled else None
        self.frames = FramesLink(self._frames_port, settings.max_bytes) if frames else None

    def _shm_host_id(self, endpoint: str) -> str:
        return self._transport_info(endpoint, "shm").shm_host_id

    def _frames_port(self, endpoint: str) -> int:
        return self._transport_info(endpoint, "frames").frames_port

    def _transport_info(self, endpoint: str, asker: str) -> expert_pb2.InfoResponse:
        """The endpoint's Info for the shared-memory or the moe-frames link. Both ask when the first call to
        an endpoint goes out: one answer serves each of them once (within TRANSPORT_INFO_REUSE_S); a link
        that asks again (to retry, or after a failed connect) gets a fresh one."""
        now = time.monotonic()
        with self._lock:
            cached = self._infos.get(endpoint)
            if cached is not None and asker not in cached[2] and now - cached[1] < TRANSPORT_INFO_REUSE_S:
                cached[2].add(asker)
                return cached[0]
        info = self.get(endpoint).info(timeout_s=SHM_INFO_TIMEOUT_S)
        with self._lock:
            self._infos[endpoint] = (info, now, {asker})
        return info

    def get(self, endpoint: str, hotkey: str | None = None) -> ExpertClient:
        """The client of `endpoint`; `hotkey` pins the receiver hotkey its requests are signed for."""
        with self._lock:
            if hotkey:
                self._pinned[endpoint] = hotkey
            client = self._clients.get(endpoint)
            if client is None:
                if self._calls is None:
                    self._calls = ThreadPoolExecutor(MAX_CALLS_IN_FLIGHT, thread_name_prefix="expert-call")
                channel = grpc.insecure_channel(endpoint, options=self._settings.options())
                self._channels[endpoint] = channel
                client = self._clients[endpoint] = ExpertClient(endpoint, channel, self._calls, self.identity,
                                                                lambda: self.hotkey(endpoint), self.shm, self.frames)
            return client

    def hotkey(self, endpoint: str) -> str | None:
        """The hotkey a request to `endpoint` is signed for: the pinned one, else `hotkeys(endpoint)`."""
        pinned = self._pinned.get(endpoint)
        if pinned is not None or self._hotkeys is None:
            return pinned
        return self._hotkeys(endpoint)

    def endpoints(self) -> list[str]:
        with self._lock:
            return sorted(self._channels)

    def close(self) -> None:
        with self._lock:
            channels, self._channels, self._clients = list(self._channels.values()), {}, {}
            calls, self._calls = self._calls, None
        if calls is not None:   # calls not started yet are cancelled; closing a channel ends its calls
            calls.shutdown(wait=False, cancel_futures=True)
        for channel in channels:
            channel.close()
        if self.shm is not None:
            self.shm.close()
        if self.frames is not None:
            self.frames.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
