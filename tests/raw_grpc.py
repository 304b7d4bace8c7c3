"""One gRPC call with raw bytes in and out on a sync channel, whatever the body holds: for tests that
send what no generated stub would (garbage, truncated or hand-signed bodies)."""

from __future__ import annotations

import grpc


def raw_call(channel: grpc.Channel, method: str, body: bytes, streamed: bool, metadata=(), timeout_s: float = 10):
    """The answer's bytes (a list of them for a server-streaming `method`), or the grpc.RpcError."""
    call = (channel.unary_stream if streamed else channel.unary_unary)(
        method, request_serializer=None, response_deserializer=None)
    try:
        answer = call(body, timeout=timeout_s, metadata=metadata)
        return list(answer) if streamed else answer
    except grpc.RpcError as e:
        return e
