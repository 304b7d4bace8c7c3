"""The caller's side of moe-frames/1 (protocol.py): blocking calls, for the pool's call threads.

    channel = FramesChannel("10.0.0.5", 50151, max_body_bytes=64 << 20)
    body = channel.call("/moe.v1.Expert/Forward", request_bytes, metadata, timeout_s=2.0)  # bytearray
    channel.close()

One connection per call in flight; a finished call's connection is kept (up to `max_idle`) for
the next one, so a decode step pays no connect. A kept connection that the server closed
meanwhile (restart, idle timeout) is noticed before it is used, and replaced. Failures raise
`FrameError` with the status a gRPC call would have: DEADLINE_EXCEEDED when the deadline
passes (the connection is dropped: its answer may still come), UNAVAILABLE when the connection
breaks, INTERNAL when the server's answer breaks the protocol. `Unreachable` means the call was
not processed: no connection could be made, or the server had too many (protocol.BUSY), so the
caller may send it another way.

With `auth` (subnet.auth.sessions.FramesAuth), a new connection first opens a session (a signed
key exchange, whose answer the server signs) and then carries a MAC per call instead of a
signature, and takes an OK answer only with the session's MAC of it (else AnswerRefused, INTERNAL,
and the connection is closed); where the server opens none, calls are signed one by one (and an OK answer
taken only with the server's signature of it), and new connections do not ask again for
SESSIONS_RETRY_S.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time

import grpc

from subnet.auth.client import AnswerRefused
from subnet.auth.sessions import SESSION_METHOD, AnswerTest, ClientSession, FramesAuth, SessionOffer
from subnet.frames import protocol as p

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 1.0
SESSIONS_RETRY_S = 60.0   # after a server opened no session, new connections sign each call this long
# Answers that may come before the server checked a session call (an unknown method, a deadline, the
# check itself failing, a stopping or broken server): its seq may not have moved, so the connection is
# not used again. Other errors (bad arguments, overload, missing activations) come after the check.
_SESSION_UNSURE = frozenset({grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                             grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE,
                             grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})


class Unreachable(p.FrameError):
    """No connection (or one refused for being one too many): the request was not processed."""


class FramesChannel:
    def __init__(self, host: str, port: int, max_body_bytes: int, max_idle: int = 64):
        self.address = (host, port)
        self.max_body_bytes = max_body_bytes
        self._max_idle = max_idle
        self._idle: list[tuple[socket.socket, ClientSession | None]] = []
        self._lock = threading.Lock()
        self._sessions_refused_at = float("-inf")   # when a server last opened no session
        self._closed = False
        self.calls = 0   # answered calls (any status), for tests and debugging

    def call(self, method: str, body: bytes, metadata: p.Metadata, timeout_s: float,
             auth: FramesAuth | None = None) -> bytearray:
        """The response body of one unary call; raises FrameError (see the module doc)."""
        return self.start(method, body, metadata, timeout_s, auth).finish()

    def start(self, method: str, body: bytes, metadata: p.Metadata, timeout_s: float,
              auth: FramesAuth | None = None) -> PendingCall:
        """Send one call and return without waiting for its answer: `finish()` reads it (at once when the
        socket, `fileno()`, is readable), `abandon()` gives it up. Raises Unreachable or FrameError.
        `auth`: adds what authenticates the call (a session's MAC on a connection that has one, else a
        signature); a new connection opens a session first where the server offers them."""
        deadline = time.monotonic() + timeout_s
        name = _method_name(method, deadline)
        conn, session = self._take() or self._connect(deadline, auth)
        frame, test = self._frame(method, name, body, metadata, auth, session, deadline, conn)
        pending = PendingCall(self, conn, deadline, frame, session, test)
        pending.send_rest()
        return pending

    def try_start(self, method: str, body: bytes, metadata: p.Metadata, timeout_s: float,
                  auth: FramesAuth | None = None) -> PendingCall | None:
        """`start` that never blocks: on a kept connection only (None when there is none: no connect here),
        with what the socket takes at once. A frame it did not take whole is finished by `send_rest()`
        (check `pending.unsent`), e.g. on another thread; a slow or dead link cannot hold up the caller."""
        deadline = time.monotonic() + timeout_s
        name = _method_name(method, deadline)
        kept = self._take()
        if kept is None:
            return None
        conn, session = kept
        frame, test = self._frame(method, name, body, metadata, auth, session, deadline, conn)
        pending = PendingCall(self, conn, deadline, frame, session, test)
        pending.send_available()
        return pending

    @staticmethod
    def _frame(method: str, name: bytes, body: bytes, metadata: p.Metadata, auth: FramesAuth | None,
               session: ClientSession | None, deadline: float,
               conn: socket.socket) -> tuple[list[memoryview], AnswerTest | None]:
        """The request frame for `conn` and the test its answer must pass (None: none, the call is not
        authenticated); with `auth`, authenticated for it (a session's seq is used up: the frame must be
        sent, or the connection closed, as it is here when the frame cannot be made)."""
        test = None
        try:
            if auth is not None:
                metadata, test = auth.metadata(session, method, body, metadata)
            meta = p.encode_metadata(metadata)
        except BaseException:
            conn.close()
            raise
        head = p.request_header(name, meta, max(deadline - time.monotonic(), 0.001), len(body))
        return [memoryview(b) for b in p.buffers((head, name, meta), body)], test

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def _connect(self, deadline: float, auth: FramesAuth | None) -> tuple[socket.socket, ClientSession | None]:
        """A new connection, with a session opened on it when `auth` can and the server offers them."""
        conn = self._dial(deadline)
        if auth is None or time.monotonic() - self._sessions_refused_at < SESSIONS_RETRY_S:
            return conn, None
        offer = auth.offer()
        if offer is None:
            return conn, None
        session = self._open(conn, offer, deadline)
        if session is not None:
            return conn, session
        # Refused (an older service, auth off, a busy or stopping one, or the caller is not allowed): the
        # call goes on a fresh connection without one and gets the server's own answer to a signed call.
        conn.close()
        self._sessions_refused_at = time.monotonic()
        return self._dial(deadline), None

    def _open(self, conn: socket.socket, offer: tuple[SessionOffer, tuple], deadline: float) -> ClientSession | None:
        """The session the server opens on `conn`, or None when it answers with an error; Unreachable when
        the connection breaks (the call was not sent)."""
        session_offer, metadata = offer
        frame, _ = self._frame(SESSION_METHOD, SESSION_METHOD.encode("ascii"), session_offer.body, metadata, None,
                               None, deadline, conn)
        pending = PendingCall(self, conn, deadline, frame, None, None)   # the answer's signature is in its body
        try:
            pending.send_rest()
            code, details, answer = pending.answer()
        except p.FrameError as e:
            raise Unreachable(e.code(), f"opening a session on moe-frames at {self._where()} failed: "
                                        f"{e.details()}") from None
        if code is grpc.StatusCode.OK:
            try:
                return session_offer.accept(bytes(answer))
            except ValueError as e:
                log.warning("moe-frames at %s answered a session with %s; signing each call instead", self._where(), e)
                return None
        log.info("moe-frames at %s opened no session (%s: %s); signing each call for %g s", self._where(),
                 code.name, details, SESSIONS_RETRY_S)
        return None

    def _dial(self, deadline: float) -> socket.socket:
        try:
            conn = socket.create_connection(self.address, timeout=min(CONNECT_TIMEOUT_S, _left(deadline)))
        except TimeoutError:   # the deadline passed, or the connect took CONNECT_TIMEOUT_S: nothing sent
            raise Unreachable(grpc.StatusCode.UNAVAILABLE,
                              f"no moe-frames connection to {self._where()} in time") from None
        except OSError as e:
            raise Unreachable(grpc.StatusCode.UNAVAILABLE,
                              f"cannot connect to moe-frames at {self._where()}: {e.strerror or e}") from None
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def _take(self) -> tuple[socket.socket, ClientSession | None] | None:
        """A kept connection that is still open (a closed one reads as readable: EOF), with its session."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn, session = self._idle.pop()
            try:
                readable, _, _ = select.select([conn], [], [], 0)
            except (OSError, ValueError):
                readable = [conn]
            if not readable:
                return conn, session
            conn.close()

    def _keep(self, conn: socket.socket, session: ClientSession | None) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append((conn, session))
                return
        conn.close()

    def _where(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _failed(self, conn: socket.socket, error: BaseException) -> BaseException:
        """The connection is closed (its answer, if any, may still come); the error a caller gets."""
        conn.close()
        if isinstance(error, TimeoutError):
            return p.FrameError(grpc.StatusCode.DEADLINE_EXCEEDED, "no answer by the deadline (moe-frames)")
        if isinstance(error, p.ProtocolError):
            return p.FrameError(error.code, error.message)
        if isinstance(error, OSError):
            return p.FrameError(grpc.StatusCode.UNAVAILABLE, f"moe-frames connection to {self._where()} broke: "
                                                             f"{error.strerror or error}")
        return error


class PendingCall:
    """A call on one of a channel's connections, sent (or partly: `unsent`), its answer not read yet."""

    def __init__(self, channel: FramesChannel, conn: socket.socket, deadline: float, frame: list[memoryview],
                 session: ClientSession | None, test: AnswerTest | None):
        """`test`: what the answer must pass to be taken (its session MAC or its signature), or None."""
        self._channel, self._conn, self.deadline, self._session = channel, conn, deadline, session
        self._test = test
        self.unsent = [b for b in frame if len(b)]   # what is still to be sent, in order
        # The answer, read part by part (header, then MAC, details and body once the header says their
        # sizes), so that a caller can take in what has arrived without waiting for the rest (read_available).
        self._parts = [bytearray(p.RESPONSE.size)]
        self._part = self._got = 0
        self._code: grpc.StatusCode | None = None

    def send_available(self) -> None:
        """Send what the socket takes at once, without waiting; the rest stays in `unsent` (for
        `send_rest()`). Raises FrameError when the connection breaks."""
        conn = self._conn
        try:
            _nonblocking(conn)
            while self.unsent:
                first = self.unsent[0][conn.send(self.unsent[0]):]
                self.unsent[0:1] = [first] if len(first) else []
        except BlockingIOError:
            pass
        except OSError as e:
            raise self._channel._failed(conn, e) from None

    def send_rest(self) -> None:
        """Send what is left of the frame (blocking, until the deadline); raises FrameError."""
        conn = self._conn
        try:
            conn.settimeout(_left(self.deadline))
            for buffer in self.unsent:
                conn.sendall(buffer)
            self.unsent = []
        except (TimeoutError, OSError) as e:
            raise self._channel._failed(conn, e) from None

    def fileno(self) -> int:
        """The connection's descriptor: readable once the answer starts to arrive (for select)."""
        return self._conn.fileno()

    def read_available(self) -> bool:
        """Take in what has arrived of the answer, without waiting; True once it is whole (then `finish()`
        returns at once). A peer that sends part of an answer and stalls holds up nobody this way.
        Raises FrameError when the connection breaks or the answer breaks the protocol."""
        try:
            return self._fill(blocking=False)
        except (p.ProtocolError, OSError) as e:
            raise self._channel._failed(self._conn, e) from None

    def finish(self) -> bytearray:
        """Wait for the answer (until the deadline) and return its body; raises FrameError."""
        code, details, answer = self.answer()
        if self._session is not None and code in _SESSION_UNSURE:
            self._conn.close()   # the server's seq may lag ours: the next call would be out of order
        else:
            self._channel._keep(self._conn, self._session)
        self._channel.calls += 1
        if code is not grpc.StatusCode.OK:
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(p.BUSY):
                raise Unreachable(code, details)   # refused before the body was read: not processed
            raise p.FrameError(code, details)
        return answer

    def answer(self) -> tuple[grpc.StatusCode, str, bytearray]:
        """Wait for the answer (until the deadline): (status, details, body). The connection is neither
        kept nor closed unless it broke (FrameError)."""
        if self.unsent:
            self.send_rest()
        try:
            self._fill(blocking=True)
            tag, details, body = self._parts[1:]
        except (TimeoutError, p.ProtocolError, OSError) as e:
            raise self._channel._failed(self._conn, e) from None
        if self._test is not None:
            refused = self._test(self._code.value[0], bytes(details), body, bytes(tag) if tag else None)
            if refused is not None:   # the connection (and its session) cannot be trusted any more
                self._conn.close()
                raise AnswerRefused(f"{refused}; moe-frames at {self._channel._where()}")
        return self._code, details.decode("utf-8", "replace"), body

    def _fill(self, blocking: bool) -> bool:
        """Read the answer's parts in order; True when all are in. Not blocking: stops at what has arrived."""
        conn = self._conn
        while self._part < len(self._parts):
            view = memoryview(self._parts[self._part])
            if self._got < len(view):
                if blocking:
                    conn.settimeout(_left(self.deadline))
                else:
                    _nonblocking(conn)
                try:
                    n = conn.recv_into(view[self._got:])
                except BlockingIOError:
                    return False
                if n == 0:
                    raise ConnectionResetError("the server closed the connection")
                self._got += n
                continue
            if self._part == 0:   # the header: the sizes of what follows
                code, details_len, body_len = p.parse_response_header(self._parts[0], self._channel.max_body_bytes)
                self._code = code
                self._parts += [bytearray(p.answer_tag_bytes(self._parts[0])), bytearray(details_len),
                                bytearray(body_len)]
            self._part, self._got = self._part + 1, 0
        return True

    def abandon(self) -> None:
        """Give the call up: its connection is closed, since the answer may still come."""
        self._conn.close()


def _nonblocking(conn: socket.socket) -> None:
    """`conn.setblocking(False)` unless it already is: each one is a system call, and a decode-sized
    call's answer is read in three parts, each read once its socket is readable."""
    if conn.gettimeout() != 0.0:
        conn.setblocking(False)


def _method_name(method: str, deadline: float) -> bytes:
    if deadline <= time.monotonic():
        raise p.FrameError(grpc.StatusCode.DEADLINE_EXCEEDED, "no time left to send the call (moe-frames)")
    return method.encode("ascii")


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left
