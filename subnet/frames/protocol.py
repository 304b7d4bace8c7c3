"""moe-frames/1: one moe.v1 unary call per frame over a plain TCP connection, beside gRPC.

Why: a tensor through grpcio's Python layers costs two copies per side that a socket does not
(`python -m bench --only wire`: grpc_bytes_ratio about 0.5 of the raw socket), and a unary call
costs about 0.5 ms of round trip where a socket costs 0.1 (decode steps make one per MoE layer).
The expert service offers this transport on a second port (InfoResponse.frames_port) for the
calls that carry tensors: Forward, ForwardMany, Backward. Everything else, and every client that
does not speak it, uses gRPC; the messages, the signatures and the status codes are the same.

A connection carries one call at a time: request frame, then response frame, then the next.

Request frame (little-endian):
    magic "MOEF" | version u8 = 1 | flags u8 = 0 | method length u16 | metadata length u32
    | timeout ms u32 (0 = the server's limit) | body length u64
    | method (UTF-8, e.g. "/moe.v1.Expert/Forward") | metadata | body (the serialized request)
Metadata: entry count u16, then per entry key length u16, key (ASCII), value length u32,
    value (UTF-8; raw bytes for keys ending in "-bin"), i.e. what gRPC metadata would carry,
    signature entries (subnet.auth) and `traceparent` included.
Response frame:
    magic "MOER" | version u8 = 1 | status u8 (grpc.StatusCode value) | flags u16
    | details length u32 | body length u64 | [answer tag] | details (UTF-8) | body (the serialized response)
Flags (at most one): FLAG_ANSWER_MAC (1): the answer tag is ANSWER_MAC_BYTES of the session's MAC
    of this answer (subnet.auth.sessions; only on a connection whose session asked for them);
    FLAG_ANSWER_SIGNATURE (2): the answer tag is the receiver's ANSWER_SIGNATURE_BYTES signature of
    its OK answer to a signed request (subnet.auth.payload.answer_payload; what gRPC carries in the
    trailing metadata entry x-moe-answer-signature-bin). Other bits are 0.

A frame that breaks these rules (bad magic or version, lengths over the limits below or over the
server's message limit) gets one error response (INVALID_ARGUMENT or RESOURCE_EXHAUSTED, the
details saying which rule) and the connection is closed, since the stream cannot be resynced.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import grpc

REQUEST_MAGIC, RESPONSE_MAGIC, VERSION = b"MOEF", b"MOER", 1
# The moe.v1.Expert calls this transport carries (those with tensors); the others stay on gRPC.
EXPERT_RPCS = ("Forward", "ForwardMany", "Backward")
REQUEST = struct.Struct("<4sBBHIIQ")
RESPONSE = struct.Struct("<4sBBHIQ")
MAX_METHOD_BYTES = 256
MAX_METADATA_BYTES = 16 << 10
MAX_DETAILS_BYTES = 64 << 10
FLAG_ANSWER_MAC, FLAG_ANSWER_SIGNATURE = 1, 2
ANSWER_MAC_BYTES = 32         # subnet.auth.sessions.ANSWER_MAC_BYTES
ANSWER_SIGNATURE_BYTES = 64   # sr25519
_TAG_BYTES = {0: 0, FLAG_ANSWER_MAC: ANSWER_MAC_BYTES, FLAG_ANSWER_SIGNATURE: ANSWER_SIGNATURE_BYTES}
# Starts the details of the RESOURCE_EXHAUSTED a server answers when it has too many connections or
# request bytes in hand: it read no more than the header, so the caller may send the call over gRPC.
BUSY = "moe-frames: busy"
_COUNT, _KEY, _VALUE = struct.Struct("<H"), struct.Struct("<H"), struct.Struct("<I")
CODES = {code.value[0]: code for code in grpc.StatusCode}

Metadata = Sequence[tuple[str, str | bytes]]


class FrameError(grpc.RpcError):
    """A failed call on this transport, shaped like grpc's: `.code()` and `.details()`."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class ProtocolError(Exception):
    """A frame answered before its call ran: the peer broke moe-frames/1 (`reason` "protocol"), or the
    server is "busy" or "shutting_down"; `code` is what to answer it with."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "protocol"):
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason


RPC_SYSTEM = "moe-frames"   # rpc.system of the trace spans of calls over this transport (both ends)
JOIN_BELOW_BYTES = 64 << 10   # a smaller body goes out joined to its header: one send, one copy of little


def buffers(prefix: tuple[bytes, ...], body: bytes) -> list[bytes]:
    """What to send for a frame, in order: a small body joined to the header parts in one buffer, a
    larger one as it is (no copy) after them."""
    if len(body) < JOIN_BELOW_BYTES:
        return [b"".join((*prefix, body))]
    return [b"".join(prefix), body]


def request_header(method: bytes, metadata: bytes, timeout_s: float | None, body_len: int) -> bytes:
    timeout_ms = 0 if timeout_s is None else max(1, min(int(timeout_s * 1000), 2**32 - 1))
    return REQUEST.pack(REQUEST_MAGIC, VERSION, 0, len(method), len(metadata), timeout_ms, body_len)


def parse_request_header(header: bytes, max_body_bytes: int) -> tuple[int, int, float | None, int]:
    """(method length, metadata length, timeout in s or None, body length); ProtocolError if invalid."""
    magic, version, _flags, method_len, metadata_len, timeout_ms, body_len = REQUEST.unpack(header)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if magic != REQUEST_MAGIC:
        raise ProtocolError(bad, "not a moe-frames request (bad magic); this port speaks moe-frames/1, "
                                 "gRPC is on the service's main port")
    if version != VERSION:
        raise ProtocolError(bad, f"moe-frames version {version} is not supported; this server speaks {VERSION}")
    if not 0 < method_len <= MAX_METHOD_BYTES:
        raise ProtocolError(bad, f"method name of {method_len} bytes; 1 to {MAX_METHOD_BYTES} allowed")
    if metadata_len > MAX_METADATA_BYTES:
        raise ProtocolError(bad, f"metadata of {metadata_len} bytes; at most {MAX_METADATA_BYTES} allowed")
    if body_len > max_body_bytes:
        raise ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"request body of {body_len} bytes; this server accepts at most {max_body_bytes} "
                            f"(EXPERT_MAX_MESSAGE_MB); split the batch")
    return method_len, metadata_len, (timeout_ms / 1000 if timeout_ms else None), body_len


def response_header(code: grpc.StatusCode, details: bytes, body_len: int, answer_tag: bytes = b"") -> bytes:
    """The response header; with `answer_tag` (sent right after it: a session MAC or an answer signature,
    told apart by its size), the flag that says which."""
    flags = {0: 0, ANSWER_MAC_BYTES: FLAG_ANSWER_MAC, ANSWER_SIGNATURE_BYTES: FLAG_ANSWER_SIGNATURE}[len(answer_tag)]
    return RESPONSE.pack(RESPONSE_MAGIC, VERSION, code.value[0], flags, len(details), body_len)


def answer_tag_bytes(header: bytes) -> int:
    """How many bytes of answer tag follow a (parsed, valid) response header: 0, ANSWER_MAC_BYTES (a session
    MAC) or ANSWER_SIGNATURE_BYTES (a signature)."""
    return _TAG_BYTES[RESPONSE.unpack(header)[3]]


def parse_response_header(header: bytes, max_body_bytes: int) -> tuple[grpc.StatusCode, int, int]:
    """(status, details length, body length); ProtocolError when the server broke the protocol."""
    magic, version, code, flags, details_len, body_len = RESPONSE.unpack(header)
    bad = grpc.StatusCode.INTERNAL
    if magic != RESPONSE_MAGIC or version != VERSION:
        raise ProtocolError(bad, "the answer is not a moe-frames/1 response")
    if code not in CODES:
        raise ProtocolError(bad, f"the answer has an unknown status {code}")
    if flags not in _TAG_BYTES:
        raise ProtocolError(bad, f"the answer has unknown flags {flags:#x}")
    if details_len > MAX_DETAILS_BYTES or body_len > max_body_bytes:
        raise ProtocolError(bad, f"the answer is too large ({details_len} bytes of details, {body_len} of body)")
    return CODES[code], details_len, body_len


def encode_metadata(metadata: Metadata) -> bytes:
    parts = [_COUNT.pack(len(metadata))]
    for key, value in metadata:
        k = key.encode("ascii")
        v = value if isinstance(value, bytes) else value.encode("utf-8")
        parts += [_KEY.pack(len(k)), k, _VALUE.pack(len(v)), v]
    return b"".join(parts)


def decode_metadata(data: bytes) -> tuple[tuple[str, str | bytes], ...]:
    """The entries of a metadata block; ProtocolError(INVALID_ARGUMENT) when it is malformed."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not data:
        return ()
    try:
        (count,), pos, out = _COUNT.unpack_from(data, 0), _COUNT.size, []
        for _ in range(count):
            (key_len,) = _KEY.unpack_from(data, pos)
            key = bytes(data[pos + 2:pos + 2 + key_len]).decode("ascii")
            pos += 2 + key_len
            (value_len,) = _VALUE.unpack_from(data, pos)
            raw = bytes(data[pos + 4:pos + 4 + value_len])
            if len(raw) != value_len or len(key) != key_len:
                raise ProtocolError(bad, "metadata entry runs past the end of the metadata block")
            pos += 4 + value_len
            out.append((key, raw if key.endswith("-bin") else raw.decode("utf-8")))
    except (struct.error, UnicodeDecodeError) as e:
        raise ProtocolError(bad, f"malformed metadata block: {e}") from None
    if pos != len(data):
        raise ProtocolError(bad, f"metadata block has {len(data) - pos} bytes after its {count} entries")
    return tuple(out)
