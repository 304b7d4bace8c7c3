"""Expert services behind real network links: each in its own network namespace, reached from the
root namespace over a veth pair. One link is shaped to 20 Mbit/s (tc tbf, both directions); the
other is taken down mid-training and brought up again.

    root namespace (the router, Redis on 10.231.X.1)
      mt<tag>ha 10.231.X.1/30 ==(tbf 20mbit)== mt<tag>na 10.231.X.2  [moe-test-<tag>-a]  experts 0, 1
      mt<tag>hb 10.231.X.5/30 ================ mt<tag>nb 10.231.X.6  [moe-test-<tag>-b]  experts 2, 3

Both namespaces reach Redis through their own link (b's packets are delivered locally in the
root namespace), so taking link b down partitions service b from the router and from Redis.
Needs root and `ip netns`/`tc` (skipped otherwise). It creates everything it uses under random
names, touches no other interface, and removes the namespaces and veths at the end, also when
the test fails.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from moe.boundary import OptimizerSettings
from services.router.config import RouterConfig
from services.router.remote_experts import GRACE_S, RemoteExpertGroup
from services.router.remote_model import RemoteParts
from subnet.dev.redis_server import RedisServer
from subnet.processes import die_with_parent
from tests.integration.conftest import ROOT, ExpertServiceHandle
from tests.integration.test_remote_experts import train_pass, wait_registered
from tests.netns import free_subnet, kill_processes_in, sh, skip_when_refused

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and veth pairs need root"),
    pytest.mark.skipif(not (shutil.which("ip") and shutil.which("tc")), reason="needs iproute2 (`ip`, `tc`)"),
]

LAYER, N_EXPERTS, DIM, INTER = 0, 4, 64, 128
PORT = 50051                   # each namespace has its own ports
RATE = "20mbit"
TIMEOUT_S = 2.0                # the router's deadline per layer of expert calls
BIG_TOKENS = 4096              # one Forward of 1 MiB each way: 0.84 s at 20 Mbit/s


@dataclass
class Link:
    """One namespace and the veth pair that connects it to the root namespace."""

    netns: str
    host_dev: str
    ns_dev: str
    host_addr: str
    ns_addr: str


@dataclass
class Lab:
    tag: str
    links: dict[str, Link] = field(default_factory=dict)

    def add(self, name: str, subnet: str, offset: int) -> Link:
        link = Link(f"moe-test-{self.tag}-{name}", f"mt{self.tag}h{name}", f"mt{self.tag}n{name}",
                    f"{subnet}.{offset + 1}", f"{subnet}.{offset + 2}")
        self.links[name] = link
        sh("ip", "netns", "add", link.netns)
        sh("ip", "link", "add", link.host_dev, "type", "veth", "peer", "name", link.ns_dev)
        sh("ip", "link", "set", link.ns_dev, "netns", link.netns)
        sh("ip", "addr", "add", f"{link.host_addr}/30", "dev", link.host_dev)
        sh("ip", "link", "set", link.host_dev, "up")
        sh("ip", "-n", link.netns, "addr", "add", f"{link.ns_addr}/30", "dev", link.ns_dev)
        sh("ip", "-n", link.netns, "link", "set", "lo", "up")
        sh("ip", "-n", link.netns, "link", "set", link.ns_dev, "up")
        sh("ip", "-n", link.netns, "route", "add", "default", "via", link.host_addr)
        return link

    def shape(self, link: Link) -> None:
        """tbf on both ends: requests and answers are limited alike."""
        tbf = ["root", "tbf", "rate", RATE, "burst", "32kbit", "latency", "400ms"]
        sh("tc", "qdisc", "add", "dev", link.host_dev, *tbf)
        sh("ip", "netns", "exec", link.netns, "tc", "qdisc", "add", "dev", link.ns_dev, *tbf)

    def remove(self) -> list[str]:
        """Delete what exists of the lab; returns what is still there afterwards."""
        for link in self.links.values():
            kill_processes_in(link.netns)
            sh("ip", "link", "del", link.host_dev, check=False)   # deletes the pair
            sh("ip", "netns", "del", link.netns, check=False)
        names = sh("ip", "netns", "list", check=False).stdout + sh("ip", "-br", "link", check=False).stdout
        return [n for link in self.links.values() for n in (link.netns, link.host_dev) if n in names]


@pytest.fixture
def lab():
    lab = Lab(secrets.token_hex(3))
    try:
        with skip_when_refused():
            subnet = free_subnet("10.231")
            lab.add("a", subnet, 0)
            lab.add("b", subnet, 4)
        yield lab
    finally:
        left = lab.remove()
    assert not left, f"left behind: {left}"


class NamespacedExpert(ExpertServiceHandle):
    """`python -m services.expert` inside a network namespace, bound to its address there.
    `ip netns exec` execs the service itself, so `.process` is the service."""

    def __init__(self, env: dict[str, str], log_path: Path, netns: str):
        super().__init__(env, log_path)
        self.netns = netns

    @property
    def endpoint(self) -> str:
        return self.env["EXPERT_ADVERTISE_ENDPOINT"]

    def start(self) -> NamespacedExpert:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, sys.executable, "-m", "services.expert"], cwd=ROOT,
                env={**os.environ, **self.env}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent)  # noqa: PLW1509 - the kernel reaps it if pytest dies
        self._wait_serving()
        return self


def start_expert(link: Link, indices, redis_url: str, dev_wallets, log_dir: Path) -> NamespacedExpert:
    """The expert_service_factory's environment, with the namespace's address."""
    wallet = dev_wallets.create(f"netns-expert-{link.netns}")
    env = {"EXPERT_UIDS": ",".join(f"{LAYER}.{i}" for i in indices), "EXPERT_DIM": str(DIM),
           "EXPERT_INTER_DIM": str(INTER), "EXPERT_HOST": link.ns_addr, "EXPERT_PORT": str(PORT),
           "EXPERT_ADVERTISE_ENDPOINT": f"{link.ns_addr}:{PORT}", "EXPERT_METRICS_PORT": "0",
           "REDIS_URL": redis_url, "EXPERT_THREADS": "1", "OMP_NUM_THREADS": "1", "EXPERT_GRACE_S": "2",
           "EXPERT_BATCH_WAIT_MS": "0", "PYTHONUNBUFFERED": "1", "WALLET_PATH": wallet.path,
           "WALLET_NAME": wallet.name, "WALLET_HOTKEY": wallet.hotkey, "AUTH_ALLOWLIST": dev_wallets.allowlist,
           # Namespaces share this host's /dev/shm: tensors would skip the shaped links. The experts stand
           # for other hosts here, so they take none.
           "SHM_TRANSPORT": "off"}
    return NamespacedExpert(env, log_dir / f"{link.netns}.log", link.netns).start()


def training_step(group: RemoteExpertGroup, step: int, tokens: int = 64) -> tuple[set[int], float]:
    """One step through every expert; (experts that answered, seconds)."""
    started = time.monotonic()
    gen = torch.Generator().manual_seed(step)
    xs = {i: torch.randn(tokens, DIM, generator=gen) for i in range(N_EXPERTS)}
    ws = {i: torch.randn(tokens, DIM, generator=gen) for i in range(N_EXPERTS)}
    group.begin_step(step)
    outs, _ = train_pass(group, xs, ws)
    group.external_grad_sq_norm()
    group.apply_external_step(1e-3, 1.0, OptimizerSettings())
    return {i for i, out in outs.items() if out is not None}, time.monotonic() - started


def forward_seconds(group: RemoteExpertGroup, expert: int) -> float:
    x = torch.randn(BIG_TOKENS, DIM)
    started = time.monotonic()
    with torch.no_grad():
        assert group.run({expert: x})[expert] is not None
    return time.monotonic() - started


def test_experts_behind_shaped_and_broken_links(lab, dev_wallets, tmp_path):
    torch.set_num_threads(1)
    started = time.monotonic()
    a, b = lab.links["a"], lab.links["b"]
    lab.shape(a)
    redis_server = RedisServer(host=a.host_addr).start()
    services: list[NamespacedExpert] = []
    parts = None
    try:
        services = [start_expert(a, [0, 1], redis_server.url, dev_wallets, tmp_path),
                    start_expert(b, [2, 3], redis_server.url, dev_wallets, tmp_path)]
        parts = RemoteParts.connect(RouterConfig(redis_url=redis_server.url, wallet=dev_wallets.router,
                                                 registry_refresh_s=0.5, suspect_s=2.0))
        wait_registered(parts.registry, [(services[0], [0, 1]), (services[1], [2, 3])], LAYER)
        parts.replicas.refresh()
        group = RemoteExpertGroup(LAYER, N_EXPERTS, DIM, parts.replicas, timeout_s=TIMEOUT_S,
                                  metrics=parts.metrics, clients=parts.clients)

        for step in range(3):  # training through both links
            served, _ = training_step(group, step)
            assert served == set(range(N_EXPERTS))

        # The shaped link carries 1 MiB each way at about 20 Mbit/s; the other is not limited.
        wide = RemoteExpertGroup(LAYER, N_EXPERTS, DIM, parts.replicas, timeout_s=20.0, metrics=parts.metrics,
                                 clients=parts.clients)
        shaped_s, plain_s = forward_seconds(wide, 0), forward_seconds(wide, 2)
        wire_mbit = 2 * BIG_TOKENS * DIM * 4 * 8 / 1e6
        assert shaped_s > 0.7 * wire_mbit / 20, f"tbf did not limit: {shaped_s:.2f} s for {wire_mbit:.0f} Mbit"
        assert plain_s < shaped_s / 3

        # Link b down: its experts are masked, the step still ends by the deadline.
        sh("ip", "link", "set", b.host_dev, "down")
        down_steps = []
        for step in range(3, 5):
            served, seconds = training_step(group, step)
            down_steps.append(seconds)
            assert served == {0, 1}
            assert seconds < TIMEOUT_S + GRACE_S + 2.0, f"step {step} waited {seconds:.1f} s for a dead link"
        masked = sum(parts.metrics.masked_count(LAYER, f"{LAYER}.{i}", "forward") for i in (2, 3))

        # Up again: used again.
        sh("ip", "link", "set", b.host_dev, "up")
        up_at, step = time.monotonic(), 5
        while True:
            served, _ = training_step(group, step)
            step += 1
            if served == set(range(N_EXPERTS)):
                break
            assert time.monotonic() - up_at < 30.0, "the service behind the restored link was never used again"
        recovered_s = time.monotonic() - up_at
        for _ in range(2):
            served, _ = training_step(group, step)
            step += 1
            assert served == set(range(N_EXPERTS))
    finally:
        if parts is not None:
            parts.close()
        for service in services:
            service.terminate(timeout_s=5.0)
        redis_server.stop()
    for service in services:
        with pytest.raises(ProcessLookupError):
            os.kill(service.process.pid, 0)
    print(f"\nnetns: shaped 1 MiB Forward {shaped_s:.2f} s vs {plain_s:.3f} s unshaped; link down: steps "
          f"{', '.join(f'{s:.2f}' for s in down_steps)} s (deadline {TIMEOUT_S} s), {masked:.0f} masked forwards; "
          f"used again {recovered_s:.1f} s after link up; test {time.monotonic() - started:.1f} s")
