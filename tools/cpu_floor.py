"""Floors of the nccl backend's CPU dispatch and combine, against the backend itself, in one run.

Starts W CPU ranks (Gloo, one process a rank, as `fuser-moe bench --device cpu` does), builds the bench's
routing (standard normal x, random top-k), and times each case the way the bench does (a barrier, then
the call; median over calls of each rank, median over ranks), with the all-to-all of the same rows as
the unit:
  a2a              all_to_all_single of the de-duplicated x rows with the dispatch's split sizes (the
                   bench's baseline); "combine a2a" is the reverse collective
  counts           the count rows' all-to-all alone (W x (W + E + 1) int64 words): what the dispatch
                   pays beyond the a2a before its rows can travel (the receivers need their split sizes)
  dispatch floor   what the backend's dispatch cannot do without, as bare torch: the count rows'
                   all-to-all, the gather of x rows into the send buffer, the all-to-all of the rows and
                   the expansion's copy into a fresh [V, H] output, with the routing precomputed
  combine floor    a copy of one row per group into the partial buffer (a sum reads more), the reverse
                   all-to-all, a copy of one partial per token into a fresh [T, H] output
  nccl             the backend's dispatch and combine (unchecked, the handle passed, as the bench does)
Usage: python tools/cpu_floor.py [--world-size 4] [--tokens 512] [--hidden 1024] [--experts 32]
       [--topk 4] [--reps 30]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def body(comm, args):
    import torch

    from fuser_moe.backends import routing
    from fuser_moe.executors import get_backend

    world, rank = comm.world_size, comm.rank
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(torch.bfloat16)
    idx = torch.rand(args.tokens, args.experts, generator=gen).argsort(dim=1)[:, :args.topk]
    w = torch.softmax(torch.randn(args.tokens, args.topk, generator=gen), dim=1)
    nccl = get_backend("nccl")

    def dispatch():
        return nccl.dispatch(comm, x, idx, w, num_experts=args.experts, check_inputs=False, return_handle=True)

    d, handle = dispatch()
    y = d.recv_x.clone()
    n_to, n_from = handle.n_to, handle.n_from
    placement = routing.make_placement(args.experts, world, None, "cpu")
    counts = routing.count_row(idx, placement)
    token = routing.send_rows(counts).token
    row_to = counts.row.unsqueeze(0).expand(world, -1).contiguous()
    rows_from = torch.empty_like(row_to)
    send = x[token].contiguous()
    recv = torch.empty(sum(n_from), args.hidden, dtype=x.dtype)
    back = torch.empty(sum(n_to), args.hidden, dtype=x.dtype)
    wire_row = handle.wire_row
    first_row = torch.full((sum(n_from),), 0, dtype=torch.int64)  # one row of each group
    first_row[wire_row.flip(0)] = torch.arange(wire_row.numel() - 1, -1, -1)
    first_partial = torch.zeros(args.tokens, dtype=torch.int64)  # one partial of each token
    first_partial[handle.send_token.flip(0)] = torch.arange(handle.send_token.numel() - 1, -1, -1)
    partials = torch.empty(sum(n_from), args.hidden, dtype=x.dtype)

    def a2a():
        comm.all_to_all_single(recv, send, n_from, n_to)

    def counts_a2a():
        comm.all_to_all_single(rows_from, row_to)

    def dispatch_floor():
        comm.all_to_all_single(rows_from, row_to)
        torch.index_select(x, 0, token, out=send)
        comm.all_to_all_single(recv, send, n_from, n_to)
        return torch.index_select(recv, 0, wire_row)

    def combine_a2a():
        comm.all_to_all_single(back, recv, n_to, n_from)

    def combine_floor():
        torch.index_select(y, 0, first_row, out=partials)
        comm.all_to_all_single(back, partials, n_to, n_from)
        return torch.index_select(back, 0, first_partial)

    def combine():
        return nccl.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                            d.n_tokens_to_rank, d.n_tokens_from_rank, args.tokens, check_inputs=False,
                            handle=handle)

    cases = [("dispatch a2a", a2a), ("dispatch counts", counts_a2a), ("dispatch floor", dispatch_floor),
             ("dispatch nccl", dispatch),
             ("combine a2a", combine_a2a), ("combine floor", combine_floor), ("combine nccl", combine)]
    medians = {}
    for _round in range(2):  # two alternations of every case, the median of both rounds' samples
        for name, fn in cases:
            for _ in range(3):
                fn()
            samples = medians.setdefault(name, [])
            for _ in range(args.reps):
                comm.barrier()
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
    return {name: statistics.median(samples) * 1e3 for name, samples in medians.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--reps", type=int, default=30)
    args = p.parse_args()
    from fuser_moe.launch import spawn

    per_rank = spawn(body, args.world_size, (args,), device="cpu", timeout_s=600)
    print(f"nccl backend on {args.world_size} CPU ranks, T={args.tokens} H={args.hidden} E={args.experts} "
          f"K={args.topk} bf16: ms, median over ranks of each rank's median of {2 * args.reps} calls")
    for op in ("dispatch", "combine"):
        unit = statistics.median(r[f"{op} a2a"] for r in per_rank)
        for case in ("a2a", "counts", "floor", "nccl"):
            if f"{op} {case}" not in per_rank[0]:
                continue
            value = statistics.median(r[f"{op} {case}"] for r in per_rank)
            print(f"  {op:8s} {case:6s} {value:8.2f} ms  {value / unit:5.2f}x the a2a   ranks: "
                  + " ".join(f"{r[f'{op} {case}']:.2f}" for r in per_rank))


if __name__ == "__main__":
    main()
