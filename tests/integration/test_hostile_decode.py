"""Request bodies that are not valid protobuf, against a real expert service: INVALID_ARGUMENT
naming the message type, never UNKNOWN, and no traceback in the log (one short line at most per
10 s), with AUTH_MODE=on (garbage that is properly signed) and AUTH_MODE=off."""

from __future__ import annotations

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from subnet.auth import SigningChannel, sign_metadata
from subnet.tensor_codec import decode, encode
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc

pytestmark = pytest.mark.integration
DIM, INTER = 16, 32
Code = grpc.StatusCode
MESSAGES = {"Forward": "moe.v1.ForwardRequest", "Backward": "moe.v1.BackwardRequest",
            "GradNorm": "moe.v1.GradNormRequest", "ApplyStep": "moe.v1.ApplyStepRequest"}
# Garbage whatever the message type, plus one that needs a string field 1 (InfoRequest has none:
# for it, field 1 is an unknown field, which parses).
GARBAGE = {
    "not protobuf at all": b"\xff\xff\xff\xff\xff",
    "truncated length-delimited field": b"\x12\x40\x08\x01",
    "wire type 7 (there is none)": b"\x0f",
    "an end-group tag without its start": b"\x0c",
    "an unterminated varint": b"\x08" + b"\xff" * 11,
}
BAD_UTF8 = {"invalid UTF-8 in string field 1": b"\x0a\x02\xff\xfe"}


@pytest.fixture(scope="module")
def service(expert_service_module_factory):
    return expert_service_module_factory(["0.0"], DIM, INTER, env={"REDIS_URL": ""})


def _send(channel, method: str, body: bytes, metadata=()):
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        return call(body, timeout=10, metadata=metadata)
    except grpc.RpcError as e:
        return e


def _normal_forward_works(channel, identity, hotkey):
    stub = expert_pb2_grpc.ExpertStub(SigningChannel(channel, identity, hotkey))
    reply = stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(torch.ones(2, DIM))), timeout=10)
    assert decode(reply.outputs).shape == (2, DIM)


def _assert_quiet_log(service):
    log = service.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]
    assert len([line for line in log.splitlines() if "does not parse" in line]) <= 1, log[-3000:]


@pytest.mark.parametrize("rpc", sorted(MESSAGES))
def test_signed_garbage_is_invalid_argument_with_auth_on(service, client_identity, rpc):
    method = f"/moe.v1.Expert/{rpc}"
    with grpc.insecure_channel(service.endpoint) as channel:
        for case, body in {**GARBAGE, **BAD_UTF8}.items():
            error = _send(channel, method, body, sign_metadata(client_identity, method, body, service.hotkey))
            assert isinstance(error, grpc.RpcError), case
            assert (error.code(), error.details()) == (Code.INVALID_ARGUMENT,
                                                       f"request body is not a valid {MESSAGES[rpc]}"), case
            unsigned = _send(channel, method, body)        # the signature is checked before the body
            assert unsigned.code() == Code.UNAUTHENTICATED, case
        _normal_forward_works(channel, client_identity, service.hotkey)
    _assert_quiet_log(service)


def test_garbage_to_open_methods_is_invalid_argument_with_auth_on(service, client_identity):
    """Info and Health are not signed, so no auth wrapper parses for them: the decode guard does."""
    with grpc.insecure_channel(service.endpoint) as channel:
        for body in GARBAGE.values():
            error = _send(channel, "/moe.v1.Expert/Info", body)
            assert (error.code(), error.details()) == (Code.INVALID_ARGUMENT,
                                                       "request body is not a valid moe.v1.InfoRequest")
        for body in {**GARBAGE, **BAD_UTF8}.values():
            error = _send(channel, "/grpc.health.v1.Health/Check", body)
            assert (error.code(), error.details()) == (
                Code.INVALID_ARGUMENT, "request body is not a valid grpc.health.v1.HealthCheckRequest")
        reply = _send(channel, "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest().SerializeToString())
        assert health_pb2.HealthCheckResponse.FromString(reply).status == health_pb2.HealthCheckResponse.SERVING
        _normal_forward_works(channel, client_identity, service.hotkey)
    _assert_quiet_log(service)


def test_garbage_is_invalid_argument_with_auth_off(expert_service_factory):
    service = expert_service_factory(["0.0"], DIM, INTER, env={"REDIS_URL": "", "AUTH_MODE": "off"})
    with grpc.insecure_channel(service.endpoint) as channel:
        for _ in range(3):   # a flood: still one log line
            for rpc, name in {**MESSAGES, "Info": "moe.v1.InfoRequest"}.items():
                for case, body in {**GARBAGE, **(BAD_UTF8 if rpc != "Info" else {})}.items():
                    error = _send(channel, f"/moe.v1.Expert/{rpc}", body)
                    assert isinstance(error, grpc.RpcError), (rpc, case)
                    assert (error.code(), error.details()) == (Code.INVALID_ARGUMENT,
                                                               f"request body is not a valid {name}"), (rpc, case)
        _normal_forward_works(channel, None, None)
    _assert_quiet_log(service)
    assert "refused /moe.v1.Expert/" in service.log()   # the one line is there, and says what happened
