"""deploy/k8s against the Kubernetes schemas (kubernetes-validate, strict, pinned version) and
against the code: env keys, ports, probes, images and the GPU/CPU variants."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
import yaml

from moe.config import preset
from services.router.remote_model import required_expert_uids
from tests.deploy.declared import (
    IMAGE_HOME,
    ROOT,
    SERVICES,
    command_args,
    environment_problems,
    option,
    proto_service_names,
    service_module,
)
from tests.deploy.files import (
    K8S_DIR,
    KUBERNETES_VERSION,
    PROMETHEUS_DIR,
    container_environment,
    containers,
    k8s_all_documents,
    k8s_documents,
    pod_labels,
    pod_spec,
)

NAMESPACE = "moe-subnet"
OPTIONAL = "moe-subnet.io/optional"
PLACEHOLDER = "REPLACE-ME"


def objects(folder: str = "") -> list[dict]:
    return [doc for _, doc in k8s_documents(folder)]


def by_kind(kind: str, folder: str = "") -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects(folder) if o["kind"] == kind}


def configmaps() -> dict[str, dict]:
    return {name: o.get("data") or {} for name, o in by_kind("ConfigMap").items()}


def template_secrets() -> dict[str, dict]:
    return {name: {**(o.get("data") or {}), **(o.get("stringData") or {})}
            for name, o in by_kind("Secret", "templates").items()}


def workloads(folders=("", "cpu")) -> list[tuple[str, dict]]:
    return [(f"{folder or '.'}/{o['kind']}/{o['metadata']['name']}", o)
            for folder in folders for o in objects(folder) if pod_spec(o) is not None]


@dataclass
class Ours:
    """A container that runs one of our services."""

    where: str
    role: str          # container or initContainer
    container: dict
    module: str
    env: dict[str, str]
    words: list[str]   # its command and args


def our_containers(folders=("", "cpu"), tools: bool = False) -> list[Ours]:
    """Containers running one of our services (and with `tools`, our one-shot tools)."""
    out = []
    for where, obj in workloads(folders):
        for role, c in containers(pod_spec(obj)):
            command = c.get("command", []) + c.get("args", [])
            module = service_module(command)
            if module is not None and (tools or module in SERVICES):
                env = container_environment(c, configmaps(), template_secrets())
                out.append(Ours(f"{where} {role} {c['name']}", role, c, module, env, command_args(command)))
    return out


def image_uid() -> int:
    text = (ROOT / "Dockerfile").read_text()
    return int(re.findall(r"^USER (\d+)", text, re.M)[-1])


def test_every_manifest_validates_strictly_against_the_pinned_kubernetes():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (a test extra)")
    problems = []
    for path, doc in k8s_all_documents():
        where = f"{path.relative_to(ROOT)} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
        except kv.ValidationError as e:
            problems.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
        except kv.SchemaNotFoundError:
            problems.append(f"{where}: no {KUBERNETES_VERSION} schema for {doc.get('apiVersion')} {doc.get('kind')}")
    assert problems == [], "\n".join(problems)
    assert len(k8s_all_documents()) >= 20


def test_applied_in_order_and_all_in_one_namespace():
    files = sorted(p.name for p in K8S_DIR.glob("*.yaml"))
    assert files[0].startswith("00-") and k8s_documents()[0][1]["kind"] == "Namespace"
    for path, doc in k8s_all_documents():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{path.name} {doc['metadata']['name']}"


def test_no_secret_is_applied_and_the_template_holds_no_real_value():
    assert "Secret" not in {o["kind"] for o in objects()} | {o["kind"] for o in objects("cpu")}
    secrets = template_secrets()
    assert secrets, "deploy/k8s/templates/secret.yaml must hold the Secret template"
    for name, values in secrets.items():
        for key, value in values.items():
            assert value == PLACEHOLDER, f"secret template {name}.{key} holds a value; use {PLACEHOLDER}"
    for where, obj in workloads():
        for _, c in containers(pod_spec(obj)):
            for item in c.get("env") or []:
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get(ref["name"], {}), f"{where}: secret {ref} not in the template"
        for volume in pod_spec(obj).get("volumes", []):
            if "secret" in volume:
                template = secrets.get(volume["secret"]["secretName"])
                assert template is not None, f"{where}: Secret {volume['secret']['secretName']} has no template"
                for item in volume["secret"].get("items", []):
                    assert item["key"] in template, f"{where}: key {item['key']} is not in the Secret template"


def wallet_names(workload: dict, container: dict, env: dict[str, str]) -> list[str]:
    """The wallet each pod of `workload` signs with: WALLET_NAME, or, taken from the pod's name
    (a StatefulSet's pods are <name>-0, <name>-1, ...), one per replica."""
    by_pod_name = any(item["name"] == "WALLET_NAME" and
                      item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name"
                      for item in container.get("env") or [])
    if not by_pod_name:
        return [env["WALLET_NAME"]]
    assert workload["kind"] == "StatefulSet", "only a StatefulSet's pod names are known in advance"
    return [f"{workload['metadata']['name']}-{i}" for i in range(workload["spec"]["replicas"])]


def test_expert_pods_are_miners_of_their_own():
    """Pods sharing a hotkey would overwrite each other's checkpoints and commitments: each expert
    pod signs with a wallet of its own, and the local chain registers every one of them."""
    job_spec = by_kind("Job")["local-chain-register"]["spec"]["template"]["spec"]
    registered = " ".join(word for _, c in containers(job_spec) for word in c.get("command", []))
    experts = 0
    for where, obj in workloads():
        for role, c in containers(pod_spec(obj)):
            env = container_environment(c, configmaps(), template_secrets())
            if role == "container" and service_module(c.get("command", [])) == "services.expert":
                names = wallet_names(obj, c, env)
                assert len(set(names)) == obj["spec"]["replicas"], f"{where}: wallets {names}"
                for name in names:
                    assert f" {name}" in registered, f"{where}: {name} is not registered on the local chain"
                experts += 1
    assert experts == 2   # GPU and CPU StatefulSets


def test_wallets_are_mounted_read_only_where_the_services_look():
    checked = 0
    for where, obj in workloads():
        spec = pod_spec(obj)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for role, c in containers(spec):
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            for mount in mounts.values():
                if "secret" in volumes.get(mount["name"], {}):
                    assert mount.get("readOnly") is True, f"{where} {c['name']}: secret {mount['name']} writable"
            env = container_environment(c, configmaps(), template_secrets())
            if "WALLET_PATH" not in env or role == "initContainer":  # `router init` signs nothing
                continue
            mount = mounts.get(env["WALLET_PATH"])
            assert mount is not None, f"{where} {c['name']}: nothing mounted at WALLET_PATH={env['WALLET_PATH']}"
            items = {item["path"] for item in volumes[mount["name"]]["secret"]["items"]}
            for name in wallet_names(obj, c, env):
                hotkey = f"{name}/hotkeys/{env.get('WALLET_HOTKEY', 'default')}"
                assert hotkey in items, f"{where} {c['name']}: the wallet volume has no {hotkey}"
            checked += 1
    assert checked >= 5  # router, validator, scorer, GPU experts, CPU experts


def test_every_service_environment_is_what_its_code_declares():
    found = our_containers(tools=True)
    assert {o.module for o in found} >= {"services.expert", "services.router", "subnet.chain"}
    problems = []
    for o in found:
        problems += environment_problems(o.module, o.env, o.where)
    assert problems == [], "\n".join(problems)


def test_ports_and_native_grpc_probes_match_the_services():
    health_names = proto_service_names()
    for o in our_containers():
        if o.role != "container":
            continue
        spec, c, env, where = SERVICES[o.module], o.container, o.env, o.where
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if spec.grpc_port:
            assert env[spec.bind_host] == "0.0.0.0", where
            grpc_port = int(env[spec.grpc_port])
            assert ports.get("grpc") == grpc_port, f"{where}: port grpc {ports.get('grpc')}, serves {grpc_port}"
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                assert probe and "grpc" in probe, f"{where}: {kind} must be a native gRPC probe"
                assert probe["grpc"]["port"] == grpc_port, f"{where}: {kind} probes {probe['grpc']['port']}"
                service = probe["grpc"].get("service", "")
                assert service == "" or service in health_names, f"{where}: {kind} asks for {service!r}"
            assert c["readinessProbe"]["grpc"].get("service") == spec.health_service, where
        if spec.metrics_port:
            assert ports.get("metrics") == int(env[spec.metrics_port]), f"{where}: metrics port"
        if spec.grpc_port is None and spec.metrics_port:  # no gRPC server: probes ask the metrics endpoint
            assert env[spec.bind_host] == "0.0.0.0", where
            for kind in ("readinessProbe", "livenessProbe"):
                probe = c.get(kind) or {}
                assert probe.get("httpGet", {}).get("port") in ("metrics", ports.get("metrics")), \
                    f"{where}: {kind} must be an httpGet on the metrics port"


def test_init_container_runs_a_real_subcommand():
    inits = [o for o in our_containers() if o.role == "initContainer"]
    assert inits
    for o in inits:
        assert o.module == "services.router" and "init" in o.words, o.where
        assert option(o.words, "--out") and option(o.words, "--preset"), o.where


def test_pods_are_hardened_and_sized():
    uid = image_uid()
    for where, obj in workloads():
        spec = pod_spec(obj)
        pod_security = spec.get("securityContext") or {}
        assert pod_security.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
        assert spec.get("automountServiceAccountToken") is False, f"{where}: no API token needed"
        volumes = {v["name"] for v in spec.get("volumes", [])}
        volumes |= {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
        for role, c in containers(spec):
            name = f"{where} {role} {c['name']}"
            security = c.get("securityContext") or {}
            assert security.get("allowPrivilegeEscalation") is False, name
            assert security.get("readOnlyRootFilesystem") is True, name
            assert security.get("capabilities", {}).get("drop") == ["ALL"], name
            resources = c.get("resources") or {}
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name}: {bound} cpu and memory"
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert set(mounts.values()) <= volumes, f"{name}: mounts undeclared volumes"
            if c["image"].startswith("moe-subnet:"):
                assert pod_security.get("runAsUser") == uid, f"{name}: the image's user is {uid}"
                assert {"/tmp", IMAGE_HOME} <= set(mounts), f"{name}: read-only root needs /tmp and HOME mounted"


def test_services_select_pods_and_name_their_ports():
    templates = [(pod_labels(o), pod_spec(o)) for _, o in workloads(("",))]
    for name, svc in by_kind("Service").items():
        selector = svc["spec"]["selector"]
        matches = [spec for labels, spec in templates if selector.items() <= labels.items()]
        assert matches, f"Service {name} selects no pods"
        port_names = {p["name"] for spec in matches for c in spec["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"Service {name}: targetPort {port['targetPort']}"
    for name, sts in by_kind("StatefulSet").items():
        governing = by_kind("Service")[sts["spec"]["serviceName"]]
        assert governing["spec"].get("clusterIP") == "None", f"StatefulSet {name} needs a headless Service"
    for name, pdb in by_kind("PodDisruptionBudget").items():
        selector = pdb["spec"]["selector"]["matchLabels"]
        assert any(selector.items() <= labels.items() for labels, _ in templates), f"PDB {name} selects no pods"
    for app in ("router", "expert", "validator", "scorer"):
        assert any(p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == app
                   for p in by_kind("PodDisruptionBudget").values()), f"{app} has no PodDisruptionBudget"


def test_experts_request_gpus_and_the_cpu_variant_replaces_exactly_them():
    gpu_only = {(o["kind"], o["metadata"]["name"]) for o in objects()
                if o["metadata"].get("labels", {}).get(OPTIONAL) == "gpu-experts"}
    cpu_variant = {(o["kind"], o["metadata"]["name"]) for o in objects("cpu")}
    assert gpu_only == cpu_variant == {("StatefulSet", "expert")}
    for o in our_containers():
        if o.module != "services.expert":
            continue
        where, c, env = o.where, o.container, o.env
        gpus = {bound: c["resources"].get(bound, {}).get("nvidia.com/gpu") for bound in ("requests", "limits")}
        if where.startswith("./"):
            assert gpus["requests"] == gpus["limits"] == 1, f"{where}: nvidia.com/gpu {gpus}"
            assert env["EXPERT_DEVICE"].startswith("cuda") and c["image"].endswith("-cuda"), where
        else:
            assert gpus == {"requests": None, "limits": None}, where
            assert env["EXPERT_DEVICE"] == "cpu" and not c["image"].endswith("-cuda"), where


def test_experts_serve_the_model_the_router_initializes():
    inits = [o.words for o in our_containers() if o.role == "initContainer"]
    assert len(inits) == 1
    lm = preset(option(inits[0], "--preset"))
    for o in our_containers():
        if o.module == "services.expert":
            assert sorted(o.env["EXPERT_UIDS"].split(",")) == sorted(required_expert_uids(lm)), o.where
            assert (int(o.env["EXPERT_DIM"]), int(o.env["EXPERT_INTER_DIM"])) == (lm.dim, lm.moe_inter_dim), o.where
            # The router's init checkpoint is on its own volume: the pods start from the global version
            # the validator publishes from it, in the bucket they use.
            assert o.env["EXPERT_CHECKPOINT"] == f"s3://{o.env['S3_BUCKET']}/checkpoints/global/latest", o.where


def test_every_service_of_the_rounds_reaches_the_same_checkpoint_store():
    """Experts publish and commit there, the router reveals its trunk there, the validator reads
    both: one without S3 leaves the rounds with nothing to validate."""
    stores = {}
    for o in our_containers():
        if o.role == "initContainer" or o.module not in ("services.expert", "services.router", "services.validator"):
            continue
        keys = ("S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_BUCKET")
        assert all(o.env.get(k) for k in keys), f"{o.where}: {[k for k in keys if not o.env.get(k)]} unset"
        stores[o.where] = tuple(o.env[k] for k in keys)
    assert {w.split()[0].split("/")[-1] for w in stores} >= {"expert", "router", "validator"}, sorted(stores)
    assert len(set(stores.values())) == 1, stores


def test_prometheus_in_the_cluster_scrapes_what_the_services_expose():
    config_map = by_kind("ConfigMap")["prometheus-config"]["data"]
    assert config_map["prometheus.yml"] == (PROMETHEUS_DIR / "prometheus-k8s.yml").read_text(), \
        "50-prometheus.yaml: copy deploy/prometheus/prometheus-k8s.yml into the ConfigMap"
    assert config_map["rules.yml"] == (PROMETHEUS_DIR / "rules.yml").read_text(), \
        "50-prometheus.yaml: copy deploy/prometheus/rules.yml into the ConfigMap"
    prom = yaml.safe_load(config_map["prometheus.yml"])
    services = by_kind("Service")
    metrics_ports: dict[str, set[int]] = {}
    for o in our_containers():
        if o.role == "container" and SERVICES[o.module].metrics_port:
            metrics_ports.setdefault(o.module, set()).add(int(o.env[SERVICES[o.module].metrics_port]))
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for dns_name in sd["names"]:
                svc_name, namespace, _ = dns_name.split(".", 2)
                svc = services[svc_name]
                assert namespace == NAMESPACE and svc["spec"].get("clusterIP") == "None", dns_name
                assert svc["spec"].get("publishNotReadyAddresses") is True, f"{svc_name}: scrape pods not yet ready"
                assert sd["port"] in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "metrics"}, dns_name
                assert sd["port"] in metrics_ports[f"services.{job['job_name']}"], job["job_name"]
