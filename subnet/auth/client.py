"""Signed requests on the client side: a channel wrapper that any generated stub accepts.

    stub = expert_pb2_grpc.ExpertStub(SigningChannel(channel, identity, receiver="5F..."))
    stub.Forward.future(request, timeout=2.0, metadata=tracing_metadata)    # signed

Each request is serialized once: the wrapper serializes it, signs the sha256 of those
bytes (`subnet.auth.payload`), and sends the same bytes through a multi-callable whose
serializer is the identity. `receiver` is the receiver's hotkey, or a callable asked on
every call (the router's replica set knows which hotkey serves an endpoint right now);
when it yields no hotkey the request goes unsigned (a receiver with auth on refuses it,
with UNAUTHENTICATED). With `identity=None` the stub gets the channel's own multi-callables.

The answer to a signed unary request is taken only with the receiver's signature of it in its
trailing metadata (`AnswerCheck`: bound to the request's nonce and bytes, the two hotkeys and the
answer's bytes); otherwise the call fails with INTERNAL (`AnswerRefused`), as an answer that does
not parse would. Error answers are taken as they come: someone on the path can always make a call
fail. A streamed answer (unary_stream) is signed as a whole, in the trailing metadata after its last
message: its messages are handed over as they come, and the check comes at its end.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from subnet.auth.payload import (
    ANSWER_SIGNATURE_KEY,
    NONCE_KEY,
    answer_payload,
    body_digest,
    sign_metadata,
    stream_digest,
)
from subnet.identity import Identity, verify_signature

log = logging.getLogger(__name__)

Receiver = str | Callable[[], str | None] | None
UNAUTHENTICATED_ANSWER, BAD_RESPONSE = "unauthenticated_answer", "bad_response"   # AnswerRefused.reason
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
        raw = self.channel.unary_unary(method, None, None, _registered_method=_registered_method)
        return _SignedUnaryUnary(self, method, request_serializer, response_deserializer, raw)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, _registered_method=False):
        if self.identity is None:
            return self.channel.unary_stream(method, request_serializer, response_deserializer,
                                             _registered_method=_registered_method)
        raw = self.channel.unary_stream(method, None, None, _registered_method=_registered_method)
        return _SignedUnaryStream(self, method, request_serializer, response_deserializer, raw)

    def receiver(self) -> str | None:
        """The receiver's hotkey now."""
        return self._receiver() if callable(self._receiver) else self._receiver

    def sign(self, method: str, request, serializer, metadata) -> tuple[bytes, tuple]:
        """(bytes to send, metadata with the signature entries) for one call."""
        return self.sign_call(method, request, serializer, metadata)[:2]

    def sign_call(self, method: str, request, serializer, metadata) -> tuple[bytes, tuple, AnswerCheck | None]:
        """`sign`, and the check its answer must pass (None: sent unsigned, for want of a receiver hotkey)."""
        body = serializer(request) if serializer is not None else request
        receiver = self.receiver()
        extra = tuple(metadata or ())
        if receiver:
            digest = body_digest(body)
            signed = sign_metadata(self.identity, method, body, receiver, digest=digest)
            return body, extra + signed, AnswerCheck(method, dict(signed)[NONCE_KEY], digest, self.identity.hotkey,
                                                     receiver)
        now = time.monotonic()
        if now - self._warned_at > _WARN_INTERVAL_S:
            self._warned_at = now
            log.warning("no hotkey known for the receiver of %s; sending it unsigned", method)
        return body, extra, None


@dataclass(frozen=True)
class AnswerCheck:
    """What the OK answer to one signed request must carry: the receiver's signature of it."""

    method: str
    nonce: str
    request_digest: str
    caller: str
    receiver: str

    def problem(self, body, signature: bytes | None) -> str | None:
        """None when `signature` is the receiver's of `body` as the answer to this request; else why not."""
        return self.digest_problem(body_digest(body), signature)

    def digest_problem(self, digest: str, signature: bytes | None) -> str | None:
        """`problem` for an answer whose digest the caller has (a streamed one: payload.stream_digest)."""
        if signature is None:
            return (f"the answer to {self.method} is not signed by {self.receiver}: a service with AUTH_MODE=off, or "
                    f"from before signed answers, or someone else answered; give every service the same AUTH_MODE")
        payload = answer_payload(self.method, self.nonce, self.request_digest, self.caller, self.receiver, digest)
        if not verify_signature(self.receiver, payload, signature):
            return (f"the answer to {self.method} does not carry {self.receiver}'s signature of it (changed on the "
                    f"way, or not from that service)")
        return None


class AnswerRefused(grpc.RpcError):
    """An OK answer that was not taken: INTERNAL, as gRPC fails an answer it cannot deserialize. Shaped like
    grpc's errors (`.code()`, `.details()`); `reason` says why, for metrics: UNAUTHENTICATED_ANSWER (no
    valid signature or session MAC) or BAD_RESPONSE (it does not parse)."""

    def __init__(self, details: str, reason: str = UNAUTHENTICATED_ANSWER):
        super().__init__(f"INTERNAL: {details}")
        self._details, self.reason = details, reason

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.INTERNAL

    def details(self) -> str:
        return self._details


def answer_signature(trailing_metadata) -> bytes | None:
    """The ANSWER_SIGNATURE_KEY entry of a call's trailing metadata (None: absent, or not one bytes value)."""
    found = [value for key, value in trailing_metadata or () if key == ANSWER_SIGNATURE_KEY]
    return found[0] if len(found) == 1 and isinstance(found[0], bytes) else None


def take_answer(raw: bytes, check: AnswerCheck | None, trailing_metadata, deserializer) -> Any:
    """The answer of a signed call, parsed, once its signature is checked; AnswerRefused if it fails."""
    if check is not None:
        problem = check.problem(raw, answer_signature(trailing_metadata))
        if problem is not None:
            raise AnswerRefused(problem)
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except Exception as e:   # what grpc does with an answer its deserializer cannot take
        raise AnswerRefused(f"the answer does not parse: {e}", BAD_RESPONSE) from None


class _SignedUnaryUnary:
    def __init__(self, channel: SigningChannel, method: str, serializer, deserializer, raw):
        self._channel, self._method, self._serializer, self._deserializer, self._raw = \
            channel, method, serializer, deserializer, raw

    def __call__(self, request, timeout=None, metadata=None, **kwargs):
        if isinstance(self._raw, grpc.aio.UnaryUnaryMultiCallable):   # a grpc.aio channel: an awaitable
            body, metadata, check = self._channel.sign_call(self._method, request, self._serializer, metadata)
            return self._taken_async(self._raw(body, timeout=timeout, metadata=metadata, **kwargs), check)
        return self.with_call(request, timeout=timeout, metadata=metadata, **kwargs)[0]

    async def _taken_async(self, call, check: AnswerCheck | None):
        raw = await call
        return take_answer(raw, check, await call.trailing_metadata(), self._deserializer)

    def with_call(self, request, timeout=None, metadata=None, **kwargs):
        body, metadata, check = self._channel.sign_call(self._method, request, self._serializer, metadata)
        raw, call = self._raw.with_call(body, timeout=timeout, metadata=metadata, **kwargs)
        return take_answer(raw, check, call.trailing_metadata(), self._deserializer), call

    def future(self, request, timeout=None, metadata=None, **kwargs):
        body, metadata, check = self._channel.sign_call(self._method, request, self._serializer, metadata)
        return _CheckedFuture(self._raw.future(body, timeout=timeout, metadata=metadata, **kwargs), check,
                              self._deserializer)


class _CheckedFuture:
    """A grpc future whose result is the answer taken by `take_answer` (its signature checked, then parsed);
    everything else (cancel, code, metadata, ...) is the call's own."""

    def __init__(self, future, check: AnswerCheck | None, deserializer):
        self._future, self._check, self._deserializer = future, check, deserializer
        self._lock = threading.Lock()
        self._taken: tuple[Any, BaseException | None] | None = None

    def result(self, timeout=None):
        raw = self._future.result(timeout)
        value, error = self._take(raw)
        if error is not None:
            raise error
        return value

    def exception(self, timeout=None):
        error = self._future.exception(timeout)
        return error if error is not None else self._take(self._future.result())[1]

    def add_done_callback(self, fn) -> None:
        self._future.add_done_callback(lambda _: fn(self))

    def _take(self, raw) -> tuple[Any, BaseException | None]:
        with self._lock:
            if self._taken is None:
                try:
                    self._taken = take_answer(raw, self._check, self._future.trailing_metadata(),
                                              self._deserializer), None
                except AnswerRefused as e:
                    self._taken = None, e
            return self._taken

    def __getattr__(self, name: str):
        return getattr(self._future, name)


class _SignedUnaryStream:
    def __init__(self, channel: SigningChannel, method: str, serializer, deserializer, raw):
        self._channel, self._method, self._serializer, self._deserializer, self._raw = \
            channel, method, serializer, deserializer, raw

    def __call__(self, request, timeout=None, metadata=None, **kwargs):
        body, metadata, check = self._channel.sign_call(self._method, request, self._serializer, metadata)
        return _CheckedStream(self._raw(body, timeout=timeout, metadata=metadata, **kwargs), check, self._deserializer)


class _CheckedStream:
    """A streamed answer's messages, parsed as they come; once the stream ends well, its signature is checked
    (over all its messages: payload.stream_digest), and AnswerRefused is raised instead of the end when it
    fails. A message read before the end is therefore not yet vouched for. Everything else is the call's own."""

    def __init__(self, call, check: AnswerCheck | None, deserializer):
        self._call, self._check, self._deserializer = call, check, deserializer
        self._digests: list[bytes] = []

    def __iter__(self):
        return self

    def __next__(self):
        try:
            raw = next(self._call)
        except StopIteration:
            self._check_end(self._call.trailing_metadata())
            raise
        return self._message(raw)

    def __aiter__(self):   # a grpc.aio channel's call
        return self

    async def __anext__(self):
        try:
            raw = await self._call.__aiter__().__anext__()
        except StopAsyncIteration:
            self._check_end(await self._call.trailing_metadata())
            raise
        return self._message(raw)

    def _check_end(self, trailing_metadata) -> None:
        if self._check is not None:
            problem = self._check.digest_problem(stream_digest(self._digests), answer_signature(trailing_metadata))
            if problem is not None:
                raise AnswerRefused(problem) from None

    def _message(self, raw: bytes):
        self._digests.append(hashlib.sha256(raw).digest())
        if self._deserializer is None:
            return raw
        try:
            return self._deserializer(raw)
        except Exception as e:
            raise AnswerRefused(f"a message of the answer does not parse: {e}", BAD_RESPONSE) from None

    def __getattr__(self, name: str):
        return getattr(self._call, name)
