"""CallInbox (services/router/call_inbox.py): answers handed over by other threads and answers read on
the waiting thread from watched sockets both come out of `get`; nothing is lost when they mix."""

import queue
import socket
import threading

import pytest

from services.router.call_inbox import CallInbox


class _SocketCall:
    """A watched call: readable when its peer writes; `on_readable` reads and puts the answer."""

    def __init__(self, inbox: CallInbox, name: str):
        self.inbox, self.name = inbox, name
        self.ours, self.peer = socket.socketpair()
        self.completed_on: threading.Thread | None = None

    def fileno(self) -> int:
        return self.ours.fileno()

    def on_readable(self) -> bool:
        self.completed_on = threading.current_thread()
        self.inbox.put((self.name, self.ours.recv(100)))
        return True

    def close(self) -> None:
        self.ours.close()
        self.peer.close()


def test_a_watched_call_is_completed_on_the_waiting_thread():
    inbox = CallInbox()
    call = _SocketCall(inbox, "a")
    inbox.watch(call)
    threading.Timer(0.05, lambda: call.peer.send(b"answer")).start()
    assert inbox.get(timeout=5.0) == ("a", b"answer")
    assert call.completed_on is threading.current_thread()
    call.close()
    inbox.close()


def test_a_put_from_another_thread_wakes_a_wait_on_sockets():
    inbox = CallInbox()
    call = _SocketCall(inbox, "silent")   # never answers
    inbox.watch(call)
    threading.Timer(0.05, lambda: inbox.put("from a call thread")).start()
    assert inbox.get(timeout=5.0) == "from a call thread"
    with pytest.raises(queue.Empty):      # and then nothing more: the wait ends at its timeout
        inbox.get(timeout=0.05)
    call.close()
    inbox.close()


def test_answers_of_both_kinds_all_come_out():
    inbox = CallInbox()
    calls = [_SocketCall(inbox, f"s{i}") for i in range(3)]
    for call in calls:
        inbox.watch(call)
    threads = [threading.Timer(0.01 * i, inbox.put, args=(f"t{i}",)) for i in range(3)]
    for i, call in enumerate(calls):
        threads.append(threading.Timer(0.01 * i + 0.005, call.peer.send, args=(b"x",)))
    for t in threads:
        t.start()
    got = {inbox.get(timeout=5.0) for _ in range(6)}
    assert got == {"t0", "t1", "t2", ("s0", b"x"), ("s1", b"x"), ("s2", b"x")}
    for call in calls:
        call.close()
    inbox.close()


def test_without_watched_calls_it_is_a_plain_queue():
    inbox = CallInbox()
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.01)
    inbox.put(1)
    assert inbox.get(timeout=0.01) == 1
    inbox.close()


def test_a_forgotten_call_is_not_completed():
    inbox = CallInbox()
    call = _SocketCall(inbox, "gone")
    inbox.watch(call)
    inbox.forget(call)
    call.peer.send(b"late")
    with pytest.raises(queue.Empty):
        inbox.get(timeout=0.05)
    assert call.completed_on is None
    call.close()
    inbox.close()


class _PartialCall(_SocketCall):
    """An answer that never becomes whole: each wake-up takes in a byte and says "not yet"."""

    def on_readable(self) -> bool:
        self.ours.recv(1)
        return False


def test_a_call_whose_answer_stays_partial_is_kept_watched_and_get_still_times_out():
    inbox = CallInbox()
    call = _PartialCall(inbox, "partial")
    inbox.watch(call)
    call.peer.send(b"half")
    with pytest.raises(queue.Empty):   # it returns at its timeout: the partial answer holds nobody up
        inbox.get(timeout=0.1)
    inbox.put("later")
    assert inbox.get(timeout=5.0) == "later"   # still watched, still waking up for the others
    call.close()
    inbox.close()


def test_the_wake_up_pair_is_kept_for_the_threads_next_inbox_without_a_stale_wake_up():
    first = CallInbox()
    call = _SocketCall(first, "silent")
    first.watch(call)
    with pytest.raises(queue.Empty):   # a wait on sockets: the inbox makes its wake-up pair
        first.get(timeout=0.01)
    pair = first._wake
    first._selecting = True            # a put that lands while the waiting thread is about to close
    first.put("late")
    first._selecting = False
    first.close()
    with pytest.raises(BlockingIOError):   # the late put's wake-up byte was drained
        pair[0].recv(1)
    second = CallInbox()
    second.watch(call)
    with pytest.raises(queue.Empty):
        second.get(timeout=0.01)
    assert second._wake is pair        # the same two sockets, not a new pair
    threading.Timer(0.05, lambda: second.put("from a call thread")).start()
    assert second.get(timeout=5.0) == "from a call thread"   # and it still wakes the wait
    second.close()
    call.close()
