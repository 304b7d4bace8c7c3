"""Request bodies that are not valid protobuf get INVALID_ARGUMENT, not gRPC's own error.

    server = grpc.aio.server(interceptors=[DecodeGuard(), auth.aio_interceptor()])      # grpc.aio (the expert)
    server = grpc.server(pool, interceptors=[SyncDecodeGuard(), auth.interceptor()])   # sync grpc (the router)

gRPC parses a request with its method's deserializer before any handler runs; when the bytes
do not parse it answers UNKNOWN (grpc.aio) or INTERNAL (sync grpc) and logs an ERROR with a
traceback, once per request, so anyone who can reach the port can fill the log. The guard hands
each unary-request handler the raw bytes instead and parses them itself: a body that does not
parse is aborted with INVALID_ARGUMENT "request body is not a valid moe.v1.ForwardRequest" and
logged as one line at most every `log_interval_s`, with the count of the others.

A handler that already takes raw bytes (one `subnet.auth` wrapped: it verifies the signature
over them, then parses with the same message) is left alone; an open method `subnet.auth` only
signs the answers of keeps a deserializer (`_keeping_raw`), which the guard then runs. So the
order of the two interceptors does not matter. Streaming-request methods (none here) are left alone.
"""

from __future__ import annotations

import inspect
import logging
import threading

import grpc
from google.protobuf.message import DecodeError

from subnet.auth.server import unparsable_message
from subnet.log_throttle import LogThrottle

log = logging.getLogger(__name__)


class _Guard:
    """What both flavours share: which handlers to wrap (cached per method), and the rate-limited log."""

    def __init__(self, log_interval_s: float = 10.0):
        self.refused = 0                      # bodies refused since start (tests read it)
        self._lock = threading.Lock()         # the sync server notes refusals from its worker threads
        self._log_throttle = LogThrottle(log_interval_s)
        self._cache: dict[str, tuple[object, object]] = {}   # method -> (handler, wrapped handler)

    def _handler(self, method: str, handler):
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        cached = self._cache.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._cache[method] = (handler, self._wrap(method, handler))
        return cached[1]

    def _wrap(self, method: str, handler):
        raise NotImplementedError

    def _note(self, method: str, peer: str, error: DecodeError) -> None:
        """One log line per `log_interval_s` at most."""
        with self._lock:
            self.refused += 1
        self._log_throttle.warning(log, "refused %s from %s: request body does not parse (%s)", method, peer,
                                   str(error)[:200])


class DecodeGuard(_Guard, grpc.aio.ServerInterceptor):
    """grpc.aio: parses requests inside the handler, so that garbage is INVALID_ARGUMENT; nothing else."""

    async def intercept_service(self, continuation, details):
        return self._handler(details.method, await continuation(details))

    def _wrap(self, method: str, handler):
        deserializer = handler.request_deserializer
        message = unparsable_message(deserializer, method)

        async def parse(raw: bytes, context: grpc.aio.ServicerContext):
            try:
                return deserializer(raw)
            except DecodeError as e:
                self._note(method, context.peer(), e)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

        if not handler.response_streaming and inspect.iscoroutinefunction(handler.unary_unary):
            inner = handler.unary_unary

            async def unary_unary(raw, context):
                return await inner(await parse(raw, context), context)
            return handler._replace(request_deserializer=None, unary_unary=unary_unary)
        inner_stream = handler.unary_stream
        if handler.response_streaming and inspect.isasyncgenfunction(inner_stream):
            async def unary_stream(raw, context):
                async for item in inner_stream(await parse(raw, context), context):
                    yield item
            return handler._replace(request_deserializer=None, unary_stream=unary_stream)
        if handler.response_streaming and inspect.iscoroutinefunction(inner_stream):  # writes with context.write
            async def unary_stream_writer(raw, context):
                return await inner_stream(await parse(raw, context), context)
            return handler._replace(request_deserializer=None, unary_stream=unary_stream_writer)
        return handler   # a sync handler on the aio server: grpc parses it as before


class SyncDecodeGuard(_Guard, grpc.ServerInterceptor):
    """`DecodeGuard` for a sync grpc server (the router's), server-streaming answers included."""

    def intercept_service(self, continuation, details):
        return self._handler(details.method, continuation(details))

    def _wrap(self, method: str, handler):
        deserializer = handler.request_deserializer
        message = unparsable_message(deserializer, method)

        def parse(raw: bytes, context: grpc.ServicerContext):
            try:
                return deserializer(raw)
            except DecodeError as e:
                self._note(method, context.peer(), e)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)   # raises; grpc logs no aborted call

        # Parsed before the handler is called, not on the stream's first item: a plain function, not a generator.
        if handler.response_streaming:
            inner_stream = handler.unary_stream

            def unary_stream(raw, context):
                return inner_stream(parse(raw, context), context)
            return handler._replace(request_deserializer=None, unary_stream=unary_stream)
        inner = handler.unary_unary

        def unary_unary(raw, context):
            return inner(parse(raw, context), context)
        return handler._replace(request_deserializer=None, unary_unary=unary_unary)
