"""deploy/k8s against the Kubernetes schemas (kubernetes-validate, strict, pinned version) and
against the code: env keys, ports, probes, images and the GPU/CPU variants."""

from __future__ import annotations

import hashlib
import re
import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
import yaml

from moe.config import preset
from services.router.remote_model import required_expert_uids
from subnet.redis_acl import MINER_USER, miner_rules
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
SECRET_TEMPLATE = K8S_DIR / "templates" / "secret.yaml"
SECRET = "moe-subnet-secrets"
# The Secret's Redis URLs: the default user's (router, validator, scorer, local chain) and the miners'.
ADMIN_URL_KEY, MINER_URL_KEY = "REDIS_URL", "REDIS_MINER_URL"
# `KEY: REPLACE-ME  # form`: the form of the value, <OTHER_KEY> standing for another key's value.
_DOCUMENTED_FORM = re.compile(rf"^\s+([A-Za-z0-9_.-]+):\s*{PLACEHOLDER}\s*#\s*(\S+)\s*$", re.M)
_KEY_IN_FORM = re.compile(r"<([A-Za-z0-9_.-]+)>")
# Kubernetes' expansion in command, args and env values: $(NAME), and $$ for a literal $.
_K8S_EXPANSION = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def objects(folder: str = "") -> list[dict]:
    return [doc for _, doc in k8s_documents(folder)]


def by_kind(kind: str, folder: str = "") -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects(folder) if o["kind"] == kind}


def configmaps() -> dict[str, dict]:
    return {name: o.get("data") or {} for name, o in by_kind("ConfigMap").items()}


def template_secrets() -> dict[str, dict]:
    return {name: {**(o.get("data") or {}), **(o.get("stringData") or {})}
            for name, o in by_kind("Secret", "templates").items()}


def documented_forms() -> dict[str, str]:
    """Keys of the Secret template whose comment gives the form of their value."""
    return dict(_DOCUMENTED_FORM.findall(SECRET_TEMPLATE.read_text()))


def fill_form(form: str, values: dict[str, str]) -> str:
    return _KEY_IN_FORM.sub(lambda m: values[m.group(1)], form)


def filled_secrets() -> dict[str, dict]:
    """The Secret template filled in as its comments say: a distinct URL-safe value for every key,
    each documented form with those values in it (what a deployment's Secret holds)."""
    forms = documented_forms()
    out = {}
    for name, values in template_secrets().items():
        plain = {k: hashlib.sha256(f"{name}/{k}".encode()).hexdigest()[:24] for k in values}
        out[name] = {k: fill_form(forms[k], plain) if k in forms else v for k, v in plain.items()}
    return out


def k8s_expand(word: str, env: dict[str, str]) -> str:
    """`word` as Kubernetes passes it to the container (an unknown $(NAME) stays as it is)."""
    return _K8S_EXPANSION.sub(lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), word)


def is_redis_url_variable(name: str) -> bool:
    return name.endswith("REDIS_URL")   # REDIS_URL, AUTH_REDIS_URL, CHAIN_REDIS_URL


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
                env = container_environment(c, configmaps(), filled_secrets())
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
        "50-prometheus.yaml: run `make k8s-configmaps` to copy deploy/prometheus/prometheus-k8s.yml into the ConfigMap"
    assert config_map["rules.yml"] == (PROMETHEUS_DIR / "rules.yml").read_text(), \
        "50-prometheus.yaml: run `make k8s-configmaps` to copy deploy/prometheus/rules.yml into the ConfigMap"
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


# --- Redis: passwords, and a restricted user for the miners ----------------------------------------

def redis_container() -> dict:
    spec = pod_spec(by_kind("StatefulSet")["redis"])
    [c] = [c for _, c in containers(spec) if c["name"] == "redis"]
    return c


def chain_of_the_miners() -> set[str]:
    return {o.env.get("CHAIN", "") for o in our_containers() if o.module == "services.expert"}


def test_what_miners_write_to_redis_is_bounded_below_its_memory_limit():
    c = redis_container()
    words = c.get("command", []) + c.get("args", [])
    assert option(words, "--maxmemory-policy") == "noeviction", "past the bound, refuse writes; never evict scores"
    value = option(words, "--maxmemory")
    assert value and value.endswith("mb"), words
    limit = c["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    assert int(value[:-2]) < int(limit[:-2]) * 1024, f"--maxmemory {value} must leave room under the {limit} limit"


def test_redis_requires_a_password_and_restricts_the_miners_to_their_keys():
    """The miners share Redis with the validation queue and the scores: the user `miner` has
    exactly the rules of subnet/redis_acl.py, the default user a password, both from the Secret."""
    c = redis_container()
    words = c.get("command", []) + c.get("args", [])
    assert words[0] == "redis-server", words
    assert option(words, "--requirepass") == "$(REDIS_PASSWORD)", "the default user needs a password"
    assert words.count("--user") == 1, words
    at = words.index("--user")
    assert words[at + 1:at + 4] == [MINER_USER, "on", ">$(REDIS_MINER_PASSWORD)"], words[at:]
    rules = words[at + 4:]
    rules = rules[:next((i for i, w in enumerate(rules) if w.startswith("--")), len(rules))]
    # With CHAIN=local (as shipped) the miners write the chain in Redis: miner_rules(local_chain=True);
    # with CHAIN=bittensor they must not: miner_rules(local_chain=False).
    local_chain = chain_of_the_miners() == {"local"}
    assert rules == miner_rules(local_chain=local_chain), \
        f"20-redis.yaml: the miner's rules must be miner_rules(local_chain={local_chain})"

    env = {item["name"]: item for item in c.get("env") or []}
    referenced = {name for w in words for name in _K8S_EXPANSION.findall(w) if name}
    assert referenced == {"REDIS_PASSWORD", "REDIS_MINER_PASSWORD"}, referenced
    secrets = template_secrets()
    for name in referenced | {"REDISCLI_AUTH"}:
        assert name in env, f"redis: $({name}) is not in its env (Kubernetes would pass it literally)"
        ref = env[name].get("valueFrom", {}).get("secretKeyRef")
        assert ref and ref["name"] == SECRET and ref["key"] in secrets[SECRET], f"redis: {name} is not from {SECRET}"
        if name != "REDISCLI_AUTH":
            assert ref["key"] == name, f"redis: {name} comes from key {ref['key']}"
    # redis-cli authenticates with REDISCLI_AUTH: the probes' ping must use the default user's password.
    assert env["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"] == env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    for kind in ("readinessProbe", "livenessProbe"):
        assert c[kind]["exec"]["command"][0] == "redis-cli", f"redis: {kind}"


def test_redis_urls_come_from_the_secret_and_the_miners_connect_as_miner():
    """No Redis URL (it holds a password) in a ConfigMap or a literal value: the expert pods' from
    the Secret's REDIS_MINER_URL, every other container's from its REDIS_URL."""
    problems = []
    for name, data in configmaps().items():
        problems += [f"ConfigMap {name}: {k}" for k, v in data.items()
                     if is_redis_url_variable(k) or "redis://" in str(v)]
    users: dict[str, set[str]] = {}
    for where, obj in workloads():
        for role, c in containers(pod_spec(obj)):
            name = f"{where} {role} {c['name']}"
            module = service_module(c.get("command", []) + c.get("args", []))
            expected = MINER_URL_KEY if module == "services.expert" else ADMIN_URL_KEY
            for source in c.get("envFrom") or []:
                if "secretRef" in source:
                    keys = template_secrets().get(source["secretRef"]["name"], {})
                    problems += [f"{name}: {k} through envFrom" for k in keys if is_redis_url_variable(k)]
            for item in c.get("env") or []:
                if not is_redis_url_variable(item["name"]):
                    assert "redis://" not in str(item.get("value", "")), f"{name}: {item['name']}"
                    continue
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref != {"name": SECRET, "key": expected}:
                    problems.append(f"{name}: {item['name']} must come from secret {SECRET} key {expected}, not {item}")
                users.setdefault(module or c["name"], set()).add(expected)
    assert problems == [], "\n".join(problems)
    assert users == {"services.expert": {MINER_URL_KEY}, "services.router": {ADMIN_URL_KEY},
                     "services.validator": {ADMIN_URL_KEY}, "services.scorer": {ADMIN_URL_KEY},
                     "subnet.chain": {ADMIN_URL_KEY}}, users


def test_the_secret_template_documents_the_redis_urls_of_both_users():
    forms = documented_forms()
    assert forms.get(ADMIN_URL_KEY) == "redis://:<REDIS_PASSWORD>@redis:6379/0", forms
    assert forms.get(MINER_URL_KEY) == f"redis://{MINER_USER}:<REDIS_MINER_PASSWORD>@redis:6379/0", forms
    filled = filled_secrets()[SECRET]
    miner, admin = urlsplit(filled[MINER_URL_KEY]), urlsplit(filled[ADMIN_URL_KEY])
    assert (miner.username, miner.password) == (MINER_USER, filled["REDIS_MINER_PASSWORD"])
    assert (admin.username or "", admin.password) == ("", filled["REDIS_PASSWORD"])


def test_every_redis_url_logs_in_as_a_user_the_redis_of_the_manifests_creates():
    """The Secret filled in as its template says, the URLs each container gets match the users and
    passwords the redis container starts with, at the Service's name and port."""
    secrets = filled_secrets()
    c = redis_container()
    words = [k8s_expand(w, container_environment(c, configmaps(), secrets)) for w in c["args"]]
    at = words.index("--user")
    passwords = {"": option(words, "--requirepass"), words[at + 1]: words[at + 3].removeprefix(">")}
    assert "$(" not in " ".join(words) and len(set(passwords.values())) == 2, words
    service = by_kind("Service")["redis"]
    port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "redis")
    checked = set()
    for o in our_containers(tools=True):
        for name, url in o.env.items():
            if not is_redis_url_variable(name):
                continue
            parts = urlsplit(url)
            user = parts.username or ""
            assert user == (MINER_USER if o.module == "services.expert" else ""), f"{o.where}: {name} user {user!r}"
            assert parts.password == passwords[user], f"{o.where}: {name} has not the password of {user or 'default'}"
            assert (parts.hostname, parts.port) == (service["metadata"]["name"], port), f"{o.where}: {name}"
            checked.add(o.module)
    assert checked == {"services.expert", "services.router", "services.validator", "services.scorer", "subnet.chain"}


def kubectl_secret_literals(text: str) -> list[dict[str, str]]:
    """The --from-literal KEY=VALUE of each `kubectl create secret generic moe-subnet-secrets` in
    `text` (a shell block, or the same commented out)."""
    lines = "\n".join(re.sub(r"^\s*#?\s*", "", line) for line in text.splitlines()).replace("\\\n", " ")
    found = []
    for line in lines.splitlines():
        if f"create secret generic {SECRET}" in line:
            words = shlex.split(line)
            found.append(dict(w.removeprefix("--from-literal=").split("=", 1) for w in words
                              if w.startswith("--from-literal=")))
    return found


@pytest.mark.parametrize("path", [SECRET_TEMPLATE, K8S_DIR / "README.md"], ids=lambda p: p.name)
def test_the_kubectl_example_creates_every_key_and_fills_each_url_with_its_password(path):
    examples = kubectl_secret_literals(path.read_text())
    assert examples, f"{path.name}: no `kubectl create secret generic {SECRET}` example"
    forms = documented_forms()
    for literals in examples:
        assert set(literals) == set(template_secrets()[SECRET]), f"{path.name}: {sorted(literals)}"
        for key, form in forms.items():
            expected = fill_form(form, literals)
            assert literals[key] == expected, f"{path.name}: {key}={literals[key]}, the form says {expected}"


def test_the_router_finds_every_expert_pod_through_the_chain():
    """ROUTER_DISCOVERY=chain: every expert container publishes its endpoint (its pod IP, a private
    address, which the router is allowed to call) and writes no registry entry."""
    ours = our_containers()
    routers = [o for o in ours if o.module == "services.router"]
    experts = [o for o in ours if o.module == "services.expert"]
    assert routers and experts
    for o in routers:
        assert o.env.get("ROUTER_DISCOVERY") == "chain", o.where
        assert o.env.get("ROUTER_DISCOVERY_PRIVATE") == "1", f"{o.where}: pod IPs are private addresses"
    for o in experts:
        assert o.env.get("EXPERT_SERVE_ON_CHAIN") == "1", o.where
        assert not o.env.get("REDIS_URL"), f"{o.where}: a miner with REDIS_URL writes registry entries nobody reads"
        assert o.env.get("EXPERT_HOST") == "0.0.0.0" and not o.env.get("EXPERT_ADVERTISE_ENDPOINT"), \
            f"{o.where}: publishes the pod's own IP (its hostname resolved)"


def test_grafana_in_the_cluster_carries_the_compose_dashboard_and_data_sources():
    grafana = ROOT / "deploy" / "grafana"
    provisioning = by_kind("ConfigMap")["grafana-provisioning"]["data"]
    assert provisioning["datasources.yml"] == (grafana / "provisioning/datasources/datasources.yml").read_text(), \
        "56-grafana.yaml: stale datasources.yml; run `make k8s-configmaps`"
    assert provisioning["dashboards.yml"] == (grafana / "provisioning/dashboards/dashboards.yml").read_text(), \
        "56-grafana.yaml: stale dashboards.yml; run `make k8s-configmaps`"
    dashboards = by_kind("ConfigMap")["grafana-dashboards"]["data"]
    assert dashboards == {"moe-subnet.json": (grafana / "dashboards/moe-subnet.json").read_text()}, \
        "56-grafana.yaml: stale moe-subnet.json; run `make k8s-configmaps`"
    # The data sources name Services of the namespace, on the ports those Services expose.
    services = by_kind("Service")
    for source in yaml.safe_load(provisioning["datasources.yml"])["datasources"]:
        url = urlsplit(source["url"])
        assert url.port in {p["port"] for p in services[url.hostname]["spec"]["ports"]}, source["url"]
    # The files land where the provider and the home dashboard path look for them.
    spec = pod_spec(by_kind("Deployment")["grafana"])
    [(_, container)] = containers(spec)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    provider = yaml.safe_load(provisioning["dashboards.yml"])["providers"][0]
    assert mounts["dashboards"] == provider["options"]["path"]
    assert volumes["dashboards"]["configMap"]["name"] == "grafana-dashboards"
    assert mounts["provisioning"] == "/etc/grafana/provisioning"
    assert {i["path"] for i in volumes["provisioning"]["configMap"]["items"]} == \
        {"datasources/datasources.yml", "dashboards/dashboards.yml"}
    env = {e["name"]: e for e in container["env"]}
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]["value"] == f"{provider['options']['path']}/moe-subnet.json"
    assert env["GF_SECURITY_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == \
        {"name": SECRET, "key": "GRAFANA_ADMIN_PASSWORD"}
