"""Shared-memory transport for tensors between a router and an expert service on the same host.

Modelled on Triton's system shared-memory regions: gRPC carries only a small control message (region
name, offsets, dtype, shape); the tensor bytes go through a file in a tmpfs (/dev/shm) that both
processes map. Client side (the router creates and owns the regions):

    pool = ShmRegionPool(from_env(ShmConfig))
    if pool.config.enabled and same_host(expert_host_id):          # the expert advertises its host_id()
        with pool.lease() as region:                               # a failed call discards the region
            req = region.write_request(x, output_nbytes=x.numel() * 4)    # one copy into the region
            ...  # Forward(region=req.region, offsets/nbytes from req, dtype, shape) over gRPC
            y = region.view(resp_offset, resp_nbytes, torch.float32, shape)  # zero copy: use it inside the lease

Server side (the expert attaches to the client's regions):

    attachments = ShmAttachments(from_env(ShmConfig))
    x = attachments.read(req.region, req.input_offset, req.input_nbytes, torch.float32, shape)  # zero copy
    nbytes = attachments.write(req.region, req.output_offset, req.output_capacity, y)          # one copy

Names say who created a region: `moe-shm-<pid namespace>-<pid>-<start time>-<random>`, the start time
being field 22 of /proc/<pid>/stat, so `sweep()` can remove the regions of a creator that died without
cleaning up (SIGKILL) even when its pid was reused. The creator unlinks a region on close, when it is
garbage collected and at interpreter exit; the server sweeps whenever it maps a new region and every
`sweep_interval_s`, and unmaps regions whose file is gone. Memory is freed once both sides let go.

Trust: the server opens only names that match the pattern, inside its directory, not through a symlink,
regular files with one link, owned by its own effective uid. A client that could create such a file
runs as the server's uid and could already signal or ptrace it; that matters because a client that
shrinks its file while the server reads it crashes the server with SIGBUS (mmap cannot prevent that).

Views are not copies: a server view of the input changes when the client writes its next request into
the region, and a client view of the response changes when the region serves its next call.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import mmap
import os
import re
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Iterator, Sequence

import torch

from subnet.envconfig import env

DEFAULT_DIRECTORY = "/dev/shm"
NAME_RE = re.compile(r"moe-shm-(\d{1,20})-(\d{1,10})-(\d{1,20})-[0-9a-f]{16}")  # pid namespace, pid, start time
AREA_ALIGN_BYTES = 4096     # the response area starts on its own page, aligned for any dtype and SIMD
SIZE_STEP_BYTES = 1 << 20   # regions are whole MiB
GROWTH = 1.5                # a region that must grow grows at least this much, so creeping batch sizes regrow rarely
# Fault the page tables in when mapping, not one 4 KiB page at a time during the first copy.
_MAP_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


class ShmError(Exception):
    """A request the shared memory cannot serve as asked (offsets, sizes, dtype); the message says what to fix."""


class ShmUnavailableError(ShmError):
    """This process cannot use the region at all (bad name, gone, another uid or host): send the tensor
    inside the gRPC message instead."""


@dataclasses.dataclass(frozen=True)
class ShmConfig:
    """Shared by the router (creates regions) and the expert (attaches them); read with `from_env(ShmConfig)`."""

    transport: str = env("SHM_TRANSPORT", "auto",
                         "`auto`: tensors to and from an expert with the same shm host id go through shared "
                         "memory, gRPC carries only their place; `off`: always inside the gRPC message")
    directory: str = env("SHM_DIR", DEFAULT_DIRECTORY,
                         "tmpfs directory of the regions; router and expert must see the same one")
    max_attached: int = env("SHM_MAX_ATTACHED", 64,
                            "expert: client regions mapped at once; the least recently used is unmapped first")
    min_kb: float = env("SHM_MIN_KB", 64.0,
                        "router: smaller tensors go inside the message (a region's bookkeeping on both sides "
                        "costs more than copying a few KiB); 0 = every tensor")
    max_idle_regions: int = env("SHM_MAX_IDLE_REGIONS", 8,
                                "router: free regions kept for reuse; more are unlinked when released")
    sweep_interval_s: float = env("SHM_SWEEP_INTERVAL_S", 10.0,
                                  "expert: remove dead creators' regions this often, besides on every new "
                                  "attachment; 0 = only then")

    def __post_init__(self) -> None:
        if self.transport not in ("auto", "off"):
            raise ValueError(f"SHM_TRANSPORT={self.transport!r} must be `auto` or `off`")
        if not os.path.isabs(self.directory):
            raise ValueError(f"SHM_DIR={self.directory!r} must be an absolute path (e.g. /dev/shm)")
        if self.max_attached < 1 or self.max_idle_regions < 0 or self.sweep_interval_s < 0 or self.min_kb < 0:
            raise ValueError("SHM_MAX_ATTACHED must be >= 1, SHM_MAX_IDLE_REGIONS, SHM_SWEEP_INTERVAL_S and "
                             "SHM_MIN_KB >= 0")

    @property
    def enabled(self) -> bool:
        return self.transport == "auto"


# ---- who is who: host ids, creators, sweeping -------------------------------------------------

def host_id(directory: str = DEFAULT_DIRECTORY) -> str:
    """Equal in two processes exactly when shared memory can work between them: same boot, same tmpfs
    directory (its device and inode, so two containers' private /dev/shm differ), same effective uid
    (the server attaches only files of its own uid). An expert advertises it; "" where unsupported."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        st = os.stat(directory)
    except OSError:
        return ""
    return f"{boot}/{st.st_dev}/{st.st_ino}/{os.geteuid()}"


def same_host(peer_host_id: str, config: ShmConfig) -> bool:
    """Whether to use shared memory with a peer that advertises `peer_host_id` (never with SHM_TRANSPORT=off).
    It reads /proc and stats the directory: decide once per peer, not per call."""
    return config.enabled and bool(peer_host_id) and peer_host_id == host_id(config.directory)


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_time(pid: int) -> int | None:
    """Field 22 of /proc/<pid>/stat (clock ticks after boot); None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(b")") + 2:].split()   # the command name may hold spaces and parentheses
    if fields[0] in (b"Z", b"X"):                   # fields[0] is field 3, the state
        return None
    return int(fields[19])


def _new_name() -> str:
    pid = os.getpid()
    return f"moe-shm-{_pid_namespace()}-{pid}-{_start_time(pid) or 0}-{secrets.token_hex(8)}"


def creator_alive(name: str) -> bool | None:
    """Whether the process that created region `name` still runs; None when this process cannot tell
    (another pid namespace, or not a region name)."""
    match = NAME_RE.fullmatch(name)
    namespace = _pid_namespace()
    if match is None or namespace == 0 or int(match[1]) != namespace:   # 0: no /proc, so no way to tell
        return None
    return _start_time(int(match[2])) == int(match[3])


def sweep(directory: str = DEFAULT_DIRECTORY) -> list[str]:
    """Unlink the regions in `directory` whose creator is gone (dead, or its pid reused); returns their names.
    Regions of live creators, of other pid namespaces and files this uid may not remove are left alone."""
    removed = []
    with contextlib.suppress(FileNotFoundError), os.scandir(directory) as entries:
        for entry in entries:
            if creator_alive(entry.name) is False:
                with contextlib.suppress(OSError):   # gone already, another uid's, a directory
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return removed


# ---- views over a mapping ----------------------------------------------------------------------

def _check_area(what: str, offset: int, nbytes: int, size: int, itemsize: int) -> None:
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise ShmError(f"{what} [{offset}, {offset + nbytes}) is outside the region of {size} bytes; "
                       f"offsets and sizes must lie within the region")
    if offset % itemsize:
        raise ShmError(f"{what} offset {offset} is not a multiple of the element size {itemsize}")


def _view(mm: mmap.mmap, size: int, offset: int, nbytes: int, dtype: torch.dtype,
          shape: Sequence[int]) -> torch.Tensor:
    shape = [int(d) for d in shape]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(d < 0 for d in shape) or math.prod(shape) * itemsize != nbytes:
        raise ShmError(f"{nbytes} bytes do not hold a tensor of shape {shape} and dtype {dtype} "
                       f"({math.prod(shape)} x {itemsize} bytes)")
    _check_area("tensor", offset, nbytes, size, itemsize)
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    # The tensor holds a reference to `mm`, so the mapping outlives every view (never mm.close(): torch
    # keeps no buffer export, so closing would unmap memory that views still point to).
    return torch.frombuffer(mm, dtype=dtype, count=nbytes // itemsize, offset=offset).view(shape)


def _nbytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    return t.numel() * torch.empty((), dtype=dtype or t.dtype).element_size()


# ---- client side: regions this process creates ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShmRequest:
    """Where one call's tensors are: what the control message carries to the server."""

    region: str            # the region's file name (no directory)
    input_offset: int
    input_nbytes: int
    output_offset: int     # the server writes its response here...
    output_capacity: int   # ...at most this many bytes


def _unlink_if_creator(path: str, creator_pid: int) -> None:
    if os.getpid() == creator_pid:   # a forked child must not remove its parent's regions
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class ShmRegion:
    """One shared-memory file this process created and owns: an input area at offset 0, the response area
    after it. Used by one call at a time; `ShmRegionPool` hands regions to concurrent calls.
    It does not talk to the server: the caller sends `ShmRequest`'s fields in its own control message."""

    def __init__(self, directory: str, size: int):
        self.directory = directory
        self.name, self.size = "", 0
        self._mm: mmap.mmap | None = None
        self._finalizer: weakref.finalize | None = None
        self._open(size)

    @classmethod
    def create(cls, size: int, directory: str = DEFAULT_DIRECTORY) -> ShmRegion:
        """A new region of at least `size` bytes (whole MiB); ShmError when the tmpfs is full."""
        return cls(directory, size)

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.name)

    def _open(self, size: int) -> None:
        size = max(SIZE_STEP_BYTES, -(-size // SIZE_STEP_BYTES) * SIZE_STEP_BYTES)
        name = _new_name()
        path = os.path.join(self.directory, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        finalizer = weakref.finalize(self, _unlink_if_creator, path, os.getpid())   # also runs at exit
        try:
            # Allocate now: writing into a sparse file on a full tmpfs would be SIGBUS, not an error.
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size, flags=_MAP_FLAGS)
        except OSError as e:
            finalizer()
            raise ShmError(f"cannot allocate a {size >> 20} MiB shared-memory region in {self.directory}: {e}; "
                           f"give the tmpfs more room (docker --shm-size, a bigger emptyDir) or set "
                           f"SHM_TRANSPORT=off") from e
        finally:
            os.close(fd)
        if self._finalizer is not None:
            self._finalizer()   # unlink the old file; its mapping lives as long as views of it
        self.name, self.size, self._mm, self._finalizer = name, size, mm, finalizer

    def ensure(self, size: int) -> bool:
        """Make the region hold at least `size` bytes; returns True when it had to grow, which makes a new
        file with a new name (the old one is unlinked; views of it stay valid)."""
        if self._mm is None:
            raise ShmError(f"region {self.name} is closed")
        if size <= self.size:
            return False
        self._open(max(size, int(self.size * GROWTH)))
        return True

    def write(self, tensor: torch.Tensor, offset: int = 0, dtype: torch.dtype | None = None) -> tuple[int, int]:
        """Copy `tensor` (cast to `dtype` on the way, if given) in C order to `offset`, in one copy;
        returns (offset, nbytes)."""
        dtype = dtype or tensor.dtype
        nbytes = _nbytes(tensor, dtype)
        self.view(offset, nbytes, dtype, tensor.shape).copy_(tensor)
        return offset, nbytes

    def write_request(self, tensor: torch.Tensor, output_nbytes: int, dtype: torch.dtype | None = None) -> ShmRequest:
        """Grow if needed, write `tensor` (as `dtype`) to the input area and reserve `output_nbytes` after it."""
        input_nbytes = _nbytes(tensor, dtype)
        output_offset = -(-input_nbytes // AREA_ALIGN_BYTES) * AREA_ALIGN_BYTES
        self.ensure(output_offset + output_nbytes)
        self.write(tensor, 0, dtype)
        return ShmRequest(self.name, 0, input_nbytes, output_offset, self.size - output_offset)

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """A tensor over the mapping, no copy; ShmError when the bytes do not fit the shape or the region."""
        if self._mm is None:
            raise ShmError(f"region {self.name} is closed")
        return _view(self._mm, self.size, offset, nbytes, dtype, shape)

    def close(self) -> None:
        """Unlink the file and drop the mapping (unmapped once no view of it is left). Idempotent."""
        if self._finalizer is not None:
            self._finalizer()
        self._mm = None

    def __enter__(self) -> ShmRegion:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShmRegionPool:
    """Regions for concurrent calls: `lease()` one per call in flight. Keeps up to `max_idle_regions`
    free ones for reuse (their pages stay mapped, so reuse costs no page faults)."""

    def __init__(self, config: ShmConfig):
        self.config = config
        self._free: list[ShmRegion] = []
        self._lock = threading.Lock()
        sweep(config.directory)   # a router restarted after a SIGKILL removes what its predecessor left

    def acquire(self) -> ShmRegion:
        with self._lock:
            if self._free:
                return self._free.pop()   # the most recently used: its pages are the warmest
        return ShmRegion.create(SIZE_STEP_BYTES, self.config.directory)

    def release(self, region: ShmRegion) -> None:
        """Give back a region whose call answered and whose response views are no longer needed."""
        with self._lock:
            if len(self._free) < self.config.max_idle_regions:
                self._free.append(region)
                return
        region.close()

    def discard(self, region: ShmRegion) -> None:
        """Close a region whose call failed, timed out or was cancelled: the server may still write into it."""
        region.close()

    @contextlib.contextmanager
    def lease(self) -> Iterator[ShmRegion]:
        """A region for one call: released when the block ends normally, discarded when it raises."""
        region = self.acquire()
        try:
            yield region
        except BaseException:
            self.discard(region)
            raise
        self.release(region)

    def close(self) -> None:
        with self._lock:
            free, self._free = self._free, []
        for region in free:
            region.close()


# ---- server side: regions of clients ------------------------------------------------------------

@dataclasses.dataclass
class _Attachment:
    fd: int              # kept open to notice an unlink (st_nlink 0) without a path lookup
    mm: mmap.mmap
    size: int


class ShmAttachments:
    """The server's mappings of client regions, by name: validates every name, offset and size a client
    sends, maps at most `max_attached` regions (least recently used unmapped first), drops mappings of
    removed files, and sweeps dead clients' regions. Thread-safe. It does not check tensor contents
    (finite values, shapes the expert accepts): the servicer does, as for inline tensors."""

    def __init__(self, config: ShmConfig):
        self.config = config
        self.directory = os.path.realpath(config.directory)
        self._maps: collections.OrderedDict[str, _Attachment] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._last_sweep = time.monotonic()

    def read(self, name: str, offset: int, nbytes: int, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
        """The client's tensor, zero copy (it changes when the client reuses the region: clone what you keep)."""
        with self._lock:
            att = self._get(name)
            return _view(att.mm, att.size, offset, nbytes, dtype, shape)

    def write(self, name: str, offset: int, capacity: int, tensor: torch.Tensor,
              dtype: torch.dtype | None = None) -> int:
        """Copy `tensor` (cast to `dtype`, if given) into the client's response area [offset, offset + capacity);
        returns the bytes written. ShmError when it does not fit."""
        dtype = dtype or tensor.dtype
        nbytes = _nbytes(tensor, dtype)
        if nbytes > capacity:
            raise ShmError(f"the response needs {nbytes} bytes but the client reserved {capacity} in region {name}; "
                           f"the client must reserve the response's size")
        with self._lock:
            att = self._get(name)
            _check_area("response area", offset, capacity, att.size, torch.empty((), dtype=dtype).element_size())
            _view(att.mm, att.size, offset, nbytes, dtype, tensor.shape).copy_(tensor)
        return nbytes

    def __contains__(self, name: str) -> bool:
        with self._lock:
            return name in self._maps

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)

    def maintain(self) -> list[str]:
        """Drop mappings of removed files, and sweep dead creators' regions when SHM_SWEEP_INTERVAL_S
        has passed since the last sweep (0: never here, only on a new attachment); returns the names
        swept. Cheap enough for a timer that ticks more often than the interval."""
        with self._lock:
            self._drop_removed()
            return self._maintain() if self._sweep_due() else []

    def close(self) -> None:
        with self._lock:
            while self._maps:
                self._drop(next(iter(self._maps)))

    # ---- internals (called with the lock held) ----

    def _get(self, name: str) -> _Attachment:
        if not isinstance(name, str):
            raise ShmUnavailableError(f"region name {name!r} is not a string")
        if self._sweep_due():
            self._maintain()
        att = self._maps.get(name)
        if att is None:
            att = self._attach(name)
        st = os.fstat(att.fd)
        if st.st_nlink == 0:
            self._drop(name)
            raise ShmUnavailableError(f"region {name} was removed by its creator; send a current region")
        if st.st_size < att.size:
            self._drop(name)
            raise ShmUnavailableError(f"region {name} shrank from {att.size} to {st.st_size} bytes; regions must "
                                      f"not change size (grow by creating a new one)")
        self._maps.move_to_end(name)
        return att

    def _attach(self, name: str) -> _Attachment:
        if NAME_RE.fullmatch(name) is None:
            raise ShmUnavailableError(f"{name!r} is not a region name (moe-shm-<pidns>-<pid>-<start>-<16 hex>, "
                                      f"a file name in {self.directory}, no path)")
        self._maintain()   # a new client often means an old one is gone
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            raise ShmUnavailableError(f"cannot open region {name} in {self.directory}: {e.strerror}; is the client "
                                      f"on this host, with the same SHM_DIR, and not a symlink?") from e
        try:
            st = os.fstat(fd)
            problem = _refuse(st)
            if problem:
                raise ShmUnavailableError(f"region {name} {problem}")
            mm = mmap.mmap(fd, st.st_size, flags=_MAP_FLAGS)
        except BaseException:
            os.close(fd)
            raise
        att = _Attachment(fd, mm, st.st_size)
        self._maps[name] = att
        while len(self._maps) > self.config.max_attached:
            self._drop(next(iter(self._maps)))
        return att

    def _drop(self, name: str) -> None:
        att = self._maps.pop(name)
        os.close(att.fd)
        att.mm = None   # unmapped by the garbage collector once no view of it is left

    def _sweep_due(self) -> bool:
        interval = self.config.sweep_interval_s
        return bool(interval) and time.monotonic() - self._last_sweep >= interval

    def _drop_removed(self) -> None:
        for name in [n for n, att in self._maps.items() if os.fstat(att.fd).st_nlink == 0]:
            self._drop(name)

    def _maintain(self) -> list[str]:
        self._last_sweep = time.monotonic()
        self._drop_removed()
        return sweep(self.directory)


def _refuse(st: os.stat_result) -> str:
    """Why a client's file must not be mapped; "" when it may."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_uid != os.geteuid():
        return (f"belongs to uid {st.st_uid}, this server runs as uid {os.geteuid()}; shared memory needs "
                f"both on one uid")
    if st.st_nlink != 1:
        return f"has {st.st_nlink} links; a region has exactly one"
    if st.st_size == 0:
        return "is empty"
    return ""
