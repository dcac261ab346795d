"""The CUDA backend: dispatch and combine through symmetric buffers, with no NCCL call (SPEC.md section 8).

Every rank writes straight into its peers' buffers and phases are ordered by the transport's
device-side barrier. Counts travel the same way, so the only host synchronisation is the one
exact-size outputs need (reading this rank's receive counts). In capacity mode (`max_recv_tokens=C`)
dispatch and combine make none and can be captured in a CUDA graph.

On CUDA tensors the work is done by the kernels of kernels/moe.cu (their header describes each step):
  dispatch: count, notify, barrier, plan, send, barrier, expand. The count matrix tells every sender
    where each of its pairs lands in the receiver's output (local expert, source rank, source token), so
    the receiver copies each de-duplicated wire row to its output rows without sorting anything.
  combine: group, barrier, send, barrier, reduce. Partial rows go to a dense [W, T_max] layout on the
    source rank, with a flag per row, so no offsets need exchanging.
Exact mode sends into the wire buffer of earlier calls before it reads the counts, and sends again in
the rare call that outgrows it (every rank reads the same largest receive count, so all grow together).

On CPU tensors (POSIX shared memory, which CI runs), and on CUDA beyond the kernels' limits (K > 64 or
W > 64), the same contract is met with `transport.push_rows` and torch:
  dispatch: 1. counts: r pushes [n_tokens_to_rank | pairs_to_rank | T] to every rank; barrier.
    2. data: the wire row of token t for rank d goes to row sum_{s<r} M[s, d] + (position of t among r's
       tokens for d) of d's buffer, with its metadata row [t, topk_idx[t], weight bits[t]]; barrier.
    3. expansion: the receiver keeps the slots whose expert is its own and orders them by (local expert,
       wire row), which is the contract's (local expert, source rank, source token) order.
  combine: 1. counts: r pushes its n_tokens_to_rank row to every rank; barrier.
    2. rows grouped by (src_rank, src_idx) with a stable sort; one partial row per group (float32 sum in
       row order of w * y, cast) goes to row sum_{e<r} n_to_s[e] + (group's position among s's groups)
       of the source rank s's buffer, with the token index; barrier.
    3. the source adds each token's partials in ascending expert-rank order, in float32.
Shapes are static wherever the host does not know them, so no step needs the host.
"""
from __future__ import annotations

import ctypes
import os
import weakref
from typing import Optional, Sequence

import torch

from . import cuda_torch, routing
from .common import CommStats, DeviceCount, DispatchOutputs
from .communicator import Communicator
from .validation import check_combine_everywhere, check_dispatch_everywhere, checked

_KERNEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", "moe.cu")
_IDX_SUFFIX = {torch.int64: "i64", torch.int32: "i32"}
_DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# Limits of the kernels (moe.cu): destination sets are 64-bit masks, slots and a token's rows on one
# expert rank are gathered in 64-entry lists. Beyond them the torch path runs.
MAX_KERNEL_WORLD = 64
MAX_KERNEL_TOP_K = 64
GROUP_CAP = 64
_THREADS = 256  # the kernels that keep per-warp shared arrays assume 8 warps a block
_NOTIFY_THREADS = 1024
_MAX_CHUNK = 32  # tokens a dispatch block handles
# Words of the summary that the plan kernel writes (moe.cu FM_SUM_*).
_SUM_WIRE_IN, _SUM_PAIRS_IN, _SUM_MAX_WIRE_IN, _SUM_MAX_TOKENS, _SUM_SENT_REMOTE, _SUM_RECV_REMOTE = range(6)
_sm_counts: dict = {}


_kernel_cache: dict = {}


def _kernel(name: str, device: torch.device):
    """A kernel of moe.cu, compiled and loaded at first use (cached here too: this is on the hot path)."""
    key = (name, device.index)
    kernel = _kernel_cache.get(key)
    if kernel is None:
        from .transport.nvrtc import get_kernel

        kernel = _kernel_cache[key] = get_kernel(_KERNEL_SOURCE, name, device)
    return kernel


def _multiprocessors(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


class _GroupState:
    """What the backend keeps per communicator: the transport and the device-side overflow words."""

    def __init__(self, comm: Communicator):
        from .transport import transport_for

        self.transport = transport_for(comm)
        world, device = comm.world_size, comm.device
        # Error words the kernels raise, read at the next check: (largest capacity needed, capacity given)
        # of the last overflow; 1 + a combine row naming a rank or token outside the layout; the most rows
        # one token had on this rank past GROUP_CAP (moe.cu FM_ERR_*).
        self.errors = torch.zeros(4, dtype=torch.int64, device=device)
        # Index vectors of the count exchange, made once (no allocation or fill on the hot path).
        self.ranks = torch.arange(world, device=device)
        self.zeros_w = torch.zeros(world, dtype=torch.int64, device=device)
        self.own_row = torch.full((world,), comm.rank, dtype=torch.int64, device=device)
        # Rows of the exact mode's receive buffers (the same on every rank); rows are sent into them
        # before the host knows this call's counts, and sent again in the rare call that outgrows them.
        self.wire_capacity: Optional[int] = None

    def raise_pending(self, comm: Communicator) -> None:
        """Reads the device's error words (a host synchronisation), clears them and raises what they report.

        A barrier timeout comes first (it explains everything after it), then a capacity overflow.
        """
        needed, given, bad_row, big_group = self.errors.tolist()
        if needed or bad_row or big_group:
            self.errors.zero_()
        transport_error = None
        try:
            self.transport.check()
        except (TimeoutError, RuntimeError) as exc:
            transport_error = exc
        if isinstance(transport_error, TimeoutError):
            raise transport_error
        if needed:
            raise RuntimeError(f"cuda backend, rank {comm.rank}: capacity overflow: needed capacity {needed} rows, "
                               f"given capacity {given} rows; rows past the capacity were dropped")
        if bad_row:
            raise RuntimeError(f"cuda backend, rank {comm.rank}: moe_combine: row {bad_row - 1} names a source rank "
                               "outside the group or a token past every rank's token count (an input that "
                               "check_inputs=False let through); the row was dropped")
        if big_group:
            raise RuntimeError(f"cuda backend, rank {comm.rank}: moe_combine: a token has {big_group} rows on this "
                               f"rank; the kernels sum at most {GROUP_CAP} rows of one token on one rank (rows past "
                               "them were dropped)")
        if transport_error is not None:
            raise transport_error


class CudaBackend:
    """Symmetric buffers opened through CUDA IPC (or POSIX shared memory for CPU tensors)."""

    name = "cuda"

    def __init__(self):
        # Keyed by the communicator itself, weakly: a communicator dropped without close() takes its
        # transport (and every mapping) with it, and a new one never inherits another group's state.
        self._states: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------ availability
    def unavailable_reason(self, device: torch.device) -> Optional[str]:
        if device.type == "cpu":
            return None
        if device.type != "cuda":
            return f"no symmetric-memory transport for {device} tensors"
        if not torch.cuda.is_available():
            return "CUDA is not available"
        try:
            import cuda.bindings.driver  # noqa: F401
        except ImportError:
            return "cuda-python is not installed (pip install 'fuser_moe[cuda]')"
        return None

    def _state(self, comm: Communicator) -> _GroupState:
        state = self._states.get(comm)
        if state is None or state.transport.closed:
            state = self._states[comm] = _GroupState(comm)
            ref, states = weakref.ref(comm), self._states
            comm.on_close(lambda: states.pop(ref(), None) if ref() is not None else None)
        return state

    def check(self, comm: Communicator) -> None:
        """Raises errors the device reported since the last check: capacity overflow, barrier timeout."""
        self._state(comm).raise_pending(comm)

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, comm: Communicator, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                 num_experts: int, expert_to_rank: Optional[Sequence[int]] = None,
                 max_recv_tokens: Optional[int] = None, check_inputs: bool = True,
                 stats: Optional[CommStats] = None, return_handle: bool = False):
        """Same contract as `NcclBackend.dispatch` (docs/contract.md section 3), over symmetric buffers.

        Args: as `NcclBackend.dispatch`; return_handle: also return the `routing.DispatchHandle` that
            `combine(handle=...)` takes.
        Returns: `DispatchOutputs`, or (`DispatchOutputs`, `DispatchHandle`) with return_handle.
        """
        stats = stats if stats is not None else CommStats()
        world = comm.world_size
        if check_inputs:
            check_dispatch_everywhere(comm, x, topk_idx, topk_weights, num_experts, expert_to_rank)
            stats.sync("input checks")
        placement = routing.make_placement(num_experts, world, expert_to_rank, x.device)
        state = self._state(comm)
        if self._kernels_apply(x, topk_idx.shape[1], world):
            out, pairs_in, handle = self._dispatch_kernels(comm, state, x, topk_idx, topk_weights, placement,
                                                           max_recv_tokens, check_inputs, stats)
        else:
            out, pairs, handle = cuda_torch.dispatch(comm, state, x, topk_idx, topk_weights, placement,
                                                     max_recv_tokens, check_inputs, stats)
            pairs_in = lambda: pairs  # noqa: E731
        if max_recv_tokens is None and check_inputs:
            # Checked mode reports this call's own errors at once; every rank raises together.
            checked(comm, lambda: state.raise_pending(comm))
            stats.sync("device error words")
        elif max_recv_tokens is not None and check_inputs:
            pairs_in = pairs_in()
            stats.sync("capacity check")

            def fits():
                if pairs_in > max_recv_tokens:
                    try:
                        state.raise_pending(comm)  # clears the words this overflow set
                    except RuntimeError:
                        pass
                    raise RuntimeError(f"moe_dispatch: capacity overflow: this rank receives {pairs_in} rows but "
                                       f"max_recv_tokens={max_recv_tokens}; needed capacity {pairs_in}, given "
                                       f"{max_recv_tokens}")
                state.raise_pending(comm)
            checked(comm, fits)
        return (out, handle) if return_handle else out

    @staticmethod
    def _kernels_apply(x: torch.Tensor, top_k: int, world: int) -> bool:
        """Whether the kernels of moe.cu serve this call (CUDA tensors within their limits)."""
        return x.is_cuda and top_k <= MAX_KERNEL_TOP_K and world <= MAX_KERNEL_WORLD

    def _dispatch_kernels(self, comm: Communicator, state: _GroupState, x: torch.Tensor, topk_idx: torch.Tensor,
                          topk_weights: torch.Tensor, placement, max_recv_tokens: Optional[int], check_inputs: bool,
                          stats: CommStats):
        """Dispatch with the kernels of moe.cu: count, notify, barrier, plan, send, barrier, expand."""
        world, rank, device = comm.world_size, comm.rank, x.device
        tr = state.transport
        tokens, top_k, hidden = topk_idx.shape[0], topk_idx.shape[1], x.shape[1]
        num_experts = placement.num_experts
        idx = topk_idx.contiguous()
        weights = topk_weights.contiguous()
        x = x.contiguous()
        suffix = _IDX_SUFFIX[idx.dtype]
        sms = _multiprocessors(device)
        # Enough blocks to keep every SM busy at small T, at most _MAX_CHUNK tokens a block at large T.
        chunk = min(_MAX_CHUNK, max(1, -(-tokens // (2 * sms))))
        n_chunks = -(-tokens // chunk)
        i32, i64 = torch.int32, torch.int64
        chunk_e = torch.empty(num_experts, max(n_chunks, 1), dtype=i32, device=device)  # a row runs over chunks
        chunk_d = torch.empty(world, max(n_chunks, 1), dtype=i32, device=device)
        n_to = torch.empty(world, dtype=i64, device=device)
        e2r = placement.expert_to_rank
        counts = tr.buffer("dispatch_count_matrix", i64, (world + num_experts + 1,), world)
        if n_chunks:
            _kernel(f"fuser_moe_dispatch_count_{suffix}", device).launch(n_chunks, _THREADS, [
                idx, ctypes.c_int64(tokens), ctypes.c_int32(top_k), e2r, ctypes.c_int64(num_experts),
                ctypes.c_int32(world), ctypes.c_int64(chunk), chunk_e, chunk_d])
        _kernel("fuser_moe_dispatch_notify", device).launch(1, _NOTIFY_THREADS, [
            chunk_e, chunk_d, ctypes.c_int64(n_chunks), ctypes.c_int64(num_experts), ctypes.c_int32(world),
            ctypes.c_int32(rank), ctypes.c_int64(tokens), counts.peer_ptrs, n_to])
        tr.barrier()
        n_from = torch.empty(world, dtype=i64, device=device)
        per_expert = torch.empty(placement.n_local[rank], dtype=i64, device=device)
        summary = torch.empty(8, dtype=i64, device=device)
        plan = torch.empty(3 * num_experts + world, dtype=i64, device=device)  # totals, start_e, scan, base_d
        _kernel("fuser_moe_dispatch_plan", device).launch(1, _NOTIFY_THREADS, [
            counts.local, ctypes.c_int64(num_experts), ctypes.c_int32(world), ctypes.c_int32(rank), e2r,
            placement.expert_order, placement.rank_begin, plan, n_from, per_expert, summary])

        meta_width = 2 + 3 * top_k
        row_bytes = hidden * x.element_size()
        shared = 4 * (2 * chunk * top_k + ((chunk * world + 1) & ~1)) + 8 * chunk

        def send(capacity: int):
            x_buf = tr.buffer("dispatch_wire_x", x.dtype, (hidden,), capacity)
            meta_buf = tr.buffer("dispatch_wire_meta", i64, (meta_width,), capacity)
            if n_chunks:
                _kernel(f"fuser_moe_dispatch_send_{suffix}", device).launch(n_chunks, _THREADS, [
                    x, ctypes.c_int64(row_bytes), idx, weights, ctypes.c_int64(tokens), ctypes.c_int32(top_k), e2r,
                    ctypes.c_int64(num_experts), ctypes.c_int32(world), ctypes.c_int32(rank), ctypes.c_int64(chunk),
                    chunk_e, chunk_d, plan, x_buf.peer_ptrs, meta_buf.peer_ptrs,
                    ctypes.c_int64(min(x_buf.rows, meta_buf.rows))],
                    shared_mem=shared)
            tr.barrier()
            return x_buf, meta_buf

        wire_row_bytes = row_bytes + meta_width * 8
        if max_recv_tokens is not None:
            max_tokens = None  # unknown on the host: a combine asks the peers
            x_buf, meta_buf = send(max_recv_tokens)
            out_rows = max_recv_tokens
            stats.bytes_sent = DeviceCount(summary[_SUM_SENT_REMOTE], wire_row_bytes)
            stats.bytes_recv = DeviceCount(summary[_SUM_RECV_REMOTE], wire_row_bytes)
        else:
            # Send into the buffers of earlier calls first: rows travel while the host waits for the counts.
            sent = send(state.wire_capacity) if state.wire_capacity is not None else None
            host = summary.tolist()
            stats.sync("receive counts to host")
            if not check_inputs:
                state.raise_pending(comm)  # (checked mode reports this call's errors at its end, on every rank)
            needed = host[_SUM_MAX_WIRE_IN]
            if sent is None or needed > min(sent[0].rows, sent[1].rows):
                # Every rank read the same largest receive count, so all grow and send again together.
                sent = send(max(needed, state.wire_capacity or 0))
            x_buf, meta_buf = sent
            state.wire_capacity = min(x_buf.rows, meta_buf.rows)
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
        _kernel("fuser_moe_dispatch_expand", device).launch(max(1, min(-(-warps // 8), 8 * sms)), _THREADS, [
            x_buf.local, meta_buf.local, ctypes.c_int64(wire_capacity), ctypes.c_int64(row_bytes),
            ctypes.c_int32(top_k), summary, ctypes.c_int64(out_rows), recv_x, recv_idx, recv_w, src_idx, src_rank,
            state.errors])
        out = DispatchOutputs(recv_x, recv_idx, recv_w, src_idx, src_rank, n_to, n_from, per_expert)
        handle = routing.DispatchHandle(
            backend=self.name, num_tokens=tokens, pairs=None, wire_row=None, send_token=None, n_to=None, n_from=None,
            wire_out_max=None, max_tokens=max_tokens, src_idx=src_idx, src_rank=src_rank)
        return out, lambda: int(summary[_SUM_PAIRS_IN]), handle

    # ------------------------------------------------------------------ combine
    def combine(self, comm: Communicator, x: torch.Tensor, topk_weights: torch.Tensor, src_idx: torch.Tensor,
                src_rank: torch.Tensor, n_tokens_to_rank: torch.Tensor, n_tokens_from_rank: torch.Tensor,
                num_tokens: int, *, check_inputs: bool = True, stats: Optional[CommStats] = None,
                handle: Optional[routing.DispatchHandle] = None) -> torch.Tensor:
        """Same contract as `NcclBackend.combine` (docs/contract.md section 4), over symmetric buffers.

        Args: as `NcclBackend.combine`; handle: the matching dispatch's `DispatchHandle` (optional; every
            rank passes one or none). It tells the kernels every rank's token count without asking the
            peers, and the torch path where each partial row goes without exchanging counts.
        """
        stats = stats if stats is not None else CommStats()
        world = comm.world_size
        if handle is not None and not handle.serves(self.name, src_idx, src_rank, num_tokens):
            handle = None
        if check_inputs:
            tokens_of_rank = check_combine_everywhere(comm, x, topk_weights, src_idx, src_rank, n_tokens_to_rank,
                                                      n_tokens_from_rank, num_tokens)
            stats.sync("input checks")
        elif handle is not None and handle.max_tokens is not None:
            # The matching exact-mode dispatch told every rank the same token counts (the count matrix).
            tokens_of_rank = [handle.max_tokens]
        else:
            # Buffer sizes must agree on every rank: a host-side exchange, no device synchronisation.
            tokens_of_rank = comm.exchange(num_tokens)
        state = self._state(comm)
        if x.is_cuda and world <= MAX_KERNEL_WORLD:
            out = self._combine_kernels(comm, state, x, topk_weights, src_idx, src_rank, num_tokens,
                                        max(tokens_of_rank), stats)
        else:
            torch_handle = handle if handle is not None and handle.partial_base is not None else None
            out = cuda_torch.combine(comm, state, x, topk_weights, src_idx, src_rank, n_tokens_to_rank, num_tokens,
                                     stats, torch_handle)
        if check_inputs:
            checked(comm, lambda: state.raise_pending(comm))
            stats.sync("device error words")
        return out

    def _combine_kernels(self, comm: Communicator, state: _GroupState, x: torch.Tensor, weights: torch.Tensor,
                         src_idx: torch.Tensor, src_rank: torch.Tensor, num_tokens: int, max_tokens: int,
                         stats: CommStats) -> torch.Tensor:
        """Combine with the kernels of moe.cu: group, barrier, send, barrier, reduce.

        Partial rows land in row e * max_tokens + t of the source's buffer, so the layout is the same on
        every rank (max_tokens is) and nothing but the rows themselves travels.
        """
        world, rank, device = comm.world_size, comm.rank, x.device
        tr = state.transport
        rows, hidden = x.shape[0], x.shape[1]
        sms = _multiprocessors(device)
        stride = max(max_tokens, 1)
        if num_tokens > stride:
            raise ValueError(f"moe_combine: num_tokens={num_tokens} on rank {rank} but the ranks agreed on at most "
                             f"{max_tokens} tokens a rank")
        x = x.contiguous()
        weights = weights.contiguous().to(torch.float32)
        src_idx = src_idx.contiguous().to(torch.int64)
        src_rank = src_rank.contiguous().to(torch.int64)
        part_buf = tr.buffer("combine_partial_rows", x.dtype, (hidden,), world * stride)
        flag_buf = tr.buffer("combine_partial_flags", torch.int32, (), world * stride)
        # Rows per (source rank, token), then two counters: partial rows sent to and received from peers.
        group_count = torch.zeros(world * stride + 2, dtype=torch.int32, device=device)
        counters = group_count[world * stride:]
        group_rows = torch.empty(world * stride * GROUP_CAP, dtype=torch.int32, device=device)
        if rows:
            _kernel("fuser_moe_combine_group", device).launch(max(1, min(-(-rows // _THREADS), 8 * sms)), _THREADS, [
                src_idx, src_rank, ctypes.c_int64(rows), ctypes.c_int32(world), ctypes.c_int64(stride), group_count,
                group_rows, state.errors])
        tr.barrier()  # every source is done with its previous reduce: its partial rows and flags are free
        suffix = _DTYPE_SUFFIX[x.dtype]
        groups = world * stride
        warps = 16 * sms * (_THREADS // 32)
        split = max(1, min(8, warps // groups))  # few groups (decode): several warps share a row
        _kernel(f"fuser_moe_combine_send_{suffix}", device).launch(
            max(1, min(-(-groups * split // 8), 16 * sms)), _THREADS, [
                x, ctypes.c_int64(hidden), weights, ctypes.c_int32(world), ctypes.c_int32(rank),
                ctypes.c_int64(stride), group_count, group_rows, part_buf.peer_ptrs, flag_buf.peer_ptrs, counters,
                ctypes.c_int32(split)])
        tr.barrier()
        out = torch.empty(num_tokens, hidden, dtype=x.dtype, device=device)
        _kernel(f"fuser_moe_combine_reduce_{suffix}", device).launch(max(1, min(-(-stride // 8), 16 * sms)), _THREADS, [
            part_buf.local, flag_buf.local, ctypes.c_int32(world), ctypes.c_int32(rank), ctypes.c_int64(stride),
            ctypes.c_int64(num_tokens), ctypes.c_int64(hidden), out, counters])
        row_bytes = hidden * x.element_size() + 4
        stats.bytes_sent = DeviceCount(counters[0], row_bytes)
        stats.bytes_recv = DeviceCount(counters[1], row_bytes)
        return out
