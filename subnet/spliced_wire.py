"""moe.v1 messages whose tensor bytes skip protobuf's copies, on both sides of a call.

    body = build(expert_pb2.ForwardRequest, expert_uid="0.3", inputs=encode_view(x, "fp32"))   # bytes
    parse = SplicedParser(expert_pb2.ForwardRequest)
    request = parse(body)            # request.inputs.data is a view of `body`, not a copy
    x = decode(request.inputs, expected_dim=256)

Why: upb copies a `bytes` field going in (message construction, then serialization) and coming
out (parsing, then every access to `.data`), so a tensor crossed four or five full copies per
hop besides gRPC's own (`python -m bench --only wire`, `codec_ms_64MiB`). Here the sender makes
one copy (the join that produces the body gRPC needs as `bytes`) and the receiver none (the
tensor is `torch.frombuffer` over the received body; read-only, as `decode` already says).

The wire does not change: `build` writes ordinary protobuf. The message without its tensor
bytes is serialized as usual, and each tensor's `data` follows as one more occurrence of the
tensor field, holding only field 3 (`data`). Parsers merge repeated occurrences of a message
field, so any moe.v1 client reads the same message it would have read from
`SerializeToString` (tested against upb). `SplicedParser` scans the top-level fields, cuts each
tensor's one `data` field out of the body, lets upb parse (and so validate) the rest, and hands
the data back as a memoryview. Anything it does not expect (a tensor whose data comes twice,
groups, a truncated varint, a length past the end) goes to plain `FromString`, which gives the
same message or the same DecodeError as before: hostile bytes get no new path. Bodies under
`MIN_SPLICE_BYTES` are parsed the plain way too (a few-KiB copy costs less than the scan).
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.message import Message

from subnet.wire.v1 import tensor_pb2

MIN_SPLICE_BYTES = 32 << 10
# Fields the scan reads before it leaves a body to FromString: real requests have under ten, and
# a body of millions of tiny fields (unpacked shape entries) must not cost a Python loop each.
MAX_SCANNED_FIELDS = 64
_TENSOR = tensor_pb2.Tensor.DESCRIPTOR.full_name
_DATA_FIELD = tensor_pb2.Tensor.DESCRIPTOR.fields_by_name["data"].number
_LEN = 2   # protobuf wire type of bytes and embedded messages


class WireTensor:
    """A tensor ready for the wire: its `header` (dtype and shape, no data) and its `payload`, a
    byte view of the tensor's own memory (`subnet.tensor_codec.encode_view`). It keeps the tensor
    alive; do not modify the tensor in place before the message carrying it is sent."""

    __slots__ = ("header", "payload", "_owner")

    def __init__(self, header: tensor_pb2.Tensor, payload: memoryview, owner: Any):
        self.header, self.payload, self._owner = header, payload, owner

    @property
    def nbytes(self) -> int:
        return self.payload.nbytes

    def to_message(self) -> tensor_pb2.Tensor:
        """The same tensor as an ordinary message (copies the bytes)."""
        message = tensor_pb2.Tensor()
        message.CopyFrom(self.header)
        message.data = self.payload.tobytes()
        return message


def build(cls: type[Message], **fields: Any) -> Message | bytes:
    """`cls(**fields)`, except that tensor fields given as `WireTensor` are spliced in: the result is
    then the serialized message (bytes), the payloads copied once. Without any, the message itself."""
    spliced = {name: value for name, value in fields.items() if isinstance(value, WireTensor)}
    if not spliced:
        return cls(**fields)
    rest = cls(**{name: value for name, value in fields.items() if name not in spliced})
    parts: list[bytes | memoryview] = [rest.SerializeToString()]
    numbers = {name: number for number, name in _tensor_fields(cls).items()}
    for name, tensor in spliced.items():
        if name not in numbers:
            raise TypeError(f"{cls.DESCRIPTOR.full_name}.{name} is not a moe.v1.Tensor field")
        header = tensor.header.SerializeToString()
        data_key = _key(_DATA_FIELD) + _varint(tensor.nbytes)
        parts += [_key(numbers[name]), _varint(len(header) + len(data_key) + tensor.nbytes), header, data_key,
                  tensor.payload]
    return b"".join(parts)


def serialize(message: Message | bytes) -> bytes:
    """A response or request serializer that also passes `build`'s bytes through."""
    return message if isinstance(message, bytes) else message.SerializeToString()


class TensorView:
    """A parsed moe.v1.Tensor whose `data` is a view of the received body (what `decode` reads)."""

    __slots__ = ("_header", "data")

    def __init__(self, header: tensor_pb2.Tensor, data: memoryview):
        self._header, self.data = header, data

    @property
    def dtype(self) -> int:
        return self._header.dtype

    @property
    def shape(self):
        return self._header.shape

    @property
    def shm(self) -> tensor_pb2.ShmRef:
        return self._header.shm

    def HasField(self, name: str) -> bool:   # noqa: N802 (protobuf's name)
        return self._header.HasField(name)


class SplicedMessage:
    """A parsed message whose tensor fields are `TensorView`s; every other attribute is the message's."""

    __slots__ = ("message", "_tensors")

    def __init__(self, message: Message, tensors: dict[str, TensorView]):
        self.message, self._tensors = message, tensors

    def __getattr__(self, name: str) -> Any:
        tensor = self._tensors.get(name)
        return tensor if tensor is not None else getattr(self.message, name)

    def HasField(self, name: str) -> bool:   # noqa: N802
        return name in self._tensors or self.message.HasField(name)


class SplicedParser:
    """`cls.FromString`, without copying the bytes of its moe.v1.Tensor fields (see the module doc)."""

    def __init__(self, cls: type[Message]):
        self.cls = cls
        self.DESCRIPTOR = cls.DESCRIPTOR   # unparsable-request messages name the type from this
        self._tensor_fields = _tensor_fields(cls)

    def __call__(self, body: bytes) -> Message | SplicedMessage:
        if len(body) < MIN_SPLICE_BYTES or not self._tensor_fields:
            return self.cls.FromString(body)
        cut = _cut_tensor_data(body, self._tensor_fields)
        if cut is None:
            return self.cls.FromString(body)
        rest, spans = cut
        message = self.cls.FromString(rest)
        view = memoryview(body)
        names = self._tensor_fields
        return SplicedMessage(message, {names[number]: TensorView(getattr(message, names[number]), view[start:end])
                                        for number, (start, end) in spans.items()})


def _cut_tensor_data(body: bytes, tensor_fields: dict[int, str]
                     ) -> tuple[bytes, dict[int, tuple[int, int]]] | None:
    """(body without the tensors' data fields, {field number: (start, end) of its data in body}),
    or None when the body is anything but plain top-level fields with at most one data per tensor."""
    parts: list[bytes | memoryview] = []
    spans: dict[int, tuple[int, int]] = {}
    view = memoryview(body)
    kept = 0
    try:
        for key_start, number, wire_type, start, end in _fields(body, 0, len(body)):
            if wire_type != _LEN or number not in tensor_fields:
                continue
            data = _data_span(body, start, end)
            if data is None:
                continue
            if number in spans:
                return None   # a second data for one tensor: upb's merge decides, not us
            data_key, data_start, data_end = data
            spans[number] = (data_start, data_end)
            inner = (data_key - start) + (end - data_end)
            parts += [view[kept:key_start], _key(number), _varint(inner), view[start:data_key], view[data_end:end]]
            kept = end
    except _Unexpected:
        return None
    if not spans:
        return None
    parts.append(view[kept:])
    return b"".join(parts), spans


def _data_span(body: bytes, start: int, end: int) -> tuple[int, int, int] | None:
    """Where the `data` field of the Tensor encoded in body[start:end] is: (start of its key, start
    of its bytes, end); None when it has none. Raises _Unexpected when it has data twice."""
    found = None
    for key_start, number, wire_type, data_start, data_end in _fields(body, start, end):
        if number == _DATA_FIELD and wire_type == _LEN:
            if found is not None:
                raise _Unexpected
            found = (key_start, data_start, data_end)
    return found


class _Unexpected(Exception):
    """A body the scan leaves to FromString."""


def _fields(body: bytes, pos: int, end: int):
    """(key start, field number, wire type, value start, value end) of each field in body[pos:end];
    raises _Unexpected on anything malformed, on groups, and past MAX_SCANNED_FIELDS fields."""
    for _ in range(MAX_SCANNED_FIELDS):
        if pos >= end:
            return
        key, at = _read_varint(body, pos, end)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, value_end = _read_varint(body, at, end)
        elif wire_type == 1:
            value_end = at + 8
        elif wire_type == 5:
            value_end = at + 4
        elif wire_type == _LEN:
            length, at = _read_varint(body, at, end)
            value_end = at + length
        else:
            raise _Unexpected   # groups (3, 4) or invalid
        if value_end > end:
            raise _Unexpected
        yield pos, number, wire_type, at, value_end
        pos = value_end
    if pos < end:
        raise _Unexpected


def _read_varint(body: bytes, pos: int, end: int) -> tuple[int, int]:
    """(value, position after it); raises _Unexpected when it is truncated or longer than 10 bytes."""
    value, shift = 0, 0
    for i in range(pos, min(end, pos + 10)):
        byte = body[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise _Unexpected


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LEN)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tensor_fields(cls: type[Message]) -> dict[int, str]:
    """{field number: name} of `cls`'s moe.v1.Tensor fields."""
    return {f.number: f.name for f in cls.DESCRIPTOR.fields
            if f.message_type is not None and f.message_type.full_name == _TENSOR}


class SplicingChannel:
    """Wraps a channel (or a `subnet.auth.SigningChannel`) for generated stubs: requests may be `build`'s
    bytes, and responses with moe.v1.Tensor fields are parsed by a `SplicedParser`."""

    def __init__(self, channel: Any):
        self.channel = channel

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return self.channel.unary_unary(method, _passing_bytes(request_serializer), _spliced(response_deserializer),
                                        _registered_method=_registered_method)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        return self.channel.unary_stream(method, _passing_bytes(request_serializer), response_deserializer,
                                         _registered_method=_registered_method)


def _passing_bytes(serializer):
    if serializer is None:
        return None
    return lambda message: message if isinstance(message, bytes) else serializer(message)


def _spliced(deserializer):
    """A SplicedParser for `Cls.FromString` when Cls has tensor fields; else `deserializer` itself."""
    cls = getattr(deserializer, "__self__", None)
    if isinstance(cls, type) and issubclass(cls, Message) and _tensor_fields(cls):
        return SplicedParser(cls)
    return deserializer


def spliced_handlers(handlers: dict[str, Any]) -> dict[str, Any]:
    """A service's `grpc.RpcMethodHandler`s with spliced parsing of requests that carry tensors and a
    response serializer that passes `build`'s bytes through (for `add_generic_rpc_handlers`)."""
    return {name: handler._replace(request_deserializer=_spliced(handler.request_deserializer),
                                   response_serializer=serialize)
            for name, handler in handlers.items()}


def add_spliced_servicer(add_to_server, servicer: Any, server: Any) -> dict[str, Any]:
    """`add_to_server(servicer, server)` (a generated `add_XServicer_to_server`), with `spliced_handlers`.
    Returns the handlers by method path ("/moe.v1.Expert/Forward"), e.g. for subnet.frames."""
    captured = _Captured()
    add_to_server(servicer, captured)
    by_path = {}
    for service, handlers in captured.services.items():
        handlers = spliced_handlers(handlers)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)
        by_path.update({f"/{service}/{name}": handler for name, handler in handlers.items()})
    return by_path


class _Captured:
    """Stands in for a server while a generated function registers its handlers."""

    def __init__(self):
        self.services: dict[str, dict[str, Any]] = {}

    def add_generic_rpc_handlers(self, handlers) -> None:
        pass   # the same handlers come again, by service name, in add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.services[service] = dict(handlers)
