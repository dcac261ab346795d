"""Checked mode (docs/contract.md section 9): input checks shared by every backend.

Each function raises the error the contract names for the first problem it finds. Backends call them
inside `checked(comm, ...)`, which makes every rank raise when any rank's input is bad, before
anything travels, so that no rank is left waiting in a collective.
"""
from __future__ import annotations

import array
import zlib
from typing import Callable, Optional, Sequence

import torch

from .communicator import Communicator
from .routing import placement_list

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INDEX = (torch.int64, torch.int32)


def checked(comm: Communicator, check: Callable[[], object]):
    """Runs `check` on this rank and agrees with every peer; returns what `check` returned."""
    error: Optional[BaseException] = None
    result = None
    try:
        result = check()
    except (ValueError, TypeError, RuntimeError) as exc:
        error = exc
    comm.agree(error)
    return result


def validate_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, num_experts: int,
                      expert_to_rank: Optional[Sequence[int]], world_size: int) -> None:
    if x.dtype not in _FLOATS:
        raise TypeError(f"moe_dispatch: x must be float32, bfloat16 or float16, got {x.dtype}")
    if topk_idx.dtype not in _INDEX:
        raise TypeError(f"moe_dispatch: topk_idx must be int64 or int32, got {topk_idx.dtype}")
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"moe_dispatch: topk_weights must be float32, got {topk_weights.dtype}")
    if x.dim() != 2:
        raise ValueError(f"moe_dispatch: x must be 2-D [T, H], got shape {list(x.shape)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != x.shape[0]:
        raise ValueError(f"moe_dispatch: topk_idx must be [T, K] with T={x.shape[0]} (x is {list(x.shape)}), "
                         f"got {list(topk_idx.shape)}")
    if topk_weights.shape != topk_idx.shape:
        raise ValueError(f"moe_dispatch: topk_weights shape {list(topk_weights.shape)} does not match "
                         f"topk_idx shape {list(topk_idx.shape)}")
    if not (x.device == topk_idx.device == topk_weights.device):
        raise ValueError(f"moe_dispatch: tensors are on different devices: x on {x.device}, topk_idx on "
                         f"{topk_idx.device}, topk_weights on {topk_weights.device}")
    placement_list(num_experts, world_size, expert_to_rank)
    if topk_idx.numel() == 0:
        return
    idx = topk_idx.long()
    bad = (idx < -1) | (idx >= num_experts)
    if bool(bad.any()):
        t, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"moe_dispatch: topk_idx[{t}, {k}] = {int(idx[t, k])} is outside [-1, {num_experts}) "
                         f"(token {t})")
    sorted_idx, _ = torch.sort(idx, dim=1)
    dup = (sorted_idx[:, 1:] == sorted_idx[:, :-1]) & (sorted_idx[:, 1:] >= 0)
    if bool(dup.any()):
        t, k = (int(v) for v in dup.nonzero()[0])
        raise ValueError(f"moe_dispatch: token {t} picks expert {int(sorted_idx[t, k + 1])} twice in "
                         f"topk_idx[{t}] = {idx[t].tolist()}")


def validate_combine(x: torch.Tensor, topk_weights: torch.Tensor, src_idx: torch.Tensor, src_rank: torch.Tensor,
                     n_tokens_to_rank: torch.Tensor, n_tokens_from_rank: torch.Tensor, num_tokens: int,
                     world_size: int) -> None:
    """Checks of combine's own inputs; `validate_combine_sources` checks them against the peers'."""
    if x.dtype not in _FLOATS:
        raise TypeError(f"moe_combine: x must be float32, bfloat16 or float16, got {x.dtype}")
    if topk_weights.dtype != torch.float32:
        raise TypeError(f"moe_combine: topk_weights must be float32, got {topk_weights.dtype}")
    for name, t in (("src_idx", src_idx), ("src_rank", src_rank), ("n_tokens_to_rank", n_tokens_to_rank),
                    ("n_tokens_from_rank", n_tokens_from_rank)):
        if t.dtype != torch.int64:
            raise TypeError(f"moe_combine: {name} must be int64, got {t.dtype}")
    if x.dim() != 2:
        raise ValueError(f"moe_combine: x must be 2-D [V, H], got shape {list(x.shape)}")
    lengths = {"x": x.shape[0], "topk_weights": topk_weights.shape[0], "src_idx": src_idx.shape[0],
               "src_rank": src_rank.shape[0]}
    if any(t.dim() != 1 for t in (topk_weights, src_idx, src_rank)) or len(set(lengths.values())) != 1:
        raise ValueError(f"moe_combine: x, topk_weights, src_idx and src_rank must have one row each per "
                         f"received pair, got lengths {lengths} (shapes x {list(x.shape)}, topk_weights "
                         f"{list(topk_weights.shape)}, src_idx {list(src_idx.shape)}, src_rank {list(src_rank.shape)})")
    for name, t in (("n_tokens_to_rank", n_tokens_to_rank), ("n_tokens_from_rank", n_tokens_from_rank)):
        if list(t.shape) != [world_size]:
            raise ValueError(f"moe_combine: {name} must have shape [{world_size}] (the world size), got "
                             f"{list(t.shape)}")
    devices = {t.device for t in (x, topk_weights, src_idx, src_rank, n_tokens_to_rank, n_tokens_from_rank)}
    if len(devices) != 1:
        raise ValueError(f"moe_combine: tensors are on different devices: {sorted(map(str, devices))}")
    if not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"moe_combine: num_tokens must be a non-negative int, got {num_tokens!r}")
    real = src_rank >= 0
    bad_rank = (src_rank < -1) | (src_rank >= world_size)
    if bool(bad_rank.any()):
        v = int(bad_rank.nonzero()[0, 0])
        raise ValueError(f"moe_combine: src_rank[{v}] = {int(src_rank[v])} is outside [0, {world_size})")
    bad_idx = real & (src_idx < 0)
    if bool(bad_idx.any()):
        v = int(bad_idx.nonzero()[0, 0])
        raise ValueError(f"moe_combine: src_idx[{v}] = {int(src_idx[v])} is negative")


def validate_combine_sources(src_idx: torch.Tensor, src_rank: torch.Tensor, n_tokens_from_rank: torch.Tensor,
                             tokens_of_rank: Sequence[int], n_to_of_rank: Sequence[Sequence[int]],
                             rank: int) -> None:
    """Checks against what every peer said: src_idx within its source's num_tokens, counts consistent."""
    real = src_rank >= 0
    limit = torch.tensor(list(tokens_of_rank), dtype=torch.int64, device=src_idx.device)
    over = real & (src_idx >= limit[src_rank.clamp(min=0)])
    if bool(over.any()):
        v = int(over.nonzero()[0, 0])
        s = int(src_rank[v])
        raise ValueError(f"moe_combine: src_idx[{v}] = {int(src_idx[v])} is outside [0, num_tokens={tokens_of_rank[s]}) "
                         f"of its source rank {s}")
    n_from = n_tokens_from_rank.tolist()
    for s, row in enumerate(n_to_of_rank):
        if row[rank] != n_from[s]:
            raise ValueError(f"moe_combine: n_tokens_from_rank[{s}] = {n_from[s]} here, but rank {s} says it "
                             f"sent {row[rank]} tokens to rank {rank} (n_tokens_to_rank there)")


def check_combine_everywhere(comm: Communicator, x: torch.Tensor, topk_weights: torch.Tensor, src_idx: torch.Tensor,
                             src_rank: torch.Tensor, n_tokens_to_rank: torch.Tensor,
                             n_tokens_from_rank: torch.Tensor, num_tokens: int) -> list:
    """Checked mode of combine on every rank; returns every rank's num_tokens (rank order).

    Three agreements: this rank's own inputs; the inputs against what the peers said (hidden size,
    dtype, num_tokens of each source, counts); the distinct tokens per source against the counts.
    """
    world, rank = comm.world_size, comm.rank
    checked(comm, lambda: validate_combine(x, topk_weights, src_idx, src_rank, n_tokens_to_rank,
                                           n_tokens_from_rank, num_tokens, world))
    facts = comm.exchange((num_tokens, n_tokens_to_rank.tolist(), x.shape[1], str(x.dtype)))

    def against_peers():
        if len({(h, d) for _, _, h, d in facts}) != 1:
            raise ValueError(f"moe_combine: ranks disagree on hidden size or dtype: {[(h, d) for _, _, h, d in facts]}")
        validate_combine_sources(src_idx, src_rank, n_tokens_from_rank, [f[0] for f in facts],
                                 [f[1] for f in facts], rank)
        real = src_rank >= 0
        keys = torch.unique(src_rank[real] * (1 << 32) + src_idx[real])
        distinct = torch.bincount(keys >> 32, minlength=world)[:world].tolist()  # the source rank of each key
        n_from = n_tokens_from_rank.tolist()
        if distinct != n_from:
            raise ValueError(f"moe_combine: rows name {distinct} distinct tokens per source rank but "
                             f"n_tokens_from_rank is {n_from}")
    checked(comm, against_peers)
    return [f[0] for f in facts]


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16 (or its str), the way messages name dtypes."""
    return str(dtype).replace("torch.", "")


def shape_disagreement(top_ks: Sequence[int], hiddens: Sequence[int], dtypes: Sequence) -> Optional[str]:
    """The message of ranks that disagree on top-k, hidden size or dtype (rank order), or None when they agree.
    Both backends raise it, word for word."""
    names = [dtype_name(d) for d in dtypes]
    if len(set(top_ks)) == 1 and len(set(hiddens)) == 1 and len(set(names)) == 1:
        return None
    return (f"moe_dispatch: ranks disagree on top-k, hidden size or dtype: top-k per rank {list(top_ks)}, hidden "
            f"size per rank {list(hiddens)}, dtype per rank [{', '.join(names)}]")


def placement_checksum(num_experts: int, world_size: int, expert_to_rank: Optional[Sequence[int]]) -> int:
    """A checksum of the (checked) expert placement, the same on every rank that places experts alike
    (an explicit contiguous map and None included)."""
    placement = placement_list(num_experts, world_size, expert_to_rank)
    return zlib.crc32(array.array("q", placement).tobytes())


def capacity_disagreement(capacities: Sequence[Optional[int]]) -> Optional[str]:
    """The error message when ranks passed different `max_recv_tokens` (None: exact mode), or None.

    Every rank must pass the same capacity: the cuda backend lays out its receive buffers and picks its
    path by it on every rank alike (docs/contract.md section 5).
    """
    if len(set(capacities)) <= 1:
        return None
    return (f"moe_dispatch: ranks disagree on max_recv_tokens: per rank {list(capacities)} (None: exact mode); "
            "every rank must pass the same capacity")


def check_dispatch_everywhere(comm: Communicator, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                              num_experts: int, expert_to_rank: Optional[Sequence[int]],
                              max_recv_tokens: Optional[int] = None) -> None:
    """Checked mode of dispatch on every rank, with top-k, hidden size, dtype, the number of experts,
    their placement and the capacity agreed across ranks (ranks that disagree on the experts would route
    the same expert id to different ranks; on the capacity, lay out their buffers differently)."""
    checked(comm, lambda: validate_dispatch(x, topk_idx, topk_weights, num_experts, expert_to_rank,
                                            comm.world_size))
    facts = comm.exchange((topk_idx.shape[1], x.shape[1], str(x.dtype), num_experts,
                           placement_checksum(num_experts, comm.world_size, expert_to_rank), max_recv_tokens))

    def agree_on_shapes():
        problem = shape_disagreement([f[0] for f in facts], [f[1] for f in facts], [f[2] for f in facts])
        if problem:
            raise ValueError(problem)
        if len({f[3:5] for f in facts}) != 1:
            raise ValueError(f"moe_dispatch: ranks disagree on the experts: num_experts per rank "
                             f"{[f[3] for f in facts]}, placement checksum per rank {[f[4] for f in facts]}")
        problem = capacity_disagreement([f[5] for f in facts])
        if problem:
            raise ValueError(problem)
    checked(comm, agree_on_shapes)
