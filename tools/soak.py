"""Soak test: thousands of dispatch + combine rounds per backend, checked and watched for leaks.

Starts `--world-size` ranks on this host (CPU ranks, or one rank per GPU with --device cuda), runs
`fuser_moe.soak.soak_rank` on each: after a warm-up, `--rounds` rounds per backend with random T
(0 included), H, K, E, placement, dtypes, routing skew and capacity mode, each compared bit for bit
with the reference, and every `--fault-every`-th round a bad input on one rank that every rank must
reject. Prints what it ran and what it measured per backend and rank: rounds, faults injected,
mismatches, RSS, open fds, threads, shared-memory segments (named and mapped), GPU memory, before
(after warm-up) and after. Exits 1 on any mismatch, wrong error, abort or leak, 2 on bad options.

Usage: python3 tools/soak.py [--rounds 2000] [--world-size 2] [--device cpu|cuda] [--backends nccl,cuda]
                             [--seed 0] [--max-tokens 12] [--fault-every 20] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# NVLink multicast can put a shared host's GPUs out of service: off, whatever the environment says.
for _name, _value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                      "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_name] = _value


def main(argv=None) -> int:
    from fuser_moe.launch import RankFailure, spawn, too_few_gpus
    from fuser_moe.soak import SoakConfig, format_reports, soak_rank, verdict

    p = argparse.ArgumentParser(prog="tools/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2000, help="rounds per backend after the warm-up")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--backends", default="nccl,cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=12, help="T per rank is drawn from [0, this]")
    p.add_argument("--fault-every", type=int, default=20, help="a bad input every n rounds (0: never)")
    p.add_argument("--rss-slack-mb", type=float, default=16.0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before stuck ranks are stopped")
    p.add_argument("--collective-timeout", type=float, default=60.0, help="the group's timeout (seconds)")
    p.add_argument("--json", default=None, help="write every rank's reports to this file")
    args = p.parse_args(argv)
    backends = tuple(b for b in args.backends.split(",") if b)
    if args.rounds < 1 or args.world_size < 1 or not backends or set(backends) - {"nccl", "cuda"}:
        print("tools/soak.py: need --rounds >= 1, --world-size >= 1 and --backends from nccl,cuda", file=sys.stderr)
        return 2
    why = too_few_gpus(args.device, args.world_size)
    if why:
        print(f"tools/soak.py: {why}", file=sys.stderr)
        return 2
    cfg = SoakConfig(rounds=args.rounds, backends=backends, seed=args.seed, max_tokens=args.max_tokens,
                     fault_every=args.fault_every, rss_slack_mb=args.rss_slack_mb)
    start = time.monotonic()
    try:
        per_rank = spawn(soak_rank, args.world_size, (cfg,), device=args.device, timeout_s=args.timeout,
                         collective_timeout_s=args.collective_timeout)
    except RankFailure as exc:
        print(f"tools/soak.py: a rank failed:\n{exc}", file=sys.stderr)
        return 1
    print(format_reports(per_rank, cfg, args.world_size, args.device))
    rounds = sum(r["rounds"] + r["warmup_rounds"] for r in per_rank[0])
    faults = sum(r["faults_injected"] for r in per_rank[0])
    failures = verdict(per_rank)
    print(f"soak: {rounds} rounds on each of {args.world_size} ranks ({faults} with a fault injected) in "
          f"{time.monotonic() - start:.0f} s: " + ("PASS" if not failures else f"FAIL ({len(failures)} problem(s))"))
    for line in failures:
        print(f"  {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "ranks": per_rank, "failures": failures}, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
