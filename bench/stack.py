"""Redis and expert services as child processes of a benchmark, and nothing left behind.

    with BenchStack() as stack:
        endpoints = stack.start_experts(deal_experts([0], 8, 2),   # services.stack.placement dim=1024, inter_dim=2816,
                                        checkpoint=path, threads=1)
        group = RemoteExpertGroup(0, 8, 1024, stack.replicas, clients=stack.clients, ...)

Processes are started through `services.stack.processes.ProcessGroup` (the local stack's
own helper): every child gets PR_SET_PDEATHSIG, so the kernel kills it even when the
benchmark dies by SIGKILL, and `stop()` (also run by `__exit__` on an exception) ends them
with SIGTERM, then SIGKILL. Logs go to a temporary directory, deleted on stop; a child
that fails to start raises with the tail of its log.

Auth is on by default, as in production: each expert service gets its own development
wallet (in the log directory) and allows only this stack's client hotkey, with which the
channel pool signs every call. `BenchStack(auth=False)` runs them with AUTH_MODE=off.

The channel pool takes the router's transports: moe-frames, and shared memory for tensors of
SHM_MIN_KB and up (`SHM_*` from the environment, as `services.router` reads them: on by default,
and used since the services are on this host). `SHM_TRANSPORT=off` makes every tensor inline.

This module only starts and stops processes and hands out the router-side registry view
and channel pool. It measures nothing.
"""

from __future__ import annotations

import itertools
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import redis

from services.router.metrics import RouterMetrics
from services.router.remote_model import RemoteParts
from services.router.replicas import ReplicaSet
from services.router.tracing import ExpertCallTracer
from services.stack.processes import Child, ProcessGroup, wait_serving
from subnet.dev.redis_server import RedisServer
from subnet.envconfig import from_env
from subnet.expert_client import ChannelSettings, ExpertClientPool
from subnet.identity import create_dev_wallet, load_identity
from subnet.processes import free_port
from subnet.registry import ExpertRegistry
from subnet.shm import ShmConfig

START_TIMEOUT_S = 120.0   # torch import in each child on two busy cores
PORT_RETRIES = 3          # a port picked by free_port() may be taken before the child binds it


class BenchStack:
    """One embedded Redis, any number of expert services and helper processes; `stop()` ends all."""

    def __init__(self, max_message_mb: int = 80, auth: bool = True):
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-bench-")
        self.log_dir = Path(self._tmp.name)
        self.group = ProcessGroup(self.log_dir)
        self.redis: RedisServer | None = None
        self._redis_client: redis.Redis | None = None
        self.auth = auth
        self._wallet_numbers = itertools.count()
        self.identity = load_identity(create_dev_wallet(self.log_dir / "wallets", "bench-client")) if auth else None
        self.clients = ExpertClientPool(ChannelSettings(max_message_mb=max_message_mb), identity=self.identity,
                                        hotkeys=lambda endpoint: self.replicas.hotkey(endpoint) if self.replicas
                                        else None, shm=from_env(ShmConfig))
        self.registry: ExpertRegistry | None = None
        self.replicas: ReplicaSet | None = None
        self.endpoints: list[str] = []
        self._pending: list[tuple[list[str], dict[str, str], Child, str]] = []  # spawned, not yet SERVING

    # ---- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        """Close channels, stop every child (SIGTERM, then SIGKILL after 5 s) and Redis, delete logs."""
        self.clients.close()
        for child in self.group.children:   # all at once: each drains in parallel, not one after another
            if child.process.poll() is None:
                child.process.terminate()
        try:
            self.group.stop(grace_s=5.0)
        finally:
            if self._redis_client is not None:
                self._redis_client.close()
                self._redis_client = None
            if self.redis is not None:
                self.redis.stop()
                self.redis = None
            self._tmp.cleanup()

    # ---- expert services ----------------------------------------------------------------------

    def start_experts(self, deals: Sequence[Sequence[str]], dim: int, inter_dim: int, checkpoint: str | Path,
                      threads: int = 1, env: dict[str, str] | None = None) -> list[str]:
        """One `python -m services.expert` per entry of `deals` (its uids), all registered in this
        stack's Redis, each with `threads` torch threads. Returns their endpoints once every
        one is SERVING and the registry lists every uid."""
        self.spawn_experts(deals, dim, inter_dim, checkpoint, threads, env)
        return self.wait_experts()

    def spawn_experts(self, deals: Sequence[Sequence[str]], dim: int, inter_dim: int, checkpoint: str | Path,
                      threads: int = 1, env: dict[str, str] | None = None) -> None:
        """`start_experts` without the wait: services of several stacks then start side by side."""
        if self.redis is None:
            self.redis = RedisServer(port=0).start()
            self._redis_client = redis.Redis.from_url(self.redis.url)
            self.registry = ExpertRegistry(self._redis_client)
            # Refreshed by hand in wait_experts; a long refresh_s keeps registry reads out of timed calls.
            self.replicas = ReplicaSet(self.registry, policy="round_robin", refresh_s=3600.0)
        for uids in deals:
            env_i = {"EXPERT_UIDS": ",".join(uids), "EXPERT_DIM": str(dim), "EXPERT_INTER_DIM": str(inter_dim),
                     "EXPERT_HOST": "127.0.0.1", "EXPERT_CHECKPOINT": str(checkpoint), "REDIS_URL": self.redis.url,
                     "EXPERT_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                     "MKL_NUM_THREADS": str(threads), "EXPERT_GRACE_S": "1", "EXPERT_LOG_LEVEL": "WARNING",
                     **self._auth_env(), **(env or {})}
            self._pending.append((list(uids), env_i, *self._spawn_expert(env_i)))

    def _auth_env(self) -> dict[str, str]:
        if not self.auth:
            return {"AUTH_MODE": "off"}
        wallet = create_dev_wallet(self.log_dir / "wallets", f"expert-{next(self._wallet_numbers)}")
        return {"WALLET_PATH": wallet.path, "WALLET_NAME": wallet.name, "WALLET_HOTKEY": wallet.hotkey,
                "AUTH_ALLOWLIST": self.identity.hotkey}

    def wait_experts(self) -> list[str]:
        """Wait until every spawned service is SERVING and registered; their endpoints, in spawn order."""
        pending, self._pending = self._pending, []
        endpoints = []
        for _, env_i, child, endpoint in pending:
            for attempt in range(PORT_RETRIES):
                try:
                    self._wait_serving(child, endpoint)
                    break
                except RuntimeError:
                    if attempt == PORT_RETRIES - 1 or "in use" not in _tail(child):
                        raise
                    self.group.children.remove(child)  # exited; check_alive must not see it again
                    child, endpoint = self._spawn_expert(env_i)
            endpoints.append(endpoint)
        self._check_registered([(uids, endpoint) for (uids, *_), endpoint in zip(pending, endpoints)])
        self.endpoints.extend(endpoints)
        return endpoints

    def _spawn_expert(self, env: dict[str, str]) -> tuple[Child, str]:
        port = free_port()
        name = f"expert-{len(self.group.children)}-{port}"
        child = self.group.start(name, ["-m", "services.expert"], {**env, "EXPERT_PORT": str(port)})
        return child, f"127.0.0.1:{port}"

    def _wait_serving(self, child: Child, endpoint: str) -> None:
        try:
            wait_serving(endpoint, self.group, timeout_s=START_TIMEOUT_S, what=child.name)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n--- {child.name} log ---\n{_tail(child)}") from None

    def _check_registered(self, expected: list[tuple[Sequence[str], str]]) -> None:
        self.replicas.refresh()
        for uids, endpoint in expected:
            for uid in uids:
                if endpoint not in {r.endpoint for r in self.replicas.replicas(uid)}:
                    raise RuntimeError(f"expert {uid} at {endpoint} is SERVING but not in the registry")

    def service_pids(self) -> list[int]:
        """The process ids of the children started so far (expert services and helpers)."""
        return [child.process.pid for child in self.group.children]

    def remote_parts(self) -> RemoteParts:
        """What `services.router.remote_model.build_remote_lm` needs, on this stack's registry and channels."""
        if self.replicas is None:
            raise RuntimeError("start the expert services first")
        return RemoteParts(self.registry, self.replicas, self.clients, RouterMetrics(), ExpertCallTracer(),
                           self.identity)

    # ---- other helper processes ---------------------------------------------------------------

    def start_python(self, name: str, args: list[str], port: int, env: dict[str, str] | None = None,
                     timeout_s: float = START_TIMEOUT_S) -> Child:
        """`python args...` as a child; returns once it accepts TCP connections on 127.0.0.1:`port`."""
        child = self.group.start(name, args, env or {})
        deadline = time.monotonic() + timeout_s
        while True:
            if child.process.poll() is not None:
                raise RuntimeError(f"{name} exited with code {child.process.returncode}:\n{_tail(child)}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                    return child
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not listen on port {port} within {timeout_s:.0f} s:\n{_tail(child)}")
            time.sleep(0.1)


def _tail(child: Child, chars: int = 2000) -> str:
    if child.log_path is None or not child.log_path.exists():
        return ""
    return child.log_path.read_text(errors="replace")[-chars:]
