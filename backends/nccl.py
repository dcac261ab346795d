"""The NCCL backend: dispatch and combine with `all_to_all_single` and split metadata on the host.

Counts are computed on the device and exchanged with one all-to-all, copied to the host (the count
matrix: every rank's count row), and then the metadata and the payload travel with all-to-alls split by
those counts (docs/contract.md section 8). The same code runs over Gloo on CPU tensors. The routing
plan (where every pair lands on its receiver, the combine groups and the summation order) is
`routing.py`'s, so the receiver places rows without sorting.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import nccl_kernels, routing
from .common import DTYPE_CODES, CommStats, DispatchOutputs, with_sm_budget
from .communicator import Communicator
from .validation import (capacity_disagreement, check_combine_everywhere, checked, placement_checksum,
                         shape_disagreement, validate_dispatch)


def _split_sizes_agree(comm: Communicator, checks_from: list, top_k: int, hidden: int, dtype) -> None:
    """Every rank sees every source's (K, H, dtype, E, placement, capacity) and raises the same error if they
    disagree.

    Ranks that disagree on the experts would route one expert id to different ranks: wrong rows, no error.
    """
    ks, hs, codes = ([row[i] for row in checks_from] for i in range(3))
    by_code = {code: dt for dt, code in DTYPE_CODES.items()}
    problem = shape_disagreement(ks, hs, [by_code.get(c, f"dtype code {c}") for c in codes])
    if problem:
        raise ValueError(problem)
    experts, checksums = [row[3] for row in checks_from], [row[4] for row in checks_from]
    if len(set(experts)) != 1 or len(set(checksums)) != 1:
        raise ValueError(f"moe_dispatch: ranks disagree on the experts: num_experts per rank {experts}, "
                         f"placement checksum per rank {checksums}")
    problem = capacity_disagreement([None if row[5] < 0 else row[5] for row in checks_from])
    if problem:
        raise ValueError(problem)


class NcclBackend:
    """Collectives through `torch.distributed` (NCCL on CUDA tensors, Gloo on CPU tensors).

    The routing plan is `routing.py`'s (docs/contract.md section 8); rows travel with all_to_all_single.
    """

    name = "nccl"

    def dispatch(self, comm: Communicator, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, *,
                 num_experts: int, expert_to_rank: Optional[Sequence[int]] = None,
                 max_recv_tokens: Optional[int] = None, check_inputs: bool = True,
                 stats: Optional[CommStats] = None, return_handle: bool = False, num_sms: Optional[int] = None):
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
            return_handle: also return the `routing.DispatchHandle` that `combine(handle=...)` takes.
        Returns: `DispatchOutputs`, or (`DispatchOutputs`, `DispatchHandle`) with return_handle.
        """
        stats = with_sm_budget(stats, num_sms)
        world, rank = comm.world_size, comm.rank
        if check_inputs:
            checked(comm, lambda: validate_dispatch(x, topk_idx, topk_weights, num_experts, expert_to_rank, world))
            stats.sync("input checks")
        placement = routing.make_placement(num_experts, world, expert_to_rank, x.device)
        tokens, top_k, hidden = topk_idx.shape[0], topk_idx.shape[1], x.shape[1]
        row_len = world + num_experts + 1
        if check_inputs:
            # Ranks agree on (K, H, dtype, E, placement) before the count rows travel: their width is W + E + 1.
            checks = torch.tensor([top_k, hidden, DTYPE_CODES[x.dtype], num_experts,
                                   placement_checksum(num_experts, world, expert_to_rank),
                                   -1 if max_recv_tokens is None else max_recv_tokens], dtype=torch.int64,
                                  device=x.device)
            checks_to = checks.unsqueeze(0).expand(world, -1).contiguous()
            checks_from = torch.empty_like(checks_to)
            comm.all_to_all_single(checks_from, checks_to)
            _split_sizes_agree(comm, checks_from.tolist(), top_k, hidden, x.dtype)
            stats.sync("shapes agreed")
        checks = torch.empty(0, dtype=torch.int64, device=x.device)

        def agree(host: list) -> tuple:
            """On the count matrix (host ints): capacity overflow is raised on every rank."""
            per_expert = routing.pairs_of_rank(host, placement, rank)
            pairs = sum(per_expert)
            if max_recv_tokens is not None and pairs > max_recv_tokens:
                overflow[0] = RuntimeError(
                    f"moe_dispatch: capacity overflow: this rank receives {pairs} rows but max_recv_tokens="
                    f"{max_recv_tokens}; needed capacity {pairs}, given {max_recv_tokens}")
            if max_recv_tokens is not None and check_inputs:
                def fits():
                    if overflow[0] is not None:
                        raise overflow[0]
                checked(comm, fits)  # every rank raises before anything travels
            return per_expert, pairs

        # Unchecked mode raises an overflow after the payload has travelled (no peer is left waiting in a
        # collective); the rows past the capacity are dropped, never silently.
        overflow = [None]

        if nccl_kernels.serves(x, top_k, world):
            out, host, n_to, n_from, per_expert, pairs, meta_width = nccl_kernels.dispatch(
                comm, x, topk_idx, topk_weights, placement, checks, agree, max_recv_tokens, stats)
            wire_row = send_token = None
            row_bytes = hidden * x.element_size() + meta_width * 8
        else:
            out, host, n_to, n_from, pairs, wire_row, send_token, row_bytes = self._dispatch_torch(
                comm, x, topk_idx, topk_weights, placement, checks, agree, max_recv_tokens, stats)
        if overflow[0] is not None:
            raise overflow[0]
        sent_rows, recv_rows = sum(n_to) - n_to[rank], sum(n_from) - n_from[rank]
        stats.bytes_sent += sent_rows * row_bytes + (world - 1) * row_len * 8
        stats.bytes_recv += recv_rows * row_bytes + (world - 1) * row_len * 8
        if not return_handle:
            return out
        handle = routing.DispatchHandle(
            backend=self.name, num_tokens=tokens, pairs=pairs, wire_row=wire_row, send_token=send_token,
            n_to=n_to, n_from=n_from, wire_out_max=max(sum(r[:world]) for r in host),
            max_tokens=max(r[row_len - 1] for r in host), src_idx=out.recv_src_idx, src_rank=out.recv_src_rank)
        return out, handle

    @staticmethod
    def _dispatch_torch(comm: Communicator, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        placement: routing.Placement, checks: torch.Tensor, agree, max_recv_tokens: Optional[int],
                        stats: CommStats):
        """Dispatch with routing.py's torch twin (CPU tensors over Gloo; CUDA where the kernels do not serve)."""
        world, rank = comm.world_size, comm.rank
        top_k, hidden = topk_idx.shape[1], x.shape[1]
        counts = routing.count_row(topk_idx, placement)

        # 1. The count matrix: every rank's count row to every rank, in one all-to-all, then on the host.
        # While it travels, what needs only this rank's routing is done: the wire rows (x rows gathered
        # straight into them), their metadata but the output rows, each pair's rank within its expert.
        row_to = torch.cat([counts.row, checks]).unsqueeze(0).expand(world, -1).contiguous()
        rows_from = torch.empty_like(row_to)
        pending = comm.all_to_all_single(rows_from, row_to, async_op=True)
        send = routing.send_rows(counts)
        wire, meta_out = routing.wire_buffer(x, send.token, routing.meta_width(top_k))
        meta = routing.wire_meta(topk_idx, topk_weights, counts, None, send, rank, out=meta_out)
        within = routing.pair_ranks(counts, placement)
        host = pending.wait().tolist()
        stats.sync("count matrix to host")
        per_expert, pairs = agree(host)
        matrix = rows_from[:, :counts.row.numel()]
        n_to = host[rank][:world]
        n_from = [host[s][rank] for s in range(world)]

        # 2. Where every pair lands (the metadata's output rows); then the rows travel, packed.
        out_rows = routing.place_pairs(topk_idx, counts, matrix, placement, rank, within=within)
        routing.wire_meta_rows(meta, counts, out_rows, send)
        wire_in = routing.scratch("wire_rows_in", (sum(n_from), wire.shape[1]), wire.dtype, x.device)
        comm.all_to_all_single(wire_in, wire, n_from, n_to)
        x_in, meta_in = routing.unpack_wire_rows(wire_in, x.dtype, hidden, meta.shape[1])

        # 3. Expansion into the contract's order: each wire row to the output rows its metadata names.
        exp = routing.expand(meta_in, x_in, top_k, pairs, pairs if max_recv_tokens is None else max_recv_tokens)
        out = DispatchOutputs(
            recv_x=exp.recv_x,
            recv_topk_idx=exp.topk_idx,
            recv_topk_weights=exp.topk_weights,
            recv_src_idx=exp.src_idx,
            recv_src_rank=exp.src_rank,
            n_tokens_to_rank=counts.row[:world].clone(),
            n_tokens_from_rank=matrix[:, rank].contiguous(),
            n_tokens_per_expert=torch.tensor(per_expert, dtype=torch.int64, device=x.device),
        )
        return out, host, n_to, n_from, pairs, exp.wire_row, send.token, wire.shape[1]

    def combine(self, comm: Communicator, x: torch.Tensor, topk_weights: torch.Tensor, src_idx: torch.Tensor,
                src_rank: torch.Tensor, n_tokens_to_rank: torch.Tensor, n_tokens_from_rank: torch.Tensor,
                num_tokens: int, *, check_inputs: bool = True, stats: Optional[CommStats] = None,
                handle: Optional[routing.DispatchHandle] = None, num_sms: Optional[int] = None) -> torch.Tensor:
        """Returns expert outputs to their tokens, weighted and summed; see docs/contract.md section 4.

        Args:
            comm: the expert-parallel group.
            x: [V, H] expert outputs, row-aligned with the matching dispatch's recv_x.
            topk_weights: [V] float32; src_idx: [V] int64; src_rank: [V] int64 (-1 marks padding);
            n_tokens_to_rank, n_tokens_from_rank: [W] int64, from the matching dispatch.
            num_tokens: T on this rank.
            check_inputs: validate on every rank first (docs/contract.md section 9).
            stats: filled with bytes moved and host synchronisations.
            handle: the matching dispatch's `DispatchHandle` (optional): with it the rows' groups and the
                tokens of the returning partials are known, so only the partial rows travel. A handle
                of another dispatch (other src_idx / src_rank tensors) is not used.
        Returns: combined_x [num_tokens, H] in x's dtype.
        """
        stats = with_sm_budget(stats, num_sms)
        world, rank = comm.world_size, comm.rank
        hidden = x.shape[1] if x.dim() == 2 else 0
        if check_inputs:
            tokens_of_rank = check_combine_everywhere(comm, x, topk_weights, src_idx, src_rank, n_tokens_to_rank,
                                                      n_tokens_from_rank, num_tokens)
            stats.sync("input checks")
        row_bytes = hidden * x.element_size()
        if handle is not None and not handle.serves(self.name, src_idx, src_rank, num_tokens):
            handle = None
        if x.dim() == 2 and nccl_kernels.serves(x, 1, world):
            if handle is not None and handle.max_tokens is not None:
                max_tokens = handle.max_tokens
            elif check_inputs:
                max_tokens = max(tokens_of_rank)
            else:
                max_tokens = max(comm.exchange(num_tokens))  # a host-side exchange, no device synchronisation
            out, errors = nccl_kernels.combine(comm, x, topk_weights, src_idx, src_rank, num_tokens, max_tokens,
                                               stats)
            if check_inputs:
                checked(comm, lambda: _raise_combine_errors(rank, errors))
                stats.sync("device error words")
            return out
        if handle is not None and handle.wire_row is not None:
            n_to, n_from, pairs = handle.n_to, handle.n_from, handle.pairs
            partials = routing.weighted_partials(
                x[:pairs], topk_weights[:pairs], handle.wire_row, sum(n_from),
                out=routing.scratch("partials_out", (sum(n_from), hidden), x.dtype, x.device))
            partials_in = routing.scratch("partials_in", (sum(n_to), hidden), x.dtype, x.device)
            comm.all_to_all_single(partials_in, partials, n_to, n_from)
            token = handle.send_token
        else:
            groups = routing.group_rows(src_rank, src_idx)
            counts = torch.cat([n_tokens_to_rank, n_tokens_from_rank]).tolist()
            stats.sync("split sizes to host")
            n_to, n_from = counts[:world], counts[world:]
            partials = routing.weighted_partials(x, topk_weights, groups.row_group, groups.n_groups)
            partials_in = torch.empty(sum(n_to), hidden, dtype=x.dtype, device=x.device)
            comm.all_to_all_single(partials_in, partials, n_to, n_from)
            token = torch.empty(sum(n_to), dtype=torch.int64, device=x.device)
            comm.all_to_all_single(token, groups.group_src_idx.contiguous(), n_to, n_from)
            row_bytes += 8
        stats.bytes_sent += (sum(n_from) - n_from[rank]) * row_bytes
        stats.bytes_recv += (sum(n_to) - n_to[rank]) * row_bytes
        return routing.sum_partials(partials_in, token, num_tokens, n_to)


def _raise_combine_errors(rank: int, errors: torch.Tensor) -> None:
    """The error words of the combine kernels (moe.cu FM_ERR_BAD_ROW, FM_ERR_BIG_GROUP), read on the host."""
    words = errors.tolist()
    if words[2]:
        raise RuntimeError(f"nccl backend, rank {rank}: moe_combine: row {words[2] - 1} names a source rank outside "
                           "the group or a token past every rank's token count")
    if words[3]:
        raise RuntimeError(f"nccl backend, rank {rank}: moe_combine: a token has {words[3]} rows on this rank; the "
                           "kernels sum at most 64 rows of one token on one rank")
