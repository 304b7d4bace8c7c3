"""The router's HTTP API, beside gRPC and on the same engine (standard library server only).

    api = HttpApi(servicer.engine, "127.0.0.1", 8080, access=HttpAccess(token="s3cret")).start()
    curl -s 127.0.0.1:8080/v1/completions -H 'Authorization: Bearer s3cret' \\
         -H 'Content-Type: application/json' -d '{"prompt": "ROMEO:", "max_tokens": 20}'

- `POST /v1/completions`: OpenAI's completion request and answer (services/router/completions.py);
  `"stream": true` answers with server-sent events, `data: {chunk}` each, then `data: [DONE]`.
- `GET /health`: 200 `{"status": "serving"}` once the model is loaded and served, 503 before
  and while stopping.
- `GET /model_info`: vocab, block size, layers, experts, step, live replicas per expert.

Who may complete (`HttpAccess`): with a token (ROUTER_HTTP_TOKEN) every completion must send
`Authorization: Bearer <token>` (401 without or with another); without one, completions are
open when the gRPC Generate is (AUTH_MODE=off or ROUTER_OPEN_GENERATE=1) and refused with 403
otherwise. The HTTP API has no request signing: it is for people and OpenAI clients, put TLS in
front of it. /health and /model_info are open, like gRPC Health and Info.

Errors are JSON, `{"error": {"message": ..., "type": ...}}`: 400 for a request the gRPC API
would refuse too (same checks, same limits) or a body too deeply nested to parse, 404 for
another path, 405 (with `Allow`) for another method (HEAD gets GET's status and headers),
408 for a request not read whole within ROUTER_HTTP_TIMEOUT_S (services/router/http_deadlines.py),
411/413 for a missing or too large body, 503 when the model stays busy longer than
ROUTER_HTTP_TIMEOUT_S, when the queue is full or while the router stops; the standard library's
own refusals (malformed request line or headers, unknown method, HTTP/2) are JSON too. Each
connection has its own thread (at most MAX_CONNECTIONS; more get 503) and carries one request; a
client that stops reading blocks only its own thread, and only until the socket timeout. A client
that goes away before its answer stops the generation for it, and is logged at debug level only.
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.router import completions
from services.router.decode_loop import ShuttingDown, StreamFailed
from services.router.generation import Overloaded, RequestError, RouterEngine
from services.router.http_deadlines import ReadDeadlines
from subnet.telemetry import PROPAGATOR

log = logging.getLogger(__name__)
_tracer = trace.get_tracer(__name__)
DRAIN_MAX_BYTES = 1 << 20   # an oversized body up to this is read and dropped, so the 413 reaches the client
# Connections served at once (one thread each); more are answered 503 at once. The model computes
# one token at a time anyway: beyond this, threads would only wait for it.
MAX_CONNECTIONS = 64
_BUSY_BODY = json.dumps({"error": {"message": "too many connections to the router; try again",
                                    "type": "server_error"}}).encode()
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
         b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
                411: "invalid_request_error", 413: "invalid_request_error", 414: "invalid_request_error",
                431: "invalid_request_error", 503: "server_error"}
_METHODS = {"/v1/completions": "POST", "/health": "GET", "/model_info": "GET"}   # each route's `Allow`
_ROUTES = ", ".join(f"{method} {path}" for path, method in _METHODS.items())    # for "no route" answers


@dataclass(frozen=True)
class HttpAccess:
    """Who may call POST /v1/completions (see the module docstring)."""

    token: str = ""        # non-empty: the bearer token every completion must send
    open: bool = False     # no token: anyone (True) or no one (False)

    def refusal(self, authorization: str | None) -> tuple[int, str, str] | None:
        """(status, reason, message) when the caller may not complete; None when it may."""
        if not self.token:
            if self.open:
                return None
            return (403, "http_closed", "completions over HTTP are closed on this router: it needs "
                                        "ROUTER_HTTP_TOKEN or ROUTER_OPEN_GENERATE=1 (or use signed gRPC)")
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return 401, "http_no_token", "send `Authorization: Bearer <token>` (ROUTER_HTTP_TOKEN)"
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return 401, "http_bad_token", "the bearer token is not this router's"
        return None


class HttpApi:
    """A ThreadingHTTPServer over a RouterEngine, with the start/stop lifecycle of the other servers."""

    def __init__(self, engine: RouterEngine, host: str, port: int, *, access: HttpAccess | None = None,
                 max_body_bytes: int = 64 * 1024, timeout_s: float = 30.0, model_name: str = "moe-subnet",
                 max_connections: int = MAX_CONNECTIONS):
        """`access` None: completions open to anyone (tests, AUTH_MODE=off)."""
        self.engine, self.model_name = engine, model_name
        self.access = access if access is not None else HttpAccess(open=True)
        self.max_body_bytes, self.timeout_s = max_body_bytes, timeout_s
        self.deadlines = ReadDeadlines(timeout_s)   # the whole request must be in within timeout_s
        try:
            self._server = _Server((host, port), _Handler, max_connections)
        except OSError as e:
            raise OSError(f"cannot bind the router's HTTP API to {host}:{port} ({e.strerror}); "
                          f"set ROUTER_HTTP_PORT to a free port") from None
        self._server.api = self
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._serving = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def serving(self) -> bool:
        return self._serving.is_set()

    def start(self) -> HttpApi:
        self.deadlines.start()
        self._thread = threading.Thread(target=self._server.serve_forever, name="router-http", daemon=True)
        self._thread.start()
        self._serving.set()
        log.info("router HTTP API on %s", self.url)
        return self

    def stop(self) -> None:
        """/health says 503 first; requests in flight are not waited for (their threads are daemons)."""
        self._serving.clear()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()
        self.deadlines.stop()

    def reject(self, reason: str) -> None:
        self.engine.metrics.auth_rejections.labels(reason=reason).inc()


class _Server(ThreadingHTTPServer):
    """A thread per connection, up to `max_connections`; beyond, a 503 from the accepting thread."""

    def __init__(self, address, handler, max_connections: int):
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(max_connections)

    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request, client_address):
        # socketserver's default prints a traceback to stderr. A connection that fails (the client
        # reset it, or sent less body than it announced) is the client's doing: no traceback for it.
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.debug("HTTP connection from %s failed: %s", client_address[0], error)
        else:
            log.exception("HTTP connection from %s failed", client_address[0])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # for `Expect: 100-continue`; every answer still closes the connection
    server_version = "moe-router"
    server: ThreadingHTTPServer
    _answered = False   # status line sent: an error can no longer be answered with a status
    _head = False       # a HEAD request: answers carry GET's headers and no body
    _poller = None      # select.poll on the connection, made when first asked whether the client is gone
    read_expired = False   # set by ReadDeadlines: the request was not in within the API's timeout_s

    @property
    def api(self) -> HttpApi:
        return self.server.api

    def setup(self):
        self.timeout = self.api.timeout_s   # socket reads and writes: a silent client frees its thread
        super().setup()
        self.api.deadlines.watch(self)      # and the whole request: a trickling one does too

    def finish(self):
        try:
            super().finish()
        finally:
            self.api.deadlines.done(self)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (a malformed request line or header, a line over 64 KiB,
        an unknown method, another HTTP version) as the same JSON errors as ours, not its HTML page."""
        self.api.deadlines.done(self)
        self.close_connection = True
        self._answer_with_status_line()
        if self.read_expired:
            return self._timed_out()
        text = message or self.responses.get(code, ("error",))[0]
        self._error(code, f"{text}: {explain}" if explain else text)

    def _read_in_time(self) -> bool:
        """The request is read: its deadline is off. False (and 408 answered) when it was cut off."""
        self.api.deadlines.done(self)
        if self.read_expired:
            self._timed_out()
            return False
        return True

    def _answer_with_status_line(self) -> None:
        """A request the standard library refused before it parsed its version, or one whose request line
        was cut to two words, reads as HTTP/0.9, whose answers have no status line: give this one ours."""
        if self.request_version == "HTTP/0.9":
            self.request_version = self.protocol_version

    def _timed_out(self) -> None:
        self.close_connection = True
        self._answer_with_status_line()
        self._error(408, f"the request was not received whole within {self.api.timeout_s:g} s "
                         f"(ROUTER_HTTP_TIMEOUT_S); send the request line, headers and body at once")

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    # ---- routes -------------------------------------------------------------------------------

    def do_GET(self):
        if not self._read_in_time():
            return
        path = self.path.split("?", 1)[0]
        if path == "/health":  # no span: probes every few seconds would bury the traces worth reading
            return self._health()
        with self._span(path):
            if path == "/model_info":
                return self._json(200, {**self.api.engine.info(), "max_new_tokens": self.api.engine.max_new_tokens,
                                        "model": self.api.model_name})
            if path == "/v1/completions":
                return self._error(405, "use POST for /v1/completions", [("Allow", "POST")])
            return self._error(404, f"no route {path}: try {_ROUTES}")

    def do_POST(self):
        if self.read_expired:   # the headers were cut off: the body is not worth waiting for
            return self._read_in_time()
        path = self.path.split("?", 1)[0]
        with self._span(path):
            if path != "/v1/completions":
                return self._error(404, f"no route POST {path}: try POST /v1/completions")
            try:
                self._completions()
            except OSError as e:   # the connection failed: nobody to answer, and nothing to log loudly
                self.close_connection = True
                log.debug("POST /v1/completions: the connection failed (%s: %s)", e.__class__.__name__, e)
            except Exception:  # a bug or a broken model: one request fails, the server goes on
                log.exception("POST /v1/completions failed")
                if not self._answered:
                    self._error(500, "internal error in the router; see its log")

    def _not_allowed(self):
        """PUT, DELETE, PATCH, OPTIONS: 405 naming the method a route takes (stdlib's default is an
        HTML 501)."""
        path = self.path.split("?", 1)[0]
        with self._span(path):
            self._drain(self._length())   # an unread body would reset the connection before the answer
            if not self._read_in_time():
                return
            allowed = _METHODS.get(path)
            if allowed is None:
                return self._error(404, f"no route {self.command} {path}: try {_ROUTES}")
            return self._error(405, f"{self.command} is not allowed on {path}: use {allowed}", [("Allow", allowed)])

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

    def do_HEAD(self):
        """What GET would answer, headers only (probes and curl -I use it; stdlib's default is a 501)."""
        self._head = True
        self.do_GET()

    def handle_expect_100(self):
        # Refuse an oversized body before the client sends it.
        length = self._length()
        if length is not None and length > self.api.max_body_bytes:
            self._too_large(length, drain=False)
            return False
        return super().handle_expect_100()

    def _health(self):
        if self.api.serving:
            return self._json(200, {"status": "serving"})
        return self._json(503, {"status": "not_serving"})

    def _completions(self):
        api = self.api
        length = self._length()
        if length is None:
            self.api.deadlines.done(self)
            return self._error(411, "send the body with a Content-Length header (chunked bodies are not accepted)")
        if length > api.max_body_bytes:
            self._too_large(length, drain=True)
            return
        raw = self.rfile.read(length)
        if not self._read_in_time():
            return
        refusal = api.access.refusal(self.headers.get("Authorization"))
        if refusal is not None:
            status, reason, message = refusal
            api.reject(reason)
            return self._error(status, message, [("WWW-Authenticate", "Bearer")] if status == 401 else ())
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as e:
            return self._error(400, f"the body is not valid JSON: {e}")
        except RecursionError:   # b"[" * 60000: the parser's recursion, not a server error
            return self._error(400, "the body nests arrays or objects too deeply to parse; send one flat JSON "
                                    "object, e.g. {\"prompt\": \"...\", \"max_tokens\": 16}")
        try:
            request = completions.parse_request(body, api.engine.max_new_tokens)
            idx = api.engine.prompt(request.prompt)
            gone = threading.Event()
            # Streamed, a failed write says the client is gone; otherwise nothing is written until
            # the end, so the connection itself is looked at between tokens.
            active = (lambda: not gone.is_set()) if request.stream else (lambda: not self._client_gone())
            tokens = api.engine.generate(idx, request.params, wait_s=api.timeout_s, active=active)
        except RequestError as e:
            return self._error(400, str(e))
        except (Overloaded, ShuttingDown) as e:   # the queue is full, or the router is stopping: not a bug
            return self._error(503, str(e))
        answer = _Answer(completions.new_id(), int(time.time()), api.model_name, idx.shape[1],
                         completions.TextAssembler(api.engine.decode, request.stop))
        if request.stream:
            return self._stream(tokens, answer, gone)
        try:
            text = "".join(answer.pieces(tokens))
        except (Overloaded, ShuttingDown) as e:
            return self._error(503, str(e))
        except StreamFailed as e:   # logged by the decode loop already (rate-limited)
            return self._error(500, f"{e}; see the router's log")
        finally:
            tokens.close()   # a stop sequence ended it early: free the model's stream now
        if self._client_gone():
            log.debug("completion cut short: the client went away before the answer")
            self.close_connection = True
            return
        self._json(200, answer.completion(text))

    def _stream(self, tokens, answer: _Answer, gone: threading.Event) -> None:
        self._answered = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            try:
                for piece in answer.pieces(tokens):
                    if piece:
                        self._event(answer.chunk(piece))
                self._event(answer.chunk("", answer.text.finish))
                self._event("[DONE]")
            except (Overloaded, StreamFailed, ShuttingDown) as e:
                self._event({"error": {"message": str(e), "type": "server_error"}})
        except OSError as e:  # the client went away or stopped reading: stop computing for it
            gone.set()
            log.debug("streamed completion cut short by the client (%s)", e.__class__.__name__)
        finally:
            tokens.close()

    # ---- helpers ------------------------------------------------------------------------------

    def _span(self, path: str):
        """The request's SERVER span, continuing the caller's trace (`traceparent` header) if sent."""
        return _tracer.start_as_current_span(f"{self.command} {path}", context=PROPAGATOR.extract(self.headers),
                                             kind=SpanKind.SERVER, attributes={
                                                 "http.request.method": self.command, "url.path": path,
                                                 "client.address": self.client_address[0]})

    def _length(self) -> int | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return None
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return None
        return length if length >= 0 else None

    def _client_gone(self) -> bool:
        """The client closed or reset its connection. It sends nothing after its body, so a readable
        socket means end of file (or a pipelined request: not gone). poll, not select: a router's
        sockets may be numbered beyond select's 1024."""
        try:
            if self._poller is None:
                self._poller = select.poll()
                self._poller.register(self.connection, select.POLLIN)
            return bool(self._poller.poll(0)) and not self.connection.recv(1, socket.MSG_PEEK)
        except (OSError, ValueError):   # reset, or already closed
            return True

    def _drain(self, length: int | None) -> None:
        """Read and drop a body of up to DRAIN_MAX_BYTES: closing with it unread resets the
        connection before the client reads the answer."""
        left = length if length is not None and length <= DRAIN_MAX_BYTES else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)

    def _too_large(self, length: int, drain: bool) -> None:
        if drain:
            self._drain(length)
        self.api.deadlines.done(self)
        self._error(413, f"the body has {length} bytes; the limit is {self.api.max_body_bytes} "
                         f"(ROUTER_HTTP_MAX_BODY_KB)")

    def _error(self, status: int, message: str, headers=()) -> None:
        self._json(status, {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"),
                                      "param": None, "code": None}}, headers)

    def _json(self, status: int, body: dict, headers=()) -> None:
        self._answered = True
        data = json.dumps(body).encode()
        span = trace.get_current_span()
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR, str(body)[:200]))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        if not self._head:
            self.wfile.write(data)

    def _event(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())


class _Answer:
    """The parts of one completion answer that stay the same across its chunks."""

    def __init__(self, cid: str, created: int, model: str, prompt_tokens: int, text: completions.TextAssembler):
        self.cid, self.created, self.model, self.prompt_tokens, self.text = cid, created, model, prompt_tokens, text
        self.masked_calls = 0

    def pieces(self, tokens):
        """The text to send, piece by piece, until a stop sequence or the token budget ends it."""
        for token in tokens:
            self.masked_calls += token.masked_calls
            yield self.text.add(token.id)
            if self.text.finish:
                return
        yield self.text.flush()

    def chunk(self, piece: str, finish: str | None = None) -> dict:
        return completions.chunk(self.cid, self.created, self.model, piece, finish)

    def completion(self, text: str) -> dict:
        return completions.completion(self.cid, self.created, self.model, text, self.text.finish,
                                      self.prompt_tokens, self.text.tokens, self.masked_calls)
