"""Where the time of one dispatch + combine goes, per backend, on this machine's GPUs.

Starts one rank per GPU, warms up, then on every rank records a torch.profiler trace of a few
iterations; rank 0 prints the CUDA-time table of its own trace and a host-side phase breakdown.
Usage: python3 tools/profile_backend.py [--backends cuda,nccl] [--tokens 4096] [--capacity C] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def body(comm, args):
    import torch
    from torch.profiler import ProfilerActivity, profile

    from types import SimpleNamespace

    from fuser_moe.executors import get_backend

    cfg = SimpleNamespace(tokens=args.tokens, hidden=args.hidden, topk=args.topk, experts=args.experts)
    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(torch.bfloat16).to(comm.device)
    idx = torch.rand(cfg.tokens, cfg.experts, generator=gen).argsort(dim=1)[:, :cfg.topk].to(comm.device)
    w = torch.softmax(torch.randn(cfg.tokens, cfg.topk, generator=gen), dim=1).to(comm.device)
    report = []
    for name in args.backends.split(","):
        backend = get_backend(name)

        def step():
            d = backend.dispatch(comm, x, idx, w, num_experts=cfg.experts, max_recv_tokens=args.capacity,
                                 check_inputs=False)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            out = backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                  d.n_tokens_to_rank, d.n_tokens_from_rank, cfg.tokens, check_inputs=False)
            torch.cuda.synchronize()
            return t1, time.perf_counter()

        for _ in range(5):
            step()
        walls = []
        for _ in range(5):
            comm.barrier()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            t1, t2 = step()
            walls.append(((t1 - t0) * 1e3, (t2 - t1) * 1e3))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
        if comm.rank == 0:
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows)
            report.append(f"===== {name}: host wall ms (dispatch, combine) per iteration: "
                          f"{[(round(a, 3), round(b, 3)) for a, b in walls]}\n{table}")
            if args.out:
                os.makedirs(args.out, exist_ok=True)
                prof.export_chrome_trace(os.path.join(args.out, f"profile_{name}_rank0.json"))
    return "\n".join(report)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backends", default="cuda,nccl")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--capacity", type=int, default=None)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    import torch

    from fuser_moe.launch import spawn

    reports = spawn(body, torch.cuda.device_count(), (args,), device="cuda", timeout_s=400)
    print(reports[0])


if __name__ == "__main__":
    main()
