"""docker-compose.yml's `cpu` profile, run as compose would run it but without Docker (see
tests/deploy/compose_rehearsal.py for what stands in for what): the one-shots finish, the expert
services publish their compose names on the local chain, the router finds them there, trains
through them and serves a Generate from outside, their spans reach otel-collector's address in
shared traces, the validator publishes global version 0 to the bucket, Prometheus (where
installed) scrapes the router, the validator and the scorer by their compose names and both
experts through a DNS query for their shared alias (with the alert rules loaded), `:ro` volumes
are read-only and refuse a write, every service runs as its image's (non-root) user, ours with a
read-only root file system, no capabilities and no-new-privileges, each held to its mem_limit
without an OOM kill, no expert
refuses a signed request, and every service stops
cleanly on SIGTERM without having logged a traceback.

`make test-compose` (about 2 minutes; root and iproute2, skipped otherwise). TRAIN_MINUTES is
set to 0.5 in the .env it reads (the file's default is 5); everything else is .env.example's.
"""

from __future__ import annotations

import os
import shutil

import grpc
import pytest
import redis
from minio import Minio

from moe.train.checkpoint import resolve_checkpoint
from subnet.chain.local import LocalChain
from subnet.envconfig import from_env
from subnet.health import wait_serving
from subnet.rounds import RoundConfig
from subnet.wire.v1 import router_pb2, router_pb2_grpc
from tests.deploy.compose_rehearsal import ONE_SHOTS, PROMETHEUS, Rehearsal
from tests.deploy.files import environment
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

LONG_RUNNING = ("expert-0", "expert-1", "router", "validator", "scorer", *([PROMETHEUS] if PROMETHEUS else []))
TRAIN_MINUTES = 0.5


@pytest.fixture
def rehearsal(tmp_path):
    with staged(Rehearsal(tmp_path, {"TRAIN_MINUTES": str(TRAIN_MINUTES)})) as stage:
        yield stage


def _wait(condition, what: str, timeout_s: float, stage: Rehearsal) -> None:
    wait_until(condition, what, timeout_s, lambda: stage.check_alive(LONG_RUNNING))


INFRA = ("redis", "minio", "minio-buckets")   # started (stand-ins) and ready before anything else


def _check_start_order(config: dict, groups: list[tuple[str, ...]]) -> None:
    """The order this test starts things in is one compose's `depends_on` allows: every service
    depends only on services started before it (or on ones not run here, which start nothing)."""
    started = set(config["services"]) - {name for group in groups for name in group}
    for group in groups:
        for name in group:
            needs = set(config["services"][name].get("depends_on") or ())
            assert needs <= started, f"{name} depends on {sorted(needs - started)}, started after it here"
            started.add(name)


@pytest.mark.timeout(1200)
def test_the_cpu_profile_comes_up_trains_serves_and_stops(rehearsal):
    stage = rehearsal
    _check_start_order(stage.config, [INFRA, ONE_SHOTS, LONG_RUNNING])
    stage.start_infra()
    stage.run_to_end(ONE_SHOTS, timeout_s=600)
    for name in LONG_RUNNING:
        stage.start(name)

    # The experts publish the names compose gives them; read the chain as the router would.
    router_env = environment(stage.config["services"]["router"])
    chain_client = redis.Redis.from_url(router_env["CHAIN_REDIS_URL"].replace("@redis:", f"@{stage.bridge_address}:"))
    chain = LocalChain(chain_client, from_env(RoundConfig, {}).schedule())

    def listed() -> set[str]:
        return {n.endpoint for n in chain.metagraph().neurons if n.endpoint}

    _wait(lambda: listed() == {"expert-0:50051", "expert-1:50051"}, "both experts on the chain", 120, stage)

    # The router trains for TRAIN_MINUTES through them, then serves on its compose port.
    router = f"{stage.services['router'].address}:50050"
    wait_serving(router, TRAIN_MINUTES * 60 + 300, check_alive=lambda: stage.check_alive(LONG_RUNNING),
                 what="router")
    with grpc.insecure_channel(router) as channel:   # ROUTER_OPEN_GENERATE=1: no signature needed
        replies = list(router_pb2_grpc.RouterStub(channel).Generate(
            router_pb2.GenerateRequest(prompt="The ", max_new_tokens=8, temperature=0.0), timeout=60))
    assert 1 <= len(replies) <= 8 and sum(r.masked_calls for r in replies) == 0
    # Both kinds of service export their spans to otel-collector:4317, and the expert services' spans
    # join the router's traces (the trace context crosses the calls).
    stage.traces.wait_for_joined_trace({"router", "expert"}, lambda condition, what: _wait(condition, what, 60, stage))
    trained = resolve_checkpoint(stage.folder / "volumes" / "checkpoints" / "run")
    assert int(trained.name.rsplit("-", 1)[1]) > 0, f"the router served {trained.name}, not a trained checkpoint"

    # The validator bootstraps the bucket with model-init's checkpoint as global version 0.
    s3 = Minio(stage.s3.endpoint, access_key=stage.s3.access_key, secret_key=stage.s3.secret_key, secure=False)
    bucket = environment(stage.config["services"]["validator"])["S3_BUCKET"]
    _wait(lambda: any(True for _ in s3.list_objects(bucket, prefix="checkpoints/global/", recursive=True)),
          "global version 0 in the bucket", 120, stage)

    if PROMETHEUS:
        # Prometheus scrapes the static targets of deploy/prometheus/prometheus.yml by their compose
        # names, and both experts, found by a DNS query for their shared alias `experts`; rules.yml,
        # named relative to the config file, is found where compose mounts it.
        wanted = {("router", "router:9100"), ("validator", "validator:9100"), ("scorer", "scorer:9100"),
                  ("prometheus", "localhost:9090"),
                  *(("expert", f"{stage.services[name].address}:9100") for name in ("expert-0", "expert-1"))}
        prometheus_scrapes(f"{stage.services[PROMETHEUS].address}:9090", wanted,
                           lambda condition, what: _wait(condition, what, 60, stage),
                           lambda: stage.name_server.queries)

    # `:ro` volumes are read-only where each service sees them: the wallets chain-init wrote, the
    # Prometheus files.
    for name in LONG_RUNNING:
        assert_mounted_read_only(name, stage.services[name].process.pid, stage.services[name].read_only)
    wallets = stage.folder / "volumes" / "wallets"
    assert str(wallets) in stage.services["expert-0"].read_only
    write_refused(stage.services["expert-0"].process.pid, str(wallets))
    # Each ran as its image's user (ours 10001, Prometheus nobody), none as root, without capabilities:
    # the named volumes it wrote were writable to that user, as Docker leaves them. Ours are hardened
    # (read-only root, cap_drop ALL, no-new-privileges): outside its volumes and tmpfs mounts nothing
    # was writable to it, so each ran writing only there.
    for name in LONG_RUNNING:
        service = stage.services[name]
        assert service.user[0] != 0, f"{name} runs as root"
        assert_runs_as(name, service.process.pid, *service.user, [service.user[1]],
                       no_capabilities=service.drop_all_capabilities, no_new_privs=service.no_new_privs)
        if name != PROMETHEUS:
            assert service.read_only_root and service.drop_all_capabilities and service.no_new_privs, name
            mounted = mount_options(service.process.pid)
            assert "ro" in mounted["/"], name
            assert service.tmpfs and all({"nosuid", "nodev", "noexec"} <= mounted[path] for path in service.tmpfs), \
                f"{name}: tmpfs folders not mounted as Docker's tmpfs: {[mounted.get(p) for p in service.tmpfs]}"
    write_refused(stage.services["router"].process.pid, str(stage.folder))
    # Memory: each of ours ran in a cgroup limited to its mem_limit, none was OOM-killed (peaks printed).
    assert_held_to_memory_limits(stage.memory, {
        name: (s.process.pid, s.memory_limit, f"{s.address}:9100")
        for name, s in stage.services.items() if name in LONG_RUNNING and name != PROMETHEUS})

    stage.check_alive(LONG_RUNNING)
    codes = stage.stop(LONG_RUNNING)
    logs = {name: stage.services[name].log() for name in (*ONE_SHOTS, *LONG_RUNNING)}
    for name, code in codes.items():
        assert code == 0, f"{name} ended with {code} on SIGTERM:\n{logs[name][-3000:]}"
    for name, text in logs.items():
        assert "Traceback" not in text, f"{name} logged a traceback:\n{text[-4000:]}"
    # Wired right, no service refuses another's signed requests (a name resolving to the wrong
    # service, a wallet or an ACL that does not match, shows here first).
    for name in ("expert-0", "expert-1"):
        refused = [line for line in logs[name].splitlines() if "subnet.auth.server: rejected" in line]
        assert not refused, f"{name} refused signed requests:\n" + "\n".join(refused[:5])
    chain_client.close()
