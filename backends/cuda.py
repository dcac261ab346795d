"""The CUDA backend: dispatch and combine through symmetric buffers, with no NCCL call.

docs/contract.md section 8. Every rank writes straight into its peers' buffers and phases are ordered by
the transport's device-side barrier. Counts travel the same way, so the only host synchronisation is
the one exact-size outputs need (reading this rank's receive counts). In capacity mode
(`max_recv_tokens=C`) the kernels make none and dispatch + combine can be captured in a CUDA graph.

The backend is split by job:
  cuda.py          protocol policy: which path serves a call, checked mode, the per-group transport and
                   the device's error words, the handle between dispatch and combine.
  cuda_kernels.py  the kernels of kernels/moe.cu with their launch geometry (CUDA tensors, W <= 64, K <= 64).
  cuda_ll.py       the low-latency path of kernels/ll.cu for small capacity-mode calls (two kernels per op).
  cuda_torch.py    routing.py's plan over `transport.push_rows` (CPU tensors over POSIX shared memory, which
                   CI runs, and CUDA tensors beyond the kernels' limits).
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

from . import cuda_kernels, cuda_ll, cuda_torch, routing
from .common import CommStats, with_sm_budget
from .communicator import Communicator
from .validation import check_combine_everywhere, check_dispatch_everywhere, checked

# Limits of the kernels (moe.cu): beyond them the torch path (cuda_torch.py) runs.
MAX_KERNEL_WORLD = cuda_kernels.MAX_KERNEL_WORLD
MAX_KERNEL_TOP_K = cuda_kernels.MAX_KERNEL_TOP_K
GROUP_CAP = cuda_kernels.GROUP_CAP
# Words of the error block the kernels raise (moe.cu FM_ERR_*).
ERR_NEEDED, ERR_GIVEN, ERR_BAD_ROW, ERR_BIG_GROUP, ERR_TIMEOUT, ERR_COMBINE_TIMEOUT = range(6)
ERROR_WORDS = 8


class _GroupState:
    """What the backend keeps per communicator: the transport and the device-side overflow words."""

    def __init__(self, comm: Communicator):
        from .transport import transport_for

        self.transport = transport_for(comm)
        world, device = comm.world_size, comm.device
        # Error words the kernels raise, read at the next check: (largest capacity needed, capacity given)
        # of the last overflow; 1 + a combine row naming a rank or token outside the layout; the most rows
        # one token had on this rank past GROUP_CAP; 1 + a wire row whose stamp a streaming dispatch
        # waited for in vain; 1 + a token whose partial rows a streaming combine waited for in vain
        # (moe.cu FM_ERR_*).
        self.errors = torch.zeros(ERROR_WORDS, dtype=torch.int64, device=device)
        # Streaming dispatch: the call counter that plan advances ([0]) and the send-expand kernel's
        # tickets ([1], [2]), zero between calls. Streaming combine: its call counter ([4], advanced by
        # its last block) and tickets ([5], [6]).
        self.stream_words = torch.zeros(8, dtype=torch.int64, device=device)
        # Index vectors of the count exchange, made once (no allocation or fill on the hot path).
        self.ranks = torch.arange(world, device=device)
        self.zeros_w = torch.zeros(world, dtype=torch.int64, device=device)
        self.own_row = torch.full((world,), comm.rank, dtype=torch.int64, device=device)
        # Rows of the exact mode's receive buffers (the same on every rank); rows are sent into them
        # before the host knows this call's counts, and sent again in the rare call that outgrows them.
        # Keyed by the wire buffers' shape (dtype, H, metadata width): one capacity for every shape fed
        # back into the next call's buffers would ratchet up by doubling when shapes alternate.
        self.wire_capacity: dict = {}

    def raise_pending(self, comm: Communicator) -> None:
        """Reads the device's error words (a host synchronisation), clears them and raises what they report.

        A barrier timeout comes first (it explains everything after it), then a capacity overflow.
        """
        cuda_ll.raise_pending(self, comm.rank)  # a low-latency wait that timed out explains what follows
        words = self.errors.tolist()
        needed, given, bad_row, big_group, stale, stale_combine = (
            words[i] for i in (ERR_NEEDED, ERR_GIVEN, ERR_BAD_ROW, ERR_BIG_GROUP, ERR_TIMEOUT, ERR_COMBINE_TIMEOUT))
        if needed or bad_row or big_group or stale or stale_combine:
            self.errors.zero_()
        transport_error = None
        try:
            self.transport.check()
        except (TimeoutError, RuntimeError) as exc:
            transport_error = exc
        if isinstance(transport_error, TimeoutError):
            raise transport_error
        if stale:
            raise TimeoutError(f"cuda backend, rank {comm.rank}: moe_dispatch (streaming) waited "
                               f"{self.transport.timeout_s:g} s for wire row {stale - 1}, which no peer delivered "
                               "(a peer stopped, or ranks called dispatch with different arguments)")
        if stale_combine:
            raise TimeoutError(f"cuda backend, rank {comm.rank}: moe_combine (streaming) waited "
                               f"{self.transport.timeout_s:g} s for the partial rows of token {stale_combine - 1}, "
                               "which a peer never delivered (a peer stopped, or ranks called combine with "
                               "different arguments)")
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
                 stats: Optional[CommStats] = None, return_handle: bool = False, num_sms: Optional[int] = None):
        """Same contract as `NcclBackend.dispatch` (docs/contract.md section 3), over symmetric buffers.

        Args: as `NcclBackend.dispatch`; return_handle: also return the `routing.DispatchHandle` that
            `combine(handle=...)` takes.
        Returns: `DispatchOutputs`, or (`DispatchOutputs`, `DispatchHandle`) with return_handle.
        """
        stats = with_sm_budget(stats, num_sms)
        world = comm.world_size
        if check_inputs:
            check_dispatch_everywhere(comm, x, topk_idx, topk_weights, num_experts, expert_to_rank, max_recv_tokens)
            stats.sync("input checks")
        placement = routing.make_placement(num_experts, world, expert_to_rank, x.device)
        state = self._state(comm)
        stats.device_share = state.transport.ranks_on_device
        ll_refusal = cuda_ll.unavailable_reason(x, topk_idx.shape[1], world, num_experts, max(placement.n_local),
                                                max_recv_tokens)
        stats.path = "low-latency" if ll_refusal is None else "general"
        if ll_refusal is None:
            out, pairs_in = cuda_ll.dispatch(comm, state, x, topk_idx, topk_weights, placement, max_recv_tokens,
                                             stats)
            # The low-latency state rides on out.recv_src_idx (cuda_ll.handle_for); the caller's handle
            # names the outputs it belongs to, like every path's.
            handle = routing.DispatchHandle(self.name, topk_idx.shape[0], None, None, None, None, None, None, None,
                                            out.recv_src_idx, out.recv_src_rank)
        elif self._kernels_apply(x, topk_idx.shape[1], world):
            out, pairs_in, handle = cuda_kernels.dispatch(comm, state, x, topk_idx, topk_weights, placement,
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

    # ------------------------------------------------------------------ combine
    def combine(self, comm: Communicator, x: torch.Tensor, topk_weights: torch.Tensor, src_idx: torch.Tensor,
                src_rank: torch.Tensor, n_tokens_to_rank: torch.Tensor, n_tokens_from_rank: torch.Tensor,
                num_tokens: int, *, check_inputs: bool = True, stats: Optional[CommStats] = None,
                handle: Optional[routing.DispatchHandle] = None, num_sms: Optional[int] = None) -> torch.Tensor:
        """Same contract as `NcclBackend.combine` (docs/contract.md section 4), over symmetric buffers.

        Args: as `NcclBackend.combine`; handle: the matching dispatch's `DispatchHandle` (optional; every
            rank passes one or none). It tells the kernels every rank's token count without asking the
            peers, and the torch path where each partial row goes without exchanging counts.
        """
        stats = with_sm_budget(stats, num_sms)
        world = comm.world_size
        if handle is not None and not handle.serves(self.name, src_idx, src_rank, num_tokens):
            handle = None
        ll_handle = cuda_ll.handle_for(src_idx, src_rank) if x.is_cuda else None
        if check_inputs:
            tokens_of_rank = check_combine_everywhere(comm, x, topk_weights, src_idx, src_rank, n_tokens_to_rank,
                                                      n_tokens_from_rank, num_tokens)
            stats.sync("input checks")
        elif ll_handle is not None:
            tokens_of_rank = [num_tokens]  # the low-latency path needs no sizes from the peers
        elif handle is not None and handle.max_tokens is not None:
            # The matching exact-mode dispatch told every rank the same token counts (the count matrix).
            tokens_of_rank = [handle.max_tokens]
        else:
            # Buffer sizes must agree on every rank: a host-side exchange, no device synchronisation.
            tokens_of_rank = comm.exchange(num_tokens)
        state = self._state(comm)
        stats.device_share = state.transport.ranks_on_device
        if ll_handle is not None:
            stats.path = "low-latency"
            out = cuda_ll.combine(comm, state, ll_handle, x, topk_weights, num_tokens, stats)
        elif x.is_cuda and world <= MAX_KERNEL_WORLD:
            stats.path = "general"
            out = cuda_kernels.combine(comm, state, x, topk_weights, src_idx, src_rank, num_tokens,
                                        max(tokens_of_rank), stats)
        else:
            stats.path = "general"  # the torch twin of the same protocol (CPU tensors; worlds past the kernels')
            torch_handle = handle if handle is not None and handle.partial_base is not None else None
            out = cuda_torch.combine(comm, state, x, topk_weights, src_idx, src_rank, n_tokens_to_rank, num_tokens,
                                     stats, torch_handle)
        if check_inputs:
            checked(comm, lambda: state.raise_pending(comm))
            stats.sync("device error words")
        return out
