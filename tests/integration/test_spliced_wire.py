"""The expert service with spliced tensors (subnet/spliced_wire.py) over real gRPC: a plain moe.v1
client (the generated stub, protobuf's own serialization) and the router's client (ExpertClient,
tensors spliced both ways) get the same answers from the same service, for tensors large
enough to be spliced, in every float wire dtype and int8, Forward and Backward."""

import grpc
import pytest
import torch

from moe.experts import SwiGLU
from subnet.auth import SigningChannel
from subnet.expert_client import ExpertClientPool
from subnet.expert_weights import save_expert_weights
from subnet.spliced_wire import MIN_SPLICE_BYTES
from subnet.tensor_codec import decode, encode, encode_view
from subnet.wire.v1 import expert_pb2, expert_pb2_grpc

pytestmark = pytest.mark.integration
DIM, INTER = 128, 256
TOKENS = 4 * MIN_SPLICE_BYTES // (4 * DIM)   # 4x the splice threshold in fp32
TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def service(expert_service_module_factory, tmp_path_factory):
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("ckpt") / "experts.safetensors"
    save_expert_weights(path, {"0.0": SwiGLU(DIM, INTER)})
    return expert_service_module_factory(["0.0"], DIM, INTER, env={
        "EXPERT_CHECKPOINT": str(path), "EXPERT_WIRE_DTYPES": "fp32,bf16,fp16,int8", "REDIS_URL": "",
        "EXPERT_MAX_REQUEST_TOKENS": str(TOKENS)})


@pytest.fixture(scope="module")
def plain(service, client_identity):
    channel = grpc.insecure_channel(service.endpoint)
    yield expert_pb2_grpc.ExpertStub(SigningChannel(channel, client_identity, service.hotkey))
    channel.close()


@pytest.fixture(scope="module")
def spliced(service, client_identity):
    with ExpertClientPool(identity=client_identity) as pool:
        yield pool.get(service.endpoint, service.hotkey)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_plain_and_spliced_clients_get_the_same_forward(plain, spliced, dtype):
    x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(1))
    reply = plain.Forward(expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(x, dtype)), timeout=TIMEOUT_S)
    answer = spliced.forward("0.0", encode_view(x, dtype), call_id="", step=0, training=False,
                             timeout_s=TIMEOUT_S).result()
    assert answer.outputs.dtype == reply.outputs.dtype
    assert torch.equal(decode(answer.outputs, expected_dim=DIM), decode(reply.outputs, expected_dim=DIM))
    assert isinstance(reply, expert_pb2.ForwardResponse)   # the plain stub read the spliced answer as protobuf


def test_plain_and_spliced_clients_get_the_same_backward(plain, spliced):
    x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(2))
    g = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(3))
    # Inputs sent along with each Backward: the service recomputes the activations for it.
    reply = plain.Backward(expert_pb2.BackwardRequest(expert_uid="0.0", call_id="p", step=0, session_id="plain",
                                                      grad_outputs=encode(g), inputs=encode(x)), timeout=TIMEOUT_S)
    answer = spliced.backward("0.0", encode_view(g), call_id="s", step=0, inputs=encode_view(x),
                              session_id="spliced", timeout_s=TIMEOUT_S).result()
    expected = decode(reply.grad_inputs, expected_dim=DIM)
    assert torch.equal(decode(answer.grad_inputs, expected_dim=DIM), expected)
    assert float(expected.abs().sum()) > 0


def test_a_spliced_request_with_a_wrong_byte_count_is_refused_and_the_service_keeps_serving(spliced):
    x = torch.randn(TOKENS, DIM, generator=torch.Generator().manual_seed(4))
    wire = encode_view(x)
    wire.header.shape[0] = TOKENS - 1            # the header now disagrees with the payload
    with pytest.raises(grpc.RpcError) as err:
        spliced.forward("0.0", wire, call_id="", step=0, training=False, timeout_s=TIMEOUT_S).result()
    assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "does not match the shape" in err.value.details()
    answer = spliced.forward("0.0", encode_view(x), call_id="", step=0, training=False, timeout_s=TIMEOUT_S).result()
    assert decode(answer.outputs, expected_dim=DIM).shape == (TOKENS, DIM)
