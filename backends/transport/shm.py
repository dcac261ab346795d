"""The CPU transport: the CUDA backend's symmetric-memory protocol over POSIX shared memory.

Each rank creates its buffer as a segment in /dev/shm (named `fuser_moe_<pid>_...`), publishes the name
through the group's store, maps every peer's segment and wraps them as tensors, and unlinks its own
segment once every peer has mapped it, so nothing is left in /dev/shm even if a process dies later.
The barrier is the CUDA kernel's protocol on int64 flags in each rank's shared control block, with the
host polling on `time.monotonic()` instead of `%globaltimer`: it yields its core between polls for the
first 20 ms (ranks often share cores, and a peer that is still working gets the core at once), then
naps, up to 1 ms a poll.

Ordering: `push_rows` copies synchronously before the barrier stores its flag, and aligned 8-byte
stores are atomic and ordered on x86-64 (TSO), which is what the flags rely on.
"""
from __future__ import annotations

import mmap
import os
import secrets
import time
import weakref

import numpy as np
import torch

from .base import SymmetricTensor, Transport, _raise_without_cycle, row_bytes

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "fuser_moe_"
_MIN_SEGMENT_BYTES = 8  # mmap refuses empty mappings
_YIELD_S = 0.02  # a barrier yields the core between polls this long, then naps (up to 1 ms)


def _segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def _map(name: str, nbytes: int, create: bool) -> mmap.mmap:
    """Creates (exclusively) or opens a shared-memory segment and maps it; the fd is closed again."""
    path = _segment_path(name)
    flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        if create:
            os.ftruncate(fd, nbytes)
        else:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise RuntimeError(f"shared-memory segment {path} holds {size} bytes, expected {nbytes}")
        return mmap.mmap(fd, nbytes)
    finally:
        os.close(fd)


def _unlink(name: str) -> None:
    try:
        os.unlink(_segment_path(name))
    except FileNotFoundError:
        pass


def segments_of(pid: int) -> list:
    """Names of the segments in /dev/shm that process `pid` created and has not unlinked (yet)."""
    prefix = f"{SEGMENT_PREFIX}{int(pid)}_"
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def release_segments_of(pid: int) -> list:
    """Unlinks the segments of a process that died before it could (killed in the middle of an allocation).

    A rank unlinks its segment as soon as every peer has mapped it, and at exit; only a rank that is
    killed (SIGKILL, `os._exit`) between creating and unlinking leaves a name behind. Its launcher calls
    this once the process is gone; mappings that peers still hold stay valid. Returns the names removed.

    Args:
        pid: the process id of a process that has exited (never a live one: it may be mid-allocation).
    """
    names = segments_of(pid)
    for name in names:
        _unlink(name)
    return names


def _as_tensor(mapping: mmap.mmap, nbytes: int, dtype: torch.dtype, shape: tuple) -> torch.Tensor:
    """A tensor over a mapping, without copying. The tensor keeps the mapping alive (never close it
    explicitly: that would unmap memory under live tensors)."""
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mapping, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


def _copy_rows(src: torch.Tensor, src_row: torch.Tensor, dst: torch.Tensor, dst_row: torch.Tensor) -> None:
    """dst[dst_row[i]] = src[src_row[i]] for every i (whole rows, indices in range).

    Rows bound for consecutive ascending destination rows (every push of the CUDA backend's torch path)
    are gathered straight into that slice of the peer's buffer: one copy and no scatter."""
    n = dst_row.numel()
    first, last = dst_row[0], dst_row[-1]
    first, last = int(first), int(last)
    if last - first == n - 1 and (n == 1 or bool((dst_row[1:] > dst_row[:-1]).all())):
        torch.index_select(src, 0, src_row, out=dst[first:first + n])
    else:
        dst.index_copy_(0, dst_row, src.index_select(0, src_row))


class _Segments:
    """Names this process created and has not unlinked yet; unlinked at close and at exit."""

    def __init__(self):
        self.pending: set = set()

    def release(self) -> None:
        while self.pending:
            _unlink(self.pending.pop())


class ShmTransport(Transport):
    """`Transport` for CPU tensors: buffers in POSIX shared memory, a host-spinning barrier.

    Every rank of the group must run on this host. On one rank, buffers are ordinary tensors.
    """

    def __init__(self, comm):
        device = torch.device(comm.device)
        if device.type != "cpu":
            raise ValueError(f"ShmTransport runs on CPU tensors, the communicator is on {device}")
        super().__init__(comm, device)
        if self.world_size > 1 and not os.path.isdir(SHM_DIR):
            raise RuntimeError(f"ShmTransport needs POSIX shared memory at {SHM_DIR}, which does not exist")
        self._segments = _Segments()
        self._finalizer = weakref.finalize(self, self._segments.release)
        self._flags: list = []  # numpy int64 views of every rank's control block
        self._generation = 0

    # ------------------------------------------------------------------ allocation
    def _allocate(self, purpose, dtype, trailing_shape, rows) -> SymmetricTensor:
        allocation = self._next_allocation()
        spec = self._spec(purpose, dtype, trailing_shape, rows)
        shape = (rows, *trailing_shape)
        nbytes = rows * row_bytes(dtype, trailing_shape)
        if self.world_size == 1:
            local = torch.zeros(shape, dtype=dtype)
            return SymmetricTensor(self, purpose, dtype, trailing_shape, rows, local, [local], None, allocation)

        segment_bytes = max(nbytes, _MIN_SEGMENT_BYTES)
        name = f"{SEGMENT_PREFIX}{os.getpid()}_{allocation}_{self.rank}_{secrets.token_hex(4)}"
        self._segments.pending.add(name)
        try:
            own = _map(name, segment_bytes, create=True)  # ftruncate zero-fills
            what = f"{self._describe(spec)} on rank {self.rank}"
            records = self._rendezvous(f"a{allocation}/publish", {**spec, "segment": name}, what)
            self._check_agreement(records, spec)
            views = []
            for peer, record in enumerate(records):
                if peer == self.rank:
                    mapping = own
                else:
                    try:
                        mapping = _map(record["segment"], segment_bytes, create=False)
                    except FileNotFoundError:
                        raise RuntimeError(
                            f"{what}: the shared-memory segment of rank {peer} ({record['segment']}) is gone; "
                            "did that rank exit?"
                        ) from None
                views.append(_as_tensor(mapping, nbytes, dtype, shape))
            self._rendezvous(f"a{allocation}/ready", None, what)
        finally:
            # Every peer has mapped it (or the allocation failed): the name is no longer needed, and a
            # segment without a name disappears with the last process that maps it.
            _unlink(name)
            self._segments.pending.discard(name)
        return SymmetricTensor(self, purpose, dtype, trailing_shape, rows, views[self.rank], views, None, allocation)

    def _retire(self, old: SymmetricTensor, allocation: int) -> None:
        # Peers finished writing the old buffer before they entered buffer() (pushes are synchronous on
        # the CPU) and the mappings stay valid while any tensor views them, so no extra barrier is needed.
        old.retired = True

    def _ensure_flags(self) -> list:
        if not self._flags:
            control = self._ensure_control()
            self._flags = [control.peer(r).numpy() for r in range(self.world_size)]
        return self._flags

    # ------------------------------------------------------------------ data path
    def push_rows(self, src, src_row, dst_rank, dst_row, dst) -> None:
        n = self._validate_push(src, src_row, dst_rank, dst_row, dst)
        flags = self._ensure_flags()
        if n == 0:
            return
        # One look at the ranges decides: every entry real and in range (the common case) takes the
        # fast path; padding, a bad entry or an overflow takes the general one.
        d_lo, d_hi = torch.aminmax(dst_row)
        r_lo, r_hi = torch.aminmax(dst_rank)
        s_lo, s_hi = torch.aminmax(src_row)
        d_lo, d_hi, r_lo, r_hi, s_lo, s_hi = torch.stack([d_lo, d_hi, r_lo, r_hi, s_lo, s_hi]).tolist()
        if d_lo >= 0 and d_hi < dst.rows and r_lo >= 0 and r_hi < self.world_size and s_lo >= 0 \
                and s_hi < src.shape[0]:
            if n > 1 and r_lo < r_hi:
                # Entries by ascending rank, each rank's rows consecutive (every push of the CUDA backend's
                # torch path): one gather per rank straight into its slice of the peer's buffer.
                step = dst_rank[1:] - dst_rank[:-1]
                if bool(((step == 0) & (dst_row[1:] - dst_row[:-1] == 1) | (step > 0)).all()):
                    bounds = torch.searchsorted(dst_rank, torch.arange(r_lo, r_hi + 2, device=dst_rank.device))
                    bounds = bounds.tolist()
                    starts = dst_row[bounds[:-1]].tolist()  # in range: rank r_hi has an entry
                    for i, peer in enumerate(range(r_lo, r_hi + 1)):  # at most W passes
                        b0, b1 = bounds[i], bounds[i + 1]
                        if b1 > b0:
                            torch.index_select(src, 0, src_row[b0:b1], out=dst.peer(peer)[starts[i]:starts[i] + b1 - b0])
                    return
            for peer in range(r_lo, r_hi + 1):  # at most W passes
                if r_lo == r_hi:
                    rows, sources = dst_row, src_row
                else:
                    chosen = (dst_rank == peer).nonzero().squeeze(1)
                    if chosen.numel() == 0:
                        continue
                    rows, sources = dst_row[chosen], src_row[chosen]
                _copy_rows(src, sources, dst.peer(peer), rows)
            return
        self._push_general(src, src_row, dst_rank, dst_row, dst, flags)

    def _push_general(self, src, src_row, dst_rank, dst_row, dst, flags) -> None:
        """push_rows with padding entries, entries out of range (ValueError) or rows past the capacity
        (recorded for `check()`)."""
        keep = dst_row >= 0
        if not bool(keep.any()):
            return
        kept = keep.nonzero().flatten()
        ranks, sources = dst_rank[kept], src_row[kept]
        bad = (ranks < 0) | (ranks >= self.world_size) | (sources < 0) | (sources >= src.shape[0])
        if bool(bad.any()):
            entry = int(kept[bad.nonzero()[0, 0]])
            raise ValueError(
                f"push_rows: entry {entry} has dst_rank {int(dst_rank[entry])} (group of {self.world_size}) and "
                f"src_row {int(src_row[entry])} (src has {src.shape[0]} rows); one is out of range"
            )
        over = keep & (dst_row >= dst.rows)
        if bool(over.any()):
            self._record_overflow(flags, dst_rank[over], dst_row[over], dst.rows)
            keep = keep & ~over
        for peer in torch.unique(dst_rank[keep]).tolist():
            chosen = (keep & (dst_rank == peer)).nonzero().squeeze(1)
            _copy_rows(src, src_row[chosen], dst.peer(peer), dst_row[chosen])

    def _record_overflow(self, flags, ranks, rows, capacity: int) -> None:
        layout = self.layout
        local = flags[self.rank]
        needed = int(rows.max()) + 1
        local[layout.scalar("out_needed")] = max(int(local[layout.scalar("out_needed")]), needed)
        local[layout.scalar("out_capacity")] = capacity
        for peer in torch.unique(ranks).tolist():
            peer_needed = int(rows[ranks == peer].max()) + 1
            remote = flags[peer]
            slot = layout.array("in_needed", self.rank)
            remote[layout.array("in_capacity", self.rank)] = capacity
            remote[slot] = max(int(remote[slot]), peer_needed)

    def barrier(self) -> None:
        self._check_open()
        flags = self._ensure_flags()
        self._generation += 1
        generation = self._generation
        layout, world = self.layout, self.world_size
        for peer in range(world):
            flags[peer][layout.array("arrive", self.rank)] = generation
        arrived = flags[self.rank][layout.array("arrive", 0):layout.array("arrive", world)]
        start = time.monotonic()
        deadline = start + self.timeout_s
        nap = 0.0
        while not bool(np.all(arrived >= generation)):
            now = time.monotonic()
            if now > deadline:
                missing = [s for s in range(world) if arrived[s] < generation]
                raise TimeoutError(
                    f"barrier (generation {generation}) timed out after {self.timeout_s:g} s on rank {self.rank} "
                    f"of {world}: rank(s) {missing} never arrived"
                )
            if now - start < _YIELD_S:
                # Ranks often share cores: yielding hands the core to a peer that is still working, and
                # this rank runs again as soon as a core is free (a nap would oversleep by its length).
                os.sched_yield()
            else:
                time.sleep(nap)
                nap = min(max(2 * nap, 20e-6), 1e-3)

    def check(self) -> None:
        if not self._flags:
            return
        local = self._flags[self.rank]
        reported = self.layout.reported()
        words = local.tolist()
        local[reported] = 0
        _raise_without_cycle(self._report(words))

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for buffer in self._buffers.values():
            buffer.retired = True
        if self._control is not None:
            self._control.retired = True
        self._buffers.clear()
        self._control = None
        self._flags = []
        self._finalizer()

