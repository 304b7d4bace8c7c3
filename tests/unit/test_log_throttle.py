"""LogThrottle: what a hostile peer can trigger at will is logged once per interval, and the next
line says how many were left out."""

import logging

from subnet.log_throttle import LogThrottle
from tests.manual_clock import ManualClock

log = logging.getLogger("test.log_throttle")


def test_one_line_per_interval_and_the_next_one_counts_what_was_left_out(caplog):
    clock = ManualClock()
    throttle = LogThrottle(10.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.log_throttle"):
        assert throttle.warning(log, "refused %s from %s", "Forward", "peer-0")
        logged = [throttle.warning(log, "refused %s from %s", "Forward", f"peer-{i}") for i in range(1, 1001)]
        clock.now = 9.9
        assert not throttle.warning(log, "refused %s from %s", "Forward", "late")
        clock.now = 10.0
        assert throttle.warning(log, "refused %s from %s", "Backward", "peer-x")
        clock.now = 25.0
        assert throttle.warning(log, "refused %s from %s", "Forward", "quiet")
    assert not any(logged)
    assert [r.getMessage() for r in caplog.records] == [
        "refused Forward from peer-0",
        "refused Backward from peer-x (1001 more not logged since the last one; one line per 10 s at most)",
        "refused Forward from quiet",   # nothing was left out since the last line
    ]


def test_due_is_the_bare_decision():
    clock = ManualClock()
    throttle = LogThrottle(1.5, clock=clock)
    assert throttle.due() == 0 and throttle.due() is None and throttle.due() is None
    clock.now = 1.5
    assert throttle.due() == 2
    assert throttle.left_out(2) == " (2 more not logged since the last one; one line per 1.5 s at most)"
    assert throttle.left_out(0) == ""
