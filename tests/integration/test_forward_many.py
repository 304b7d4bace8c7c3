"""ForwardMany: several experts of one service in one call, against real expert services.

The service side: its outputs equal per-expert in-process outputs, and every malformed request
gets its status code while the server keeps serving. The router side (RemoteExpertGroup with
`forward_many_max_tokens`): serving calls to one service coalesce into one ForwardMany per
layer, outputs stay exact, and a failed ForwardMany falls back to one Forward per expert: on
another replica when the service died, on the same one when it lacks the method (UNIMPLEMENTED).
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch

from moe.experts import expert_uid
from services.expert.config import ExpertConfig
from services.expert.server import ExpertServer
from subnet.auth import SigningChannel
from subnet.envconfig import from_env
from subnet.identity import Identity
from subnet.tensor_codec import decode, encode
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc
from tests.integration import test_remote_experts
from tests.integration.test_remote_experts import DIM, INTER, TOL, inputs, reference, start, wait_registered

pytestmark = pytest.mark.integration
make_group, registry = test_remote_experts.make_group, test_remote_experts.registry   # its fixtures, here too
Code = grpc.StatusCode
LAYER = 20   # this file's own layers (20 to 23): services of other tests never answer


@pytest.fixture(scope="module")
def service(expert_service_module_factory, tmp_path_factory):
    local, ckpt = reference(LAYER, tmp_path_factory.mktemp("many"))
    handle = expert_service_module_factory([expert_uid(LAYER, i) for i in range(4)], DIM, INTER,
                                           env={"EXPERT_CHECKPOINT": ckpt, "EXPERT_BATCH_WAIT_MS": "0",
                                                "EXPERT_MAX_REQUEST_TOKENS": "64", "REDIS_URL": ""})
    return handle, local


@pytest.fixture(scope="module")
def stub(service, client_identity):
    handle, _ = service
    channel = grpc.insecure_channel(handle.endpoint)
    yield expert_pb2_grpc.ExpertStub(SigningChannel(channel, client_identity, handle.hotkey))
    channel.close()


def _request(uids, tokens, x, **kw):
    return expert_pb2.ForwardManyRequest(expert_uids=[expert_uid(LAYER, i) if isinstance(i, int) else i
                                                      for i in uids], tokens=tokens, inputs=encode(x), **kw)


def test_forward_many_equals_each_expert_in_process(service, stub):
    _, local = service
    xs = inputs({3: 2, 0: 5, 1: 1})
    reply = stub.ForwardMany(_request([3, 0, 1], [2, 5, 1], torch.cat([xs[3], xs[0], xs[1]])), timeout=10)
    outputs = torch.split(decode(reply.outputs), [2, 5, 1])
    for i, out in zip((3, 0, 1), outputs):
        torch.testing.assert_close(out, local[i](xs[i]).detach(), **TOL)


@pytest.mark.parametrize("uids, tokens, rows, code, words", [
    ([], [], 2, Code.INVALID_ARGUMENT, "expert_uids is empty"),
    ([0, 1], [1], 2, Code.INVALID_ARGUMENT, "1 counts for 2 expert_uids"),
    ([0, 0], [1, 1], 2, Code.INVALID_ARGUMENT, "names an expert twice"),
    ([0, 1], [2, 0], 2, Code.INVALID_ARGUMENT, ">= 1"),
    ([0, 1], [1, 2], 2, Code.INVALID_ARGUMENT, "tokens add up to 3"),
    ([0, 1, 2, 3, 0], [1] * 5, 5, Code.INVALID_ARGUMENT, "hosts 4"),
    ([0, "9.9"], [1, 1], 2, Code.NOT_FOUND, "not hosted here"),
    ([0, "x" * 100_000], [1, 1], 2, Code.INVALID_ARGUMENT, "is not '<layer>.<index>'"),
    ([0, 1], [40, 40], 80, Code.RESOURCE_EXHAUSTED, "at most 64"),
])
def test_malformed_forward_many_gets_its_status_and_the_server_keeps_serving(stub, uids, tokens, rows, code,
                                                                             words):
    with pytest.raises(grpc.RpcError) as info:
        stub.ForwardMany(_request(uids, tokens, torch.randn(rows, DIM)), timeout=10)
    assert info.value.code() == code and words in info.value.details()
    assert len(info.value.details()) < 400   # nothing echoed whole
    assert stub.ForwardMany(_request([2], [1], torch.randn(1, DIM)), timeout=10).outputs.shape == [1, DIM]


def _forward_many_calls(group, code="OK") -> float:
    return group.metrics.registry.get_sample_value(
        "router_expert_calls_total", {"layer": str(group.layer), "rpc": "forwardmany", "code": code}) or 0.0


def test_serving_calls_coalesce_per_service_and_stay_exact(expert_service_factory, registry, make_group,
                                                           tmp_path):
    layer = LAYER + 1
    local, ckpt = reference(layer, tmp_path)
    a = start(expert_service_factory, layer, [0, 1], ckpt)
    b = start(expert_service_factory, layer, [2, 3], ckpt)
    wait_registered(registry, [(a, [0, 1]), (b, [2, 3])], layer)
    xs = inputs({0: 3, 1: 1, 2: 2, 3: 1})
    want = {i: local[i](x).detach() for i, x in xs.items()}

    group = make_group({a.endpoint, b.endpoint}, layer, forward_many_max_tokens=256)
    with torch.no_grad():
        outs = group.run(xs)
    for i in xs:
        torch.testing.assert_close(outs[i], want[i], **TOL)
    assert _forward_many_calls(group) == 2   # one per service, not one per expert

    per_expert = make_group({a.endpoint, b.endpoint}, layer, forward_many_max_tokens=2)   # 4 and 3 tokens: 4 Forwards
    with torch.no_grad():
        outs = per_expert.run(xs)
    assert all(torch.allclose(outs[i], want[i], **TOL) for i in xs)
    assert _forward_many_calls(per_expert) == 0

    # A failed ForwardMany: each Forward goes again on its own, to another replica.
    c = start(expert_service_factory, layer, [0, 1], ckpt)
    wait_registered(registry, [(c, [0, 1])], layer)
    group = make_group({a.endpoint, c.endpoint}, layer, forward_many_max_tokens=256, policy="round_robin")
    a.kill()
    with torch.no_grad():
        outs = group.run({0: xs[0], 1: xs[1]})
        outs.update(group.run({0: xs[0], 1: xs[1]}))   # round robin: one of the two runs picks the dead one
    for i in (0, 1):
        torch.testing.assert_close(outs[i], want[i], **TOL)
    assert group.metrics.masked_count(layer, expert_uid(layer, 0), "forward") == 0


class _WithoutForwardMany:
    """An in-process expert service (real gRPC, real servicer) that answers ForwardMany with
    UNIMPLEMENTED, like a service built before the method existed."""

    def __init__(self, experts, redis_url: str, allow: str):
        env = {"EXPERT_UIDS": ",".join(experts), "EXPERT_DIM": str(DIM),
               "EXPERT_INTER_DIM": str(INTER), "EXPERT_PORT": "0", "EXPERT_THREADS": "1",
               "EXPERT_BATCH_WAIT_MS": "0", "AUTH_ALLOWLIST": allow, "REDIS_URL": redis_url}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = ExpertServer(from_env(ExpertConfig, env), experts=dict(experts.items()),
                                   identity=Identity.generate())
        self._run(self.server.start())
        self._run(self.server.wait_ready(timeout_s=20))

        async def unimplemented(request, context):
            await context.abort(Code.UNIMPLEMENTED, "Method not implemented!")
        self.server._deferred.target.ForwardMany = unimplemented
        self.endpoint = self.server.endpoint

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self):
        self._run(self.server.stop(grace_s=1))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def test_a_service_without_forward_many_gets_forwards(redis_server, registry, make_group, client_identity,
                                                      tmp_path):
    layer = LAYER + 2
    local, _ = reference(layer, tmp_path)
    old = _WithoutForwardMany({expert_uid(layer, i): local[i] for i in (0, 1)}, redis_server.url,
                              client_identity.hotkey)
    try:
        group = make_group({old.endpoint}, layer, forward_many_max_tokens=256, retries=0)
        xs = inputs({0: 2, 1: 3})
        wait_registered(registry, [(old, [0, 1])], layer)
        for _ in range(2):
            with torch.no_grad():
                outs = group.run(xs)
            for i in xs:
                torch.testing.assert_close(outs[i], local[i](xs[i]).detach(), **TOL)
        # Asked once, then remembered: the second run sent Forwards straight away.
        assert _forward_many_calls(group, "UNIMPLEMENTED") == 1
    finally:
        old.close()


@pytest.mark.parametrize("path", ["serving", "streaming", "training"])
def test_work_meanwhile_runs_once_while_the_calls_are_out(expert_service_factory, registry, make_group, tmp_path,
                                                          path):
    """What the MoE layer computes its routing losses and shared experts in (`run_meanwhile`, and
    `run_streaming`'s `meanwhile`): called once, after every call was sent and before any answer was
    taken, for serving (ForwardMany), streamed serving and training (Forward)."""
    layer = LAYER + 3
    local, ckpt = reference(layer, tmp_path)
    a = start(expert_service_factory, layer, [0, 1], ckpt)
    b = start(expert_service_factory, layer, [2, 3], ckpt)
    wait_registered(registry, [(a, [0, 1]), (b, [2, 3])], layer)
    group = make_group({a.endpoint, b.endpoint}, layer, forward_many_max_tokens=256)
    xs = {i: x.requires_grad_(path == "training") for i, x in inputs({0: 2, 1: 1, 3: 3}).items()}
    seen = []

    def meanwhile():
        seen.append({e: group.replicas.in_flight(e) for e in (a.endpoint, b.endpoint)})

    with torch.set_grad_enabled(path == "training"):
        group.run(xs)   # connects: a first call to an endpoint goes on a call thread and may be answered early
        if path == "streaming":
            outs = {}
            masked = group.run_streaming(xs, None, lambda i, out: outs.__setitem__(i, out.clone()), meanwhile)
            assert masked == ()
        else:
            outs = group.run_meanwhile(xs, None, meanwhile)
    # Tokens still out at each service: 3 at a (experts 0 and 1), 3 at b (expert 3).
    assert seen == [{a.endpoint: 3, b.endpoint: 3}]
    assert all(group.replicas.in_flight(e) == 0 for e in (a.endpoint, b.endpoint))   # all answered since
    for i, x in xs.items():
        torch.testing.assert_close(outs[i], local[i](x).detach(), **TOL)
    if path != "serving":
        return

    def fails():
        raise RuntimeError("the layer's own work failed")

    with torch.no_grad():   # the calls that were out are cancelled; the next run is served as before
        with pytest.raises(RuntimeError, match="own work failed"):
            group.run_meanwhile(xs, None, fails)
        assert all(group.replicas.in_flight(e) == 0 for e in (a.endpoint, b.endpoint))
        outs = group.run_meanwhile(xs, None, meanwhile)
    assert seen[-1] == {a.endpoint: 3, b.endpoint: 3}
    for i, x in xs.items():
        torch.testing.assert_close(outs[i], local[i](x).detach(), **TOL)
