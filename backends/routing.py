"""The routing plan, in vectorised torch: the twin of the kernels of kernels/moe.cu.

docs/contract.md section 8 ("One routing plan, two transports"): the routing arithmetic is written once
for the device (kernels/moe.cu) and once here, and every backend uses it; backends differ only in how
rows travel. The single-process reference (fuser_moe/reference.py) stays independent of it.

Terms (docs/contract.md section 2): W ranks, T tokens, K slots per token, E experts. A *wire row* is one
token travelling to one destination rank (once, however many of that rank's experts it picked). A
*pair* is one (token, expert); the receiver expands wire rows into pairs.

The stages, each a function here and a kernel there:
  count   `count_row`: this rank's count row [tokens to each rank (W) | pairs per expert (E) | T].
          The rows of all ranks form the W x (W + E + 1) count matrix M (row s: what rank s sends).
  place   `place_pairs`: from M, the output row on its expert's rank of every pair (t, k): pairs of a
          rank are ordered (local expert, source rank, source token), so the row is
          (pairs of earlier local experts, from every rank) + sum_{s < r} M[s][W + e] + (earlier pairs
          of expert e on this rank). `send_rows`: the wire rows of this rank, by destination, then token.
  pack    `wire_meta`: the one wire-metadata layout, int64 [N, 2 + 3K] (`META_*` below).
  expand  `expand`: the receiver writes each wire row to the output rows its metadata names; no sort.
  group   `group_rows`: combine's rows of each (source rank, token), groups in (source rank, token)
          order, which is also the order of the wire rows the matching dispatch received.
  reduce  `weighted_partials`: per group the float32 sum of w * y in row order, cast (docs/contract.md
          section 4, step 1); `sum_partials`: per token the float32 sum of its partials in ascending
          expert-rank order, cast (step 2).
Sums keep the contract's order on every device: on the CPU `index_add_` along dim 0 adds source rows
serially in index order; on CUDA (where `index_add_` uses atomics) the rows of a group are laid out
densely and summed with a scan along the group, which runs sequentially in float32, and step 2 adds
one source rank at a time. Where Numba is installed, CPU tensors of more than a few rows take one
fused pass instead for the reductions, the expansion and the metadata rows (backends/cpu_reduce.py:
the same operations on the same rows in the same order, the layout's offsets from here).
No Python loop here runs more than W times, or `_CPU_MAX_BLOCKS` times (the CPU
reductions work through their rows in blocks that stay in the cache).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import InitVar, dataclass
from typing import Optional, Sequence

import torch

from . import cpu_reduce

# Padding rows of capacity mode sort after every real row: src_rank < 2**31 and src_idx < 2**32.
KEY_STRIDE = 1 << 32


@dataclass(frozen=True)
class Placement:
    """Where experts live. `expert_to_rank[e]` is e's rank; `local_index[e]` its position j there."""

    num_experts: int
    world_size: int
    expert_to_rank: torch.Tensor  # [E] int64
    local_index: torch.Tensor  # [E] int64
    n_local: tuple  # experts per rank
    # Every expert ordered by (rank, local index), and where each rank's run starts in that order
    # ([E] and [W + 1] int64 on the device): the CUDA kernels scan per-expert counts in this order.
    expert_order: Optional[torch.Tensor] = None
    rank_begin: Optional[torch.Tensor] = None
    # The map on the host, and each rank's experts in local order (host ints).
    ranks_host: tuple = ()
    local_experts: tuple = ()
    # Lookup tables indexed by clamp(id + 1, 0, E + 1) ([E + 2] int64 on the device): the rank of an id's
    # expert and the id itself, with -1 and E for an empty slot or an id outside [0, E).
    slot_rank: Optional[torch.Tensor] = None
    slot_expert: Optional[torch.Tensor] = None


def placement_list(num_experts: int, world_size: int, expert_to_rank: Optional[Sequence[int]]) -> list[int]:
    """The expert-to-rank map as a list, checked (docs/contract.md section 9: ValueError)."""
    if expert_to_rank is None:
        if num_experts % world_size != 0:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the world size {world_size}: give "
                f"expert_to_rank to place experts unevenly")
        per_rank = num_experts // world_size
        return [e // per_rank for e in range(num_experts)]
    placement = [int(r) for r in expert_to_rank]
    if len(placement) != num_experts:
        raise ValueError(f"expert_to_rank has {len(placement)} entries but num_experts={num_experts}")
    bad = [(e, r) for e, r in enumerate(placement) if not 0 <= r < world_size]
    if bad:
        e, r = bad[0]
        raise ValueError(f"expert_to_rank[{e}]={r} names a rank outside [0, {world_size})")
    return placement


_placement_cache: dict = {}


def make_placement(num_experts: int, world_size: int, expert_to_rank: Optional[Sequence[int]],
                   device) -> Placement:
    key = (num_experts, world_size, None if expert_to_rank is None else tuple(expert_to_rank), str(device))
    cached = _placement_cache.get(key)
    if cached is not None:
        return cached
    placement = placement_list(num_experts, world_size, expert_to_rank)
    local_index, seen = [], [0] * world_size
    for r in placement:
        local_index.append(seen[r])
        seen[r] += 1
    result = Placement(
        num_experts, world_size,
        torch.tensor(placement, dtype=torch.int64, device=device),
        torch.tensor(local_index, dtype=torch.int64, device=device),
        tuple(seen),
        torch.tensor(sorted(range(num_experts), key=lambda e: (placement[e], e)), dtype=torch.int64, device=device),
        torch.tensor([sum(seen[:d]) for d in range(world_size + 1)], dtype=torch.int64, device=device),
        tuple(placement),
        tuple(tuple(e for e in range(num_experts) if placement[e] == d) for d in range(world_size)),
        torch.tensor([-1] + placement + [-1], dtype=torch.int64, device=device),
        torch.tensor([num_experts] + list(range(num_experts)) + [num_experts], dtype=torch.int64, device=device),
    )
    if len(_placement_cache) > 256:
        _placement_cache.clear()
    _placement_cache[key] = result
    return result


# ------------------------------------------------------------------------------------------ layout
# The one wire-metadata layout, int64 [N, 2 + 3K] per wire row (kernels/moe.cu's send and expand use it
# too): the token index on the source, the source rank, then K output rows on the destination (-1 for a
# slot whose expert lives elsewhere), K expert ids (-1 likewise) and K weight bits (float32 bits).
META_TOKEN = 0
META_SOURCE = 1
META_ROWS = 2


def meta_width(top_k: int) -> int:
    """Words of one wire-metadata row: 2 + 3K."""
    return 2 + 3 * top_k


def meta_layout(top_k: int) -> tuple:
    """Word offsets of a metadata row: (token, source, output rows, expert ids, weight bits)."""
    return META_TOKEN, META_SOURCE, META_ROWS, META_ROWS + top_k, META_ROWS + 2 * top_k


def pack_weights(weights: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 carrying the exact bits, zero-extended (so weights can travel in the int64
    metadata; the kernels write the same word: `__float_as_uint(w)`)."""
    return weights.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def unpack_weights(bits: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_weights`: int64 words holding float32 bits -> float32."""
    return bits.to(torch.int32).contiguous().view(torch.float32)


_scratch_buffers: dict = {}


def scratch(name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor for an intermediate that does not outlive the call (CPU only; elsewhere a
    fresh `torch.empty`). On CPUs a fresh multi-megabyte allocation is returned to the system when freed,
    and its pages fault in again on first touch, which costs more than the work on it; these buffers are
    kept per (thread, name, dtype) and grown when a call needs more."""
    device = torch.device(device)
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = 1
    for n in shape:
        numel *= int(n)
    key = (threading.get_ident(), name, dtype)
    buffer = _scratch_buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = _scratch_buffers[key] = torch.empty(max(numel, 1), dtype=dtype)
    return buffer[:numel].view(shape)


def _exclusive_cumsum(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.cumsum(t, dim) - t


def _rank_within_value(values: torch.Tensor, n_values: int) -> torch.Tensor:
    """For each entry of a 1-D int64 tensor with entries in [0, n_values]: how many earlier entries hold
    the same value (a stable sort, no loop)."""
    ordered, order = torch.sort(values, stable=True)
    first = torch.searchsorted(ordered, ordered)  # where each entry's value starts in the sorted order
    position = torch.empty_like(values)
    position[order] = torch.arange(values.numel(), device=values.device) - first
    return position


# ------------------------------------------------------------------------------------------ count
def _slot_keys(topk_idx: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[T, K] int64 indices into the placement's slot tables: clamp(id + 1, 0, E + 1)."""
    return (topk_idx.long() + 1).clamp_(0, placement.num_experts + 1)


def slot_destinations(topk_idx: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[T, K] int64: the rank of each slot's expert; -1 for an empty slot (and for an id outside [0, E),
    which only an unchecked input has: the kernels skip such slots too)."""
    return placement.slot_rank[_slot_keys(topk_idx, placement)]


@dataclass
class CountRow:
    """This rank's counts (kernels/moe.cu: count and notify).

    row: [W + E + 1] int64: distinct tokens to each rank, pairs per expert, then T.
    dest: [T, K] int64: rank of each slot's expert, -1 for an empty slot.
    routed: [T, W] bool: does token t travel to rank d.
    slot_expert: [T * K] int64: each slot's expert id, E for an empty slot.
    """

    row: torch.Tensor
    dest: torch.Tensor
    routed: torch.Tensor
    slot_expert: torch.Tensor


def count_row(topk_idx: torch.Tensor, placement: Placement) -> CountRow:
    """The count row of this rank's routing.

    Args:
        topk_idx: [T, K] int64/int32 global expert ids, -1 for an empty slot.
        placement: where experts live.
    Returns: `CountRow`.
    """
    world, experts = placement.world_size, placement.num_experts
    tokens = topk_idx.shape[0]
    keys = _slot_keys(topk_idx, placement)
    dest = placement.slot_rank[keys]
    slot_expert = placement.slot_expert[keys].view(-1)
    device = dest.device
    # column 0 collects the empty slots (dest -1), column d + 1 the slots on rank d
    routed = torch.zeros(tokens, world + 1, dtype=torch.bool, device=device).scatter_(1, dest + 1, True)[:, 1:]
    row = torch.empty(world + experts + 1, dtype=torch.int64, device=device)
    torch.sum(routed, 0, out=row[:world])
    row[world:].copy_(torch.bincount(slot_expert, minlength=experts + 1))  # the last count is overwritten:
    row[-1] = tokens
    return CountRow(row, dest, routed, slot_expert)


# ------------------------------------------------------------------------------------------ place
def expert_starts(matrix: torch.Tensor, placement: Placement, rank: int) -> torch.Tensor:
    """[E] int64: where this rank's pairs of expert e start in the output of e's rank.

    That output is ordered (local expert, source rank, source token), so the start is the pairs of the
    earlier local experts of e's rank, from every rank, plus the pairs of e from ranks before this one.

    Args:
        matrix: [W, W + E + 1] int64 count matrix (row s: rank s's count row).
        placement: where experts live. rank: this rank.
    """
    world, experts = placement.world_size, placement.num_experts
    pairs = matrix[:, world:world + experts]
    ordered = pairs.sum(0)[placement.expert_order]  # totals by (rank, local index)
    before = _exclusive_cumsum(ordered)
    rank_of_ordered = placement.expert_to_rank[placement.expert_order]
    in_rank = before - before[placement.rank_begin[rank_of_ordered]]
    starts = torch.empty(experts, dtype=torch.int64, device=matrix.device)
    starts[placement.expert_order] = in_rank
    return starts + pairs[:rank].sum(0)


def pair_ranks(counts: CountRow, placement: Placement) -> torch.Tensor:
    """[T * K] int64: for each slot, the earlier pairs of its expert on this rank (in (token, slot) order).
    Needs only this rank's routing, so it can run while the count matrix travels."""
    return _rank_within_value(counts.slot_expert, placement.num_experts)


def place_pairs(topk_idx: torch.Tensor, counts: CountRow, matrix: torch.Tensor, placement: Placement,
                rank: int, within: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[T, K] int64: the output row of pair (t, k) on its expert's rank, -1 for an empty slot.

    Pairs of one expert from this rank are ordered by (token, slot), as the contract orders rows.
    within: `pair_ranks(counts, placement)` when the caller has it already.
    """
    experts = placement.num_experts
    slot_expert = counts.slot_expert
    starts = torch.cat([expert_starts(matrix, placement, rank),
                        torch.full((1,), -1, dtype=torch.int64, device=matrix.device)])
    rows = starts[slot_expert] + (pair_ranks(counts, placement) if within is None else within)
    return rows.masked_fill_(slot_expert == experts, -1).view(topk_idx.shape)


@dataclass
class SendRows:
    """This rank's wire rows, ordered by destination rank, then token (the layout all_to_all sends).

    token: [N] int64 token of each wire row. rank: [N] int64 its destination.
    position: [N] int64 its place among this rank's rows for that destination.
    """

    token: torch.Tensor
    rank: torch.Tensor
    position: torch.Tensor


def send_rows(counts: CountRow) -> SendRows:
    """The wire rows of this rank (a host synchronisation on CUDA: their number)."""
    dest_rank, token = counts.routed.t().nonzero(as_tuple=True)
    world = counts.routed.shape[1]
    start = _exclusive_cumsum(counts.row[:world])
    position = torch.arange(token.numel(), device=token.device) - start[dest_rank]
    return SendRows(token, dest_rank, position)


def wire_meta(topk_idx: torch.Tensor, topk_weights: torch.Tensor, counts: CountRow, out_rows: Optional[torch.Tensor],
              rows: SendRows, rank: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[N, 2 + 3K] int64: the metadata of every wire row, in the layout above.

    Args: topk_idx [T, K], topk_weights [T, K] float32, counts (`count_row`), out_rows [T, K] int64
        (`place_pairs`), or None to leave the K output-row words for `wire_meta_rows` (which needs the
        count matrix: the rest can be written while it travels), rows (`send_rows`), rank: this rank;
        out: an [N, 2 + 3K] int64 tensor (a strided view is fine, such as the metadata columns of
        `wire_buffer`) to write into.
    Returns: out, or a new tensor.
    """
    top_k = topk_idx.shape[1]
    token = rows.token
    n = token.numel()
    meta = torch.empty(n, meta_width(top_k), dtype=torch.int64, device=token.device) if out is None else out
    if cpu_reduce.meta_unused(meta) is None:  # one pass over the wire rows (backends/cpu_reduce.py)
        return cpu_reduce.pack_meta(meta, token, rows.rank, counts.dest, out_rows, topk_idx,
                                    pack_weights(topk_weights), rank, meta_layout(top_k))
    # Per token: its K output rows, K expert ids and K weight bits; each wire row copies its token's,
    # then hides (-1) the rows and ids of slots whose expert lives on another rank.
    first = META_ROWS if out_rows is not None else META_ROWS + top_k
    parts = [topk_idx.long(), pack_weights(topk_weights)]
    per_token = torch.cat(parts if out_rows is None else [out_rows] + parts, dim=1)
    meta[:, META_TOKEN] = token
    meta[:, META_SOURCE] = rank
    torch.index_select(per_token, 0, token, out=meta[:, first:])
    elsewhere = _elsewhere(counts, rows)
    meta[:, first:META_ROWS + 2 * top_k].view(n, (META_ROWS + 2 * top_k - first) // top_k, top_k).masked_fill_(
        elsewhere, -1)
    return meta


def wire_meta_rows(meta: torch.Tensor, counts: CountRow, out_rows: torch.Tensor, rows: SendRows) -> torch.Tensor:
    """Writes the K output-row words of `wire_meta(..., out_rows=None, ...)`'s metadata; returns meta."""
    top_k = out_rows.shape[1]
    if cpu_reduce.meta_unused(meta) is None:
        return cpu_reduce.pack_meta(meta, rows.token, rows.rank, counts.dest, out_rows, None, None, 0,
                                    meta_layout(top_k), only_rows=True)
    words = meta[:, META_ROWS:META_ROWS + top_k]
    torch.index_select(out_rows, 0, rows.token, out=words)
    words.masked_fill_(_elsewhere(counts, rows).squeeze(1), -1)
    return meta


def _elsewhere(counts: CountRow, rows: SendRows) -> torch.Tensor:
    """[N, 1, K] bool: does slot k of wire row n name an expert of another rank than the row's."""
    return (counts.dest[rows.token] != rows.rank.unsqueeze(1)).unsqueeze(1)


def wire_buffer(x: torch.Tensor, token: torch.Tensor, width: int) -> tuple:
    """Packed wire rows with their x rows in place and the metadata still to write: each wire row is its
    x row (padded to 8 bytes) followed by its metadata row, so that one all-to-all carries both.

    Args: x [T, H]; token [N] int64 the token of each wire row; width: words of a metadata row (2 + 3K).
    Returns: (wire [N, B] uint8, a scratch buffer; its metadata columns, an [N, width] int64 view).
    """
    row_bytes = x.shape[1] * x.element_size()
    padded = -(-row_bytes // 8) * 8
    wire = scratch("wire_rows_out", (token.numel(), padded + 8 * width), torch.uint8, x.device)
    # each x row gathered straight into its wire row (no intermediate)
    torch.index_select(x.contiguous().view(torch.uint8), 0, token, out=wire[:, :row_bytes])
    if padded != row_bytes:
        wire[:, row_bytes:padded].zero_()
    return wire, wire[:, padded:].view(torch.int64)


def pack_wire_rows(x: torch.Tensor, token: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """[N, B] uint8: `wire_buffer` with the metadata rows written.

    Args: x [T, H]; token [N] int64 the token of each wire row; meta [N, 2 + 3K] int64.
    """
    wire, meta_view = wire_buffer(x, token, meta.shape[1])
    meta_view.copy_(meta)
    return wire


def unpack_wire_rows(wire: torch.Tensor, dtype: torch.dtype, hidden: int, width: int) -> tuple:
    """Views of packed wire rows: (x rows [N, H] of dtype, metadata [N, width] int64); no copy."""
    row_bytes = hidden * dtype.itemsize
    padded = -(-row_bytes // 8) * 8
    return wire[:, :row_bytes].view(dtype), wire[:, padded:padded + 8 * width].view(torch.int64)


# ------------------------------------------------------------------------------------------ expand
@dataclass
class Expansion:
    """The receiver's rows in the contract's order (local expert, source rank, source token).

    Rows past the pairs (capacity mode) are padding: zero x, -1 ids, weight 0.
    recv_x [R, H]; topk_idx, src_idx, src_rank [R] int64; topk_weights [R] float32.
    wire_row: [min(V, R)] int64, the received wire row each real output row copies: its combine group.
    """

    recv_x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    src_idx: torch.Tensor
    src_rank: torch.Tensor
    wire_row: torch.Tensor


def expand(meta: torch.Tensor, wire_x: torch.Tensor, top_k: int, pairs: int, out_rows: int) -> Expansion:
    """Writes each received wire row to the output rows its metadata names; no sort.

    Args:
        meta: [N, 2 + 3K] int64 received metadata (any order of wire rows).
        wire_x: [N, H] received rows (may be a strided view).
        top_k: K. pairs: V, the pairs this rank receives (from the count matrix).
        out_rows: R, rows of the outputs (V in exact mode, the capacity C in capacity mode). Pairs at or
            past R are dropped (the caller reports the overflow).
    Returns: `Expansion`.
    """
    if cpu_reduce.expand_unused(wire_x, meta) is None:
        # one pass: each wire row copied once to each of its output rows (backends/cpu_reduce.py)
        return Expansion(*cpu_reduce.expand_rows(meta, wire_x, top_k, pairs, out_rows, meta_layout(top_k)))
    device = meta.device
    n_wire = meta.shape[0]
    # slot (wire row * K + k) of each output row: index 0 of `slot` collects the slots that name no row
    # here (-1), index out_rows + 1 the rows past the capacity; output row j sits at index j + 1.
    target = (meta[:, META_ROWS:META_ROWS + top_k] + 1).clamp_(0, out_rows + 1).view(-1)
    slot = torch.empty(out_rows + 2, dtype=torch.int64, device=device)
    slot.scatter_(0, target, torch.arange(n_wire * top_k, device=device))
    real = min(pairs, out_rows)
    slot = slot[1:real + 1]
    # slot // K: a shift when K is a power of two (x86 has no vector int64 division)
    shift = top_k.bit_length() - 1
    wire_row = (slot >> shift if shift else slot) if top_k == 1 << shift else torch.div(slot, top_k, rounding_mode="floor")
    hidden = wire_x.shape[1]
    recv_x = torch.empty(out_rows, hidden, dtype=wire_x.dtype, device=device)
    torch.index_select(wire_x, 0, wire_row, out=recv_x[:real])
    if real < out_rows:
        recv_x[real:].zero_()

    def padded(values: torch.Tensor, fill) -> torch.Tensor:
        if real == out_rows:
            return values
        return torch.cat([values, torch.full((out_rows - real,), fill, dtype=values.dtype, device=device)])

    experts = meta[:, META_ROWS + top_k:META_ROWS + 2 * top_k].reshape(-1)
    weights = meta[:, META_ROWS + 2 * top_k:].reshape(-1)
    return Expansion(
        recv_x=recv_x,
        topk_idx=padded(experts[slot], -1),
        topk_weights=padded(unpack_weights(weights[slot]), 0.0),
        src_idx=padded(meta[:, META_TOKEN][wire_row], -1),
        src_rank=padded(meta[:, META_SOURCE][wire_row], -1),
        wire_row=wire_row,
    )


def pairs_of_rank(matrix_host: list, placement: Placement, rank: int) -> list:
    """Pairs this rank receives per local expert (n_tokens_per_expert), from the count matrix on the host."""
    world = placement.world_size
    return [sum(row[world + e] for row in matrix_host) for e in placement.local_experts[rank]]


# ------------------------------------------------------------------------------------------ combine
@dataclass
class CombineGroups:
    """Combine's rows grouped by (source rank, token); groups in that order (the wire order).

    row_group: [V] int64 group of each row, -1 for a padding row.
    group_src_rank, group_src_idx: [G] int64 the group's source rank and token.
    """

    row_group: torch.Tensor
    group_src_rank: torch.Tensor
    group_src_idx: torch.Tensor

    @property
    def n_groups(self) -> int:
        return self.group_src_rank.numel()


def group_rows(src_rank: torch.Tensor, src_idx: torch.Tensor) -> CombineGroups:
    """Groups combine's rows by (src_rank, src_idx); padding rows (src_rank < 0) belong to none."""
    real = src_rank >= 0
    keys = torch.where(real, src_rank * KEY_STRIDE + src_idx, torch.iinfo(torch.int64).max)
    unique, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    n_groups = unique.numel() - (0 if bool(real.all()) else 1)
    unique = unique[:n_groups]
    # key // KEY_STRIDE and key % KEY_STRIDE, as a shift and a mask (the same values, negative keys included)
    return CombineGroups(torch.where(real, inverse, -1), unique >> 32, unique & (KEY_STRIDE - 1))


# CPU reductions work through their rows in blocks of about _CPU_BLOCK_BYTES of float32 (half a core's
# L2 on the machines measured), in at most _CPU_MAX_BLOCKS blocks (so the loop does not grow with T).
_CPU_BLOCK_BYTES = 1 << 20
_CPU_MAX_BLOCKS = 16


def _cpu_blocks(rows: int, row_bytes: int) -> list:
    """[(first, last)] consecutive row ranges covering [0, rows), each about _CPU_BLOCK_BYTES."""
    n_blocks = max(1, min(_CPU_MAX_BLOCKS, -(-rows * row_bytes // _CPU_BLOCK_BYTES)))
    step = -(-rows // n_blocks) if rows else 1
    return [(first, min(first + step, rows)) for first in range(0, rows, step)]


def _weighted_rows(y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """float32(w) * float32(y) per row, each product rounded once; a scratch buffer on CPUs."""
    product = scratch("partials_product", tuple(y.shape), torch.float32, y.device)
    if y.dtype == torch.float32:
        return torch.mul(y, weights.unsqueeze(1), out=product)
    # a float32 copy first: mixed-dtype products are slow on CPUs
    return product.copy_(y).mul_(weights.unsqueeze(1))


def weighted_sums(y: torch.Tensor, weights: torch.Tensor, row_group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Step 1 of docs/contract.md section 4 before its cast: per group, the float32 sum of w * y over
    its rows in row order, starting from +0.0.

    Args:
        y: [V, H] expert outputs. weights: [V] float32.
        row_group: [V] int64 group of each row in [0, n_groups), -1 for a row that belongs to none.
        n_groups: G.
    Returns: [G, H] float32; on the CPU a view of a scratch buffer, valid until the next call on this thread.
    """
    hidden = y.shape[1]
    if y.device.type == "cpu":
        if cpu_reduce.reason_unused(y, weights) is None:
            sums = scratch("partials_sum", (n_groups, hidden), torch.float32, y.device)
            cpu_reduce.grouped_sums(y, weights, row_group, n_groups, [(0, sums)])
            return sums
        # index_add_ along dim 0 adds source rows serially in index order on the CPU, so consecutive
        # blocks of rows added in order give the sums of one pass; each block's float32 products stay
        # in the cache until index_add_ reads them.
        acc = scratch("partials_sum", (n_groups + 1, hidden), torch.float32, y.device).zero_()
        index = torch.where(row_group >= 0, row_group, n_groups)  # row -1 into row G
        for first, last in _cpu_blocks(y.shape[0], hidden * 4):  # at most _CPU_MAX_BLOCKS blocks
            product = _weighted_rows(y[first:last], weights[first:last])
            acc.index_add_(0, index[first:last], product)
        return acc[:n_groups]
    product = _weighted_rows(y, weights)
    # CUDA: index_add_ adds with atomics (any order). Lay each group's rows out densely after a column
    # of +0.0 and scan along the group: the scan of a non-innermost dimension runs sequentially in float32.
    keep = (row_group >= 0).nonzero().squeeze(1)
    group = row_group[keep]
    occurrence = _rank_within_value(group, n_groups)
    longest = int(occurrence.max()) + 1 if group.numel() else 0
    dense = torch.zeros(n_groups, longest + 1, hidden, dtype=torch.float32, device=y.device)
    dense[group, occurrence + 1] = product[keep]
    return dense.cumsum(1)[:, longest]


def weighted_partials(y: torch.Tensor, weights: torch.Tensor, row_group: torch.Tensor, n_groups: int,
                      out: Optional[torch.Tensor] = None, pieces: Optional[Sequence[tuple]] = None):
    """Step 1 of docs/contract.md section 4: per group, the float32 sum of w * y over its rows in row
    order (starting at +0.0), cast to y's dtype.

    Args:
        y: [V, H] expert outputs. weights: [V] float32.
        row_group: [V] int64 group of each row in [0, n_groups), -1 for a row that belongs to none.
        n_groups: G.
        out: optional [G, H] tensor of y's dtype to write the partials into.
        pieces: instead of out, (first group, [n, H] tensor of y's dtype) pairs: groups first .. first + n
            go into that tensor (the cuda backend writes each source's groups into its shared buffer).
    Returns: [G, H] in y's dtype: out, or a new tensor; None when pieces were given.
    """
    if y.device.type == "cpu" and cpu_reduce.reason_unused(y, weights) is None:
        # one pass: each group's row summed in float32 and written once, cast (backends/cpu_reduce.py)
        if pieces is None:
            if out is None or not out.is_contiguous():
                target = torch.empty(n_groups, y.shape[1], dtype=y.dtype)
                cpu_reduce.grouped_sums(y, weights, row_group, n_groups, [(0, target)])
                return target if out is None else out.copy_(target)
            cpu_reduce.grouped_sums(y, weights, row_group, n_groups, [(0, out)])
            return out
        if all(t.is_contiguous() for _, t in pieces):
            cpu_reduce.grouped_sums(y, weights, row_group, n_groups, pieces)
            return None
    sums = weighted_sums(y, weights, row_group, n_groups)
    if pieces is not None:
        for first, target in pieces:  # at most W copies
            target.copy_(sums[first:first + target.shape[0]])
        return None
    return sums.to(y.dtype, copy=True) if out is None else out.copy_(sums)


def sum_partials(partials: torch.Tensor, token: torch.Tensor, num_tokens: int, splits: Sequence[int]) -> torch.Tensor:
    """Step 2: combined[t] = float32 sum of t's partials in ascending expert-rank order (from +0.0), cast.

    Args:
        partials: [N, H] partial rows, those of expert rank 0 first, then rank 1, ... (`splits` rows each),
            each rank's rows naming distinct tokens.
        token: [N] int64 token of each partial row. num_tokens: T.
        splits: [W] rows from each expert rank (host ints).
    Returns: [T, H] in partials' dtype.
    """
    if partials.device.type == "cpu" and cpu_reduce.reason_unused(partials) is None:
        combined = torch.empty(num_tokens, partials.shape[1], dtype=partials.dtype)
        cpu_reduce.grouped_sums(partials, None, token, num_tokens, [(0, combined)])
        return combined
    acc = scratch("combined_sum", (num_tokens, partials.shape[1]), torch.float32, partials.device).zero_()
    if partials.device.type == "cpu":
        # serial, in row order (ascending expert rank), a block of rows at a time (see weighted_sums)
        for first, last in _cpu_blocks(partials.shape[0], partials.shape[1] * 4):
            wide = scratch("combined_rows", (last - first, partials.shape[1]), torch.float32, partials.device)
            acc.index_add_(0, token[first:last], wide.copy_(partials[first:last]))
    else:
        start = 0
        for n in splits:  # one expert rank at a time: each element gets one add per pass
            if n:
                acc.index_add_(0, token[start:start + n], partials[start:start + n].float())
            start += n
    return acc.to(partials.dtype, copy=True)  # (a copy: acc is a scratch buffer on CPUs)


# ------------------------------------------------------------------------------------------ handle
@dataclass
class DispatchHandle:
    """What a combine needs from the dispatch whose outputs it consumes (DeepEP's handle).

    The caller holds it (the evaluator passes it from a MoeDispatch to the MoeCombine that reads its
    outputs); a backend keeps no state that couples a combine to the last dispatch.

    backend: name of the backend that made it. num_tokens: T of this rank at dispatch.
    pairs: V, real rows of the outputs. wire_row: [V] int64, each output row's received wire row
        (its combine group; wire rows are in (source rank, token) order).
    send_token: [N] int64 token of each wire row this rank sent, by destination then token: the
        order in which its partials come back.
    n_to, n_from: [W] host ints, wire rows sent to / received from each rank.
    wire_out_max: the most wire rows any rank sent (sizes the cuda backend's partial buffers).
    max_tokens: the most tokens any rank has, or None where the host does not know it.
    src_idx, src_rank: the dispatch's recv_src_idx / recv_src_rank outputs (held weakly); a combine
        given other tensors does not use the handle.
    partial_base: the cuda backend's torch path: for each source rank s, where this rank's partial
        rows start in s's buffer (s's send layout); None elsewhere.
    """

    backend: str
    num_tokens: int
    pairs: Optional[int]
    wire_row: Optional[torch.Tensor]
    send_token: Optional[torch.Tensor]
    n_to: Optional[list]
    n_from: Optional[list]
    wire_out_max: Optional[int]
    max_tokens: Optional[int]
    src_idx: InitVar[torch.Tensor]
    src_rank: InitVar[torch.Tensor]
    # cuda backend's torch path: for each source rank s, where this rank's partials start in s's buffer
    partial_base: Optional[list] = None

    def __post_init__(self, src_idx: torch.Tensor, src_rank: torch.Tensor) -> None:
        # Weak references: a handle does not keep the dispatch's outputs alive.
        self._src_idx, self._src_rank = weakref.ref(src_idx), weakref.ref(src_rank)

    def serves(self, backend: str, src_idx: torch.Tensor, src_rank: torch.Tensor, num_tokens: int) -> bool:
        """Whether a combine of `backend` with these inputs consumes this dispatch's outputs."""
        return (self.backend == backend and src_idx is self._src_idx() and src_rank is self._src_rank()
                and num_tokens == self.num_tokens)
