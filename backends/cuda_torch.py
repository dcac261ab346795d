"""The CUDA backend's torch path: the routing plan of routing.py over the symmetric-memory transport.

It serves CPU tensors (POSIX shared memory, which CI runs) and CUDA tensors beyond the kernels' limits
(K > 64 or W > 64). Rows travel with `transport.push_rows` straight into the peer's buffer; phases are
ordered by the transport's barrier. The count matrix is read on the host (on CPU tensors that costs
nothing; on CUDA it is a synchronisation, so this path is not capturable in a CUDA graph).

  dispatch: 1. counts: r pushes its count row [tokens to each rank | pairs per expert | T] to row r of
       every rank's count buffer; barrier; every rank reads the same W x (W + E + 1) matrix M.
    2. data: the wire row of token t for rank d goes to row sum_{s<r} M[s][d] + (position of t among
       r's tokens for d) of d's buffer, with its metadata row (routing.py's layout, output rows
       included); barrier.
    3. expansion: the receiver writes each wire row to the output rows its metadata names.
  combine with the dispatch's handle: the partial of each received wire row (float32 sum in row order
       of w * y, cast) goes to the source's buffer at the row where that token sat in the source's send
       layout; barrier; the source adds each token's partials in ascending expert-rank order, in float32.
       Consecutive such combines write alternate buffers, so no barrier is needed before the pushes:
       a buffer is written again only after the barrier of the combine in between, which every rank
       enters after it has read that buffer.
  combine without a handle: the counts travel first (n_tokens_to_rank rows), the groups come from a
       sort of (src_rank, src_idx), and each partial travels with its token index.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from . import routing
from .common import CommStats, DispatchOutputs
from .communicator import Communicator


# Combines with a handle run so far, per transport: which of the two partial buffers the next one writes.
_handle_combines: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def push_to_all(state, row: torch.Tensor, buf) -> None:
    """Writes a one-row tensor into this rank's row of every rank's `buf`."""
    state.transport.push_rows(row.contiguous(), state.zeros_w, state.ranks, state.own_row, buf)


def dispatch(comm: Communicator, state, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
             placement: routing.Placement, max_recv_tokens: Optional[int], check_inputs: bool, stats: CommStats):
    """Dispatch over push_rows (docs/contract.md section 3; on CPU tensors the rows are written into the
    peers' shared-memory buffers directly, as push_rows would). Returns (outputs, pairs received, handle)."""
    world, rank = comm.world_size, comm.rank
    tr, device = state.transport, x.device
    tokens, top_k, hidden = topk_idx.shape[0], topk_idx.shape[1], x.shape[1]
    row_len = world + placement.num_experts + 1

    # 1. counts
    counts = routing.count_row(topk_idx, placement)
    count_buf = tr.buffer("dispatch_count_rows", torch.int64, (row_len,), world)
    if device.type == "cpu":  # shared memory: row `rank` of every rank's count buffer, written in place
        for peer in range(world):
            count_buf.peer(peer)[rank].copy_(counts.row)
    else:
        push_to_all(state, counts.row.view(1, row_len), count_buf)
    # While the peers write their count rows: what needs only this rank's routing (the wire rows, their
    # metadata but the output rows, each pair's rank within its expert).
    send = routing.send_rows(counts)
    meta = routing.wire_meta(topk_idx, topk_weights, counts, None, send, rank)
    within = routing.pair_ranks(counts, placement)
    tr.barrier()
    matrix = count_buf.local[:world].clone()
    host = matrix.tolist()
    stats.sync("count matrix to host")
    if not check_inputs:
        state.raise_pending(comm)  # errors of earlier calls (checked mode reports at the end of the call)
    n_to = host[rank][:world]
    n_from = [host[s][rank] for s in range(world)]
    per_expert = routing.pairs_of_rank(host, placement, rank)
    pairs = sum(per_expert)
    wire_in = [sum(host[s][d] for s in range(world)) for d in range(world)]

    # 2. data
    out_rows = routing.place_pairs(topk_idx, counts, matrix, placement, rank, within=within)
    routing.wire_meta_rows(meta, counts, out_rows, send)
    capacity = max(wire_in)  # the same on every rank: every rank read the same matrix
    x_buf = tr.buffer("dispatch_wire_rows", x.dtype, (hidden,), capacity)
    meta_buf = tr.buffer("dispatch_wire_meta", torch.int64, (meta.shape[1],), capacity)
    if send.token.numel() and device.type == "cpu":
        # Shared memory: the wire rows for rank d (send rows are by destination, then token) go to rows
        # [sum_{s<r} M[s][d], + n_to[d]) of d's buffers: one gather of x rows and one copy of metadata.
        first = 0
        for d in range(world):  # at most W passes
            n, base = n_to[d], sum(host[s][d] for s in range(rank))
            if n:
                torch.index_select(x, 0, send.token[first:first + n], out=x_buf.peer(d)[base:base + n])
                meta_buf.peer(d)[base:base + n].copy_(meta[first:first + n])
            first += n
    elif send.token.numel():
        dst_row = matrix[:rank, :world].sum(0)[send.rank] + send.position
        tr.push_rows(x.contiguous(), send.token, send.rank, dst_row, x_buf)
        tr.push_rows(meta, torch.arange(send.token.numel(), device=device), send.rank, dst_row, meta_buf)
    tr.barrier()
    row_bytes = hidden * x.element_size() + meta.shape[1] * 8
    stats.bytes_sent += (sum(n_to) - n_to[rank]) * row_bytes + (world - 1) * row_len * 8
    stats.bytes_recv += (wire_in[rank] - n_from[rank]) * row_bytes

    # 3. expansion
    out_n = pairs if max_recv_tokens is None else max_recv_tokens
    if pairs > out_n:  # capacity overflow: reported by check() (at once in checked mode)
        errors = state.errors
        errors[0] = max(int(errors[0]), pairs)
        errors[1] = out_n
    n_in = wire_in[rank]
    exp = routing.expand(meta_buf.local[:n_in], x_buf.local[:n_in], top_k, pairs, out_n)
    out = DispatchOutputs(exp.recv_x, exp.topk_idx, exp.topk_weights, exp.src_idx, exp.src_rank,
                          counts.row[:world].clone(), matrix[:, rank].contiguous(),
                          torch.tensor(per_expert, dtype=torch.int64, device=device))
    handle = routing.DispatchHandle(
        backend="cuda", num_tokens=tokens, pairs=min(pairs, out_n), wire_row=exp.wire_row, send_token=send.token,
        n_to=n_to, n_from=n_from, wire_out_max=max(sum(r[:world]) for r in host),
        max_tokens=max(r[row_len - 1] for r in host), src_idx=out.recv_src_idx, src_rank=out.recv_src_rank,
        partial_base=[sum(host[s][:rank]) for s in range(world)])
    return out, pairs, handle


def combine(comm: Communicator, state, x: torch.Tensor, topk_weights: torch.Tensor, src_idx: torch.Tensor,
            src_rank: torch.Tensor, n_tokens_to_rank: torch.Tensor, num_tokens: int, stats: CommStats,
            handle: Optional[routing.DispatchHandle]) -> torch.Tensor:
    """Combine over push_rows (docs/contract.md section 4); `handle` is the matching dispatch's, or None."""
    world, rank = comm.world_size, comm.rank
    tr, device = state.transport, x.device
    hidden, dtype = x.shape[1], x.dtype
    ranks = state.ranks
    if handle is not None:
        n_from = handle.n_from
        groups = sum(n_from)
        calls = _handle_combines.get(tr, 0)
        _handle_combines[tr] = calls + 1
        part_buf = tr.buffer(f"combine_partial_rows_{calls % 2}", dtype, (hidden,), handle.wire_out_max)
        if device.type == "cpu":
            # Shared memory: each source's partials are cast straight into its rows of that source's
            # buffer (its groups are consecutive here and there), with no partial tensor in between.
            pieces, first = [], 0
            for s, n in enumerate(n_from):  # at most W pieces
                if n:
                    base = handle.partial_base[s]
                    pieces.append((first, part_buf.peer(s)[base:base + n]))
                first += n
            routing.weighted_partials(x[:handle.pairs], topk_weights[:handle.pairs], handle.wire_row, groups,
                                      pieces=pieces)
        elif groups:
            partials = routing.weighted_partials(x[:handle.pairs], topk_weights[:handle.pairs], handle.wire_row,
                                                 groups)
            # group g (from source s) goes to row partial_base[s] + (g - first group of s) of s's buffer
            n_from_t = torch.tensor(n_from, device=device)
            source = torch.repeat_interleave(ranks, n_from_t, output_size=groups)
            shift = torch.tensor([handle.partial_base[s] - sum(n_from[:s]) for s in range(world)],
                                 dtype=torch.int64, device=device)
            rows = torch.arange(groups, device=device)
            dst_row = rows + torch.repeat_interleave(shift, n_from_t, output_size=groups)
            tr.push_rows(partials, rows, source, dst_row, part_buf)
        tr.barrier()
        n_to = handle.n_to
        token = handle.send_token
        row_bytes = hidden * x.element_size()
    else:
        count_buf = tr.buffer("combine_count_rows", torch.int64, (world,), world)
        push_to_all(state, n_tokens_to_rank.view(1, world), count_buf)
        tr.barrier()
        to_host = count_buf.local[:world].tolist()  # [s][e]: tokens rank s sent to rank e
        stats.sync("split sizes to host")
        grouped = routing.group_rows(src_rank, src_idx)
        groups = grouped.n_groups
        partials = routing.weighted_partials(x, topk_weights, grouped.row_group, groups)
        source = grouped.group_src_rank
        per_source = torch.bincount(source, minlength=world)[:world]
        offsets = torch.tensor([sum(to_host[s][:rank]) for s in range(world)], dtype=torch.int64, device=device)
        dst_row = offsets[source] + torch.arange(groups, device=device) - routing._exclusive_cumsum(per_source)[source]
        capacity = max(sum(row) for row in to_host)
        part_buf = tr.buffer("combine_partial_rows", dtype, (hidden,), capacity)
        idx_buf = tr.buffer("combine_partial_tokens", torch.int64, (), capacity)
        if groups:
            g = torch.arange(groups, device=device)
            tr.push_rows(partials, g, source, dst_row, part_buf)
            tr.push_rows(grouped.group_src_idx.contiguous(), g, source, dst_row, idx_buf)
        tr.barrier()
        n_to = to_host[rank]
        n_from = per_source.tolist()
        token = idx_buf.local[:sum(n_to)]
        row_bytes = hidden * x.element_size() + 8
    stats.bytes_sent += (sum(n_from) - n_from[rank]) * row_bytes
    stats.bytes_recv += (sum(n_to) - n_to[rank]) * row_bytes
    return routing.sum_partials(part_buf.local[:sum(n_to)], token, num_tokens, n_to)
