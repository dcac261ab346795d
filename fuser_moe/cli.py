"""The command line: `fuser-moe demo` (and `python -m fuser_moe demo`).

Without a launcher the demo starts its ranks itself (4 CPU ranks by default); under torchrun, SLURM
or Open MPI it runs on the launcher's ranks, one per process.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from fuser_moe.backends.communicator import detect_launcher


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="run a SwiGLU MoE layer and compare it with a single-process computation")
    p.add_argument("--backend", choices=["auto", "nccl", "cuda"], default="auto")
    p.add_argument("--world-size", type=int, default=4, help="ranks to start when no launcher started us")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=256, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-trace", action="store_true", help="do not record or print the trace")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before stuck ranks are stopped")


def run_demo_command(args) -> int:
    from fuser_moe.demo import DemoConfig, format_report, run_demo

    names = {f.name for f in fields(DemoConfig)}
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in names}, trace=not args.no_trace)
    if args.topk > args.experts:
        print(f"fuser-moe demo: --topk {args.topk} exceeds --experts {args.experts}", file=sys.stderr)
        return 2
    launch = detect_launcher()
    if launch is not None and launch.world_size > 1:
        from fuser_moe.backends.communicator import Communicator

        comm = Communicator.from_environment(device=args.device)
        try:
            report = run_demo(comm, cfg)
            reports = comm.all_gather_object(report)
        finally:
            comm.close()
        if launch.rank == 0:
            print(format_report(reports, cfg, launch.world_size, args.device))
        return 0
    from fuser_moe.launch import RankFailure, spawn

    if args.device == "cuda":
        import torch

        if torch.cuda.device_count() < args.world_size:
            print(f"fuser-moe demo: --world-size {args.world_size} needs that many GPUs; "
                  f"{torch.cuda.device_count()} visible", file=sys.stderr)
            return 2
    try:
        reports = spawn(run_demo, args.world_size, (cfg,), device=args.device, timeout_s=args.timeout)
    except RankFailure as exc:
        print(f"fuser-moe demo failed:\n{exc}", file=sys.stderr)
        return 1
    print(format_report(reports, cfg, args.world_size, args.device))
    return 0


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="time dispatch and combine per backend (SPEC.md section 10)")
    p.add_argument("--world-size", type=int, default=None, help="ranks to start (default: all GPUs, or 4 CPUs)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    p.add_argument("--backends", default="nccl,cuda")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    p.add_argument("--capacity", type=int, default=None, help="max_recv_tokens (capacity mode)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-check", action="store_true", help="skip the bitwise check against the nccl backend")
    p.add_argument("--json", default=None, help="write every rank's samples to this file")
    p.add_argument("--timeout", type=float, default=900.0)


def run_bench_command(args) -> int:
    from fuser_moe.bench import BenchConfig, format_table, run_bench, write_json

    cfg = BenchConfig(tokens=args.tokens, hidden=args.hidden, topk=args.topk, experts=args.experts, dtype=args.dtype,
                      backends=tuple(b for b in args.backends.split(",") if b), capacity=args.capacity,
                      warmup=args.warmup, reps=args.reps, check=not args.no_check)
    launch = detect_launcher()
    if launch is not None and launch.world_size > 1:
        from fuser_moe.backends.communicator import Communicator

        comm = Communicator.from_environment(device=args.device)
        try:
            results = comm.all_gather_object(run_bench(comm, cfg))
        finally:
            comm.close()
        world = launch.world_size
        if launch.rank != 0:
            return 0
    else:
        from fuser_moe.launch import RankFailure, spawn

        if args.device == "cuda":
            import torch

            world = args.world_size or torch.cuda.device_count()
            if world < 1 or torch.cuda.device_count() < world:
                print(f"fuser-moe bench: {world} ranks need that many GPUs; {torch.cuda.device_count()} visible",
                      file=sys.stderr)
                return 2
        else:
            world = args.world_size or 4
        try:
            results = spawn(run_bench, world, (cfg,), device=args.device, timeout_s=args.timeout)
        except RankFailure as exc:
            print(f"fuser-moe bench failed:\n{exc}", file=sys.stderr)
            return 1
    mode = f"capacity {cfg.capacity}" if cfg.capacity else "exact"
    print(f"fuser-moe bench: W={world} {args.device}, T={cfg.tokens}, H={cfg.hidden}, K={cfg.topk}, "
          f"E={cfg.experts}, {cfg.dtype}, {mode} mode, median of {cfg.reps} after {cfg.warmup} warm-up")
    print(format_table(results))
    if args.json:
        write_json(results, cfg, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fuser-moe", description="fuser_moe: expert-parallel MoE host-IR runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo_command(args)
        if args.command == "bench":
            return run_bench_command(args)
    except KeyboardInterrupt:
        print("fuser-moe: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
