"""The expert service as a real subprocess over real gRPC and Redis: numerics equal the
in-process SwiGLU, batching merges requests, every malformed request gets its status code
and the server keeps serving, the registry follows the process's life."""

import asyncio
import copy
import signal
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from moe.experts import SwiGLU
from services.expert.config import ExpertConfig
from services.expert.server import ExpertServer
from subnet.auth import SigningChannel
from subnet.envconfig import from_env
from subnet.expert_weights import init_expert, save_expert_weights
from subnet.identity import Identity
from subnet.registry import ExpertRegistry, replica_key
from subnet.tensor_codec import decode, encode
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.integration
torch.set_num_threads(1)
DIM, INTER = 32, 64
MAX_TOKENS = 64
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The in-process experts the service must equal, and the checkpoint it loads them from."""
    torch.manual_seed(1234)
    experts = {"0.0": SwiGLU(DIM, INTER), "0.1": SwiGLU(DIM, INTER)}
    path = tmp_path_factory.mktemp("ckpt") / "experts.safetensors"
    save_expert_weights(path, experts)
    return experts, path


@pytest.fixture(scope="module")
def service(expert_service_module_factory, reference):
    _, path = reference
    return expert_service_module_factory(["0.0", "0.1"], DIM, INTER, env={
        "EXPERT_CHECKPOINT": str(path), "EXPERT_MAX_MESSAGE_MB": "1", "EXPERT_MAX_REQUEST_TOKENS": str(MAX_TOKENS),
        "EXPERT_BATCH_WAIT_MS": "100", "EXPERT_WIRE_DTYPES": "fp32,bf16", "REDIS_URL": ""})


@pytest.fixture(scope="module")
def stub(service, client_identity):
    channel = grpc.insecure_channel(service.endpoint, options=[("grpc.max_receive_message_length", 8 << 20)])
    yield expert_pb2_grpc.ExpertStub(SigningChannel(channel, client_identity, service.hotkey))
    channel.close()


def _x(n, seed):
    return torch.randn(n, DIM, generator=torch.Generator().manual_seed(seed))


def _metrics(service) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(service.metrics_url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_health_is_serving_and_info_describes_the_service(service, stub):
    with grpc.insecure_channel(service.endpoint) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "moe.v1.Expert"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    info = stub.Info(expert_pb2.InfoRequest(), timeout=5)
    assert [(e.uid, e.dim, e.inter_dim) for e in info.experts] == [("0.0", DIM, INTER), ("0.1", DIM, INTER)]
    assert list(info.wire_dtypes) == [tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_BFLOAT16]
    assert info.max_tokens == MAX_TOKENS and info.max_message_bytes == 1 << 20


def test_forward_equals_in_process_expert_in_fp32_and_bf16(stub, reference):
    experts, _ = reference
    x = _x(10, seed=1)
    y_ref = experts["0.0"](x).detach()
    reply = stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(x)), timeout=10)
    assert reply.outputs.dtype == tensor_pb2.DTYPE_FLOAT32
    torch.testing.assert_close(decode(reply.outputs), y_ref, rtol=1e-5, atol=1e-5)
    reply = stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(x, "bf16")), timeout=10)
    assert reply.outputs.dtype == tensor_pb2.DTYPE_BFLOAT16  # answered in the request's dtype
    torch.testing.assert_close(decode(reply.outputs), y_ref, rtol=3e-2, atol=3e-2)


def test_training_step_over_grpc_equals_in_process_training(stub, reference):
    """Two micro-batches (one from the activation cache, one recomputed after FAILED_PRECONDITION),
    grad norm, AdamW step, then the updated expert's forward: all equal to in-process."""
    experts, _ = reference
    ref = copy.deepcopy(experts["0.1"])
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    batches = [(_x(6, seed=10), _x(6, seed=11)), (_x(9, seed=12), _x(9, seed=13))]
    for i, (x, g) in enumerate(batches):
        reply = stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.1", inputs=encode(x), call_id=f"mb{i}",
                                                       step=0, training=True), timeout=10)
        xr = x.clone().requires_grad_(True)
        y_ref = ref(xr)
        y_ref.backward(g)
        torch.testing.assert_close(decode(reply.outputs), y_ref.detach(), rtol=1e-5, atol=1e-5)
        call_id = f"mb{i}" if i == 0 else "forgotten"  # the second: the expert holds no activations
        request = expert_pb2.BackwardRequest(expert_uid="0.1", call_id=call_id, step=0, grad_outputs=encode(g))
        if i == 1:
            with pytest.raises(grpc.RpcError) as info:
                stub.Backward(request, timeout=10)
            assert info.value.code() == Code.FAILED_PRECONDITION and "inputs" in info.value.details()
            request.inputs.CopyFrom(encode(x))
        reply = stub.Backward(request, timeout=10)
        torch.testing.assert_close(decode(reply.grad_inputs), xr.grad, rtol=1e-5, atol=1e-5)

    norm = stub.GradNorm(expert_pb2.GradNormRequest(expert_uid="0.1", step=0), timeout=10)
    assert norm.backward_calls == 2
    assert norm.sq_norm == pytest.approx(sum(float(p.grad.double().pow(2).sum()) for p in ref.parameters()),
                                         rel=1e-5)
    scale = 0.5
    for p in ref.parameters():
        p.grad.mul_(scale)
    opt.step()
    reply = stub.ApplyStep(expert_pb2.ApplyStepRequest(expert_uid="0.1", step=0, lr=1e-2, grad_scale=scale,
                                                       weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8),
                           timeout=10)
    assert reply.version == 1
    x = _x(5, seed=20)
    reply = stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.1", inputs=encode(x)), timeout=10)
    torch.testing.assert_close(decode(reply.outputs), ref(x).detach(), rtol=1e-5, atol=1e-5)


def test_requests_arriving_while_the_expert_computes_are_merged(expert_service_factory, client_identity):
    """Dynamic batching: a request to an idle expert goes at once; those that arrive while it computes
    (here: behind a large one, which runs on the compute thread) wait for company and go together."""
    dim, inter, seed = 256, 1024, 3
    service = expert_service_factory(["0.0"], dim, inter, env={
        "EXPERT_SEED": str(seed), "EXPERT_BATCH_WAIT_MS": "100", "EXPERT_MAX_REQUEST_TOKENS": "4096",
        "EXPERT_THREADS": "1", "REDIS_URL": ""})
    expert = init_expert("0.0", dim, inter, seed=seed)   # the weights EXPERT_SEED gives it
    big = torch.randn(4096, dim, generator=torch.Generator().manual_seed(1))   # about 3 G multiply-adds
    xs = [torch.randn(4, dim, generator=torch.Generator().manual_seed(100 + i)) for i in range(8)]
    before = _metrics(service)

    async def fire():
        async with grpc.aio.insecure_channel(service.endpoint, options=[
                ("grpc.max_send_message_length", 8 << 20), ("grpc.max_receive_message_length", 8 << 20)]) as channel:
            stub = expert_pb2_grpc.ExpertStub(SigningChannel(channel, client_identity, service.hotkey))
            await stub.Info(expert_pb2.InfoRequest())  # connect first
            first = asyncio.ensure_future(stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.0",
                                                                                 inputs=encode(big)), timeout=30))
            deadline = time.monotonic() + 20
            while _metrics(service).get(("expert_queue_tokens", (("expert", "0.0"),)), 0) < len(big):
                assert time.monotonic() < deadline, "the large request never reached the batcher"
                await asyncio.sleep(0.002)   # until it is computing (an idle expert takes it at once)
            small = await asyncio.gather(*(stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.0",
                                                                                  inputs=encode(x)), timeout=30)
                                           for x in xs))
            return await first, small

    first, replies = asyncio.run(fire())
    with torch.no_grad():
        torch.testing.assert_close(decode(first.outputs), expert(big), rtol=1e-4, atol=1e-4)
        for x, reply in zip(xs, replies):  # every request got its own rows back
            torch.testing.assert_close(decode(reply.outputs), expert(x), rtol=1e-4, atol=1e-4)
    after = _metrics(service)
    key = (("expert", "0.0"),)
    batches = after[("expert_batch_requests_count", key)] - before.get(("expert_batch_requests_count", key), 0)
    requests = after[("expert_batch_requests_sum", key)] - before.get(("expert_batch_requests_sum", key), 0)
    assert requests == 9
    assert batches < 9, f"9 requests ran as {batches} computations: nothing was merged"


def _forward(uid="0.0", **tensor):
    return "Forward", expert_pb2.ForwardRequest(expert_uid=uid, inputs=tensor_pb2.Tensor(**tensor))


def _fp32(shape, fill=0.0):
    data = np.full(int(np.prod(shape)), fill, dtype="<f4").tobytes()
    return {"dtype": tensor_pb2.DTYPE_FLOAT32, "shape": list(shape), "data": data}


def _with(values, shape=(4, DIM)):
    data = np.zeros(int(np.prod(shape)), dtype="<f4")
    data[: len(values)] = values
    return {"dtype": tensor_pb2.DTYPE_FLOAT32, "shape": list(shape), "data": data.tobytes()}


MALFORMED = {
    "dtype unspecified": (_forward(**{**_fp32((4, DIM)), "dtype": tensor_pb2.DTYPE_UNSPECIFIED}),
                          Code.INVALID_ARGUMENT, "DTYPE_UNSPECIFIED"),
    "dtype not allowed": (_forward(dtype=tensor_pb2.DTYPE_FLOAT16, shape=[4, DIM], data=bytes(4 * DIM * 2)),
                          Code.INVALID_ARGUMENT, "does not accept"),
    "unknown dtype": (_forward(**{**_fp32((4, DIM)), "dtype": 42}), Code.INVALID_ARGUMENT, "unknown dtype"),
    "wrong width": (_forward(**_fp32((4, DIM - 1))), Code.INVALID_ARGUMENT, f"expected (tokens, {DIM})"),
    "wrong rank": (_forward(**_fp32((4, DIM, 1))), Code.INVALID_ARGUMENT, "expected (tokens"),
    "bytes do not match shape": (_forward(**{**_fp32((4, DIM)), "shape": [5, DIM]}), Code.INVALID_ARGUMENT,
                                 f"has {4 * DIM * 4} bytes but shape [5, {DIM}]"),
    "NaN": (_forward(**_with([1.0, float("nan")])), Code.INVALID_ARGUMENT, "NaN or Inf"),
    "Inf": (_forward(**_with([float("-inf")])), Code.INVALID_ARGUMENT, "NaN or Inf"),
    "empty tensor": (_forward(**_fp32((0, DIM))), Code.INVALID_ARGUMENT, "empty"),
    "negative size": (_forward(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[-1, DIM]), Code.INVALID_ARGUMENT, "negative"),
    "too many tokens": (_forward(**_fp32((MAX_TOKENS + 1, DIM))), Code.RESOURCE_EXHAUSTED, "at most 64"),
    "message over the size limit": (_forward(**_fp32((10_000, DIM))), Code.RESOURCE_EXHAUSTED, ""),
    "unknown expert": (_forward(uid="7.7", **_fp32((4, DIM))), Code.NOT_FOUND, "hosted: 0.0, 0.1"),
    "no expert uid": (_forward(uid="", **_fp32((4, DIM))), Code.INVALID_ARGUMENT, "expert_uid is required"),
    "missing inputs": (("Forward", expert_pb2.ForwardRequest(expert_uid="0.0")), Code.INVALID_ARGUMENT,
                       "inputs is required"),
    "training without call_id": (("Forward", expert_pb2.ForwardRequest(
        expert_uid="0.0", training=True, inputs=encode(torch.ones(2, DIM)))), Code.INVALID_ARGUMENT, "call_id"),
    "negative step": (("Forward", expert_pb2.ForwardRequest(expert_uid="0.0", step=-1, inputs=encode(
        torch.ones(2, DIM)))), Code.INVALID_ARGUMENT, "step must be >= 0"),
    "committed_round with training": (("Forward", expert_pb2.ForwardRequest(
        expert_uid="0.0", training=True, call_id="c", committed_round=3, inputs=encode(torch.ones(2, DIM)))),
        Code.INVALID_ARGUMENT, "inference only"),
    "negative committed_round": (("Forward", expert_pb2.ForwardRequest(
        expert_uid="0.0", committed_round=-2, inputs=encode(torch.ones(2, DIM)))), Code.INVALID_ARGUMENT,
        "round >= 0"),
    "backward without grad_outputs": (("Backward", expert_pb2.BackwardRequest(expert_uid="0.0", call_id="c")),
                                      Code.INVALID_ARGUMENT, "grad_outputs is required"),
    "backward without call_id": (("Backward", expert_pb2.BackwardRequest(
        expert_uid="0.0", grad_outputs=encode(torch.ones(2, DIM)))), Code.INVALID_ARGUMENT, "call_id is required"),
    "backward with bad inputs": (("Backward", expert_pb2.BackwardRequest(
        expert_uid="0.0", call_id="c", grad_outputs=encode(torch.ones(2, DIM)),
        inputs=tensor_pb2.Tensor(**_fp32((2, 3))))), Code.INVALID_ARGUMENT, "inputs has shape"),
    "backward for unknown call": (("Backward", expert_pb2.BackwardRequest(
        expert_uid="0.0", call_id="nobody", grad_outputs=encode(torch.ones(2, DIM)))), Code.FAILED_PRECONDITION,
        "resend the Backward with `inputs`"),
    "apply step without eps": (("ApplyStep", expert_pb2.ApplyStepRequest(expert_uid="0.0", lr=0.1, beta1=0.9,
                                                                         beta2=0.95)), Code.INVALID_ARGUMENT, "eps"),
    "apply step with NaN lr": (("ApplyStep", expert_pb2.ApplyStepRequest(
        expert_uid="0.0", lr=float("nan"), eps=1e-8)), Code.INVALID_ARGUMENT, "lr=nan"),
    "grad norm of unknown expert": (("GradNorm", expert_pb2.GradNormRequest(expert_uid="3.0")), Code.NOT_FOUND,
                                    "not hosted"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_gets_its_status_and_the_server_keeps_serving(stub, reference, case):
    (rpc, request), code, fragment = MALFORMED[case]
    with pytest.raises(grpc.RpcError) as info:
        getattr(stub, rpc)(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    assert fragment in (info.value.details() or "")
    x = _x(3, seed=7)  # a valid request right after
    reply = stub.Forward(expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(x)), timeout=10)
    torch.testing.assert_close(decode(reply.outputs), reference[0]["0.0"](x).detach(), rtol=1e-5, atol=1e-5)


def test_metrics_endpoint_serves_histograms_and_error_counts(service, stub):
    stub.Info(expert_pb2.InfoRequest(), timeout=5)
    with pytest.raises(grpc.RpcError):
        stub.Forward(expert_pb2.ForwardRequest(expert_uid="9.9", inputs=encode(torch.ones(1, DIM))), timeout=5)
    m = _metrics(service)
    assert m[("expert_rpc_latency_seconds_count", (("rpc", "Info"),))] >= 1
    assert any(name == "expert_rpc_latency_seconds_bucket" and dict(labels).get("rpc") == "Forward"
               for name, labels in m)
    assert m[("expert_rpc_errors_total", (("code", "NOT_FOUND"), ("rpc", "Forward")))] >= 1
    assert m[("expert_tokens_total", (("expert", "0.0"), ("rpc", "Forward")))] >= 1
    assert ("expert_queue_tokens", (("expert", "0.0"),)) in m


def _registry_keys(redis_client, endpoint):
    return sorted(k.decode() for k in redis_client.scan_iter(match=f"moe:expert:*:{endpoint}"))


def test_registry_follows_the_process_lifecycle(expert_service_factory, redis_client, client_identity):
    """Registered while alive; deregistered on SIGTERM (after draining an in-flight request);
    gone after the TTL when SIGKILLed; registered again after a restart on the same endpoint."""
    env = {"EXPERT_REGISTRY_TTL_S": "1.5", "EXPERT_INJECT_DELAY_MS": "700",
           "EXPERT_SEED": "5"}
    graceful = expert_service_factory(["1.0", "1.1"], DIM, INTER, env=env)
    crashed = expert_service_factory(["1.0"], DIM, INTER, env=env)
    registry = ExpertRegistry(redis_client, ttl_s=1.5)

    replicas = {r.endpoint: r for r in registry.replicas("1.0")}
    assert {graceful.endpoint, crashed.endpoint} <= set(replicas)
    assert replicas[graceful.endpoint].hotkey == graceful.hotkey and replicas[graceful.endpoint].uid == "1.0"
    assert replicas[crashed.endpoint].hotkey == crashed.hotkey != graceful.hotkey  # each its wallet's hotkey
    assert _registry_keys(redis_client, graceful.endpoint) == [replica_key("1.0", graceful.endpoint),
                                                               replica_key("1.1", graceful.endpoint)]
    time.sleep(1.8)  # longer than the TTL: the heartbeat keeps the entries alive
    assert len(_registry_keys(redis_client, graceful.endpoint)) == 2

    x = _x(2, seed=3)
    expected = init_expert("1.0", DIM, INTER, seed=5)(x).detach()  # EXPERT_SEED=5 without a checkpoint

    def forward_future():
        channel = grpc.insecure_channel(graceful.endpoint)
        stub = expert_pb2_grpc.ExpertStub(SigningChannel(channel, client_identity, graceful.hotkey))
        return channel, stub.Forward.future(expert_pb2.ForwardRequest(expert_uid="1.0", inputs=encode(x)),
                                            timeout=10)

    channel, pending = forward_future()  # in flight (700 ms injected delay) when SIGTERM arrives
    time.sleep(0.3)
    graceful.process.send_signal(signal.SIGTERM)
    torch.testing.assert_close(decode(pending.result().outputs), expected, rtol=1e-5, atol=1e-5)
    channel.close()
    assert graceful.process.wait(10) == 0
    assert _registry_keys(redis_client, graceful.endpoint) == []

    crashed.kill()  # no chance to deregister: the TTL removes it
    assert _registry_keys(redis_client, crashed.endpoint) == [replica_key("1.0", crashed.endpoint)]
    deadline = time.monotonic() + 5
    while _registry_keys(redis_client, crashed.endpoint) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _registry_keys(redis_client, crashed.endpoint) == []

    endpoint = graceful.endpoint
    graceful.restart()
    assert graceful.endpoint == endpoint
    assert len(_registry_keys(redis_client, endpoint)) == 2
    channel, pending = forward_future()
    torch.testing.assert_close(decode(pending.result().outputs), expected, rtol=1e-5, atol=1e-5)
    channel.close()


def test_server_runs_in_process_with_its_lifecycle_methods(client_identity):
    """start / wait_ready / stop without a subprocess (how router tests can embed an expert)."""
    config = from_env(ExpertConfig, {"EXPERT_UIDS": "4.0", "EXPERT_DIM": str(DIM), "EXPERT_INTER_DIM": str(INTER),
                                     "EXPERT_PORT": "0", "EXPERT_THREADS": "1",
                                     "AUTH_ALLOWLIST": client_identity.hotkey})
    identity = Identity.generate()  # instead of a wallet on disk
    torch.manual_seed(9)
    module = SwiGLU(DIM, INTER)
    x = _x(3, seed=4)

    async def scenario():
        server = ExpertServer(config, experts={"4.0": copy.deepcopy(module)}, identity=identity)
        await server.start()
        await server.wait_ready(timeout_s=10)
        try:
            async with grpc.aio.insecure_channel(server.endpoint) as channel:
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
                assert health.status == health_pb2.HealthCheckResponse.SERVING
                stub = expert_pb2_grpc.ExpertStub(SigningChannel(channel, client_identity, identity.hotkey))
                reply = await stub.Forward(expert_pb2.ForwardRequest(expert_uid="4.0", inputs=encode(x)), timeout=10)
                return decode(reply.outputs)
        finally:
            await server.stop(grace_s=1)

    torch.testing.assert_close(asyncio.run(scenario()), module(x).detach(), rtol=1e-5, atol=1e-5)


def _start_and_stop(config) -> None:
    """Start an in-process service with `config` (raising what its start raises), then stop it."""
    async def start():
        server = ExpertServer(config)
        try:
            await server.start()
        finally:
            await server.stop(grace_s=0)
    asyncio.run(start())


def test_a_save_path_in_a_missing_directory_stops_the_start(tmp_path):
    """Found out at SIGTERM instead, the trained weights would be lost with the traceback."""
    from services.expert.server import StartupError

    config = from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", "EXPERT_DIM": "8", "EXPERT_INTER_DIM": "16",
                                     "EXPERT_PORT": "0", "EXPERT_FRAMES_PORT": "-1", "AUTH_MODE": "off",
                                     "EXPERT_SAVE_PATH": str(tmp_path / "missing" / "experts.safetensors")})

    with pytest.raises(StartupError, match=r"EXPERT_SAVE_PATH=.*missing is not a writable directory"):
        _start_and_stop(config)


@pytest.mark.parametrize("name", ["weights", "weights/"])
def test_a_save_path_that_names_a_directory_stops_the_start(tmp_path, name):
    """Writing the weights over a directory fails at SIGTERM (and loses them): refused at start instead."""
    from services.expert.server import StartupError

    (tmp_path / "weights").mkdir()
    config = from_env(ExpertConfig, {"EXPERT_UIDS": "0.0", "EXPERT_DIM": "8", "EXPERT_INTER_DIM": "16",
                                     "EXPERT_PORT": "0", "EXPERT_FRAMES_PORT": "-1", "AUTH_MODE": "off",
                                     "EXPERT_SAVE_PATH": f"{tmp_path}/{name}"})

    with pytest.raises(StartupError, match=r"EXPERT_SAVE_PATH=.*weights/?' is a directory; give the file to write"):
        _start_and_stop(config)
    assert list((tmp_path / "weights").iterdir()) == [] and not (tmp_path / "weights.tmp").exists()
