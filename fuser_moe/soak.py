"""Soak: many dispatch + combine rounds of random shapes, each compared with the reference, with the
rank's resources watched (docs/contract.md sections 3-5 and 9, held for a long time).

Every round draws, from one seed shared by all ranks, the tokens of each rank (0 included), the hidden
size, top-k, the number of experts and their placement, the dtypes, the routing skew (uniform, Zipf-like
hot experts, every token to one expert, every token to one rank, empty slots, every slot empty) and
sometimes capacity mode; it runs dispatch and combine through one backend, and compares every output of
this rank with `fuser_moe.reference` bit for bit. Every `fault_every`-th round one rank gets a bad input
(docs/contract.md section 9): every rank must raise the contract's error type and the next round must work.

After a warm-up that grows every cached buffer to the largest size a round can need, the rank's host
memory (RSS), open file descriptors, threads, shared-memory segments (named in /dev/shm and mapped) and,
on CUDA, GPU memory (allocated, reserved, and the device's used memory) must stay flat.

`soak_rank(comm, cfg)` is the rank body: the test suite runs a short soak through its harness and
`tools/soak.py` runs long ones. Sizes are small on purpose: the reference is plain Python loops.
"""
from __future__ import annotations

import gc
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Optional

import torch

from fuser_moe.backends.transport.shm import SEGMENT_PREFIX, segments_of
from fuser_moe.reference import reference_combine, reference_dispatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROUTINGS = ("uniform", "zipf", "one_expert", "one_rank", "empty_slots", "all_empty")
FAULTS = ("expert_out_of_range", "duplicate_expert", "float_topk_idx", "capacity_overflow", "combine_src_rank")
MAX_LISTED = 5  # mismatches and errors listed in a report (all are counted)
SAMPLE_EVERY = 50  # rounds between two RSS samples
GPU_ALLOCATED_SLACK_MB = 2.0  # routing's placement cache holds up to 257 placements as device tensors
MAX_SLACK = 3  # capacity mode: C is the most rows a rank receives plus 0 or this


@dataclass(frozen=True)
class SoakConfig:
    """What a soak runs. Every rank must get the same config.

    rounds: measured rounds per backend, after the warm-up.
    backends: backend names, run one after the other.
    seed: the seed of every round's draw.
    max_tokens: T per rank is drawn from [0, max_tokens].
    hiddens, top_ks, experts_per_rank, dtypes: the menus H, K, E / W and x's dtype are drawn from (few
        hidden sizes, since the CUDA backend caches a buffer per (dtype, H)).
    fault_every: every n-th round one rank gets a bad input; 0 for none.
    rss_slack_mb: RSS growth after warm-up that still counts as flat (allocator noise).
    gpu_slack_mb: growth of reserved and device-used GPU memory that still counts as flat.
    """

    rounds: int = 1000
    backends: tuple = ("nccl", "cuda")
    seed: int = 0
    max_tokens: int = 12
    hiddens: tuple = (8, 40)
    top_ks: tuple = (1, 2, 3, 4)
    experts_per_rank: tuple = (1, 2, 3)
    dtypes: tuple = ("float32", "bfloat16", "float16")
    fault_every: int = 20
    rss_slack_mb: float = 24.0
    gpu_slack_mb: float = 64.0


@dataclass
class Round:
    """One round's draw, the same on every rank."""

    index: int
    tokens: list
    hidden: int
    top_k: int
    num_experts: int
    dtype: str
    idx_dtype: str
    routing: str
    expert_to_rank: Optional[list]
    capacity_slack: Optional[int]  # None: exact mode; else C = most pairs any rank receives + slack
    fault: Optional[str] = None
    fault_rank: int = 0
    seed: int = 0

    def describe(self) -> str:
        mode = "exact" if self.capacity_slack is None else f"capacity+{self.capacity_slack}"
        placed = "blocks" if self.expert_to_rank is None else f"placement {self.expert_to_rank}"
        fault = f", fault {self.fault} on rank {self.fault_rank}" if self.fault else ""
        return (f"round {self.index}: T={self.tokens} H={self.hidden} K={self.top_k} E={self.num_experts} "
                f"{self.dtype} idx {self.idx_dtype} {self.routing} {placed} {mode}{fault}")


def draw_round(cfg: SoakConfig, world_size: int, index: int, backend: str) -> Round:
    """The round `index` of a soak: a pure function of the config, so every rank draws the same."""
    rng = random.Random(f"{cfg.seed}/{backend}/{index}")
    top_k = rng.choice(cfg.top_ks)
    per_rank = max(rng.choice(cfg.experts_per_rank), -(-top_k // world_size))
    num_experts = per_rank * world_size
    placement = None
    if rng.random() < 0.25:  # any map, ranks without experts included
        placement = [rng.randrange(world_size) for _ in range(num_experts)]
    tokens = [0 if rng.random() < 0.15 else rng.randint(1, cfg.max_tokens) for _ in range(world_size)]
    fault = None
    if cfg.fault_every and index % cfg.fault_every == cfg.fault_every - 1:
        fault = FAULTS[(index // cfg.fault_every) % len(FAULTS)]
    rnd = Round(index=index, tokens=tokens, hidden=rng.choice(cfg.hiddens), top_k=top_k, num_experts=num_experts,
                dtype=rng.choice(cfg.dtypes), idx_dtype=rng.choice(("int64", "int32")), routing=rng.choice(ROUTINGS),
                expert_to_rank=placement, capacity_slack=rng.choice((None, None, 0, MAX_SLACK)), fault=fault,
                fault_rank=(index // max(cfg.fault_every, 1)) % world_size, seed=rng.randrange(1 << 30))
    if fault:  # a fault needs something to be wrong with: tokens on the faulty rank, rows that travel
        rnd.tokens[rnd.fault_rank] = max(rnd.tokens[rnd.fault_rank], 2)
        rnd.routing = "uniform"
        if fault == "duplicate_expert":
            rnd.top_k = max(rnd.top_k, 2)
            rnd.num_experts = max(rnd.num_experts, world_size * -(-rnd.top_k // world_size))
            rnd.expert_to_rank = None
        if fault == "capacity_overflow":
            rnd.capacity_slack = 0
    return rnd


WARMUP_DRAWS = 30  # drawn rounds after the sizing rounds and the faults, before the "before" probe


def warmup_rounds(cfg: SoakConfig, world_size: int, backend: str = "") -> list:
    """Rounds that make every cached buffer as large as any drawn round can need, then drawn rounds.

    Sizing: the most rows a rank can receive is every token of every rank, all routed to it (exact mode
    keeps one wire row per token, capacity mode one row per pair). One round per (dtype, H) and per K, in
    both modes. Then every fault once and `WARMUP_DRAWS` drawn rounds (other draws than the measured
    ones): on a GPU the first use of a torch kernel loads its module (lazy loading), which grows host
    memory by up to a few hundred MB; those first uses belong to the warm-up, not to the measured rounds.
    """
    sizing = _sizing_rounds(cfg, world_size)
    drawn = []
    if cfg.fault_every:
        every_fault = replace(cfg, fault_every=1)
        drawn += [draw_round(every_fault, world_size, i, f"{backend}/warm-up faults") for i in range(len(FAULTS))]
    drawn += [draw_round(replace(cfg, fault_every=0), world_size, i, f"{backend}/warm-up")
              for i in range(WARMUP_DRAWS)]
    for i, rnd in enumerate(drawn):
        rnd.index = -1 - len(sizing) - i
    return sizing + drawn


def _sizing_rounds(cfg: SoakConfig, world_size: int) -> list:
    rounds = []
    biggest_k = max(cfg.top_ks)
    for dtype in cfg.dtypes:
        for hidden in cfg.hiddens:
            for slack in (None, MAX_SLACK):
                rounds.append((dtype, hidden, biggest_k, slack))
    for top_k in cfg.top_ks:
        for slack in (None, MAX_SLACK):
            rounds.append((cfg.dtypes[0], cfg.hiddens[0], top_k, slack))
    per_rank = max(max(cfg.experts_per_rank), biggest_k)  # rank 0 holds enough experts for K pairs a token
    return [Round(index=-1 - i, tokens=[cfg.max_tokens] * world_size, hidden=hidden, top_k=top_k,
                  num_experts=per_rank * world_size, dtype=dtype, idx_dtype="int64", routing="one_rank",
                  expert_to_rank=None, capacity_slack=slack, seed=i)
            for i, (dtype, hidden, top_k, slack) in enumerate(rounds)]


def make_round_inputs(rnd: Round, world_size: int):
    """Every rank's (x, topk_idx, topk_weights) on the CPU, with the round's routing skew."""
    gen = torch.Generator().manual_seed(rnd.seed)
    E, K = rnd.num_experts, rnd.top_k
    placement = rnd.expert_to_rank or [e // (E // world_size) for e in range(E)]
    popularity = torch.ones(E)
    if rnd.routing == "zipf":
        popularity = 1.0 / torch.arange(1, E + 1, dtype=torch.float32) ** 1.5
        popularity = popularity[torch.randperm(E, generator=gen)]
    xs, idxs, ws = [], [], []
    for T in rnd.tokens:
        x = torch.randn(T, rnd.hidden, generator=gen).to(DTYPES[rnd.dtype])
        if T == 0:
            idx = torch.empty(0, K, dtype=torch.int64)
        elif rnd.routing == "one_expert":  # every token picks expert `hot`, in a random slot
            hot = int(torch.randint(E, (1,), generator=gen))
            idx = torch.full((T, K), -1, dtype=torch.int64)
            idx[torch.arange(T), torch.randint(K, (T,), generator=gen)] = hot
        elif rnd.routing == "one_rank":  # every token picks experts of rank 0 only (as many as it has)
            pool = torch.tensor([e for e in range(E) if placement[e] == 0] or [0])
            idx = torch.full((T, K), -1, dtype=torch.int64)
            for t in range(T):
                picked = pool[torch.randperm(len(pool), generator=gen)[:K]]
                idx[t, :len(picked)] = picked
        else:
            idx = torch.multinomial(popularity.expand(T, E), K, replacement=False, generator=gen)
            if rnd.routing == "empty_slots":
                idx[torch.rand(T, K, generator=gen) < 0.4] = -1
            elif rnd.routing == "all_empty":
                idx[:] = -1
        w = torch.rand(T, K, generator=gen)
        xs.append(x)
        idxs.append(idx.to(getattr(torch, rnd.idx_dtype)))
        ws.append(w)
    return xs, idxs, ws


def pairs_per_rank(idxs, num_experts: int, world_size: int, expert_to_rank: Optional[list]) -> list:
    """Rows each rank receives (docs/contract.md's V): the pairs routed to it by every rank."""
    placement = expert_to_rank or [e // (num_experts // world_size) for e in range(num_experts)]
    counts = [0] * world_size
    for idx in idxs:
        for e in idx.long().flatten().tolist():
            if e >= 0:
                counts[placement[e]] += 1
    return counts


def same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    got = got.detach().cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        return False
    if got.is_floating_point():
        return torch.equal(got.contiguous().view(-1).view(torch.uint8), want.contiguous().view(-1).view(torch.uint8))
    return torch.equal(got, want)


# ---------------------------------------------------------------------------------------- resources
def _gpu_probe(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"gpu_allocated_mb": torch.cuda.memory_allocated(device) / 2 ** 20,
            "gpu_reserved_mb": torch.cuda.memory_reserved(device) / 2 ** 20,
            "gpu_used_mb": (total - free) / 2 ** 20}


def resources(device: torch.device) -> dict:
    """This process's resources now: RSS, open fds, threads, shared-memory segments, GPU memory."""
    gc.collect()
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    mapped = set()
    mapped_bytes = 0
    with open("/proc/self/maps") as f:
        for line in f:
            if f"/dev/shm/{SEGMENT_PREFIX}" in line:
                span, *_, path = line.split(maxsplit=5)
                lo, hi = (int(v, 16) for v in span.split("-"))
                mapped.add(path.strip())
                mapped_bytes += hi - lo
    probe = {
        "rss_mb": rss_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20,
        "fds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "shm_named": len(segments_of(os.getpid())),
        "shm_mapped": len(mapped),
        "shm_mapped_mb": mapped_bytes / 2 ** 20,
    }
    probe.update(_gpu_probe(device))
    return probe


def leaks(before: dict, after: dict, cfg: SoakConfig, rss_samples: tuple = ()) -> list:
    """What grew between two probes beyond its allowance, as readable lines.

    Counts (fds, threads, segments, mappings) must not grow at all; allocated GPU memory by no more than
    the bounded caches that hold device tensors (placements); RSS and reserved or device-used GPU memory
    by their slack (allocator noise, bounded caches filling up), and over the second half of a long run
    (20 or more samples) RSS by a quarter of it.
    """
    found = []
    for key in ("fds", "threads", "shm_named", "shm_mapped", "shm_mapped_mb"):
        if after[key] > before[key]:
            found.append(f"{key} grew from {before[key]:g} to {after[key]:g}")
    if "gpu_allocated_mb" in before and after["gpu_allocated_mb"] - before["gpu_allocated_mb"] > GPU_ALLOCATED_SLACK_MB:
        found.append(f"gpu_allocated_mb grew from {before['gpu_allocated_mb']:.2f} to {after['gpu_allocated_mb']:.2f} "
                     f"(allowance {GPU_ALLOCATED_SLACK_MB:g} MB)")
    if after["rss_mb"] - before["rss_mb"] > cfg.rss_slack_mb:
        found.append(f"rss grew from {before['rss_mb']:.1f} MB to {after['rss_mb']:.1f} MB "
                     f"(allowance {cfg.rss_slack_mb:g} MB)")
    if len(rss_samples) >= 20 and after["rss_mb"] - rss_samples[len(rss_samples) // 2] > cfg.rss_slack_mb / 4:
        found.append(f"rss kept growing: {rss_samples[len(rss_samples) // 2]:.1f} MB half-way, "
                     f"{after['rss_mb']:.1f} MB at the end (allowance {cfg.rss_slack_mb / 4:g} MB)")
    for key in ("gpu_reserved_mb", "gpu_used_mb"):
        if key in before and after[key] - before[key] > cfg.gpu_slack_mb:
            found.append(f"{key} grew from {before[key]:.1f} to {after[key]:.1f} (allowance {cfg.gpu_slack_mb:g} MB)")
    return found


# ---------------------------------------------------------------------------------------- rounds
def _inject(rnd: Round, x, idx, w):
    """The round's bad input on this rank: returns (x, idx, w, combine_fault)."""
    if rnd.fault == "expert_out_of_range":
        idx = idx.clone()
        idx[0, 0] = rnd.num_experts
    elif rnd.fault == "duplicate_expert":  # the round has K >= 2, T >= 2 here and no empty slot
        idx = idx.clone()
        idx[1, 1] = idx[1, 0]
    elif rnd.fault == "float_topk_idx":
        idx = idx.float()
    return x, idx, w, rnd.fault == "combine_src_rank"


def _expected_error(rnd: Round):
    return {"expert_out_of_range": ValueError, "duplicate_expert": ValueError, "float_topk_idx": TypeError,
            "capacity_overflow": RuntimeError, "combine_src_rank": ValueError}[rnd.fault]


def run_round(comm, backend, rnd: Round) -> Optional[str]:
    """Runs one round on this rank; returns None when it behaved, else what went wrong.

    A clean round must match the reference bit for bit; a faulty one must raise the contract's error
    type on every rank (the faulty rank naming its problem, the others naming the faulty rank).
    """
    world, rank, device = comm.world_size, comm.rank, comm.device
    xs, idxs, ws = make_round_inputs(rnd, world)
    capacity = None
    if rnd.capacity_slack is not None:
        capacity = max(pairs_per_rank(idxs, rnd.num_experts, world, rnd.expert_to_rank)) + rnd.capacity_slack
        if rnd.fault == "capacity_overflow":
            capacity -= 1  # the rank receiving the most rows overflows, by one row
    x, idx, w = xs[rank].to(device), idxs[rank].to(device), ws[rank].to(device)
    combine_fault = False
    if rnd.fault and rank == rnd.fault_rank:
        x, idx, w, combine_fault = _inject(rnd, x, idx, w)
    kwargs = dict(num_experts=rnd.num_experts, expert_to_rank=rnd.expert_to_rank, max_recv_tokens=capacity)
    if rnd.fault and rnd.fault != "combine_src_rank":
        return _expect_raise(rnd, lambda: backend.dispatch(comm, x, idx, w, **kwargs), rank)
    d = backend.dispatch(comm, x, idx, w, **kwargs)
    src_rank, n_to = d.recv_src_rank, d.n_tokens_to_rank
    if combine_fault:
        if src_rank.numel():
            src_rank = src_rank.clone()
            src_rank[0] = world
        else:  # this rank received no rows to corrupt: counts of the wrong length instead
            n_to = torch.cat([n_to, n_to[:1]])
    combine = lambda: backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, src_rank,  # noqa: E731
                                      n_to, d.n_tokens_from_rank, x.shape[0])
    if rnd.fault:
        return _expect_raise(rnd, combine, rank)
    out = combine()
    ref = reference_dispatch(xs, idxs, ws, rnd.num_experts, rnd.expert_to_rank, capacity)
    ref_out = reference_combine([r.recv_x for r in ref], [r.recv_topk_weights for r in ref],
                                [r.recv_src_idx for r in ref], [r.recv_src_rank for r in ref], rnd.tokens)
    for name, got, want in zip(ref[rank]._fields, d, ref[rank]):
        if not same_bits(got, want):
            return f"{rnd.describe()}: rank {rank}: {name} differs from the reference"
    if not same_bits(out, ref_out[rank]):
        return f"{rnd.describe()}: rank {rank}: combined_x differs from the reference"
    return None


def _expect_raise(rnd: Round, call, rank: int) -> Optional[str]:
    expected = _expected_error(rnd)
    try:
        call()
    except expected as exc:
        text = str(exc)
        if rnd.fault != "capacity_overflow" and rank != rnd.fault_rank and f"rank {rnd.fault_rank}" not in text:
            return f"{rnd.describe()}: rank {rank} raised without naming rank {rnd.fault_rank}: {text}"
        return None
    except Exception as exc:  # noqa: BLE001 - reported
        return f"{rnd.describe()}: rank {rank} raised {type(exc).__name__} instead of {expected.__name__}: {exc}"
    return f"{rnd.describe()}: rank {rank} did not raise {expected.__name__}"


@dataclass
class BackendReport:
    """What one backend's soak did on one rank."""

    backend: str
    rank: int
    warmup_rounds: int = 0
    rounds: int = 0
    faults_injected: int = 0
    mismatches: int = 0
    problems: list = field(default_factory=list)  # the first MAX_LISTED mismatches or wrong errors
    aborted: Optional[str] = None  # an unexpected exception that ended the soak
    before: dict = field(default_factory=dict)  # resources after warm-up
    after: dict = field(default_factory=dict)  # resources after the last round
    peak_rss_mb: float = 0.0
    rss_samples: list = field(default_factory=list)  # RSS in MB every SAMPLE_EVERY rounds
    leaks: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not (self.mismatches or self.aborted or self.leaks)


def soak_rank(comm, cfg: SoakConfig, backends: Optional[dict] = None) -> list:
    """Rank body: every backend of `cfg` in turn; returns a list of `BackendReport` dicts (this rank's).

    Args:
        comm: this rank's communicator.
        cfg: the soak, the same on every rank.
        backends: backend objects by name, for names that `get_backend` does not know (a test's stand-in).
    """
    from fuser_moe.executors import get_backend

    reports = []
    for name in cfg.backends:
        backend = (backends or {}).get(name) or get_backend(name)
        report = BackendReport(name, comm.rank)
        start = time.monotonic()
        try:
            for rnd in warmup_rounds(cfg, comm.world_size, name):
                problem = run_round(comm, backend, rnd)
                report.warmup_rounds += 1
                if problem:
                    report.mismatches += 1
                    report.problems.append(problem)
            report.before = resources(comm.device)
            for index in range(cfg.rounds):
                rnd = draw_round(cfg, comm.world_size, index, name)
                problem = run_round(comm, backend, rnd)
                report.rounds += 1
                report.faults_injected += rnd.fault is not None
                if problem:
                    report.mismatches += 1
                    if len(report.problems) < MAX_LISTED:
                        report.problems.append(problem)
                if index % SAMPLE_EVERY == SAMPLE_EVERY - 1:
                    report.rss_samples.append(round(resources(comm.device)["rss_mb"], 2))
                    report.peak_rss_mb = max(report.peak_rss_mb, report.rss_samples[-1])
        except Exception as exc:  # noqa: BLE001 - a rank out of step cannot go on; the others time out too
            report.aborted = f"{type(exc).__name__}: {exc}"
        report.after = resources(comm.device)
        report.peak_rss_mb = max(report.peak_rss_mb, report.after["rss_mb"])
        if report.before and not report.aborted:
            report.leaks = leaks(report.before, report.after, cfg, tuple(report.rss_samples))
        report.seconds = time.monotonic() - start
        reports.append(asdict(report))
        if report.aborted:
            break
    return reports


def format_reports(per_rank: list, cfg: SoakConfig, world_size: int, device: str) -> str:
    """A table of every rank's reports (the `soak_rank` results in rank order)."""
    lines = [f"soak: W={world_size} {device}, backends {','.join(cfg.backends)}, seed {cfg.seed}, "
             f"{cfg.rounds} rounds per backend after warm-up, T in [0, {cfg.max_tokens}], H in {list(cfg.hiddens)}, "
             f"K in {list(cfg.top_ks)}, dtypes {','.join(cfg.dtypes)}, a fault every {cfg.fault_every} rounds"]
    header = ("backend", "rank", "warm-up", "rounds", "faults", "mismatch", "rss MB before->after (peak)", "fds",
              "threads", "shm named", "shm mapped", "gpu alloc/reserved/used MB", "s")
    rows = [header]
    for reports in per_rank:
        for r in reports:
            b, a = r["before"] or r["after"], r["after"]
            gpu = "-"
            if "gpu_allocated_mb" in a:
                gpu = "/".join(f"{b[k]:.0f}->{a[k]:.0f}" for k in ("gpu_allocated_mb", "gpu_reserved_mb", "gpu_used_mb"))
            rows.append((r["backend"], str(r["rank"]), str(r["warmup_rounds"]), str(r["rounds"]),
                         str(r["faults_injected"]), str(r["mismatches"]),
                         f"{b['rss_mb']:.1f}->{a['rss_mb']:.1f} ({r['peak_rss_mb']:.1f})",
                         f"{b['fds']}->{a['fds']}", f"{b['threads']}->{a['threads']}",
                         f"{b['shm_named']}->{a['shm_named']}",
                         f"{b['shm_mapped']}->{a['shm_mapped']} ({a['shm_mapped_mb']:.2f} MB)", gpu,
                         f"{r['seconds']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    for reports in per_rank:
        for r in reports:
            for text in ([f"ABORTED: {r['aborted']}"] if r["aborted"] else []) + r["problems"] + \
                    [f"LEAK: {leak}" for leak in r["leaks"]]:
                lines.append(f"{r['backend']} rank {r['rank']}: {text}")
    return "\n".join(lines)


def verdict(per_rank: list) -> list:
    """Every failure of a soak, as lines; empty when every round matched and nothing leaked."""
    failures = []
    for reports in per_rank:
        for r in reports:
            who = f"{r['backend']} rank {r['rank']}"
            if r["aborted"]:
                failures.append(f"{who}: aborted: {r['aborted']}")
            if r["mismatches"]:
                failures.append(f"{who}: {r['mismatches']} round(s) went wrong: {r['problems']}")
            failures += [f"{who}: leak: {leak}" for leak in r["leaks"]]
    return failures
