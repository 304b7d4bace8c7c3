"""What the compose and the Kubernetes rehearsals share: opening a stage inside a fixture (skipped
where namespaces are refused, checked for leftovers after), waiting on a condition while the
services stay alive, and a clean-up that runs every step whatever the others raise."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from subnet.dev.redis_server import redis_server_binary
from subnet.dev.s3_server import S3Server
from subnet.processes import die_with_parent, port_in_use
from tests.deploy.declared import ROOT
from tests.netns import free_subnet, kill_processes_in, sh, skip_when_refused


@contextlib.contextmanager
def staged(stage) -> Iterator:
    """`stage.open()` (a skip where this machine refuses namespaces), yield it, then `stage.close()`,
    which must leave nothing behind."""
    try:
        with skip_when_refused():
            stage.open()
        yield stage
    finally:
        left = stage.close()
    assert not left, f"left behind: {left}"


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float, check_alive: Callable[[], None]) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.5)


def mount_options(pid: int) -> dict[str, set[str]]:
    """Mount point -> its per-mount options, in the mount namespace of process `pid` (the topmost
    mount where several share a point)."""
    options: dict[str, set[str]] = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])   # \040 is a space, ...
        options[point] = set(fields[5].split(","))
    return options


def mount_point_of(path: Path) -> str:
    """The mount point of the file system `path` is on."""
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return str(path)


def assert_mounted_read_only(name: str, pid: int, paths: list[str]) -> None:
    """Each of `paths` is a read-only mount where process `pid` (of `name`) sees it."""
    mounts = mount_options(pid)
    for path in paths:
        assert "ro" in mounts.get(path, ()), f"{name}: {path} is not mounted read-only: {mounts.get(path)}"


def prometheus_scrapes(address: str, wanted: set[tuple[str, str]], wait: Callable[[Callable[[], bool], str], None],
                       dns_queries: Callable[[], list[str]]) -> None:
    """`wait(condition, what)` until the Prometheus at `address` (host:port) has every (job, instance) of
    `wanted` up, then require its alert rules loaded; a timeout names what was up and what the DNS
    stand-in was asked."""
    def up() -> set[tuple[str, str]]:
        with urllib.request.urlopen(f"http://{address}/api/v1/targets", timeout=5) as answer:
            targets = json.load(answer)["data"]["activeTargets"]
        return {(t["labels"]["job"], t["labels"]["instance"]) for t in targets if t["health"] == "up"}

    try:
        wait(lambda: wanted <= up(), f"Prometheus to scrape {sorted(wanted)}")
    except AssertionError as e:
        raise AssertionError(f"{e}; up: {sorted(up())}; DNS queries: {sorted(set(dns_queries()))}") from None
    with urllib.request.urlopen(f"http://{address}/api/v1/rules", timeout=5) as answer:
        assert json.load(answer)["data"]["groups"], "Prometheus loaded no alert rules"


def _hidden_by(path: Path) -> Path | None:
    """The highest folder above `path` that others may not search (no o+x), or None."""
    return next((folder for folder in reversed(path.parents) if not folder.stat().st_mode & 0o001), None)


def interpreter_mounts(stage: Path) -> list[str]:
    """Shell commands that let a container's (non-root) user reach this Python, its virtual environment
    and the repository, as an image's user reaches /opt/venv, where a folder above them is closed to
    others on this host (pyenv's Python under /root, 0700): in the container's mount namespace that
    folder becomes an empty read-only tmpfs (mode 0711) holding only read-only bind mounts of the
    entries leading to them, staged through `stage` (an empty folder). Nothing changes on the host."""
    needed = [Path(sys.base_prefix), Path(sys.prefix), Path(sys.executable).resolve(), ROOT]
    entries: dict[Path, set[str]] = {}
    for path in needed:
        folder = _hidden_by(path)
        if folder is not None:
            entries.setdefault(folder, set()).add(path.relative_to(folder).parts[0])
    q = shlex.quote
    steps = []
    for i, (folder, names) in enumerate(sorted(entries.items())):
        staged = stage / str(i)
        staged.mkdir(parents=True, exist_ok=True)
        steps += [f"mount --bind {q(str(folder))} {q(str(staged))}",
                  f"mount -t tmpfs -o mode=0711,size=64k moe-rehearsal {q(str(folder))}"]
        for name in sorted(names):
            target, source = q(str(folder / name)), q(str(staged / name))
            steps += [f"{'mkdir' if (folder / name).is_dir() else 'touch'} {target}",
                      f"mount --bind {source} {target}", f"mount -o remount,bind,ro {target}"]
        steps += [f"umount {q(str(staged))}", f"mount -o remount,ro {q(str(folder))}"]
    return steps


def searchable(path: Path, opened: list[tuple[Path, int]]) -> None:
    """`path` and every folder above it searchable by others (o+x), so that a container's user reaches
    its volumes (pytest's base temporary folder is 0700, root's); each folder changed is added to
    `opened` with its mode before, for `restore_modes`."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode & 0o7777
        if not mode & 0o001:
            opened.append((folder, mode))
            folder.chmod(mode | 0o001)


def restore_modes(opened: list[tuple[Path, int]]) -> None:
    """Give the folders `searchable` opened their modes back (those still there), last opened first."""
    while opened:
        folder, mode = opened.pop()
        with contextlib.suppress(FileNotFoundError):
            folder.chmod(mode)


def container_mounts(read_only: list[str], read_only_root: bool, writable: list[str],
                     root_mounts: list[str], tmpfs: list[str] = ()) -> list[str]:
    """Shell commands that give a container its file system as Docker or the kubelet would. It runs in
    a mount namespace of its own with private propagation (`unshare --mount`, in the one `ip netns
    exec` makes), so these bind mounts and per-mount flags never reach the host; they refuse writes
    even as root: with a read-only root file system the `root_mounts` (`/`, and the mount holding the
    rehearsal's folders where that is another) are read-only but for its `writable` folders (bound
    first, so they stay writable mounts of their own), and its `read_only` volumes are read-only.
    `tmpfs` folders (among `writable`) stand for Docker's tmpfs mounts: nosuid, nodev and noexec, as
    Docker mounts them. Other mounts (/dev/shm, /proc, a separate /home, ...) keep their flags."""
    q = shlex.quote
    steps = []
    bound = set(writable) if read_only_root else set()
    steps += [f"mount --bind {q(path)} {q(path)}" for path in sorted(bound | set(tmpfs))]
    steps += [f"mount -o remount,bind,nosuid,nodev,noexec {q(path)}" for path in tmpfs]
    if read_only_root:
        steps += [f"mount -o remount,bind,ro {q(point)}" for point in root_mounts]
    for path in read_only:
        steps += [f"mount --bind {q(path)} {q(path)}", f"mount -o remount,bind,ro {q(path)}"]
    return steps


def setpriv(uid: int, gid: int, groups: list[int], drop_all_capabilities: bool, no_new_privs: bool) -> str:
    """The `setpriv` command (its words, ending with `--`) that runs what follows as `uid`:`gid` with
    `groups`, no inheritable capability, an empty bounding set when `drop_all_capabilities`, and
    no_new_privs when asked."""
    words = ["setpriv", f"--reuid={uid}", f"--regid={gid}",
             f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups", "--inh-caps=-all"]
    if drop_all_capabilities:
        words.append("--bounding-set=-all")
    if no_new_privs:
        words.append("--no-new-privs")
    return " ".join(words + ["--"])


_K8S_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_COMPOSE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30, "gb": 2**30}


def k8s_bytes(quantity: str | int) -> int:
    """A Kubernetes memory quantity (`4Gi`, `512Mi`, `1G`, `1048576`) in bytes."""
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity).strip())
    assert m and m.group(2) in _K8S_UNITS, f"memory quantity {quantity!r} is not one the rehearsal reads"
    return int(m.group(1)) * _K8S_UNITS[m.group(2)]


def compose_bytes(size: str | int) -> int:
    """A compose byte size (`4g`, `4gb`, `512m`, `1024k`, `100b`, `1073741824`) in bytes."""
    m = re.fullmatch(r"(\d+)([A-Za-z]*)", str(size).strip())
    assert m and m.group(2).lower() in _COMPOSE_UNITS, f"byte size {size!r} is not one the rehearsal reads"
    return int(m.group(1)) * _COMPOSE_UNITS[m.group(2).lower()]


class MemoryLimits:
    """Containers' memory limits as a container runtime sets them: one cgroup of the memory controller
    per container under `moe-rehearsal-<tag>`, its limit set before the container starts (no swap beyond
    it, where swap is accounted); the container's first process joins it before exec (`joined`) and
    what it starts stays in it, restarts included. Over its limit the kernel reclaims its page cache,
    then OOM-kills it, as in a cluster.

    cgroup v1's memory controller (what this machine mounts at /sys/fs/cgroup/memory); where there is
    none, `enforced` is False and nothing is limited."""

    V1 = Path("/sys/fs/cgroup/memory")

    def __init__(self, tag: str):
        self.root: Path | None = None
        self.groups: dict[str, Path] = {}
        self.limits: dict[str, int] = {}
        if (self.V1 / "memory.limit_in_bytes").exists() and os.access(self.V1, os.W_OK):
            self.root = self.V1 / f"moe-rehearsal-{tag}"
            self.root.mkdir()

    @property
    def enforced(self) -> bool:
        return self.root is not None

    def group(self, name: str, limit_bytes: int) -> Path | None:
        """The cgroup of container `name` (made at its first start) with `limit_bytes`; None if not enforced."""
        if self.root is None:
            return None
        if name not in self.groups:
            path = self.root / name
            path.mkdir()
            (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
            swap = path / "memory.memsw.limit_in_bytes"   # where swap is accounted: none beyond the limit
            if swap.exists():
                swap.write_text(str(limit_bytes))
            self.groups[name], self.limits[name] = path, limit_bytes
        return self.groups[name]

    @staticmethod
    def visible_steps() -> list[str]:
        """Shell commands, for a container started with `unshare --cgroup` after joining its group, that
        show it its memory cgroup as a container runtime does (`ip netns exec` mounts a /sys of its own,
        without cgroups): the memory hierarchy read-only at /sys/fs/cgroup/memory, rooted at its group."""
        return ["mount -t tmpfs -o mode=755,size=64k cgroup /sys/fs/cgroup", "mkdir /sys/fs/cgroup/memory",
                "mount -t cgroup -o memory,ro cgroup /sys/fs/cgroup/memory"]

    @staticmethod
    def joined(group: Path | None, argv: list[str]) -> list[str]:
        """`argv` run by a shell that first joins `group` (unchanged if None); a shell rather than a
        preexec_fn, which must not do file I/O in the fork of a process with threads."""
        if group is None:
            return argv
        return ["sh", "-c", f'echo $$ > {shlex.quote(str(group / "cgroup.procs"))} && exec "$@"', "join", *argv]

    def oom_kills(self) -> dict[str, int]:
        """OOM kills so far in each container's cgroup."""
        out = {}
        for name, path in self.groups.items():
            fields = dict(line.split() for line in (path / "memory.oom_control").read_text().splitlines())
            out[name] = int(fields.get("oom_kill", 0))
        return out

    def check(self) -> None:
        """AssertionError naming every container OOM-killed so far, with its limit (a rehearsal's
        check_alive calls this, so that a wait fails at once with the cause, not at its timeout)."""
        killed = {name: n for name, n in self.oom_kills().items() if n}
        if killed:
            raise AssertionError("OOM-killed under its memory limit: " + ", ".join(
                f"{name} {n} time(s) (limit {self.limits[name] / 2**20:.0f} MiB)" for name, n in killed.items()))

    def close(self, wait_s: float = 10.0) -> None:
        """Kill what is still in the cgroups (what a container started and its kill did not reach) and
        remove them, each whatever the others did; OSError naming those left, after `wait_s`."""
        deadline = time.monotonic() + wait_s
        left = []
        for path in [*self.groups.values(), *([self.root] if self.root is not None else [])]:
            while True:
                for pid in (path / "cgroup.procs").read_text().split() if path.exists() else []:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:   # EBUSY: a killed process is not reaped yet
                    if time.monotonic() > deadline:
                        left.append(f"{path}: {e}")
                        break
                    time.sleep(0.1)
        if left:
            raise OSError("memory cgroups left: " + "; ".join(left))

    def member(self, name: str, pid: int) -> bool:
        """Whether process `pid` is in container `name`'s cgroup."""
        with open(f"/proc/{pid}/cgroup") as f:
            paths = [line.rstrip("\n").split(":", 2)[2] for line in f if line.split(":", 2)[1] == "memory"]
        return bool(paths) and self.root is not None and paths[0] == f"/{self.root.name}/{name}"


def exported_memory_limit(address: str) -> float | None:
    """process_memory_limit_bytes on the /metrics page at `address` (host:port), or None if not there."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith("process_memory_limit_bytes "):
                return float(line.split()[1])
    return None


def assert_held_to_memory_limits(memory: MemoryLimits, running: dict[str, tuple[int, int, str | None]]) -> None:
    """Each running container, cgroup name -> (pid, limit in bytes, its /metrics address or None): in its
    cgroup, showing its limit on /metrics where it has one, and no container OOM-killed (where `memory` is
    enforced; a warning where not). Prints each one's peak resident memory (`pytest -rP` shows it)."""
    for name, (pid, limit, metrics) in running.items():
        assert limit, f"{name}: no memory limit"
        print(f"{name}: peak resident {peak_rss_bytes(pid) / 2**20:.0f} MiB of its {limit / 2**20:.0f} MiB limit")
        if memory.enforced:
            assert memory.member(name, pid), f"{name} is not in its memory cgroup"
            if metrics is not None:   # the service reads its limit from its cgroup, for the dashboard
                assert exported_memory_limit(metrics) == limit, f"{name}: its limit is not on /metrics"
    if memory.enforced:
        memory.check()
    else:
        warnings.warn("memory limits not enforced: no writable cgroup v1 memory controller here", stacklevel=2)


def peak_rss_bytes(pid: int) -> int:
    """The most memory process `pid` has had resident (VmHWM)."""
    return int(process_status(pid)["VmHWM"].split()[0]) * 1024


def process_status(pid: int) -> dict[str, str]:
    """/proc/<pid>/status as a dict (Uid, Gid, Groups, CapEff, CapBnd, NoNewPrivs, ...)."""
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_runs_as(name: str, pid: int, uid: int, gid: int, groups: list[int], no_capabilities: bool,
                   no_new_privs: bool) -> None:
    """Process `pid` (pod `name`'s container) runs as `uid`:`gid` (real, effective, saved and file system
    ids) with exactly `groups` as supplementary groups, no effective capability, none in its bounding set
    when `no_capabilities`, and no_new_privs set when `no_new_privs`."""
    status = process_status(pid)
    assert status["Uid"].split() == [str(uid)] * 4, f"{name} runs as uid {status['Uid']}, not {uid}"
    assert status["Gid"].split() == [str(gid)] * 4, f"{name} runs as gid {status['Gid']}, not {gid}"
    assert sorted(int(g) for g in status["Groups"].split()) == sorted(groups), f"{name}: groups {status['Groups']}"
    assert int(status["CapEff"], 16) == 0, f"{name} holds capabilities {status['CapEff']}"
    assert not no_capabilities or int(status["CapBnd"], 16) == 0, f"{name}: bounding set {status['CapBnd']}"
    assert not no_new_privs or status["NoNewPrivs"].strip() == "1", f"{name}: no_new_privs not set"


def write_refused(pid: int, folder: str) -> None:
    """A file written into `folder` from the mount namespace of process `pid` fails, read-only, and
    nothing appears there."""
    write = subprocess.run(["nsenter", "-t", str(pid), "-m", "touch", f"{folder}/written"],
                           capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write
    assert not (Path(folder) / "written").exists()


@dataclass(kw_only=True)
class OnBridge:
    """The bridge a rehearsal's namespaces hang off (`BRIDGE_PREFIX` + tag) and its address
    `<subnet>.1`, where the stand-ins for Redis and MinIO listen; one namespace per service on it,
    and what clean-up must remove (`_links`, `_namespaces`). A base of the rehearsals' dataclasses:
    its fields are keyword-only, after theirs."""

    BRIDGE_PREFIX = "rb"
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet: str = ""
    redis: subprocess.Popen | None = None
    s3: S3Server | None = None
    _links: list[str] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _opened: list[tuple[Path, int]] = field(default_factory=list)   # folders made searchable (searchable)

    @property
    def bridge(self) -> str:
        return f"{self.BRIDGE_PREFIX}{self.tag}"

    @property
    def bridge_address(self) -> str:
        return f"{self.subnet}.1"

    def make_bridge(self, subnet_prefix: str) -> None:
        """The bridge, on a free `<subnet_prefix>.X.0/24` (recorded in `_links` for clean-up)."""
        self.subnet = free_subnet(subnet_prefix)
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        sh("ip", "addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")

    def add_namespace(self, netns: str, veth: str, address: str, hosts: str) -> None:
        """Namespace `netns` on the bridge at `address` (veth pair `<veth>h`/`<veth>n`), its /etc/hosts
        `hosts` (mounted by `ip netns exec`); recorded for clean-up as it is made."""
        host_dev, ns_dev = f"{veth}h", f"{veth}n"
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


    def start_stand_ins(self, redis_argv: list[str], s3_keys: tuple[str, str], s3_data: Path, bucket_url: str,
                        bucket: str, logs: Path, timeout_s: float) -> None:
        """On the bridge's address: the wheel's redis-server on 6379 with the deployment's own Redis
        arguments (`redis_argv`, without the program), SeaweedFS's S3 API on 9000 for MinIO with its
        (access, secret) keys, and the bucket made as the deployment's `mc mb` job would, from its
        `http://<user>:<password>@minio:9000` URL."""
        from urllib.parse import urlsplit

        from minio import Minio

        for port in (6379, 9000):
            if port_in_use(port, self.bridge_address):
                raise RuntimeError(f"port {port} on {self.bridge_address} is in use")
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "redis.log", "wb") as log:
            self.redis = subprocess.Popen([redis_server_binary(), *redis_argv, "--bind", self.bridge_address,
                                           "--port", "6379"],
                                          stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        self.s3 = S3Server(port=9000, host=self.bridge_address, access_key=s3_keys[0], secret_key=s3_keys[1],
                           data_dir=s3_data, start_timeout_s=timeout_s).start()
        url = urlsplit(bucket_url)
        assert url.hostname == "minio", url.hostname
        client = Minio(f"{self.bridge_address}:{url.port}", access_key=url.username, secret_key=url.password,
                       secure=False)
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
        deadline = time.monotonic() + timeout_s
        while not port_in_use(6379, self.bridge_address):
            if self.redis.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis did not start: " + (logs / "redis.log").read_text())
            time.sleep(0.05)


def kill(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
        process.wait(10)


def terminate(processes: dict[str, tuple[subprocess.Popen, float]]) -> dict[str, int | None]:
    """SIGTERM to every process still running, as `docker compose stop` and the kubelet send it, then
    for each its exit code, or None when it was SIGKILLed after its grace period."""
    for process, _ in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    codes: dict[str, int | None] = {}
    for name, (process, grace_s) in processes.items():
        try:
            codes[name] = process.wait(grace_s)
        except subprocess.TimeoutExpired:
            kill(process)
            codes[name] = None
    return codes


class Cleanup:
    """Clean-up steps, each run whatever the others raised; `problems` says which failed."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def attempt(self, what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except Exception as e:  # clean-up goes on: a stuck process must not leave namespaces behind
            self.problems.append(f"{what}: {type(e).__name__}: {e}")

    def network(self, namespaces: list[str], links: list[str],
                after_kill: tuple[tuple[Callable[[], object], str], ...] = ()) -> list[str]:
        """Kill what still runs in `namespaces`, run `after_kill` ((step, what) each: what needs those
        processes gone), delete the namespaces, their /etc/netns folders and `links`; returns the
        problems and whatever is still there."""
        for netns in namespaces:
            self.attempt(f"kill what runs in {netns}", lambda netns=netns: kill_processes_in(netns))
        for step, what in after_kill:
            self.attempt(what, step)
        for link in links:
            self.attempt(f"delete {link}", lambda link=link: sh("ip", "link", "del", link, check=False))
        for netns in namespaces:
            self.attempt(f"delete {netns}", lambda netns=netns: sh("ip", "netns", "del", netns, check=False))
            shutil.rmtree(Path("/etc/netns") / netns, ignore_errors=True)
        names = sh("ip", "netns", "list", check=False).stdout + sh("ip", "-br", "link", check=False).stdout
        return self.problems + [n for n in (*namespaces, *links) if n in names] + \
            [str(p) for p in (Path("/etc/netns") / n for n in namespaces) if p.exists()]
