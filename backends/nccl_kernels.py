"""The NCCL backend's device path: the kernels of kernels/moe.cu writing into local buffers, around
NCCL's all_to_all_single (docs/contract.md section 8: one routing plan, two transports).

The kernels address their destinations through an array of base pointers, one per destination rank
(`count_ptrs`, `x_ptrs`, `part_ptrs`, ...), to which they add the row the plan gives. The cuda backend
passes its peers' mapped buffers; here every pointer points into this rank's own send buffer, shifted
so that the plan's row lands at the place that destination's block of the send buffer gives it:
  counts:   notify writes this rank's count row to row r of "every rank's" count buffer; with
            count_ptrs[d] = send + (d * width - r * row_len) words the row lands in row d of a local
            [W, width] buffer, which one all-to-all turns into the count matrix on every rank.
  dispatch: plan, told `local_send`, gives base_d[d] = the rows this rank sends to ranks before d, so
            with every x_ptrs[d] at the start of the send buffer the wire row of token t for rank d lands
            at row base_d[d] + (position): the send layout that all_to_all_single sends (by destination,
            then token). The receiver's rows arrive in (source rank, token) order, the order the cuda
            backend's wire buffer has, so expand runs unchanged.
  combine:  send writes the partial of (source s, token t) at row r * T_max + t of s's buffer; with
            part_ptrs[s] = send + (s - r) * T_max rows it lands in block s of a local [W * T_max] layout
            (with a flag per row), which one all-to-all of equal splits delivers as the [W, T_max] layout
            reduce reads (block e from expert rank e). No split sizes, so no host synchronisation.
The count matrix is read on the host once per dispatch (the split sizes of the payload all-to-alls),
while the device packs the rows.
"""
from __future__ import annotations

import ctypes
import os
import weakref
from typing import Optional

import torch

from . import routing
from .common import CommStats, DispatchOutputs
from .communicator import Communicator
from .cuda_kernels import (GROUP_CAP, MAX_KERNEL_TOP_K, MAX_KERNEL_WORLD, _IDX_SUFFIX, _MAX_CHUNK, _PLAN_THREADS,
                           _THREADS, _kernel, combine_operands, grid, launch_combine, launch_notify, sm_budget)

_NO_LIMIT = torch.iinfo(torch.int64).max
_available: dict = {}


class _Buffers:
    """What the device path keeps per communicator between calls, so that a call allocates only its
    outputs and launches no fill it can avoid: the count rows, the send and receive buffers of the
    payload (grown when a call needs more), the combine's dense partial layout, and the pointer arrays
    that aim the kernels at them (made once per buffer). Every call runs on the current stream, and each
    all-to-all returns with that stream ordered after it, so a buffer is free again when the next call
    starts; calls on different streams must not overlap (the cuda backend's buffers ask the same)."""

    def __init__(self, comm: Communicator):
        self.rank, self.world, self.device = comm.rank, comm.world_size, comm.device
        self.ranks = torch.arange(self.world, device=self.device)
        self._tensors: dict = {}
        self._pointers: dict = {}

    def tensor(self, name: str, rows: int, row_shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """[rows, *row_shape] of dtype: the leading rows of a buffer kept under `name` (grown, never shrunk)."""
        key = (name, row_shape, dtype)
        buf = self._tensors.get(key)
        if buf is None or buf.shape[0] < rows:
            buf = self._tensors[key] = torch.empty((max(rows, 1),) + row_shape, dtype=dtype, device=self.device)
        return buf[:rows]

    def pointers(self, base: torch.Tensor, row_bytes: int, scale: int = 0, offset: int = 0) -> torch.Tensor:
        """int64 [W] addresses, one per rank d: base.data_ptr() + (d * scale + offset) * row_bytes; made
        once per (address, row_bytes, scale, offset), on which alone the values depend."""
        key = (base.data_ptr(), row_bytes, scale, offset)
        ptrs = self._pointers.get(key)
        if ptrs is None:
            if len(self._pointers) > 64:
                self._pointers.clear()
            ptrs = self._pointers[key] = (self.ranks * scale + offset) * row_bytes + base.data_ptr()
        return ptrs


_buffers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _buffers_of(comm: Communicator) -> _Buffers:
    """This communicator's buffers (made at its first call; released when it closes or is dropped)."""
    buffers = _buffers.get(comm)
    if buffers is None or buffers.device != comm.device:
        buffers = _buffers[comm] = _Buffers(comm)
        ref = weakref.ref(comm)
        comm.on_close(lambda: _buffers.pop(ref(), None) if ref() is not None else None)
    return buffers


def serves(x: torch.Tensor, top_k: int, world: int) -> bool:
    """Whether the kernels serve this call: CUDA tensors within the kernels' limits, cuda-python present,
    and FUSER_MOE_NCCL_KERNELS not set to 0 (else the torch twin of routing.py runs)."""
    if not (x.is_cuda and top_k <= MAX_KERNEL_TOP_K and world <= MAX_KERNEL_WORLD):
        return False
    if os.environ.get("FUSER_MOE_NCCL_KERNELS", "1") == "0":
        return False
    if "cuda-python" not in _available:
        try:
            import cuda.bindings.driver  # noqa: F401
            _available["cuda-python"] = True
        except ImportError:
            _available["cuda-python"] = False
    return _available["cuda-python"]


def dispatch(comm: Communicator, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
             placement: routing.Placement, checks: torch.Tensor, agree, max_recv_tokens: Optional[int],
             stats: CommStats):
    """Dispatch with the kernels: count, notify (local), all-to-all of the count rows, plan, send (local),
    host read of the matrix, all-to-all of the rows and of their metadata, expand.

    The rows are packed into the send buffer (sized for the most rows T tokens can make, T * min(W, K))
    before the host reads the counts, so the device packs while the host waits.

    Args: as `NcclBackend.dispatch`; checks: [5] int64 words that travel after the count row;
        agree(host_rows): called with the rows received (host ints) before any payload travels; returns
        (per_expert, pairs) or raises.
    Returns: (outputs, host rows, wire rows sent per rank, received per rank, per_expert, pairs).
    """
    world, rank, device = comm.world_size, comm.rank, x.device
    buffers = _buffers_of(comm)
    tokens, top_k, hidden = topk_idx.shape[0], topk_idx.shape[1], x.shape[1]
    experts = placement.num_experts
    idx, weights, x = topk_idx.contiguous(), topk_weights.contiguous(), x.contiguous()
    suffix = _IDX_SUFFIX[idx.dtype]
    sms, cap = sm_budget(device, stats)
    chunk = min(_MAX_CHUNK, max(1, -(-tokens // (2 * sms))))
    chunk = max(chunk, -(-tokens // cap))  # an SM budget takes fewer, larger chunks
    n_chunks = -(-tokens // chunk)
    i32, i64 = torch.int32, torch.int64
    chunk_e = torch.empty(experts, max(n_chunks, 1), dtype=i32, device=device)
    chunk_d = torch.empty(world, max(n_chunks, 1), dtype=i32, device=device)
    n_to = torch.empty(world, dtype=i64, device=device)
    e2r = placement.expert_to_rank
    row_len = world + experts + 1
    width = row_len + checks.numel()
    rows_to = buffers.tensor("count_rows_to", world, (width,), i64)
    if n_chunks:
        _kernel(f"fuser_moe_dispatch_count_{suffix}", device).launch(grid(n_chunks, cap, stats), _THREADS, [
            idx, ctypes.c_int64(tokens), ctypes.c_int32(top_k), e2r, ctypes.c_int64(experts),
            ctypes.c_int32(world), ctypes.c_int64(chunk), chunk_e, chunk_d])
    # notify writes row r of "rank d's" count buffer: row d of rows_to
    count_ptrs = buffers.pointers(rows_to, 8, scale=width, offset=-rank * row_len)
    launch_notify(chunk_e, chunk_d, n_chunks, experts, world, rank, tokens, count_ptrs, n_to, None, cap, stats)
    if checks.numel():
        rows_to[:, row_len:] = checks
    rows_from = buffers.tensor("count_rows_from", world, (width,), i64)
    comm.all_to_all_single(rows_from, rows_to)
    matrix = rows_from if width == row_len else rows_from[:, :row_len].contiguous()
    n_from_dev = torch.empty(world, dtype=i64, device=device)
    per_expert_dev = torch.empty(placement.n_local[rank], dtype=i64, device=device)
    summary = torch.empty(8, dtype=i64, device=device)
    plan = torch.empty(3 * experts + world, dtype=i64, device=device)
    # local_send: base_d is where each destination's rows start in this rank's own send buffer.
    _kernel("fuser_moe_dispatch_plan", device).launch(1, _PLAN_THREADS, [
        matrix, ctypes.c_int64(experts), ctypes.c_int32(world), ctypes.c_int32(rank), e2r,
        placement.expert_order, placement.rank_begin, plan, n_from_dev, per_expert_dev, summary, ctypes.c_int32(1),
        None])

    meta_width = routing.meta_width(top_k)
    row_bytes = hidden * x.element_size()
    most_rows = tokens * min(world, top_k)  # a token travels at most once to each rank
    send_x = buffers.tensor("send_x", most_rows, (hidden,), x.dtype)
    send_meta = buffers.tensor("send_meta", most_rows, (meta_width,), i64)
    if n_chunks:
        shared = 4 * (2 * chunk * top_k + ((chunk * world + 1) & ~1)) + 8 * chunk
        _kernel(f"fuser_moe_dispatch_send_{suffix}", device).launch(grid(n_chunks, cap, stats), _THREADS, [
            x, ctypes.c_int64(row_bytes), idx, weights, ctypes.c_int64(tokens), ctypes.c_int32(top_k), e2r,
            ctypes.c_int64(experts), ctypes.c_int32(world), ctypes.c_int32(rank), ctypes.c_int64(chunk),
            chunk_e, chunk_d, plan, buffers.pointers(send_x, row_bytes), buffers.pointers(send_meta, meta_width * 8),
            ctypes.c_int64(_NO_LIMIT), ctypes.c_int32(0)], shared_mem=shared)  # every row through NCCL
    host = rows_from.tolist()  # the device packs meanwhile
    stats.sync("count matrix to host")
    per_expert, pairs = agree(host)
    n_to_host = host[rank][:world]
    n_from_host = [host[s][rank] for s in range(world)]
    n_out, n_in = sum(n_to_host), sum(n_from_host)

    wire_x = buffers.tensor("wire_x", n_in, (hidden,), x.dtype)
    wire_meta = buffers.tensor("wire_meta", n_in, (meta_width,), i64)
    comm.all_to_all_single(wire_x, send_x[:n_out], n_from_host, n_to_host)
    comm.all_to_all_single(wire_meta, send_meta[:n_out], n_from_host, n_to_host)

    out_rows = pairs if max_recv_tokens is None else max_recv_tokens
    recv_x = torch.empty(out_rows, hidden, dtype=x.dtype, device=device)
    recv_idx = torch.empty(out_rows, dtype=i64, device=device)
    recv_w = torch.empty(out_rows, dtype=torch.float32, device=device)
    src_idx = torch.empty(out_rows, dtype=i64, device=device)
    src_rank = torch.empty(out_rows, dtype=i64, device=device)
    # expand's overflow words: an overflow was raised on the host already, so nobody reads them
    errors = buffers.tensor("dispatch_errors", 4, (), i64)
    warps = n_in + out_rows
    _kernel("fuser_moe_dispatch_expand", device).launch(
        grid(min(-(-warps // 8), 8 * sms), cap, stats), _THREADS, [
        wire_x, wire_meta, ctypes.c_int64(n_in), ctypes.c_int64(row_bytes), ctypes.c_int32(top_k), summary,
        ctypes.c_int64(out_rows), recv_x, recv_idx, recv_w, src_idx, src_rank, errors, None, ctypes.c_int32(rank)])
    out = DispatchOutputs(recv_x, recv_idx, recv_w, src_idx, src_rank, n_to, n_from_dev, per_expert_dev)
    return out, host, n_to_host, n_from_host, per_expert, pairs, meta_width


def combine(comm: Communicator, x: torch.Tensor, weights: torch.Tensor, src_idx: torch.Tensor,
            src_rank: torch.Tensor, num_tokens: int, max_tokens: int, stats: CommStats) -> tuple:
    """Combine with the kernels: group, send (local, dense [W, T_max] layout), all-to-all of equal splits
    of the partial rows and of their flags, reduce. Returns (combined_x, the error words)."""
    world, rank = comm.world_size, comm.rank
    hidden = x.shape[1]
    x, weights, src_idx, src_rank, stride = combine_operands(rank, x, weights, src_idx, src_rank, num_tokens,
                                                             max_tokens)
    buffers = _buffers_of(comm)
    groups = world * stride
    row_bytes = hidden * x.element_size()
    send_rows = buffers.tensor("combine_send_rows", groups, (hidden,), x.dtype)
    recv_rows = buffers.tensor("combine_recv_rows", groups, (hidden,), x.dtype)
    recv_flags = buffers.tensor("combine_recv_flags", groups, (), torch.int32)
    group_rows = buffers.tensor("combine_group_rows", groups * GROUP_CAP, (), torch.int32)
    # One fill clears what must start at zero: the send flags, the group counts and two counters, and the
    # error words (int64, 8-aligned at the end).
    words = 2 * groups + 2
    words += words % 2
    zeroed = buffers.tensor("combine_zeroed", words + 8, (), torch.int32)
    zeroed.zero_()
    send_flags, group_count = zeroed[:groups], zeroed[groups:2 * groups + 2]
    errors = zeroed[words:].view(torch.int64)

    def deliver():
        comm.all_to_all_single(recv_rows, send_rows)
        comm.all_to_all_single(recv_flags, send_flags)

    # The partial of (source s, token t) goes to row r * T_max + t of "s's buffer": block s of send_rows.
    out = launch_combine(
        x, weights, src_idx, src_rank, world=world, rank=rank, stride=stride, num_tokens=num_tokens,
        group_count=group_count, group_rows=group_rows, errors=errors,
        part_ptrs=buffers.pointers(send_rows, row_bytes, scale=stride, offset=-rank * stride),
        flag_ptrs=buffers.pointers(send_flags, 4, scale=stride, offset=-rank * stride), part_rows=recv_rows,
        part_flags=recv_flags, after_group=None, deliver=deliver, stats=stats)
    # The dense layout travels whole: every slot of every other rank's block, present or not.
    wire = (world - 1) * stride * (hidden * x.element_size() + 4)
    stats.bytes_sent += wire
    stats.bytes_recv += wire
    return out, errors
