"""The command line: `fuser-moe demo`, `fuser-moe bench` and `fuser-moe train` (also `python -m fuser_moe ...`).

Without a launcher both start their ranks themselves (4 CPU ranks, or one rank per GPU for the
benchmark); under torchrun, SLURM or Open MPI they run on the launcher's ranks, one per process.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from fuser_moe.backends.communicator import detect_launcher


class _FORMAT(argparse.HelpFormatter):
    """Help that shows every option's default (argparse's own formatter skips options without help)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
                and "%(default)" not in text:
            text = (text + " " if text else "") + "(default: %(default)s)"
        return text


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="run a SwiGLU MoE layer and compare it with a single-process computation",
        formatter_class=_FORMAT,
        description="Runs a SwiGLU MoE layer (dispatch, three grouped GEMMs, combine) written with "
                    "FusionDefinition on every rank, prints the host IR and the trace, and compares the output "
                    "with the same layer computed in one process in float32. Without a launcher it starts "
                    "--world-size ranks itself; under torchrun, SLURM or Open MPI it runs on theirs. The exit "
                    "code is the verdict: 0 when the difference is at the dtype's rounding level, 1 above it "
                    "or when a rank fails, 2 for bad options.")
    p.add_argument("--backend", choices=["auto", "nccl", "cuda"], default="auto",
                   help="backend of both communication nodes (auto: per node, the trace says why)")
    p.add_argument("--world-size", type=int, default=4, help="ranks to start when no launcher started us")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the ranks compute (cuda: a GPU a rank)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per rank")
    p.add_argument("--hidden", type=int, default=128, help="hidden size H")
    p.add_argument("--ffn", type=int, default=256, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=16, help="experts in all (a multiple of the ranks)")
    p.add_argument("--topk", type=int, default=2, help="experts per token")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                   help="dtype of the tokens and the weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the inputs and the weights")
    p.add_argument("--no-trace", action="store_true", help="do not record or print the trace")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before stuck ranks are stopped")


def demo_option_problem(args, world_size: int):
    """The first problem with the demo's options for `world_size` ranks, as one line, or None."""
    for name in ("tokens", "hidden", "ffn", "experts", "topk"):
        if getattr(args, name) < 1:
            return f"--{name} must be >= 1, got {getattr(args, name)}"
    if args.topk > args.experts:
        return f"--topk {args.topk} exceeds --experts {args.experts}"
    if world_size < 1:
        return f"--world-size must be >= 1, got {world_size}"
    if args.experts % world_size:
        return (f"--experts {args.experts} must be a multiple of the {world_size} ranks (experts sit in contiguous "
                f"blocks of E / W per rank)")
    if args.timeout <= 0:
        return f"--timeout must be positive, got {args.timeout:g}"
    return None


def run_demo_command(args) -> int:
    from fuser_moe.demo import DemoConfig, demo_passed, format_report, run_demo

    names = {f.name for f in fields(DemoConfig)}
    cfg = DemoConfig(**{k: v for k, v in vars(args).items() if k in names}, trace=not args.no_trace)
    launch = detect_launcher()
    under_launcher = launch is not None  # torchrun & co., one process a rank (a world of one included)
    problem = demo_option_problem(args, launch.world_size if under_launcher else args.world_size)
    if problem:
        if not under_launcher or launch.rank == 0:
            print(f"fuser-moe demo: {problem}", file=sys.stderr)
        return 2
    if under_launcher:
        from fuser_moe.backends.communicator import Communicator

        comm = Communicator.from_environment(device=args.device)
        try:
            report = run_demo(comm, cfg)
            reports = comm.all_gather_object(report)
        finally:
            comm.close()
        if launch.rank == 0:
            print(format_report(reports, cfg, launch.world_size, args.device))
        return 0 if demo_passed(reports, cfg) else 1
    from fuser_moe.launch import RankFailure, spawn, too_few_gpus

    why = too_few_gpus(args.device, args.world_size)
    if why:
        print(f"fuser-moe demo: {why}", file=sys.stderr)
        return 2
    try:
        reports = spawn(run_demo, args.world_size, (cfg,), device=args.device, timeout_s=args.timeout)
    except RankFailure as exc:
        print(f"fuser-moe demo failed:\n{exc}", file=sys.stderr)
        return 1
    print(format_report(reports, cfg, args.world_size, args.device))
    return 0 if demo_passed(reports, cfg) else 1


def _bench_parser(sub) -> None:
    from fuser_moe.bench import BASELINES, BACKENDS, DECODE_TOKENS, DEFAULT_SWEEP, MODES, STANDARD_TOKENS, WORKLOADS

    p = sub.add_parser(
        "bench", help="time dispatch and combine per backend, mode and T (docs/contract.md section 10)",
        formatter_class=_FORMAT,
        description="Times MoeDispatch and MoeCombine of the nccl and cuda backends in exact, capacity and "
                    "CUDA-graph mode on the standard (T=4096), decode (T=128) and sweep workloads, with the "
                    "all_to_all_single and all_to_all_vdev_2d baselines, and fp8 dispatch (e4m3 with "
                    "per-128-column scales) on the standard and decode workloads; checks every result against "
                    "the reference first. Progress goes to stderr, the tables to stdout, the "
                    "results to OUT/bench.json and OUT/bench.png.")
    p.add_argument("--device", type=_bench_device, default="cuda", metavar="{cpu,cuda,cuda:N}",
                   help="cuda: one rank per GPU; cuda:N: every rank on GPU N (the cuda backend only for W > 1: "
                        "NCCL refuses two ranks on one GPU, so the nccl backend and the NCCL baselines are "
                        "skipped; start the MPS daemon to run the ranks' kernels at once); cpu: Gloo and "
                        "shared-memory ranks")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks to start (default: every GPU with cuda, 1 with cuda:N, 4 CPU ranks)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="which of standard, decode, sweep to run")
    p.add_argument("--tokens", type=int, default=STANDARD_TOKENS, help="T of the standard workload")
    p.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS, help="T of the decode workload")
    p.add_argument("--sweep", default=DEFAULT_SWEEP,
                   help="T values of the sweep: LO:HI (the powers of two in between), A,B,C, or none")
    p.add_argument("--hidden", type=int, default=7168, help="hidden size H")
    p.add_argument("--topk", type=int, default=8, help="experts per token")
    p.add_argument("--experts", type=int, default=256, help="experts in all (a multiple of the ranks)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16", help="dtype of x")
    p.add_argument("--backends", default=",".join(BACKENDS), help="which backends to time")
    p.add_argument("--modes", default=",".join(MODES),
                   help="of exact, capacity, graph (graph: capacity mode in a CUDA graph)")
    p.add_argument("--baselines", default=",".join(BASELINES), help=f"of {', '.join(BASELINES)}, or none")
    p.add_argument("--capacity", type=int, default=None,
                   help="max_recv_tokens for every T (default: from the routing, see --capacity-factor)")
    p.add_argument("--capacity-factor", type=float, default=1.25,
                   help="C = max(factor * T * K, most pairs a rank receives), rounded up to 16")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument("--reps", type=int, default=20, help="timed calls per measurement (the median is reported)")
    p.add_argument("--seed", type=int, default=0, help="seed of the routing and the tokens")
    p.add_argument("--no-check", action="store_true", help="skip the bitwise check against the nccl backend")
    p.add_argument("--no-fp8", action="store_true",
                   help="skip the fp8 dispatch rows (e4m3 x with per-128-column scales; variants fp8 and "
                        "fp8+quantize) that the standard and decode workloads get")
    p.add_argument("--out", default=None, help="folder for bench.json and bench.png (default ./fuser_moe_bench)")
    p.add_argument("--json", default=None, help="results file (default OUT/bench.json)")
    p.add_argument("--plot", default=None, help="plot file (default: the JSON's name with .png)")
    p.add_argument("--no-plot", action="store_true", help="write no plot")
    p.add_argument("--plot-from", default=None, metavar="JSON",
                   help="measure nothing: reprint the tables of an earlier run and redraw its plot")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before stuck ranks are stopped")
    p.add_argument("--symm-mem-timeout", type=float, default=240.0,
                   help="seconds for the all_to_all_vdev_2d phase (its own processes)")


def _bench_device(text: str) -> str:
    """argparse type of the bench's --device: `fuser_moe.bench.parse_device`, its error as argparse's (exit 2)."""
    from fuser_moe.bench import parse_device

    try:
        return parse_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str, allowed: tuple, what: str) -> tuple:
    names = tuple(n.strip() for n in text.split(",") if n.strip() and n.strip() != "none")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)} (choose from {', '.join(allowed)})")
    return names


def _bench_config(args):
    from fuser_moe.bench import BASELINES, BACKENDS, MODES, WORKLOADS, BenchConfig, parse_sweep

    chosen = _names(args.workloads, WORKLOADS, "workload")
    workloads = {}
    if "standard" in chosen:
        workloads["standard"] = [args.tokens]
    if "decode" in chosen:
        workloads["decode"] = [args.decode_tokens]
    if "sweep" in chosen:
        workloads["sweep"] = parse_sweep(args.sweep)
    if not any(workloads.values()):
        raise ValueError("no token count to measure: choose --workloads or a non-empty --sweep")
    if min(t for values in workloads.values() for t in values) < 1:
        raise ValueError("token counts must be >= 1")
    if args.reps < 1 or args.warmup < 0:
        raise ValueError("--reps must be >= 1 and --warmup >= 0")
    if args.topk > args.experts or args.topk < 1:
        raise ValueError(f"--topk {args.topk} must be in [1, --experts {args.experts}]")
    if args.capacity is not None and args.capacity < 1:
        raise ValueError("--capacity must be >= 1")
    return BenchConfig(hidden=args.hidden, topk=args.topk, experts=args.experts, dtype=args.dtype,
                       workloads=workloads, backends=_names(args.backends, BACKENDS, "backend"),
                       modes=_names(args.modes, MODES, "mode"), baselines=_names(args.baselines, BASELINES, "baseline"),
                       capacity=args.capacity, capacity_factor=args.capacity_factor, warmup=args.warmup,
                       reps=args.reps, seed=args.seed, check=not args.no_check, fp8=not args.no_fp8,
                       progress=not args.quiet)


def _bench_paths(args) -> tuple:
    json_path = args.json or os.path.join(args.out or "fuser_moe_bench", "bench.json")
    plot_path = args.plot or os.path.splitext(json_path)[0] + ".png"
    return json_path, plot_path


def _bench_outputs(document: dict, json_path: str, plot_path: str, draw: bool) -> int:
    from fuser_moe import bench_report

    if json_path:
        bench_report.write_json(document, json_path)
        print(f"fuser-moe bench: wrote {json_path}", file=sys.stderr)
    if draw:
        print(f"fuser-moe bench: {bench_report.plot(document, plot_path)}", file=sys.stderr)
    print(bench_report.format_report(document), flush=True)
    return 1 if bench_report.failures(document) else 0


def run_bench_command(args) -> int:
    from fuser_moe import bench_report
    from fuser_moe.bench import disable_multicast, run_benchmark, run_under_launcher

    if args.plot_from:
        try:
            document = bench_report.load(args.plot_from)
        except (OSError, ValueError) as exc:
            print(f"fuser-moe bench: cannot read {args.plot_from}: {exc}", file=sys.stderr)
            return 2
        plot_path = args.plot or os.path.splitext(args.plot_from)[0] + ".png"
        return _bench_outputs(document, None, plot_path, not args.no_plot)
    try:
        cfg = _bench_config(args)
    except ValueError as exc:
        print(f"fuser-moe bench: {exc}", file=sys.stderr)
        return 2
    json_path, plot_path = _bench_paths(args)
    cfg.json_path = json_path
    disable_multicast()
    launch = detect_launcher()
    if launch is not None and launch.world_size > 1:
        if args.device.startswith("cuda:"):
            if launch.rank == 0:
                print(f"fuser-moe bench: --device {args.device} puts the ranks the bench starts itself on one GPU; "
                      f"under a launcher ({launch.world_size} ranks) each rank takes the GPU of its local rank: use "
                      "--device cuda, or run without the launcher", file=sys.stderr)
            return 2
        if args.experts % launch.world_size:
            print(f"fuser-moe bench: --experts {args.experts} is not a multiple of the {launch.world_size} ranks",
                  file=sys.stderr)
            return 2
        document = run_under_launcher(cfg, args.device)
        if launch.rank != 0:
            return 0
        return _bench_outputs(document, json_path, plot_path, not args.no_plot)
    from fuser_moe.bench import device_problem
    from fuser_moe.launch import RankFailure

    if args.device.startswith("cuda"):
        import torch

        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        world = args.world_size if args.world_size is not None else (visible if args.device == "cuda" else 1)
    else:
        visible, world = 0, args.world_size if args.world_size is not None else 4
    problem = device_problem(args.device, world, visible)
    if problem:
        print(f"fuser-moe bench: {problem}", file=sys.stderr)
        return 2
    if args.experts % world:
        print(f"fuser-moe bench: --experts {args.experts} is not a multiple of the {world} ranks", file=sys.stderr)
        return 2
    try:
        document = run_benchmark(cfg, args.device, world, args.timeout, args.symm_mem_timeout)
    except RankFailure as exc:
        print(f"fuser-moe bench failed:\n{exc}", file=sys.stderr)
        if json_path and os.path.exists(json_path):
            print(f"fuser-moe bench: the results measured before the failure are in {json_path}", file=sys.stderr)
        return 1
    return _bench_outputs(document, json_path, plot_path, not args.no_plot)


def _train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a small MoE model over expert parallelism and compare it with one process")
    p.add_argument("--backend", choices=["auto", "nccl", "cuda"], default="auto")
    p.add_argument("--world-size", type=int, default=4, help="ranks to start when no launcher started us")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--tokens", type=int, default=32, help="tokens per rank and step")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--ffn", type=int, default=64, help="expert intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--capacity", type=int, default=None, help="max_recv_tokens (capacity mode); exact sizes if unset")
    p.add_argument("--plot", default="fuser_moe_train_loss.png", help="where to write the loss plot (PNG)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds before stuck ranks are stopped")


def main(argv=None) -> int:
    from fuser_moe import __version__

    parser = argparse.ArgumentParser(
        prog="fuser-moe", formatter_class=_FORMAT,
        description="fuser_moe: expert-parallel MoE host-IR runtime. `fuser-moe COMMAND --help` describes "
                    "each command.")
    parser.add_argument("--version", action="version", version=f"fuser-moe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _demo_parser(sub)
    _bench_parser(sub)
    _train_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_demo_command(args)
        if args.command == "bench":
            return run_bench_command(args)
        if args.command == "train":
            from fuser_moe.train import run_train_command

            return run_train_command(args)
    except KeyboardInterrupt:
        print("fuser-moe: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
