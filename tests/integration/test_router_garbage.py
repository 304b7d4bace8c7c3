"""Request bodies that are not valid protobuf, against an in-process router server: every method
(the streamed Generate and the health service included) answers INVALID_ARGUMENT naming the
message type, never gRPC's INTERNAL "Exception deserializing request!", and the log gets no
traceback, only a rate-limited line; with AUTH_MODE=off, on, and on with ROUTER_OPEN_GENERATE."""

from __future__ import annotations

import logging

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe import MoELM, preset
from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.replicas import ReplicaSet
from services.router.server import RouterServer, router_auth
from services.router.servicer import RouterServicer
from subnet.auth import AuthConfig, SigningChannel, sign_metadata
from subnet.identity import Identity, WalletConfig
from subnet.wire.v1 import router_pb2, router_pb2_grpc
from tests.raw_grpc import raw_call

pytestmark = pytest.mark.integration
Code = grpc.StatusCode
GARBAGE = {
    "not protobuf at all": b"\xff\xff\xff\xff\xff",
    "truncated length-delimited field": b"\x12\x40\x08\x01",
    "wire type 7 (there is none)": b"\x0f",
    "an unterminated varint": b"\x08" + b"\xff" * 11,
}
# Invalid UTF-8 in string field 1: garbage only where field 1 is a string (for RouterInfoRequest it
# is an unknown field, which parses).
BAD_UTF8 = b"\x0a\x02\xff\xfe"
# method -> (streamed answer, expected message type, whether field 1 is a string)
METHODS = {
    "/moe.v1.Router/Generate": (True, "moe.v1.GenerateRequest", True),
    "/moe.v1.Router/Logits": (False, "moe.v1.LogitsRequest", False),
    "/moe.v1.Router/Info": (False, "moe.v1.RouterInfoRequest", False),
    "/grpc.health.v1.Health/Check": (False, "grpc.health.v1.HealthCheckRequest", True),
    "/grpc.health.v1.Health/Watch": (True, "grpc.health.v1.HealthCheckRequest", True),
}


class _NoRegistry:
    def all_replicas(self):
        return {}


class _Tokenizer:
    def encode(self, text):
        return [ord(c) % 26 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MoELM(preset("tiny", vocab_size=64, block_size=16))


@pytest.mark.parametrize("mode", ["auth off", "auth on", "auth on, open generate"])
def test_garbage_is_invalid_argument_and_logs_no_traceback(model, client_identity, caplog, mode):
    caplog.set_level(logging.INFO)
    metrics = RouterMetrics()
    servicer = RouterServicer(model, _Tokenizer(), ReplicaSet(_NoRegistry()), metrics, max_new_tokens=2)
    router_identity = Identity.generate()
    auth = None
    if mode != "auth off":
        config = RouterConfig(open_generate=mode.endswith("open generate"), wallet=WalletConfig(),
                              auth=AuthConfig(allowlist=(client_identity.hotkey,)))
        auth = router_auth(config, router_identity, metrics)
    server = RouterServer(servicer, "127.0.0.1", 0, max_message_mb=4, auth=auth).start()
    refused = 0
    try:
        with grpc.insecure_channel(server.endpoint) as channel:
            for method, (streamed, name, string_field_1) in METHODS.items():
                bodies = {**GARBAGE, **({"invalid UTF-8 in string field 1": BAD_UTF8} if string_field_1 else {})}
                for case, body in bodies.items():
                    # Signed garbage too where signing is on: it passes the check, then must not parse.
                    signings = (False, True) if auth is not None else (False,)
                    for signed in signings:
                        metadata = sign_metadata(client_identity, method, body, router_identity.hotkey) \
                            if signed else ()
                        error = raw_call(channel, method, body, streamed, metadata)
                        assert isinstance(error, grpc.RpcError), (method, case, signed)
                        if auth is not None and not signed and auth.protects(method):
                            assert error.code() == Code.UNAUTHENTICATED, (method, case)   # checked before parsing
                            continue
                        assert (error.code(), error.details()) == (
                            Code.INVALID_ARGUMENT, f"request body is not a valid {name}"), (method, case, signed)
                        refused += 1
            # ... and it keeps serving well-formed requests.
            stub = router_pb2_grpc.RouterStub(SigningChannel(channel, client_identity, router_identity.hotkey)
                                              if auth is not None else channel)
            assert stub.Info(router_pb2.RouterInfoRequest(), timeout=10).vocab_size == 64
            assert len(list(stub.Generate(router_pb2.GenerateRequest(prompt_tokens=[1, 2], max_new_tokens=2),
                                          timeout=30))) == 2
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace_s=0)

    records = caplog.records
    assert not [r for r in records if r.levelno >= logging.ERROR or r.exc_info], \
        [r.getMessage() for r in records if r.levelno >= logging.ERROR or r.exc_info]
    assert not [r for r in records if "Exception deserializing" in r.getMessage()]
    # Refusals are logged, but rate-limited: not one line per garbage request.
    refusal_lines = [r.getMessage() for r in records if "does not parse" in r.getMessage()]
    assert 1 <= len(refusal_lines) < refused, refusal_lines
    assert refusal_lines[0].startswith("refused /")
