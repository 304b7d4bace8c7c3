"""moe-frames/1 by hand, for tests that play a client the library would not be (subnet/frames/protocol.py)."""

import socket

import grpc

from subnet.frames import protocol as p


def frame(method: str, metadata, body: bytes, timeout_s: float = 10.0) -> bytes:
    """One request frame, whole."""
    name, meta = method.encode(), p.encode_metadata(metadata)
    return p.request_header(name, meta, timeout_s, len(body)) + name + meta + body


def read_response(conn: socket.socket) -> tuple[grpc.StatusCode, str, bytes]:
    """(status, details, body) of the next response frame on `conn` (its answer tag, if any, read and dropped)."""
    return read_answer(conn)[:3]


def read_answer(conn: socket.socket) -> tuple[grpc.StatusCode, str, bytes, bytes | None]:
    """(status, details, body, answer tag or None: a session MAC or a signature) of the next response frame."""
    header = recv_exactly(conn, p.RESPONSE.size)
    code, details_len, body_len = p.parse_response_header(header, 1 << 30)
    tag = recv_exactly(conn, p.answer_tag_bytes(header)) or None
    return code, recv_exactly(conn, details_len).decode(), recv_exactly(conn, body_len), tag


def recv_exactly(conn: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        assert chunk, "the server closed the connection"
        out += chunk
    return out
