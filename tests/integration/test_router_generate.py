"""The router's model lock against clients that misbehave (issue 9): a Generate client that stops
reading holds up nobody else, and a request whose deadline passes while it waits for the model
is never computed."""

from __future__ import annotations

import time

import grpc
import pytest
import torch

from moe import MoELM, preset
from services.router.metrics import RouterMetrics
from services.router.replicas import ReplicaSet
from services.router.server import RouterServer
from services.router.servicer import RouterServicer
from subnet.wire.v1 import router_pb2, router_pb2_grpc

pytestmark = pytest.mark.integration
TOKENS = 200


class _NoRegistry:
    def all_replicas(self):
        return {}


class _WideTokens:
    """Every token decodes to 64 KiB of text: the unread answers soon exceed what HTTP/2 flow control
    (and the socket buffers) let the server send ahead, so its send blocks for real, as for a stalled client."""

    def encode(self, text):
        return [ord(c) % 32 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i % 26) * 65536 for i in ids)


@pytest.fixture
def router():
    torch.manual_seed(0)
    model = MoELM(preset("tiny", vocab_size=64, block_size=16))
    servicer = RouterServicer(model, _WideTokens(), ReplicaSet(_NoRegistry()), RouterMetrics(), max_new_tokens=TOKENS)
    server = RouterServer(servicer, "127.0.0.1", 0, max_message_mb=4).start()
    yield server, servicer.engine
    server.stop(grace_s=0)


def channel(server):
    # A connection of its own: streams sharing one would share its flow-control window too.
    return grpc.insecure_channel(server.endpoint, options=[("grpc.use_local_subchannel_pool", 1)])


def generate_request(**kw):
    return router_pb2.GenerateRequest(**{"prompt_tokens": [1, 2, 3], "max_new_tokens": TOKENS, "temperature": 1.0,
                                         "seed": 5, **kw})


def test_a_client_that_stops_reading_blocks_nobody_else(router):
    server, _ = router
    with channel(server) as slow_ch, channel(server) as ch:
        slow = router_pb2_grpc.RouterStub(slow_ch).Generate(generate_request(), timeout=60)
        first = next(slow)   # then it stops reading; the server's sends block once the window is full
        time.sleep(1.0)
        stub = router_pb2_grpc.RouterStub(ch)
        started = time.monotonic()
        logits = stub.Logits(router_pb2.LogitsRequest(tokens=[1, 2, 3]), timeout=10)
        other = list(stub.Generate(generate_request(max_new_tokens=3, seed=9), timeout=10))
        assert time.monotonic() - started < 5
        assert logits.logits.shape == [3, 64] and len(other) == 3
        # The stalled stream goes on where it stopped, and interleaving did not change it.
        rest = [first.token] + [m.token for m in slow]
        again = [m.token for m in stub.Generate(generate_request(), timeout=60)]
    assert rest == again and len(rest) == TOKENS


def test_a_request_whose_deadline_passes_while_waiting_is_not_computed(router):
    server, engine = router
    passes = []
    engine.model.register_forward_hook(lambda *args: passes.append(1))
    with channel(server) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        with engine.loop.model_lock:   # the model is busy (another step) for longer than the deadlines
            for call in (lambda: stub.Logits(router_pb2.LogitsRequest(tokens=[1]), timeout=0.3),
                         lambda: list(stub.Generate(generate_request(max_new_tokens=2), timeout=0.3))):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            time.sleep(0.5)   # the server gives up on its own, not only the client
        time.sleep(0.5)
        assert passes == [], "a request was computed after its deadline had passed"
        assert len(list(stub.Generate(generate_request(max_new_tokens=2), timeout=10))) == 2
    assert passes

