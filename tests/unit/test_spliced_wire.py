"""subnet.spliced_wire: spliced bodies are ordinary moe.v1 protobuf, the parser gives what upb gives
(same message, same DecodeError) for any bytes, and the tensor bytes are not copied on the way in."""

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from subnet.spliced_wire import (
    MAX_SCANNED_FIELDS,
    MIN_SPLICE_BYTES,
    SplicedMessage,
    SplicedParser,
    TensorView,
    build,
    serialize,
)
from subnet.tensor_codec import TensorError, decode, encode, encode_view
from subnet.wire.v1 import expert_pb2, tensor_pb2

BIG = (MIN_SPLICE_BYTES // 64 + 8, 64)   # rows enough for the parser to splice, int8 included


def _x(shape=BIG, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _plain(parsed):
    """A SplicedMessage as the ordinary message it stands for (tensor bytes copied back in)."""
    if not isinstance(parsed, SplicedMessage):
        return parsed
    message = type(parsed.message)()
    message.CopyFrom(parsed.message)
    for field in message.DESCRIPTOR.fields:
        value = getattr(parsed, field.name)
        if isinstance(value, TensorView):
            getattr(message, field.name).data = bytes(value.data)
    return message


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16", "int8"])
def test_a_built_body_is_the_message_protobuf_would_have_sent(dtype):
    x, g = _x(seed=1), _x(seed=2)
    body = build(expert_pb2.BackwardRequest, expert_uid="0.1", call_id="c/0", step=7, session_id="s",
                 grad_outputs=encode_view(g, dtype), inputs=encode_view(x, dtype))
    assert isinstance(body, bytes)
    expected = expert_pb2.BackwardRequest(expert_uid="0.1", call_id="c/0", step=7, session_id="s",
                                          grad_outputs=encode(g, dtype), inputs=encode(x, dtype))
    assert expert_pb2.BackwardRequest.FromString(body) == expected          # what any moe.v1 client reads
    parsed = SplicedParser(expert_pb2.BackwardRequest)(body)
    assert isinstance(parsed, SplicedMessage)
    assert _plain(parsed) == expected
    assert parsed.expert_uid == "0.1" and parsed.step == 7 and parsed.HasField("inputs")
    assert not parsed.HasField("reply_shm")
    assert torch.equal(decode(parsed.inputs), decode(expected.inputs))
    assert torch.equal(decode(parsed.grad_outputs), decode(expected.grad_outputs))


def test_without_wire_tensors_build_returns_the_message_and_serialize_passes_bytes():
    message = build(expert_pb2.ForwardRequest, expert_uid="0.0", inputs=encode(_x((2, 4))))
    assert isinstance(message, expert_pb2.ForwardRequest)
    assert serialize(message) == message.SerializeToString()
    assert serialize(b"abc") == b"abc"


def test_the_parser_reads_plain_protobuf_bodies_too_and_shares_their_memory():
    x = _x()
    body = expert_pb2.ForwardRequest(expert_uid="0.2", inputs=encode(x)).SerializeToString()
    parsed = SplicedParser(expert_pb2.ForwardRequest)(body)
    assert isinstance(parsed, SplicedMessage)
    t = decode(parsed.inputs, expected_dim=x.shape[1])
    assert torch.equal(t, x)
    body_at = np.frombuffer(body, dtype=np.uint8).ctypes.data
    assert body_at <= t.data_ptr() < body_at + len(body)   # a view into the received body: no copy


def test_small_bodies_are_parsed_the_plain_way():
    body = build(expert_pb2.ForwardRequest, expert_uid="0.0", inputs=encode_view(_x((4, 8))))
    assert len(body) < MIN_SPLICE_BYTES
    assert isinstance(SplicedParser(expert_pb2.ForwardRequest)(body), expert_pb2.ForwardRequest)


def test_a_tensor_whose_data_comes_twice_is_left_to_upb_which_keeps_the_last():
    first, second = _x(seed=3), _x(seed=4)
    body = (expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(first)).SerializeToString()
            + expert_pb2.ForwardRequest(inputs=tensor_pb2.Tensor(data=encode(second).data)).SerializeToString())
    parsed = SplicedParser(expert_pb2.ForwardRequest)(body)
    assert isinstance(parsed, expert_pb2.ForwardRequest)
    assert torch.equal(decode(parsed.inputs), second)


def test_a_non_minimal_length_varint_is_cut_where_it_really_is():
    x = _x(seed=5)
    header = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(x.shape)).SerializeToString()
    data = x.numpy().tobytes()
    padded_len = _padded_varint(len(data))              # valid protobuf, one byte longer than needed
    inner = header + bytes([3 << 3 | 2]) + padded_len + data
    body = expert_pb2.ForwardRequest(expert_uid="0.0").SerializeToString() + bytes([2 << 3 | 2]) + \
        _padded_varint(len(inner)) + inner
    expected = expert_pb2.ForwardRequest.FromString(body)
    parsed = SplicedParser(expert_pb2.ForwardRequest)(body)
    assert _plain(parsed) == expected
    assert torch.equal(decode(parsed.inputs), x)


def test_a_body_of_many_small_fields_is_not_scanned_field_by_field():
    x = _x((8, 8))
    many = b"".join(bytes([4 << 3]) + bytes([1]) for _ in range(MAX_SCANNED_FIELDS * 4))   # step = 1, repeated
    body = expert_pb2.ForwardRequest(expert_uid="0.0", inputs=encode(x)).SerializeToString() + many
    body += expert_pb2.ForwardRequest(call_id="p" * MIN_SPLICE_BYTES).SerializeToString()
    parsed = SplicedParser(expert_pb2.ForwardRequest)(body)
    assert isinstance(parsed, expert_pb2.ForwardRequest)   # fell back to FromString
    assert parsed == expert_pb2.ForwardRequest.FromString(body)


def test_shm_and_data_together_are_refused_as_before():
    header = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=list(BIG),
                               shm=tensor_pb2.ShmRef(region="r", offset=0, nbytes=4 * BIG[0] * BIG[1]))
    body = expert_pb2.ForwardRequest(expert_uid="0.0", inputs=header).SerializeToString() + \
        expert_pb2.ForwardRequest(inputs=encode(_x())).SerializeToString()
    parsed = SplicedParser(expert_pb2.ForwardRequest)(body)
    assert isinstance(parsed, SplicedMessage) and parsed.inputs.HasField("shm")
    with pytest.raises(TensorError, match="both data and shm"):
        decode(parsed.inputs, shm=lambda *a: None)


_VALID = build(expert_pb2.ForwardRequest, expert_uid="0.3", call_id="c", step=2, training=True,
               inputs=encode_view(_x(seed=9)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(0, 64), st.booleans())
def test_any_mutated_body_parses_exactly_as_upb_parses_it(edits, cut, truncate):
    """Bytes flipped in the header region (keys, lengths, varints) and/or a truncated end: the
    parser must give the same message as FromString, or the same DecodeError."""
    body = bytearray(_VALID)
    for position, value in edits:
        body[position % 220] = value          # the header region: keys, lengths, shape, the data key
    if truncate:
        del body[len(body) - cut - 1:]
    body = bytes(body)
    try:
        expected = expert_pb2.ForwardRequest.FromString(body)
    except DecodeError:
        with pytest.raises(DecodeError):
            SplicedParser(expert_pb2.ForwardRequest)(body)
        return
    assert _plain(SplicedParser(expert_pb2.ForwardRequest)(body)) == expected


def _padded_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out += bytes([value | 0x80, 0x00])   # one redundant continuation byte
    return bytes(out)
