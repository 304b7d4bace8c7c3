"""Traces across processes: one training step of a traced RemoteExpertGroup against two real expert
service processes, all exporting over OTLP to a small receiver in this test. The router's call spans
hang off one span per layer and phase, and every expert SERVER span is the child of the router call
span that caused it, in the same trace; a request the experts' auth check rejects still has its span."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter

import grpc
import pytest
import redis
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moe import MoELM, preset
from moe.boundary import OptimizerSettings
from moe.data import CorpusConfig, build_corpus
from moe.experts import expert_uid
from moe.train import TrainConfig
from services.router.config import RouterConfig
from services.router.metrics import RouterMetrics
from services.router.remote_experts import RemoteExpertGroup
from services.router.remote_model import RemoteParts
from services.router.replicas import ReplicaSet
from services.router.server import RouterServer, router_auth
from services.router.servicer import RouterServicer
from services.router.tracing import ExpertCallTracer
from services.router.train import build_remote_trainer, prepare_initial_checkpoint
from services.stack.placement import deal_experts
from subnet.auth import AuthConfig, SigningChannel
from subnet.expert_client import ExpertClientPool
from subnet.identity import Identity, WalletConfig
from subnet.processes import die_with_parent, free_port
from subnet.registry import ExpertRegistry
from subnet.telemetry import PROPAGATOR, TracingConfig, tracer_provider
from subnet.tensor_codec import encode
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc
from tests.integration.test_remote_experts import OwnEndpoints, inputs, train_pass, wait_registered
from tests.integration.test_remote_training import _init, _private_db, _router_config
from tests.otlp_receiver import Receiver

pytestmark = pytest.mark.integration
LAYER, DIM, INTER, N_EXPERTS = 13, 32, 64, 4
SERVER, CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
ERROR = trace_pb2.Status.STATUS_CODE_ERROR


class _NoRegistry:
    def all_replicas(self):
        return {}


class _Letters:
    def encode(self, text):
        return [ord(c) % 26 for c in text]

    def decode(self, ids):
        return "".join(chr(97 + i) for i in ids)


@pytest.fixture
def receiver():
    servicer = Receiver().start()
    yield servicer
    servicer.stop()


def test_one_training_step_is_one_trace_across_router_and_experts(expert_service_factory, redis_server,
                                                                   client_identity, receiver):
    # A long export schedule: the experts' spans can only arrive through the flush at shutdown.
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    services = [(expert_service_factory([expert_uid(LAYER, i) for i in indices], DIM, INTER, env=env), indices)
                for indices in ((0, 1), (2, 3))]
    client = redis.Redis.from_url(redis_server.url)
    registry = ExpertRegistry(client)
    wait_registered(registry, services, LAYER)
    replicas = ReplicaSet(OwnEndpoints(registry, {s.endpoint for s, _ in services}), refresh_s=0.2)
    pool = ExpertClientPool(identity=client_identity, hotkeys=replicas.hotkey)
    provider = tracer_provider(TracingConfig(otlp_endpoint=receiver.url), "router")
    group = RemoteExpertGroup(LAYER, N_EXPERTS, DIM, replicas, metrics=RouterMetrics(), clients=pool,
                              tracer=ExpertCallTracer(provider), timeout_s=10.0)
    tracer = provider.get_tracer("test")
    try:
        with tracer.start_as_current_span("train step") as step:
            group.begin_step(1)
            sizes = {i: 3 + i for i in range(N_EXPERTS)}
            train_pass(group, inputs(sizes), inputs(sizes, seed=2))
            assert group.external_grad_sq_norm() > 0
            group.apply_external_step(1e-2, 1.0, OptimizerSettings(0.0, 0.9, 0.95, 1e-8))
        # An unsigned call, refused by the expert's auth check, still leaves a span there.
        with tracer.start_as_current_span("unsigned call", kind=trace.SpanKind.CLIENT) as unsigned:
            carrier: dict[str, str] = {}
            PROPAGATOR.inject(carrier)
            with grpc.insecure_channel(services[0][0].endpoint) as ch, pytest.raises(grpc.RpcError) as info:
                expert_pb2_grpc.ExpertStub(ch).Forward(expert_pb2.ForwardRequest(
                    expert_uid=expert_uid(LAYER, 0), inputs=encode(torch.ones(1, DIM))),
                    metadata=tuple(carrier.items()), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        provider.shutdown()
        pool.close()
        replicas.stop()
        client.close()
        for service, _ in services:
            assert service.terminate() == 0

    spans = receiver.spans
    by_id = {s.span_id: s for s in spans}
    step_id = format(step.get_span_context().span_id, "016x")
    trace_id = format(step.get_span_context().trace_id, "032x")
    calls = [s for s in spans if s.service == "router" and s.kind == CLIENT and s.name.startswith("moe.v1.Expert/")]
    assert Counter(s.name.split("/")[1] for s in calls) == {"Forward": 4, "Backward": 4, "GradNorm": 4,
                                                             "ApplyStep": 4}
    for call in calls:   # router: step -> one layer span per phase -> the calls of that phase
        layer = by_id[call.parent_id]
        assert layer.name == f"moe.layer/{call.name.split('/')[1]}" and layer.parent_id == step_id
        assert call.trace_id == layer.trace_id == trace_id
    assert len({c.parent_id for c in calls}) == 4

    served = [s for s in spans if s.service == "expert"]
    # Each moe-frames connection starts with a session Open (subnet.auth.sessions), outside any trace.
    opens = [s for s in served if s.name == "moe.auth.v1.Sessions/Open"]
    assert len(opens) >= len(services) and all(s.parent_id == "" and s.grpc_code == 0 for s in opens)
    served = [s for s in served if s not in opens]
    assert served and all(s.kind == SERVER and s.name.startswith("moe.v1.Expert/") for s in served)  # no health
    refused = [s for s in served if s.parent_id == format(unsigned.get_span_context().span_id, "016x")]
    assert len(refused) == 1 and refused[0].status == ERROR
    assert refused[0].grpc_code == grpc.StatusCode.UNAUTHENTICATED.value[0]
    served = [s for s in served if s not in refused]
    # One Info per expert service: the pool asking whether it takes moe-frames (outside any trace).
    negotiation = [s for s in served if s.name == "moe.v1.Expert/Info"]
    assert len(negotiation) == len(services) and all(s.parent_id == "" for s in negotiation)
    served = [s for s in served if s not in negotiation]
    # experts: every SERVER span is the child of the router call that caused it, across processes
    assert sorted(s.parent_id for s in served) == sorted(c.span_id for c in calls)
    for s in served:
        call = by_id[s.parent_id]
        assert (s.trace_id, s.name, s.grpc_code) == (call.trace_id, call.name, 0)
        # Both ends name the transport: tensor calls go over moe-frames, the optimizer's over gRPC.
        tensor_call = call.name.split("/")[1] in ("Forward", "Backward")
        assert s.rpc_system == call.rpc_system == ("moe-frames" if tensor_call else "grpc"), (s, call)



def test_router_serve_exports_one_trace_from_http_request_to_expert_spans(tmp_path, expert_service_factory,
                                                                          redis_server, dev_wallets, receiver):
    """`python -m services.router serve` for real: tracing set up from OTEL_*, the HTTP API on
    ROUTER_HTTP_PORT; a completion sent with a traceparent is one trace down to the experts."""
    corpus = CorpusConfig(vocab_size=512, max_bytes_per_domain=50_000, cache_dir=str(tmp_path / "cache"))
    ckpt, experts, lm_cfg = prepare_initial_checkpoint(tmp_path / "init", "tiny", TrainConfig(steps=1), corpus)
    redis_url = redis_server.url.rsplit("/", 1)[0] + "/9"   # a database of its own: the router wants every expert
    redis.Redis.from_url(redis_url).flushdb()
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
    services = [expert_service_factory(uids, lm_cfg.dim, lm_cfg.moe_inter_dim,
                                       env={"REDIS_URL": redis_url, "EXPERT_CHECKPOINT": str(experts), **otel})
                for uids in deal_experts(lm_cfg.moe_layers(), lm_cfg.n_experts, 2)]
    wallet, http_port = dev_wallets.router, free_port()
    env = {**os.environ, **otel, "ROUTER_CHECKPOINT": str(ckpt), "REDIS_URL": redis_url, "ROUTER_PORT": "0",
           "ROUTER_HTTP_PORT": str(http_port), "ROUTER_OPEN_GENERATE": "1", "ROUTER_THREADS": "1",
           "WALLET_PATH": wallet.path, "WALLET_NAME": wallet.name, "WALLET_HOTKEY": wallet.hotkey,
           "AUTH_ALLOWLIST": dev_wallets.client_identity.hotkey, "PYTHONUNBUFFERED": "1"}
    with open(tmp_path / "router.log", "wb") as log:
        router = subprocess.Popen([sys.executable, "-m", "services.router", "serve", "--wait-s", "30"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)  # noqa: PLW1509
    try:
        deadline = time.monotonic() + 90
        while not _healthy(http_port):
            assert router.poll() is None, (tmp_path / "router.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the router's HTTP API never said healthy"
            time.sleep(0.2)
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        body = json.dumps({"prompt": "ROMEO:", "max_tokens": 2, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions", data=body, headers={
            "Content-Type": "application/json", "traceparent": f"00-{trace_id}-{parent_id}-01"})
        with urllib.request.urlopen(req, timeout=60) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 2
    finally:
        router.send_signal(signal.SIGTERM)
        assert router.wait(30) == 0, (tmp_path / "router.log").read_text()[-2000:]
        for service in services:
            assert service.terminate() == 0

    spans = [s for s in receiver.spans if s.trace_id == trace_id]
    by_id = {s.span_id: s for s in spans}
    (root,) = [s for s in spans if s.parent_id == parent_id]
    assert (root.service, root.name, root.kind) == ("router", "POST /v1/completions", SERVER)

    def chain(span):   # names from the span up to the HTTP request
        names = [span.name]
        while span.parent_id != parent_id:
            span = by_id[span.parent_id]
            names.append(span.name)
        return names

    served = [s for s in spans if s.service == "expert"]
    # Decode steps reach a service's experts in one ForwardMany (ROUTER_FORWARD_MANY_MAX_TOKENS), a lone
    # expert in a Forward: the server span, the router's call span, the layer span, the request.
    assert served and all(chain(s) in (
        [f"moe.v1.Expert/{rpc}", f"moe.v1.Expert/{rpc}", "moe.layer/Forward", "POST /v1/completions"]
        for rpc in ("Forward", "ForwardMany")) for s in served)
    layers = {by_id[by_id[s.parent_id].parent_id].span_id for s in served}
    assert len(layers) >= 2 * len(lm_cfg.moe_layers())   # a layer span per MoE layer and token


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_router_rpcs_get_server_spans_and_a_rejected_one_too(client_identity):
    """The router's sync gRPC server: Generate continues the caller's trace; a request refused by
    the signature check still has its span (tracing runs before auth); health checks have none."""
    exported = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    torch.manual_seed(0)
    metrics, identity = RouterMetrics(), Identity.generate()
    config = RouterConfig(wallet=WalletConfig(), auth=AuthConfig(allowlist=(client_identity.hotkey,)))
    servicer = RouterServicer(MoELM(preset("tiny", vocab_size=64, block_size=16)), _Letters(),
                              ReplicaSet(_NoRegistry()), metrics, max_new_tokens=4)
    server = RouterServer(servicer, "127.0.0.1", 0, max_message_mb=4, auth=router_auth(config, identity, metrics),
                          tracer_provider=provider).start()
    caller = provider.get_tracer("test")
    try:
        with grpc.insecure_channel(server.endpoint) as ch:
            signed = router_pb2_grpc.RouterStub(SigningChannel(ch, client_identity, identity.hotkey))
            with caller.start_as_current_span("client") as client_span:
                carrier: dict[str, str] = {}
                PROPAGATOR.inject(carrier)
                assert len(list(signed.Generate(router_pb2.GenerateRequest(prompt="ab", max_new_tokens=3),
                                                metadata=tuple(carrier.items()), timeout=30))) == 3
            with pytest.raises(grpc.RpcError) as info:
                router_pb2_grpc.RouterStub(ch).Logits(router_pb2.LogitsRequest(tokens=[1]), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    finally:
        server.stop(grace_s=0)
    spans = {s.name: s for s in exported.get_finished_spans() if s.kind == trace.SpanKind.SERVER}
    assert set(spans) == {"moe.v1.Router/Generate", "moe.v1.Router/Logits"}
    generate, logits = spans["moe.v1.Router/Generate"], spans["moe.v1.Router/Logits"]
    assert generate.parent.span_id == client_span.get_span_context().span_id
    assert generate.context.trace_id == client_span.get_span_context().trace_id
    assert generate.status.status_code == trace.StatusCode.UNSET and generate.attributes["rpc.grpc.status_code"] == 0
    assert logits.status.status_code == trace.StatusCode.ERROR
    assert logits.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]


@pytest.fixture(scope="module")
def corpus_cfg(tmp_path_factory):
    cfg = CorpusConfig(vocab_size=512, max_bytes_per_domain=150_000, cache_dir=str(tmp_path_factory.mktemp("cache")))
    build_corpus(cfg)
    return cfg


def test_each_training_step_and_evaluation_is_one_trace_from_its_root_to_the_experts(
        tmp_path, corpus_cfg, expert_service_factory, redis_server, dev_wallets, receiver):
    """RemoteTrainer: each step is the root span `moe.train/step` of a trace holding every layer span
    of that step (Forward, Backward, GradNorm, ApplyStep) and the expert services' spans they caused;
    each validation pass is the root `moe.train/evaluate` of its forwards."""
    steps = 2
    ckpt, experts, lm_cfg, _ = _init(tmp_path, corpus_cfg, steps=steps)
    redis_url = _private_db(redis_server, 6)
    env = {"REDIS_URL": redis_url, "EXPERT_CHECKPOINT": str(experts), "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
           "OTEL_BSP_SCHEDULE_DELAY": "100"}
    services = [expert_service_factory(uids, lm_cfg.dim, lm_cfg.moe_inter_dim, env=env)
                for uids in deal_experts(lm_cfg.moe_layers(), lm_cfg.n_experts, 2)]
    config = _router_config(redis_url, dev_wallets.router)
    provider = tracer_provider(TracingConfig(otlp_endpoint=receiver.url), "router")
    parts = RemoteParts.connect(config)
    parts.tracer = ExpertCallTracer(provider)
    try:
        trainer, parts, _ = build_remote_trainer(ckpt, tmp_path / "run", config, progress=False, parts=parts)
        trainer.train()
    finally:
        provider.shutdown()
        parts.close()
        for service in services:
            assert service.terminate() == 0

    spans = receiver.snapshot()
    # Every layer span of the router has a root above it: a step or an evaluation (before step 0 and
    # after the last), each a trace of its own.
    evaluations = [s for s in spans if s.name == "moe.train/evaluate"]
    assert len(evaluations) == 2 and all(s.parent_id == "" for s in evaluations)
    assert all(s.parent_id for s in spans if s.name.startswith("moe.layer/"))
    assert {s.trace_id for s in spans if s.name.startswith("moe.layer/Forward") and s.parent_id in
            {e.span_id for e in evaluations}} == {e.trace_id for e in evaluations}
    roots = [s for s in spans if s.name == "moe.train/step"]
    assert len(roots) == steps and all(s.service == "router" and s.parent_id == "" for s in roots)
    assert len({s.trace_id for s in roots}) == steps
    n_layers = len(lm_cfg.moe_layers())
    for root in roots:
        in_trace = [s for s in spans if s.trace_id == root.trace_id]
        layers = [s for s in in_trace if s.name.startswith("moe.layer/")]
        assert Counter(s.name for s in layers) == {f"moe.layer/{rpc}": n_layers
                                                    for rpc in ("Forward", "Backward", "GradNorm", "ApplyStep")}
        assert all(s.parent_id == root.span_id for s in layers)
        served = Counter(s.name for s in in_trace if s.service == "expert")
        assert {"moe.v1.Expert/Forward", "moe.v1.Expert/Backward", "moe.v1.Expert/GradNorm",
                "moe.v1.Expert/ApplyStep"} <= set(served), served
