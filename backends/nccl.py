"""The NCCL backend: dispatch and combine with `all_to_all_single` and split metadata on the host.

Counts are computed on the device and exchanged with one all-to-all, copied to the host, and then the
metadata and the payload travel with all-to-alls split by those counts (docs/contract.md section 8). The same
code runs over Gloo on CPU tensors. The routing arithmetic lives in `routing.py`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import routing
from .common import DTYPE_CODES, CommStats, DispatchOutputs, pad_to_capacity
from .communicator import Communicator
from .validation import check_combine_everywhere, checked, placement_checksum, shape_disagreement, validate_dispatch


_HEADER = 6  # n_tokens_to_rank, top-k, hidden size, dtype code, num_experts, placement checksum


def _split_sizes_agree(comm: Communicator, header_from: torch.Tensor, top_k: int, hidden: int, dtype) -> None:
    """Every rank sees every source's (K, H, dtype, E, placement) and raises the same error if they disagree.

    Ranks that disagree on the experts would route one expert id to different ranks: wrong rows, no error.
    """
    ks, hs, codes = header_from[:, 1].tolist(), header_from[:, 2].tolist(), header_from[:, 3].tolist()
    by_code = {code: dt for dt, code in DTYPE_CODES.items()}
    problem = shape_disagreement(ks, hs, [by_code.get(c, f"dtype code {c}") for c in codes])
    if problem:
        raise ValueError(problem)
    experts, checksums = header_from[:, 4].tolist(), header_from[:, 5].tolist()
    if len(set(experts)) != 1 or len(set(checksums)) != 1:
        raise ValueError(f"moe_dispatch: ranks disagree on the experts: num_experts per rank {experts}, "
                         f"placement checksum per rank {checksums}")


class NcclBackend:
    """Collectives through `torch.distributed` (NCCL on CUDA tensors, Gloo on CPU tensors)."""

    name = "nccl"

    def dispatch(self, comm: Communicator, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                 num_experts: int, expert_to_rank: Optional[Sequence[int]] = None,
                 max_recv_tokens: Optional[int] = None, check_inputs: bool = True,
                 stats: Optional[CommStats] = None) -> DispatchOutputs:
        """Sends each token once to every rank that holds one of its experts; see docs/contract.md section 3.

        Args:
            comm: the expert-parallel group.
            x: [T, H] float32/bfloat16/float16 tokens.
            topk_idx: [T, K] int64/int32 global expert ids, -1 for an empty slot.
            topk_weights: [T, K] float32 weights.
            num_experts: E, experts in all.
            expert_to_rank: optional [E] placement; contiguous blocks when None.
            max_recv_tokens: capacity C; outputs then have leading extent C (docs/contract.md section 5).
            check_inputs: validate on every rank first (docs/contract.md section 9).
            stats: filled with bytes moved and host synchronisations.
        Returns: `DispatchOutputs`.
        """
        stats = stats if stats is not None else CommStats()
        world, rank = comm.world_size, comm.rank
        if check_inputs:
            checked(comm, lambda: validate_dispatch(x, topk_idx, topk_weights, num_experts, expert_to_rank, world))
            stats.sync("input checks")
        placement = routing.make_placement(num_experts, world, expert_to_rank, x.device)
        top_k, hidden = topk_idx.shape[1], x.shape[1]
        plan = routing.plan_dispatch(topk_idx, topk_weights, placement)
        stats.sync("wire rows (nonzero)")

        # Counts, with (K, H, dtype) alongside so that ranks can check they agree.
        checksum = placement_checksum(num_experts, world, expert_to_rank) if check_inputs else 0
        header_to = torch.stack([plan.n_tokens_to_rank,
                                 torch.full_like(plan.n_tokens_to_rank, top_k),
                                 torch.full_like(plan.n_tokens_to_rank, hidden),
                                 torch.full_like(plan.n_tokens_to_rank, DTYPE_CODES[x.dtype]),
                                 torch.full_like(plan.n_tokens_to_rank, num_experts),
                                 torch.full_like(plan.n_tokens_to_rank, checksum)], dim=1)
        header_from = torch.empty_like(header_to)
        comm.all_to_all_single(header_from, header_to)
        headers = torch.cat([header_to[:, 0], header_from.flatten()]).tolist()
        stats.sync("split sizes to host")
        n_to, n_from = headers[:world], headers[world:][0::_HEADER]
        header_from_host = torch.tensor(headers[world:]).view(world, _HEADER)
        if check_inputs:
            _split_sizes_agree(comm, header_from_host, top_k, hidden, x.dtype)
        n_to_dev = plan.n_tokens_to_rank
        n_from_dev = header_from[:, 0].contiguous()

        meta_width = plan.meta.shape[1]
        meta_recv = torch.empty(sum(n_from), meta_width, dtype=torch.int64, device=x.device)
        comm.all_to_all_single(meta_recv, plan.meta, n_from, n_to)
        wire_x = torch.empty(sum(n_from), hidden, dtype=x.dtype, device=x.device)
        comm.all_to_all_single(wire_x, x[plan.send_token], n_from, n_to)

        sent_rows, recv_rows = sum(n_to) - n_to[rank], sum(n_from) - n_from[rank]
        row_bytes = hidden * x.element_size() + meta_width * 8
        stats.bytes_sent += sent_rows * row_bytes + (world - 1) * _HEADER * 8
        stats.bytes_recv += recv_rows * row_bytes + (world - 1) * _HEADER * 8

        exp = routing.expand_received(meta_recv, n_from, placement, rank, top_k)
        stats.sync("received pairs (nonzero)")
        out = DispatchOutputs(
            recv_x=wire_x[exp.wire_row],
            recv_topk_idx=exp.topk_idx,
            recv_topk_weights=exp.topk_weights,
            recv_src_idx=exp.src_idx,
            recv_src_rank=exp.src_rank,
            n_tokens_to_rank=n_to_dev,
            n_tokens_from_rank=n_from_dev,
            n_tokens_per_expert=exp.n_tokens_per_expert,
        )
        if max_recv_tokens is None:
            return out
        if check_inputs:
            return checked(comm, lambda: pad_to_capacity(out, max_recv_tokens))
        return pad_to_capacity(out, max_recv_tokens)

    def combine(self, comm: Communicator, x: torch.Tensor, topk_weights: torch.Tensor, src_idx: torch.Tensor,
                src_rank: torch.Tensor, n_tokens_to_rank: torch.Tensor, n_tokens_from_rank: torch.Tensor,
                num_tokens: int, *, check_inputs: bool = True, stats: Optional[CommStats] = None) -> torch.Tensor:
        """Returns expert outputs to their tokens, weighted and summed; see docs/contract.md section 4.

        Args:
            comm: the expert-parallel group.
            x: [V, H] expert outputs, row-aligned with the matching dispatch's recv_x.
            topk_weights: [V] float32; src_idx: [V] int64; src_rank: [V] int64 (-1 marks padding);
            n_tokens_to_rank, n_tokens_from_rank: [W] int64, from the matching dispatch.
            num_tokens: T on this rank.
        Returns: combined_x [num_tokens, H] in x's dtype.
        """
        stats = stats if stats is not None else CommStats()
        world, rank = comm.world_size, comm.rank
        hidden = x.shape[1] if x.dim() == 2 else 0
        if check_inputs:
            check_combine_everywhere(comm, x, topk_weights, src_idx, src_rank, n_tokens_to_rank, n_tokens_from_rank,
                                     num_tokens)
            stats.sync("input checks")

        groups = routing.group_for_combine(src_rank, src_idx)
        counts = torch.cat([n_tokens_to_rank, n_tokens_from_rank]).tolist()
        stats.sync("split sizes to host")
        n_to, n_from = counts[:world], counts[world:]

        partials = routing.weighted_partials(x, topk_weights, groups)
        recv_partials = torch.empty(sum(n_to), hidden, dtype=x.dtype, device=x.device)
        comm.all_to_all_single(recv_partials, partials, n_to, n_from)
        recv_idx = torch.empty(sum(n_to), dtype=torch.int64, device=x.device)
        comm.all_to_all_single(recv_idx, groups.group_src_idx.contiguous(), n_to, n_from)

        row_bytes = hidden * x.element_size() + 8
        stats.bytes_sent += (sum(n_from) - n_from[rank]) * row_bytes
        stats.bytes_recv += (sum(n_to) - n_to[rank]) * row_bytes
        return routing.sum_partials(num_tokens, hidden, x.dtype, recv_partials, recv_idx, n_to)
