"""The symmetric-memory transport of the CUDA backend: what its two implementations share.

A transport gives every rank of a group the same-shaped buffer (`SymmetricTensor`), lets a rank write
whole rows straight into its peers' buffers (`push_rows`) and orders those writes with a barrier
(docs/contract.md section 8). `CudaIpcTransport` (cuda_ipc.py) maps GPU memory through CUDA IPC and runs the
kernels in kernels/; `ShmTransport` (shm.py) runs the same protocol over POSIX shared memory on the CPU,
so that CI exercises its offsets, caching and barrier logic. This module holds the interface, the
control-block layout, the buffer cache and the store rendezvous that both use.

Lifetime rules a caller relies on:
  - `buffer()` is collective and returns the cached buffer while it is large enough. When it must grow,
    every rank allocates a new one, the handles travel through the group's store, and the old buffer is
    retired only after a barrier, so no peer still writes it. A retired buffer refuses further pushes;
    tensors viewing it stay readable until dropped.
  - `push_rows` and `barrier` make no host synchronisation and no allocation on CUDA (capturable in a
    CUDA graph once the buffers exist); errors they find are raised by `check()`.
"""
from __future__ import annotations

import datetime
import json
import math
import operator
import threading
from typing import Optional, Sequence

import torch

_serial_lock = threading.Lock()
_serials: dict = {}


def _next_namespace(comm) -> str:
    """A store namespace for a new transport of `comm`'s group.

    Every rank creates the transports of a group in the same order, so a per-process count per group
    agrees across ranks and keeps a new transport from reading an old one's keys. Groups are told apart
    by `comm.group_key` (process-group name and ranks), so that two groups over the same ranks, whose
    transports may be created in either order, keep separate counts.
    """
    group = getattr(comm, "group_key", None) or tuple(getattr(comm, "global_ranks", range(int(comm.world_size))))
    with _serial_lock:
        serial = _serials.get(group, 0)
        _serials[group] = serial + 1
    return f"transport/{serial}"


def row_bytes(dtype: torch.dtype, trailing_shape: tuple) -> int:
    """Bytes of one row of `trailing_shape` elements of `dtype`."""
    return math.prod(trailing_shape) * dtype.itemsize


class ControlLayout:
    """Word offsets in a rank's control block: int64 words in symmetric memory.

    Per-peer arrays of `world_size` words come first, then the scalars. backends/kernels/barrier.cu repeats
    these offsets as FM_* constants; the two must agree (tests/test_transport.py compares them).

      arrive[s]        generation that rank s last announced to this rank (written by rank s)
      in_needed[s]     rows needed by a push from rank s that overflowed this rank's buffer
      in_capacity[s]   capacity of that buffer
      missing[s]       generation at which this rank stopped waiting for rank s (CUDA)
      fwd_needed[d]    overflow of this rank's pushes into rank d, not yet forwarded to d (CUDA)
      fwd_capacity[d]  capacity of that buffer
      out_needed, out_capacity   the largest overflow of this rank's own pushes
      bad_entry        1 + index of a push entry with a destination rank or source row out of range (CUDA)
      timeout_generation         generation of a barrier that timed out here (CUDA)
      generation       the device-resident barrier generation counter (CUDA)
    """

    ARRAYS = ("arrive", "in_needed", "in_capacity", "missing", "fwd_needed", "fwd_capacity")
    SCALARS = ("out_needed", "out_capacity", "bad_entry", "timeout_generation", "generation")

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.scalars = len(self.ARRAYS) * world_size

    def array(self, name: str, peer: int = 0) -> int:
        return self.ARRAYS.index(name) * self.world_size + peer

    def scalar(self, name: str) -> int:
        return self.scalars + self.SCALARS.index(name)

    @property
    def size(self) -> int:
        return self.scalars + len(self.SCALARS)

    def reported(self) -> list:
        """The words that `check()` reports and then clears."""
        words = []
        for name in ("in_needed", "in_capacity", "missing"):
            words += [self.array(name, s) for s in range(self.world_size)]
        words += [self.scalar(n) for n in ("out_needed", "out_capacity", "bad_entry", "timeout_generation")]
        return words


class SymmetricTensor:
    """The same-shaped buffer on every rank of a group.

    Attributes:
        local: this rank's buffer, `[rows, *trailing_shape]` of `dtype` on the transport's device.
        rows: capacity in rows.
        dtype, trailing_shape: what every row holds.
        purpose: the cache key it was allocated under.
        peer_ptrs: CUDA transport: int64 `[world_size]` device tensor of every rank's base address, mapped
            in this process, for kernels. None on the CPU transport.
        retired: True once a larger buffer replaced this one (or the transport closed): pushes refuse it.
    """

    def __init__(self, owner, purpose: str, dtype: torch.dtype, trailing_shape: tuple, rows: int,
                 local: torch.Tensor, peers: Sequence[Optional[torch.Tensor]],
                 peer_ptrs: Optional[torch.Tensor] = None, allocation: int = 0):
        self._owner_id = id(owner)
        self.purpose = purpose
        self.dtype = dtype
        self.trailing_shape = tuple(trailing_shape)
        self.rows = rows
        self.local = local
        self._peers = list(peers)
        self.peer_ptrs = peer_ptrs
        self.allocation = allocation
        self.retired = False
        self._resources = None  # what the transport must release when it retires this buffer

    @property
    def row_bytes(self) -> int:
        return row_bytes(self.dtype, self.trailing_shape)

    def peer(self, rank: int) -> torch.Tensor:
        """A writable view of `rank`'s buffer, `[rows, *trailing_shape]` (CPU transport; on CUDA only
        this rank's own buffer: kernels reach peers through `peer_ptrs`)."""
        if not 0 <= rank < len(self._peers):
            raise IndexError(f"rank {rank} is outside the group of {len(self._peers)} ranks")
        view = self._peers[rank]
        if view is None:
            raise RuntimeError(
                f"the buffer '{self.purpose}' of rank {rank} is mapped for kernels only; address it "
                "through peer_ptrs"
            )
        return view

    def __repr__(self) -> str:
        state = ", retired" if self.retired else ""
        return (f"SymmetricTensor({self.purpose!r}, {self.dtype}, rows={self.rows}, "
                f"trailing_shape={self.trailing_shape}{state})")


def _raise_without_cycle(error: Optional[BaseException]) -> None:
    """Raises `error` if there is one. A caller that raised an exception held in its own local variable
    would form a cycle (exception -> traceback -> frame -> exception) that keeps every frame of the
    traceback, with the buffers their locals view, alive until the cyclic GC runs."""
    if error is None:
        return
    try:
        raise error
    finally:
        error = None


def _normalize_shape(trailing_shape) -> tuple:
    try:
        shape = tuple(operator.index(x) for x in trailing_shape)
    except TypeError:
        raise TypeError(f"trailing_shape must be a tuple of ints, got {trailing_shape!r}") from None
    if any(x < 0 for x in shape):
        raise ValueError(f"trailing_shape must not have negative extents, got {shape}")
    return shape


class Transport:
    """Symmetric buffers, row pushes and a barrier for the ranks of one communicator.

    Attributes:
        rank, world_size: this rank and the size of the group.
        device: the device every buffer lives on (the communicator's device).
        timeout_s: how long a barrier or a rendezvous waits for a peer (the communicator's timeout).
    """

    def __init__(self, comm, device: torch.device):
        self.rank = int(comm.rank)
        self.world_size = int(comm.world_size)
        self.device = device
        self.timeout_s = float(comm.timeout_s)
        self.layout = ControlLayout(self.world_size)
        self.closed = False
        self._store = comm.store if self.world_size > 1 else None
        if self.world_size > 1 and self._store is None:
            raise ValueError(f"a group of {self.world_size} ranks needs a store to exchange buffer handles")
        self._namespace = _next_namespace(comm)
        self._allocations = 0
        self._buffers: dict = {}
        self._control: Optional[SymmetricTensor] = None
        self._own_last_key: Optional[str] = None

    # ------------------------------------------------------------------ interface
    def buffer(self, purpose: str, dtype: torch.dtype, trailing_shape: tuple, rows: int) -> SymmetricTensor:
        """The symmetric buffer for `purpose`, with room for at least `rows` rows. Collective.

        Every rank must call it with the same arguments. Buffers are cached per (purpose, dtype,
        trailing_shape); the cached one is returned while its capacity is at least `rows`, else it
        grows to max(rows, 2 * capacity) (a host synchronisation, refused during CUDA graph capture).
        A new buffer is all zeros on every rank before any peer can write to it (flag and stamp words
        rely on it); a grown one does not keep the old contents.

        Args:
            purpose: a name for what the buffer holds (e.g. "dispatch_x").
            dtype: element type of every row.
            trailing_shape: shape of one row (`()` for one element a row).
            rows: rows needed.
        Returns:
            A `SymmetricTensor` of that dtype and trailing shape with `rows >= rows`.
        """
        self._check_open()
        if not isinstance(purpose, str) or not purpose:
            raise TypeError(f"purpose must be a non-empty str, got {purpose!r}")
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
        shape = _normalize_shape(trailing_shape)
        if isinstance(rows, bool):
            raise TypeError("rows must be an int, got a bool")
        rows = operator.index(rows)
        if rows < 0:
            raise ValueError(f"rows must be >= 0, got {rows}")
        key = (purpose, dtype, shape)
        cached = self._buffers.get(key)
        if cached is not None and cached.rows >= rows:
            return cached
        self._ensure_control()  # always the first allocation, whichever collective call comes first
        capacity = max(rows, 1) if cached is None else max(rows, 2 * cached.rows)
        self._before_allocation(f"buffer({purpose!r}) growing to {capacity} rows")
        fresh = self._allocate(purpose, dtype, shape, capacity)
        assert fresh.dtype == dtype and fresh.trailing_shape == shape and fresh.rows >= rows
        self._buffers[key] = fresh
        if cached is not None:
            self._retire(cached, fresh.allocation)
        return fresh

    @property
    def ranks_on_device(self) -> int:
        """How many ranks of the group (this one included) run on this rank's device and so share its
        processors: 1 where each rank has its own (CPU ranks share cores, but no kernel spins there)."""
        return 1

    def push_rows(self, src: torch.Tensor, src_row: torch.Tensor, dst_rank: torch.Tensor,
                  dst_row: torch.Tensor, dst: SymmetricTensor) -> None:
        """For every i: `dst.peer(dst_rank[i])[dst_row[i]] = src[src_row[i]]` (whole rows).

        Args:
            src: `[N, *dst.trailing_shape]` of `dst.dtype`, contiguous, on the transport's device.
            src_row: `[n]` int64, row of `src` for each entry.
            dst_rank: `[n]` int64, destination rank for each entry.
            dst_row: `[n]` int64, row of the destination's buffer; entries with `dst_row < 0` are padding
                and skipped. An entry with `dst_row >= dst.rows` is not written and reported by
                `check()` as an overflow naming the needed and the given capacity.
            dst: a live buffer of this transport.
        The rows are visible to their destination after the next `barrier()` completes. On CUDA the copy
        is stream-ordered on the current stream and returns at once.
        """
        raise NotImplementedError

    def barrier(self) -> None:
        """Orders phases across ranks: every push issued before it by any rank is visible after it.

        CPU: returns once every rank arrived, or raises `TimeoutError` naming the missing ranks after
        `timeout_s`. CUDA: enqueued on the current stream; a timeout is raised by `check()`.
        """
        raise NotImplementedError

    def check(self) -> None:
        """Raises what the device reported since the last check, then clears it.

        Raises:
            TimeoutError: a barrier gave up waiting; names the ranks that never arrived and the timeout.
            RuntimeError: a push overflowed a buffer (names the needed and the given capacity), or named
                a rank or source row out of range.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Frees every buffer and peer mapping. Idempotent; also runs at interpreter exit."""
        raise NotImplementedError

    # ------------------------------------------------------------------ shared machinery
    def _allocate(self, purpose: str, dtype: torch.dtype, trailing_shape: tuple, rows: int) -> SymmetricTensor:
        raise NotImplementedError

    def _retire(self, old: SymmetricTensor, allocation: int) -> None:
        raise NotImplementedError

    def _before_allocation(self, what: str) -> None:
        """Hook: CUDA refuses to allocate during graph capture and drains earlier pushes first."""

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"{type(self).__name__} of rank {self.rank} is closed")

    def _next_allocation(self) -> int:
        allocation = self._allocations
        self._allocations += 1
        return allocation

    def _ensure_control(self) -> SymmetricTensor:
        if self._control is None:
            self._before_allocation("the barrier's control block")
            self._control = self._allocate("__control__", torch.int64, (), self.layout.size)
        return self._control

    @staticmethod
    def _spec(purpose: str, dtype: torch.dtype, trailing_shape: tuple, rows: int) -> dict:
        return {"purpose": purpose, "dtype": str(dtype).replace("torch.", ""),
                "trailing_shape": list(trailing_shape), "rows": rows}

    @staticmethod
    def _describe(spec: dict) -> str:
        return (f"buffer({spec['purpose']!r}, {spec['dtype']}, trailing_shape={tuple(spec['trailing_shape'])}, "
                f"rows={spec['rows']})")

    def _check_agreement(self, records: list, spec: dict) -> None:
        """Every rank must have asked for the same buffer; all ranks see the same records, so all raise."""
        for peer, record in enumerate(records):
            theirs = {k: record.get(k) for k in spec}
            if theirs != spec:
                raise RuntimeError(
                    f"buffer() is collective and every rank must pass the same arguments: rank {peer} asked "
                    f"for {self._describe(theirs)} while rank {self.rank} asked for {self._describe(spec)}"
                )

    def _rendezvous(self, tag: str, payload, what: str) -> list:
        """Publishes `payload` (JSON) under `tag` and returns every rank's payload, in rank order.

        Raises:
            TimeoutError naming the ranks that did not arrive within `timeout_s`.
        """
        if self.world_size == 1:
            return [payload]
        store = self._store
        keys = [f"{self._namespace}/{tag}/{r}" for r in range(self.world_size)]
        store.set(keys[self.rank], json.dumps(payload).encode())
        try:
            store.wait(keys, datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:  # DistStoreError on timeout
            missing = [r for r, k in enumerate(keys) if not store.check([k])]
            if not missing:
                raise
            raise TimeoutError(
                f"{what}: rank(s) {missing} did not arrive within the timeout of {self.timeout_s:g} s "
                f"(rank {self.rank} of {self.world_size})"
            ) from exc
        records = [json.loads(store.get(k)) for k in keys]
        # Everyone has now passed the previous rendezvous, so nobody reads this rank's key of it again.
        if self._own_last_key is not None:
            try:
                store.delete_key(self._own_last_key)
            except Exception:  # noqa: BLE001 - a store without deletion keeps a few small keys
                pass
        self._own_last_key = keys[self.rank]
        return records

    def _validate_push(self, src, src_row, dst_rank, dst_row, dst) -> int:
        """Checks push_rows' arguments; returns the number of entries."""
        self._check_open()
        if not isinstance(dst, SymmetricTensor) or dst._owner_id != id(self):
            raise ValueError("push_rows: dst must be a SymmetricTensor returned by this transport's buffer()")
        if dst.retired:
            raise RuntimeError(
                f"push_rows: {dst!r} was replaced by a larger buffer or released; call buffer() again"
            )
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"push_rows: src must be a tensor, got {type(src).__name__}")
        if src.dtype != dst.dtype:
            raise TypeError(f"push_rows: src is {src.dtype}, the buffer '{dst.purpose}' holds {dst.dtype}")
        if src.dim() != 1 + len(dst.trailing_shape) or tuple(src.shape[1:]) != dst.trailing_shape:
            raise ValueError(
                f"push_rows: src must be [N, *{dst.trailing_shape}] for the buffer '{dst.purpose}', "
                f"got {tuple(src.shape)}"
            )
        if src.device != self.device:
            raise ValueError(f"push_rows: src is on {src.device}, the transport on {self.device}")
        if not src.is_contiguous():
            raise ValueError("push_rows: src must be contiguous")
        n = None
        for name, index in (("src_row", src_row), ("dst_rank", dst_rank), ("dst_row", dst_row)):
            if not isinstance(index, torch.Tensor):
                raise TypeError(f"push_rows: {name} must be a tensor, got {type(index).__name__}")
            if index.dtype != torch.int64:
                raise TypeError(f"push_rows: {name} must be int64, got {index.dtype}")
            if index.dim() != 1:
                raise ValueError(f"push_rows: {name} must be 1-D, got shape {tuple(index.shape)}")
            if index.device != self.device:
                raise ValueError(f"push_rows: {name} is on {index.device}, the transport on {self.device}")
            if not index.is_contiguous():
                raise ValueError(f"push_rows: {name} must be contiguous")
            if n is None:
                n = index.shape[0]
            elif index.shape[0] != n:
                raise ValueError(
                    "push_rows: src_row, dst_rank and dst_row must have one length, got "
                    f"{src_row.shape[0]}, {dst_rank.shape[0]}, {dst_row.shape[0]}"
                )
        return n

    def _report(self, words: list) -> Optional[BaseException]:
        """The error that a control block's reported words describe, or None."""
        layout, world = self.layout, self.world_size
        problems = []
        bad = words[layout.scalar("bad_entry")]
        if bad:
            problems.append(
                f"push_rows entry {bad - 1} named a destination rank outside [0, {world}) or a source row "
                "outside src; it was not written"
            )
        needed = words[layout.scalar("out_needed")]
        if needed:
            given = words[layout.scalar("out_capacity")]
            problems.append(
                f"push_rows from rank {self.rank} overflowed a symmetric buffer: needed capacity {needed} rows, "
                f"given capacity {given} rows; rows past the capacity were not written"
            )
        for peer in range(world):
            needed = words[layout.array("in_needed", peer)]
            if needed:
                given = words[layout.array("in_capacity", peer)]
                problems.append(
                    f"rank {peer} pushed past the capacity of rank {self.rank}'s symmetric buffer: needed "
                    f"capacity {needed} rows, given capacity {given} rows"
                )
        timed_out = words[layout.scalar("timeout_generation")]
        if timed_out:
            missing = [s for s in range(world) if words[layout.array("missing", s)]]
            message = (
                f"barrier (generation {timed_out}) timed out after {self.timeout_s:g} s on rank {self.rank} of "
                f"{world}: rank(s) {missing} never arrived"
            )
            if problems:
                message += "; also: " + "; ".join(problems)
            return TimeoutError(message)
        if problems:
            return RuntimeError(f"symmetric transport, rank {self.rank} of {world}: " + "; ".join(problems))
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, world_size={self.world_size}, device={self.device})"
