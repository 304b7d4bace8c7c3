"""deploy/k8s as `kubectl apply -f deploy/k8s -l 'moe-subnet.io/optional!=gpu-experts'` and
`kubectl apply -f deploy/k8s/cpu` would run it, without a cluster (see tests/deploy/k8s_rehearsal.py
for what stands in for what): every pod started at once, the Secrets filled in as the template
says; the Jobs and init containers finish; the expert pods, restarted until the validator has
published global version 0, load it from S3 and publish `<pod ip>:50051` on the local chain; the
router trains through them and answers a Generate signed by a registered hotkey (the manifests
keep Generate closed: no ROUTER_OPEN_GENERATE), and its spans and the expert pods' reach `jaeger`
in shared traces; every gRPC and HTTP probe of the manifests answers; Prometheus (where Debian's
server is installed) scrapes every pod of ours, found by DNS as in a cluster; read-only volumes
and read-only root file systems are read-only in each pod and refuse a write; every service runs as
the non-root user and groups its securityContext names, without capabilities, in a memory cgroup
limited as its resources say, without an OOM kill; no expert refuses a
signed request; every pod stops with 0 on SIGTERM within its terminationGracePeriodSeconds,
without having logged a traceback.

Root, iproute2 and util-linux's `unshare` (skipped otherwise); about 2 minutes.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
import urllib.request

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from minio import Minio

from moe.train.checkpoint import resolve_checkpoint
from subnet.auth import SigningChannel
from subnet.chain.local import LocalChain
from subnet.envconfig import from_env
from subnet.health import wait_serving
from subnet.identity import WalletConfig, load_identity
from subnet.rounds import RoundConfig
from subnet.wire.v1 import router_pb2, router_pb2_grpc
from tests.deploy.k8s_rehearsal import K8sRehearsal, Pod
from tests.deploy.rehearsal import (
    assert_held_to_memory_limits,
    assert_mounted_read_only,
    assert_runs_as,
    mount_options,
    prometheus_scrapes,
    staged,
    wait_until,
    write_refused,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and veth pairs need root"),
    pytest.mark.skipif(not shutil.which("ip"), reason="needs iproute2 (`ip`)"),
    pytest.mark.skipif(not shutil.which("unshare"), reason="needs util-linux's `unshare`"),
]

# The router's init container records the training budget, `--minutes 5` written into its command
# in 30-router.yaml (no variable to set): the rehearsal rewrites that one argument to 0.5.
TRAIN_MINUTES = 0.5
REWRITES = {("router", "model-init"): {"--minutes 5 ": f"--minutes {TRAIN_MINUTES} "}}


@pytest.fixture
def rehearsal(tmp_path):
    with staged(K8sRehearsal(tmp_path, argv_rewrites=REWRITES)) as stage:
        yield stage


def _wait(condition, what: str, timeout_s: float, stage: K8sRehearsal) -> None:
    wait_until(condition, what, timeout_s, stage.check_alive)


def _pods(stage: K8sRehearsal, owner: str) -> list[Pod]:
    return [p for p in stage.pods.values() if p.owner["metadata"]["name"] == owner]


def _probe(pod: Pod, probe: dict) -> str | None:
    """One try of a grpc or httpGet probe from outside the pod, as the kubelet makes it; None when it
    passes, else what failed."""
    container = pod.containers[0].spec
    ports = {p["name"]: p["containerPort"] for p in container.get("ports") or []}
    timeout = probe.get("timeoutSeconds", 1) + 2   # the kubelet's timeout, with room for a busy machine
    try:
        if "grpc" in probe:
            port = probe["grpc"]["port"]
            with grpc.insecure_channel(f"{pod.address}:{port}") as channel:
                status = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=timeout).status
            return None if status == health_pb2.HealthCheckResponse.SERVING else f"status {status}"
        if "httpGet" in probe:
            port = probe["httpGet"]["port"]
            port = ports[port] if isinstance(port, str) else port
            with urllib.request.urlopen(f"http://{pod.address}:{port}{probe['httpGet']['path']}",
                                        timeout=timeout) as answer:
                return None if 200 <= answer.status < 400 else f"HTTP {answer.status}"
    except Exception as e:  # a probe that cannot connect fails
        return f"{type(e).__name__}: {e}"
    raise AssertionError(f"{pod.name}: a probe of a kind not rehearsed: {probe}")


def _passes_in_time(pod: Pod, kind: str, stage: K8sRehearsal, cap_s: float) -> None:
    """Once the services are up, the probe passes within what the manifest allows it (periodSeconds x
    failureThreshold, capped). Not checked: that a startup probe's budget covers the time a cold
    start takes, or what the kubelet does when a probe fails."""
    probe = pod.containers[0].spec.get(kind)
    if probe is None:
        return
    allowed = min(probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3), cap_s)
    deadline = time.monotonic() + allowed
    while (failure := _probe(pod, probe)) is not None:
        stage.check_alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{pod.name}'s {kind} still fails after {allowed:.0f} s: {failure}")
        time.sleep(1)


@pytest.mark.timeout(1200)
def test_the_cpu_manifests_come_up_train_serve_and_stop(rehearsal):
    stage = rehearsal
    stage.start_infra()
    stage.start()   # kubectl apply: every pod at once, no ordering but the init containers'
    [job] = _pods(stage, "local-chain-register")
    [router] = _pods(stage, "router")
    [validator] = _pods(stage, "validator")
    [scorer] = _pods(stage, "scorer")
    experts = _pods(stage, "expert")
    assert [e.name for e in experts] == ["expert-0", "expert-1"]
    prometheus = _pods(stage, "prometheus")   # none where Debian's server is not installed
    long_running = [router.name, validator.name, scorer.name, *(e.name for e in experts), *(p.name for p in prometheus)]

    _wait(job.succeeded, "the local-chain-register Job to complete", 180, stage)

    # Each expert pod publishes its own address (its hostname's), as the chain lists it.
    secret = stage.secrets["moe-subnet-secrets"]
    chain_client = redis.Redis.from_url(secret["REDIS_URL"].replace("@redis:", f"@{stage.bridge_address}:"))
    chain = LocalChain(chain_client, from_env(RoundConfig, {}).schedule())

    def listed() -> set[str]:
        return {n.endpoint for n in chain.metagraph().neurons if n.endpoint}

    _wait(lambda: listed() == {f"{e.address}:50051" for e in experts}, "both expert pods on the chain", 240, stage)
    assert router.exits.get("model-init") == [0], f"model-init: {router.exits}\n{router.log('model-init')[-3000:]}"
    assert validator.exits.get("wait-for-init") == [0], validator.exits

    # The router trains for TRAIN_MINUTES through them, then serves (its startup probe: moe.v1.Router).
    wait_serving(f"{router.address}:50050", TRAIN_MINUTES * 60 + 300, check_alive=stage.check_alive, what="router")
    # Generate is closed (AUTH_MODE=on, no ROUTER_OPEN_GENERATE): callers registered on the chain
    # (AUTH_CHAIN=1) sign it for the router's hotkey; the scorer's wallet, registered by the Job, does.
    wallets = stage.folder / "wallets"
    caller = load_identity(WalletConfig(name="scorer", path=str(wallets)))
    router_hotkey = load_identity(WalletConfig(name="router", path=str(wallets))).hotkey
    with grpc.insecure_channel(f"{router.address}:50050") as channel:
        stub = router_pb2_grpc.RouterStub(SigningChannel(channel, caller, router_hotkey))
        replies = list(stub.Generate(router_pb2.GenerateRequest(prompt="The ", max_new_tokens=8, temperature=0.0),
                                     timeout=60))
        with pytest.raises(grpc.RpcError) as unsigned:
            list(router_pb2_grpc.RouterStub(channel).Generate(router_pb2.GenerateRequest(prompt="The ",
                                                                                         max_new_tokens=2), timeout=30))
        assert unsigned.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert 1 <= len(replies) <= 8 and sum(r.masked_calls for r in replies) == 0
    # The router and the expert pods export their spans to the `jaeger` Service, in shared traces.
    stage.traces.wait_for_joined_trace({"router", "expert"}, lambda condition, what: _wait(condition, what, 60, stage))
    trained = resolve_checkpoint(stage.folder / "pvc" / "router-checkpoints" / "run")
    assert int(trained.name.rsplit("-", 1)[1]) > 0, f"the router served {trained.name}, not a trained checkpoint"

    # The validator published the router's step-0 checkpoint (the shared PVC) as global version 0,
    # and the expert pods, started again until it was there, loaded it from S3.
    s3 = Minio(stage.s3.endpoint, access_key=stage.s3.access_key, secret_key=stage.s3.secret_key, secure=False)
    bucket = stage.configmaps["validator-env"]["S3_BUCKET"]
    assert any(True for _ in s3.list_objects(bucket, prefix="checkpoints/global/", recursive=True))
    # Every earlier run of a pod exited, saying there was none yet; the one serving names the global
    # version it loaded and its manifest's digest, which is the digest of that manifest in the bucket.
    for expert in experts:
        assert stage.configmaps["expert-env"]["EXPERT_CHECKPOINT"].endswith("/global/latest")
        text = expert.log()
        assert "expert service ready" in text and expert.running == "expert", f"{expert.name}:\n{text[-3000:]}"
        assert all(code != 0 for code in expert.exits.get("expert", [])), expert.exits
        assert text.count("no global version has been published yet") == len(expert.exits.get("expert", [])), text
        loaded = re.findall(r"loaded \d+ experts from s3://\S+/global/latest: (checkpoints/global/\d+/manifest\.json) "
                            r"\(manifest sha256 ([0-9a-f]{64}), signed by (\w+)\)", text)
        assert len(loaded) == 1, f"{expert.name} did not say once which global version it loaded:\n{text[-3000:]}"
        key, digest, signer = loaded[0]
        manifest = s3.get_object(bucket, key)
        try:
            assert hashlib.sha256(manifest.read()).hexdigest() == digest, f"{expert.name} loaded another {key}"
        finally:
            manifest.close()
            manifest.release_conn()
        assert signer == load_identity(WalletConfig(name="validator", path=str(wallets))).hotkey, signer

    if prometheus:
        # Prometheus (prometheus-k8s.yml) finds every pod of ours through DNS queries for the headless
        # Services, as in a cluster, and scrapes them all; its alert rules come from the ConfigMap.
        wanted = {("router", f"{router.address}:9100"), ("validator", f"{validator.address}:9100"),
                  ("scorer", f"{scorer.address}:9100"), ("prometheus", "localhost:9090"),
                  *(("expert", f"{e.address}:9100") for e in experts)}
        prometheus_scrapes(f"{prometheus[0].address}:9090", wanted,
                           lambda condition, what: _wait(condition, what, 90, stage), lambda: stage.name_server.queries)

    # Read-only volumes are read-only where each container sees them: its Secrets, ConfigMaps and the
    # validator's read-only claim of the router's checkpoints (which the router itself writes).
    for pod in (router, validator, scorer, *experts, *prometheus):
        container = pod.containers[0]
        assert container.read_only or pod in prometheus, f"{pod.name}: no read-only volume (its wallet?)"
        assert_mounted_read_only(pod.name, pod.process.pid, container.read_only)
    checkpoints = str(stage.folder / "pvc" / "router-checkpoints")
    assert checkpoints in validator.containers[0].read_only and checkpoints not in router.containers[0].read_only
    write_refused(validator.process.pid, checkpoints)
    # readOnlyRootFilesystem (every container of ours): outside its volumes nothing is writable, so
    # each service above ran writing only where the manifests give it a volume.
    for pod in (router, validator, scorer, *experts, *prometheus):
        assert pod.containers[0].read_only_root, f"{pod.name}: no readOnlyRootFilesystem"
        assert "ro" in mount_options(pod.process.pid)["/"], pod.name
    write_refused(router.process.pid, str(stage.folder))
    # Each service ran as the user its securityContext names (none as root), with its pod's fsGroup and
    # no capability: so its volumes were writable and its Secrets readable to that user, as in a cluster.
    for pod in (router, validator, scorer, *experts, *prometheus):
        c = pod.containers[0]
        assert c.uid != 0 and c.gid != 0, f"{pod.name} runs as root"
        assert_runs_as(pod.name, pod.process.pid, c.uid, c.gid, c.groups, c.drop_all_capabilities, c.no_new_privs)

    # Memory: each container ran in a cgroup limited to its resources.limits.memory, and none was
    # OOM-killed (its peak resident memory, for sizing, is printed: -rP shows it).
    assert_held_to_memory_limits(stage.memory, {
        f"{pod.name}.{pod.containers[0].name}": (pod.process.pid, pod.containers[0].memory_limit,
                                                 None if pod in prometheus else f"{pod.address}:9100")
        for pod in (router, validator, scorer, *experts, *prometheus)})

    # Every probe of the manifests passes now that the services are up.
    for pod in (router, validator, scorer, *experts, *prometheus):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            _passes_in_time(pod, kind, stage, cap_s=60)

    stage.check_alive()
    restarts = {p.name: p.restarts for p in stage.pods.values()}
    codes = stage.stop(long_running)
    logs = {p.name: p.log() for p in stage.pods.values()}
    for name in long_running:
        assert codes.get(name) == 0, f"{name} ended with {codes.get(name)} on SIGTERM (restarts {restarts}):\n" \
                                     f"{logs[name][-3000:]}"
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-4000:]}"
    for expert in experts:
        refused = [line for line in logs[expert.name].splitlines() if "subnet.auth.server: rejected" in line]
        assert not refused, f"{expert.name} refused signed requests:\n" + "\n".join(refused[:5])
    # Only the expert pods (no global version yet) and the Job (Redis not answering yet) may restart.
    never_restarted = (router.name, validator.name, scorer.name, *(p.name for p in prometheus))
    assert all(restarts[p] == 0 for p in never_restarted), restarts
    chain_client.close()
