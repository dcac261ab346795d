"""Routing arithmetic shared by every backend: placement, counts, wire order, expansion, pre-sums.

Written once so that the backends cannot drift apart; they differ only in how rows travel. Every
function here is plain torch on whatever device its tensors are on. Functions whose output size
depends on the routing (`plan_dispatch`, `expand_received`, `group_for_combine`) read sizes on the
host; the CUDA backend's capacity mode uses the fixed-size variants in its own module instead.

Terms (docs/contract.md section 2): W ranks, T tokens, K slots per token, E experts. A *wire row* is one token
travelling to one destination rank (once, however many of that rank's experts it picked). A *pair* is
one (token, expert); the receiver expands wire rows into pairs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

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
    )
    if len(_placement_cache) > 256:
        _placement_cache.clear()
    _placement_cache[key] = result
    return result


# ---------------------------------------------------------------------------------------- dispatch
def slot_destinations(topk_idx: torch.Tensor, placement: Placement) -> torch.Tensor:
    """[T, K] int64: the rank of each slot's expert, -1 for empty slots."""
    idx = topk_idx.long()
    return torch.where(idx >= 0, placement.expert_to_rank[idx.clamp(min=0)], torch.full_like(idx, -1))


def token_rank_mask(dest: torch.Tensor, world_size: int) -> torch.Tensor:
    """[T, W] bool: does token t go to rank d (at least one of its slots)."""
    ranks = torch.arange(world_size, device=dest.device, dtype=torch.int64)
    return (dest.unsqueeze(-1) == ranks).any(dim=1)


@dataclass
class DispatchPlan:
    """What one rank sends: wire rows ordered by destination rank, then by token index."""

    n_tokens_to_rank: torch.Tensor  # [W] int64
    send_token: torch.Tensor  # [N] int64, token index of each wire row
    meta: torch.Tensor  # [N, 1 + 2K] int64: src_idx, K expert ids (-1 if not on that rank), K weight bits


def pack_weights(weights: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 carrying the exact bits (so weights can travel in the int64 metadata)."""
    return weights.contiguous().view(torch.int32).to(torch.int64)


def unpack_weights(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).contiguous().view(torch.float32)


def plan_dispatch(topk_idx: torch.Tensor, topk_weights: torch.Tensor, placement: Placement) -> DispatchPlan:
    dest = slot_destinations(topk_idx, placement)
    routed = token_rank_mask(dest, placement.world_size)  # [T, W]
    n_to = routed.sum(dim=0, dtype=torch.int64)
    send_rank, send_token = routed.t().nonzero(as_tuple=True)  # (d, t) lexicographic: the wire order
    experts = torch.where(dest[send_token] == send_rank.unsqueeze(1), topk_idx.long()[send_token],
                          torch.full_like(dest[send_token], -1))
    meta = torch.cat([send_token.unsqueeze(1), experts, pack_weights(topk_weights[send_token])], dim=1)
    return DispatchPlan(n_to, send_token, meta)


@dataclass
class Expansion:
    """The receiver's rows: pairs ordered by (local expert, source rank, source token)."""

    wire_row: torch.Tensor  # [V] int64, which received wire row each output row copies
    topk_idx: torch.Tensor  # [V] int64 global expert id
    topk_weights: torch.Tensor  # [V] float32
    src_idx: torch.Tensor  # [V] int64
    src_rank: torch.Tensor  # [V] int64
    n_tokens_per_expert: torch.Tensor  # [E_local] int64


def expand_received(meta: torch.Tensor, n_from: Sequence[int], placement: Placement, rank: int,
                     top_k: int) -> Expansion:
    """Expands wire rows (ordered by source rank, then source token) into pairs in the contract's order."""
    device = meta.device
    n_wire = meta.shape[0]
    experts = meta[:, 1:1 + top_k]
    weights = unpack_weights(meta[:, 1 + top_k:1 + 2 * top_k])
    wire_src_rank = torch.repeat_interleave(
        torch.arange(len(n_from), device=device, dtype=torch.int64),
        torch.tensor(list(n_from), device=device, dtype=torch.int64), output_size=n_wire)
    wire_row, slot = (experts >= 0).nonzero(as_tuple=True)  # row-major: by wire row, then slot
    local = placement.local_index[experts[wire_row, slot]]
    # Wire rows are already in (source rank, source token) order, so (j, wire_row) is the contract's order.
    order = torch.argsort(local * max(n_wire, 1) + wire_row, stable=True)
    wire_row, slot, local = wire_row[order], slot[order], local[order]
    return Expansion(
        wire_row=wire_row,
        topk_idx=experts[wire_row, slot],
        topk_weights=weights[wire_row, slot],
        src_idx=meta[wire_row, 0],
        src_rank=wire_src_rank[wire_row],
        n_tokens_per_expert=count_per_expert(local, placement.n_local[rank]),
    )


def count_per_expert(local_index_of_rows: torch.Tensor, n_local: int) -> torch.Tensor:
    return torch.bincount(local_index_of_rows, minlength=n_local)[:n_local].to(torch.int64)


# ---------------------------------------------------------------------------------------- combine
def combine_keys(src_rank: torch.Tensor, src_idx: torch.Tensor) -> torch.Tensor:
    """One int64 key per row, ordered as (src_rank, src_idx); padding rows (src_rank < 0) sort last."""
    big = torch.iinfo(torch.int64).max
    return torch.where(src_rank >= 0, src_rank * KEY_STRIDE + src_idx, torch.full_like(src_rank, big))


@dataclass
class CombineGroups:
    """Rows of one expert rank grouped by destination token, groups in wire order (src_rank, src_idx)."""

    order: torch.Tensor  # [V'] rows sorted by key, stable (row order kept inside a group); padding dropped
    group: torch.Tensor  # [V'] group id of each sorted row
    occurrence: torch.Tensor  # [V'] position of the sorted row inside its group
    group_src_idx: torch.Tensor  # [G]
    group_src_rank: torch.Tensor  # [G]
    max_occurrence: int


def group_for_combine(src_rank: torch.Tensor, src_idx: torch.Tensor) -> CombineGroups:
    keys = combine_keys(src_rank, src_idx)
    n_real = int((src_rank >= 0).sum())
    sorted_keys, order = torch.sort(keys, stable=True)
    sorted_keys, order = sorted_keys[:n_real], order[:n_real]
    unique_keys, group_sizes = torch.unique_consecutive(sorted_keys, return_counts=True)
    group = torch.repeat_interleave(torch.arange(unique_keys.numel(), device=keys.device), group_sizes,
                                    output_size=n_real)
    starts = torch.cumsum(group_sizes, 0) - group_sizes
    occurrence = torch.arange(n_real, device=keys.device) - starts[group]
    return CombineGroups(order, group, occurrence, unique_keys % KEY_STRIDE, unique_keys // KEY_STRIDE,
                         int(group_sizes.max()) if group_sizes.numel() else 0)


def weighted_partials(y: torch.Tensor, weights: torch.Tensor, groups: CombineGroups) -> torch.Tensor:
    """Step 1 of docs/contract.md section 4: per group, the float32 sum of w*y in row order, cast to y's dtype.

    Sums run one occurrence at a time (each pass scatters into distinct groups), so the additions
    happen in row order on every device, bit for bit; products and sums are separate operations.
    """
    n_groups = groups.group_src_idx.numel()
    acc = torch.zeros(n_groups, y.shape[1], dtype=torch.float32, device=y.device)
    for k in range(groups.max_occurrence):
        sel = groups.occurrence == k
        rows = groups.order[sel]
        product = weights[rows].float().unsqueeze(1) * y[rows].float()
        target = groups.group[sel]
        acc[target] = acc[target] + product
    return acc.to(y.dtype)


def sum_partials(num_tokens: int, hidden: int, dtype, partials: torch.Tensor, partial_src_idx: torch.Tensor,
                 n_from_rank: Sequence[int]) -> torch.Tensor:
    """Step 2: combined[t] = float32 sum of t's partials in ascending expert-rank order, cast."""
    acc = torch.zeros(num_tokens, hidden, dtype=torch.float32, device=partials.device)
    start = 0
    for n in n_from_rank:
        if n:
            idx = partial_src_idx[start:start + n]
            acc[idx] = acc[idx] + partials[start:start + n].float()
        start += n
    return acc.to(dtype)
