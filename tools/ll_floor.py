"""Floors of the low-latency path's work on one GPU, timed the way `fuser-moe bench` times graph mode.

Each case is one CUDA graph, replayed after a spin kernel between two CUDA events (median of --reps):
  empty x1, x2     one and two empty kernels: the launch floor of a one- and a two-kernel op in a graph
  zero C rows      a memset of the C output rows: the write floor of the dispatch receive
  copy C rows      a device-to-device copy of C rows
  dispatch bytes   torch's gather of the V = T x K pair rows of x into a C-row output and the zeroing of
                   the C - V padding rows: the HBM traffic of the path's W=1 dispatch receive
  combine bytes    torch's gather of the V rows of y and their float32 sum per token, cast back: the
                   traffic of the W=1 combine receive (its own-term reduce), in three kernels
  backend          the cuda backend's capacity-mode dispatch and combine of the same workload (the
                   low-latency path), for the comparison in the same run
Usage: python3 tools/ll_floor.py [--tokens 128] [--hidden 7168] [--topk 8] [--experts 256] [--reps 50]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPIN_CYCLES = 200_000  # as fuser_moe/bench.py: the host enqueues the replay while the GPU spins


def _time(torch, fn, reps: int) -> float:
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        fn()
    for _ in range(5):
        graph.replay()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        torch.cuda._sleep(SPIN_CYCLES)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return statistics.median(samples)


def body(comm, args):
    import torch

    from fuser_moe.executors import get_backend

    dev = comm.device
    gen = torch.Generator().manual_seed(0)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    C = -(-5 * T * K // 4)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].to(dev)
    w = torch.softmax(torch.randn(T, K, generator=gen), dim=1).to(dev)
    rows = torch.arange(T, device=dev).repeat_interleave(K)[torch.randperm(T * K, generator=gen).to(dev)]
    recv = torch.empty(C, H, dtype=x.dtype, device=dev)
    y = torch.randn(C, H, generator=gen).to(torch.bfloat16).to(dev)
    order = torch.randperm(T * K, generator=gen).to(dev)
    out = torch.empty(T, H, dtype=x.dtype, device=dev)
    empty = torch.empty(1, device=dev)

    def two_empty():
        empty.add_(0)
        empty.add_(0)

    def one_empty():
        empty.add_(0)

    recv_copy = torch.empty_like(recv)

    def zero_rows():
        recv.zero_()

    def copy_rows():
        recv.copy_(recv_copy)

    def dispatch_bytes():
        torch.index_select(x, 0, rows, out=recv[:T * K])
        recv[T * K:].zero_()

    def combine_bytes():
        out.copy_(y.index_select(0, order).view(T, K, H).float().sum(1))

    backend = get_backend("cuda")
    holder = {}

    def dispatch():
        holder["d"] = backend.dispatch(comm, x, idx, w, num_experts=E, max_recv_tokens=C, check_inputs=False)

    lines = [f"floors on {torch.cuda.get_device_name(dev)}: T={T} H={H} K={K} E={E} C={C} bf16, "
             f"CUDA graph replays, median of {args.reps} (us)"]
    lines.append(f"{'empty x1':24s} {_time(torch, one_empty, args.reps):8.1f}")
    lines.append(f"{'empty x2':24s} {_time(torch, two_empty, args.reps):8.1f}")
    lines.append(f"{'zero C rows':24s} {_time(torch, zero_rows, args.reps):8.1f}   ({C * H * 2 / 1e6:.1f} MB written)")
    lines.append(f"{'copy C rows':24s} {_time(torch, copy_rows, args.reps):8.1f}   ({C * H * 2 / 1e6:.1f} MB read and written)")
    mb = (T * K * H * 2 + C * H * 2) / 1e6
    lines.append(f"{'dispatch bytes':24s} {_time(torch, dispatch_bytes, args.reps):8.1f}   ({mb:.1f} MB moved)")
    lines.append(f"{'combine bytes':24s} {_time(torch, combine_bytes, args.reps):8.1f}")
    dispatch_us = _time(torch, dispatch, args.reps)
    d = holder["d"]
    recv_x, recv_w, src_idx, src_rank = d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank

    def combine():
        backend.combine(comm, recv_x, recv_w, src_idx, src_rank, d.n_tokens_to_rank, d.n_tokens_from_rank, T,
                        check_inputs=False)

    lines.append(f"{'backend dispatch':24s} {dispatch_us:8.1f}")
    lines.append(f"{'backend combine':24s} {_time(torch, combine, args.reps):8.1f}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args()
    from fuser_moe.launch import spawn

    print(spawn(body, 1, (args,), device="cuda", timeout_s=300)[0])


if __name__ == "__main__":
    main()
