"""What every backend shares: the dispatch outputs, per-call statistics, and capacity-mode padding."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch

# dtype codes used when ranks compare what they are about to exchange
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class DispatchOutputs(NamedTuple):
    """The outputs of MoeDispatch on this rank (docs/contract.md section 3).

    recv_x: [V, H], x's dtype, one row per received (source token, local expert) pair.
    recv_topk_idx: [V] int64, global expert id of the row (-1 on capacity padding).
    recv_topk_weights: [V] float32, the source's weight for that (token, expert) (0 on padding).
    recv_src_idx: [V] int64, token index on the source rank (-1 on padding).
    recv_src_rank: [V] int64, source rank (-1 on padding).
    n_tokens_to_rank: [W] int64, distinct tokens this rank sends to each rank.
    n_tokens_from_rank: [W] int64, distinct tokens this rank receives from each rank.
    n_tokens_per_expert: [E_local] int64, rows of recv_x per local expert, in local-expert order.
    """

    recv_x: torch.Tensor
    recv_topk_idx: torch.Tensor
    recv_topk_weights: torch.Tensor
    recv_src_idx: torch.Tensor
    recv_src_rank: torch.Tensor
    n_tokens_to_rank: torch.Tensor
    n_tokens_from_rank: torch.Tensor
    n_tokens_per_expert: torch.Tensor


@dataclass
class CommStats:
    """What one call did, for traces: bytes to and from other ranks, and host synchronisations."""

    bytes_sent: int = 0  # payload rows and metadata that left this rank (self excluded)
    bytes_recv: int = 0
    host_syncs: int = 0
    sync_reasons: list = field(default_factory=list)
    num_sms: Optional[int] = None  # the SM budget the caller gave this call (None: what the protocol wants)
    sms: int = 0  # the most blocks any kernel of the call launched (more than the SMs: the rest queue)
    path: str = ""  # which protocol served the call ("general", "low-latency"; "" where only one exists)
    device_share: int = 1  # ranks of the group on this rank's GPU: each gets 1/device_share of its SMs

    def sync(self, reason: str) -> None:
        self.host_syncs += 1
        self.sync_reasons.append(reason)


def with_sm_budget(stats: Optional[CommStats], num_sms: Optional[int]) -> CommStats:
    """`stats` (a fresh CommStats when None) carrying the call's SM budget, checked."""
    stats = stats if stats is not None else CommStats()
    if num_sms is not None:
        if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms <= 0:
            raise ValueError(f"num_sms must be a positive int (the most SMs the call's kernels take), got {num_sms!r}")
        stats.num_sms = num_sms
    return stats


class DeviceCount:
    """A count the device computes (a one-element tensor) times a factor, read only when asked.

    `int()` reads it (a host synchronisation): traces do that once the run is over, so a call that is
    not traced never waits for it.
    """

    def __init__(self, count: torch.Tensor, factor: int = 1, offset: int = 0):
        self.count, self.factor, self.offset = count, int(factor), int(offset)

    def __int__(self) -> int:
        return int(self.count.item()) * self.factor + self.offset

    def __repr__(self) -> str:
        return f"DeviceCount(x{self.factor} + {self.offset})"


def pad_to_capacity(out: DispatchOutputs, capacity: Optional[int]) -> DispatchOutputs:
    """Capacity mode (docs/contract.md section 5): leading extent C, padding rows marked -1 with weight 0."""
    if capacity is None:
        return out
    v = out.recv_x.shape[0]
    if v > capacity:
        raise RuntimeError(f"moe_dispatch: capacity overflow: this rank receives {v} rows but "
                           f"max_recv_tokens={capacity}; needed capacity {v}, given {capacity}")
    pad = capacity - v

    def padded(t: torch.Tensor, fill) -> torch.Tensor:
        return torch.cat([t, torch.full((pad,) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device)])

    return out._replace(
        recv_x=padded(out.recv_x, 0),
        recv_topk_idx=padded(out.recv_topk_idx, -1),
        recv_topk_weights=padded(out.recv_topk_weights, 0.0),
        recv_src_idx=padded(out.recv_src_idx, -1),
        recv_src_rank=padded(out.recv_src_rank, -1),
    )
