"""subnet.tensor_codec: round trips, zero-copy decoding, and every way a tensor message can be wrong."""

from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import torch

from subnet.tensor_codec import WIRE_DTYPES, TensorError, decode, encode, parse_wire_dtypes
from subnet.wire.v1 import tensor_pb2

torch.set_num_threads(1)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _msg(dtype=tensor_pb2.DTYPE_FLOAT32, shape=(3, 4), data=None):
    if data is None:
        data = np.zeros(int(np.prod(shape)), dtype="<f4").tobytes()
    return tensor_pb2.Tensor(dtype=dtype, shape=list(shape), data=data)


@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16"])
def test_round_trip_is_exact_for_representable_values(wire):
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[wire]
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).to(torch_dtype).float()
    msg = encode(x, wire)
    assert msg.dtype == WIRE_DTYPES[wire]
    assert list(msg.shape) == [7, 5]
    assert len(msg.data) == 7 * 5 * (4 if wire == "fp32" else 2)
    y = decode(msg, expected_dim=5)
    assert y.dtype == torch.float32
    assert torch.equal(y, x)


@pytest.mark.parametrize("wire,tol", [("bf16", 1e-2), ("fp16", 1e-3)])
def test_half_precision_rounds_within_its_precision(wire, tol):
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    y = decode(encode(x, wire))
    torch.testing.assert_close(y, x, rtol=tol, atol=tol)
    assert not torch.equal(y, x)  # it really went through the narrow type


def test_encode_writes_little_endian_c_order_bytes_of_non_contiguous_input():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # (4, 3), not contiguous
    msg = encode(x)
    assert msg.data == np.ascontiguousarray(x.numpy()).astype("<f4").tobytes()
    assert torch.equal(decode(msg), x)


def test_bf16_bytes_are_the_upper_half_of_fp32():
    x = torch.tensor([[1.0, -2.0, 0.5]])
    assert encode(x, "bf16").data == np.array([0x3F80, 0xC000, 0x3F00], dtype="<u2").tobytes()


def test_fp32_decode_is_zero_copy():
    buf = bytearray(np.arange(6, dtype="<f4").tobytes())
    msg = SimpleNamespace(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3], data=buf)
    t = decode(msg, expected_dim=3)
    buf[0:4] = np.float32(42.0).tobytes()  # the tensor sees the sender's buffer itself
    assert t[0, 0].item() == 42.0


def test_fp32_decode_of_a_protobuf_message_shares_the_field_bytes():
    msg = encode(torch.ones(2, 3))
    t = decode(msg)
    assert not t.untyped_storage().resizable()  # a view over foreign memory, not a torch allocation


def test_encode_rejects_unknown_wire_dtype():
    with pytest.raises(ValueError, match="fp8"):
        encode(torch.ones(1, 1), "fp8")


def test_parse_wire_dtypes():
    assert parse_wire_dtypes("fp32, bf16") == (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_BFLOAT16)
    with pytest.raises(ValueError, match="int8"):
        parse_wire_dtypes("fp32,int8")


def _nonfinite(value):
    data = np.zeros(12, dtype="<f4")
    data[5] = value
    return _msg(data=data.tobytes())


@pytest.mark.parametrize("msg,kwargs,code,fragment", [
    (_msg(dtype=tensor_pb2.DTYPE_UNSPECIFIED), {}, INVALID, "DTYPE_UNSPECIFIED"),
    (_msg(dtype=99), {}, INVALID, "unknown dtype 99"),
    (_msg(dtype=tensor_pb2.DTYPE_FLOAT16, data=bytes(24)), {"allowed": [tensor_pb2.DTYPE_FLOAT32]},
     INVALID, "does not accept"),
    (_msg(shape=(12,)), {"expected_dim": 4}, INVALID, "expected (tokens, 4)"),
    (_msg(shape=(1, 3, 4)), {"expected_dim": 4}, INVALID, "expected (tokens, 4)"),
    (_msg(shape=(4, 3)), {"expected_dim": 4}, INVALID, "expected (tokens, 4)"),
    (_msg(shape=(-3, 4), data=b""), {"expected_dim": 4}, INVALID, "negative"),
    (_msg(shape=(0, 4), data=b""), {"expected_dim": 4}, INVALID, "empty"),
    (_msg(shape=(), data=b""), {}, INVALID, "no shape"),
    (_msg(data=bytes(40)), {}, INVALID, "has 40 bytes but shape [3, 4] with dtype fp32 needs 48"),
    (_msg(dtype=tensor_pb2.DTYPE_BFLOAT16, data=bytes(48)), {}, INVALID, "needs 24"),
    (_nonfinite(np.nan), {}, INVALID, "NaN or Inf"),
    (_nonfinite(np.inf), {}, INVALID, "NaN or Inf"),
    (_nonfinite(-np.inf), {}, INVALID, "NaN or Inf"),
    (_msg(), {"max_elements": 11}, grpc.StatusCode.RESOURCE_EXHAUSTED, "at most 11"),
])
def test_decode_rejects(msg, kwargs, code, fragment):
    with pytest.raises(TensorError) as info:
        decode(msg, name="inputs", **kwargs)
    assert info.value.code == code
    assert fragment in info.value.message
    assert info.value.message.startswith("inputs ")


def test_nan_in_bf16_is_rejected_after_upcast():
    x = torch.ones(2, 2)
    x[1, 1] = float("nan")
    with pytest.raises(TensorError, match="NaN"):
        decode(encode(x, "bf16"))


def test_size_limit_is_checked_before_the_bytes():
    huge = _msg(shape=(10**9, 1024), data=b"")  # claims 4 TB, carries nothing
    with pytest.raises(TensorError) as info:
        decode(huge, expected_dim=1024, max_elements=4096 * 1024)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_finite_values_whose_sum_overflows_are_accepted_and_nan_among_them_is_not():
    big = torch.full((4, 8), 3e38)                 # every value finite, the sum is +inf
    torch.testing.assert_close(decode(encode(big)), big)
    big[2, 5] = float("nan")
    with pytest.raises(TensorError, match="1 NaN or Inf"):
        decode(encode(big))
    mixed = torch.tensor([[float("inf"), -float("inf")]])   # the sum is NaN
    with pytest.raises(TensorError, match="2 NaN or Inf"):
        decode(encode(mixed))
