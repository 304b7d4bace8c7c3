"""Request bodies that are not valid protobuf get INVALID_ARGUMENT, not grpc.aio's UNKNOWN.

    server = grpc.aio.server(interceptors=[DecodeGuard(), auth.aio_interceptor()])

grpc.aio parses a request with its method's deserializer before any handler runs; when the
bytes do not parse it answers UNKNOWN and logs an ERROR with a traceback, once per request,
so anyone who can reach the port can fill the log. `DecodeGuard` hands each unary-request
handler the raw bytes instead and parses them itself: a body that does not parse is aborted
with INVALID_ARGUMENT "request body is not a valid moe.v1.ForwardRequest" and logged as one
line at most every `log_interval_s`, with the count of the others.

A handler that already takes raw bytes (one `subnet.auth` wrapped: it verifies the signature
over them, then parses with the same message) is left alone, so the order of the two
interceptors does not matter. Streaming-request methods (none here) are left alone too.
"""

from __future__ import annotations

import inspect
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from subnet.auth.server import unparsable_message

log = logging.getLogger(__name__)


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Parses requests inside the handler, so that garbage is INVALID_ARGUMENT; nothing else."""

    def __init__(self, log_interval_s: float = 10.0):
        self.log_interval_s = log_interval_s
        self.refused = 0                      # bodies refused since start (tests read it)
        self._logged_at = float("-inf")
        self._unlogged = 0
        self._cache: dict[str, tuple[object, object]] = {}   # method -> (handler, wrapped handler)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        cached = self._cache.get(details.method)
        if cached is None or cached[0] is not handler:
            cached = self._cache[details.method] = (handler, self._wrap(details.method, handler))
        return cached[1]

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

    def _note(self, method: str, peer: str, error: DecodeError) -> None:
        """One log line per `log_interval_s` at most; the event loop is the only caller."""
        self.refused += 1
        now = time.monotonic()
        if now - self._logged_at < self.log_interval_s:
            self._unlogged += 1
            return
        suppressed, self._unlogged, self._logged_at = self._unlogged, 0, now
        log.warning("refused %s from %s: request body does not parse (%s)%s", method, peer, str(error)[:200],
                    f"; {suppressed} more not logged in the last {self.log_interval_s:g} s" if suppressed else "")
