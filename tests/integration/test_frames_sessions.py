"""Sessions on moe-frames connections (subnet.auth.sessions) against a real expert service with request
signing on: a pool opens one per connection and then sends MACs, not signatures; by hand, a replayed,
changed or sessionless call is refused with its reason and counted, a recorded connection cannot be
replayed, an Open is checked like any signed request; answers carry the session's MAC, and one changed on
the path (through a tampering proxy) is refused, as is an unsigned one from a service with auth off."""

import socket
import threading
import urllib.request

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from moe.experts import SwiGLU
from subnet.auth.client import AnswerRefused
from subnet.auth.payload import sign_metadata
from subnet.auth.sessions import MAC_KEY, PUBLIC_KEY_BYTES, SEQ_KEY, SESSION_METHOD, SessionOffer
from subnet.expert_client import ExpertClientPool
from subnet.expert_weights import save_expert_weights
from subnet.frames import client as p_client
from subnet.frames import protocol as p
from subnet.identity import Identity
from subnet.spliced_wire import build, serialize
from subnet.tensor_codec import decode, encode_view
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc
from tests.integration.frames_wire import frame, read_answer, read_response

pytestmark = pytest.mark.integration
DIM, INTER = 32, 64
TIMEOUT_S = 10.0
FORWARD = "/moe.v1.Expert/Forward"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("ckpt") / "experts.safetensors"
    save_expert_weights(path, {"0.0": SwiGLU(DIM, INTER)})
    return path


@pytest.fixture(scope="module")
def service(expert_service_module_factory, checkpoint):
    return expert_service_module_factory(["0.0"], DIM, INTER, env={"EXPERT_CHECKPOINT": str(checkpoint),
                                                                   "REDIS_URL": ""})


@pytest.fixture(scope="module")
def frames_port(service, client_identity):
    with ExpertClientPool(identity=client_identity, frames=False) as pool:
        return pool.get(service.endpoint, service.hotkey).info(timeout_s=TIMEOUT_S).frames_port


def _forward_body(seed=0) -> bytes:
    x = torch.randn(3, DIM, generator=torch.Generator().manual_seed(seed))
    return serialize(build(expert_pb2.ForwardRequest, expert_uid="0.0", inputs=encode_view(x)))


def _ask(conn: socket.socket, request: bytes) -> tuple[grpc.StatusCode, str, bytes]:
    conn.sendall(request)
    return read_response(conn)


def _open_frame(identity: Identity, service) -> tuple[SessionOffer, bytes]:
    offer = SessionOffer(identity.hotkey, service.hotkey)
    return offer, frame(SESSION_METHOD, sign_metadata(identity, SESSION_METHOD, offer.body, service.hotkey),
                         offer.body)


def _sessions_opened(service) -> float:
    text = urllib.request.urlopen(service.metrics_url, timeout=TIMEOUT_S).read().decode()
    return sum(m.value for family in text_string_to_metric_families(text) for m in family.samples
               if m.name == "expert_frames_sessions_total")


def _rejections(service) -> dict[str, float]:
    text = urllib.request.urlopen(service.metrics_url, timeout=TIMEOUT_S).read().decode()
    return {m.labels["reason"]: m.value for family in text_string_to_metric_families(text)
            for m in family.samples if m.name == "expert_auth_rejections_total"}


def _outputs_ok(code, body) -> bool:
    return code is grpc.StatusCode.OK and \
        decode(expert_pb2.ForwardResponse.FromString(body).outputs, expected_dim=DIM).shape == (3, DIM)


def test_a_pool_opens_one_session_per_connection_and_then_sends_macs(service, client_identity):
    calls = 12
    opened_before = _sessions_opened(service)
    with ExpertClientPool(identity=client_identity) as pool:
        client = pool.get(service.endpoint, service.hotkey)
        x = torch.randn(2, DIM)
        for i in range(calls):   # half from this thread (inline), half on the pool's call threads
            answer = client.forward("0.0", encode_view(x), call_id="", step=0, training=False, timeout_s=TIMEOUT_S,
                                    inline=i % 2 == 0).result()
            assert decode(answer.outputs, expected_dim=DIM).shape == (2, DIM)
        kept = pool.frames.channel(service.endpoint)._idle
        sessions = [session for _, session in kept]
    assert sessions and all(s is not None and s.receiver == service.hotkey for s in sessions)
    assert sum(s.seq for s in sessions) == calls   # every call was a session's (one MAC each)
    assert _sessions_opened(service) - opened_before == len(sessions)   # counted once each (no connection dropped)


def test_a_call_refused_before_its_session_check_costs_its_connection_not_the_next_call(service, client_identity):
    """An unknown method is answered UNIMPLEMENTED before the session is asked: the service's seq did not
    move, so the caller drops that connection rather than send the next call out of order on it."""
    with ExpertClientPool(identity=client_identity) as pool:
        client = pool.get(service.endpoint, service.hotkey)
        channel = pool.frames.channel(service.endpoint)
        body = _forward_body()
        assert _outputs_ok(grpc.StatusCode.OK, channel.call(FORWARD, body, (), TIMEOUT_S, client._frames_auth))
        with pytest.raises(p.FrameError) as err:
            channel.call("/moe.v1.Expert/Nope", body, (), TIMEOUT_S, client._frames_auth)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED
        assert _outputs_ok(grpc.StatusCode.OK, channel.call(FORWARD, body, (), TIMEOUT_S, client._frames_auth))
        assert len(channel._idle) == 1 and channel._idle[0][1].seq == 1   # a fresh connection and session
        # Refused after the check (an expert not hosted there): the connection and its session go on.
        unknown = serialize(build(expert_pb2.ForwardRequest, expert_uid="9.9", inputs=encode_view(torch.ones(1, DIM))))
        with pytest.raises(p.FrameError) as err:
            channel.call(FORWARD, unknown, (), TIMEOUT_S, client._frames_auth)
        assert err.value.code() is not grpc.StatusCode.UNAUTHENTICATED
        assert _outputs_ok(grpc.StatusCode.OK, channel.call(FORWARD, body, (), TIMEOUT_S, client._frames_auth))
        assert len(channel._idle) == 1 and channel._idle[0][1].seq == 3


def test_session_calls_by_hand_replays_and_changes_are_refused_and_the_service_goes_on(
        service, frames_port, client_identity):
    before = _rejections(service)
    conn = socket.create_connection(("127.0.0.1", frames_port), timeout=TIMEOUT_S)
    offer, open_frame = _open_frame(client_identity, service)
    code, details, answer = _ask(conn, open_frame)
    assert code is grpc.StatusCode.OK, details
    session = offer.accept(answer)

    body = _forward_body()
    first = frame(FORWARD, session.seal(FORWARD, body), body)   # MAC and seq only: no signature
    conn.sendall(first)
    code, details, answer, mac = read_answer(conn)
    assert _outputs_ok(code, answer)
    assert mac is not None and session.answer_error(FORWARD, 1, 0, details.encode(), answer, mac) is None
    assert session.answer_error(FORWARD, 1, 0, details.encode(), answer[:-1] + b"\0", mac) is not None
    conn.sendall(first)                                            # the same call again
    code, details, _, mac = read_answer(conn)
    assert code is grpc.StatusCode.UNAUTHENTICATED and "out of order" in details
    assert mac is None   # refused by the session check: no call of the session to answer
    other = _forward_body(seed=1)
    code, details, _ = _ask(conn, frame(FORWARD, session.seal(FORWARD, body), other))   # body swapped
    assert code is grpc.StatusCode.UNAUTHENTICATED and "bad session MAC" in details
    session.seq -= 1   # that call was refused: the service still waits for the same seq
    assert _outputs_ok(*_ask(conn, frame(FORWARD, session.seal(FORWARD, other), other))[::2])

    # The whole connection recorded and played again: the Open's nonce is spent, so no session.
    again = socket.create_connection(("127.0.0.1", frames_port), timeout=TIMEOUT_S)
    code, details, _ = _ask(again, open_frame)
    assert code is grpc.StatusCode.UNAUTHENTICATED and "replayed nonce" in details
    code, details, _ = _ask(again, first)
    assert code is grpc.StatusCode.UNAUTHENTICATED and "no open session" in details
    # Nor over gRPC, which has no sessions.
    with grpc.insecure_channel(service.endpoint) as channel:
        call = channel.unary_unary(FORWARD, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            call(body, metadata=((SEQ_KEY, "1"), (MAC_KEY, bytes(32))), timeout=TIMEOUT_S)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED and "no open session" in err.value.details()
        assert len(expert_pb2_grpc.ExpertStub(channel).Info(expert_pb2.InfoRequest(), timeout=TIMEOUT_S).experts) == 1
    after = _rejections(service)
    for reason, count in {"session_seq": 1, "bad_session_mac": 1, "replayed_nonce": 1, "no_session": 2}.items():
        assert after.get(reason, 0) - before.get(reason, 0) == count, reason
    assert _outputs_ok(*_ask(conn, frame(FORWARD, session.seal(FORWARD, body), body))[::2])   # still served
    for c in (conn, again):
        c.close()


def test_an_open_is_checked_like_any_signed_request(service, frames_port, client_identity):
    conn = socket.create_connection(("127.0.0.1", frames_port), timeout=TIMEOUT_S)
    offer = SessionOffer(client_identity.hotkey, service.hotkey)
    code, details, _ = _ask(conn, frame(SESSION_METHOD, (), offer.body))
    assert code is grpc.StatusCode.UNAUTHENTICATED and "not signed" in details
    stranger = Identity.generate()
    code, details, _ = _ask(conn, _open_frame(stranger, service)[1])
    assert code is grpc.StatusCode.PERMISSION_DENIED and stranger.hotkey in details
    low_order = bytes(32)   # a point whose shared secret anyone knows
    code, details, _ = _ask(conn, frame(SESSION_METHOD, sign_metadata(client_identity, SESSION_METHOD, low_order,
                                                                       service.hotkey), low_order))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and "Curve25519" in details
    offer, open_frame = _open_frame(client_identity, service)   # the connection is still good for one
    code, _, answer = _ask(conn, open_frame)
    session = offer.accept(answer)
    body = _forward_body()
    assert _outputs_ok(*_ask(conn, frame(FORWARD, session.seal(FORWARD, body), body))[::2])
    # A new Open must be signed: the session's MAC does not stand in for the signature there.
    again = SessionOffer(client_identity.hotkey, service.hotkey)
    code, details, _ = _ask(conn, frame(SESSION_METHOD, session.seal(SESSION_METHOD, again.body), again.body))
    assert code is grpc.StatusCode.UNAUTHENTICATED and "not signed" in details
    conn.close()


def test_a_service_with_auth_off_is_refused_by_a_signing_pool_and_serves_one_that_does_not_sign(
        expert_service_factory, checkpoint, client_identity):
    """A signing pool takes no unsigned answer (it cannot tell that service from someone on the path): each
    call fails with a message naming AUTH_MODE (its Info too, so the pool never learns of moe-frames there).
    A pool that does not sign (AUTH_MODE=off too) is served."""
    service = expert_service_factory(["0.0"], DIM, INTER, env={"EXPERT_CHECKPOINT": str(checkpoint), "REDIS_URL": "",
                                                               "AUTH_MODE": "off"})
    with ExpertClientPool(identity=client_identity) as pool:
        client = pool.get(service.endpoint, service.hotkey)
        for inline in (False, True, False):
            with pytest.raises(grpc.RpcError) as err:
                client.forward("0.0", encode_view(torch.randn(2, DIM)), call_id="", step=0, training=False,
                               timeout_s=TIMEOUT_S, inline=inline).result()
            assert err.value.code() is grpc.StatusCode.INTERNAL and "AUTH_MODE" in err.value.details()
    with ExpertClientPool() as pool:
        answer = pool.get(service.endpoint).forward("0.0", encode_view(torch.randn(2, DIM)), call_id="", step=0,
                                                    training=False, timeout_s=TIMEOUT_S).result()
        assert decode(answer.outputs, expected_dim=DIM).shape == (2, DIM)


class _TamperingProxy:
    """A man in the middle on loopback: relays one connection at a time to `upstream`, and from the
    service's `skip`-th byte on, flips the last byte of every chunk it relays back to the caller."""

    def __init__(self, upstream: tuple[str, int], skip: int):
        self.upstream, self.skip = upstream, skip
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                caller, _ = self.listener.accept()
            except OSError:
                return
            service = socket.create_connection(self.upstream)
            threading.Thread(target=self._relay, args=(caller, service, None), daemon=True).start()
            threading.Thread(target=self._relay, args=(service, caller, self.skip), daemon=True).start()

    @staticmethod
    def _relay(source: socket.socket, sink: socket.socket, skip: int | None) -> None:
        seen = 0
        try:
            while chunk := source.recv(1 << 16):
                seen += len(chunk)
                if skip is not None and seen > skip:
                    chunk = chunk[:-1] + bytes([chunk[-1] ^ 1])
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def close(self) -> None:
        self.listener.close()


OPEN_ANSWER_BYTES = p.RESPONSE.size + PUBLIC_KEY_BYTES + 64


@pytest.mark.parametrize("skip", [OPEN_ANSWER_BYTES, OPEN_ANSWER_BYTES - 1])
def test_an_answer_changed_on_the_path_is_refused(service, frames_port, client_identity, skip):
    """A changed session answer fails its MAC (INTERNAL, the connection dropped); a changed Open answer
    fails its signature, so no session is opened on it, and the call signed on its own then gets a changed
    answer too, which fails the answer's signature."""
    proxy = _TamperingProxy(("127.0.0.1", frames_port), skip)
    try:
        with ExpertClientPool(identity=client_identity, frames=False) as pool:
            auth = pool.get(service.endpoint, service.hotkey)._frames_auth
            channel = p_client.FramesChannel("127.0.0.1", proxy.port, max_body_bytes=1 << 20)
            with pytest.raises(AnswerRefused) as err:
                channel.call(FORWARD, _forward_body(), (), TIMEOUT_S, auth)
            assert err.value.code() is grpc.StatusCode.INTERNAL and err.value.reason == "unauthenticated_answer"
            assert not channel._idle   # not kept: what comes on it cannot be trusted any more
            if skip == OPEN_ANSWER_BYTES:
                assert "does not match" in err.value.details()
            else:   # no session: the call went signed on a fresh connection
                assert "signature of it" in err.value.details() and channel._sessions_refused_at > 0
            channel.close()
            untouched = p_client.FramesChannel("127.0.0.1", frames_port, max_body_bytes=1 << 20)
            assert _outputs_ok(grpc.StatusCode.OK, untouched.call(FORWARD, _forward_body(), (), TIMEOUT_S, auth))
            assert untouched._idle[0][1] is not None   # the same caller, straight to the service: a session
            untouched.close()
    finally:
        proxy.close()
