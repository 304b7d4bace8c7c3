"""Tensors through shared memory between a router and a real expert service on the same host.

The router side is RemoteExpertGroup over an ExpertClientPool with a ShmConfig (SHM_DIR = a
directory of this test, which the service is given too). Training through it must equal the
in-process reference exactly (fp32), and the bytes must really have gone through regions in
that directory. An expert that cannot attach answers FAILED_PRECONDITION and the call goes
inline; SHM_TRANSPORT=off on either side means inline from the start. Regions are cleaned up
when either side dies: a SIGKILLed router's by the expert's sweep, a dead expert's calls'
by the router.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moe import MoE
from moe import layer as moe_layer
from moe.boundary import LocalExperts, OptimizerSettings
from moe.experts import expert_uid
from services.router.metrics import RouterMetrics
from services.router.remote_experts import RemoteExpertGroup
from services.router.replicas import ReplicaSet
from subnet.expert_client import ExpertClientPool
from subnet.expert_weights import save_expert_weights
from subnet.shm import ShmConfig
from tests.integration.one_service import OneService

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

LAYER, DIM, INTER, N_EXPERTS = 7, 64, 128, 3
LR = 1e-3
SETTINGS = OptimizerSettings()
UIDS = [expert_uid(LAYER, i) for i in range(N_EXPERTS)]
ROOT = Path(__file__).resolve().parents[2]


def _regions(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.startswith("moe-shm-")}


def _mapped_from(directory: Path, address: int) -> bool:
    """Whether `address` lies in this process's mapping of a file in `directory` (/proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if len(fields) == 6 and fields[5].strip().startswith(str(directory)) and start <= address < end:
                return True
    return False


def _service(factory, tmp_path, shm_dir: Path, **env):
    torch.manual_seed(0)
    local = LocalExperts(N_EXPERTS, DIM, INTER)
    ckpt = tmp_path / "experts.safetensors"
    save_expert_weights(ckpt, {expert_uid(LAYER, i): local[i] for i in range(N_EXPERTS)})
    service = factory([expert_uid(LAYER, i) for i in range(N_EXPERTS)], DIM, INTER,
                      env={"EXPERT_CHECKPOINT": str(ckpt), "EXPERT_BATCH_WAIT_MS": "0", "REDIS_URL": "",
                           "SHM_DIR": str(shm_dir), "EXPERT_ACTIVATION_TTL_S": "2", **env})
    return service, local


def _group(service, client_identity, shm: ShmConfig | None):
    replicas = ReplicaSet(OneService(service.endpoint, service.hotkey, UIDS))
    clients = ExpertClientPool(identity=client_identity, hotkeys=replicas.hotkey, shm=shm)
    return RemoteExpertGroup(LAYER, N_EXPERTS, DIM, replicas, wire_dtype="fp32", timeout_s=20.0,
                             metrics=RouterMetrics(), clients=clients), clients


def train_pass(experts, xs, weights):
    leaves = {i: x.clone().requires_grad_() for i, x in xs.items()}
    outs = experts.run(leaves)
    sum((outs[i] * weights[i]).sum() for i in outs).backward()
    return {i: o.detach() for i, o in outs.items()}, {i: leaves[i].grad for i in leaves}


def test_training_through_shared_memory_equals_in_process(expert_service_factory, client_identity, tmp_path):
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    service, local = _service(expert_service_factory, tmp_path, shm_dir)
    group, clients = _group(service, client_identity, ShmConfig(directory=str(shm_dir), min_kb=0))
    optimizer = torch.optim.AdamW(local.parameters(), lr=LR, betas=(SETTINGS.beta1, SETTINGS.beta2),
                                  eps=SETTINGS.eps, weight_decay=SETTINGS.weight_decay)
    gen = torch.Generator().manual_seed(1)
    try:
        for step in range(3):
            xs = {i: torch.randn(10 + i, DIM, generator=gen) for i in range(N_EXPERTS)}
            w = {i: torch.randn(10 + i, DIM, generator=gen) for i in range(N_EXPERTS)}
            group.begin_step(step)
            got, got_grads = train_pass(group, xs, w)
            optimizer.zero_grad()
            want, want_grads = train_pass(local, xs, w)
            for i in range(N_EXPERTS):
                torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(got_grads[i], want_grads[i], atol=1e-5, rtol=1e-5)
            group.apply_external_step(LR, 1.0, SETTINGS)
            optimizer.step()
        assert clients.shm.usable(service.endpoint)
        assert _regions(shm_dir), "no region was created: the tensors did not go through shared memory"
        assert group.metrics.masked_count(LAYER, expert_uid(LAYER, 0)) == 0
    finally:
        clients.close()
    assert not _regions(shm_dir), "the router left regions behind after close"


def test_inference_layer_combines_private_copies_of_answers_in_shared_memory(expert_service_factory,
                                                                             client_identity, tmp_path,
                                                                             monkeypatch):
    """The MoE layer's streaming combine (ExpertGroup.run_streaming) over real shared memory: its output
    equals the in-process layer's, and no answer it combines is a view of a region, which the expert
    shares and could rewrite after its answer passed the finiteness check."""
    monkeypatch.setattr(moe_layer, "STREAM_MIN_ELEMENTS", 0)
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    service, local = _service(expert_service_factory, tmp_path, shm_dir)
    group, clients = _group(service, client_identity, ShmConfig(directory=str(shm_dir), min_kb=0))
    torch.manual_seed(3)
    reference = MoE(dim=DIM, n_experts=N_EXPERTS, n_activated_experts=2, moe_inter_dim=INTER, experts=local)
    remote = MoE(dim=DIM, n_experts=N_EXPERTS, n_activated_experts=2, moe_inter_dim=INTER, experts=group)
    remote.gate.load_state_dict(reference.gate.state_dict())
    handed: list[bool] = []
    streaming = group.run_streaming

    def spy(batches, token_ids, on_output, meanwhile=None):
        def on_each(i, out):
            handed.append(_mapped_from(shm_dir, out.data_ptr()))
            on_output(i, out)
        return streaming(batches, token_ids, on_each, meanwhile)
    monkeypatch.setattr(group, "run_streaming", spy)
    try:
        for _ in range(3):   # regions are reused from the second pass on
            x = torch.randn(40, DIM)
            with torch.no_grad():
                torch.testing.assert_close(remote(x)[0], reference(x)[0], atol=1e-5, rtol=1e-5)
        assert len(handed) == 3 * N_EXPERTS and not any(handed), "an answer was combined in place, in the region"
        assert group.metrics.masked_count(LAYER, expert_uid(LAYER, 0)) == 0
    finally:
        clients.close()
    assert not _regions(shm_dir), "the router left regions behind after close"


def test_an_expert_without_shared_memory_gets_tensors_inline(expert_service_factory, client_identity, tmp_path):
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    service, local = _service(expert_service_factory, tmp_path, shm_dir, SHM_TRANSPORT="off")
    group, clients = _group(service, client_identity, ShmConfig(directory=str(shm_dir), min_kb=0))
    x = {i: torch.randn(5, DIM) for i in range(N_EXPERTS)}
    try:
        assert not clients.shm.usable(service.endpoint)     # it advertises no host id
        clients.shm._decided[service.endpoint] = (True, time.monotonic())  # a router that thinks otherwise
        with torch.no_grad():
            got, want = group.run(x), local.run(x)
        for i in range(N_EXPERTS):
            torch.testing.assert_close(got[i], want[i], atol=1e-5, rtol=1e-5)   # refused, then sent inline
        assert not clients.shm.usable(service.endpoint)     # and it remembers the refusal
        assert group.metrics.masked_count(LAYER, expert_uid(LAYER, 0)) == 0
    finally:
        clients.close()


_ROUTER = """if True:
    import sys, time, torch
    from moe.experts import expert_uid
    from subnet.expert_client import ExpertClientPool
    from subnet.identity import WalletConfig, load_identity
    from subnet.shm import ShmConfig
    from services.router.remote_experts import RemoteExpertGroup
    from services.router.replicas import ReplicaSet
    from tests.integration.one_service import OneService
    endpoint, hotkey, shm_dir, wallet_path, wallet_name = sys.argv[1:6]
    identity = load_identity(WalletConfig(name=wallet_name, hotkey="default", path=wallet_path))
    replicas = ReplicaSet(OneService(endpoint, hotkey, [expert_uid(7, i) for i in range(3)]))
    clients = ExpertClientPool(identity=identity, hotkeys=replicas.hotkey, shm=ShmConfig(directory=shm_dir, min_kb=0))
    group = RemoteExpertGroup(7, 3, 64, replicas, timeout_s=20.0, clients=clients)
    with torch.no_grad():
        out = group.run({i: torch.randn(4, 64) for i in range(3)})
    assert all(o is not None for o in out.values())
    print("served", flush=True)
    time.sleep(600)   # holding its regions until it is killed
"""


def test_regions_of_a_killed_router_are_removed_by_the_expert(expert_service_factory, client_identity,
                                                               dev_wallets, tmp_path):
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    service, _ = _service(expert_service_factory, tmp_path, shm_dir, SHM_SWEEP_INTERVAL_S="1")
    wallet = dev_wallets.client
    router = subprocess.Popen([sys.executable, "-c", _ROUTER, service.endpoint, service.hotkey, str(shm_dir),
                               wallet.path, wallet.name], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert router.stdout.readline().strip() == "served"
        left = _regions(shm_dir)
        assert left, "the router made no region"
        os.kill(router.pid, signal.SIGKILL)
        router.wait(10)
        # The expert's janitor (every second here) unmaps them and sweeps dead creators' regions.
        deadline = time.monotonic() + 60
        while _regions(shm_dir) & left and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _regions(shm_dir) & left, "a SIGKILLed router's regions outlived it"
        assert service.process.poll() is None
    finally:
        if router.poll() is None:
            router.kill()


def test_calls_to_a_killed_expert_leave_no_region(expert_service_factory, client_identity, tmp_path):
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    service, _ = _service(expert_service_factory, tmp_path, shm_dir, EXPERT_INJECT_DELAY_MS="3000")
    replicas = ReplicaSet(OneService(service.endpoint, service.hotkey, UIDS))
    clients = ExpertClientPool(identity=client_identity, hotkeys=replicas.hotkey,
                               shm=ShmConfig(directory=str(shm_dir), max_idle_regions=0, min_kb=0))
    group = RemoteExpertGroup(LAYER, N_EXPERTS, DIM, replicas, timeout_s=20.0, metrics=RouterMetrics(),
                              clients=clients, retries=0)
    try:
        assert clients.shm.usable(service.endpoint)
        import threading
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=group.run(
            {i: torch.randn(4, DIM) for i in range(N_EXPERTS)})))
        with torch.no_grad():
            worker.start()
            deadline = time.monotonic() + 20
            while not _regions(shm_dir) and time.monotonic() < deadline:   # the calls are in flight
                time.sleep(0.05)
            assert _regions(shm_dir)
            service.kill()
            worker.join(30)
        assert all(v is None for v in result["out"].values())   # masked, not hung
        assert not _regions(shm_dir), "failed calls kept their regions"
    finally:
        clients.close()
