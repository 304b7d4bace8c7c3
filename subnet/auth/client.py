"""Signed requests on the client side: a channel wrapper that any generated stub accepts.

    stub = expert_pb2_grpc.ExpertStub(SigningChannel(channel, identity, receiver="5F..."))
    stub.Forward.future(request, timeout=2.0, metadata=tracing_metadata)    # signed

Each request is serialized once: the wrapper serializes it, signs the sha256 of those
bytes (`subnet.auth.payload`), and sends the same bytes through a multi-callable whose
serializer is the identity. `receiver` is the receiver's hotkey, or a callable asked on
every call (the router's replica set knows which hotkey serves an endpoint right now);
when it yields no hotkey the request goes unsigned (a receiver with auth on refuses it,
with UNAUTHENTICATED). With `identity=None` the stub gets the channel's own multi-callables.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc

from subnet.auth.payload import sign_metadata
from subnet.identity import Identity

log = logging.getLogger(__name__)

Receiver = str | Callable[[], str | None] | None
_WARN_INTERVAL_S = 10.0


class SigningChannel:
    """Wraps a grpc.Channel for generated stubs (unary-request methods); signs with `identity`."""

    def __init__(self, channel: grpc.Channel, identity: Identity | None, receiver: Receiver):
        self.channel = channel
        self.identity = identity
        self._receiver = receiver
        self._warned_at = float("-inf")

    def unary_unary(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        if self.identity is None:
            return self.channel.unary_unary(method, request_serializer, response_deserializer,
                                            _registered_method=_registered_method)
        raw = self.channel.unary_unary(method, None, response_deserializer, _registered_method=_registered_method)
        return _SignedUnaryUnary(self, method, request_serializer, raw)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        if self.identity is None:
            return self.channel.unary_stream(method, request_serializer, response_deserializer,
                                             _registered_method=_registered_method)
        raw = self.channel.unary_stream(method, None, response_deserializer, _registered_method=_registered_method)
        return _SignedUnaryStream(self, method, request_serializer, raw)

    def receiver(self) -> str | None:
        """The receiver's hotkey now."""
        return self._receiver() if callable(self._receiver) else self._receiver

    def sign(self, method: str, request, serializer, metadata) -> tuple[bytes, tuple]:
        """(bytes to send, metadata with the signature entries) for one call."""
        body = serializer(request) if serializer is not None else request
        receiver = self.receiver()
        extra = tuple(metadata or ())
        if receiver:
            return body, extra + sign_metadata(self.identity, method, body, receiver)
        now = time.monotonic()
        if now - self._warned_at > _WARN_INTERVAL_S:
            self._warned_at = now
            log.warning("no hotkey known for the receiver of %s; sending it unsigned", method)
        return body, extra


class _SignedUnaryUnary:
    def __init__(self, channel: SigningChannel, method: str, serializer, raw):
        self._channel, self._method, self._serializer, self._raw = channel, method, serializer, raw

    def __call__(self, request, timeout=None, metadata=None, **kwargs):
        body, metadata = self._channel.sign(self._method, request, self._serializer, metadata)
        return self._raw(body, timeout=timeout, metadata=metadata, **kwargs)

    def with_call(self, request, timeout=None, metadata=None, **kwargs):
        body, metadata = self._channel.sign(self._method, request, self._serializer, metadata)
        return self._raw.with_call(body, timeout=timeout, metadata=metadata, **kwargs)

    def future(self, request, timeout=None, metadata=None, **kwargs):
        body, metadata = self._channel.sign(self._method, request, self._serializer, metadata)
        return self._raw.future(body, timeout=timeout, metadata=metadata, **kwargs)


class _SignedUnaryStream:
    def __init__(self, channel: SigningChannel, method: str, serializer, raw):
        self._channel, self._method, self._serializer, self._raw = channel, method, serializer, raw

    def __call__(self, request, timeout=None, metadata=None, **kwargs):
        body, metadata = self._channel.sign(self._method, request, self._serializer, metadata)
        return self._raw(body, timeout=timeout, metadata=metadata, **kwargs)
