"""Signed requests on a gRPC server: every protected method is verified before its servicer runs.

    auth = ServerAuth(verifier, open_methods={"/moe.v1.Expert/Info"}, on_reject=counter_inc)
    server = grpc.aio.server(interceptors=[auth.aio_interceptor()])   # grpc.aio
    server = grpc.server(pool, interceptors=[auth.interceptor()])     # sync grpc

The signature covers the exact request bytes, so the interceptor swaps each protected
method's handler for one whose deserializer keeps the raw bytes; the new behaviour
verifies them (`Verifier`), and only an accepted request is parsed and handed to the real
servicer method. Health (`/grpc.health.v1.Health/*`) and the `open_methods` skip it.

Answers: the OK answer to an accepted signed request is serialized here and signed with the
receiver's `identity` (subnet.auth.payload.answer_payload) in the trailing metadata; a streamed
one once it ends, over all its messages. Open methods (not health) sign their answers too when
the request claims a caller and a nonce, bound to the request's bytes since nobody checked them.
Session calls are answered with the session's MAC by the moe-frames server instead.

A rejected request is aborted with the Verifier's code and message, counted through
`on_reject(reason)` and logged as one line, at most once per `log_interval_s` (a flood of
bad requests must not flood the log). Nothing about it raises in the server. Accepted bytes
that do not parse are INVALID_ARGUMENT, "request body is not a valid moe.v1.ForwardRequest".
"""

from __future__ import annotations

import hashlib
import inspect
import logging
from collections.abc import Callable, Collection

import grpc
from google.protobuf.message import DecodeError

from subnet.auth.payload import ANSWER_SIGNATURE_KEY, answer_payload, body_digest, request_claim, stream_digest
from subnet.auth.sessions import SESSION_METHOD, ServerSession, has_session_entries, open_session
from subnet.auth.verify import Rejection, Verifier, digest_off_loop, unauthenticated
from subnet.identity import Identity
from subnet.log_throttle import LogThrottle

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
_UNSUPPORTED = Rejection(grpc.StatusCode.UNIMPLEMENTED, "unsupported",
                         "signed requests are supported on unary-request methods only")
_NO_SESSION = unauthenticated("no_session", "session call on a connection with no open session: open one first "
                                            f"({SESSION_METHOD}) or sign the call (x-moe-* metadata)")


class ServerAuth:
    """A Verifier in front of a server's methods, plus what happens to a rejection."""

    def __init__(self, verifier: Verifier, open_methods: Collection[str] = (),
                 on_reject: Callable[[str], None] | None = None, log_interval_s: float = 10.0,
                 close: Callable[[], None] | None = None, identity: Identity | None = None):
        """`identity`: the receiver's, which signs its answers to session Opens (`session_handler`); its
        hotkey must be the verifier's."""
        if identity is not None and identity.hotkey != verifier.receiver_hotkey:
            raise ValueError(f"identity {identity.hotkey} is not the verifier's receiver {verifier.receiver_hotkey}")
        self.identity = identity
        self.verifier = verifier
        self.open_methods = frozenset(open_methods)
        self._on_reject = on_reject or (lambda reason: None)
        self._log_throttle = LogThrottle(log_interval_s)
        self._close = close

    def protects(self, method: str) -> bool:
        """Whether the interceptor verifies `method`. SESSION_METHOD verifies itself (`session_handler`)."""
        return not method.startswith(HEALTH_PREFIX) and method not in self.open_methods and method != SESSION_METHOD

    def session_handler(self, on_open: Callable[[], None] = lambda: None) -> grpc.RpcMethodHandler:
        """SESSION_METHOD for a moe-frames server (subnet.auth.sessions): a signed Open whose body is the
        caller's X25519 key; answers the receiver's, signed with `identity`. It checks its own signature,
        whatever the interceptors. `on_open()`: once per session opened, for metrics."""
        if self.identity is None:
            raise ValueError("sessions need the receiver's identity to sign their Open answers (ServerAuth identity=)")
        identity = self.identity

        async def open_(raw: bytes, context) -> bytes:
            connection = getattr(context, "connection", None)
            if connection is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    "sessions are opened on moe-frames connections only")
            try:
                connection.auth_session, answer = open_session(raw, context.invocation_metadata(), identity)
            except ValueError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
            on_open()
            return answer
        handler = grpc.unary_unary_rpc_method_handler(open_)
        return _wrap_aio(self, SESSION_METHOD, handler)

    def close(self) -> None:
        """Release what the verifier holds (metagraph thread, nonce store connections)."""
        if self._close is not None:
            self._close()
        close = getattr(self.verifier.nonces, "close", None)
        if close is not None:
            close()

    async def aclose(self) -> None:
        """`close` for an asyncio server: also closes the nonce store's asyncio connection."""
        self.close()
        aclose = getattr(self.verifier.nonces, "aclose", None)
        if aclose is not None:
            await aclose()

    def aio_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _AioInterceptor(self)

    def interceptor(self) -> grpc.ServerInterceptor:
        return _SyncInterceptor(self)

    def reject(self, rejection: Rejection, method: str, peer: str) -> None:
        self._on_reject(rejection.reason)
        self._log_throttle.warning(log, "rejected %s from %s: %s %s", method, peer, rejection.code.name,
                                   rejection.message)


def _parse(deserializer, raw: bytes):
    """The request message; None when the (authenticated) bytes do not parse."""
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except DecodeError:
        return None


def unparsable_message(deserializer, method: str) -> str:
    """The INVALID_ARGUMENT message for a request body `deserializer` cannot parse, naming the
    message type ("request body is not a valid moe.v1.ForwardRequest") when it is known."""
    descriptor = getattr(deserializer, "DESCRIPTOR", None) or \
        getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)   # a parser object, or Cls.FromString
    name = getattr(descriptor, "full_name", None) or f"request message of {method}"
    return f"request body is not a valid {name}"


class _Wrapping:
    """Caches the wrapped handler of each method: the interceptor runs on every call. Protected methods get
    the check and a signed answer; open ones (not health) a signed answer to a request that carries a claim."""

    def __init__(self, auth: ServerAuth, wrap: Callable, sign_only: Callable):
        self._auth, self._wrap, self._sign_only = auth, wrap, sign_only
        self._cache: dict[str, tuple[object, object]] = {}

    def handler(self, method: str, handler):
        if handler is None or method.startswith(HEALTH_PREFIX) or method == SESSION_METHOD:
            return handler
        if not self._auth.protects(method) and (self._auth.identity is None or handler.request_streaming):
            return handler
        cached = self._cache.get(method)
        if cached is None or cached[0] is not handler:
            wrap = self._wrap if self._auth.protects(method) else self._sign_only
            cached = self._cache[method] = (handler, wrap(self._auth, method, handler))
        return cached[1]


class _AioInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth: ServerAuth):
        self._handlers = _Wrapping(auth, _wrap_aio, _sign_only_aio)

    async def intercept_service(self, continuation, details):
        return self._handlers.handler(details.method, await continuation(details))


class _SyncInterceptor(grpc.ServerInterceptor):
    def __init__(self, auth: ServerAuth):
        self._handlers = _Wrapping(auth, _wrap_sync, _sign_only_sync)

    def intercept_service(self, continuation, details):
        return self._handlers.handler(details.method, continuation(details))


def _wrap_aio(auth: ServerAuth, method: str, handler):
    parse = handler.request_deserializer

    async def admit(raw: bytes, context: grpc.aio.ServicerContext):
        """(the request, the sha256 hex of its bytes when it was signed, else None)."""
        metadata = context.invocation_metadata() or ()
        digest = None
        # A MAC of the connection's session instead of a signature; never for an Open, which is signed.
        if method != SESSION_METHOD and has_session_entries(metadata):
            rejection = await _check_session(auth, method, raw, metadata, context)
        else:
            rejection, digest = await auth.verifier.acheck(method, raw, metadata)
        if rejection is not None:
            auth.reject(rejection, method, context.peer())
            await context.abort(rejection.code, rejection.message)
        request = _parse(parse, raw)
        if request is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, unparsable_message(parse, method))
        return request, digest

    if not handler.request_streaming and not handler.response_streaming:
        inner, serialize = handler.unary_unary, handler.response_serializer

        async def unary_unary(raw, context):
            request, digest = await admit(raw, context)
            answer = await inner(request, context)
            if digest is None or method == SESSION_METHOD:   # a session call (its MAC), or the Open (signed body)
                return answer if serialize is None else serialize(answer)
            return await _asigned_answer(auth, method, digest, context, answer, serialize)
        return handler._replace(request_deserializer=None, response_serializer=None, unary_unary=unary_unary)
    if not handler.request_streaming and inspect.isasyncgenfunction(handler.unary_stream):
        inner_stream, serialize = handler.unary_stream, handler.response_serializer

        async def unary_stream(raw, context):
            request, digest = await admit(raw, context)
            digests: list[bytes] = []
            async for item in inner_stream(request, context):
                yield _streamed(item, serialize, digests)
            if digest is not None:
                _sign_stream(auth, method, digest, context, digests)
        return handler._replace(request_deserializer=None, response_serializer=None, unary_stream=unary_stream)
    return _refusal(auth, method, handler, aio=True)


def _sign_only_aio(auth: ServerAuth, method: str, handler):
    """An open unary method: not checked, but its answer to a request that claims a caller and a nonce is
    signed, bound to the request's bytes, as a protected method's is (a caller that signs its calls takes
    only signed answers). Its deserializer keeps the raw bytes beside the request (`_keeping_raw`), so
    whatever parses requests before it (subnet.decode_guard, gRPC) still does."""
    if handler.response_streaming or not inspect.iscoroutinefunction(handler.unary_unary):
        return handler   # no open streaming method on an asyncio server here: left as it is
    inner, serialize = handler.unary_unary, handler.response_serializer

    async def unary_unary(kept: _Kept, context):
        answer = await inner(kept.request, context)
        if request_claim(context.invocation_metadata()) is None:
            return answer if serialize is None else serialize(answer)
        return await _asigned_answer(auth, method, await digest_off_loop(kept.raw), context, answer, serialize)
    return handler._replace(request_deserializer=_keeping_raw(handler.request_deserializer), response_serializer=None,
                            unary_unary=unary_unary)


class _Kept:
    __slots__ = ("raw", "request")

    def __init__(self, raw: bytes, request):
        self.raw, self.request = raw, request


def _keeping_raw(deserializer):
    """A deserializer that returns the request with its raw bytes (a DecodeError still raises), and names the
    same message type (`unparsable_message`)."""
    def parse(raw: bytes) -> _Kept:
        return _Kept(raw, raw if deserializer is None else deserializer(raw))
    parse.DESCRIPTOR = getattr(deserializer, "DESCRIPTOR", None) or \
        getattr(getattr(deserializer, "__self__", None), "DESCRIPTOR", None)
    return parse


async def _asigned_answer(auth: ServerAuth, method: str, request_digest: str, context, answer, serialize) -> bytes:
    """The serialized answer, its signature set in the trailing metadata (ANSWER_SIGNATURE_KEY)."""
    body = answer if serialize is None else serialize(answer)
    entry = _answer_signature(auth, method, request_digest, context.invocation_metadata(), await digest_off_loop(body))
    if entry is not None:
        context.set_trailing_metadata((entry,))
    return body


def _answer_signature(auth: ServerAuth, method: str, request_digest: str, metadata,
                      digest: str) -> tuple[str, bytes] | None:
    claim = request_claim(metadata)
    if claim is None or auth.identity is None:
        return None
    caller, nonce = claim
    return ANSWER_SIGNATURE_KEY, auth.identity.sign(answer_payload(method, nonce, request_digest, caller,
                                                                   auth.identity.hotkey, digest))


async def _check_session(auth: ServerAuth, method: str, raw: bytes, metadata, context) -> Rejection | None:
    connection = getattr(context, "connection", None)
    session: ServerSession | None = getattr(connection, "auth_session", None)
    if session is None:
        return _NO_SESSION
    return session.check(method, await digest_off_loop(raw, _sha256), metadata, auth.verifier.policy)


def _sha256(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def _wrap_sync(auth: ServerAuth, method: str, handler):
    parse = handler.request_deserializer
    if handler.request_streaming:
        return _refusal(auth, method, handler, aio=False)
    if handler.response_streaming:
        inner_stream, serialize = handler.unary_stream, handler.response_serializer

        def stream(raw: bytes, context: grpc.ServicerContext):
            request, digest = _admit_sync(auth, method, parse, raw, context)
            digests: list[bytes] = []
            for item in inner_stream(request, context):
                yield _streamed(item, serialize, digests)
            _sign_stream(auth, method, digest, context, digests)
        return handler._replace(request_deserializer=None, response_serializer=None, unary_stream=stream)
    inner, serialize = handler.unary_unary, handler.response_serializer

    def unary(raw: bytes, context: grpc.ServicerContext):
        request, digest = _admit_sync(auth, method, parse, raw, context)
        return _signed_answer(auth, method, digest, context, inner(request, context), serialize)
    return handler._replace(request_deserializer=None, response_serializer=None, unary_unary=unary)


def _admit_sync(auth: ServerAuth, method: str, parse, raw: bytes, context: grpc.ServicerContext):
    rejection, digest = auth.verifier.check(method, raw, context.invocation_metadata() or ())
    if rejection is not None:
        auth.reject(rejection, method, context.peer())
        context.abort(rejection.code, rejection.message)   # raises
    request = _parse(parse, raw)
    if request is None:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, unparsable_message(parse, method))
    return request, digest


def _sign_only_sync(auth: ServerAuth, method: str, handler):
    """`_sign_only_aio` for a sync server, streamed answers included (the router's Generate when open)."""
    inner, serialize = handler.unary_unary, handler.response_serializer
    if handler.response_streaming:
        inner_stream = handler.unary_stream

        def stream(kept: _Kept, context: grpc.ServicerContext):
            digests: list[bytes] = []
            for item in inner_stream(kept.request, context):
                yield _streamed(item, handler.response_serializer, digests)
            if request_claim(context.invocation_metadata()) is not None:
                _sign_stream(auth, method, body_digest(kept.raw), context, digests)
        return handler._replace(request_deserializer=_keeping_raw(handler.request_deserializer),
                                response_serializer=None, unary_stream=stream)

    def unary(kept: _Kept, context: grpc.ServicerContext):
        answer = inner(kept.request, context)
        if request_claim(context.invocation_metadata()) is None:
            return answer if serialize is None else serialize(answer)
        return _signed_answer(auth, method, body_digest(kept.raw), context, answer, serialize)
    return handler._replace(request_deserializer=_keeping_raw(handler.request_deserializer), response_serializer=None,
                            unary_unary=unary)


def _streamed(item, serialize, digests: list[bytes]) -> bytes:
    """One message of a streamed answer, serialized, its digest kept for the stream's signature."""
    body = item if serialize is None else serialize(item)
    digests.append(hashlib.sha256(body).digest())
    return body


def _sign_stream(auth: ServerAuth, method: str, request_digest: str, context, digests: list[bytes]) -> None:
    """Once a streamed answer ended well: its signature in the trailing metadata (payload.stream_digest)."""
    entry = _answer_signature(auth, method, request_digest, context.invocation_metadata(), stream_digest(digests))
    if entry is not None:
        context.set_trailing_metadata((entry,))


def _signed_answer(auth: ServerAuth, method: str, request_digest: str, context, answer, serialize) -> bytes:
    """`_asigned_answer` for a sync server."""
    body = answer if serialize is None else serialize(answer)
    entry = _answer_signature(auth, method, request_digest, context.invocation_metadata(), body_digest(body))
    if entry is not None:
        context.set_trailing_metadata((entry,))
    return body


def _refusal(auth: ServerAuth, method: str, handler, aio: bool):
    """Fail closed: a protected method this wrapper cannot verify answers UNIMPLEMENTED."""
    log.error("%s cannot be protected by request signing (streaming request); it will refuse every call",
              method)
    field = {(False, False): "unary_unary", (False, True): "unary_stream", (True, False): "stream_unary",
             (True, True): "stream_stream"}[(handler.request_streaming, handler.response_streaming)]
    if aio:
        async def refuse(request, context):
            auth.reject(_UNSUPPORTED, method, context.peer())
            await context.abort(_UNSUPPORTED.code, _UNSUPPORTED.message)
    else:
        def refuse(request, context):
            auth.reject(_UNSUPPORTED, method, context.peer())
            context.abort(_UNSUPPORTED.code, _UNSUPPORTED.message)
    return handler._replace(**{field: refuse})

