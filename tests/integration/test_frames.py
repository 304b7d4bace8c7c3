"""moe-frames/1 (subnet/frames) against a real expert service with request signing on: tensor calls
go over it and answer exactly as gRPC does; hostile frames get their status (and a protocol
breach a closed connection) while the service keeps serving; a signed request replayed on the
other transport is refused; an unreachable port falls back to gRPC; deadlines hold."""

import queue
import socket
import struct
import time
import urllib.request
from contextlib import contextmanager

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from moe.experts import SwiGLU
from services.router.call_inbox import CallInbox
from subnet.auth.payload import sign_metadata
from subnet.expert_client import ExpertClientPool, InlineCall
from subnet.expert_weights import save_expert_weights
from subnet.frames import protocol as p
from subnet.frames.client import FramesChannel
from subnet.frames.link import FramesLink
from subnet.processes import free_port
from subnet.shm import ShmConfig
from subnet.spliced_wire import build
from subnet.tensor_codec import decode, encode, encode_view
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc
from tests.integration.frames_wire import frame, read_response

pytestmark = pytest.mark.integration
DIM, INTER = 64, 128
TIMEOUT_S = 10.0
FORWARD = "/moe.v1.Expert/Forward"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(11)
    path = tmp_path_factory.mktemp("ckpt") / "experts.safetensors"
    save_expert_weights(path, {"0.0": SwiGLU(DIM, INTER), "0.1": SwiGLU(DIM, INTER)})
    return path


@pytest.fixture(scope="module")
def service(expert_service_module_factory, checkpoint):
    return expert_service_module_factory(["0.0", "0.1"], DIM, INTER, env={
        "EXPERT_CHECKPOINT": str(checkpoint), "REDIS_URL": "", "EXPERT_MAX_MESSAGE_MB": "1"})


@pytest.fixture(scope="module")
def frames_port(service, client_identity):
    with ExpertClientPool(identity=client_identity, frames=False) as pool:
        port = pool.get(service.endpoint, service.hotkey).info(timeout_s=TIMEOUT_S).frames_port
    assert port > 0   # on by default (EXPERT_FRAMES_PORT=0: any free port)
    return port


def _x(n=6, seed=0):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


@contextmanager
def _one_expert(factory, checkpoint, identity, **env):
    """A service hosting expert 0.0 with `env`, and (pool, client) to it."""
    service = factory(["0.0"], DIM, INTER, env={"EXPERT_CHECKPOINT": str(checkpoint), "REDIS_URL": "", **env})
    with ExpertClientPool(identity=identity) as pool:
        yield pool, pool.get(service.endpoint, service.hotkey)


def _metrics(service) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(service.metrics_url, timeout=TIMEOUT_S).read().decode()
    return {(m.name, tuple(sorted(m.labels.items()))): m.value
            for family in text_string_to_metric_families(text) for m in family.samples}


def _served(client, inline=False) -> bool:
    """Whether a small inference Forward through `client` gets a (6, DIM) answer (`inline`: sent from
    this thread, see subnet.expert_client.InlineCall)."""
    answer = client.forward("0.0", encode_view(_x()), call_id="", step=0, training=False,
                            timeout_s=TIMEOUT_S, inline=inline).result()
    return decode(answer.outputs, expected_dim=DIM).shape == (6, DIM)


def _signed(identity, service, request, method=FORWARD):
    body = request if isinstance(request, bytes) else request.SerializeToString()
    return body, sign_metadata(identity, method, body, service.hotkey)


def _raw_call(port, request: bytes) -> tuple[grpc.StatusCode, str, bytes, socket.socket]:
    conn = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S)
    conn.sendall(request)
    code, details, body = read_response(conn)
    return code, details, body, conn


def _frame(method: str, metadata, body: bytes, timeout_s=TIMEOUT_S) -> bytes:
    return frame(method, metadata, body, timeout_s)


def test_tensor_calls_go_over_frames_and_answer_as_grpc_does(service, client_identity, frames_port):
    x = _x(seed=1)
    answers = {}
    for way in ("frames", "inline", "grpc"):   # inline: sent and read on this thread (InlineCall)
        frames, inline = way != "grpc", way == "inline"
        with ExpertClientPool(identity=client_identity, frames=frames) as pool:
            client = pool.get(service.endpoint, service.hotkey)
            if inline:   # the first call connects, on a call thread; the next ones find a kept connection
                first = client.forward("0.0", encode_view(x), call_id="", step=0, training=False,
                                       timeout_s=TIMEOUT_S, inline=True)
                assert not isinstance(first, InlineCall) and first.result()
            calls = [client.forward("0.1", encode_view(x), call_id="c", step=0, training=True,
                                    timeout_s=TIMEOUT_S, inline=inline)]
            forward = calls[-1].result()   # one after the other: each finds the connection kept by the one before
            calls.append(client.forward_many(["0.0", "0.1"], [2, 4], encode_view(x), step=0, timeout_s=TIMEOUT_S,
                                             inline=inline))
            many = calls[-1].result()
            calls.append(client.backward("0.1", encode_view(x), call_id="c", step=0, session_id=f"s{way}",
                                         timeout_s=TIMEOUT_S, inline=inline))
            backward = calls[-1].result()
            assert all(isinstance(c, InlineCall) for c in calls) is inline   # sent and read on this thread
            answers[way] = [decode(r, expected_dim=DIM) for r in
                            (forward.outputs, many.outputs, backward.grad_inputs)]
            channel = pool.frames.channel(service.endpoint) if frames else None
            assert (channel.calls if channel else 0) == (3 + inline if frames else 0)   # all went over frames
    for way in ("frames", "inline"):
        for over_frames, over_grpc in zip(answers[way], answers["grpc"]):
            assert torch.equal(over_frames, over_grpc)


def test_a_protocol_breach_gets_one_answer_and_a_closed_connection(service, frames_port):
    bad_magic = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".ljust(p.REQUEST.size, b" ")
    code, details, _, conn = _raw_call(frames_port, bad_magic)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "bad magic" in details
    assert conn.recv(1) == b""   # closed: the stream cannot be resynced
    too_big = p.request_header(FORWARD.encode(), b"", TIMEOUT_S, 2 << 20)   # over EXPERT_MAX_MESSAGE_MB=1
    code, details, _, conn = _raw_call(frames_port, too_big)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "at most" in details
    assert conn.recv(1) == b""
    bad_meta = p.request_header(FORWARD.encode(), b"\x05\x00junk", TIMEOUT_S, 0) + FORWARD.encode() + b"\x05\x00junk"
    code, details, _, conn = _raw_call(frames_port, bad_meta)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "metadata" in details
    metrics = _metrics(service)
    assert metrics.get(("expert_frames_refused_total", (("reason", "protocol"),)), 0) >= 3
    assert ("expert_frames_connections", ()) in metrics


def test_call_errors_keep_the_connection_and_match_grpc(service, client_identity, frames_port):
    request = expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(_x()))
    code, details, _, conn = _raw_call(frames_port, _frame(FORWARD, (), request.SerializeToString()))
    assert code is grpc.StatusCode.UNAUTHENTICATED   # the same signature check as gRPC
    body, metadata = _signed(client_identity, service, b"\x0a\xff\xff\xff")   # signed garbage
    conn.sendall(_frame(FORWARD, metadata, body))
    code, details, _ = read_response(conn)
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "not a valid moe.v1.ForwardRequest" in details
    norm = expert_pb2.GradNormRequest(expert_uid="0.0", step=0)
    body, metadata = _signed(client_identity, service, norm, "/moe.v1.Expert/GradNorm")
    conn.sendall(_frame("/moe.v1.Expert/GradNorm", metadata, body))
    code, details, _ = read_response(conn)
    assert code is grpc.StatusCode.UNIMPLEMENTED and "gRPC port" in details
    body, metadata = _signed(client_identity, service, request)
    conn.sendall(_frame(FORWARD, metadata, body))        # same connection, a good call
    code, _, answer = read_response(conn)
    assert code is grpc.StatusCode.OK
    assert decode(expert_pb2.ForwardResponse.FromString(answer).outputs, expected_dim=DIM).shape == (6, DIM)


def test_a_request_signed_once_is_refused_on_the_other_transport(service, client_identity, frames_port):
    request = expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(_x(seed=3)))
    body, metadata = _signed(client_identity, service, request)
    code, _, _, _ = _raw_call(frames_port, _frame(FORWARD, metadata, body))
    assert code is grpc.StatusCode.OK
    with grpc.insecure_channel(service.endpoint) as channel:
        replay = channel.unary_unary(FORWARD)
        with pytest.raises(grpc.RpcError) as err:
            replay(body, metadata=metadata, timeout=TIMEOUT_S)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED and "nonce" in err.value.details()


def test_a_stalled_peer_does_not_stop_other_calls(service, client_identity, frames_port):
    stalled = socket.create_connection(("127.0.0.1", frames_port))
    stalled.sendall(_frame(FORWARD, (), b"")[:7])   # half a header, then nothing
    with ExpertClientPool(identity=client_identity) as pool:
        assert _served(pool.get(service.endpoint, service.hotkey))
        assert pool.frames.channel(service.endpoint).calls == 1
    stalled.close()


def test_an_unreachable_frames_port_falls_back_to_grpc(service, client_identity, frames_port):
    closed = free_port()   # nothing listens there
    with ExpertClientPool(identity=client_identity) as pool:
        client = pool.get(service.endpoint, service.hotkey)
        client.frames = link = FramesLink(lambda endpoint: closed, 1 << 20)
        for inline in (False, True, False):
            assert _served(client, inline)   # over gRPC
        assert link.channel(service.endpoint) is None   # the same port failed: gRPC for a while
        link.close()


def test_a_call_past_its_deadline_is_deadline_exceeded(expert_service_module_factory, checkpoint, client_identity):
    with _one_expert(expert_service_module_factory, checkpoint, client_identity,
                     EXPERT_INJECT_DELAY_MS="400") as (pool, client):
        for inline in (False, True):
            with pytest.raises(grpc.RpcError) as err:
                client.forward("0.0", encode_view(_x()), call_id="", step=0, training=False, timeout_s=0.1,
                               inline=inline).result()
            assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED   # not the answer 0.4 s later
        # An inline call given up by its caller fails at once, its connection dropped (the answer may come).
        assert _served(client)   # a kept connection: the next inline call is sent from this thread
        call = client.forward("0.0", encode_view(_x()), call_id="", step=0, training=False, timeout_s=TIMEOUT_S,
                              inline=True)
        assert isinstance(call, InlineCall)
        assert call.cancel() is False and call.exception().code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert _served(client)
        assert pool.frames.channel(client.endpoint).calls >= 1


def test_the_frames_client_sees_a_closed_kept_connection_and_reconnects(service, client_identity, frames_port):
    channel = FramesChannel("127.0.0.1", frames_port, 1 << 20)
    request = build(expert_pb2.ForwardRequest, expert_uid="0.0", inputs=encode_view(_x()))
    body, metadata = _signed(client_identity, service, request)
    channel.call(FORWARD, body, metadata, TIMEOUT_S)
    kept, _ = channel._idle[0]
    kept.shutdown(socket.SHUT_RDWR)   # as if the server had closed it while idle
    body, metadata = _signed(client_identity, service, request)
    answer = channel.call(FORWARD, body, metadata, TIMEOUT_S)
    assert decode(expert_pb2.ForwardResponse.FromString(answer).outputs, expected_dim=DIM).shape == (6, DIM)
    channel.close()


def test_frames_off_means_no_port_and_grpc_only(expert_service_module_factory, checkpoint, client_identity):
    with _one_expert(expert_service_module_factory, checkpoint, client_identity,
                     EXPERT_FRAMES_PORT="-1") as (pool, client):
        assert client.info(timeout_s=TIMEOUT_S).frames_port == 0
        assert _served(client)
        assert pool.frames.channel(client.endpoint) is None


def test_metadata_round_trips_and_malformed_blocks_are_refused():
    entries = (("x-moe-hotkey", "5F"), ("x-moe-signature-bin", b"\x00\xff"), ("traceparent", "00-ab"))
    assert p.decode_metadata(p.encode_metadata(entries)) == entries
    block = p.encode_metadata(entries)
    for broken in (block[:-1], block + b"x", struct.pack("<H", 9) + block[2:]):
        with pytest.raises(p.ProtocolError):
            p.decode_metadata(broken)


def test_generated_stub_is_unaffected(service, client_identity):
    """Plain gRPC keeps working beside the frames port (other clients never see moe-frames)."""
    from subnet.auth import SigningChannel
    with grpc.insecure_channel(service.endpoint) as channel:
        stub = expert_pb2_grpc.ExpertStub(SigningChannel(channel, client_identity, service.hotkey))
        reply = stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(_x())), timeout=TIMEOUT_S)
    assert decode(reply.outputs, expected_dim=DIM).shape == (6, DIM)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(head=st.binary(min_size=0, max_size=p.REQUEST.size + 40), keep_magic=st.booleans(),
       body_len=st.integers(0, 4096))
def test_random_frames_get_an_answer_or_a_close_and_the_service_keeps_serving(service, client_identity,
                                                                              frames_port, head, keep_magic,
                                                                              body_len):
    if keep_magic:   # past the magic check, into the length and metadata checks
        head = p.REQUEST.pack(p.REQUEST_MAGIC, p.VERSION, 0, 1 + body_len % 300, body_len, 1000, body_len) + head
    conn = socket.create_connection(("127.0.0.1", frames_port), timeout=TIMEOUT_S)
    conn.sendall(head)
    conn.shutdown(socket.SHUT_WR)   # nothing more will come
    received = b""
    try:
        while chunk := conn.recv(1 << 16):
            received += chunk
    except ConnectionResetError:
        pass
    conn.close()
    if received:   # an answer must be a well-formed response frame with an error status
        code, details_len, body_len = p.parse_response_header(received[:p.RESPONSE.size], 1 << 20)
        assert code is not grpc.StatusCode.OK and body_len == 0
        assert len(received) == p.RESPONSE.size + details_len
    with ExpertClientPool(identity=client_identity) as pool:
        assert _served(pool.get(service.endpoint, service.hotkey))


def test_announced_bodies_beyond_the_budget_are_refused_and_the_call_goes_over_grpc(service, client_identity,
                                                                                     frames_port):
    """Headers announcing bodies that never come cannot make the server hold more than its budget
    (4 x EXPERT_MAX_MESSAGE_MB here); past it, frames are refused as busy and the client uses gRPC."""
    announced = 1 << 20   # EXPERT_MAX_MESSAGE_MB=1: the largest body a frame may announce
    stalled = []
    for _ in range(4):
        conn = socket.create_connection(("127.0.0.1", frames_port), timeout=TIMEOUT_S)
        conn.sendall(p.request_header(FORWARD.encode(), b"", TIMEOUT_S, announced) + FORWARD.encode())
        stalled.append(conn)   # header and method sent, the body never is
    deadline = time.monotonic() + TIMEOUT_S
    while True:   # until the server has taken in all four headers
        code, details, _, probe = _raw_call(frames_port, p.request_header(FORWARD.encode(), b"", TIMEOUT_S, 1))
        probe.close()
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
            break
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(p.BUSY)
    for inline in (False, True):   # an inline call learns it only from the answer: it falls back as well
        with ExpertClientPool(identity=client_identity) as pool:
            client = pool.get(service.endpoint, service.hotkey)
            assert _served(client, inline)                     # refused as busy over frames, served over gRPC
            assert pool.frames.channel(service.endpoint) is None   # gRPC for a while
    for conn in stalled:
        conn.close()


def test_one_info_call_tells_both_links_about_an_endpoint(service, client_identity, frames_port, tmp_path):
    """The shared-memory and moe-frames links both ask an endpoint's Info at its first call: one answer
    serves both (shared memory in a directory this test owns; the service's differs, so it says no)."""
    def info_calls() -> float:
        return _metrics(service).get(("expert_rpc_latency_seconds_count", (("rpc", "Info"),)), 0.0)

    before = info_calls()
    with ExpertClientPool(identity=client_identity, shm=ShmConfig(directory=str(tmp_path))) as pool:
        client = pool.get(service.endpoint, service.hotkey)
        assert _served(client)
        assert client.shm is not None and not client.shm.usable(service.endpoint)   # decided by that answer
        assert pool.frames.channel(service.endpoint).calls == 1
    assert info_calls() - before == 1


def test_try_start_never_blocks_and_leaves_what_the_socket_did_not_take():
    """The inline path's send: a peer that reads nothing cannot hold up the caller's thread; the rest of
    the frame waits in `unsent` for `send_rest()` (a call thread), bounded by the deadline."""
    listener = socket.create_server(("127.0.0.1", 0))
    channel = FramesChannel("127.0.0.1", listener.getsockname()[1], 64 << 20)
    assert channel.try_start(FORWARD, b"x", (), TIMEOUT_S) is None   # no kept connection: it does not connect
    channel._keep(*channel._connect(time.monotonic() + TIMEOUT_S, None))
    peer, _ = listener.accept()   # accepted, never read
    pending = channel.try_start(FORWARD, bytes(32 << 20), (), 0.5)
    assert pending is not None and sum(len(b) for b in pending.unsent) > 0
    with pytest.raises(p.FrameError) as err:
        pending.finish()   # sends the rest: the peer never reads it
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    peer.close()
    listener.close()
    channel.close()


def test_an_inline_call_whose_answer_stalls_halfway_never_blocks_its_caller():
    """A hostile expert sends part of an answer and stops: the caller's thread takes in what came and
    goes on (its straggler cut or deadline then gives the call up), instead of waiting in recv."""
    listener = socket.create_server(("127.0.0.1", 0))
    channel = FramesChannel("127.0.0.1", listener.getsockname()[1], 64 << 20)
    channel._keep(*channel._connect(time.monotonic() + TIMEOUT_S, None))
    peer, _ = listener.accept()
    pending = channel.try_start(FORWARD, b"request", (), TIMEOUT_S)
    assert pending is not None and not pending.unsent
    call = InlineCall(pending, "Forward", fall_back=lambda: pytest.fail("nothing to fall back from"))
    peer.sendall(p.response_header(grpc.StatusCode.OK, b"", 100)[:7])   # a third of a header, then nothing
    inbox = CallInbox()
    inbox.watch(call)
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.3)             # returned at its timeout, not at the call's 10 s deadline
    assert not call.done()
    assert call.cancel() is False and call.exception().code() is grpc.StatusCode.DEADLINE_EXCEEDED
    peer.close()
    listener.close()
    channel.close()
    inbox.close()
