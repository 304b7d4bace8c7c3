"""Where the thread that sent a round of expert calls collects their answers.

    inbox = CallInbox()
    future.add_done_callback(lambda f: inbox.put(("answer", f)))   # any thread
    inbox.watch(inline_call)           # an inline moe-frames call: this thread reads its answer itself
    item = inbox.get(timeout=0.5)      # queue.Empty when nothing came in time
    inbox.close()

Answers come two ways. A call carried by one of the pool's call threads hands its answer over
(`put`). An inline call (subnet.expert_client.InlineCall: sent from this thread, a small tensor
over moe-frames) has no thread of its own: `get` waits on its socket with `select` and, each time
it is readable, takes in what arrived here (`on_readable()`, never waiting for the rest; once the
answer is whole, its done-callbacks `put` it). That saves the
two thread hand-offs a call thread costs per call (submit, then the answer back), which were the
largest router-side part of a decode step's latency on two busy cores. While `get` waits in
`select`, a `put` from another thread wakes it through a socket pair. That pair is kept for the
thread's next inbox (`close` drains it): making and closing one took five system calls per MoE layer.
"""

from __future__ import annotations

import queue
import select
import socket
import threading
import time
from typing import Any, Protocol

_spare = threading.local()   # .pair: the wake-up pair of this thread's last closed inbox, for its next one


class Watchable(Protocol):
    def fileno(self) -> int: ...

    def on_readable(self) -> bool:
        """Take in what arrived, without waiting; True once done (its done-callbacks `put` the answer)."""


class CallInbox:
    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._watched: dict[int, Watchable] = {}   # fileno -> call whose answer this thread reads
        self._lock = threading.Lock()
        self._selecting = False
        self._wake: tuple[socket.socket, socket.socket] | None = None
        self._woken = False   # a put sent a wake-up byte since the last drain

    def put(self, item: Any) -> None:
        """Hand an answer to the waiting thread (any thread)."""
        self._queue.put(item)
        with self._lock:
            if self._selecting and self._wake is not None:
                self._woken = True
                try:
                    self._wake[1].send(b"\0")
                except (BlockingIOError, OSError):   # full: a wake-up is pending anyway
                    pass

    def watch(self, call: Watchable) -> None:
        """`call`'s answer is read by `get` (on the thread that calls it) once its socket is readable."""
        self._watched[call.fileno()] = call

    def forget(self, call: object) -> None:
        """Stop watching `call` (given up)."""
        self._watched = {fd: c for fd, c in self._watched.items() if c is not call}

    def get(self, timeout: float) -> Any:
        """The next answer; raises queue.Empty when none came within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self._queue.get_nowait()
            except queue.Empty:
                pass
            left = deadline - time.monotonic()
            if not self._watched:
                return self._queue.get(timeout=max(left, 0.0))
            if left <= 0:
                raise queue.Empty
            self._wait_sockets(left)

    def close(self) -> None:
        """Done with this inbox; on the thread that called `get`. A later `put` wakes nothing."""
        with self._lock:
            wake, self._wake = self._wake, None
            woken, self._woken = self._woken, False
        if wake is None:
            return
        if woken:
            _drain(wake[0])
        if getattr(_spare, "pair", None) is None:
            _spare.pair = wake
        else:
            for end in wake:
                end.close()

    def _wait_sockets(self, timeout: float) -> None:
        """One select on the watched sockets and the wake-up end; completes the readable calls."""
        if self._wake is None:
            self._wake, _spare.pair = getattr(_spare, "pair", None) or _wake_pair(), None
        with self._lock:
            self._selecting = True
        try:
            if not self._queue.empty():   # put before _selecting was set: it sent no wake-up
                return
            readable, _, _ = select.select([self._wake[0], *self._watched], [], [], timeout)
        finally:
            with self._lock:
                self._selecting = False
        for fd in readable:
            if fd is self._wake[0]:
                with self._lock:
                    self._woken = False
                _drain(fd)
                continue
            call = self._watched.get(fd)
            if call is not None and call.on_readable():   # its done-callbacks put the answer
                del self._watched[fd]


def _wake_pair() -> tuple[socket.socket, socket.socket]:
    pair = socket.socketpair()
    for end in pair:
        end.setblocking(False)
    return pair


def _drain(end: socket.socket) -> None:
    """Read (and drop) the wake-up bytes waiting in `end`."""
    try:
        while end.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass
