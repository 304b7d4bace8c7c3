"""ReadDeadlines: a handler whose request is not in by its deadline has its socket shut for reading (a
blocked read returns end of file) and `read_expired` set; one whose request came in time is left alone."""

from __future__ import annotations

import socket
import threading

import pytest

from services.router.http_deadlines import ReadDeadlines

pytestmark = pytest.mark.integration


class _Handler:
    def __init__(self):
        self.connection, self.peer = socket.socketpair()


@pytest.fixture
def deadlines():
    d = ReadDeadlines(limit_s=0.2, tick_s=0.05).start()
    yield d
    d.stop()


def test_a_late_request_is_cut_off_and_its_blocked_read_ends(deadlines):
    handler = _Handler()
    deadlines.watch(handler)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(handler.connection.recv(10)))
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive() and got == [b""]
    assert handler.read_expired and deadlines.expired == 1
    handler.connection.sendall(b"408")   # writing still works: the answer can go out
    assert handler.peer.recv(10) == b"408"


def test_a_request_read_in_time_is_left_alone(deadlines):
    handler = _Handler()
    deadlines.watch(handler)
    deadlines.done(handler)
    handler.peer.sendall(b"later")
    threading.Event().wait(0.5)   # past the deadline and several ticks
    assert handler.connection.recv(10) == b"later"
    assert not handler.read_expired and deadlines.expired == 0


def test_a_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit_s must be positive"):
        ReadDeadlines(limit_s=0)
