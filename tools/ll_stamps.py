"""A timeline of the low-latency path's kernels: when each phase starts and ends, on one GPU.

Compiles kernels/ll.cu with FM_LL_STAMPS (its phase stamps: for each point, the first and the last
%globaltimer at which a block passed it), runs capacity-mode dispatch + combine on the cuda backend
(W ranks, every rank on cuda:0 when --shared, else one GPU a rank), and prints rank 0's median over the
repetitions of each stamp's first and last time, in microseconds from the dispatch send's first stamp.
The stamps cost a few atomics a block, so the figures are a little above the uninstrumented kernels';
%globaltimer's resolution on the GPU sets their grain.

With --graph the two ops are captured in one CUDA graph and replayed, so the receive kernels start
as the bench's graph mode starts them (programmatic launches beside their send kernels).

With --shared and W > 1 every rank's kernels run on one GPU, whose %globaltimer they all read: each
repetition starts on every rank at one agreed moment of that clock (the bench's `gpu_start_gate`),
and it also prints each rank's marks against the earliest rank's dispatch send start of the same
repetition: when its send started, when its dispatch and its combine took their last tickets (the
skew that is left between the ranks' launches, and who waits for whom).

Usage: python3 tools/ll_stamps.py [--tokens 128] [--hidden 7168] [--topk 8] [--experts 256] [--reps 20]
       [--world-size 1] [--shared] [--graph]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The stamp points of kernels/ll.cu (FM_LL_STAMP(i)), by number.
POINTS = {
    0: "dispatch send: start", 1: "dispatch send: tables set", 2: "dispatch send: slots counted",
    3: "dispatch send: positions known", 4: "dispatch send: rows written", 5: "dispatch send: arrival added",
    8: "dispatch recv: start", 24: "dispatch recv: tables set", 25: "dispatch recv: slots counted",
    26: "dispatch recv: positions known", 9: "dispatch recv: flags seen", 13: "dispatch recv: heads read",
    14: "dispatch recv: counts summed", 15: "dispatch recv: experts scanned", 10: "dispatch recv: offsets known",
    11: "dispatch recv: rows expanded", 12: "dispatch recv: ticket taken",
    16: "combine send: start", 17: "combine send: partials written", 18: "combine send: arrival added",
    20: "combine recv: start", 21: "combine recv: flags seen", 22: "combine recv: rows reduced",
    23: "combine recv: ticket taken",
}
COUNT = 32  # kernels/ll.cu FM_LL_STAMP_COUNT


def body(comm, args):
    import torch

    from fuser_moe.backends.transport import _cuda, nvrtc
    from fuser_moe.bench import gpu_start_gate
    from fuser_moe.executors import get_backend

    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(torch.bfloat16).to(comm.device)
    idx = torch.rand(args.tokens, args.experts, generator=gen).argsort(dim=1)[:, :args.topk].to(comm.device)
    w = torch.softmax(torch.randn(args.tokens, args.topk, generator=gen), dim=1).to(comm.device)
    capacity = args.capacity or -(-5 * args.tokens * args.topk // 4)
    backend = get_backend("cuda")

    def step():
        d = backend.dispatch(comm, x, idx, w, num_experts=args.experts, max_recv_tokens=capacity,
                             check_inputs=False)
        backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                        d.n_tokens_from_rank, args.tokens, check_inputs=False)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    run = step
    if args.graph:
        # One CUDA graph of dispatch + combine, replayed: the kernels as the bench's graph mode has them
        # (programmatic launches included), with no host launch between them.
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            step()
        graph.replay()
        torch.cuda.synchronize()
        run = graph.replay
    d = _cuda.driver()
    path = str(nvrtc.resolve_source("ll.cu"))
    module = nvrtc._modules[(path, comm.device.index)]
    first_ptr, first_size = _cuda.call(d.cuModuleGetGlobal(module, b"fm_ll_stamp_first"), "cuModuleGetGlobal")
    last_ptr, last_size = _cuda.call(d.cuModuleGetGlobal(module, b"fm_ll_stamp_last"), "cuModuleGetGlobal")
    host = torch.empty(2, COUNT, dtype=torch.int64, device=comm.device)
    starts_ptr, starts_size = _cuda.call(d.cuModuleGetGlobal(module, b"fm_ll_block_start"), "cuModuleGetGlobal")
    starts = torch.empty(starts_size // 8, dtype=torch.int64, device=comm.device)
    runs, block_starts = [], []
    for _ in range(args.reps):
        comm.barrier()
        torch.cuda.synchronize()
        _cuda.call(d.cuMemsetD8(first_ptr, 0xFF, first_size), "cuMemsetD8")
        _cuda.call(d.cuMemsetD8(last_ptr, 0, last_size), "cuMemsetD8")
        _cuda.call(d.cuMemsetD8(starts_ptr, 0, starts_size), "cuMemsetD8")
        torch.cuda.synchronize()
        if args.shared and comm.world_size > 1:
            gpu_start_gate(comm, comm.device)  # every rank's run starts at one moment of the GPU's clock
        else:
            comm.barrier()
        run()
        torch.cuda.synchronize()
        _cuda.call(d.cuMemcpyDtoD(host[0].data_ptr(), first_ptr, first_size), "cuMemcpyDtoD")
        _cuda.call(d.cuMemcpyDtoD(host[1].data_ptr(), last_ptr, last_size), "cuMemcpyDtoD")
        torch.cuda.synchronize()
        _cuda.call(d.cuMemcpyDtoD(starts.data_ptr(), starts_ptr, starts_size), "cuMemcpyDtoD")
        torch.cuda.synchronize()
        runs.append(host.cpu().tolist())
        block_starts.append([v for v in starts.cpu().tolist() if v])
    # Every rank's marks in %globaltimer ns (None where a point was not reached): dispatch send start,
    # dispatch recv ticket, combine send start, combine recv ticket.
    def mark(r, i, last):
        value = r[1][i] if last else r[0][i]
        return None if r[0][i] == -1 or r[1][i] == 0 else value

    marks = [(mark(r, 0, False), mark(r, 12, True), mark(r, 16, False), mark(r, 23, True)) for r in runs]
    if comm.rank != 0:
        return {"text": None, "marks": marks}
    lines = [f"low-latency path stamps{' (CUDA graph)' if args.graph else ''}, rank 0 of {comm.world_size}: T={args.tokens} H={args.hidden} "
             f"K={args.topk} E={args.experts} C={capacity} bf16; median of {args.reps} (us from the first stamp)",
             f"{'point':36s} {'first':>8s} {'last':>8s}"]
    for i, name in POINTS.items():
        firsts = [(r[0][i] - r[0][0]) / 1e3 for r in runs if r[0][i] != -1 and r[1][i] != 0]
        lasts = [(r[1][i] - r[0][0]) / 1e3 for r in runs if r[0][i] != -1 and r[1][i] != 0]
        if firsts:
            lines.append(f"{name:36s} {statistics.median(firsts):8.2f} {statistics.median(lasts):8.2f}")
    # When the dispatch receive's blocks began, against the dispatch send's last arrival (median run).
    late = []
    for r, b in zip(runs, block_starts):
        if b and r[1][5] != 0:
            late.append(sum(1 for v in b if v > r[1][5]))
    if late and block_starts[0]:
        offsets = sorted((v - runs[0][0][0]) / 1e3 for v in block_starts[0])
        lines.append(f"dispatch recv blocks: {len(block_starts[0])}; begun after the send's last arrival: median "
                     f"{statistics.median(late)} a run; first run's block starts (us): "
                     + " ".join(f"{v:.1f}" for v in offsets[:: max(1, len(offsets) // 16)]))
    return {"text": "\n".join(lines), "marks": marks}


def skew_table(marks_by_rank: list) -> str:
    """Each rank's marks against the earliest dispatch send start of the same repetition (ranks sharing
    one GPU read one %globaltimer), median over repetitions, in us; then each rank's own spans, from its
    own send start to its own last ticket, per op (the median of a difference, not a difference of the
    medians: with skew that varies between repetitions the two differ).

    marks_by_rank[r][i]: rank r's (dispatch send start, dispatch recv ticket, combine send start,
    combine recv ticket) of repetition i, in ns, None where a point was not reached."""
    names = ("dispatch send start", "dispatch recv ticket", "combine send start", "combine recv ticket")
    spans = (("dispatch own", 0, 1), ("combine own", 2, 3))
    lines = ["ranks on one GPU, us from the earliest rank's dispatch send start of each repetition (median), and "
             "each rank's own send start to last ticket (median):",
             f"{'rank':6s}" + "".join(f"{n:>22s}" for n in names) + "".join(f"{n:>14s}" for n, _, _ in spans)]
    reps = min(len(m) for m in marks_by_rank)
    earliest = [min((m[i][0] for m in marks_by_rank if m[i][0] is not None), default=None) for i in range(reps)]
    for rank, marks in enumerate(marks_by_rank):
        cells = []
        for j in range(len(names)):
            values = [(marks[i][j] - earliest[i]) / 1e3 for i in range(reps)
                      if earliest[i] is not None and marks[i][j] is not None]
            cells.append(f"{statistics.median(values):22.2f}" if values else f"{'-':>22s}")
        for _, begin, end in spans:
            values = [(marks[i][end] - marks[i][begin]) / 1e3 for i in range(reps)
                      if marks[i][begin] is not None and marks[i][end] is not None]
            cells.append(f"{statistics.median(values):14.2f}" if values else f"{'-':>14s}")
        lines.append(f"{rank:<6d}" + "".join(cells))
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--capacity", type=int, default=None, help="max_recv_tokens (default 1.25 T K, as the bench)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--shared", action="store_true", help="every rank on cuda:0")
    p.add_argument("--graph", action="store_true", help="replay dispatch + combine as one CUDA graph")
    args = p.parse_args()
    defines = os.environ.get("FUSER_MOE_KERNEL_DEFINES", "").split()
    os.environ["FUSER_MOE_KERNEL_DEFINES"] = " ".join(defines + ["FM_LL_STAMPS"])
    os.environ.setdefault("FUSER_MOE_LL", "1")
    from fuser_moe.launch import spawn

    reports = spawn(body, args.world_size, (args,), device="cuda:0" if args.shared else "cuda", timeout_s=300)
    print(reports[0]["text"])
    if args.shared and args.world_size > 1:
        print(skew_table([r["marks"] for r in reports]))


if __name__ == "__main__":
    main()
