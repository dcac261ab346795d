"""The contract's semantics for all ranks in one process, written plainly (docs/contract.md sections 3-5).

This is the oracle every backend is compared with, bit for bit. It is deliberately independent of
`fuser_moe.backends.routing`: loops over tokens, slots and rows, in the order the contract states, so
that a mistake in the shared routing arithmetic shows up as a difference instead of being copied here.
Only the placement check (`placement_list`) is shared, because it is a check, not arithmetic.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fuser_moe.backends.common import DispatchOutputs
from fuser_moe.backends.payload import ScaledDispatchOutputs
from fuser_moe.backends.routing import placement_list


def reference_dispatch(xs: Sequence[torch.Tensor], topk_idxs: Sequence[torch.Tensor],
                       topk_weights: Sequence[torch.Tensor], num_experts: int,
                       expert_to_rank: Optional[Sequence[int]] = None,
                       max_recv_tokens: Optional[int] = None,
                       x_scales: Optional[Sequence[torch.Tensor]] = None) -> list:
    """Dispatch for every rank at once.

    Args:
        xs, topk_idxs, topk_weights: per rank r, x [T_r, H], topk_idx [T_r, K], topk_weights [T_r, K].
        num_experts: E. expert_to_rank: optional placement. max_recv_tokens: capacity C (pads with -1).
        x_scales: per rank r, the scales [T_r, ceil(H / 128)] float32 of an fp8 x (docs/contract.md
            section 12); each row's scales go with it.
    Returns: one `DispatchOutputs` per rank, on the CPU; with x_scales one `ScaledDispatchOutputs`, whose
        recv_x_scales [V, ceil(H / 128)] is row-aligned with recv_x (zeros on capacity padding, like recv_x).
    """
    world = len(xs)
    placement = placement_list(num_experts, world, expert_to_rank)
    local_experts = [[e for e in range(num_experts) if placement[e] == d] for d in range(world)]
    hidden, dtype = xs[0].shape[1], xs[0].dtype
    idxs = [t.long().cpu().tolist() for t in topk_idxs]
    ws = [t.cpu() for t in topk_weights]

    n_to = [[0] * world for _ in range(world)]  # n_to[s][d]
    for s in range(world):
        for row in idxs[s]:
            for d in sorted({placement[e] for e in row if e >= 0}):
                n_to[s][d] += 1

    results = []
    for d in range(world):
        rows = []  # (local j, src rank, src token, expert, weight)
        for j, e in enumerate(local_experts[d]):
            for s in range(world):
                for t, row in enumerate(idxs[s]):
                    for k, picked in enumerate(row):
                        if picked == e:
                            rows.append((j, s, t, e, ws[s][t, k]))
        v = len(rows)
        recv_x = torch.empty(v, hidden, dtype=dtype)
        for i, (_, s, t, _, _) in enumerate(rows):
            recv_x[i] = xs[s][t].cpu()
        if x_scales is not None:
            blocks = x_scales[0].shape[1]
            recv_scales = torch.empty(v, blocks, dtype=torch.float32)
            for i, (_, s, t, _, _) in enumerate(rows):
                recv_scales[i] = x_scales[s][t].cpu()
        per_expert = [0] * len(local_experts[d])
        for j, *_ in rows:
            per_expert[j] += 1
        out = DispatchOutputs(
            recv_x=recv_x,
            recv_topk_idx=torch.tensor([r[3] for r in rows], dtype=torch.int64),
            recv_topk_weights=torch.stack([r[4] for r in rows]) if rows else torch.empty(0, dtype=torch.float32),
            recv_src_idx=torch.tensor([r[2] for r in rows], dtype=torch.int64),
            recv_src_rank=torch.tensor([r[1] for r in rows], dtype=torch.int64),
            n_tokens_to_rank=torch.tensor(n_to[d], dtype=torch.int64),
            n_tokens_from_rank=torch.tensor([n_to[s][d] for s in range(world)], dtype=torch.int64),
            n_tokens_per_expert=torch.tensor(per_expert, dtype=torch.int64),
        )
        if max_recv_tokens is not None:
            if v > max_recv_tokens:
                raise RuntimeError(f"capacity overflow on rank {d}: needed {v}, given {max_recv_tokens}")
            pad = max_recv_tokens - v
            out = out._replace(
                recv_x=torch.cat([out.recv_x, torch.zeros(pad, hidden, dtype=dtype)]),
                recv_topk_idx=torch.cat([out.recv_topk_idx, torch.full((pad,), -1, dtype=torch.int64)]),
                recv_topk_weights=torch.cat([out.recv_topk_weights, torch.zeros(pad, dtype=torch.float32)]),
                recv_src_idx=torch.cat([out.recv_src_idx, torch.full((pad,), -1, dtype=torch.int64)]),
                recv_src_rank=torch.cat([out.recv_src_rank, torch.full((pad,), -1, dtype=torch.int64)]),
            )
            if x_scales is not None:
                recv_scales = torch.cat([recv_scales, torch.zeros(pad, blocks, dtype=torch.float32)])
        if x_scales is not None:
            out = ScaledDispatchOutputs(*out, recv_x_scales=recv_scales)
        results.append(out)
    return results


def reference_combine(ys: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], src_idxs: Sequence[torch.Tensor],
                      src_ranks: Sequence[torch.Tensor], num_tokens: Sequence[int]) -> list[torch.Tensor]:
    """Combine for every rank at once, with the rounding points of docs/contract.md section 4.

    Args: per expert rank e, y [V_e, H] expert outputs, weights [V_e], src_idx [V_e], src_rank [V_e];
        num_tokens: T of every source rank.
    Returns: per source rank, combined_x [T, H] in y's dtype, on the CPU.
    """
    world = len(ys)
    hidden, dtype = ys[0].shape[1], ys[0].dtype
    # partial[s][e] = {t: float32 sum in row order, cast to dtype}
    partials: list[list[dict]] = [[{} for _ in range(world)] for _ in range(world)]
    for e in range(world):
        y, w = ys[e].cpu(), weights[e].cpu()
        acc: dict = {}
        for i, (t, s) in enumerate(zip(src_idxs[e].tolist(), src_ranks[e].tolist())):
            if s < 0:
                continue
            product = w[i].float() * y[i].float()
            acc[(s, t)] = acc[(s, t)] + product if (s, t) in acc else torch.zeros(hidden) + product
        for (s, t), total in acc.items():
            partials[s][e][t] = total.to(dtype)
    out = []
    for s in range(world):
        combined = torch.zeros(num_tokens[s], hidden, dtype=torch.float32)
        for t in range(num_tokens[s]):
            for e in range(world):
                if t in partials[s][e]:
                    combined[t] = combined[t] + partials[s][e][t].float()
        out.append(combined.to(dtype))
    return out
