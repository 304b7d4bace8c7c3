"""subnet.shm: regions a client creates, a server process attaches, and cleanup when either side dies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from subnet.envconfig import ConfigError, from_env
from subnet.shm import (
    ShmAttachments,
    ShmConfig,
    ShmError,
    ShmRegion,
    ShmRegionPool,
    ShmUnavailableError,
    creator_alive,
    host_id,
    same_host,
    sweep,
)

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CHILD_TIMEOUT_S = 120   # torch import on two busy cores

# A server in its own process: one JSON command per stdin line, one JSON answer per stdout line.
SERVER = """
import json, sys, torch
from subnet.shm import ShmAttachments, ShmConfig, host_id
torch.set_num_threads(1)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
att = ShmAttachments(ShmConfig(directory=sys.argv[1]))

def serve(cmd):   # a function, so that the input view is gone when it returns, as in a servicer
    if cmd["op"] == "echo":   # answer 2 * x + 1 in x's dtype
        x = att.read(cmd["region"], cmd["input_offset"], cmd["input_nbytes"], DTYPES[cmd["dtype"]], cmd["shape"])
        return {"nbytes": att.write(cmd["region"], cmd["output_offset"], cmd["output_capacity"], x * 2 + 1)}
    if cmd["op"] == "host_id":
        return {"host_id": host_id(sys.argv[1])}
    if cmd["op"] == "mapped":
        with open("/proc/self/maps") as f:
            return {"attached": cmd["region"] in att, "in_maps": cmd["region"] in f.read()}

for line in sys.stdin:
    try:
        out = serve(json.loads(line))
    except Exception as e:
        out = {"error": type(e).__name__, "message": str(e)}
    print(json.dumps(out), flush=True)
"""

# A client that creates a region, says its name, then waits (for SIGKILL) or exits without closing it.
CREATOR = """
import sys, time
from subnet.shm import ShmRegion
region = ShmRegion.create(1, sys.argv[1])
print(region.name, flush=True)
if sys.argv[2] == "wait":
    time.sleep(600)
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture
def shm_dir():
    """A private directory in /dev/shm, so that sweeping sees only this test's regions."""
    path = tempfile.mkdtemp(prefix="moe-shm-test-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def server_dir():
    path = tempfile.mkdtemp(prefix="moe-shm-test-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Server:
    def __init__(self, directory: str):
        self.process = _python(SERVER, directory)

    def __call__(self, **cmd) -> dict:
        self.process.stdin.write(json.dumps(cmd) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        assert line, f"the server process exited with code {self.process.wait(CHILD_TIMEOUT_S)}"
        return json.loads(line)

    def echo(self, request, dtype: str, shape) -> dict:
        return self(op="echo", dtype=dtype, shape=list(shape), **vars(request))

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(CHILD_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(server_dir):
    server = Server(server_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client_region(server_dir):
    with ShmRegion.create(1, server_dir) as region:
        yield region


# ---- round trips through a server process -------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 1024), (2, 3, 4), (513, 256)])
def test_round_trip_through_a_server_process(server, client_region, dtype, shape):
    x = torch.randn(shape).to(DTYPES[dtype])
    request = client_region.write_request(x, output_nbytes=x.numel() * x.element_size())
    answer = server.echo(request, dtype, shape)
    assert answer == {"nbytes": request.input_nbytes}
    y = client_region.view(request.output_offset, answer["nbytes"], DTYPES[dtype], shape)
    assert torch.equal(y, x * 2 + 1)
    assert torch.equal(client_region.view(0, request.input_nbytes, DTYPES[dtype], shape), x)   # input untouched


def test_write_casts_in_its_one_copy_and_takes_non_contiguous_tensors(server, client_region):
    x = torch.randn(64, 48).t()                      # (48, 64), not contiguous
    request = client_region.write_request(x, output_nbytes=x.numel() * 2, dtype=torch.bfloat16)
    assert request.input_nbytes == x.numel() * 2
    answer = server.echo(request, "bf16", x.shape)
    y = client_region.view(request.output_offset, answer["nbytes"], torch.bfloat16, x.shape)
    assert torch.equal(y, x.bfloat16() * 2 + 1)


def test_growth_makes_a_new_file_and_keeps_old_views(server, server_dir):
    with ShmRegion.create(1, server_dir) as region:
        small = torch.arange(16, dtype=torch.float32)
        first = region.write_request(small, output_nbytes=64)
        old_view = region.view(0, first.input_nbytes, torch.float32, small.shape)
        old_path, old_size = region.path, region.size
        assert server.echo(first, "fp32", small.shape) == {"nbytes": 64}

        big = torch.randn(1024, 1024)                 # 4 MiB in and out: more than the 1 MiB region
        grown = region.write_request(big, output_nbytes=big.numel() * 4)
        assert grown.region == region.name != first.region
        assert region.size >= grown.output_offset + big.numel() * 4 > old_size
        assert not os.path.exists(old_path)
        assert torch.equal(old_view, small)           # the old mapping lives as long as its views
        answer = server.echo(grown, "fp32", big.shape)
        assert torch.equal(region.view(grown.output_offset, answer["nbytes"], torch.float32, big.shape), big * 2 + 1)
        assert region.ensure(region.size) is False


def test_server_answers_a_response_larger_than_the_reserved_area_with_an_error(server, client_region):
    x = torch.ones(256)
    request = client_region.write_request(x, output_nbytes=1024)
    short = type(request)(request.region, 0, request.input_nbytes, request.output_offset, 512)
    answer = server.echo(short, "fp32", x.shape)
    assert answer["error"] == "ShmError" and "needs 1024 bytes but the client reserved 512" in answer["message"]


def test_host_id_is_equal_across_processes_and_differs_per_directory(server, server_dir, tmp_path):
    assert server(op="host_id") == {"host_id": host_id(server_dir)}
    assert host_id(server_dir) and host_id(server_dir) != host_id(str(tmp_path))


# ---- cleanup ------------------------------------------------------------------------------------

def test_server_mapping_is_dropped_once_the_creator_closes(server, server_dir):
    region = ShmRegion.create(1, server_dir)
    x = torch.ones(8)
    request = region.write_request(x, output_nbytes=32)
    assert server.echo(request, "fp32", x.shape) == {"nbytes": 32}
    assert server(op="mapped", region=region.name) == {"attached": True, "in_maps": True}

    region.close()
    assert not os.path.exists(region.path)
    region.close()                                    # idempotent
    assert server.echo(request, "fp32", x.shape)["error"] == "ShmUnavailableError"   # noticed on use...
    assert server(op="mapped", region=region.name) == {"attached": False, "in_maps": False}   # ...and unmapped


def test_maintain_drops_mappings_of_removed_files(shm_dir):
    attachments = ShmAttachments(ShmConfig(directory=shm_dir))
    region = ShmRegion.create(1, shm_dir)
    attachments.read(region.name, 0, 4, torch.float32, [1])
    assert region.name in attachments
    region.close()
    attachments.maintain()
    assert region.name not in attachments and len(attachments) == 0


def test_sweep_removes_regions_of_a_killed_creator_and_keeps_live_ones(shm_dir):
    killed = _python(CREATOR, shm_dir, "wait")
    exited = _python(CREATOR, shm_dir, "exit")
    killed_name = killed.stdout.readline().strip()
    assert os.path.exists(os.path.join(shm_dir, killed_name))
    killed.send_signal(signal.SIGKILL)
    killed.wait(CHILD_TIMEOUT_S)

    exited_name = exited.stdout.readline().strip()
    assert exited.wait(CHILD_TIMEOUT_S) == 0
    assert exited_name and not os.path.exists(os.path.join(shm_dir, exited_name))   # unlinked at its exit

    live = ShmRegion.create(1, shm_dir)
    namespace, pid, start = live.name.split("-")[2:5]
    reused = Path(shm_dir, f"moe-shm-{namespace}-{pid}-{int(start) + 1}-{'0' * 16}")   # our pid, another start
    elsewhere = Path(shm_dir, f"moe-shm-{int(namespace) + 1}-{pid}-{start}-{'1' * 16}")  # another pid namespace
    other = Path(shm_dir, "not-a-region")
    for path in (reused, elsewhere, other):
        path.write_bytes(b"x")

    assert creator_alive(killed_name) is False and creator_alive(live.name) is True
    assert creator_alive(elsewhere.name) is None
    assert sorted(sweep(shm_dir)) == sorted([killed_name, reused.name])
    assert sorted(os.listdir(shm_dir)) == sorted([live.name, elsewhere.name, other.name])
    live.close()


def test_server_sweeps_when_it_attaches_a_new_region(shm_dir):
    live = ShmRegion.create(1, shm_dir)
    namespace, pid, start = live.name.split("-")[2:5]
    stale = Path(shm_dir, f"moe-shm-{namespace}-{pid}-{int(start) + 1}-{'0' * 16}")
    stale.write_bytes(b"x")
    ShmAttachments(ShmConfig(directory=shm_dir)).read(live.name, 0, 4, torch.float32, [1])
    assert not stale.exists() and os.path.exists(live.path)
    live.close()


@pytest.mark.parametrize("interval_s", [0.0, 3600.0])
def test_maintain_sweeps_only_once_the_sweep_interval_has_passed(shm_dir, interval_s):
    """The expert's timer calls maintain() every few seconds; SHM_SWEEP_INTERVAL_S decides how often
    that lists the directory (0: never, only a new attachment does)."""
    live = ShmRegion.create(1, shm_dir)
    namespace, pid, start = live.name.split("-")[2:5]
    attachments = ShmAttachments(ShmConfig(directory=shm_dir, sweep_interval_s=interval_s))
    attachments.read(live.name, 0, 4, torch.float32, [1])   # a new attachment: swept now
    stale = Path(shm_dir, f"moe-shm-{namespace}-{pid}-{int(start) + 1}-{'0' * 16}")
    stale.write_bytes(b"x")
    assert attachments.maintain() == [] and stale.exists()   # within the interval (or 0): no sweep
    if interval_s:
        attachments._last_sweep -= interval_s   # as if the interval had passed
        assert attachments.maintain() == [stale.name] and not stale.exists()
    live.close()


def test_a_collected_region_is_unlinked(shm_dir):
    region = ShmRegion.create(1, shm_dir)
    path = region.path
    del region
    assert not os.path.exists(path)


def test_pool_reuses_released_regions_and_discards_failed_ones(shm_dir):
    pool = ShmRegionPool(ShmConfig(directory=shm_dir, max_idle_regions=1))
    with pool.lease() as first:
        pass
    with pool.lease() as again:
        assert again is first
        with pool.lease() as second:
            assert second is not first
        # second went back to the pool; with one idle region at most, first is closed when it returns
    assert not os.path.exists(first.path) and os.path.exists(second.path)
    with pytest.raises(TimeoutError), pool.lease() as failed:
        raise TimeoutError                                                   # e.g. the call's deadline
    assert failed is second and not os.path.exists(failed.path)
    pool.close()
    assert os.listdir(shm_dir) == []


# ---- what a hostile or buggy client can send -----------------------------------------------------

@pytest.fixture
def attached(shm_dir):
    region = ShmRegion.create(1, shm_dir)
    attachments = ShmAttachments(ShmConfig(directory=shm_dir))
    yield region, attachments
    attachments.close()
    region.close()


@pytest.mark.parametrize("name", ["../etc/passwd", "/etc/passwd", "passwd", "", "moe-shm-1-2-3-xyz",
                                  "moe-shm-1-2-3-0123456789ABCDEF", "moe-shm-1-2-3-0123456789abcdef/../x",
                                  "moe-shm-1-2-3-0123456789abcdef\n", "moe-shm-1-2-3-0123456789abcdef", 7])
def test_server_refuses_names_that_are_not_regions_in_its_directory(attached, name):
    _, attachments = attached
    with pytest.raises(ShmUnavailableError):
        attachments.read(name, 0, 4, torch.float32, [1])
    assert len(attachments) == 0


@pytest.mark.parametrize("target", ["region", "/etc/passwd"])
def test_server_refuses_a_symlink(attached, shm_dir, target):
    region, attachments = attached
    link = Path(shm_dir, "moe-shm-1-2-3-0123456789abcdef")
    link.symlink_to(region.path if target == "region" else target)
    with pytest.raises(ShmUnavailableError, match="cannot open"):
        attachments.read(link.name, 0, 4, torch.float32, [1])


def test_server_refuses_hard_links_fifos_directories_and_other_users_files(attached, shm_dir):
    region, attachments = attached
    hard = Path(shm_dir, "moe-shm-1-2-3-000000000000000a")
    os.link(region.path, hard)
    fifo = Path(shm_dir, "moe-shm-1-2-3-000000000000000b")
    os.mkfifo(fifo, 0o600)
    directory = Path(shm_dir, "moe-shm-1-2-3-000000000000000c")
    directory.mkdir()
    with pytest.raises(ShmUnavailableError, match="2 links"):
        attachments.read(hard.name, 0, 4, torch.float32, [1])
    with pytest.raises(ShmUnavailableError, match="not a regular file"):
        attachments.read(fifo.name, 0, 4, torch.float32, [1])
    with pytest.raises(ShmUnavailableError, match="cannot open"):
        attachments.read(directory.name, 0, 4, torch.float32, [1])
    if os.geteuid() == 0:
        foreign = Path(shm_dir, "moe-shm-1-2-3-000000000000000d")
        foreign.write_bytes(b"\0" * 64)
        os.chown(foreign, 65534, 65534)
        with pytest.raises(ShmUnavailableError, match="belongs to uid 65534"):
            attachments.read(foreign.name, 0, 4, torch.float32, [1])


@pytest.mark.parametrize("offset,nbytes,shape,message", [
    (-4, 4, [1], "outside the region"),
    (1 << 20, 4, [1], "outside the region"),                  # starts at the end
    ((1 << 20) - 4, 8, [2], "outside the region"),            # runs past the end
    (0, (1 << 20) + 4, [(1 << 18) + 1], "outside the region"),  # larger than the file
    (2, 4, [1], "not a multiple of the element size"),
    (0, 8, [1], "do not hold a tensor of shape"),
    (0, 4, [-1], "do not hold a tensor of shape"),
])
def test_server_refuses_areas_outside_the_file(attached, offset, nbytes, shape, message):
    region, attachments = attached
    with pytest.raises(ShmError, match=message):
        attachments.read(region.name, offset, nbytes, torch.float32, shape)


def test_server_writes_only_inside_the_reserved_area(attached):
    region, attachments = attached
    y = torch.ones(4)
    with pytest.raises(ShmError, match="reserved 8"):
        attachments.write(region.name, 0, 8, y)
    with pytest.raises(ShmError, match="outside the region"):
        attachments.write(region.name, region.size - 16, 32, y)   # the capacity runs past the end
    assert attachments.write(region.name, region.size - 16, 16, y) == 16
    assert torch.equal(region.view(region.size - 16, 16, torch.float32, [4]), y)


def test_server_notices_a_shrunk_file_before_touching_it(attached):
    region, attachments = attached
    attachments.read(region.name, 0, 4, torch.float32, [1])
    os.truncate(region.path, 4096)
    with pytest.raises(ShmUnavailableError, match="shrank"):
        attachments.read(region.name, 0, 4, torch.float32, [1])
    assert region.name not in attachments


def test_least_recently_used_mapping_goes_first(shm_dir):
    attachments = ShmAttachments(ShmConfig(directory=shm_dir, max_attached=2))
    regions = [ShmRegion.create(1, shm_dir) for _ in range(3)]
    for region in (regions[0], regions[1], regions[0], regions[2]):
        attachments.read(region.name, 0, 4, torch.float32, [1])
    assert [r.name in attachments for r in regions] == [True, False, True]
    for region in regions:
        region.close()


# ---- configuration --------------------------------------------------------------------------------

def test_config_is_on_by_default_and_off_by_environment(shm_dir):
    config = from_env(ShmConfig, {"SHM_DIR": shm_dir})
    assert config.enabled and config.directory == shm_dir
    assert same_host(host_id(shm_dir), config)
    assert not same_host("", config) and not same_host("another-host", config)
    off = from_env(ShmConfig, {"SHM_DIR": shm_dir, "SHM_TRANSPORT": "off"})
    assert not off.enabled and not same_host(host_id(shm_dir), off)


@pytest.mark.parametrize("environ,message", [({"SHM_TRANSPORT": "on"}, "SHM_TRANSPORT"),
                                             ({"SHM_DIR": "shm"}, "absolute"),
                                             ({"SHM_MAX_ATTACHED": "0"}, "SHM_MAX_ATTACHED")])
def test_config_rejects_bad_values(environ, message):
    with pytest.raises(ConfigError, match=message):
        from_env(ShmConfig, environ)


def test_a_full_tmpfs_is_an_error_not_a_crash(tmp_path):
    with pytest.raises(ShmError, match="SHM_TRANSPORT=off"):
        ShmRegion.create(1 << 60, str(tmp_path))
    assert list(tmp_path.iterdir()) == []
