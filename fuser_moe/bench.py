"""`fuser-moe bench`: dispatch and combine timings per SPEC.md section 10.

Standard workload: T=4096 tokens per rank, H=7168, K=8, E=256, bfloat16, each token picking K distinct
experts uniformly at random; decode: the same with T=128. Every rank times the backend's dispatch and
combine with CUDA events (host clock on CPUs) after warm-up, the median over repetitions is reported,
and results are checked against the reference semantics before anything is timed.

Wire bytes: rows that leave the rank (self excluded) times H times the element size; DeepEP's
convention counts self rows too. GB/s are per rank, 1e9 bytes per second.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from fuser_moe.executors import get_backend

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class BenchConfig:
    tokens: int = 4096
    hidden: int = 7168
    topk: int = 8
    experts: int = 256
    dtype: str = "bfloat16"
    backends: tuple = ("nccl", "cuda")
    capacity: Optional[int] = None  # max_recv_tokens; None: exact mode
    warmup: int = 5
    reps: int = 20
    seed: int = 0
    check: bool = True


@dataclass
class BenchResult:
    backend: str
    op: str
    world_size: int
    tokens: int
    median_us: float
    min_us: float
    wire_bytes: int  # self excluded, payload only
    deepep_bytes: int  # self included
    wire_gbps: float = 0.0
    deepep_gbps: float = 0.0
    samples_us: list = field(default_factory=list)


def _routing(cfg: BenchConfig, rank: int, device):
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    x = torch.randn(cfg.tokens, cfg.hidden, generator=gen).to(_DTYPES[cfg.dtype])
    idx = torch.rand(cfg.tokens, cfg.experts, generator=gen).argsort(dim=1)[:, :cfg.topk]
    w = torch.softmax(torch.randn(cfg.tokens, cfg.topk, generator=gen), dim=1)
    return x.to(device), idx.to(device), w.to(device)


def _timer(device):
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end) * 1e3
    else:
        def timed(fn):
            t0 = time.perf_counter()
            out = fn()
            return out, (time.perf_counter() - t0) * 1e6
    return timed


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        a, b = a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    return torch.equal(a, b)


def _check(comm, name, got, expected) -> None:
    """Bitwise comparison with the NCCL backend's outputs, which the test suite holds to the reference."""
    d, out = got
    d_ref, out_ref = expected
    for field_name, a, b in zip(d._fields, d, d_ref):
        if not _same_bits(a, b):
            raise AssertionError(f"bench: backend {name} gives a different {field_name} than nccl on rank {comm.rank}")
    if not _same_bits(out, out_ref):
        raise AssertionError(f"bench: backend {name} gives a different combined_x than nccl on rank {comm.rank}")


def run_bench(comm, cfg: BenchConfig) -> list:
    """Rank body: times dispatch and combine for each backend; returns this rank's results as dicts."""
    device = comm.device
    x, idx, w = _routing(cfg, comm.rank, device)
    timed = _timer(device)
    results = []
    expected = None
    if cfg.check:
        nccl = get_backend("nccl")
        d_ref = nccl.dispatch(comm, x, idx, w, num_experts=cfg.experts, max_recv_tokens=cfg.capacity)
        out_ref = nccl.combine(comm, d_ref.recv_x, d_ref.recv_topk_weights, d_ref.recv_src_idx, d_ref.recv_src_rank,
                               d_ref.n_tokens_to_rank, d_ref.n_tokens_from_rank, cfg.tokens)
        expected = (d_ref, out_ref)
    for name in cfg.backends:
        backend = get_backend(name)
        if name == "cuda" and backend.unavailable_reason(device):
            continue

        def dispatch():
            return backend.dispatch(comm, x, idx, w, num_experts=cfg.experts, max_recv_tokens=cfg.capacity,
                                    check_inputs=False)

        d = dispatch()

        def combine():
            return backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                   d.n_tokens_to_rank, d.n_tokens_from_rank, cfg.tokens, check_inputs=False)

        out = combine()
        if expected is not None:
            _check(comm, name, (d, out), expected)
        n_to = d.n_tokens_to_rank.tolist()
        row = cfg.hidden * x.element_size()
        wire = (sum(n_to) - n_to[comm.rank]) * row
        deepep = sum(n_to) * row
        for op, fn in (("dispatch", dispatch), ("combine", combine)):
            for _ in range(cfg.warmup):
                fn()
            samples = []
            for _ in range(cfg.reps):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                comm.barrier()
                _, us = timed(fn)
                samples.append(us)
            med = statistics.median(samples)
            results.append(asdict(BenchResult(
                backend=name, op=op, world_size=comm.world_size, tokens=cfg.tokens, median_us=med,
                min_us=min(samples), wire_bytes=wire, deepep_bytes=deepep, wire_gbps=wire / med / 1e3,
                deepep_gbps=deepep / med / 1e3, samples_us=samples)))
    return results


def format_table(all_ranks: list) -> str:
    """Median over ranks of each rank's median; GB/s per rank."""
    rows = {}
    for rank_results in all_ranks:
        for r in rank_results:
            rows.setdefault((r["backend"], r["op"], r["tokens"]), []).append(r)
    lines = [f"{'backend':8} {'op':9} {'T':>6} {'median us':>10} {'wire GB/s':>10} {'DeepEP GB/s':>12} {'vs nccl':>8}"]
    for (backend, op, tokens), rs in sorted(rows.items()):
        med = statistics.median(r["median_us"] for r in rs)
        wire = statistics.median(r["wire_gbps"] for r in rs)
        deepep = statistics.median(r["deepep_gbps"] for r in rs)
        base = rows.get(("nccl", op, tokens))
        speedup = statistics.median(r["median_us"] for r in base) / med if base else float("nan")
        lines.append(f"{backend:8} {op:9} {tokens:6d} {med:10.1f} {wire:10.1f} {deepep:12.1f} {speedup:8.2f}")
    return "\n".join(lines)


def write_json(all_ranks: list, cfg: BenchConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"config": asdict(cfg), "ranks": all_ranks}, f, indent=1)
