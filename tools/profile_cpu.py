"""Where the time of one dispatch and one combine goes on CPU ranks, stage by stage.

Starts W CPU ranks (Gloo and shared memory, one thread a rank, as `fuser-moe bench --device cpu` does),
warms up, then times each call and each stage of it on every rank: the routing plan's functions
(routing.py), the collectives and the shared-memory barriers are wrapped with a wall-clock timer for
the timed calls only. Rank 0 prints, per backend and op, the median over calls of each stage's time
(median over ranks too), and what is left between the stages ("other": Python, host reads, small ops).
With --ops it also prints torch.profiler's table of rank 0's ops, with --pyprof cProfile's table of its
Python functions.

Usage: python tools/profile_cpu.py [--backends nccl,cuda] [--tokens 512] [--hidden 1024] [--experts 32]
       [--topk 4] [--world-size 4] [--iters 20] [--ops] [--pyprof]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The routing plan's stages (routing.py) and the transports' waits that are timed.
ROUTING_STAGES = ("count_row", "pair_ranks", "place_pairs", "send_rows", "wire_meta", "wire_meta_rows", "wire_buffer",
                  "expand", "group_rows",
                  "weighted_sums", "weighted_partials", "sum_partials")


class _Timers:
    """Wall time per stage, summed over the stages' calls within one backend call."""

    def __init__(self):
        self.on = False
        self.depth = 0
        self.current: dict = defaultdict(float)
        self.cpu: dict = defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            if not self.on or self.depth:
                return fn(*args, **kwargs)  # a stage inside a stage counts once, in the outer one
            self.depth += 1
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current[name] += time.perf_counter() - t0
                self.cpu[name] += time.thread_time() - c0
                self.depth -= 1
        return timed

    def take(self) -> tuple:
        """(wall s, this thread's CPU s) per stage since the last take."""
        got = dict(self.current), dict(self.cpu)
        self.current, self.cpu = defaultdict(float), defaultdict(float)
        return got


def body(comm, args):
    import torch

    from fuser_moe.backends import routing
    from fuser_moe.backends.communicator import Communicator
    from fuser_moe.backends.transport.shm import ShmTransport
    from fuser_moe.executors import get_backend

    timers = _Timers()
    for name in ROUTING_STAGES:
        setattr(routing, name, timers.wrap(name, getattr(routing, name)))
    Communicator.all_to_all_single = timers.wrap("all_to_all", Communicator.all_to_all_single)
    ShmTransport.barrier = timers.wrap("barrier", ShmTransport.barrier)

    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(torch.bfloat16)
    idx = torch.rand(args.tokens, args.experts, generator=gen).argsort(dim=1)[:, :args.topk]
    w = torch.softmax(torch.randn(args.tokens, args.topk, generator=gen), dim=1)
    per_case = {}
    op_tables = []
    for name in args.backends.split(","):
        backend = get_backend(name)

        def dispatch():
            return backend.dispatch(comm, x, idx, w, num_experts=args.experts, check_inputs=False,
                                    return_handle=True)

        def combine(d, handle):
            return backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                   d.n_tokens_to_rank, d.n_tokens_from_rank, args.tokens, check_inputs=False,
                                   handle=handle)

        for _ in range(5):
            combine(*dispatch())
        samples = {"dispatch": [], "combine": []}
        for _ in range(args.iters):
            for op in ("dispatch", "combine"):
                comm.barrier()
                timers.take()
                timers.on = True
                t0, c0 = time.perf_counter(), time.thread_time()
                if op == "dispatch":
                    d, handle = dispatch()
                else:
                    combine(d, handle)
                total, total_cpu = time.perf_counter() - t0, time.thread_time() - c0
                timers.on = False
                stages, cpu = timers.take()
                stages["other"], cpu["other"] = total - sum(stages.values()), total_cpu - sum(cpu.values())
                stages["total"], cpu["total"] = total, total_cpu
                samples[op].append({k: (v, cpu[k]) for k, v in stages.items()})
        per_case[name] = samples
        if args.ops:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    combine(*dispatch())
            if comm.rank == 0:
                op_tables.append(f"===== {name}: torch ops of rank 0, 5 x (dispatch + combine)\n"
                                 + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
        if args.pyprof:
            import cProfile
            import io
            import pstats

            with cProfile.Profile() as py:
                for _ in range(args.iters):
                    combine(*dispatch())
            if comm.rank == 0:
                text = io.StringIO()
                pstats.Stats(py, stream=text).sort_stats("tottime").print_stats(args.rows)
                op_tables.append(f"===== {name}: Python functions of rank 0 by own time, {args.iters} x "
                                 f"(dispatch + combine)\n" + text.getvalue())
    return per_case, op_tables


def _median_ms(values) -> float:
    return statistics.median(values) * 1e3 if values else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backends", default="nccl,cuda")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--ops", action="store_true", help="also print torch.profiler's op table of rank 0")
    p.add_argument("--pyprof", action="store_true",
                   help="also print cProfile's table of rank 0's Python functions (own time, torch ops included)")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()

    from fuser_moe.launch import spawn

    results = spawn(body, args.world_size, (args,), device="cpu", timeout_s=600)
    for name in args.backends.split(","):
        for op in ("dispatch", "combine"):
            names = sorted({k for per_case, _ in results for s in per_case[name][op] for k in s},
                           key=lambda k: (k in ("other", "total"), k == "total", k))
            print(f"{name} {op}: median ms over {args.iters} calls, median over {args.world_size} ranks: "
                  "wall (CPU of the rank's main thread)")
            for stage in names:
                wall, cpu = ([_median_ms([s.get(stage, (0.0, 0.0))[i] for s in per_case[name][op]])
                              for per_case, _ in results] for i in (0, 1))
                print(f"  {stage:18s} {statistics.median(wall):8.3f} ({statistics.median(cpu):7.3f})   ranks: "
                      + " ".join(f"{v:7.3f}" for v in wall))
    for table in results[0][1]:
        print(table)


if __name__ == "__main__":
    main()
