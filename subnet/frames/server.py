"""The server side of moe-frames/1 (protocol.py), on the asyncio loop of a grpc.aio service.

    frames = FramesServer(handlers, interceptors, max_body_bytes=64 << 20)
    port = await frames.start("0.0.0.0", 0)          # advertise it (InfoResponse.frames_port)
    ...
    await frames.stop()

`handlers` are the service's own `grpc.RpcMethodHandler`s by method path, and `interceptors` the
grpc.aio interceptors its gRPC server runs: each call goes through the same chain (tracing,
decode guard, request signatures) and the same servicer method, with a context that has what
they use (metadata, peer, abort, code, details). A call therefore gets the same checks, the same
status codes and messages, the same metrics and spans as over gRPC; nonces are shared, so a
request replayed on the other transport is refused too. Handlers may keep state for the life of a
connection in `context.connection` (subnet.auth.sessions keeps the connection's session there:
the expert service adds its Open handler to `handlers`).

Bodies are read straight into one buffer of the announced size (after checking it against the
message limit) and parsed in place (subnet.spliced_wire); responses are written without a copy.
Limits against a hostile or stuck peer: the first header within `handshake_timeout_s` of the
connect, each next one within `idle_timeout_s` of the previous call, the rest of the frame and the
call within the request's timeout (at most `max_call_s`), at most `max_connections` at once and
`body_budget_bytes` of request bodies held at once (more get RESOURCE_EXHAUSTED, protocol.BUSY: a
connection over the limit gets it as soon as it is accepted, and is closed), protocol errors
answered once and the connection closed, and logged once per `log_interval_s` with a count of the
others. A failed accept (out of file descriptors) is logged the same way, and accepting waits
longer after each (ACCEPT_BACKOFF_S), so a flood of connections neither spins the loop nor the log.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from subnet.auth.payload import ANSWER_SIGNATURE_KEY
from subnet.auth.verify import digest_off_loop
from subnet.frames import protocol as p
from subnet.log_throttle import LogThrottle

log = logging.getLogger(__name__)
# After a failed accept (EMFILE, ENFILE, ENOBUFS: what is pending stays in the listen backlog), the wait
# before the next try: doubled after each failure from the first to the last, back to none after a success.
ACCEPT_BACKOFF_S = (0.1, 1.0)
# How long a refused connection is kept after its answer, reading (and dropping) what the peer still sends:
# closing with unread input resets the connection, which can drop the answer before the peer reads it.
ANSWER_LINGER_S = 2.0
_SINK = bytearray(256 << 10)   # where _drain and _drop_arrived drop what they read: never read back, so one will do


class _Abort(Exception):
    """What `context.abort` raises here (grpc.aio raises its own AbortError)."""


class Connection:
    """What the handlers may keep for the life of one connection (subnet.auth: its session)."""

    __slots__ = ("auth_session",)

    def __init__(self) -> None:
        self.auth_session = None

    async def seal_answer(self, method: str, code: grpc.StatusCode, details: bytes, body) -> bytes:
        """The session's MAC of this answer (subnet.auth.sessions.ServerSession.seal_answer), or b"" when
        there is none to send (not a session call: its answer is signed, if at all, in the trailing metadata).
        A large body is hashed off the event loop (subnet.auth.verify.digest_off_loop)."""
        session = self.auth_session
        if session is None:
            return b""
        return await digest_off_loop(body, lambda b: session.seal_answer(method, code.value[0], details, b)) or b""


class _Context:
    """The part of grpc.aio.ServicerContext that the expert's handlers and interceptors use (metadata, peer,
    abort; code and details for the tracing interceptor, and the transport's name for its spans), and the
    call's `connection`."""

    rpc_system = p.RPC_SYSTEM

    def __init__(self, metadata: tuple, peer: str, connection: Connection):
        self._metadata, self._peer, self.connection = metadata, peer, connection
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.answer_signature = b""   # ANSWER_SIGNATURE_KEY of the trailing metadata (subnet.auth.server)

    def set_trailing_metadata(self, metadata) -> None:
        """Only the answer's signature has a place in a response frame (FLAG_ANSWER_SIGNATURE)."""
        for key, value in metadata:
            if key == ANSWER_SIGNATURE_KEY and isinstance(value, bytes) and len(value) == p.ANSWER_SIGNATURE_BYTES:
                self.answer_signature = value

    def invocation_metadata(self):
        return self._metadata

    def peer(self) -> str:
        return self._peer

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()) -> None:
        self._code, self._details = code, details
        raise _Abort(details)

    def code(self):
        return self._code

    def details(self) -> str:
        return self._details


class _CallDetails:
    """grpc.HandlerCallDetails for the interceptors."""

    def __init__(self, method: str, metadata: tuple):
        self.method, self.invocation_metadata = method, metadata


class FramesServer:
    def __init__(self, handlers: Mapping[str, Any], interceptors: Sequence[grpc.aio.ServerInterceptor],
                 max_body_bytes: int, max_connections: int = 256, idle_timeout_s: float = 300.0,
                 max_call_s: float = 300.0, log_interval_s: float = 10.0, body_budget_bytes: int | None = None,
                 on_connections: Callable[[int], None] = lambda n: None,
                 on_refused: Callable[[str], None] = lambda reason: None, handshake_timeout_s: float = 5.0):
        """`body_budget_bytes`: request bodies held at once, all connections together (default 4 x
        `max_body_bytes`); a frame that would go over it is refused (protocol.BUSY: the caller sends it
        over gRPC), so headers that announce large bodies cannot make the server allocate without bound.
        `handshake_timeout_s`: how long a new connection may take to send its first header (a client sends
        it right after connecting); `idle_timeout_s` applies only between the calls of a connection that
        made one, so connections that never call cannot hold the `max_connections` slots for long.
        `on_connections(n)`: the open connections, at each change (not those over `max_connections`, which
        are answered and closed at once); `on_refused(reason)`: a frame or connection refused before a call
        ran ("busy", "protocol" or "shutting_down"), for metrics."""
        self._on_connections, self._on_refused = on_connections, on_refused
        self._handlers = dict(handlers)
        self._interceptors = list(interceptors)
        self.max_body_bytes = max_body_bytes
        self.body_budget_bytes = 4 * max_body_bytes if body_budget_bytes is None else body_budget_bytes
        self._body_bytes = 0   # held by calls now
        self.max_connections = max_connections
        self.handshake_timeout_s, self.idle_timeout_s, self.max_call_s = handshake_timeout_s, idle_timeout_s, max_call_s
        self._refusals, self._accept_failures = LogThrottle(log_interval_s), LogThrottle(log_interval_s)
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()
        # Connections over the limit, answered and kept ANSWER_LINGER_S for the answer to get through; at
        # most this many at once (more are closed right after their answer), so that a flood of connects
        # holds no more than max_connections + this many descriptors.
        self._lingering: set[asyncio.Task] = set()
        self._max_lingering = max(4, max_connections // 8)
        self.port: int | None = None
        self.refused = 0   # frames answered with a protocol error since start (tests read it)
        self._draining = False

    async def start(self, host: str, port: int) -> int:
        listener = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                        backlog=128)
        listener.setblocking(False)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._accepting = asyncio.create_task(self._accept(), name="frames-accept")
        return self.port

    async def stop_accepting(self) -> None:
        """No new connections, and UNAVAILABLE for new calls on open ones; calls running go on."""
        self._draining = True
        if self._accepting is not None:
            self._accepting.cancel()
        if self._listener is not None:
            self._listener.close()

    async def stop(self) -> None:
        await self.stop_accepting()
        for task in [*self._connections, *self._lingering]:
            task.cancel()
        await asyncio.gather(*self._connections, *self._lingering, *([self._accepting] if self._accepting else []),
                             return_exceptions=True)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        first, last = ACCEPT_BACKOFF_S
        backoff = 0.0
        while True:
            try:
                conn, address = await loop.sock_accept(self._listener)
            except OSError as e:   # e.g. out of file descriptors: the service itself goes on
                # Trying again at once would fail the same way until descriptors are freed: wait longer
                # after each failure, and log them once per interval, not once per try.
                backoff = min(max(2 * backoff, first), last)
                self._accept_failures.warning(log, "moe-frames: accept failed: %s; next try in %g s", e, backoff)
                await asyncio.sleep(backoff)
                continue
            backoff = 0.0
            conn.setblocking(False)
            peer = f"ipv{6 if conn.family == socket.AF_INET6 else 4}:{address[0]}:{address[1]}"
            if len(self._connections) >= self.max_connections:
                self._turn_away(conn, peer)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = asyncio.create_task(self._serve(conn, peer))
            self._connections.add(task)
            task.add_done_callback(self._closed)
            self._on_connections(len(self._connections))

    def _closed(self, task: asyncio.Task) -> None:
        self._connections.discard(task)
        self._on_connections(len(self._connections))

    def _turn_away(self, conn: socket.socket, peer: str) -> None:
        """A connection over `max_connections`: protocol.BUSY at once, without waiting for its header (a peer
        that sends none must not hold a descriptor), then closed. The answer waits in the peer's socket until
        it has sent its frame and reads it, as any answer does (the client takes it as "not processed")."""
        error = p.ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{p.BUSY}: more than {self.max_connections} connections; use the gRPC port", "busy")
        self._count_refused(peer, error)
        details = error.message.encode("utf-8")
        answer = p.response_header(error.code, details, 0) + details
        try:
            sent = conn.send(answer)   # a new connection's send buffer takes these few bytes whole
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            sent = 0
        if sent != len(answer) or len(self._lingering) >= self._max_lingering:
            _drop_arrived(conn)   # what is read need not reset the connection on close
            conn.close()
            return
        task = asyncio.create_task(self._linger(conn))
        self._lingering.add(task)
        task.add_done_callback(self._lingering.discard)

    async def _linger(self, conn: socket.socket) -> None:
        """Read (and drop) what the peer sends after its answer, for at most ANSWER_LINGER_S, then close."""
        try:
            async with asyncio.timeout(ANSWER_LINGER_S):
                await _drain(conn)
        except (TimeoutError, OSError):
            pass
        finally:
            conn.close()

    async def _serve(self, conn: socket.socket, peer: str) -> None:
        """Calls on one connection, one after the other, until the peer closes it or breaks the protocol."""
        connection = Connection()
        wait = self.handshake_timeout_s   # for the first header; then idle_timeout_s between calls
        try:
            while True:
                try:
                    async with asyncio.timeout(wait):
                        header = bytearray(p.REQUEST.size)
                        if not await _read_into(conn, memoryview(header), eof_ok=True):
                            return
                    wait = self.idle_timeout_s
                    if self._draining:
                        raise p.ProtocolError(grpc.StatusCode.UNAVAILABLE, "the expert service is shutting down",
                                              "shutting_down")
                    method_len, metadata_len, timeout_s, body_len = p.parse_request_header(header,
                                                                                           self.max_body_bytes)
                    if self._body_bytes + body_len > self.body_budget_bytes:
                        raise p.ProtocolError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              f"{p.BUSY}: {self._body_bytes} bytes of request bodies held; use "
                                              f"the gRPC port", "busy")
                except p.ProtocolError as e:
                    await self._refuse(conn, peer, e)
                    return
                self._body_bytes += body_len
                try:
                    await self._call(conn, peer, connection, method_len, metadata_len, timeout_s, body_len)
                finally:
                    self._body_bytes -= body_len
        except (TimeoutError, ConnectionError, OSError, _Closed):
            return   # no header in time, or the peer went away mid-frame: nothing to answer
        finally:
            conn.close()

    async def _call(self, conn: socket.socket, peer: str, connection: Connection, method_len: int, metadata_len: int,
                    timeout_s: float | None, body_len: int) -> None:
        budget = min(timeout_s or self.max_call_s, self.max_call_s)
        deadline = time.monotonic() + budget
        code, details, body = grpc.StatusCode.OK, "", b""
        async with asyncio.timeout(budget):
            head = bytearray(method_len + metadata_len)
            await _read_into(conn, memoryview(head))
            raw = bytearray(body_len)
            await _read_into(conn, memoryview(raw))
        try:
            method = bytes(head[:method_len]).decode("ascii")
            metadata = p.decode_metadata(head[method_len:])
        except (UnicodeDecodeError, p.ProtocolError) as e:
            error = e if isinstance(e, p.ProtocolError) else \
                p.ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "method name is not ASCII")
            await self._refuse(conn, peer, error)
            raise _Closed from None
        context = _Context(metadata, peer, connection)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                body = await self._dispatch(method, raw, context)   # parsed in place: no copy
        except _Abort:
            code, details = context.code() or grpc.StatusCode.UNKNOWN, context.details() or ""
        except TimeoutError:
            code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "the call ran past its timeout on the server"
        except p.ProtocolError as e:
            code, details = e.code, e.message
        except Exception:   # a bug must not take the connection loop down with it
            log.exception("moe-frames: %s failed", method)
            code, details = grpc.StatusCode.INTERNAL, f"{method} failed inside the service; see its log"
        if code is not grpc.StatusCode.OK:
            body = b""
        details_bytes = details.encode("utf-8")[:p.MAX_DETAILS_BYTES]
        tag = await connection.seal_answer(method, code, details_bytes, body)
        if not tag and code is grpc.StatusCode.OK:
            tag = context.answer_signature
        await _send(conn, p.response_header(code, details_bytes, len(body), tag), details_bytes, body, tag)

    async def _dispatch(self, method: str, raw: bytearray, context: _Context) -> bytes:
        """The method's handler behind the same interceptors as gRPC; the serialized response."""
        handler = await self._intercepted(method, context.invocation_metadata())
        if handler is None or handler.request_streaming or handler.response_streaming:
            raise p.ProtocolError(grpc.StatusCode.UNIMPLEMENTED,
                                  f"{method} is not served over moe-frames; call it on the gRPC port")
        request: Any = raw
        if handler.request_deserializer is not None:
            try:
                request = handler.request_deserializer(raw)
            except DecodeError:
                raise p.ProtocolError(grpc.StatusCode.INVALID_ARGUMENT, "request body is not valid protobuf") from None
        response = await handler.unary_unary(request, context)
        return handler.response_serializer(response) if handler.response_serializer is not None else response

    async def _intercepted(self, method: str, metadata: tuple):
        async def base(details):
            return self._handlers.get(details.method)
        continuation = base
        for interceptor in reversed(self._interceptors):
            continuation = _chain(interceptor, continuation)
        return await continuation(_CallDetails(method, metadata))

    def _count_refused(self, peer: str, error: p.ProtocolError) -> None:
        self.refused += 1
        self._on_refused(error.reason)
        self._refusals.warning(log, "moe-frames: refused a frame from %s: %s %s", peer, error.code.name, error.message)

    async def _refuse(self, conn: socket.socket, peer: str, error: p.ProtocolError) -> None:
        self._count_refused(peer, error)
        details = error.message.encode("utf-8")
        try:
            async with asyncio.timeout(ANSWER_LINGER_S):
                await _send(conn, p.response_header(error.code, details, 0), details, b"")
                # Closing with unread input would reset the connection and could drop the answer on its
                # way: say we are done, then read (and discard) what the peer still sends, briefly.
                conn.shutdown(socket.SHUT_WR)
                await _drain(conn)
        except (TimeoutError, OSError):
            pass



def _chain(interceptor, continuation):
    async def call(details):
        return await interceptor.intercept_service(continuation, details)
    return call


class _Closed(Exception):
    """The connection was answered and must be closed."""


async def _read_into(conn: socket.socket, view: memoryview, eof_ok: bool = False) -> bool:
    """Fill `view`; False when the peer closed before the first byte and `eof_ok`."""
    loop = asyncio.get_running_loop()
    got = 0
    while got < len(view):
        n = await loop.sock_recv_into(conn, view[got:])
        if n == 0:
            if eof_ok and got == 0:
                return False
            raise ConnectionResetError("the peer closed the connection mid-frame")
        got += n
    return True


async def _drain(conn: socket.socket) -> None:
    """Read and drop what the peer sends until it closes."""
    loop = asyncio.get_running_loop()
    while await loop.sock_recv_into(conn, _SINK):
        pass


def _drop_arrived(conn: socket.socket) -> None:
    """Read and drop what has arrived on a non-blocking `conn`, without waiting for more (and not more than a
    new connection's receive window: a peer that keeps sending cannot hold up the accept loop)."""
    try:
        conn.recv_into(_SINK)
    except OSError:   # BlockingIOError: nothing has arrived
        pass


async def _send(conn: socket.socket, header: bytes, details: bytes, body: bytes, tag: bytes = b"") -> None:
    loop = asyncio.get_running_loop()
    for buffer in p.buffers((header, tag, details), body):
        await loop.sock_sendall(conn, buffer)
