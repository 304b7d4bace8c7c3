"""docker-compose.yml against the code: it parses, every variable it sets is one the service
declares, and every port, path, volume and healthcheck refers to something real."""

from __future__ import annotations

import subprocess
import time
from urllib.parse import urlsplit

import pytest
import yaml

from moe.config import preset
from services.router.remote_model import required_expert_uids
from services.router.train import EXPERTS_FILE
from subnet.redis_acl import MINER_USER, miner_rules
from tests.deploy.declared import (
    HEALTH_PROBE_MODULE,
    ROOT,
    SERVICES,
    command_args,
    environment_problems,
    option,
    proto_service_names,
    service_module,
)
from tests.deploy.files import (
    COMPOSE_FILE,
    ENV_EXAMPLE,
    compose,
    compose_command,
    environment,
    healthcheck_words,
    interpolated_names,
    k8s_documents,
    pod_spec,
    read_env_file,
    run,
)
from tests.deploy.rehearsal import compose_bytes, k8s_bytes

# Images without any program to run a healthcheck with (distroless); dependents wait for them to start.
NO_HEALTHCHECK = {"otel-collector": "distroless image: no shell, no wget"}
# Host paths a person supplies (.env), not files of this repository.
USER_PATHS: set[str] = set()


def our_services(config: dict, tools: bool = False) -> dict[str, tuple[str, dict]]:
    """Compose services running one of our services (and with `tools`, our one-shot tools):
    name -> (module, service)."""
    out = {}
    for name, service in config["services"].items():
        module = service_module(service.get("command"))
        if module is not None and (tools or module in SERVICES):
            out[name] = (module, service)
    return out


def grpc_address(words: list[str]) -> tuple[str, int]:
    i = words.index(HEALTH_PROBE_MODULE)
    host, _, port = words[i + 1].rpartition(":")
    return host, int(port)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_docker_compose_config_parses(profile, tmp_path):
    cmd = compose_command()
    no_env = tmp_path / "empty.env"
    no_env.write_text("")
    for env_file in (ENV_EXAMPLE, no_env):
        result = run([*cmd, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config", "-q"],
                     env={"COMPOSE_PROFILES": profile})
        assert result.returncode == 0, f"{' '.join(cmd)} config ({profile}, env {env_file}):\n{result.stderr}"
    result = run([*cmd, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE_FILE), "config"],
                 env={"COMPOSE_PROFILES": profile})
    resolved = yaml.safe_load(result.stdout)
    experts = {n for n, s in resolved["services"].items() if service_module(s.get("command")) == "services.expert"
               and profile in s.get("profiles", [])}
    assert len(experts) >= 2, f"profile {profile} runs {sorted(experts)}"


def test_env_example_lists_every_interpolated_variable():
    used = interpolated_names(COMPOSE_FILE.read_text())
    listed = set(read_env_file(ENV_EXAMPLE))
    assert used - listed == set(), f"docker-compose.yml uses {sorted(used - listed)}; add them to .env.example"
    unused = {name for name in listed - used if not name.startswith("COMPOSE_")}
    assert unused == set(), f".env.example lists {sorted(unused)}, which docker-compose.yml never uses"


@pytest.mark.parametrize("with_env_example", [True, False], ids=["with-.env", "defaults"])
def test_every_service_environment_is_what_its_code_declares(with_env_example):
    services = our_services(compose(with_env_example), tools=True)
    assert {m for m, _ in services.values()} >= {"services.expert", "services.router", "subnet.chain"}
    problems = []
    for name, (module, service) in services.items():
        problems += environment_problems(module, environment(service), f"compose service {name}")
    assert problems == [], "\n".join(problems)


def test_ports_and_healthchecks_match_the_configured_ports():
    health_names = proto_service_names()
    for name, (module, service) in our_services(compose()).items():
        spec, env = SERVICES[module], environment(service)
        words = healthcheck_words(service)
        if spec.grpc_port is None and spec.metrics_port:  # no gRPC server: the healthcheck asks the metrics endpoint
            port = int(env.get(spec.metrics_port, 0))
            assert port > 0, f"{name}: set {spec.metrics_port} to a fixed port"
            assert env.get(spec.bind_host) == "0.0.0.0", f"{name}: {spec.bind_host} must be 0.0.0.0 in a container"
            assert f"http://127.0.0.1:{port}/metrics" in " ".join(words), f"{name}: healthcheck {words}"
        if spec.grpc_port is None or "init" in command_args(service["command"]):
            continue
        port = int(env.get(spec.grpc_port, 0))
        assert port > 0, f"{name}: set {spec.grpc_port} to a fixed port"
        assert env.get(spec.bind_host) == "0.0.0.0", f"{name}: {spec.bind_host} must be 0.0.0.0 in a container"
        assert words[:4] == ["CMD", "python", "-m", HEALTH_PROBE_MODULE], f"{name}: healthcheck {words}"
        assert grpc_address(words) == ("127.0.0.1", port), f"{name}: healthcheck probes {words}, service on {port}"
        assert option(words, "--service") == spec.health_service in health_names, f"{name}: {words}"
        for published in service.get("ports", []):
            assert str(published).rsplit(":", 1)[1] == str(port), f"{name}: publishes {published}, serves {port}"
        if module == "services.expert":
            assert env["EXPERT_ADVERTISE_ENDPOINT"] == f"{name}:{port}", f"{name}: routers must dial {name}:{port}"


def test_the_health_probe_module_is_real():
    from subnet import health_probe

    assert callable(health_probe.main)
    assert health_probe.main.__module__ == HEALTH_PROBE_MODULE


def redis_urls(service: dict) -> dict[str, str]:
    return {k: v for k, v in environment(service).items() if k.endswith("REDIS_URL") and v}


def test_redis_urls_point_at_the_redis_service_as_the_right_user():
    """The expert services (miners) connect as the restricted `miner` user; everything else as the
    default user, with the password the redis service requires."""
    config = compose()
    redis_services = [n for n, s in config["services"].items() if s.get("image", "").startswith("redis:")]
    assert redis_services == ["redis"]
    admin_password = option(config["services"]["redis"]["command"], "--requirepass")
    checked = 0
    for name, (module, service) in our_services(config, tools=True).items():
        for key, value in redis_urls(service).items():
            url = urlsplit(value)
            assert (url.hostname, url.port, url.path) == ("redis", 6379, "/0"), f"{name}: {key}={value}"
            if module == "services.expert":
                assert (url.username, url.password) == (MINER_USER, miner_password(config)), f"{name}: {key}"
            else:
                assert (url.username or "", url.password) == ("", admin_password), f"{name}: {key}"
            checked += 1
    assert checked >= 12


def miner_password(config: dict) -> str:
    command = config["services"]["redis"]["command"]
    user = command.index("--user")
    assert command[user + 1:user + 3] == [MINER_USER, "on"] and command[user + 3].startswith(">")
    return command[user + 3][1:]


def test_the_miner_user_has_the_rules_the_code_defines():
    command = compose()["services"]["redis"]["command"]
    user = command.index("--user")
    assert command[user + 4:] == miner_rules(local_chain=True)


def test_the_compose_redis_command_runs_and_keeps_miners_off_the_scores(tmp_path):
    """The redis service's own command line (users and all), run by the redis-server here (6.2; the
    image runs 7.4, which reads these rules the same way), reached with the services' URLs."""
    import redis

    from subnet.dev.redis_server import redis_server_binary
    from subnet.processes import free_port

    config = compose()
    command = config["services"]["redis"]["command"]
    port = free_port()
    process = subprocess.Popen([redis_server_binary(), *command[1:], "--port", str(port), "--bind", "127.0.0.1",
                                "--dir", str(tmp_path), "--save", ""],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def client(service: str, key: str = "REDIS_URL") -> redis.Redis:
            url = redis_urls(config["services"][service])[key].replace("@redis:6379", f"@127.0.0.1:{port}")
            c = redis.Redis.from_url(url, socket_timeout=2)
            deadline = time.monotonic() + 10
            while True:
                try:
                    c.ping()
                    return c
                except redis.exceptions.ConnectionError:
                    assert process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                    time.sleep(0.05)

        # The miners publish their endpoints on the local chain (ROUTER_DISCOVERY=chain): no REDIS_URL.
        assert "REDIS_URL" not in redis_urls(config["services"]["expert-0"])
        miner, scorer = client("expert-0", "CHAIN_REDIS_URL"), client("scorer")
        miner.hset("moe:chain:endpoints", "3", '{"endpoint": "expert-0:50051", "block": 1}')
        assert client("expert-0", "AUTH_REDIS_URL").set("moe:auth:nonce:x", 1, nx=True)
        assert miner.get("moe:chain:genesis") is None
        scorer.hset("moe:scores:ema", "5Fminer", "0.1")
        with pytest.raises(redis.exceptions.NoPermissionError):
            miner.hset("moe:scores:ema", "5Fminer", "1.0")
        assert scorer.hget("moe:scores:ema", "5Fminer") == b"0.1"
        assert client("router", "CHAIN_REDIS_URL").hget("moe:chain:endpoints", "3") == \
            b'{"endpoint": "expert-0:50051", "block": 1}'
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=port).ping()
        # What miners write is bounded, and past the bound writes fail instead of evicting the scores.
        assert scorer.config_get("maxmemory") == {"maxmemory": str(768 << 20)}
        assert scorer.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    finally:
        process.terminate()
        process.wait(10)


# The services that publish to or read from the checkpoint store each round: without S3 an expert
# never publishes or commits and the router never reveals its trunk, so the validator has nothing to
# validate and the scorer nothing to score.
STORE_USERS = ("services.expert", "services.router", "services.validator")
S3_KEYS = ("S3_ENDPOINT", "S3_ACCESS_KEY", "S3_SECRET_KEY", "S3_BUCKET")


def test_every_service_of_the_rounds_reaches_the_same_checkpoint_store():
    config = compose()   # both profiles' experts
    minio = [n for n, s in config["services"].items() if "minio/minio" in s.get("image", "")
             and s.get("command", [None])[0] == "server"]
    assert minio == ["minio"]
    stores = {}
    for name, (module, service) in our_services(config).items():
        if module not in STORE_USERS or service.get("restart") == "no":   # one-shot tools (model-init)
            continue
        env = environment(service)
        assert all(env.get(key) for key in S3_KEYS), f"{name}: {[k for k in S3_KEYS if not env.get(k)]} unset"
        stores[name] = tuple(env[key] for key in S3_KEYS)
        assert env["S3_ENDPOINT"] == "minio:9000", name
        assert service["depends_on"]["minio-buckets"]["condition"] == "service_completed_successfully", name
    assert {module for module, _ in our_services(config).values() if module in STORE_USERS} == set(STORE_USERS)
    assert len(set(stores.values())) == 1, stores   # one bucket, one key pair


def test_paths_lie_on_mounted_volumes_and_volumes_exist():
    config = compose()
    named = set(config.get("volumes") or {})
    for name, service in config["services"].items():
        mounts = []
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts.append(target)
            if source.startswith((".", "/", "~")):
                if source not in USER_PATHS:
                    assert (ROOT / source).exists(), f"{name}: mounts {source}, which is not in the repository"
            else:
                assert source in named, f"{name}: volume {source} is not declared under volumes:"
        module = service_module(service.get("command"))
        if module is None:
            continue
        paths = [v for v in environment(service).values() if v.startswith("/")]
        paths += [w for w in command_args(service["command"]) if w.startswith("/checkpoints")]
        for path in paths:
            assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), \
                f"{name}: {path} is on no volume (mounts: {mounts}); it would be lost with the container"


def test_wallets_are_mounted_read_only_where_the_services_look():
    config = compose()
    checked = 0
    for name, (_, service) in our_services(config).items():
        env = environment(service)
        if "WALLET_PATH" not in env:
            continue
        mounts = {v.split(":")[1]: v.split(":")[2:] for v in service.get("volumes", [])}
        assert mounts.get(env["WALLET_PATH"]) == ["ro"], f"{name}: mount the wallets read-only at WALLET_PATH"
        checked += 1
    assert checked >= 5  # router, validator, scorer, two experts


def test_our_containers_are_hardened_as_the_kubernetes_pods():
    """Every container of ours (services and one-shot tools, both profiles) has a read-only root file
    system with tmpfs for /tmp and HOME, no capabilities and no privilege escalation; what it writes
    lies on a volume or one of those (test_paths_lie_on_mounted_volumes_and_volumes_exist, and the
    rehearsal, which runs them so)."""
    config = compose()
    ours = our_services(config, tools=True)
    assert {"chain-init", "model-init", "router", "validator", "scorer", "expert-0", "expert-0-gpu"} <= set(ours)
    for name, (_, service) in ours.items():
        assert service.get("read_only") is True, f"{name}: read_only: true"
        assert {"/tmp", "/home/app"} <= set(service.get("tmpfs") or []), f"{name}: tmpfs for /tmp and HOME"
        assert service.get("cap_drop") == ["ALL"], f"{name}: cap_drop: [ALL]"
        assert "no-new-privileges:true" in (service.get("security_opt") or []), f"{name}: no-new-privileges"


# Each compose service of ours and the Kubernetes container doing the same work:
# (folder of deploy/k8s, workload name, container name).
K8S_COUNTERPART = {
    "chain-init": ("", "local-chain-register", "register"),
    "model-init": ("", "router", "model-init"),
    "expert-0": ("cpu", "expert", "expert"), "expert-1": ("cpu", "expert", "expert"),
    "expert-0-gpu": ("", "expert", "expert"), "expert-1-gpu": ("", "expert", "expert"),
    "router": ("", "router", "router"), "validator": ("", "validator", "validator"),
    "scorer": ("", "scorer", "scorer"),
}


def test_memory_limits_are_the_kubernetes_containers_limits():
    """Every container of ours has a mem_limit, the same as the Kubernetes container doing that work
    (both rehearsals run the services under theirs: tests/deploy/rehearsal.MemoryLimits)."""
    ours = our_services(compose(), tools=True)
    assert set(ours) == set(K8S_COUNTERPART), sorted(ours)
    for name, (_, service) in ours.items():
        folder, workload, container = K8S_COUNTERPART[name]
        spec = next(pod_spec(doc) for _, doc in k8s_documents(folder)
                    if pod_spec(doc) and doc["metadata"]["name"] == workload)
        c = next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == container)
        assert "mem_limit" in service, f"{name}: no mem_limit"
        assert compose_bytes(service["mem_limit"]) == k8s_bytes(c["resources"]["limits"]["memory"]), \
            f"{name}: mem_limit {service['mem_limit']} but {workload}/{container} has {c['resources']['limits']}"


def test_experts_load_what_model_init_writes_and_cover_the_model():
    config = compose()
    init_words = command_args(config["services"]["model-init"]["command"])
    assert service_module(config["services"]["model-init"]["command"]) == "services.router"
    init_out = option(init_words, "--out")
    lm = preset(option(init_words, "--preset"))
    router_words = command_args(config["services"]["router"]["command"])
    assert option(router_words, "--init") == init_out
    for profile in ("cpu", "gpu"):
        uids: list[str] = []
        for name, (module, service) in our_services(config).items():
            if module != "services.expert" or profile not in service.get("profiles", []):
                continue
            env = environment(service)
            assert env["EXPERT_CHECKPOINT"] == f"{init_out}/{EXPERTS_FILE}", name
            assert (int(env["EXPERT_DIM"]), int(env["EXPERT_INTER_DIM"])) == (lm.dim, lm.moe_inter_dim), name
            uids += env["EXPERT_UIDS"].split(",")
        assert sorted(uids) == sorted(required_expert_uids(lm)), f"profile {profile}: experts {sorted(uids)}"


def test_gpu_profile_gives_experts_a_gpu_and_the_cuda_image():
    env_example = read_env_file(ENV_EXAMPLE)
    assert env_example["COMPOSE_PROFILES"] in ("cpu", "gpu")
    for name, (module, service) in our_services(compose()).items():
        if module != "services.expert":
            continue
        profiles = service.get("profiles", [])
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        device = environment(service)["EXPERT_DEVICE"]
        assert len(set(profiles) & {"cpu", "gpu"}) == 1, f"{name}: profiles {profiles}"
        if "gpu" in profiles:
            assert device.startswith("cuda") and service["image"] == env_example["MOE_CUDA_IMAGE"], name
            assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), name
            assert service["build"]["args"]["TORCH_INDEX_URL"] == "https://pypi.org/simple", name
        else:
            assert device == "cpu" and service["image"] == env_example["MOE_IMAGE"] and not devices, name


def test_dependencies_wait_for_health_or_completion():
    config = compose()
    services = config["services"]
    for name, service in services.items():
        long_running = service.get("restart", "no") != "no"
        if long_running and name not in NO_HEALTHCHECK:
            assert healthcheck_words(service), f"{name}: no healthcheck"
        depends = service.get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for dep, how in depends.items():
            condition = how["condition"]
            if condition == "service_healthy":
                assert healthcheck_words(services[dep]), f"{name} waits for {dep} to be healthy; it has no healthcheck"
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart", "no") == "no", f"{dep} is not a one-shot"
            else:
                assert condition == "service_started" and dep in NO_HEALTHCHECK, f"{name} -> {dep}: {condition}"


def test_prometheus_scrapes_the_configured_metrics_ports():
    config = compose()
    prom = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    for name, (module, service) in our_services(config).items():
        spec = SERVICES[module]
        if spec.metrics_port is None or "init" in command_args(service["command"]):
            continue
        port = int(environment(service)[spec.metrics_port])
        job = jobs[module.rsplit(".", 1)[1]]
        targets = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        names = [(n, sd["port"]) for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        aliases = service.get("networks", {}).get("default", {}).get("aliases", [])
        assert f"{name}:{port}" in targets or any(n in aliases and p == port for n, p in names), \
            f"{name} serves metrics on {port}; job {job['job_name']} scrapes {targets or names}"


def test_the_router_finds_every_expert_through_the_chain():
    """ROUTER_DISCOVERY=chain: every expert service publishes an endpoint the chain accepts and the
    router dials (its own name on the compose network), and writes no registry entry."""
    from subnet.chain.rules import check_endpoint

    config = compose()
    experts = {n: s for n, (m, s) in our_services(config).items() if m == "services.expert"}
    routers = [s for n, (m, s) in our_services(config).items()
               if m == "services.router" and "init" not in command_args(s["command"])]
    assert experts and routers
    for router in routers:
        assert environment(router).get("ROUTER_DISCOVERY") == "chain"
        # The experts list names on the compose network; without this the router asks none of them.
        assert environment(router).get("ROUTER_DISCOVERY_PRIVATE") == "1"
    for name, service in experts.items():
        env = environment(service)
        assert env.get("EXPERT_SERVE_ON_CHAIN") == "1", name
        check_endpoint(env["EXPERT_ADVERTISE_ENDPOINT"], name)
        assert not env.get("REDIS_URL"), f"{name}: a miner with REDIS_URL writes registry entries nobody reads"
