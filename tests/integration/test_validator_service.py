"""`python -m services.validator` as a real process: it publishes global version 0 from
VALIDATOR_INIT_CHECKPOINT into an empty S3, serves its metrics, and exits 0 on SIGTERM; starting
again finds version 0 and publishes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from services.validator.global_model import bootstrap_global
from subnet.checkpoints import LATEST_KEY, latest_global_version, read_latest_global
from subnet.identity import load_identity
from subnet.processes import die_with_parent, free_port
from tests.integration.test_validator_rounds import init_dir  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _metrics(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return ""


def test_validator_process_bootstraps_serves_metrics_and_stops_on_sigterm(tmp_path, redis_server, s3_server,
                                                                          object_store, dev_wallets, init_dir):  # noqa: F811
    wallet = dev_wallets.create(f"validator-{uuid.uuid4().hex[:6]}")
    prefix = f"test:validator-service:{uuid.uuid4().hex[:8]}:"
    port = free_port()
    env = {**os.environ, **s3_server.env(bucket=object_store.bucket), "REDIS_URL": redis_server.url,
           "VALIDATOR_KEY_PREFIX": prefix, "CHAIN_REDIS_URL": redis_server.url, "CHAIN_KEY_PREFIX": prefix + "chain:",
           "VALIDATOR_INIT_CHECKPOINT": str(init_dir), "VALIDATOR_RUN_DIR": str(tmp_path / "run"),
           "VALIDATOR_METRICS_PORT": str(port), "VALIDATOR_THREADS": "1", "WALLET_PATH": wallet.path,
           "WALLET_NAME": wallet.name, "WALLET_HOTKEY": wallet.hotkey, "PYTHONUNBUFFERED": "1"}

    def run() -> tuple[int, str]:
        log = tmp_path / "validator.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "services.validator"], cwd=ROOT, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)  # noqa: PLW1509
        try:
            deadline = time.monotonic() + 60
            while "validator_global_version 0.0" not in _metrics(port):
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, f"no metrics after 60 s:\n{log.read_text()}"
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            return proc.wait(30), log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    code, log = run()
    assert code == 0, log
    assert "stopped" in log
    me = load_identity(wallet).hotkey
    first = read_latest_global(object_store, expected_hotkey=me)   # signed by the validator's hotkey
    assert first.manifest.version == 0 and "experts.safetensors" in first.files
    pointer = object_store.get_bytes(LATEST_KEY)

    # S3 holds version 0 now: a validator starting again publishes nothing.
    assert bootstrap_global(object_store, load_identity(wallet), init_dir) == 0
    assert latest_global_version(object_store) == 0 and object_store.get_bytes(LATEST_KEY) == pointer
