"""SyncDecodeGuard (subnet.decode_guard) on a real sync gRPC server: garbage is INVALID_ARGUMENT
whichever side of the auth interceptor the guard sits, each refusal is counted, and a flood of
them is one log line (no traceback) per log interval."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
import pytest

from subnet.auth import Anyone, MemoryNonceStore, ServerAuth, Verifier, sign_metadata
from subnet.decode_guard import SyncDecodeGuard
from subnet.identity import Identity
from subnet.wire.v1 import router_pb2
from tests.raw_grpc import raw_call

SERVICE = "test.Guarded"
GARBAGE = b"\xff\xff\xff"


def _handlers():
    def count(request, context):
        return router_pb2.LogitsRequest(tokens=list(request.tokens) + [len(request.tokens)])

    def stream(request, context):
        yield from (router_pb2.LogitsRequest(tokens=[t]) for t in request.tokens)
    parse, serialize = router_pb2.LogitsRequest.FromString, router_pb2.LogitsRequest.SerializeToString
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(count, parse, serialize),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, parse, serialize),
        "Open": grpc.unary_unary_rpc_method_handler(count, parse, serialize),
    })


@pytest.fixture(scope="module")
def identities():
    return Identity.generate(), Identity.generate()   # (caller, receiver)


def _server(interceptors):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def _call(channel, rpc: str, body: bytes, metadata=()):
    return raw_call(channel, f"/{SERVICE}/{rpc}", body, streamed=rpc == "Stream", metadata=metadata)


@pytest.mark.parametrize("order", ["guard first", "auth first", "no auth"])
def test_garbage_is_invalid_argument_in_any_order_and_logged_once(identities, caplog, order):
    caller, receiver = identities
    guard = SyncDecodeGuard(log_interval_s=3600.0)   # the whole test falls in one interval
    auth = None
    if order != "no auth":
        verifier = Verifier(receiver.hotkey, Anyone(), MemoryNonceStore(ttl_s=60.0))
        auth = ServerAuth(verifier, open_methods={f"/{SERVICE}/Open"}, identity=receiver)
    interceptors = {"guard first": [guard, auth and auth.interceptor()],
                    "auth first": [auth and auth.interceptor(), guard], "no auth": [guard]}[order]
    server, endpoint = _server(interceptors)
    caplog.set_level(logging.INFO)
    try:
        with grpc.insecure_channel(endpoint) as channel:
            for _ in range(3):
                for rpc in ("Unary", "Stream", "Open"):
                    metadata = sign_metadata(caller, f"/{SERVICE}/{rpc}", GARBAGE, receiver.hotkey) if auth else ()
                    error = _call(channel, rpc, GARBAGE, metadata)
                    assert isinstance(error, grpc.RpcError), (rpc, order)
                    assert (error.code(), error.details()) == (
                        grpc.StatusCode.INVALID_ARGUMENT, "request body is not a valid moe.v1.LogitsRequest"), rpc
            good = router_pb2.LogitsRequest(tokens=[7]).SerializeToString()
            signed = sign_metadata(caller, f"/{SERVICE}/Unary", good, receiver.hotkey) if auth else ()
            assert router_pb2.LogitsRequest.FromString(_call(channel, "Unary", good, signed)).tokens == [7, 1]
    finally:
        server.stop(0).wait()
    # Guard first, it sees the auth wrapper's handlers: a protected one takes raw bytes (left alone; the wrapper
    # parses them once verified), so the guard refuses the open method's only. Auth first, it refuses them all.
    assert guard.refused == (3 if order == "guard first" else 9)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    lines = [r.getMessage() for r in caplog.records if "does not parse" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"refused /{SERVICE}/"), lines
