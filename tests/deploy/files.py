"""Reading the deploy files as the tools would: compose with its ${VAR} interpolation,
Kubernetes manifests document by document, and the external tools the checks run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests.deploy.declared import ROOT

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S_DIR = ROOT / "deploy" / "k8s"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
KUBERNETES_VERSION = "1.30.0"  # the oldest Kubernetes the manifests promise to work with (native gRPC probes: 1.27+)

# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}, $VAR and the escape $$.
_INTERPOLATION = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                            r"(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: {line!r} is not KEY=value"
            values[key.strip()] = value.strip()
    return values


def interpolated_names(text: str) -> set[str]:
    return {m.group("name") or m.group("bare") for m in _INTERPOLATION.finditer(text) if not m.group("escaped")}


def interpolate(text: str, values: dict[str, str]) -> str:
    """Compose's variable substitution (the subset of the spec docker-compose.yml may use)."""
    def substitute(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg, value = m.group("op"), m.group("arg") or "", values.get(name)
        if op in (":-", "-") and (value is None or (op == ":-" and value == "")):
            return arg
        if op in (":?", "?") and (value is None or (op == ":?" and value == "")):
            raise ValueError(f"{name}: {arg}")
        return value or ""
    return _INTERPOLATION.sub(substitute, text)


@cache
def compose(with_env_example: bool = True) -> dict:
    """docker-compose.yml as `docker compose` sees it, with .env.example as the .env (or none)."""
    values = read_env_file(ENV_EXAMPLE) if with_env_example else {}
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), values))


def environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def healthcheck_words(service: dict) -> list[str]:
    test = (service.get("healthcheck") or {}).get("test") or []
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return list(test)


@cache
def k8s_documents(folder: str = "") -> list[tuple[Path, dict]]:
    """(file, object) for every manifest in deploy/k8s/<folder> (only that folder, as `kubectl apply -f` reads it)."""
    out = []
    for path in sorted((K8S_DIR / folder).glob("*.yaml")) + sorted((K8S_DIR / folder).glob("*.yml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path, doc))
    return out


def k8s_all_documents() -> list[tuple[Path, dict]]:
    folders = sorted({p.parent.relative_to(K8S_DIR).as_posix() for p in K8S_DIR.rglob("*.y*ml")})
    return [item for folder in folders for item in k8s_documents("" if folder == "." else folder)]


def pod_spec(obj: dict) -> dict | None:
    kind = obj.get("kind")
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"):
        return obj["spec"]["template"]["spec"]
    if kind == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if kind == "Pod":
        return obj["spec"]
    return None


def pod_labels(obj: dict) -> dict:
    return obj["spec"]["template"]["metadata"].get("labels") or {}


def containers(spec: dict) -> list[tuple[str, dict]]:
    return ([("initContainer", c) for c in spec.get("initContainers") or []]
            + [("container", c) for c in spec.get("containers") or []])


def container_environment(container: dict, configmaps: dict[str, dict], secrets: dict[str, dict]) -> dict[str, str]:
    """The variables a container gets: envFrom (ConfigMaps, Secrets) then env, values where known."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            env.update({k: str(v) for k, v in configmaps[source["configMapRef"]["name"]].items()})
        elif "secretRef" in source:
            env.update({k: str(v) for k, v in secrets[source["secretRef"]["name"]].items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                env[item["name"]] = str(configmaps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]])
            elif "secretKeyRef" in ref:
                env[item["name"]] = str(secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]])
            elif ref.get("fieldRef", {}).get("fieldPath") == "metadata.name":
                env[item["name"]] = "pod-0"   # the pod's name, known once it runs; a name of that form
            else:
                env[item["name"]] = ""
    return env


# --- external tools ---------------------------------------------------------------------------------

def tool(name: str, install: str) -> str:
    """Path of a command-line tool (the venv's bin first); skips the test when it is not installed."""
    venv_bin = Path(sys.executable).parent / name
    found = str(venv_bin) if venv_bin.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({install}); .ci/run installs it")
    return found


def compose_command() -> list[str]:
    """docker-compose (Debian's v1) or the `docker compose` plugin; skip when neither is there."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    pytest.skip("neither docker-compose nor the docker compose plugin is installed "
                "(apt-get install docker-compose); .ci/run installs it")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.update(kwargs.pop("env", {}))
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, **kwargs)
