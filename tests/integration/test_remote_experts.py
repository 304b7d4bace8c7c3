"""RemoteExpertGroup against real expert service processes, checked against LocalExperts.

The services load the same weights as the in-process reference, so remote forward,
input gradients, gradient norm and the AdamW step must equal local ones (fp32, 1e-5).
Faults are real too: SIGKILLed processes, an injected delay past the deadline, a restart.

Each test uses its own MoE layer number and reads the (session-wide) registry only for
its own endpoints, so services of other tests never answer.
"""

from __future__ import annotations

import re
import time
from concurrent import futures

import grpc
import pytest
import redis
import torch

from moe import MoE
from moe import layer as moe_layer
from moe.boundary import LocalExperts, OptimizerSettings
from moe.experts import expert_uid
from services.router.metrics import RouterMetrics
from services.router.remote_experts import RemoteExpertGroup
from services.router.replicas import ReplicaSet
from services.router.tracing import ExpertCallTracer
from subnet.expert_client import ExpertClientPool
from subnet.expert_weights import save_expert_weights
from subnet.registry import ExpertRegistry
from subnet.tensor_codec import encode
from subnet.wire.v1 import expert_pb2
from tests.integration.counter_totals import counter_total

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

DIM, INTER, N_EXPERTS = 32, 64, 4
TOL = {"atol": 1e-5, "rtol": 1e-5}


class OwnEndpoints:
    """The registry as seen by one test: only replicas on the endpoints it started."""

    def __init__(self, registry: ExpertRegistry, endpoints: set[str]):
        self.registry, self.endpoints = registry, endpoints

    def all_replicas(self):
        mine = {uid: [r for r in reps if r.endpoint in self.endpoints]
                for uid, reps in self.registry.all_replicas().items()}
        return {uid: reps for uid, reps in mine.items() if reps}


@pytest.fixture
def registry(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield ExpertRegistry(client)
    client.close()


def reference(layer: int, tmp_path, seed: int = 0) -> tuple[LocalExperts, str]:
    """In-process experts and a weight file with the same weights under layer `layer`'s uids."""
    torch.manual_seed(seed)
    local = LocalExperts(N_EXPERTS, DIM, INTER)
    path = tmp_path / f"experts-{layer}.safetensors"
    save_expert_weights(path, {expert_uid(layer, i): local[i] for i in range(N_EXPERTS)})
    return local, str(path)


def start(factory, layer: int, indices, ckpt: str, **env):
    return factory([expert_uid(layer, i) for i in indices], DIM, INTER,
                   env={"EXPERT_CHECKPOINT": ckpt, "EXPERT_BATCH_WAIT_MS": "0", **env})


def two_services(factory, registry: ExpertRegistry, layer: int, ckpt: str, **env):
    """Experts 0 and 1 of `layer` on one service, 2 and 3 on another, both registered."""
    a = start(factory, layer, [0, 1], ckpt, **env)
    b = start(factory, layer, [2, 3], ckpt, **env)
    wait_registered(registry, [(a, [0, 1]), (b, [2, 3])], layer)
    return a, b


def wait_registered(registry: ExpertRegistry, services_and_indices, layer: int, timeout_s: float = 10.0):
    want = {(expert_uid(layer, i), s.endpoint) for s, indices in services_and_indices for i in indices}
    deadline = time.monotonic() + timeout_s
    while True:
        have = {(r.uid, r.endpoint) for reps in registry.all_replicas().values() for r in reps}
        if want <= have:
            return
        assert time.monotonic() < deadline, f"not registered: {sorted(want - have)}"
        time.sleep(0.05)


@pytest.fixture
def make_group(registry, client_identity):
    """`make_group(endpoints, layer, **kw)`: a RemoteExpertGroup over the test's endpoints, signing
    its calls as the test client for the hotkeys in the registry (as a router does); closed after the test."""
    pools = []

    def make(endpoints, layer, **kw) -> RemoteExpertGroup:
        replicas = ReplicaSet(OwnEndpoints(registry, set(endpoints)), policy=kw.pop("policy", "least_loaded"),
                              refresh_s=kw.pop("refresh_s", 0.2), suspect_s=kw.pop("suspect_s", 2.0))
        kw.setdefault("timeout_s", 3.0)
        pools.append(ExpertClientPool(identity=client_identity, hotkeys=replicas.hotkey))
        return RemoteExpertGroup(layer, N_EXPERTS, DIM, replicas, metrics=RouterMetrics(), clients=pools[-1], **kw)

    yield make
    for pool in pools:
        pool.close()


def inputs(sizes: dict[int, int], seed: int = 1) -> dict[int, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {i: torch.randn(n, DIM, generator=gen) for i, n in sizes.items()}


def train_pass(experts, xs: dict[int, torch.Tensor], weights: dict[int, torch.Tensor]):
    """Forward + backward of sum(out * w) through `experts`; returns (outputs, input grads)."""
    leaves = {i: x.clone().requires_grad_() for i, x in xs.items()}
    outs = experts.run(leaves)
    loss = sum((outs[i] * weights[i]).sum() for i in outs if outs[i] is not None)
    loss.backward()
    return outs, {i: leaves[i].grad for i in leaves}


def counter(metrics: RouterMetrics, name: str, **labels) -> float:
    return metrics.registry.get_sample_value(f"router_{name}_total", labels) or 0.0


def masked_total(metrics: RouterMetrics, rpc: str) -> float:
    return counter_total(metrics.masked_calls, rpc=rpc)


def finished(exporter, rpc: str):
    return [s for s in exporter.get_finished_spans() if s.name == f"moe.v1.Expert/{rpc}"]


def assert_in_flight_together(spans):
    """Every call started before any of them ended: they were in flight at the same time."""
    assert len(spans) > 1
    assert max(s.start_time for s in spans) < min(s.end_time for s in spans)


def test_remote_equals_local_forward_backward_and_adamw_step(expert_service_factory, registry, make_group,
                                                            tmp_path):
    layer = 1
    local, ckpt = reference(layer, tmp_path)
    # Two services share the layer's experts. Every answer is delayed a little, so calls that are
    # in flight together show as overlapping spans.
    a, b = two_services(expert_service_factory, registry, layer, ckpt, EXPERT_INJECT_DELAY_MS="150")

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    group = make_group({a.endpoint, b.endpoint}, layer, tracer=ExpertCallTracer(provider))

    # Inference: one Forward per expert with tokens; expert 2 gets none this time.
    xs = inputs({0: 5, 1: 3, 3: 7})
    with torch.no_grad():
        got, want = group.run(xs), local.run(xs)
    assert set(got) == {0, 1, 3}
    for i in xs:
        torch.testing.assert_close(got[i], want[i], **TOL)
    forward_spans = finished(spans, "Forward")
    uids = sorted(s.attributes["moe.expert_uid"] for s in forward_spans)
    assert uids == [expert_uid(layer, i) for i in (0, 1, 3)]
    assert_in_flight_together(forward_spans)

    # Training: outputs and input gradients through autograd, then GradNorm and ApplyStep.
    group.begin_step(7)
    xs = inputs({0: 6, 1: 2, 2: 4, 3: 9}, seed=2)
    w = inputs({0: 6, 1: 2, 2: 4, 3: 9}, seed=3)
    spans.clear()
    got, got_grads = train_pass(group, xs, w)
    want, want_grads = train_pass(local, xs, w)
    for i in xs:
        torch.testing.assert_close(got[i], want[i], **TOL)
        torch.testing.assert_close(got_grads[i], want_grads[i], **TOL)
    assert len(finished(spans, "Backward")) == 4
    assert_in_flight_together(finished(spans, "Backward"))
    # Each Backward reached the replica that served its Forward (no recompute resend needed).
    assert counter(group.metrics, "expert_retries", layer=str(layer), rpc="backward") == 0
    assert masked_total(group.metrics, "forward") == masked_total(group.metrics, "backward") == 0

    local_sq = sum(float(p.grad.pow(2).sum()) for p in local.parameters())
    assert group.external_grad_sq_norm() == pytest.approx(local_sq, rel=1e-5)

    lr, grad_scale = 1e-2, 0.5
    settings = OptimizerSettings(weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    probe = inputs({i: 8 for i in range(N_EXPERTS)}, seed=4)
    with torch.no_grad():
        before = local.run(probe)
    group.apply_external_step(lr, grad_scale, settings)
    for p in local.parameters():
        p.grad.mul_(grad_scale)
    torch.optim.AdamW(local.parameters(), lr=lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
                      weight_decay=settings.weight_decay).step()
    with torch.no_grad():
        got, want = group.run(probe), local.run(probe)
    for i in range(N_EXPERTS):
        assert (want[i] - before[i]).abs().max() > 1e-3  # the step really moved the weights
        torch.testing.assert_close(got[i], want[i], **TOL)

    # Throughput wire dtypes: cast on the wire, fp32 at both ends.
    for wire in ("bf16", "fp16"):
        low = make_group({a.endpoint, b.endpoint}, layer, wire_dtype=wire)
        with torch.no_grad():
            got = low.run(probe)
        for i in range(N_EXPERTS):
            assert got[i].dtype == torch.float32
            torch.testing.assert_close(got[i], want[i], atol=3e-2, rtol=3e-2)


def test_killed_service_is_masked_and_the_rest_keeps_working(expert_service_factory, registry, make_group,
                                                             tmp_path):
    layer = 2
    local, ckpt = reference(layer, tmp_path)
    a, b = two_services(expert_service_factory, registry, layer, ckpt)
    group = make_group({a.endpoint, b.endpoint}, layer, timeout_s=2.0)
    sizes = {0: 4, 1: 4, 2: 4, 3: 4}
    xs, w = inputs(sizes), inputs(sizes, seed=5)

    # Killed between forward and backward: its experts' tokens get zero gradient, the rest is exact.
    group.begin_step(1)
    leaves = {i: x.clone().requires_grad_() for i, x in xs.items()}
    outs = group.run(leaves)
    assert all(outs[i] is not None for i in sizes)
    b.kill()
    sum((outs[i] * w[i]).sum() for i in outs).backward()
    _, want_grads = train_pass(local, xs, w)
    for i in (0, 1):
        torch.testing.assert_close(leaves[i].grad, want_grads[i], **TOL)
    for i in (2, 3):
        assert torch.equal(leaves[i].grad, torch.zeros(4, DIM))
        assert group.metrics.masked_count(layer, expert_uid(layer, i), "backward") == 1
    assert group.external_grad_sq_norm() > 0  # from the live service only
    group.apply_external_step(1e-3, 1.0, OptimizerSettings())

    # Then a forward: the dead service's experts come back None within the deadline.
    started = time.monotonic()
    with torch.no_grad():
        got = group.run(xs)
    assert time.monotonic() - started < 2.0 + 1.0
    assert got[2] is None and got[3] is None
    assert got[0] is not None and got[1] is not None
    for i in (2, 3):
        assert group.metrics.masked_count(layer, expert_uid(layer, i), "forward") == 1


def test_slow_expert_is_masked_not_waited_for(expert_service_factory, registry, make_group, tmp_path):
    layer = 3
    local, ckpt = reference(layer, tmp_path)
    fast = start(expert_service_factory, layer, [0], ckpt)
    slow = start(expert_service_factory, layer, [1], ckpt, EXPERT_INJECT_DELAY_MS="6000", EXPERT_GRACE_S="0")
    wait_registered(registry, [(fast, [0]), (slow, [1])], layer)
    group = make_group({fast.endpoint, slow.endpoint}, layer, timeout_s=1.0)
    xs = inputs({0: 5, 1: 5})

    with torch.no_grad():
        started = time.monotonic()
        got = group.run(xs)
        elapsed = time.monotonic() - started
    assert elapsed < 3.0, f"run waited {elapsed:.1f} s for an expert delayed 6 s past a 1 s deadline"
    assert got[1] is None
    torch.testing.assert_close(got[0], local.run({0: xs[0]})[0], **TOL)
    assert counter(group.metrics, "masked_calls", layer=str(layer), uid=expert_uid(layer, 1), rpc="forward",
                   reason="deadline_exceeded") == 1


class _Impostor:
    """A gRPC server on loopback that answers every Forward with zeros, unsigned, and Info with nothing:
    someone answering in an expert's place (it checks no signature and has no key to sign with)."""

    def __init__(self):
        def forward(raw, context):
            request = expert_pb2.ForwardRequest.FromString(raw)
            zeros = torch.zeros(tuple(request.inputs.shape))
            return expert_pb2.ForwardResponse(outputs=encode(zeros)).SerializeToString()
        handlers = {"Forward": grpc.unary_unary_rpc_method_handler(forward),
                    "Info": grpc.unary_unary_rpc_method_handler(lambda raw, context: b"")}
        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("moe.v1.Expert", handlers)])
        self.endpoint = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()


def test_an_answer_not_signed_by_the_listed_hotkey_is_refused_and_masked(
        expert_service_factory, registry, make_group, tmp_path):
    """An endpoint listed under an expert's hotkey whose answers are not signed by it (here an impostor that
    answers zeros; an expert with AUTH_MODE=off alike) is refused: masked with reason
    unauthenticated_answer, the replica suspect; the expert next to it is served."""
    layer = 6
    local, ckpt = reference(layer, tmp_path)
    honest = start(expert_service_factory, layer, [0], ckpt)
    wait_registered(registry, [(honest, [0])], layer)
    impostor = _Impostor()
    try:
        registry.register(expert_uid(layer, 1), impostor.endpoint, hotkey=honest.hotkey)
        group = make_group({honest.endpoint, impostor.endpoint}, layer, retries=0)
        xs = inputs({0: 3, 1: 3})
        with torch.no_grad():
            got = group.run(xs)
        assert got[1] is None   # not the impostor's zeros
        torch.testing.assert_close(got[0], local.run({0: xs[0]})[0], **TOL)
        assert counter(group.metrics, "masked_calls", layer=str(layer), uid=expert_uid(layer, 1), rpc="forward",
                       reason="unauthenticated_answer") == 1
        assert group.replicas.is_suspect(impostor.endpoint, expert_uid(layer, 1))
    finally:
        impostor.server.stop(None)


def test_replica_failover_masks_nothing(expert_service_factory, registry, make_group, tmp_path):
    layer = 4
    local, ckpt = reference(layer, tmp_path)
    r1 = start(expert_service_factory, layer, [0, 1], ckpt)
    r2 = start(expert_service_factory, layer, [0, 1], ckpt)
    wait_registered(registry, [(r1, [0, 1]), (r2, [0, 1])], layer)
    group = make_group({r1.endpoint, r2.endpoint}, layer, policy="round_robin", suspect_s=30.0)
    sizes = {0: 3, 1: 5}
    xs, w = inputs(sizes), inputs(sizes, seed=6)
    with torch.no_grad():
        assert all(v is not None for v in group.run(xs).values())

    r1.kill()
    for step in range(3):  # round robin sends some first attempt to the dead replica
        group.begin_step(step)
        got, got_grads = train_pass(group, xs, w)
        local.zero_grad()
        want, want_grads = train_pass(local, xs, w)
        for i in sizes:
            torch.testing.assert_close(got[i], want[i], **TOL)
            torch.testing.assert_close(got_grads[i], want_grads[i], **TOL)
    assert counter(group.metrics, "expert_retries", layer=str(layer), rpc="forward") >= 1
    assert counter(group.metrics, "expert_retries", layer=str(layer), rpc="backward") == 0
    assert masked_total(group.metrics, "forward") == masked_total(group.metrics, "backward") == 0


def test_restarted_service_is_used_again_and_lost_activations_are_recomputed(expert_service_factory, registry,
                                                                             make_group, tmp_path):
    layer = 5
    local, ckpt = reference(layer, tmp_path)
    a = start(expert_service_factory, layer, [0], ckpt, EXPERT_ACTIVATION_TTL_S="0.5")
    wait_registered(registry, [(a, [0])], layer)
    group = make_group({a.endpoint}, layer, timeout_s=1.0, suspect_s=0.5, refresh_s=0.2)
    xs = inputs({0: 4})
    want = local.run(xs)[0].detach()
    with torch.no_grad():
        torch.testing.assert_close(group.run(xs)[0], want, **TOL)

    a.kill()
    with torch.no_grad():
        assert group.run(xs)[0] is None
    # Fork (the restart's Popen) only while this process has no live gRPC connection: a fork
    # during gRPC's reconnect attempts can hang in its fork handlers (grpc/grpc#37259). The
    # pool opens a fresh channel on the next call.
    group.clients.close()
    a.restart()  # same port; waits for SERVING
    wait_registered(registry, [(a, [0])], layer)
    deadline = time.monotonic() + 10.0
    while True:
        with torch.no_grad():
            out = group.run(xs)[0]
        if out is not None:
            break
        assert time.monotonic() < deadline, "restarted service never used again"
        time.sleep(0.1)
    torch.testing.assert_close(out, want, **TOL)

    # The expert dropped the activations before Backward came: FAILED_PRECONDITION, then the
    # same replica gets the inputs along and recomputes; the gradient is still exact.
    group.begin_step(1)
    w = inputs({0: 4}, seed=7)
    leaf = xs[0].clone().requires_grad_()
    out = group.run({0: leaf})[0]
    time.sleep(1.0)
    (out * w[0]).sum().backward()
    _, want_grads = train_pass(local, xs, w)
    torch.testing.assert_close(leaf.grad, want_grads[0], **TOL)
    assert counter(group.metrics, "expert_retries", layer=str(layer), rpc="backward") == 1
    local_sq = sum(float(p.grad.pow(2).sum()) for p in local[0].parameters())
    assert group.external_grad_sq_norm() == pytest.approx(local_sq, rel=1e-5)


def test_trace_context_goes_out_as_w3c_traceparent():
    from opentelemetry.sdk.trace import TracerProvider
    tracer = ExpertCallTracer(TracerProvider())
    span, metadata = tracer.start("Forward", layer=0, uid="0.1", endpoint="127.0.0.1:1", tokens=3)
    headers = dict(metadata)
    trace_id = format(span.get_span_context().trace_id, "032x")
    version, sent_trace_id, parent_id, flags = headers["traceparent"].split("-")
    assert (version, sent_trace_id) == ("00", trace_id)
    assert re.fullmatch("[0-9a-f]{16}", parent_id) and int(flags, 16) & 1  # sampled
    span.end()
    span, metadata = ExpertCallTracer().start("Forward", layer=0, uid="0.1", endpoint="x:1")
    assert "traceparent" not in dict(metadata)  # no provider: no-op span, nothing sent


def test_restarted_router_session_trains_the_experts_again(expert_service_factory, registry, make_group, tmp_path):
    """A router dies between Backward and ApplyStep at step 7 and comes back at step 0 with a new
    session: its Backward is accepted (the dead session's gradients are dropped), and its step
    equals a clean local step. Before sessions, every Backward was refused as an old step."""
    layer = 6
    local, ckpt = reference(layer, tmp_path)
    service = start(expert_service_factory, layer, range(N_EXPERTS), ckpt)
    wait_registered(registry, [(service, range(N_EXPERTS))], layer)

    crashed = make_group({service.endpoint}, layer)
    crashed.begin_step(7)
    train_pass(crashed, inputs({0: 4, 1: 4}, seed=5), inputs({0: 4, 1: 4}, seed=6))
    crashed.close()  # no GradNorm, no ApplyStep: the process "died" here

    restarted = make_group({service.endpoint}, layer)
    assert restarted.session_id != crashed.session_id
    restarted.begin_step(0)
    xs, w = inputs({0: 5, 1: 3}, seed=7), inputs({0: 5, 1: 3}, seed=8)
    train_pass(restarted, xs, w)
    train_pass(local, xs, w)
    assert masked_total(restarted.metrics, "backward") == 0
    local_sq = sum(float(p.grad.pow(2).sum()) for p in local.parameters() if p.grad is not None)
    assert restarted.external_grad_sq_norm() == pytest.approx(local_sq, rel=1e-5)  # no stale step-7 grads

    settings = OptimizerSettings(weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8)
    restarted.apply_external_step(1e-2, 1.0, settings)
    torch.optim.AdamW([p for p in local.parameters() if p.grad is not None], lr=1e-2, eps=settings.eps,
                      betas=(settings.beta1, settings.beta2), weight_decay=settings.weight_decay).step()
    probe = inputs({0: 8, 1: 8}, seed=9)
    with torch.no_grad():
        got, want = restarted.run(probe), local.run(probe)
    for i in probe:
        torch.testing.assert_close(got[i], want[i], **TOL)


def test_streaming_layer_over_a_killed_service_renormalizes_over_the_live_experts(expert_service_factory, registry,
                                                                                   make_group, tmp_path,
                                                                                   monkeypatch):
    """The MoE layer's streaming combine (inference) with real services, one of them SIGKILLed: its
    experts are masked within the deadline, and the layer's output equals the in-process layer with
    those experts' gate weights dropped and each token's remaining weights renormalized."""
    monkeypatch.setattr(moe_layer, "STREAM_MIN_ELEMENTS", 0)   # the test's layer is small
    layer = 9
    local, ckpt = reference(layer, tmp_path)
    a, b = two_services(expert_service_factory, registry, layer, ckpt)
    group = make_group({a.endpoint, b.endpoint}, layer, timeout_s=2.0)
    torch.manual_seed(4)
    reference_layer = MoE(dim=DIM, n_experts=N_EXPERTS, n_activated_experts=2, moe_inter_dim=INTER,
                          experts=local).eval()
    remote = MoE(dim=DIM, n_experts=N_EXPERTS, n_activated_experts=2, moe_inter_dim=INTER, experts=group).eval()
    remote.gate.load_state_dict(reference_layer.gate.state_dict())
    x = torch.randn(30, DIM)
    with torch.no_grad():
        torch.testing.assert_close(remote(x)[0], reference_layer(x)[0], **TOL)   # all alive
        b.kill()
        got, _ = remote(x)
        routing = remote.gate(x)
    assert remote.last_stats.masked_experts == (2, 3)
    for t in range(x.shape[0]):
        alive = [(int(e), float(w)) for e, w in zip(routing.experts[t], routing.weights[t]) if int(e) < 2]
        total = sum(w for _, w in alive)
        with torch.no_grad():
            want = sum(w / total * local[e](x[t:t + 1])[0] for e, w in alive) if alive else torch.zeros(DIM)
        torch.testing.assert_close(got[t], want, **TOL)
    assert all(group.metrics.masked_count(layer, expert_uid(layer, i), "forward") == 1 for i in (2, 3))
