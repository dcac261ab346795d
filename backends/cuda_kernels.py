"""The CUDA backend's kernel launches: each step of kernels/moe.cu with its launch geometry and limits.

`dispatch` and `combine` run the kernels on CUDA tensors within their limits (W <= 64, K <= 64); the
protocol policy (which path serves a call, checked mode, error reporting) is cuda.py's, the torch path
cuda_torch.py's. The steps are described in kernels/moe.cu's header:
  dispatch: count, notify, barrier, plan, send, barrier, expand. The count matrix tells every sender
    where each of its pairs lands in the receiver's output (local expert, source rank, source token), so
    the receiver copies each de-duplicated wire row to its output rows without sorting anything.
    Capacity mode streams: send and expand are one kernel, with no barrier between them; a sender
    stamps each wire row it wrote with the call's generation and the receiver expands a row as soon as
    its stamp arrives, so the expansion overlaps the wire. The count matrices alternate by the parity
    of the call (a fast rank's next call cannot overwrite the counts a slow peer has yet to read).
  combine: group, barrier, send, barrier, reduce. Partial rows go to a dense [W, T_max] layout on the
    source rank, with a flag per row, so no offsets need exchanging. With FUSER_MOE_STREAM_COMBINE=1 it
    streams (opt-in: on one H200 it is slower than the three kernels, see `streaming_combine`): group,
    barrier, then send and reduce in one kernel, where every expert rank stamps each (token, part) of
    the layout on the source with the call's generation (whether or not it has rows for it) and the
    source reduces a token as soon as its stamps have landed.
Exact mode sends into the wire buffer of earlier calls before it reads the counts, and sends again in
the rare call that outgrows it (every rank reads the same largest receive count, so all grow together).
"""
from __future__ import annotations

import ctypes
import os
from typing import Callable, Optional

import torch

from . import routing
from .common import CommStats, DeviceCount, DispatchOutputs
from .communicator import Communicator

_KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "moe.cu")
_IDX_SUFFIX = {torch.int64: "i64", torch.int32: "i32"}
_DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# Limits of the kernels (moe.cu): destination sets are 64-bit masks, slots and a token's rows on one
# expert rank are gathered in 64-entry lists. Beyond them the torch path runs.
MAX_KERNEL_WORLD = 64
MAX_KERNEL_TOP_K = 64
GROUP_CAP = 64
_THREADS = 256  # the kernels that keep per-warp shared arrays assume 8 warps a block
_PLAN_THREADS = 1024
_MAX_CHUNK = 32  # tokens a dispatch block handles
# Words of the summary that the plan kernel writes (moe.cu FM_SUM_*).
_SUM_WIRE_IN, _SUM_PAIRS_IN, _SUM_MAX_WIRE_IN, _SUM_MAX_TOKENS, _SUM_SENT_REMOTE, _SUM_RECV_REMOTE = range(6)
SUMMARY_WORDS = 8
_sm_counts: dict = {}


_kernel_cache: dict = {}


def _kernel(name: str, device: torch.device, source: str = _KERNEL_SOURCE):
    """A kernel of `source` (moe.cu by default), compiled and loaded at first use (cached here too: this is
    on the hot path)."""
    key = (source, name, device.index)
    kernel = _kernel_cache.get(key)
    if kernel is None:
        from .transport.nvrtc import get_kernel

        kernel = _kernel_cache[key] = get_kernel(source, name, device)
    return kernel


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def sm_budget(device: torch.device, stats: CommStats) -> tuple:
    """(SMs to size the work for, the most blocks a kernel may launch) under the call's SM budget.

    Without a budget every kernel may spread over the whole device; with `stats.num_sms = n` no kernel
    launches more than n blocks, so no kernel takes more than n SMs and the rest stay free for other
    work (a grouped GEMM beside the communication).

    Ranks sharing one GPU (`stats.device_share = k > 1`) each get at most 1/k of its SMs, whatever the
    budget says: a receiving kernel spins until its peers' rows land, and under MPS the peers' senders
    run on the same SMs, so every rank's kernels must fit on the GPU at once or the receivers of some
    ranks could keep the senders of the others off it until the timeout.
    """
    sms = _multiprocessors(device)
    share = max(1, int(stats.device_share))
    fair = max(1, sms // share)
    if stats.num_sms is None:
        return fair, (1 << 30 if share == 1 else fair)
    budget = max(1, min(int(stats.num_sms), fair))
    return budget, budget


def grid(blocks: int, cap: int, stats: CommStats) -> int:
    """`blocks` capped by the SM budget; records the most blocks of the call in `stats.sms`."""
    blocks = max(1, min(int(blocks), cap))
    stats.sms = max(stats.sms, blocks)
    return blocks


def launch_notify(chunk_e: torch.Tensor, chunk_d: torch.Tensor, n_chunks: int, num_experts: int, world: int,
                  rank: int, tokens: int, count_ptrs, n_to: torch.Tensor, gen_state: Optional[torch.Tensor],
                  cap: int, stats: CommStats) -> None:
    """moe.cu's notify (both backends): a warp per column of the count row (W ranks, then E experts),
    8 columns a block, within the SM budget `cap`. `count_ptrs`: where row `rank` of every rank's count
    buffer is; gen_state: the call counter (None: one count buffer)."""
    columns = world + num_experts
    _kernel("fuser_moe_dispatch_notify", chunk_e.device).launch(
        grid(-(-columns // (_THREADS // 32)), cap, stats), _THREADS, [
            chunk_e, chunk_d, ctypes.c_int64(n_chunks), ctypes.c_int64(num_experts), ctypes.c_int32(world),
            ctypes.c_int32(rank), ctypes.c_int64(tokens), count_ptrs, n_to, gen_state])


def dispatch(comm: Communicator, state, x: torch.Tensor, topk_idx: torch.Tensor,
                      topk_weights: torch.Tensor, placement, max_recv_tokens: Optional[int], check_inputs: bool,
                      stats: CommStats):
    """Dispatch with the kernels of moe.cu: count, notify, barrier, plan, then send, barrier, expand
    (exact mode, and FUSER_MOE_STREAM=0) or send-expand (capacity mode: one kernel, rows expanded as
    they land)."""
    world, rank, device = comm.world_size, comm.rank, x.device
    tr = state.transport
    tokens, top_k, hidden = topk_idx.shape[0], topk_idx.shape[1], x.shape[1]
    num_experts = placement.num_experts
    idx = topk_idx.contiguous()
    weights = topk_weights.contiguous()
    x = x.contiguous()
    suffix = _IDX_SUFFIX[idx.dtype]
    sms, cap = sm_budget(device, stats)
    # Enough blocks to keep every SM busy at small T, at most _MAX_CHUNK tokens a block at large T.
    chunk = min(_MAX_CHUNK, max(1, -(-tokens // (2 * sms))))
    # Capacity mode streams where the budget leaves room for a block that expands beside the senders.
    stream = max_recv_tokens is not None and streaming() and cap >= 2
    # An SM budget takes fewer, larger chunks (with streaming, half the blocks for the senders at most).
    chunk = max(chunk, -(-tokens // (cap // 2 if stream else cap)))
    n_chunks = -(-tokens // chunk)
    i32, i64 = torch.int32, torch.int64
    chunk_e = torch.empty(num_experts, max(n_chunks, 1), dtype=i32, device=device)  # a row runs over chunks
    chunk_d = torch.empty(world, max(n_chunks, 1), dtype=i32, device=device)
    n_to = torch.empty(world, dtype=i64, device=device)
    e2r = placement.expert_to_rank
    stream_buffers = _stream_buffers(state, x, 2 + 3 * top_k, max_recv_tokens) if stream else None
    # Two count matrices, by the parity of the call (notify and plan read the call counter)
    counts = tr.buffer("dispatch_count_matrix", i64, (world + num_experts + 1,), 2 * world)
    gen_state = state.stream_words[0:1]
    if n_chunks:
        _kernel(f"fuser_moe_dispatch_count_{suffix}", device).launch(grid(n_chunks, cap, stats), _THREADS, [
            idx, ctypes.c_int64(tokens), ctypes.c_int32(top_k), e2r, ctypes.c_int64(num_experts),
            ctypes.c_int32(world), ctypes.c_int64(chunk), chunk_e, chunk_d])
    launch_notify(chunk_e, chunk_d, n_chunks, num_experts, world, rank, tokens, counts.peer_ptrs, n_to, gen_state,
                  cap, stats)
    tr.barrier()
    n_from = torch.empty(world, dtype=i64, device=device)
    per_expert = torch.empty(placement.n_local[rank], dtype=i64, device=device)
    summary = torch.empty(8, dtype=i64, device=device)
    plan = torch.empty(3 * num_experts + world, dtype=i64, device=device)  # totals, start_e, scan, base_d
    _kernel("fuser_moe_dispatch_plan", device).launch(1, _PLAN_THREADS, [
        counts.local, ctypes.c_int64(num_experts), ctypes.c_int32(world), ctypes.c_int32(rank), e2r,
        placement.expert_order, placement.rank_begin, plan, n_from, per_expert, summary, ctypes.c_int32(0),
        gen_state])

    meta_width = 2 + 3 * top_k
    row_bytes = hidden * x.element_size()
    shared = 4 * (2 * chunk * top_k + ((chunk * world + 1) & ~1)) + 8 * chunk

    def send(capacity: int):
        x_buf = tr.buffer("dispatch_wire_x", x.dtype, (hidden,), capacity)
        meta_buf = tr.buffer("dispatch_wire_meta", i64, (meta_width,), capacity)
        if n_chunks:
            _kernel(f"fuser_moe_dispatch_send_{suffix}", device).launch(grid(n_chunks, cap, stats), _THREADS, [
                x, ctypes.c_int64(row_bytes), idx, weights, ctypes.c_int64(tokens), ctypes.c_int32(top_k), e2r,
                ctypes.c_int64(num_experts), ctypes.c_int32(world), ctypes.c_int32(rank), ctypes.c_int64(chunk),
                chunk_e, chunk_d, plan, x_buf.peer_ptrs, meta_buf.peer_ptrs,
                ctypes.c_int64(min(x_buf.rows, meta_buf.rows)), ctypes.c_int32(1)],  # own rows stay in x
                shared_mem=shared)
        tr.barrier()
        return x_buf, meta_buf

    wire_row_bytes = row_bytes + meta_width * 8
    if stream:
        out = _send_expand(state, stream_buffers, x, idx, weights, placement, chunk, n_chunks, chunk_e, chunk_d,
                           plan, summary, max_recv_tokens, shared, n_to, n_from, per_expert, gen_state, stats, sms,
                           cap)
        _count_wire_bytes_on_device(stats, summary, wire_row_bytes)
        return _dispatch_result(out, summary, tokens, None)
    if max_recv_tokens is not None:
        max_tokens = None  # unknown on the host: a combine asks the peers
        x_buf, meta_buf = send(max_recv_tokens)
        out_rows = max_recv_tokens
        _count_wire_bytes_on_device(stats, summary, wire_row_bytes)
    else:
        # Send into the buffers of earlier calls first: rows travel while the host waits for the counts.
        shape_key = (x.dtype, hidden, meta_width)
        known = state.wire_capacity.get(shape_key)
        sent = send(known) if known is not None else None
        host = summary.tolist()
        stats.sync("receive counts to host")
        if not check_inputs:
            state.raise_pending(comm)  # (checked mode reports this call's errors at its end, on every rank)
        needed = host[_SUM_MAX_WIRE_IN]
        if sent is None or needed > min(sent[0].rows, sent[1].rows):
            # Every rank read the same largest receive count, so all grow and send again together.
            sent = send(max(needed, known or 0))
        x_buf, meta_buf = sent
        state.wire_capacity[shape_key] = min(x_buf.rows, meta_buf.rows)
        max_tokens = host[_SUM_MAX_TOKENS]  # every rank learns the same value from the count matrix
        out_rows = host[_SUM_PAIRS_IN]
        stats.bytes_sent = host[_SUM_SENT_REMOTE] * wire_row_bytes + (world - 1) * (world + num_experts + 1) * 8
        stats.bytes_recv = host[_SUM_RECV_REMOTE] * wire_row_bytes

    recv_x = torch.empty(out_rows, hidden, dtype=x.dtype, device=device)
    recv_idx = torch.empty(out_rows, dtype=i64, device=device)
    recv_w = torch.empty(out_rows, dtype=torch.float32, device=device)
    src_idx = torch.empty(out_rows, dtype=i64, device=device)
    src_rank = torch.empty(out_rows, dtype=i64, device=device)
    wire_capacity = min(x_buf.rows, meta_buf.rows)
    warps = wire_capacity + out_rows  # an upper bound of the items: wire rows, then padding rows
    _kernel("fuser_moe_dispatch_expand", device).launch(
        grid(min(-(-warps // 8), 8 * sms), cap, stats), _THREADS, [
        x_buf.local, meta_buf.local, ctypes.c_int64(wire_capacity), ctypes.c_int64(row_bytes),
        ctypes.c_int32(top_k), summary, ctypes.c_int64(out_rows), recv_x, recv_idx, recv_w, src_idx, src_rank,
        state.errors, x, ctypes.c_int32(rank)])  # this rank's own rows come from x
    out = DispatchOutputs(recv_x, recv_idx, recv_w, src_idx, src_rank, n_to, n_from, per_expert)
    return _dispatch_result(out, summary, tokens, max_tokens)


def _count_wire_bytes_on_device(stats: CommStats, summary: torch.Tensor, wire_row_bytes: int) -> None:
    """Capacity mode's byte counts: the wire rows the plan counted to and from other ranks (summary's
    FM_SUM_SENT_REMOTE / FM_SUM_RECV_REMOTE, [8] int64 on the device) times the bytes of a wire row (x row
    and metadata), read only when a trace asks (no host synchronisation)."""
    stats.bytes_sent = DeviceCount(summary[_SUM_SENT_REMOTE], wire_row_bytes)
    stats.bytes_recv = DeviceCount(summary[_SUM_RECV_REMOTE], wire_row_bytes)


def _dispatch_result(out: DispatchOutputs, summary: torch.Tensor, tokens: int, max_tokens: Optional[int]) -> tuple:
    """What `dispatch` returns: (out, a callable that reads the pairs received (a host synchronisation),
    the DispatchHandle that combine takes: T, the agreed T_max (None in capacity mode: unknown on the
    host, a combine asks the peers) and out's recv_src_idx / recv_src_rank)."""
    handle = routing.DispatchHandle(
        backend="cuda", num_tokens=tokens, pairs=None, wire_row=None, send_token=None, n_to=None, n_from=None,
        wire_out_max=None, max_tokens=max_tokens, src_idx=out.recv_src_idx, src_rank=out.recv_src_rank)
    return out, lambda: int(summary[_SUM_PAIRS_IN]), handle


def streaming() -> bool:
    """Whether capacity-mode dispatch streams (send and expand in one kernel, no barrier between them);
    FUSER_MOE_STREAM=0 keeps the send, barrier, expand sequence (for comparison)."""
    return os.environ.get("FUSER_MOE_STREAM", "1") != "0"


def streaming_combine() -> bool:
    """Whether combine streams (send and reduce in one kernel after one barrier, `_send_reduce`): only
    with FUSER_MOE_STREAM_COMBINE=1 (and FUSER_MOE_STREAM not 0).

    Opt-in because of what one H200 measured (W=1, T=4096, CUDA graph; docs/backend-cuda.md): 208.5 us
    against 197.5 us for group, barrier, send, barrier, reduce, and slower still with more sending
    blocks; the three-kernel combine, self-direct since, takes 152 us there. Its bits are the
    reference's (the GPU suite passed with it on). Its reducers stop waiting once the call's barrier
    has given up (a vanished peer), as the streaming dispatch's expanders do.
    """
    return streaming() and os.environ.get("FUSER_MOE_STREAM_COMBINE", "0") == "1"


def _stream_buffers(state, x: torch.Tensor, meta_width: int, capacity: int) -> tuple:
    """The wire buffers of a streaming dispatch (x rows, metadata, stamps), made before the call's
    barrier. A new stamp buffer starts at zero on every rank before a peer can map it (the transport
    zeroes every new buffer), and generations start at 1."""
    tr = state.transport
    x_buf = tr.buffer("dispatch_wire_x", x.dtype, (x.shape[1],), capacity)
    meta_buf = tr.buffer("dispatch_wire_meta", torch.int64, (meta_width,), capacity)
    stamp_buf = tr.buffer("dispatch_wire_stamps", torch.int64, (), capacity)
    return x_buf, meta_buf, stamp_buf


def _send_expand(state, buffers: tuple, x, idx, weights, placement, chunk, n_chunks, chunk_e, chunk_d, plan,
                 summary, capacity: int, shared: int, n_to, n_from, per_expert, gen_state, stats: CommStats,
                 sms: int, cap: int) -> DispatchOutputs:
    """Capacity mode's send and expand in one kernel (moe.cu fuser_moe_dispatch_send_expand): the
    first n_chunks blocks to start send a chunk each and stamp its wire rows on their receivers; the
    others expand this rank's wire rows as their stamps arrive."""
    tr, device = state.transport, x.device
    world, rank, top_k, hidden = tr.world_size, tr.rank, idx.shape[1], x.shape[1]
    i64 = torch.int64
    row_bytes = hidden * x.element_size()
    x_buf, meta_buf, stamp_buf = buffers
    wire_capacity = min(x_buf.rows, meta_buf.rows, stamp_buf.rows)
    recv_x = torch.empty(capacity, hidden, dtype=x.dtype, device=device)
    recv_idx = torch.empty(capacity, dtype=i64, device=device)
    recv_w = torch.empty(capacity, dtype=torch.float32, device=device)
    src_idx = torch.empty(capacity, dtype=i64, device=device)
    src_rank = torch.empty(capacity, dtype=i64, device=device)
    # Expanding blocks: enough warps for the rows, at most two blocks an SM (they spin while rows are on
    # their way, so they must leave room for other ranks' senders on a shared GPU), within the budget.
    expand_blocks = min(-(-(wire_capacity + capacity) // 8), 2 * sms)
    if n_chunks + expand_blocks > cap:
        expand_blocks = max(1, cap - n_chunks)
    blocks = n_chunks + expand_blocks
    stats.sms = max(stats.sms, min(blocks, sms))
    _kernel(f"fuser_moe_dispatch_send_expand_{_IDX_SUFFIX[idx.dtype]}", device).launch(blocks, _THREADS, [
        x, ctypes.c_int64(row_bytes), idx, weights, ctypes.c_int64(idx.shape[0]), ctypes.c_int32(top_k),
        placement.expert_to_rank, ctypes.c_int64(placement.num_experts), ctypes.c_int32(world),
        ctypes.c_int32(rank), ctypes.c_int64(chunk), chunk_e, chunk_d, plan, x_buf.peer_ptrs, meta_buf.peer_ptrs,
        stamp_buf.peer_ptrs, ctypes.c_int64(wire_capacity), ctypes.c_int64(n_chunks), x_buf.local, meta_buf.local,
        stamp_buf.local, summary, ctypes.c_int64(capacity), recv_x, recv_idx, recv_w, src_idx, src_rank,
        state.errors, gen_state, state.stream_words[1:3], ctypes.c_int64(int(tr.timeout_s * 1e9)),
        tr.barrier_gave_up],
        shared_mem=shared)
    return DispatchOutputs(recv_x, recv_idx, recv_w, src_idx, src_rank, n_to, n_from, per_expert)


def stream_split(groups: int) -> int:
    """Warps (parts of a row) per (source rank, token) of a streaming combine: from what every rank agrees
    on (W x T_max), since a source waits for the stamps of the parts its peers cut."""
    return max(1, min(8, (1 << 14) // max(groups, 1)))


def _send_reduce(state, x, weights, src_idx, src_rank, stride: int, num_tokens: int, part_buf, group_count,
                 group_rows, stats: CommStats) -> torch.Tensor:
    """Streaming combine (moe.cu fuser_moe_combine_send_reduce): group, the call's one barrier, then send
    and reduce in one kernel: the first blocks to start send and stamp every (token, source, part) on its
    source, the others reduce each token as its stamps land."""
    tr, device = state.transport, x.device
    world, rank, hidden = tr.world_size, tr.rank, x.shape[1]
    groups = world * stride
    split = stream_split(groups)
    stamp_buf = tr.buffer("combine_partial_stamps", torch.int64, (), groups * split)  # before the barrier
    launch_group(src_idx, src_rank, world, stride, group_count, group_rows, state.errors, stats)
    tr.barrier()  # every source is done with its previous reduce: its partial rows are free
    sms, cap = sm_budget(device, stats)
    warps = _THREADS // 32
    # Senders: up to FUSER_MOE_STREAM_SEND_PER_SM blocks an SM (default 3); reducers (they spin while
    # partials are on their way): one an SM.
    n_reduce = max(1, min(-(-max(num_tokens, 1) * split // warps), sms))
    n_send = max(1, min(-(-groups * split // warps), int(os.environ.get("FUSER_MOE_STREAM_SEND_PER_SM", "3")) * sms))
    if n_send + n_reduce > cap:
        n_reduce = max(1, cap // 4)
        n_send = cap - n_reduce
    blocks = n_send + n_reduce
    stats.sms = max(stats.sms, min(blocks, sms))
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=device)
    _kernel(f"fuser_moe_combine_send_reduce_{_DTYPE_SUFFIX[x.dtype]}", device).launch(blocks, _THREADS, [
        x, ctypes.c_int64(hidden), weights, ctypes.c_int32(world), ctypes.c_int32(rank), ctypes.c_int64(stride),
        ctypes.c_int64(num_tokens), group_count, group_rows, part_buf.peer_ptrs, stamp_buf.peer_ptrs, part_buf.local,
        stamp_buf.local, out, group_count[groups:], ctypes.c_int32(split), ctypes.c_int64(n_send),
        state.stream_words[4:7], state.errors, ctypes.c_int64(int(tr.timeout_s * 1e9)), tr.barrier_gave_up])
    return out


def combine_operands(rank: int, x: torch.Tensor, weights: torch.Tensor, src_idx: torch.Tensor,
                     src_rank: torch.Tensor, num_tokens: int, max_tokens: int) -> tuple:
    """The operands of a kernel combine (either backend's), checked and in the layout the kernels read.

    Args:
        rank: this rank (named in the error).
        x: [V, H] float32/bfloat16/float16, the expert outputs, one row per received pair.
        weights: [V] float, the pairs' weights; src_idx: [V] int, source token; src_rank: [V] int, source rank.
        num_tokens: T, this rank's token count (rows of the combined output).
        max_tokens: T_max, the most tokens any rank has (the ranks agreed on it at dispatch).
    Returns: (x contiguous, weights [V] float32, src_idx [V] int64, src_rank [V] int64, stride), where
        stride = max(T_max, 1) is the rows a source rank's block of the dense [W, T_max] layout holds.
    Raises: ValueError when num_tokens exceeds T_max.
    """
    stride = max(max_tokens, 1)
    if num_tokens > stride:
        raise ValueError(f"moe_combine: num_tokens={num_tokens} on rank {rank} but the ranks agreed on at most "
                         f"{max_tokens} tokens a rank")
    return (x.contiguous(), weights.contiguous().to(torch.float32), src_idx.contiguous().to(torch.int64),
            src_rank.contiguous().to(torch.int64), stride)


def launch_group(src_idx: torch.Tensor, src_rank: torch.Tensor, world: int, stride: int, group_count: torch.Tensor,
                 group_rows: torch.Tensor, errors: torch.Tensor, stats: CommStats) -> None:
    """moe.cu's group kernel: the rows of each (source rank, token) into `group_rows` (see `launch_combine`)."""
    rows, device = src_idx.shape[0], src_idx.device
    if rows:
        sms, cap = sm_budget(device, stats)
        _kernel("fuser_moe_combine_group", device).launch(
            grid(min(-(-rows // _THREADS), 8 * sms), cap, stats), _THREADS, [
            src_idx, src_rank, ctypes.c_int64(rows), ctypes.c_int32(world), ctypes.c_int64(stride), group_count,
            group_rows, errors])


def launch_combine(x: torch.Tensor, weights: torch.Tensor, src_idx: torch.Tensor, src_rank: torch.Tensor, *,
                   world: int, rank: int, stride: int, num_tokens: int, group_count: torch.Tensor,
                   group_rows: torch.Tensor, errors: torch.Tensor, part_ptrs: torch.Tensor, flag_ptrs: torch.Tensor,
                   part_rows: torch.Tensor, part_flags: torch.Tensor, after_group: Optional[Callable[[], None]],
                   deliver: Callable[[], None], stats: CommStats) -> torch.Tensor:
    """The kernels of a combine (moe.cu group, send, reduce) with their launch geometry, for both backends:
    they differ only in where send writes the partial rows (`part_ptrs`, `flag_ptrs`), how the rows get
    from there to where reduce reads them (`deliver`) and where reduce reads them (`part_rows`,
    `part_flags`).

    Args:
        x, weights, src_idx, src_rank: as `combine_operands` returns them.
        world, rank: the group's size and this rank.
        stride: max(T_max, 1), rows a source's block of the dense [W, stride] layout holds.
        num_tokens: T, rows of the output.
        group_count: [W * stride + 2] int32, zeroed: the rows per (source rank, token), then two counters
            (partial rows sent to peers, received from peers).
        group_rows: [W * stride * GROUP_CAP] int32, the rows of each (source rank, token).
        errors: int64 error words (group's overflow of GROUP_CAP).
        part_ptrs: [W] int64, per source rank s the address that send adds row r * stride + t of the partial
            of (s, token t) to (bf16/f16/f32 rows of H); flag_ptrs: [W] int64, the same for the int32 flag.
        part_rows: [W * stride, H] x's dtype, the layout reduce reads (block e from expert rank e);
            part_flags: [W * stride] int32, its flags.
        after_group: called between group and send (None: nothing to do).
        deliver: called between send and reduce: afterwards part_rows and part_flags hold the partials.
        stats: the call's statistics (`stats.sms` records the most blocks).
    Returns: [T, H] x's dtype, the combined rows.
    """
    device = x.device
    rows, hidden = x.shape[0], x.shape[1]
    sms, cap = sm_budget(device, stats)
    groups = world * stride
    counters = group_count[groups:]
    launch_group(src_idx, src_rank, world, stride, group_count, group_rows, errors, stats)
    if after_group is not None:
        after_group()
    suffix = _DTYPE_SUFFIX[x.dtype]
    warps = 16 * sms * (_THREADS // 32)
    split = max(1, min(8, warps // groups))  # few groups (decode): several warps share a row
    _kernel(f"fuser_moe_combine_send_{suffix}", device).launch(
        grid(min(-(-groups * split // 8), 16 * sms), cap, stats), _THREADS, [
            x, ctypes.c_int64(hidden), weights, ctypes.c_int32(world), ctypes.c_int32(rank),
            ctypes.c_int64(stride), group_count, group_rows, part_ptrs, flag_ptrs, counters,
            ctypes.c_int32(split), ctypes.c_int32(1)])  # self-direct: this rank's own tokens wait for reduce
    deliver()
    out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=device)
    # Reduce computes the term of this rank's own tokens from x (their partial was never written).
    _kernel(f"fuser_moe_combine_reduce_{suffix}", device).launch(
        grid(min(-(-stride // 8), 16 * sms), cap, stats), _THREADS, [
        part_rows, part_flags, ctypes.c_int32(world), ctypes.c_int32(rank), ctypes.c_int64(stride),
        ctypes.c_int64(num_tokens), ctypes.c_int64(hidden), out, counters, x, weights, group_count, group_rows])
    return out


def combine(comm: Communicator, state, x: torch.Tensor, weights: torch.Tensor,
                     src_idx: torch.Tensor, src_rank: torch.Tensor, num_tokens: int, max_tokens: int,
                     stats: CommStats) -> torch.Tensor:
    """Combine with the kernels of moe.cu: group, barrier, send, barrier, reduce; or group, barrier,
    send-reduce (`streaming_combine()`, with an SM budget of at least two blocks).

    Partial rows land in row e * max_tokens + t of the source's buffer, so the layout is the same on
    every rank (max_tokens is) and nothing but the rows themselves travels.
    """
    world, rank, device = comm.world_size, comm.rank, x.device
    tr = state.transport
    hidden = x.shape[1]
    x, weights, src_idx, src_rank, stride = combine_operands(rank, x, weights, src_idx, src_rank, num_tokens,
                                                             max_tokens)
    part_buf = tr.buffer("combine_partial_rows", x.dtype, (hidden,), world * stride)
    # Rows per (source rank, token), then two counters: partial rows sent to and received from peers.
    group_count = torch.zeros(world * stride + 2, dtype=torch.int32, device=device)
    counters = group_count[world * stride:]
    group_rows = torch.empty(world * stride * GROUP_CAP, dtype=torch.int32, device=device)
    if streaming_combine() and sm_budget(device, stats)[1] >= 2:
        out = _send_reduce(state, x, weights, src_idx, src_rank, stride, num_tokens, part_buf, group_count,
                           group_rows, stats)
        word_bytes = 8  # a stamp with each partial row
    else:
        flag_buf = tr.buffer("combine_partial_flags", torch.int32, (), world * stride)
        out = launch_combine(
            x, weights, src_idx, src_rank, world=world, rank=rank, stride=stride, num_tokens=num_tokens,
            group_count=group_count, group_rows=group_rows, errors=state.errors, part_ptrs=part_buf.peer_ptrs,
            flag_ptrs=flag_buf.peer_ptrs, part_rows=part_buf.local, part_flags=flag_buf.local,
            # every source is done with its previous reduce: its partial rows and flags are free
            after_group=tr.barrier, deliver=tr.barrier, stats=stats)
        word_bytes = 4  # a flag with each partial row
    row_bytes = hidden * x.element_size() + word_bytes
    stats.bytes_sent = DeviceCount(counters[0], row_bytes)
    stats.bytes_recv = DeviceCount(counters[1], row_bytes)
    return out
