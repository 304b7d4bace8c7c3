"""subnet.tensor_codec: round trips, zero-copy decoding, int8 error bounds, and every way a tensor
message can be wrong."""

import platform
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from subnet.spliced_wire import TensorView
from subnet.tensor_codec import (
    INT8_BLOCK,
    WIRE_DTYPES,
    TensorError,
    all_finite,
    decode,
    encode,
    int8_nbytes,
    parse_wire_dtypes,
)
from subnet.wire.v1 import tensor_pb2

torch.set_num_threads(1)
INVALID = grpc.StatusCode.INVALID_ARGUMENT
INT8 = tensor_pb2.DTYPE_INT8_BLOCK64


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
    msg = TensorView(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[2, 3]), memoryview(buf))
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
    assert parse_wire_dtypes("int8,fp32") == (INT8, tensor_pb2.DTYPE_FLOAT32)
    with pytest.raises(ValueError, match="fp8"):
        parse_wire_dtypes("fp32,fp8")


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
    (_msg(dtype=INT8, data=bytes(12)), {}, INVALID, "has 12 bytes but shape [3, 4] with dtype int8 needs 16"),
    (_msg(dtype=INT8, data=bytes(17)), {}, INVALID, "needs 16"),
    (_msg(dtype=INT8, shape=(2, 64), data=bytes(4 + 128)), {}, INVALID, "needs 136"),  # 2 blocks, 1 scale
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



# ---- finiteness: one sum, the exact elementwise check only when the sum is not finite ----------

_ODD_SHAPE = (37, 111)                            # 4107 values: not a multiple of any vector width
_POSITIONS = [0, 1, 2053, 4105, 4106]             # first, second, middle, the vectorized tail, last
_NONFINITE = [float("nan"), float("inf"), -float("inf")]


def _raw_float_msg(wire: str, values: np.ndarray) -> tensor_pb2.Tensor:
    """A message holding exactly `values` (float64) in `wire` bits, built without `encode`."""
    if wire == "bf16":                            # the upper half of the fp32 bits: NaN/Inf keep their class
        data = (values.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    else:
        data = values.astype({"fp32": "<f4", "fp16": "<f2"}[wire]).tobytes()
    return _msg(dtype=WIRE_DTYPES[wire], shape=_ODD_SHAPE, data=data)


@pytest.mark.parametrize("wire", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("value", _NONFINITE)
@pytest.mark.parametrize("position", _POSITIONS)
def test_one_non_finite_value_anywhere_is_rejected(wire, value, position):
    values = np.random.default_rng(position).standard_normal(int(np.prod(_ODD_SHAPE)))
    values[position] = value
    with pytest.raises(TensorError) as info:
        decode(_raw_float_msg(wire, values), name="inputs")
    assert info.value.code == INVALID
    assert info.value.message == "inputs contains 1 NaN or Inf values; send finite numbers"


@pytest.mark.parametrize("value", _NONFINITE)
@pytest.mark.parametrize("position", _POSITIONS)
def test_one_non_finite_value_anywhere_is_rejected_in_int8(value, position):
    x = torch.randn(_ODD_SHAPE, generator=torch.Generator().manual_seed(position))
    x.view(-1)[position] = value
    with pytest.raises(TensorError, match="would not be finite in int8"):
        encode(x, "int8", check_finite="outputs")
    with pytest.raises(TensorError, match="^inputs has 1 block scales that are NaN or Inf"):
        decode(encode(x, "int8"), name="inputs")


@pytest.mark.parametrize("wire,huge", [("fp32", 3e38), ("bf16", 3e38), ("fp16", 65504.0), ("int8", 3e38)])
@pytest.mark.parametrize("sign", ["positive", "negative", "both"])
def test_finite_values_whose_sum_overflows_are_accepted(wire, huge, sign):
    x = torch.full(_ODD_SHAPE, huge)
    if sign == "negative":
        x.neg_()                                  # the sum is -inf
    elif sign == "both":
        x.view(-1)[x.numel() // 2:].neg_()        # both halves overflow: the sum is inf - inf = NaN
    if wire in ("fp32", "bf16"):
        assert not bool(torch.isfinite(x.sum()))  # the fast path alone would refuse it
    y = decode(encode(x, wire, check_finite="outputs"))
    assert bool(torch.isfinite(y).all())
    torch.testing.assert_close(y, x, rtol=1e-2, atol=0.0)


@pytest.mark.parametrize("position", _POSITIONS)
def test_encode_refuses_an_fp16_overflow_anywhere(position):
    x = torch.zeros(_ODD_SHAPE)
    x.view(-1)[position] = 1e5                    # finite in fp32, inf in fp16
    with pytest.raises(TensorError, match="^outputs would not be finite in fp16"):
        encode(x, "fp16", check_finite="outputs")
    assert bool(torch.isfinite(decode(encode(x, "fp32", check_finite="outputs"))).all())


def test_all_finite_agrees_with_the_elementwise_check():
    cases = [torch.zeros(5), torch.full((9,), 3e38), torch.tensor([3e38, 3e38, -3e38, -3e38]),
             torch.tensor([1.0, float("nan")]), torch.tensor([float("inf"), -float("inf")]),
             torch.tensor([-float("inf")]), torch.full((3,), 1e4, dtype=torch.float16)]
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t


# ---- int8 (blockwise absmax, 64 values per fp32 scale) -----------------------------------------

def _block_absmax(x: torch.Tensor) -> torch.Tensor:
    """absmax of each value's block, per value (the reference for the error bound)."""
    flat = x.reshape(-1)
    padded = torch.nn.functional.pad(flat, (0, -flat.numel() % INT8_BLOCK))
    absmax = padded.view(-1, INT8_BLOCK).abs().amax(dim=1)
    return absmax.repeat_interleave(INT8_BLOCK)[:flat.numel()].view(x.shape)


def _assert_within_int8_bound(y: torch.Tensor, x: torch.Tensor) -> None:
    bound = _block_absmax(x) / 254 * (1 + 1e-5)      # half a step, plus fp32 rounding of q * scale
    err = (y - x).abs()
    assert bool((err <= bound).all()), f"max excess {float((err - bound).max())}"


@pytest.mark.parametrize("shape", [(7, 5), (3, 64), (5, 192), (130,), (1, 1), (2, 3, 100)])
def test_int8_round_trip_is_within_half_a_step_of_each_block(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3
    msg = encode(x, "int8")
    assert msg.dtype == INT8 and list(msg.shape) == list(shape)
    n = x.numel()
    assert len(msg.data) == int8_nbytes(n) == 4 * -(-n // INT8_BLOCK) + n   # the last block is not padded
    y = decode(msg)
    assert y.dtype == torch.float32 and y.shape == x.shape
    _assert_within_int8_bound(y, x)
    if x.numel() > 1:                 # a lone value is its block's absmax: q = 127, exact
        assert not torch.equal(y, x)  # it really went through 8 bits


def test_int8_bytes_are_scales_then_values():
    x = torch.tensor([[127.0, -63.5, 0.0], [1.0, 2.0, 3.0]])   # one block: absmax 127, scale 1
    data = encode(x, "int8").data
    assert data[:4] == np.float32(1.0).astype("<f4").tobytes()
    assert data[4:] == np.array([127, -64, 0, 1, 2, 3], dtype=np.int8).tobytes()   # -63.5: ties to even


def test_int8_scales_are_per_block_so_small_values_survive_beside_huge_ones():
    gen = torch.Generator().manual_seed(3)
    blocks = [torch.randn(INT8_BLOCK, generator=gen) * m for m in (1e30, 1e-30, 5e37, 1e-3, 1.0)]
    x = torch.cat(blocks).view(-1, 32)
    y = decode(encode(x, "int8", check_finite="x"))
    _assert_within_int8_bound(y, x)
    rel = ((y - x).abs() / _block_absmax(x)).view(len(blocks), -1).amax(dim=1)
    assert bool((rel <= 1 / 254 * (1 + 1e-5)).all())


def test_int8_all_zero_tensor_and_zero_blocks_come_back_exactly():
    zeros = torch.zeros(3, 100)
    msg = encode(zeros, "int8")
    assert msg.data == bytes(len(msg.data))      # zero scales, zero values: no division by zero
    assert torch.equal(decode(msg), zeros)
    mixed = torch.zeros(2, INT8_BLOCK)
    mixed[1] = torch.linspace(-1, 1, INT8_BLOCK)
    y = decode(encode(mixed, "int8"))
    assert torch.equal(y[0], mixed[0])
    _assert_within_int8_bound(y, mixed)


def test_int8_values_that_are_exact_multiples_of_the_step_are_exact():
    q = torch.randint(-127, 128, (4, INT8_BLOCK), generator=torch.Generator().manual_seed(5))
    q[:, 0] = 127                                # every block's absmax is 127 * 0.5: scale 0.5
    x = q.float() * 0.5
    assert torch.equal(decode(encode(x, "int8")), x)


def test_int8_encode_takes_any_float_dtype_and_layout():
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(decode(encode(x.t(), "int8")), decode(encode(x.t().contiguous(), "int8")))
    half = x.to(torch.bfloat16)
    _assert_within_int8_bound(decode(encode(half, "int8")), half.float())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_int8_non_finite_values_are_refused_by_the_sender_and_the_receiver(value):
    x = torch.ones(2, 100)
    x[1, 7] = value
    with pytest.raises(TensorError) as info:
        encode(x, "int8", check_finite="outputs")
    assert info.value.code == INVALID and "outputs would not be finite in int8" in info.value.message
    with pytest.raises(TensorError) as info:      # without the sender's check, the block scale carries it
        decode(encode(x, "int8"), name="inputs")
    assert info.value.code == INVALID and info.value.message.startswith("inputs has 1 block scales that are NaN or Inf")


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 3e36])   # 3e36 * 127 overflows fp32
def test_int8_decode_rejects_scales_whose_values_are_not_finite(scale):
    data = np.array([scale], dtype="<f4").tobytes() + np.array([127, 1, 0], dtype=np.int8).tobytes()
    with pytest.raises(TensorError) as info:
        decode(_msg(dtype=INT8, shape=(1, 3), data=data), name="grad_outputs")
    assert info.value.code == INVALID and "NaN or Inf" in info.value.message


def test_int8_empty_tensor_encodes_and_is_rejected_like_the_others():
    msg = encode(torch.zeros(0, 4), "int8")
    assert msg.data == b""
    with pytest.raises(TensorError, match="empty"):
        decode(msg)


# ---- reuse_freed_memory (in a child process: it changes the whole process) ---------------------

@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_reuse_freed_memory_lets_a_second_64_mib_encode_fault_in_no_new_pages():
    script = """if True:
        import resource, torch
        from subnet.allocator import reuse_freed_memory
        from subnet.tensor_codec import encode
        assert reuse_freed_memory()
        x = torch.randn(16384, 1024)                     # 64 MiB
        encode(x)                                        # the first one takes its pages from the kernel
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        encode(x)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) < 1024   # without the call: 2 x 16,384 (tobytes, then the protobuf arena)


# ---- tensors in shared memory (decode's `shm` reader) ------------------------------------------

def test_a_tensor_in_shared_memory_decodes_to_a_copy_with_every_check_of_an_inline_one(tmp_path):
    from subnet.shm import ShmAttachments, ShmConfig, ShmRegion
    from subnet.tensor_codec import shm_dtype, shm_tensor

    config = ShmConfig(directory=str(tmp_path))
    region = ShmRegion.create(1 << 20, directory=str(tmp_path))
    server = ShmAttachments(config)
    try:
        for wire in ("fp32", "bf16", "fp16"):
            x = torch.randn(5, 8)
            offset, nbytes = region.write(x, dtype=shm_dtype(wire))
            msg = shm_tensor(wire, x.shape, region.name, offset, nbytes)
            got = decode(msg, expected_dim=8, shm=server.read)
            torch.testing.assert_close(got, x.to(shm_dtype(wire)).float())
            region.write(torch.zeros(5, 8), dtype=shm_dtype(wire))     # the sender reuses its region
            torch.testing.assert_close(got, x.to(shm_dtype(wire)).float())   # ... the decoded copy keeps
        x = torch.randn(4, 8)
        x[2, 3] = float("nan")
        offset, nbytes = region.write(x)
        with pytest.raises(TensorError, match="NaN or Inf"):
            decode(shm_tensor("fp32", x.shape, region.name, offset, nbytes), shm=server.read)
        with pytest.raises(TensorError, match="needs 128") as info:
            decode(shm_tensor("fp32", x.shape, region.name, offset, nbytes - 4), shm=server.read)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(TensorError, match="does not take") as info:
            decode(shm_tensor("fp32", x.shape, region.name, offset, nbytes))    # a receiver without shm
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(TensorError) as info:                       # a region that is not there
            decode(shm_tensor("fp32", x.shape, region.name[:-4] + "0000", offset, nbytes), shm=server.read)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(TensorError) as info:                       # outside the file
            decode(shm_tensor("fp32", x.shape, region.name, region.size, nbytes), shm=server.read)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        server.close()
        region.close()
