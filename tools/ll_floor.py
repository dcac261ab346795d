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
With --world-size W > 1 the W ranks share cuda:0 (under MPS when its daemon runs, as in
`tools/gpu_check.sh mps`) and each replays the HBM traffic of its own share of a W-rank call at once
with the others, every repetition from one moment of the GPU's clock (the bench's `gpu_start_gate`):
  send bytes       the gather of the x rows this rank sends to other ranks (one per token and
                   destination), what its dispatch send writes into its peers' buffers
  recv bytes       the gather of T x K pair rows from a wire buffer of this rank's (token, rank) rows (by
                   symmetry about what it receives) into a C-row output, and the zeroing of the padding
  combine bytes    index_add_ of the T x K expert rows into one partial row per (token, rank), then of
                   those into the T output rows (bf16: the bytes, not the contract's bits)
  backend          the cuda backend's capacity-mode dispatch and combine of the same workload
It prints every rank's median and their largest, the floor under which W ranks' HBM traffic on one
GPU cannot go.
Usage: python3 tools/ll_floor.py [--tokens 128] [--hidden 7168] [--topk 8] [--experts 256] [--reps 50]
       [--world-size 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SPIN_CYCLES = 200_000  # as fuser_moe/bench.py: the host enqueues the replay while the GPU spins


def _time(torch, fn, reps: int, comm=None) -> float:
    """Median us of fn replayed as a CUDA graph; with comm (ranks sharing one GPU), every repetition
    starts at one agreed moment of the GPU's clock on every rank, else after a spin kernel."""
    from fuser_moe.bench import gpu_start_gate

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
        if comm is not None:
            gpu_start_gate(comm, comm.device)
        else:
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


def shared_body(comm, args):
    """W ranks on one GPU: each rank's share of the HBM traffic, all ranks at once (see the docstring)."""
    import torch

    from fuser_moe.executors import get_backend

    dev, world, rank = comm.device, comm.world_size, comm.rank
    gen = torch.Generator().manual_seed(rank)
    T, H, K, E = args.tokens, args.hidden, args.topk, args.experts
    C = -(-5 * T * K // 4)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).to(dev)
    idx = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :K].to(dev)
    w = torch.softmax(torch.randn(T, K, generator=gen), dim=1).to(dev)
    dest = idx // (E // world)  # [T, K], the default placement
    wanted = torch.zeros(T, world, dtype=torch.bool, device=dev)
    wanted.scatter_(1, dest, True)
    pairs = wanted.nonzero()  # (token, rank), one a token and destination, in token order
    send_rows = pairs[pairs[:, 1] != rank, 0]
    lookup = torch.full((T, world), -1, dtype=torch.int64, device=dev)
    lookup[pairs[:, 0], pairs[:, 1]] = torch.arange(pairs.shape[0], device=dev)
    pair_rows = lookup.gather(1, dest).reshape(-1)  # each (token, k) pair's wire row
    sent = torch.empty(send_rows.shape[0], H, dtype=x.dtype, device=dev)
    wire = torch.randn(pairs.shape[0], H, generator=gen).to(torch.bfloat16).to(dev)
    recv = torch.empty(C, H, dtype=x.dtype, device=dev)
    y = torch.randn(T * K, H, generator=gen).to(torch.bfloat16).to(dev)
    partials = torch.empty(pairs.shape[0], H, dtype=x.dtype, device=dev)
    out = torch.empty(T, H, dtype=x.dtype, device=dev)

    def send_bytes():
        torch.index_select(x, 0, send_rows, out=sent)

    def recv_bytes():
        torch.index_select(wire, 0, pair_rows, out=recv[:T * K])
        recv[T * K:].zero_()

    def dispatch_bytes():
        send_bytes()
        recv_bytes()

    def combine_bytes():
        partials.zero_()
        partials.index_add_(0, pair_rows, y)
        out.zero_()
        out.index_add_(0, pairs[:, 0], partials)

    backend = get_backend("cuda")
    holder = {}

    def dispatch():
        holder["d"] = backend.dispatch(comm, x, idx, w, num_experts=E, max_recv_tokens=C, check_inputs=False)

    mb = lambda rows: rows * H * 2 / 1e6  # noqa: E731
    cases = [("send bytes", send_bytes, f"{mb(send_rows.shape[0]):.1f} MB written a rank"),
             ("recv bytes", recv_bytes, f"{mb(T * K + C):.1f} MB moved a rank"),
             ("dispatch bytes", dispatch_bytes, "send and recv bytes"),
             ("combine bytes", combine_bytes, f"{mb(2 * T * K + 2 * pairs.shape[0] + T):.1f} MB moved a rank")]
    mine = [(name, _time(torch, fn, args.reps, comm), note) for name, fn, note in cases]
    mine.append(("backend dispatch", _time(torch, dispatch, args.reps, comm), "cuda backend, capacity mode"))
    d = holder["d"]

    def combine():
        backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                        d.n_tokens_from_rank, T, check_inputs=False)

    mine.append(("backend combine", _time(torch, combine, args.reps, comm), "cuda backend, capacity mode"))
    every = comm.exchange([us for _, us, _ in mine])
    if rank != 0:
        return None
    lines = [f"floors of {world} ranks on one {torch.cuda.get_device_name(dev)}: T={T} H={H} K={K} E={E} C={C} "
             f"bf16 a rank, CUDA graph replays from one moment of the GPU's clock, median of {args.reps} (us)",
             f"{'case':18s}" + "".join(f"{'rank ' + str(r):>9s}" for r in range(world)) + f"{'largest':>9s}"]
    for i, (name, _, note) in enumerate(mine):
        values = [row[i] for row in every]
        lines.append(f"{name:18s}" + "".join(f"{v:9.1f}" for v in values) + f"{max(values):9.1f}   ({note})")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--world-size", type=int, default=1, help="ranks sharing cuda:0 (> 1: each rank's share)")
    args = p.parse_args()
    from fuser_moe.launch import spawn

    if args.world_size > 1:
        print(spawn(shared_body, args.world_size, (args,), device="cuda:0", timeout_s=300)[0])
    else:
        print(spawn(body, 1, (args,), device="cuda", timeout_s=300)[0])


if __name__ == "__main__":
    main()
