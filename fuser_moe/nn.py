"""`MoELayer`: a drop-in `torch.nn.Module` for expert-parallel MoE, trained through fuser_moe.

Router (a linear map, softmax in float32, top-k, weights renormalised to sum to one), dispatch, SwiGLU
experts held as grouped-GEMM weights of this rank's local experts only (the placement decides which),
and combine. Gradients reach the router through the dispatch's and combine's weight gradients, and
the experts through the re-dispatched output gradient (docs/contract.md section 11). `backward()` must
run on every rank of the group; the router's gradient is per rank (all-reduce it, as for any
replicated parameter, e.g. with DDP or `torch.distributed.all_reduce`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from fuser_moe.backends.communicator import Communicator
from fuser_moe.backends.routing import placement_list
from fuser_moe.functional import moe_combine, moe_dispatch


def expert_weights(expert: int, hidden: int, ffn: int, seed: int, dtype=torch.float32):
    """The initial (w_gate [H, F], w_up [H, F], w_down [F, H]) of one expert: a function of (seed, expert)
    only, so that every rank, and a single-process model, draw the same weights for the same expert."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 7919 * expert + 1)
    w_gate = torch.randn(hidden, ffn, generator=gen) / hidden ** 0.5
    w_up = torch.randn(hidden, ffn, generator=gen) / hidden ** 0.5
    w_down = torch.randn(ffn, hidden, generator=gen) / ffn ** 0.5
    return w_gate.to(dtype), w_up.to(dtype), w_down.to(dtype)


def router_weight(num_experts: int, hidden: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003)
    return (torch.randn(num_experts, hidden, generator=gen) / hidden ** 0.5).to(dtype)


class MoELayer(nn.Module):
    """Expert-parallel SwiGLU MoE layer: y = sum_k w_k * expert_{e_k}(x) over the top-k experts of each token.

    Args:
        hidden: H, the model width. ffn: F, the experts' intermediate size.
        num_experts: E, experts in all (over every rank). top_k: K, experts per token.
        group: a `torch.distributed` process group to run on; or
        communicator: a fuser_moe `Communicator` (default: the one `fd.execute` would pick).
        backend: "auto", "nccl" or "cuda".
        expert_to_rank: optional [E] placement (contiguous blocks by default).
        capacity: max_recv_tokens C (capacity mode: static shapes, no host synchronisation in the
            communication, torch.compile traces without a graph break); None: exact sizes.
        dtype: parameter and activation dtype (float32, bfloat16 or float16). device: where they live.
        seed: initial weights are drawn per expert from (seed, expert), see `expert_weights`.
        normalize: renormalise the top-k softmax weights of each token to sum to one.
    Forward: x [..., H] -> [..., H] of x's dtype.
    Parameters: router.weight [E, H]; w_gate [E_local, H, F], w_up [E_local, H, F], w_down [E_local, F, H],
        the weights of `self.local_experts` (global ids, ascending).
    """

    def __init__(self, hidden: int, ffn: int, num_experts: int, top_k: int, group=None,
                 communicator: Optional[Communicator] = None, backend: str = "auto",
                 expert_to_rank: Optional[Sequence[int]] = None, capacity: Optional[int] = None,
                 dtype=torch.float32, device=None, seed: int = 0, normalize: bool = True):
        super().__init__()
        if top_k < 1 or top_k > num_experts:
            raise ValueError(f"MoELayer: top_k must be in [1, num_experts={num_experts}], got {top_k}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        if communicator is None:
            communicator = (Communicator(group=group, device=device) if group is not None
                            else Communicator.from_environment(device=device))
        self.communicator = communicator
        self.hidden, self.ffn, self.num_experts, self.top_k = hidden, ffn, num_experts, top_k
        self.backend, self.capacity, self.normalize = backend, capacity, normalize
        self.expert_to_rank = None if expert_to_rank is None else [int(r) for r in expert_to_rank]
        placement = placement_list(num_experts, communicator.world_size, self.expert_to_rank)
        self.local_experts = [e for e in range(num_experts) if placement[e] == communicator.rank]
        self.router = nn.Linear(hidden, num_experts, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            self.router.weight.copy_(router_weight(num_experts, hidden, seed, dtype))
        weights = [expert_weights(e, hidden, ffn, seed, dtype) for e in self.local_experts]
        n = len(self.local_experts)

        def stacked(i, shape):
            if not weights:
                return torch.empty((0,) + shape, dtype=dtype, device=device)
            return torch.stack([w[i] for w in weights]).to(device)

        self.w_gate = nn.Parameter(stacked(0, (hidden, ffn)))
        self.w_up = nn.Parameter(stacked(1, (hidden, ffn)))
        self.w_down = nn.Parameter(stacked(2, (ffn, hidden)))
        assert self.w_gate.shape[0] == n
        # global expert id -> local position (-1 elsewhere); capacity padding rows map to -1 as well
        local_index = torch.full((num_experts + 1,), -1, dtype=torch.int64)
        for j, e in enumerate(self.local_experts):
            local_index[e] = j
        self.register_buffer("_local_index", local_index.to(device), persistent=False)

    def route(self, x: torch.Tensor):
        """(topk_idx [T, K] int64, topk_weights [T, K] float32) of tokens x [T, H]."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, idx = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return idx, weights

    def _comm_kwargs(self) -> dict:
        return dict(num_experts=self.num_experts, communicator=self.communicator, backend=self.backend,
                    expert_to_rank=self.expert_to_rank, max_recv_tokens=self.capacity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, self.hidden)
        idx, weights = self.route(tokens)
        d = moe_dispatch(tokens, idx, weights, **self._comm_kwargs())
        y = self.experts(d.recv_x, d.recv_topk_idx, d.n_tokens_per_expert)
        out = moe_combine(y, d, idx, **self._comm_kwargs())
        return out.reshape(shape)

    def experts(self, recv_x: torch.Tensor, recv_topk_idx: torch.Tensor,
                n_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """SwiGLU of each received row by its local expert: rows come grouped by local expert, with the
        counts `n_tokens_per_expert`; rows past them (capacity padding) give zeros."""
        if torch.compiler.is_compiling():
            return self._experts_masked(recv_x, recv_topk_idx)
        sizes = n_tokens_per_expert.tolist()
        pieces, start = [], 0
        for j, n in enumerate(sizes):
            if n:
                rows = recv_x[start:start + n]
                h = torch.nn.functional.silu(rows @ self.w_gate[j]) * (rows @ self.w_up[j])
                pieces.append(h @ self.w_down[j])
            start += n
        if start < recv_x.shape[0]:
            pieces.append(recv_x.new_zeros(recv_x.shape[0] - start, self.hidden))
        if not pieces:
            return recv_x.new_zeros(recv_x.shape[0], self.hidden) + 0 * recv_x.sum()
        return torch.cat(pieces)

    def _experts_masked(self, recv_x: torch.Tensor, recv_topk_idx: torch.Tensor) -> torch.Tensor:
        """The same with static shapes (every local expert over every row, masked): what torch.compile traces."""
        local = self._local_index[torch.where(recv_topk_idx >= 0, recv_topk_idx, self.num_experts)]
        out = recv_x.new_zeros(recv_x.shape[0], self.hidden)
        for j in range(len(self.local_experts)):
            h = torch.nn.functional.silu(recv_x @ self.w_gate[j]) * (recv_x @ self.w_up[j])
            out = out + (local == j).unsqueeze(1).to(recv_x.dtype) * (h @ self.w_down[j])
        return out


def reference_moe(x: torch.Tensor, router: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor,
                  w_down: torch.Tensor, top_k: int, normalize: bool = True) -> torch.Tensor:
    """The same layer in one process with every expert, in plain torch (the oracle of tests and `train`).

    Args: x [T, H]; router [E, H]; w_gate, w_up [E, H, F]; w_down [E, F, H]. Returns [T, H].
    """
    probs = torch.softmax((x @ router.t()).float(), dim=-1)
    weights, idx = probs.topk(top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(router.shape[0]):
        token, slot = (idx == e).nonzero(as_tuple=True)
        if token.numel():
            rows = x[token]
            y = (torch.nn.functional.silu(rows @ w_gate[e]) * (rows @ w_up[e])) @ w_down[e]
            out = out.index_add(0, token, weights[token, slot].unsqueeze(1).to(x.dtype) * y)
    return out
