"""The CUDA backend's low-latency path: capacity-mode dispatch and combine in two kernels each.

For small batches (decode) the fixed costs of the general protocol (count, notify, barrier, plan, send,
barrier, expand; group, barrier, send, barrier, reduce) outweigh the bytes. This path (kernels/ll.cu,
whose header describes the protocol) needs no group barrier: each block of a source's send kernel adds
its arrival to one flag word per source on each receiver, and receivers start the moment every source's
arrivals have landed. Two kernel launches per op, no host work, capturable in a CUDA graph.

It serves a capacity-mode dispatch (`max_recv_tokens=C`) when every rank can decide so alike from what
the ranks agree on (world size, top-k, hidden size, dtype, experts, placement, C): C at most
`max_rows()` rows, the receive buffers (2 x W x C rows) within `max_bytes()`, rows a multiple of 16
bytes, K <= 32, W <= 64, E <= 2048. `FUSER_MOE_LL=0` turns it off, `FUSER_MOE_LL=1` uses it whatever the size.

The dispatch leaves a handle (each wire row's output rows on the expert rank, each token's slot on every
rank on the source) attached to the `recv_src_idx` tensor it returned; a combine given that very tensor
(and `recv_src_rank`) runs on the handle, with no exchange of sizes. Any other combine takes the general
path.
"""
from __future__ import annotations

import ctypes
import os
import weakref
from dataclasses import dataclass
from typing import Optional

import torch

from .common import CommStats, DeviceCount, DispatchOutputs
from .cuda_kernels import _DTYPE_SUFFIX, _IDX_SUFFIX, grid, sm_budget
from .cuda_kernels import _kernel as _moe_kernel
from .transport import nvrtc

KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "ll.cu")
MAX_WORLD = 64
MAX_TOP_K = 32
THREADS = 512  # kernels/ll.cu FM_LL_THREADS: 16 warps a block
WARPS = THREADS // 32
# State words (kernels/ll.cu FM_LL_*).
GEN_DISPATCH, TICKET_DSEND, TICKET_DRECV, GEN_COMBINE, TICKET_CSEND, TICKET_CRECV, TIMEOUT_PHASE, \
    TIMEOUT_MISSING = range(8)
STATE_WORDS = 8
_MAX_CHUNK = 8  # tokens a send block handles: positions inside a chunk cost O(chunk * K) per slot
_SLOTS = 4  # kernels/ll.cu FM_LL_SLOTS
MAX_EXPERTS = 2048  # the dispatch kernels keep three int tables of E entries in shared memory
SHARED_LIMIT = nvrtc.DEFAULT_SHARED  # dynamic shared memory a launch gets without opting in
# Room left for the kernels' static __shared__ arrays (about 1.3 KiB in ll.cu) when a launch opts in to
# more dynamic shared memory than SHARED_LIMIT.
_STATIC_SHARED_ROOM = 4 * 1024


def max_rows() -> int:
    """The largest capacity C the path takes by itself (FUSER_MOE_LL_MAX_ROWS, default 4096)."""
    return int(os.environ.get("FUSER_MOE_LL_MAX_ROWS", "4096"))


def max_bytes() -> int:
    """The most bytes of receive buffers per rank the path takes by itself (default 1 GiB)."""
    return int(os.environ.get("FUSER_MOE_LL_MAX_BYTES", str(1 << 30)))


def _kernel(name: str, device: torch.device):
    return _moe_kernel(name, device, KERNEL_SOURCE)


def unavailable_reason(x: torch.Tensor, top_k: int, world: int, num_experts: int, n_local_max: int,
                       capacity: Optional[int]) -> Optional[str]:
    """Why the low-latency path does not serve this dispatch, or None when it does.

    Depends only on what every rank agrees on, so all ranks decide alike.
    """
    mode = os.environ.get("FUSER_MOE_LL", "auto")
    if mode == "0":
        return "FUSER_MOE_LL=0"
    if not x.is_cuda:
        return "CPU tensors"
    if capacity is None:
        return "exact mode (the host must learn the receive count)"
    row_bytes = x.shape[1] * x.element_size()
    if x.dtype not in _DTYPE_SUFFIX or row_bytes % 16:
        return f"rows of {row_bytes} bytes of {x.dtype} (needs a multiple of 16 bytes of f32/bf16/f16)"
    if top_k > MAX_TOP_K or world > MAX_WORLD:
        return f"K={top_k}, W={world} (the path takes K <= {MAX_TOP_K}, W <= {MAX_WORLD})"
    if world * n_local_max > 4096 or num_experts > MAX_EXPERTS:
        return (f"E={num_experts}, W x most local experts = {world * n_local_max} (the path's shared-memory tables "
                f"take E <= {MAX_EXPERTS} and W x local experts <= 4096)")
    shared = _recv_shared(_MAX_CHUNK, num_experts, world, top_k, n_local_max)
    limit = shared_limit(getattr(x, "device", None))
    if shared > limit:
        return (f"E={num_experts}, W={world}, K={top_k}, most local experts {n_local_max}: the dispatch receive's "
                f"tables take {shared} bytes of shared memory (the path takes {limit} on this device)")
    if mode == "1":
        return None
    if capacity > max_rows():
        return f"capacity {capacity} > {max_rows()} rows (FUSER_MOE_LL_MAX_ROWS)"
    if 2 * world * capacity * row_bytes > max_bytes():
        return f"receive buffers of {2 * world * capacity * row_bytes} bytes > FUSER_MOE_LL_MAX_BYTES"
    return None


class LowLatencyState:
    """Per-group device words of the path: generations, tickets, the timeout report."""

    def __init__(self, device: torch.device, world: int):
        self.words = torch.zeros(STATE_WORDS, dtype=torch.int64, device=device)
        self.world = world

    def timeout_error(self, rank: int, timeout_s: float) -> Optional[TimeoutError]:
        """The wait that gave up since the last check (a host synchronisation), cleared; or None."""
        phase, missing = self.words[TIMEOUT_PHASE:TIMEOUT_MISSING + 1].tolist()
        if not phase:
            return None
        self.words[TIMEOUT_PHASE:TIMEOUT_MISSING + 1].zero_()
        ranks = [s for s in range(self.world) if (missing >> s) & 1]
        what = {1: "moe_dispatch", 2: "moe_combine"}.get(phase, "low-latency path")
        return TimeoutError(f"cuda backend, rank {rank}: {what} (low-latency path) waited {timeout_s:g} s for "
                            f"rank(s) {ranks}, which never delivered their rows")


@dataclass
class Handle:
    """What a low-latency dispatch leaves for its combine (kept on the device; nothing for the host)."""

    wire_rows: torch.Tensor  # int32 [W * slots * K]: output row of each (source, slot, k) here, -1 if none
    send_pos: torch.Tensor  # int32 [T, W]: slot of each of this rank's tokens on each rank, -1 if not sent
    n_from: torch.Tensor  # int64 [W]: wire rows received from each rank
    summary: torch.Tensor  # int64 [4]: V, wire rows in, wire rows in from peers
    sent_remote: torch.Tensor  # int64 [1]: wire rows sent to peers
    slots: int
    tokens: int
    top_k: int
    capacity: int
    src_rank: "weakref.ref"


_HANDLE_ATTR = "_fuser_moe_ll_handle"


def handle_for(src_idx: torch.Tensor, src_rank: torch.Tensor) -> Optional[Handle]:
    """The handle of the low-latency dispatch that returned these very tensors, or None.

    The handle rides on the `recv_src_idx` tensor object itself, so it lives exactly as long as that
    output; a copy or a view of it carries none (and takes the general path).
    """
    handle = getattr(src_idx, _HANDLE_ATTR, None)
    if handle is None or handle.src_rank() is not src_rank:
        return None
    return handle


def dispatch(comm, group_state, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, placement,
             capacity: int, stats: CommStats):
    """Capacity-mode dispatch in two kernels (send, recv). Returns (DispatchOutputs, pairs_in()).

    Args:
        group_state: the CUDA backend's per-group state (its transport, error words and `ll` slot).
        placement: the routing placement (expert_to_rank and local_index on x's device).
        capacity: C, rows of every output.
        stats: the call's statistics; its `num_sms` (the SM budget) caps every kernel's blocks.
    """
    world, rank, device = comm.world_size, comm.rank, x.device
    tr = group_state.transport
    ll = _state(group_state, device, world)
    tokens, top_k, hidden = topk_idx.shape[0], topk_idx.shape[1], x.shape[1]
    num_experts = placement.num_experts
    n_local = placement.n_local[rank]
    head_width = 2 + max(placement.n_local)
    slots = capacity
    row_bytes = hidden * x.element_size()
    meta_width = 1 + 4 * top_k
    x = x.contiguous()
    idx = topk_idx.contiguous()
    weights = topk_weights.contiguous()
    if weights.dtype != torch.float32:
        weights = weights.float()

    # Receive buffers: rows (parity * W + source) * slots + slot.
    x_buf = tr.buffer("ll_dispatch_x", torch.uint8, (row_bytes,), 2 * world * slots)
    meta_buf = tr.buffer("ll_dispatch_meta", torch.int32, (meta_width,), 2 * world * slots)
    head_buf = tr.buffer("ll_dispatch_head", torch.int64, (head_width,), 2 * world)
    flag_buf = tr.buffer("ll_dispatch_flag", torch.int64, (), world)

    i32, i64 = torch.int32, torch.int64
    n_to = torch.empty(world, dtype=i64, device=device)
    sent_remote = torch.empty(1, dtype=i64, device=device)
    send_pos = torch.empty(max(tokens, 1), world, dtype=i32, device=device)
    num_sms, cap = sm_budget(device, stats)
    # A block per chunk of tokens; a rank without peers sends no rows, so its send kernel (the routing
    # for send_pos and n_to) takes the fewest blocks and leaves the SMs to its receive kernel.
    chunk = _chunk(tokens, num_sms if world > 1 else 1, cap)
    n_chunks = max(1, -(-tokens // chunk))
    # Cut rows into parts when there are fewer (token, peer) rows than warps (decode).
    split = _split(num_sms * WARPS, n_chunks * chunk * max(1, min(world - 1, top_k)), row_bytes)
    shared = _route_shared(chunk, num_experts, world, top_k)
    _kernel(f"fuser_moe_ll_dispatch_send_{_IDX_SUFFIX[idx.dtype]}", device).launch(grid(n_chunks, cap, stats), THREADS, [
        x, ctypes.c_int64(row_bytes), idx, weights, ctypes.c_int64(tokens), ctypes.c_int32(top_k),
        placement.expert_to_rank, placement.local_index, ctypes.c_int64(num_experts),
        ctypes.c_int32(world), ctypes.c_int32(rank), ctypes.c_int64(chunk), ctypes.c_int64(slots),
        ctypes.c_int32(head_width), x_buf.peer_ptrs, meta_buf.peer_ptrs, head_buf.peer_ptrs, flag_buf.peer_ptrs,
        ll.words, n_to, sent_remote, send_pos, ctypes.c_int32(split)], shared_mem=shared)

    recv_x = torch.empty(capacity, hidden, dtype=x.dtype, device=device)
    recv_idx = torch.empty(capacity, dtype=i64, device=device)
    recv_w = torch.empty(capacity, dtype=torch.float32, device=device)
    src_idx = torch.empty(capacity, dtype=i64, device=device)
    src_rank = torch.empty(capacity, dtype=i64, device=device)
    n_from = torch.empty(world, dtype=i64, device=device)
    per_expert = torch.empty(n_local, dtype=i64, device=device)
    summary = torch.empty(4, dtype=i64, device=device)
    wire_rows = torch.empty(world * slots * top_k, dtype=i32, device=device)
    # Block b routes chunk b of this rank's tokens (chunks of its own) and copies their rows; the peers'
    # wire rows go to every warp, (wire row, part) a warp: a row is read once and written to each of its
    # pairs' output rows. About min(C, (W - 1) x T) of them arrive (every peer sends at most its T
    # tokens); the C - V padding rows are cut into the same parts, and all these items go round the
    # blocks (item q to block q % blocks), so that no block takes more than a like share. The grid
    # counts a padding row as a warp's work (sized by parts, it took every SM at W=1, and blocks that
    # start only when the send ends route their chunk late). Started beside its send kernel (programmatic
    # launch), it gets the SMs that kernel leaves at once, the rest when it ends: the chunks go to the
    # blocks that start at once (a block started late would route late), the peers' rows to all.
    overlap = _overlap(stats)
    free = num_sms - n_chunks if overlap and n_chunks < num_sms else num_sms
    recv_chunk = _chunk(tokens, free, cap)
    rows_est = max(1, min(capacity, (world - 1) * tokens))
    split_recv = _split(num_sms * WARPS, rows_est, row_bytes)
    copy_blocks = -(-(rows_est * split_recv + max(0, capacity - tokens * top_k)) // WARPS)
    blocks = max(-(-max(tokens, 1) // recv_chunk), min(num_sms, copy_blocks))
    timeout_ns = int(tr.timeout_s * 1e9)
    _kernel(f"fuser_moe_ll_dispatch_recv_{_IDX_SUFFIX[idx.dtype]}", device).launch(grid(blocks, cap, stats), THREADS, [
        x_buf.local, meta_buf.local, head_buf.local, flag_buf.local, x, ctypes.c_int64(row_bytes), idx, weights,
        ctypes.c_int64(tokens), ctypes.c_int32(top_k), placement.expert_to_rank, placement.local_index,
        ctypes.c_int64(num_experts), ctypes.c_int64(recv_chunk), ctypes.c_int32(world), ctypes.c_int32(rank),
        ctypes.c_int64(slots), ctypes.c_int32(head_width), ctypes.c_int32(n_local), ctypes.c_int64(capacity),
        recv_x, recv_idx, recv_w, src_idx, src_rank, n_from, per_expert, summary, wire_rows, ll.words,
        group_state.errors, ctypes.c_int64(timeout_ns), ctypes.c_int32(split_recv)],
        shared_mem=_recv_shared(recv_chunk, num_experts, world, top_k, n_local), overlap_previous=overlap)

    handle = Handle(wire_rows, send_pos, n_from, summary, sent_remote, slots, tokens, top_k, capacity,
                    weakref.ref(src_rank))
    setattr(src_idx, _HANDLE_ATTR, handle)
    wire_row_bytes = row_bytes + meta_width * 4
    stats.bytes_sent = DeviceCount(sent_remote[0], wire_row_bytes, (world - 1) * head_width * 8)
    stats.bytes_recv = DeviceCount(summary[2], wire_row_bytes)
    out = DispatchOutputs(recv_x, recv_idx, recv_w, src_idx, src_rank, n_to, n_from, per_expert)
    return out, lambda: int(summary[0])


def combine(comm, group_state, handle: Handle, x: torch.Tensor, topk_weights: torch.Tensor, num_tokens: int,
            stats: CommStats) -> torch.Tensor:
    """Combine on a low-latency dispatch's handle, in two kernels (send, recv)."""
    world, rank, device = comm.world_size, comm.rank, x.device
    if num_tokens != handle.tokens:
        raise ValueError(f"moe_combine: num_tokens={num_tokens} on rank {rank}, but the dispatch whose outputs it "
                         f"combines had {handle.tokens} tokens")
    if x.shape[0] != handle.capacity:
        raise ValueError(f"moe_combine: x has {x.shape[0]} rows on rank {rank}, but its dispatch returned "
                         f"{handle.capacity} (capacity mode)")
    tr = group_state.transport
    ll = _state(group_state, device, world)
    num_sms, cap = sm_budget(device, stats)
    hidden = x.shape[1]
    row_bytes = hidden * x.element_size()
    slots = handle.slots
    x = x.contiguous()
    weights = topk_weights.contiguous()
    if weights.dtype != torch.float32:
        weights = weights.float()
    suffix = _DTYPE_SUFFIX[x.dtype]
    part_buf = tr.buffer("ll_combine_partial", x.dtype, (hidden,), 2 * world * slots)
    flag_buf = tr.buffer("ll_combine_flag", torch.int64, (), world)
    rows_est = max(1, handle.capacity // max(handle.top_k, 1))  # about the wire rows received
    split = _split(2 * num_sms * WARPS, rows_est, row_bytes)
    blocks = max(1, min(num_sms, -(-rows_est * split // WARPS)))
    _kernel(f"fuser_moe_ll_combine_send_{suffix}", device).launch(grid(blocks, cap, stats), THREADS, [
        x, ctypes.c_int64(hidden), weights, handle.wire_rows, handle.n_from, ctypes.c_int32(handle.top_k),
        ctypes.c_int32(world), ctypes.c_int32(rank), ctypes.c_int64(slots), part_buf.peer_ptrs, flag_buf.peer_ptrs,
        ll.words, ctypes.c_int32(split)])
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=device)
    split_recv = _split(2 * num_sms * WARPS, num_tokens, row_bytes)
    blocks_recv = max(1, min(num_sms, -(-max(num_tokens, 1) * split_recv // WARPS)))
    _kernel(f"fuser_moe_ll_combine_recv_{suffix}", device).launch(grid(blocks_recv, cap, stats), THREADS, [
        part_buf.local, flag_buf.local, handle.send_pos, ctypes.c_int64(num_tokens), ctypes.c_int64(hidden),
        ctypes.c_int32(world), ctypes.c_int32(rank), ctypes.c_int64(slots), x, weights, handle.wire_rows,
        ctypes.c_int32(handle.top_k), out, ll.words, ctypes.c_int64(int(tr.timeout_s * 1e9)),
        ctypes.c_int32(split_recv)], overlap_previous=_overlap(stats))
    stats.bytes_sent = DeviceCount(handle.summary[2], row_bytes)
    stats.bytes_recv = DeviceCount(handle.sent_remote[0], row_bytes)
    return out


def _chunk(tokens: int, blocks: int, cap: int) -> int:
    """Tokens a dispatch block routes: spread over about `blocks` blocks, at most _MAX_CHUNK (positions
    inside a chunk cost O(chunk x K) a slot) unless the budget's `cap` blocks could not hold them."""
    chunk = min(_MAX_CHUNK, max(1, -(-tokens // max(1, blocks))))
    return max(chunk, -(-tokens // cap))


def shared_limit(device) -> int:
    """Dynamic shared memory the path's kernels may take on `device`: what a block may opt in to there,
    less room for their static arrays; SHARED_LIMIT where no CUDA device is named."""
    if device is None or getattr(device, "type", None) != "cuda":
        return SHARED_LIMIT
    return max(SHARED_LIMIT, nvrtc.shared_memory_limit(device) - _STATIC_SHARED_ROOM)


def _route_shared(chunk: int, num_experts: int, world: int, top_k: int) -> int:
    """Bytes of kernels/ll.cu's routing tables (FmLlRoute) for a chunk of `chunk` tokens."""
    return 8 * chunk + 4 * (3 * num_experts + 2 * world + chunk * world + 4 * chunk * top_k + _SLOTS * THREADS)


def _recv_shared(chunk: int, num_experts: int, world: int, top_k: int, n_local: int) -> int:
    """Bytes of the dispatch receive kernel's shared memory: the routing tables, then int64 bases."""
    return -(-_route_shared(chunk, num_experts, world, top_k) // 8) * 8 + 8 * (world * n_local + n_local + 1)


def _overlap(stats: CommStats) -> bool:
    """Whether a receive kernel may start before its send kernel ends (programmatic dependent launch).

    Only when this rank has its GPU to itself: with ranks sharing one GPU (under MPS), receive blocks
    launched early spin on flags on SMs that the other ranks' send kernels need (4 ranks on one H200,
    T=128: combine 83 us with it against 73 us without).
    """
    return int(stats.device_share) == 1


def _split(warps: int, rows: int, row_bytes: int) -> int:
    """Parts to cut each row into so that `rows` rows keep about `warps` warps busy (parts >= 512 bytes)."""
    return max(1, min(16, warps // max(rows, 1), row_bytes // 512))


def _state(group_state, device: torch.device, world: int) -> LowLatencyState:
    ll = getattr(group_state, "ll", None)
    if ll is None:
        ll = group_state.ll = LowLatencyState(device, world)
    return ll


def raise_pending(group_state, rank: int) -> None:
    """Raises the TimeoutError of a low-latency wait that gave up (called by the backend's check)."""
    ll = getattr(group_state, "ll", None)
    if ll is None:
        return
    error = ll.timeout_error(rank, group_state.transport.timeout_s)
    if error is not None:
        raise error
