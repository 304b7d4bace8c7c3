"""Chaos fixtures: real expert services on a private Redis per test, so a test may kill, pause or
restart anything it started without disturbing other tests.

pytest finds fixtures only in conftest files on a test's own path, and tests/integration is not
on the path of tests/chaos: the integration fixtures used here are imported by name below.

ledger (function)
    `harness.Ledger` of every pid the test started; at teardown, after everything was stopped,
    each must be gone (os.kill(pid, 0) fails), else the test errors with the survivors' names.
chaos_redis (function)
    `harness.ChaosRedis`: a private redis-server, `.restart()` on the same port, `.pid` to pause.
chaos_experts (function)
    `ExpertServiceFactory` (tests/integration/conftest.py) registering in `chaos_redis`; at
    teardown every service is resumed (SIGCONT) and stopped, all at once. A test that restarts
    a service puts the pid of the process it replaced into the ledger itself.
chaos_report (session)
    `harness.Report`: `record(test, **numbers)` prints them; the session writes them to
    tests/chaos/.results/summary.json and shows them in the terminal summary.
"""

from __future__ import annotations

import signal

import pytest
import torch

from tests.chaos.harness import ChaosRedis, Ledger, Report, resume
from tests.integration.conftest import ExpertServiceFactory, client_identity, dev_wallets  # noqa: F401

_REPORT_KEY = pytest.StashKey[Report]()


@pytest.fixture(autouse=True)
def one_torch_thread():
    # The router side shares two cores with the services it calls.
    torch.set_num_threads(1)


@pytest.fixture
def ledger():
    ledger = Ledger()
    yield ledger
    alive = ledger.alive()
    assert not alive, f"processes outlived the test: {alive}"


@pytest.fixture
def chaos_redis(ledger):
    server = ChaosRedis(ledger)
    yield server
    server.stop()


@pytest.fixture
def chaos_experts(ledger, chaos_redis, tmp_path, dev_wallets):  # noqa: F811
    factory = ExpertServiceFactory(chaos_redis.url, tmp_path, dev_wallets)
    yield factory
    for handle in factory.handles:
        if handle.process is not None and handle.process.poll() is None:
            ledger.add(f"expert service {handle.endpoint}", handle.process.pid)
            resume(handle.process.pid)
            handle.process.send_signal(signal.SIGTERM)  # all drain at once; close() waits for each
    factory.close()


@pytest.fixture(scope="session")
def chaos_report(request) -> Report:
    return request.config.stash.setdefault(_REPORT_KEY, Report())


def pytest_terminal_summary(terminalreporter, config):
    report = config.stash.get(_REPORT_KEY, None)
    if report is None or not report.results:
        return
    path = report.write()
    terminalreporter.section("chaos numbers")
    for test, numbers in sorted(report.results.items()):
        terminalreporter.write_line(f"{test}: {numbers}")
    terminalreporter.write_line(f"written to {path}")
