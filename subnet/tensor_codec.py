"""torch <-> `moe.v1.Tensor`: the one place that turns tensors into wire bytes and back.

    msg = encode(x, "bf16")                      # sender
    x = decode(msg, expected_dim=256, max_elements=4096 * 256, name="inputs")   # receiver

`encode` casts, makes the tensor contiguous and writes little-endian raw bytes.
`decode` checks everything a hostile or buggy sender can get wrong *before* touching the
bytes (dtype, rank, shape, size limits, byte length), then views the bytes as a tensor
(`torch.frombuffer`, no copy for fp32; one upcast copy for bf16/fp16) and rejects NaN/Inf.
Errors are `TensorError(code, message)` with a `grpc.StatusCode`, so a servicer can pass
them straight to `context.abort`.

"int8" (DTYPE_INT8_BLOCK64, layout in tensor.proto) is lossy: symmetric absmax quantization
per block of 64 values, round to nearest, so every value comes back within
absmax(its block) / 254 (plus fp32 rounding). Decoding costs one copy and one multiply.

Copies: with upb protobuf (bytes fields are copied in and out, never aliased) the floor is
two copies to encode a contiguous fp32 tensor (tobytes, then into the message) and one to
decode (`msg.data`); the finiteness check is one reduction. With glibc's default allocator
each of those copies costs about 4x a plain memcpy at 64 MiB: every buffer is a fresh mmap
whose pages fault in one by one. `reuse_freed_memory()`, called once from a process's
`main()`, removes that (measured by `python -m bench --only wire`).
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence

import grpc
import numpy as np
import torch

from moe.layer import all_finite as sum_checked_finite
from subnet.spliced_wire import WireTensor
from subnet.wire.v1 import tensor_pb2

WIRE_DTYPES: dict[str, int] = {
    "fp32": tensor_pb2.DTYPE_FLOAT32,
    "bf16": tensor_pb2.DTYPE_BFLOAT16,
    "fp16": tensor_pb2.DTYPE_FLOAT16,
    "int8": tensor_pb2.DTYPE_INT8_BLOCK64,
}
DTYPE_NAMES: dict[int, str] = {v: k for k, v in WIRE_DTYPES.items()}
_TORCH_DTYPES: dict[int, torch.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: torch.float32,
    tensor_pb2.DTYPE_BFLOAT16: torch.bfloat16,
    tensor_pb2.DTYPE_FLOAT16: torch.float16,
}
# numpy has no bfloat16: bf16 travels through numpy as its int16 bit pattern.
_NUMPY_VIEW: dict[int, tuple[torch.dtype, str]] = {
    tensor_pb2.DTYPE_FLOAT32: (torch.float32, "<f4"),
    tensor_pb2.DTYPE_BFLOAT16: (torch.int16, "<i2"),
    tensor_pb2.DTYPE_FLOAT16: (torch.float16, "<f2"),
}
ITEMSIZE: dict[int, int] = {      # the float dtypes; int8 bytes are int8_nbytes(numel)
    tensor_pb2.DTYPE_FLOAT32: 4,
    tensor_pb2.DTYPE_BFLOAT16: 2,
    tensor_pb2.DTYPE_FLOAT16: 2,
}
INT8_BLOCK = 64      # values per scale (DTYPE_INT8_BLOCK64); divides every preset's dim, so no block spans two tokens
_INT8_MAX = 127      # symmetric: -128 stays unused, so q and -q are both representable
_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
# glibc mallopt() parameters (malloc.h) and the values reuse_freed_memory() sets.


# (region, offset, nbytes, torch dtype, shape) -> a tensor viewing those bytes; raises subnet.shm.ShmError.
ShmReader = Callable[[str, int, int, torch.dtype, Sequence[int]], torch.Tensor]


class TensorError(Exception):
    """A tensor message that cannot be used; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def wire_dtype_name(dtype: int) -> str:
    """"fp32" for DTYPE_FLOAT32 etc.; a readable placeholder for anything else."""
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    if dtype == tensor_pb2.DTYPE_UNSPECIFIED:
        return "DTYPE_UNSPECIFIED"
    return f"unknown dtype {dtype}"


def parse_wire_dtypes(text: str) -> tuple[int, ...]:
    """"fp32,bf16" -> (DTYPE_FLOAT32, DTYPE_BFLOAT16); ValueError naming the bad entry."""
    out = []
    for name in (part.strip() for part in text.split(",")):
        if name not in WIRE_DTYPES:
            raise ValueError(f"unknown wire dtype {name!r}; choose from {', '.join(WIRE_DTYPES)}")
        out.append(WIRE_DTYPES[name])
    return tuple(dict.fromkeys(out))


# Up to this many fp32 values numpy checks every element itself: cheaper than the three torch calls of
# the sum check (a decode step's tensors are a few hundred values, and arrive with cold caches).
_SMALL_FINITE_CHECK = 1 << 16


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: numpy's element-wise check for small CPU fp32 tensors, else
    the model's one-read sum check (`moe.layer.all_finite`)."""
    if t.dtype == torch.float32 and t.numel() <= _SMALL_FINITE_CHECK and t.device.type == "cpu" \
            and not t.requires_grad:
        return bool(np.isfinite(t.numpy()).all())
    return sum_checked_finite(t)


def encode(t: torch.Tensor, wire_dtype: str = "fp32", *, check_finite: str | None = None) -> tensor_pb2.Tensor:
    """`t` as a `moe.v1.Tensor` in `wire_dtype` ("fp32", "bf16", "fp16" or "int8"). With `check_finite`
    (the tensor's name), a value that is not finite in the wire dtype (an fp16 overflow included)
    raises TensorError(INVALID_ARGUMENT) instead of being sent."""
    return encode_view(t, wire_dtype, check_finite=check_finite).to_message()


def encode_view(t: torch.Tensor, wire_dtype: str = "fp32", *, check_finite: str | None = None) -> WireTensor:
    """What `encode` does, without copying the bytes into a message: a `subnet.spliced_wire.WireTensor`
    whose payload views the (cast, contiguous) tensor, for `spliced_wire.build` to copy once into
    the request or response body."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"unknown wire dtype {wire_dtype!r}; choose from {', '.join(WIRE_DTYPES)}")
    enum = WIRE_DTYPES[wire_dtype]
    if enum == tensor_pb2.DTYPE_INT8_BLOCK64:
        return _encode_int8(t, check_finite)
    view_dtype, np_dtype = _NUMPY_VIEW[enum]
    t = t.detach().to(device="cpu", dtype=_TORCH_DTYPES[enum]).contiguous()
    if check_finite and not all_finite(t):
        raise TensorError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{check_finite} would not be finite in {wire_dtype} (overflow); the inputs are too "
                          f"large for this expert: scale them down or use a wider wire dtype")
    array = t.view(view_dtype).numpy()
    if not _LITTLE_ENDIAN_HOST:
        array = array.astype(np_dtype)
    return WireTensor(tensor_pb2.Tensor(dtype=enum, shape=list(t.shape)), memoryview(array).cast("B"), array)


def decode(msg: tensor_pb2.Tensor, *, expected_dim: int | None = None, max_elements: int | None = None,
           allowed: Iterable[int] | None = None, name: str = "tensor", shm: ShmReader | None = None,
           shm_copy: bool = True) -> torch.Tensor:
    """The float32 tensor in `msg`, after checking it; raises `TensorError`.

    expected_dim: the tensor must be 2-D `(tokens, expected_dim)` with tokens >= 1.
    max_elements: more elements than this is RESOURCE_EXHAUSTED.
    allowed: the wire dtypes this receiver accepts (default: all of WIRE_DTYPES).
    name: the field name used in error messages ("inputs", "grad_outputs").
    shm: how this receiver reads a tensor whose bytes are in shared memory (`msg.shm`), e.g.
        `subnet.shm.ShmAttachments.read`; None = it takes none (FAILED_PRECONDITION: resend inline).

    fp32 shares memory with `msg.data` (read-only: do not modify the result in place). A tensor
    from shared memory is a copy (the region is the sender's and is reused after the call), except
    with `shm_copy=False`, for a receiver that is done with it before it answers the call.
    """
    bad = grpc.StatusCode.INVALID_ARGUMENT
    dtype = msg.dtype
    if dtype not in DTYPE_NAMES:
        raise TensorError(bad, f"{name} has dtype {wire_dtype_name(dtype)}; "
                               f"set it to one of {', '.join(WIRE_DTYPES)}")
    allowed_set = set(WIRE_DTYPES.values()) if allowed is None else set(allowed)
    if dtype not in allowed_set:
        accepted = ", ".join(wire_dtype_name(d) for d in sorted(allowed_set))
        raise TensorError(bad, f"{name} has dtype {wire_dtype_name(dtype)}, which this receiver does not "
                               f"accept; send one of: {accepted}")
    shape = list(msg.shape)
    if expected_dim is not None and (len(shape) != 2 or shape[1] != expected_dim):
        raise TensorError(bad, f"{name} has shape {shape}; expected (tokens, {expected_dim})")
    if not shape:
        raise TensorError(bad, f"{name} has no shape; a tensor needs at least one dimension")
    if any(d < 0 for d in shape):
        raise TensorError(bad, f"{name} has negative sizes in shape {shape}")
    numel = math.prod(shape)
    if numel == 0:
        raise TensorError(bad, f"{name} is empty (shape {shape}); send at least one token")
    if max_elements is not None and numel > max_elements:
        raise TensorError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"{name} has {numel} elements (shape {shape}); this receiver accepts at most "
                          f"{max_elements}; split it into smaller requests")
    if msg.HasField("shm"):   # a tensor_pb2.Tensor or a spliced_wire.TensorView
        t = _read_shm(msg, shape, numel, name, shm, shm_copy)
    else:
        data = msg.data
        if dtype == tensor_pb2.DTYPE_INT8_BLOCK64:
            return _decode_int8(data, shape, numel, name)
        itemsize = ITEMSIZE[dtype]
        if len(data) != numel * itemsize:
            raise TensorError(bad, f"{name} has {len(data)} bytes but shape {shape} with dtype "
                                   f"{wire_dtype_name(dtype)} needs {numel * itemsize} "
                                   f"({numel} x {itemsize} bytes); the data does not match the shape")
        t = _view(data, dtype).reshape(shape)
    if t.dtype != torch.float32:
        t = t.float()  # the one copy for bf16/fp16
    if not all_finite(t):
        n_bad = int((~torch.isfinite(t)).sum())
        raise TensorError(bad, f"{name} contains {n_bad} NaN or Inf values; send finite numbers")
    return t


SHM_WIRE_DTYPES = ("fp32", "bf16", "fp16")   # what shared memory carries (int8 is for networks)
# Ends every FAILED_PRECONDITION that means "shared memory does not work between us": the caller
# then sends the same call again with its tensors inside the message.
SHM_INLINE_HINT = "resend with the tensors inline"
# In the FAILED_PRECONDITION of a Backward whose Forward's activations the expert no longer holds (and
# in no other): the caller then sends the Backward again with the Forward's inputs. Other refusals
# of a Backward (a step conflict, gradients that overflow) would only fail again that way.
RESEND_INPUTS_HINT = "resend the Backward with `inputs`"


def shm_dtype(wire_dtype: str) -> torch.dtype:
    """The torch dtype a tensor of `wire_dtype` has in shared memory; ValueError for int8."""
    if wire_dtype not in SHM_WIRE_DTYPES:
        raise ValueError(f"shared memory carries {', '.join(SHM_WIRE_DTYPES)}, not {wire_dtype!r}")
    return _TORCH_DTYPES[WIRE_DTYPES[wire_dtype]]


def shm_tensor(wire_dtype: str, shape: Sequence[int], region: str, offset: int, nbytes: int) -> tensor_pb2.Tensor:
    """A `moe.v1.Tensor` whose bytes were written to `region` at `offset` (see `decode`'s `shm`)."""
    return tensor_pb2.Tensor(dtype=WIRE_DTYPES[wire_dtype], shape=list(shape),
                             shm=tensor_pb2.ShmRef(region=region, offset=offset, nbytes=nbytes))


def _read_shm(msg: tensor_pb2.Tensor, shape: list[int], numel: int, name: str,
              shm: ShmReader | None, copy: bool) -> torch.Tensor:
    """The tensor `msg.shm` points at, copied out of the sender's region (fp32, when `copy`) or still
    a view (bf16/fp16: the caller's .float() is the copy)."""
    from subnet.shm import ShmError, ShmUnavailableError

    bad = grpc.StatusCode.INVALID_ARGUMENT
    if msg.data:
        raise TensorError(bad, f"{name} has both data and shm; send one of them")
    if shm is None:
        raise TensorError(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{name} is in shared memory, which this receiver does not take; {SHM_INLINE_HINT}")
    if msg.dtype not in ITEMSIZE:
        raise TensorError(bad, f"{name}: shared memory carries fp32, bf16 or fp16, not "
                               f"{wire_dtype_name(msg.dtype)}; send it inline")
    if msg.shm.nbytes != numel * ITEMSIZE[msg.dtype]:
        raise TensorError(bad, f"{name} has {msg.shm.nbytes} bytes in shared memory but shape {shape} with "
                               f"dtype {wire_dtype_name(msg.dtype)} needs {numel * ITEMSIZE[msg.dtype]}")
    try:
        view = shm(msg.shm.region, msg.shm.offset, msg.shm.nbytes, _TORCH_DTYPES[msg.dtype], shape)
    except ShmUnavailableError as e:
        raise TensorError(grpc.StatusCode.FAILED_PRECONDITION, f"{name}: {e}; {SHM_INLINE_HINT}") from None
    except ShmError as e:
        raise TensorError(bad, f"{name}: {e}") from None
    return view.clone() if view.dtype == torch.float32 and copy else view


# A read-only buffer up to this size is copied rather than viewed under a warnings filter (2.5 us a
# call here, the time of copying about 25 KiB): a decode step's tensors are a few hundred bytes.
_COPY_READONLY_BELOW = 16 << 10


def _view(data: bytes | bytearray | memoryview, dtype: int) -> torch.Tensor:
    """The bytes as a 1-D tensor of the wire dtype, without a copy on little-endian hosts."""
    view_dtype, np_dtype = _NUMPY_VIEW[dtype]
    if not _LITTLE_ENDIAN_HOST:
        swapped = np.frombuffer(data, dtype=np_dtype).astype(np_dtype[1:])
        return torch.from_numpy(swapped).view(_TORCH_DTYPES[dtype])
    if isinstance(data, bytes) and len(data) <= _COPY_READONLY_BELOW:
        data = bytearray(data)   # protobuf's `bytes` of a small tensor: a copy costs less than the filter below
    if isinstance(data, bytearray) or (isinstance(data, memoryview) and not data.readonly):
        t = torch.frombuffer(data, dtype=view_dtype)   # what moe-frames receives: no warning to silence
    else:
        with warnings.catch_warnings():   # costs more than the rest of a decode-sized call's decoding
            # `bytes` is read-only; torch warns that writing would be undefined. We never write.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            t = torch.frombuffer(data, dtype=view_dtype)
    return t.view(_TORCH_DTYPES[dtype])


# ---- int8: blockwise absmax quantization (layout in tensor.proto) ------------------------------

def int8_nbytes(numel: int) -> int:
    """Bytes of a DTYPE_INT8_BLOCK64 tensor of `numel` values: fp32 block scales, then int8 values."""
    return 4 * -(-numel // INT8_BLOCK) + numel


def _encode_int8(t: torch.Tensor, check_finite: str | None) -> WireTensor:
    t = t.detach().to(device="cpu", dtype=torch.float32).contiguous()
    flat = t.reshape(-1)
    n = flat.numel()
    n_blocks = -(-n // INT8_BLOCK)
    pad = n_blocks * INT8_BLOCK - n
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(n_blocks, INT8_BLOCK)
    # amax and amin apart: no |x| temporary the size of the tensor (and torch.aminmax is 7x slower here).
    scale = torch.maximum(blocks.amax(dim=1), blocks.amin(dim=1).neg_()).div_(_INT8_MAX)   # (n_blocks,)
    if check_finite and not _scales_ok(scale):
        raise TensorError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{check_finite} would not be finite in int8 (NaN/Inf, or values near the fp32 "
                          f"limit); send finite numbers or use a float wire dtype")
    # Divide (not multiply by 1/scale): 1/scale overflows for subnormal scales. Zero blocks divide by 1.
    q = blocks / torch.where(scale == 0, 1.0, scale)[:, None]
    q = q.round_().clamp_(-_INT8_MAX, _INT8_MAX).view(-1)[:n]
    out = torch.empty(4 * n_blocks + n, dtype=torch.uint8)
    out[4 * n_blocks:].view(torch.int8).copy_(q)   # exact: q holds integers in [-127, 127]
    out[:4 * n_blocks].copy_(torch.from_numpy(scale.numpy().astype("<f4").view(np.uint8)))
    array = out.numpy()
    return WireTensor(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT8_BLOCK64, shape=list(t.shape)),
                      memoryview(array).cast("B"), array)


def _decode_int8(data: bytes | bytearray | memoryview, shape: list[int], numel: int, name: str) -> torch.Tensor:
    """The float32 tensor of an int8 message whose shape was checked; checks the byte count and scales."""
    n_blocks = -(-numel // INT8_BLOCK)
    if len(data) != int8_nbytes(numel):
        raise TensorError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{name} has {len(data)} bytes but shape {shape} with dtype int8 needs "
                          f"{int8_nbytes(numel)} ({n_blocks} x 4-byte block scales + {numel} x 1 byte); "
                          f"the data does not match the shape")
    # The scales are 1/16 of the bytes: copying them (and fixing their byte order) costs little.
    scale = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=n_blocks).astype(np.float32))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable")  # we never write
        q = torch.frombuffer(data, dtype=torch.int8, count=numel, offset=4 * n_blocks)
    if not _scales_ok(scale):
        n_bad = int((~torch.isfinite(scale * _INT8_MAX)).sum())
        raise TensorError(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{name} has {n_bad} block scales that are NaN or Inf or would overflow fp32 "
                          f"(|scale| * 127 > 3.4e38); send finite numbers")
    out = torch.empty(n_blocks * INT8_BLOCK)
    out[:numel].copy_(q)                              # the one copy: int8 -> fp32
    out[numel:].zero_()                               # the short last block's padding
    out.view(n_blocks, INT8_BLOCK).mul_(scale[:, None])
    return out[:numel].view(shape)


def _scales_ok(scale: torch.Tensor) -> bool:
    """Every value q * scale (|q| <= 127) is finite: fp32 rounding is monotonic, so the largest
    |scale| * 127 bounds them all; NaN propagates through amax."""
    return scale.numel() == 0 or bool(torch.isfinite(scale.abs().amax() * _INT8_MAX))
