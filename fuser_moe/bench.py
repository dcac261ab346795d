"""`fuser-moe bench`: dispatch and combine timings per docs/contract.md section 10.

On every T of the chosen workloads (standard T=4096, decode T=128, a sweep of T; H=7168, K=8, E=256,
bfloat16, each token picking K distinct experts uniformly at random) it measures:
  - the `nccl` and `cuda` backends in exact mode, in capacity mode (`max_recv_tokens=C`, C chosen
    from the routing) and in capacity mode under a CUDA graph (captured once per backend and T after
    warm-up on a side stream, timed by replaying it). The nccl backend reads split sizes on the host,
    so it cannot be captured: its graph rows say so instead of failing. On the CPU there are no CUDA
    graphs; a stand-in that re-runs the captured calls keeps that code path exercised (marked
    `emulated`).
  - fp8 dispatch (docs/contract.md section 12) on the standard and decode workloads, for every backend
    and mode above: x quantised to e4m3 with one float32 scale per 128 columns, dispatched with its
    scales. Two variants: `fp8` times the dispatch of quantize_fp8's outputs (which the dispatch sends
    as they are), `fp8+quantize` times quantize_fp8 of the bf16 x and the dispatch together. Combine is
    unchanged (bf16), so fp8 rows are dispatch rows only; each carries `fp8_time_ratio`, its time over
    the same backend and mode with x in the config's dtype (the target: <= 0.65 for `fp8` on one H200,
    cuda graph, standard workload). Their outputs are checked bit for bit before timing: recv_x and
    recv_x_scales against the reference quantisation of the nccl exact-mode recv_x rows (quantisation
    is per row, so that is what every row must carry), the other outputs against the nccl outputs,
    padding rows zero.
  - two baselines on the same routing: `all_to_all_single` of the de-duplicated rows alone (the
    transport floor of the nccl backend: its split sizes, rows gathered beforehand, only the collective
    timed), and torch's NVSHMEM `all_to_all_vdev_2d` (fuser_moe/bench_symm_mem.py) where it runs.
Every output is compared bit for bit with the nccl backend's exact-mode outputs (which the test suite
holds to the reference) before anything is timed; in capacity mode the first V rows must match and
the padding rows must carry -1 (and weight 0). A case that fails its check, or raises, is recorded
as such on every rank and not timed; the others go on.

Timing: CUDA events around each call (the host clock on CPUs) after warm-up; every repetition is
preceded by a device synchronisation and a barrier; the median and the minimum over repetitions are
kept per rank, and tables give the median over ranks. On GPUs the start event is recorded after a
short spin kernel and a one-element all-reduce on the timed stream: the spin gives the host time to
enqueue the call, the all-reduce starts every rank's clock at the same moment (within a few us), so
a rank's time does not include another rank's late start. An eager call whose host work outlasts the
spin still shows it (its GPU waits for the launches).

Ranks sharing one GPU (`--device cuda:N` with W > 1, every rank on GPU N): NCCL refuses two ranks on one
GPU, so no NCCL collective is issued on a CUDA tensor. The nccl backend and the NCCL baselines
(all_to_all_single, all_to_all_vdev_2d) are skipped and say why (`shared_gpu_skips`); the reference
(the nccl backend's exact-mode outputs) is computed on CPU copies of the inputs over Gloo and moved to
the GPU; instead of the spin, the barrier and the all-reduce, the ranks agree on a moment a little
ahead on the GPU's own clock (%globaltimer, one clock for every process on a GPU: each rank reads it,
the store exchanges the readings) and each holds its stream in a gate kernel until then
(`gpu_start_gate`), so every rank's clock starts within a microsecond or so of the others', however
late its host enqueued the call. Under MPS the ranks' kernels run at once, so such a run
times W > 1 with the GPU's memory playing the wire; without MPS the GPU time-slices between the ranks.

Bytes: wire bytes are rows that leave the rank (self excluded) x H x element size (fp8: x (H + 4 *
ceil(H / 128)), the row and its scales); for dispatch the
de-duplicated token rows sent, for combine the partial rows sent back (distinct tokens received from
other ranks: sum(n_tokens_from_rank) minus self). DeepEP's convention counts self rows too. GB/s are
per rank, 1e9 bytes per second.

`run_benchmark` starts the ranks (or runs on a launcher's, `run_under_launcher`) and returns the
results document; fuser_moe/bench_report.py makes the tables, the JSON and the plot from it.
"""
from __future__ import annotations

import ctypes
import math
import os
import platform
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from fuser_moe.backends.common import CommStats

STANDARD_TOKENS = 4096
DECODE_TOKENS = 128
DEFAULT_SWEEP = "1:16384"
WORKLOADS = ("standard", "decode", "sweep")
BACKENDS = ("nccl", "cuda")
MODES = ("exact", "capacity", "graph")
BASELINES = ("all_to_all_single", "all_to_all_vdev_2d")
OPS = ("dispatch", "combine")
FP8_VARIANTS = ("fp8", "fp8+quantize")
FP8_WORKLOADS = ("standard", "decode")  # the workloads that get fp8 dispatch rows
# Backends whose capacity mode makes no host synchronisation (docs/contract.md section 5): only these can be captured.
GRAPH_CAPABLE = ("cuda",)
NOT_CAPTURABLE = "not capturable: the nccl backend reads split sizes on the host"
CAPACITY_ALIGN = 16
# NVLink multicast can put a shared host's GPUs out of service: it stays off whatever the environment says.
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
_PER_ROW = ("recv_x", "recv_topk_idx", "recv_topk_weights", "recv_src_idx", "recv_src_rank", "recv_x_scales")
_PAD_ZERO_FP8 = ("recv_x", "recv_x_scales")  # an fp8 dispatch's padding rows are zero (docs/fp8.md)
_PAD_MINUS_ONE = ("recv_topk_idx", "recv_src_idx", "recv_src_rank")


def disable_multicast() -> None:
    """Sets NCCL, torch symmetric memory and NVSHMEM to never use NVLink multicast (NVLS)."""
    os.environ.update(NO_MULTICAST_ENV)


def parse_device(text: str) -> str:
    """The `--device` of the benchmark, checked: "cpu", "cuda" (rank i on GPU i) or "cuda:N" (every rank on GPU N).

    Args:
        text: what the user wrote, e.g. "cuda:0".
    Returns: the device string as `fuser_moe.launch.rank_device` reads it ("cuda:01" becomes "cuda:1").
    Raises: ValueError naming the accepted forms.
    """
    value = text.strip().lower()
    if value in ("cpu", "cuda"):
        return value
    index = value[len("cuda:"):] if value.startswith("cuda:") else ""
    if not index.isdigit():
        raise ValueError(f"expected cpu, cuda (one GPU a rank) or cuda:N (every rank on GPU N), got {text!r}")
    return f"cuda:{int(index)}"


def device_problem(device: str, world_size: int, visible: int) -> Optional[str]:
    """Why `world_size` ranks cannot start on `device` with `visible` GPUs, as one line, or None.

    Args:
        device: as `parse_device` returns it. world_size: ranks to start. visible: GPUs this process sees.
    """
    if device != "cpu" and visible == 0:
        needs = "(the default) needs GPUs" if device == "cuda" else "needs a GPU"
        return (f"--device {device} {needs} and none is visible; "
                "use --device cpu to time the CPU ranks (Gloo and shared memory) instead")
    if world_size < 1:
        return f"--world-size must be >= 1, got {world_size}"
    if device == "cpu":
        return None
    if device == "cuda":
        if visible < world_size:
            return (f"--world-size {world_size} needs one GPU a rank; {visible} visible "
                    f"(use --world-size {visible} or fewer, --device cuda:0 to put every rank on one GPU, "
                    "or --device cpu)")
        return None
    index = int(device.split(":", 1)[1])
    if index >= visible:
        return (f"--device {device}: no such GPU, {visible} visible (cuda:0" +
                (f" to cuda:{visible - 1})" if visible > 1 else ")"))
    return None


def gpu_sharing(ranks: list) -> Optional[str]:
    """Which ranks share a GPU, as a phrase for the tables ("4 ranks share cuda:0"), or None when none do.

    Args:
        ranks: one dict per rank with "host" and "device" (a device string such as "cuda:0" or "cpu"),
            as `machine_facts` gathers them. CPU ranks never share a GPU.
    """
    count: dict = {}
    for r in ranks:
        if str(r["device"]).startswith("cuda"):
            key = (r.get("host", ""), str(r["device"]))
            count[key] = count.get(key, 0) + 1
    shared = [f"{n} ranks share {device}" + (f" of {host}" if len({h for h, _ in count}) > 1 else "")
              for (host, device), n in count.items() if n > 1]
    return ", ".join(shared) if shared else None


def launch_sharing(device: str, world_size: int) -> Optional[str]:
    """`gpu_sharing` of the ranks `run_benchmark` starts: "W ranks share cuda:N" for device "cuda:N" and W > 1."""
    from fuser_moe.launch import rank_device

    return gpu_sharing([{"host": "", "device": str(rank_device(device, r))} for r in range(world_size)])


def shared_gpu_skips(sharing: Optional[str]) -> dict:
    """What cannot run when ranks share a GPU, and why: backend or baseline name -> reason.

    Args:
        sharing: `gpu_sharing`'s phrase, or None (then nothing is skipped: an empty dict).
    Returns: {"nccl": ..., "all_to_all_single": ..., "all_to_all_vdev_2d": ...} with ranks sharing a GPU.
    """
    if sharing is None:
        return {}
    refusal = f"{sharing} and NCCL refuses two ranks on one GPU"
    return {"nccl": refusal,
            "all_to_all_single": f"an NCCL collective: {refusal}",
            "all_to_all_vdev_2d": f"{sharing}: the bench runs torch's NVSHMEM baseline with one GPU a rank only"}


def parse_sweep(spec: str) -> list:
    """T values of the sweep.

    Args:
        spec: "LO:HI" (the powers of two from LO to HI, both included when they are powers of two),
            "A,B,C" (those values), or "none" / "" (no sweep).
    Returns: the sorted distinct values, each >= 1.
    """
    spec = (spec or "").strip().lower()
    if spec in ("", "none", "off"):
        return []
    if ":" in spec:
        lo_text, hi_text = spec.split(":", 1)
        lo, hi = int(lo_text), int(hi_text)
        if lo < 1 or hi < lo:
            raise ValueError(f"sweep {spec!r}: need 1 <= LO <= HI")
        values, t = [], 1
        while t <= hi:
            if t >= lo:
                values.append(t)
            t *= 2
        if not values:
            raise ValueError(f"sweep {spec!r} holds no power of two")
        return values
    values = sorted({int(v) for v in spec.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise ValueError(f"sweep {spec!r}: token counts must be >= 1")
    return values


_SPIN_CYCLES = 200_000  # ~100 us at the H100/H200 clock: the host enqueues the timed call meanwhile
# Ranks sharing a GPU start each repetition at an agreed moment of a clock they share (the host's on CPU
# ranks, the GPU's %globaltimer on a GPU) this far after the last rank's reading (the store's answer
# reaches every rank, and each enqueues its call, well within it).
_HOST_START_AHEAD_S = 0.002
_GATE_MOST_S = 1.0  # the longest a gate kernel holds its stream, whatever moment it was given


def gpu_start_gate(comm, device, ahead_s: float = _HOST_START_AHEAD_S) -> None:
    """Holds the current stream of `device` until a moment of the GPU's %globaltimer that every rank of
    `comm` agrees on: the latest of the ranks' readings plus `ahead_s`. For ranks that share one GPU
    (one clock); work enqueued after the gate starts on every rank at that moment. A collective step
    (every rank calls it) with a host synchronisation (the reading)."""
    from fuser_moe.backends.transport.nvrtc import get_kernel

    now = torch.empty(1, dtype=torch.int64, device=device)
    get_kernel("barrier.cu", "fuser_moe_clock_read", device).launch(1, 1, [now])
    until = max(int(v) for v in comm.exchange(int(now.item()))) + int(ahead_s * 1e9)
    get_kernel("barrier.cu", "fuser_moe_clock_wait", device).launch(1, 1, [
        ctypes.c_int64(until), ctypes.c_int64(int(_GATE_MOST_S * 1e9))])


@dataclass
class BenchConfig:
    """What one benchmark run measures.

    hidden, topk, experts, dtype: H, K, E and x's dtype of every workload.
    workloads: label -> T values, e.g. {"standard": [4096], "decode": [128], "sweep": [1, 2, ..., 16384]};
        a T that appears under several labels is measured once.
    backends: of "nccl", "cuda". modes: of "exact", "capacity", "graph". baselines: of BASELINES.
    capacity: a fixed max_recv_tokens for every T; None: chosen per T from the routing (`capacity_for`).
    capacity_factor: C >= capacity_factor * T * K (the expected pairs per rank on a uniform routing).
    warmup, reps: calls before timing, timed calls. seed: routing and tokens.
    check: compare every output with the nccl backend's exact-mode outputs before timing.
    fp8: also time fp8 dispatch (both FP8_VARIANTS) on the T of the standard and decode workloads.
    progress: a line per measurement on stderr (rank 0).
    json_path: rank 0 writes the results so far here after every T (the driver writes the final one).
    """

    hidden: int = 7168
    topk: int = 8
    experts: int = 256
    dtype: str = "bfloat16"
    workloads: dict = field(default_factory=lambda: {"standard": [STANDARD_TOKENS], "decode": [DECODE_TOKENS],
                                                     "sweep": parse_sweep(DEFAULT_SWEEP)})
    backends: tuple = BACKENDS
    modes: tuple = MODES
    baselines: tuple = BASELINES
    capacity: Optional[int] = None
    capacity_factor: float = 1.25
    warmup: int = 5
    reps: int = 20
    seed: int = 0
    check: bool = True
    fp8: bool = True
    progress: bool = True
    json_path: Optional[str] = None

    @property
    def tokens(self) -> list:
        """Every T to measure, ascending."""
        return sorted({t for values in self.workloads.values() for t in values})

    def labels(self, tokens: int) -> list:
        """The workloads T belongs to."""
        return [name for name, values in self.workloads.items() if tokens in values]

    def fp8_for(self, tokens: int) -> bool:
        """Whether T gets fp8 dispatch rows (cfg.fp8 and T in the standard or decode workload)."""
        return self.fp8 and any(label in FP8_WORKLOADS for label in self.labels(tokens))

    def capacity_for(self, tokens: int, most_pairs: int) -> int:
        """C for T tokens: the fixed capacity if one was given, else the larger of capacity_factor * T * K
        and the most pairs any rank receives, rounded up to a multiple of CAPACITY_ALIGN."""
        if self.capacity is not None:
            return self.capacity
        need = max(math.ceil(self.capacity_factor * tokens * self.topk), most_pairs, 1)
        return -(-need // CAPACITY_ALIGN) * CAPACITY_ALIGN


# ------------------------------------------------------------------------------------------ inputs
def _seed(cfg: BenchConfig, tokens: int, rank: int) -> int:
    return (cfg.seed * 1_000_003 + tokens * 7919 + rank) % (2 ** 63)


def make_routing(cfg: BenchConfig, tokens: int, rank: int):
    """This rank's routing for T tokens, on the CPU; the same in every run and every phase.

    Returns: topk_idx [T, K] int64 (K distinct experts per token, uniformly at random) and
        topk_weights [T, K] float32 (a softmax, so each token's weights sum to one).
    """
    gen = torch.Generator().manual_seed(_seed(cfg, tokens, rank))
    idx = torch.rand(tokens, cfg.experts, generator=gen).topk(cfg.topk, dim=1).indices
    weights = torch.softmax(torch.randn(tokens, cfg.topk, generator=gen), dim=1)
    return idx, weights


def make_inputs(cfg: BenchConfig, tokens: int, rank: int, device: torch.device):
    """x [T, H] (cfg.dtype, standard normal), topk_idx [T, K], topk_weights [T, K], all on `device`.

    x is drawn on the device itself (a GPU draws 117 M values in no time; a CPU rank does not).
    """
    idx, weights = make_routing(cfg, tokens, rank)
    if device.type == "cuda":
        gen = torch.Generator(device=device).manual_seed(_seed(cfg, tokens, rank))
        x = torch.randn(tokens, cfg.hidden, generator=gen, device=device)
    else:
        x = torch.randn(tokens, cfg.hidden, generator=torch.Generator().manual_seed(_seed(cfg, tokens, rank) + 1))
    return x.to(_DTYPES[cfg.dtype]), idx.to(device), weights.to(device)


# ------------------------------------------------------------------------------------------ checks
def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when a and b have the same shape, dtype and bits (so -0.0 differs from +0.0, NaNs compare)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.device != b.device:
        b = b.to(a.device)
    if a.is_floating_point():
        a, b = a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    return torch.equal(a, b)


def compare_with_reference(d, out, ref_d, ref_out, capacity: Optional[int]) -> Optional[str]:
    """Why a backend's outputs differ from the nccl backend's exact-mode outputs, or None when they agree.

    Args:
        d: `DispatchOutputs` (or an fp8 dispatch's `ScaledDispatchOutputs`) to check; out: its combine's
            combined_x [T, H], or None where no combine ran (fp8).
        ref_d, ref_out: the nccl backend's exact-mode outputs on the same inputs (for fp8: with recv_x
            and recv_x_scales of the reference quantisation).
        capacity: C in capacity mode (rows [0, V) must match, rows [V, C) are padding: -1 in
            recv_topk_idx, recv_src_idx and recv_src_rank, 0 in recv_topk_weights), None in exact mode.
    """
    rows = ref_d.recv_x.shape[0]
    if capacity is not None and capacity < rows:
        return f"capacity {capacity} is below the {rows} rows this rank receives (an overflow)"
    for name, got, want in zip(ref_d._fields, d, ref_d):
        if capacity is not None and name in _PER_ROW:
            if got.shape[0] != capacity:
                return f"{name} has {got.shape[0]} rows, expected the capacity {capacity}"
            if not same_bits(got[:rows], want):
                return f"{name}: rows [0, {rows}) differ from the nccl backend's exact-mode output"
            pad = got[rows:]
            if name in _PAD_MINUS_ONE and not bool((pad == -1).all()):
                return f"{name}: padding rows [{rows}, {capacity}) are not all -1"
            if name == "recv_topk_weights" and not bool((pad == 0).all()):
                return f"{name}: padding rows [{rows}, {capacity}) are not all 0"
            if name in _PAD_ZERO_FP8 and hasattr(d, "recv_x_scales") and bool(pad.view(torch.uint8).any()):
                return f"{name}: padding rows [{rows}, {capacity}) are not all 0"
        elif not same_bits(got, want):
            return (f"{name} differs from the nccl backend's exact-mode output (got {got.dtype}{list(got.shape)}, "
                    f"expected {want.dtype}{list(want.shape)})")
    if out is not None and not same_bits(out, ref_out):
        return "combined_x differs from the nccl backend's exact-mode output"
    return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------------------ workload
@dataclass
class Workload:
    """One T on one rank: inputs, the nccl exact-mode reference, counts and the capacity."""

    tokens: int
    labels: list
    x: torch.Tensor
    topk_idx: torch.Tensor
    topk_weights: torch.Tensor
    ref_d: object  # DispatchOutputs of the nccl backend, exact mode
    ref_out: torch.Tensor
    n_to: list  # distinct tokens sent to each rank (host)
    n_from: list  # distinct tokens received from each rank (host)
    capacity: int
    most_pairs: int  # the most pairs any rank receives

    def row_bytes(self) -> int:
        return self.x.shape[1] * self.x.element_size()

    def op_bytes(self, rank: int, fp8: bool = False) -> dict:
        """op -> (wire bytes, DeepEP bytes) of this rank (docs/contract.md section 10); with fp8, a dispatch row is
        H bytes and its ceil(H / 128) float32 scales."""
        row = self.row_bytes()
        if fp8:
            from fuser_moe.backends.payload import scale_blocks

            row = self.x.shape[1] + 4 * scale_blocks(self.x.shape[1])
        return {"dispatch": ((sum(self.n_to) - self.n_to[rank]) * row, sum(self.n_to) * row),
                "combine": ((sum(self.n_from) - self.n_from[rank]) * row, sum(self.n_from) * row)}


class _EagerGraph:
    """Stand-in for a captured CUDA graph on the CPU: capturing runs the function once and keeps its
    outputs; a replay runs it again and writes the results into those tensors, as a real replay
    rewrites a graph's static outputs. Only its bookkeeping is exercised; its times are eager times."""

    def __init__(self, fn: Callable):
        self._fn = fn
        self.outputs = fn()

    def replay(self) -> None:
        fresh = self._fn()
        if isinstance(fresh, torch.Tensor):
            self.outputs.copy_(fresh)
            return
        for static, new in zip(self.outputs, fresh):
            static.copy_(new)


class _CudaGraph:
    """A function captured once in a CUDA graph, with the static outputs that every replay rewrites.

    Each graph has its own memory pool, so replaying one any number of times cannot touch the other's
    outputs. Capture errors only for this thread's unsafe calls: the process group's watchdog thread
    polls its events meanwhile.
    """

    def __init__(self, fn: Callable):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.outputs = fn()

    def replay(self) -> None:
        self.graph.replay()


# ------------------------------------------------------------------------------------------ rank side
class RankBench:
    """One rank's side of a benchmark phase: timing, agreement across ranks, records (kept on rank 0).

    Every collective step (a backend call, a capture, an agreement) is taken by every rank in the same
    order; whether a case is skipped depends only on what every rank knows alike (the config, the
    device type, the outcome of an agreement), so no rank is left waiting in a collective.
    """

    def __init__(self, comm, cfg: BenchConfig, total_cases: int, phase: str = "main",
                 shared_gpu: Optional[str] = None):
        self.comm, self.cfg, self.phase = comm, cfg, phase
        self.device = comm.device
        self.cuda = self.device.type == "cuda"
        # `gpu_sharing` of every rank (the same on each), or None: then no NCCL collective may run on
        # a CUDA tensor, and `shared_gpu_skips` says what is skipped.
        self.shared_gpu = shared_gpu
        self.skips = shared_gpu_skips(shared_gpu)
        self.total_cases, self.done = total_cases, 0
        self.records: list = []  # rank 0 only

    # ---------------------------------------------------------------- group steps
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def agree(self, problem: Optional[tuple]) -> Optional[tuple]:
        """Every rank passes (status, message) or None; returns the first rank's problem as
        (status, "rank r: message"), the same on every rank, or None when no rank had one."""
        verdicts = self.comm.exchange(problem)
        for rank, verdict in enumerate(verdicts):
            if verdict is not None:
                return verdict[0], f"rank {rank}: {verdict[1]}"
        return None

    def attempt(self, status: str, what: str, fn: Callable):
        """Runs fn(); returns (its result, None) or (None, (status, message)) when it raised."""
        try:
            result = fn()
            self.sync()
            return result, None
        except Exception as exc:  # noqa: BLE001 - recorded, then agreed on by every rank
            return None, (status, f"{what}: {_describe(exc)}")

    def start_together(self) -> None:
        """Ranks sharing a GPU (one host): every rank waits until the same moment of the host's monotonic
        clock, `_HOST_START_AHEAD_S` after the last rank arrived (a store exchange, so also a barrier)."""
        target = max(self.comm.exchange(time.monotonic())) + _HOST_START_AHEAD_S
        while time.monotonic() < target:
            pass

    def time(self, fn: Callable) -> dict:
        """Runs fn warm-up times, then reps timed times, each after a synchronisation and a barrier
        (ranks sharing a GPU: `gpu_start_gate` instead, `start_together` on CPU ranks, and no
        all-reduce, which would be NCCL's).

        Returns: this rank's {"median_us", "min_us", "host_median_us", "samples_us"}; device time
        from CUDA events on GPUs, the host clock on CPUs. host_median_us is the host time until fn
        returned (launch overhead on GPUs).
        """
        for _ in range(self.cfg.warmup):
            fn()
        reps = self.cfg.reps
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)] if self.cuda else []
        host = []
        align = torch.zeros(1, device=self.device) if (self.cuda and self.comm.is_distributed
                                                       and self.shared_gpu is None) else None
        for i in range(reps):
            self.sync()
            if self.shared_gpu is not None and self.cuda:
                gpu_start_gate(self.comm, self.device)
            elif self.shared_gpu is not None:
                self.start_together()
            else:
                self.comm.barrier()
            t0 = time.perf_counter()
            if self.cuda:
                if self.shared_gpu is None:
                    torch.cuda._sleep(_SPIN_CYCLES)
                if align is not None:
                    dist.all_reduce(align, group=self.comm.group)
                events[i][0].record()
            fn()
            if self.cuda:
                events[i][1].record()
            host.append((time.perf_counter() - t0) * 1e6)
        self.sync()
        samples = [start.elapsed_time(end) * 1e3 for start, end in events] if self.cuda else host
        return {"median_us": statistics.median(samples), "min_us": min(samples),
                "host_median_us": statistics.median(host), "samples_us": samples}

    # ---------------------------------------------------------------- records
    def publish(self, tokens: int, backend: str, mode: str, op: str, *, stats: Optional[dict] = None,
                wire_bytes: int = 0, deepep_bytes: int = 0, status: str = "ok", reason: Optional[str] = None,
                note: Optional[str] = None, capacity: Optional[int] = None, checked: bool = False,
                emulated: bool = False, payload: Optional[str] = None, path: Optional[str] = None,
                sms: Optional[int] = None) -> None:
        """Records one measurement (one row of the tables). Collective when status is "ok" (the ranks'
        statistics are gathered); otherwise every rank must pass the same status and reason. `payload`
        names an fp8 variant (FP8_VARIANTS); None is x in the config's dtype. `path` and `sms`: the
        protocol the backend's calls took and the SMs they used (`_said`), as the backend's
        CommStats said (None: not said, e.g. a baseline); the record keeps rank 0's path and the largest
        SMs of any rank."""
        per_rank = None
        if status == "ok":
            mine = dict(stats, path=path, sms=sms, wire_bytes=wire_bytes, deepep_bytes=deepep_bytes,
                        wire_gbps=wire_bytes / stats["median_us"] / 1e3 if stats["median_us"] > 0 else 0.0,
                        deepep_gbps=deepep_bytes / stats["median_us"] / 1e3 if stats["median_us"] > 0 else 0.0)
            per_rank = self.comm.exchange(mine)
        self.done += 1
        if self.comm.rank != 0:
            return
        record = {"tokens": tokens, "workloads": self.cfg.labels(tokens), "backend": backend, "mode": mode,
                  "op": op, "status": status, "reason": reason, "note": note, "capacity": capacity,
                  "checked": checked and status == "ok", "emulated": emulated}
        if payload is not None:
            record["payload"] = payload
        if per_rank is not None:
            def over_ranks(key):
                return statistics.median(r[key] for r in per_rank)

            record.update(median_us=over_ranks("median_us"), min_us=over_ranks("min_us"),
                          host_median_us=over_ranks("host_median_us"), wire_gbps=over_ranks("wire_gbps"),
                          deepep_gbps=over_ranks("deepep_gbps"), per_rank=per_rank)
            if path is not None or any(r.get("sms") for r in per_rank):
                record.update(path=per_rank[0].get("path"),
                              sms=max((r["sms"] for r in per_rank if r.get("sms")), default=None))
        self.records.append(record)
        if self.cfg.progress:
            print(self._progress_line(record), file=sys.stderr, flush=True)

    def skip(self, tokens: int, backend: str, mode: str, reason: str, status: str = "skipped",
             capacity: Optional[int] = None) -> None:
        for op in OPS:
            self.publish(tokens, backend, mode, op, status=status, reason=reason, capacity=capacity)

    def _progress_line(self, r: dict) -> str:
        width = len(str(self.total_cases))
        series = r["backend"] + "/" + r["mode"] + ("/" + r["payload"] if r.get("payload") else "")
        head = (f"bench [{self.done:{width}d}/{self.total_cases}] T={r['tokens']:<6d} "
                f"{series:<28s} {r['op']:<8s}")
        if r["status"] != "ok":
            return f"{head} {r['status']}: {r['reason']}"
        tail = "checked" if r["checked"] else "not checked"
        if r["emulated"]:
            tail += ", emulated graph (CPU)"
        return (f"{head} {r['median_us']:10.1f} us (min {r['min_us']:.1f})  wire {r['wire_gbps']:.3g} GB/s  "
                f"DeepEP {r['deepep_gbps']:.3g} GB/s  {tail}")

    # ---------------------------------------------------------------- a workload
    def prepare(self, tokens: int) -> Workload:
        """Inputs for T tokens, the nccl exact-mode reference (checked mode: it also validates them),
        the split sizes and the capacity. With ranks sharing a GPU the reference is computed on CPU
        copies of the inputs (Gloo: NCCL refuses two ranks on one GPU; every backend and device gives
        the same bits, docs/contract.md sections 3 and 4) and its outputs are moved to the GPU."""
        from fuser_moe.executors import get_backend

        cfg, comm = self.cfg, self.comm
        x, idx, weights = make_inputs(cfg, tokens, comm.rank, self.device)
        nccl = get_backend("nccl")
        on_cpu = self.shared_gpu is not None  # (on CPU ranks, which tests use to run this path, a no-op)
        rx, ridx, rw = (x.cpu(), idx.cpu(), weights.cpu()) if on_cpu else (x, idx, weights)
        ref_d = nccl.dispatch(comm, rx, ridx, rw, num_experts=cfg.experts, check_inputs=True)
        ref_out = nccl.combine(comm, ref_d.recv_x, ref_d.recv_topk_weights, ref_d.recv_src_idx, ref_d.recv_src_rank,
                               ref_d.n_tokens_to_rank, ref_d.n_tokens_from_rank, tokens, check_inputs=True)
        if on_cpu:
            del rx, ridx, rw
            ref_d = type(ref_d)(*(t.to(self.device) for t in ref_d))
            ref_out = ref_out.to(self.device)
        self.sync()
        counts = torch.cat([ref_d.n_tokens_to_rank, ref_d.n_tokens_from_rank]).tolist()
        world = comm.world_size
        most_pairs = max(comm.exchange(int(ref_d.recv_x.shape[0])))
        return Workload(tokens, cfg.labels(tokens), x, idx, weights, ref_d, ref_out, counts[:world], counts[world:],
                        cfg.capacity_for(tokens, most_pairs), most_pairs)


class MainBench(RankBench):
    """The main phase: the backends in every mode, and the all_to_all_single baseline."""

    def cases_per_token(self) -> int:
        cfg = self.cfg
        return len(cfg.backends) * len(cfg.modes) + ("all_to_all_single" in cfg.baselines)

    def measurements(self) -> int:
        """Rows this phase records: two ops per case, one (dispatch) per fp8 case."""
        cfg = self.cfg
        fp8_tokens = sum(cfg.fp8_for(t) for t in cfg.tokens)
        return (len(cfg.tokens) * self.cases_per_token() * len(OPS)
                + fp8_tokens * len(cfg.backends) * len(cfg.modes) * len(FP8_VARIANTS))

    def run(self, document: Optional[dict]) -> Optional[dict]:
        """Measures every T; rank 0 fills `document["results"]` and returns it (None on other ranks)."""
        from fuser_moe import bench_report

        for tokens in self.cfg.tokens:
            work = self.prepare(tokens)
            for name in self.cfg.backends:
                for mode in self.cfg.modes:
                    if mode == "graph":
                        self.graph_case(work, name)
                    else:
                        self.plain_case(work, name, mode)
            if "all_to_all_single" in self.cfg.baselines:
                self.all_to_all_case(work)
            if self.cfg.fp8_for(tokens):
                self.fp8_cases(work)
            del work
            if self.comm.rank == 0 and document is not None:
                document["results"] = list(self.records)
                if self.cfg.json_path:
                    bench_report.write_json(document, self.cfg.json_path)
        return document

    def _backend(self, name: str):
        """(backend, None) or (None, why it cannot run here); the same answer on every rank."""
        from fuser_moe.executors import get_backend
        from fuser_moe.executors.backend_selection import cuda_backend_missing

        if name in self.skips:  # the nccl backend on ranks sharing a GPU
            return None, self.skips[name]
        if name == "cuda":
            missing = cuda_backend_missing(self.device)
            if missing:
                return None, missing
        return get_backend(name), None

    def _calls(self, work: Workload, backend, capacity: Optional[int]):
        """(dispatch(), combine(d), seen) of `backend` on the workload. Each call leaves its `CommStats` in
        seen[op] (the last call's: the protocol path it took and the SMs it used)."""
        cfg, comm = self.cfg, self.comm
        # As the evaluator does: the dispatch's handle goes to the combine of its outputs.
        handles = WeakIdKeyDictionary()
        seen = {}

        def dispatch():
            stats = seen["dispatch"] = CommStats()
            d, handle = backend.dispatch(comm, work.x, work.topk_idx, work.topk_weights, num_experts=cfg.experts,
                                         max_recv_tokens=capacity, check_inputs=False, return_handle=True,
                                         stats=stats)
            handles[d.recv_src_idx] = handle
            return d

        def combine(d):
            stats = seen["combine"] = CommStats()
            return backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                   d.n_tokens_to_rank, d.n_tokens_from_rank, work.tokens, check_inputs=False,
                                   handle=handles.get(d.recv_src_idx), stats=stats)

        return dispatch, combine, seen

    def _failed(self, work: Workload, name: str, mode: str, verdict: tuple, backend=None,
                capacity: Optional[int] = None) -> None:
        """Records a failed case on every rank, after clearing what the backend's device reported, so
        that a flag it left (a capacity overflow) is not raised again by the next case."""
        if backend is not None:
            self._device_errors(backend)
        self.skip(work.tokens, name, mode, verdict[1], status=verdict[0], capacity=capacity)

    def _device_errors(self, backend) -> Optional[tuple]:
        """Errors the backend's device reported during the timed calls (the cuda backend's overflow and
        barrier words), as a problem to agree on."""
        check = getattr(backend, "check", None)
        if check is None:
            return None
        try:
            check(self.comm)
        except Exception as exc:  # noqa: BLE001
            return "error", f"reported after the timed calls: {_describe(exc)}"
        return None

    def _said(self, call: Optional[CommStats]) -> dict:
        """What a backend call's CommStats says for its row (`publish`'s path and sms): the protocol it
        took, and the SMs its kernels took: the most blocks one of them launched, at most the GPU's SMs
        (more blocks queue on them). None for what was not said (CPU ranks, baselines)."""
        if call is None:
            return {"path": None, "sms": None}
        sms = (min(call.sms, torch.cuda.get_device_properties(self.device).multi_processor_count)
               if call.sms and self.cuda else None)
        return {"path": call.path or None, "sms": sms}

    def _publish_pair(self, work: Workload, name: str, mode: str, stats: dict, capacity, emulated=False,
                      note=None, calls: Optional[dict] = None) -> None:
        """Publishes both ops' timings; calls: the backend's CommStats of each op (`_calls`' seen), if any."""
        op_bytes = work.op_bytes(self.comm.rank)
        calls = calls or {}
        for op in OPS:
            wire, deepep = op_bytes[op]
            self.publish(work.tokens, name, mode, op, stats=stats[op], wire_bytes=wire, deepep_bytes=deepep,
                         capacity=capacity, checked=self.cfg.check, emulated=emulated, note=note,
                         **self._said(calls.get(op)))

    def plain_case(self, work: Workload, name: str, mode: str) -> None:
        """Exact or capacity mode: one checked call of each op, then each op timed on its own."""
        capacity = work.capacity if mode == "capacity" else None
        backend, missing = self._backend(name)
        if backend is None:
            return self.skip(work.tokens, name, mode, missing, capacity=capacity)
        dispatch, combine, seen = self._calls(work, backend, capacity)
        d, problem = self.attempt("error", "dispatch", dispatch)
        if (verdict := self.agree(problem)) is not None:
            return self._failed(work, name, mode, verdict, backend, capacity)
        out, problem = self.attempt("error", "combine", lambda: combine(d))
        if (verdict := self.agree(problem)) is not None:
            return self._failed(work, name, mode, verdict, backend, capacity)
        if self.cfg.check:
            why = compare_with_reference(d, out, work.ref_d, work.ref_out, capacity)
            if (verdict := self.agree(None if why is None else ("mismatch", why))) is not None:
                return self._failed(work, name, mode, verdict, backend, capacity)
        del out
        stats = {"dispatch": self.time(dispatch), "combine": self.time(lambda: combine(d))}
        if (verdict := self.agree(self._device_errors(backend))) is not None:
            return self._failed(work, name, mode, verdict, None, capacity)
        self._publish_pair(work, name, mode, stats, capacity, calls=seen)

    def graph_case(self, work: Workload, name: str) -> None:
        """Capacity mode under a CUDA graph: warm-up on a side stream, one capture of dispatch and one of
        combine (reading the dispatch graph's static outputs), a checked replay, then timed replays."""
        capacity = work.capacity
        if name not in GRAPH_CAPABLE:
            return self.skip(work.tokens, name, "graph", NOT_CAPTURABLE, capacity=capacity)
        backend, missing = self._backend(name)
        if backend is None:
            return self.skip(work.tokens, name, "graph", missing, capacity=capacity)
        dispatch, combine, seen = self._calls(work, backend, capacity)

        def capture():
            if not self.cuda:
                graph_d = _EagerGraph(dispatch)
                return graph_d, _EagerGraph(lambda: combine(graph_d.outputs))
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # buffers grow and kernels compile outside the capture
                for _ in range(max(1, self.cfg.warmup)):
                    combine(dispatch())
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.sync()
            self.comm.barrier()
            graph_d = _CudaGraph(dispatch)
            return graph_d, _CudaGraph(lambda: combine(graph_d.outputs))

        graphs, problem = self.attempt("error", "capture", capture)
        if (verdict := self.agree(problem)) is not None:
            return self._failed(work, name, "graph", verdict, backend, capacity)
        graph_d, graph_c = graphs
        _, problem = self.attempt("error", "replay", lambda: (graph_d.replay(), graph_c.replay()))
        if problem is None and self.cfg.check:
            why = compare_with_reference(graph_d.outputs, graph_c.outputs, work.ref_d, work.ref_out, capacity)
            problem = None if why is None else ("mismatch", f"after a replay: {why}")
        if (verdict := self.agree(problem)) is not None:
            return self._failed(work, name, "graph", verdict, backend, capacity)
        stats = {"dispatch": self.time(graph_d.replay), "combine": self.time(graph_c.replay)}
        if (verdict := self.agree(self._device_errors(backend))) is not None:
            return self._failed(work, name, "graph", verdict, None, capacity)
        self._publish_pair(work, name, "graph", stats, capacity, emulated=not self.cuda,
                           note=None if self.cuda else "CPU: no CUDA graphs, replay re-runs the calls", calls=seen)

    # ---------------------------------------------------------------- fp8 dispatch
    def fp8_cases(self, work: Workload) -> None:
        """fp8 dispatch of every backend and mode, both variants (docs/contract.md section 12).

        Inputs: quantize_fp8 of x (packed views, sent as they are). Expected outputs: the reference
        quantisation (torch) of the nccl exact-mode recv_x rows, with their scales, and the nccl
        outputs for the rest; padding rows zero.
        """
        from fuser_moe.backends import fp8

        def prepare():
            q, scales = fp8.quantize_fp8(work.x)
            ref_q, ref_scales = fp8.quantize_reference(work.ref_d.recv_x)
            return q, scales, work.ref_d._replace(recv_x=ref_q), ref_scales

        prepared, problem = self.attempt("error", "quantize_fp8", prepare)
        if (verdict := self.agree(problem)) is not None:
            for name in self.cfg.backends:
                for mode in self.cfg.modes:
                    for variant in FP8_VARIANTS:
                        self.publish(work.tokens, name, mode, "dispatch", status=verdict[0], reason=verdict[1],
                                     payload=variant)
            return
        q, scales, ref_plain, ref_scales = prepared
        from fuser_moe.backends.payload import ScaledDispatchOutputs

        expected = ScaledDispatchOutputs(*ref_plain, recv_x_scales=ref_scales)
        for name in self.cfg.backends:
            for mode in self.cfg.modes:
                for variant in FP8_VARIANTS:
                    self.fp8_case(work, name, mode, variant, q, scales, expected)

    def fp8_case(self, work: Workload, name: str, mode: str, variant: str, q, scales, expected) -> None:
        """One fp8 dispatch: a checked call (a checked replay in graph mode), then timed calls."""
        from fuser_moe.backends import fp8, payload

        cfg, comm = self.cfg, self.comm
        capacity = work.capacity if mode in ("capacity", "graph") else None

        def skip(reason, status="skipped"):
            self.publish(work.tokens, name, mode, "dispatch", status=status, reason=reason, capacity=capacity,
                         payload=variant)

        if mode == "graph" and name not in GRAPH_CAPABLE:
            return skip(NOT_CAPTURABLE)
        backend, missing = self._backend(name)
        if backend is None:
            return skip(missing)

        seen = {}

        def dispatch():
            x_fp8, x_scales = fp8.quantize_fp8(work.x) if variant == "fp8+quantize" else (q, scales)
            stats = seen["dispatch"] = CommStats()
            return payload.dispatch(backend, comm, x_fp8, work.topk_idx, work.topk_weights, x_scales=x_scales,
                                    num_experts=cfg.experts, max_recv_tokens=capacity, check_inputs=False,
                                    stats=stats)

        if mode == "graph":
            def capture():
                if not self.cuda:
                    return _EagerGraph(dispatch)
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side):
                    for _ in range(max(1, cfg.warmup)):
                        dispatch()
                torch.cuda.current_stream(self.device).wait_stream(side)
                self.sync()
                comm.barrier()
                return _CudaGraph(dispatch)

            graph, problem = self.attempt("error", "capture", capture)
            if problem is None:
                _, problem = self.attempt("error", "replay", graph.replay)
            outputs = None if problem is not None else graph.outputs
            timed = None if problem is not None else graph.replay
        else:
            outputs, problem = self.attempt("error", "dispatch", dispatch)
            timed = dispatch
        if problem is None and cfg.check:
            why = compare_with_reference(outputs, None, expected, None, capacity)
            problem = None if why is None else ("mismatch", why)
        if (verdict := self.agree(problem)) is not None:
            self._device_errors(backend)
            return skip(verdict[1], status=verdict[0])
        del outputs
        stats = self.time(timed)
        if (verdict := self.agree(self._device_errors(backend))) is not None:
            return skip(verdict[1], status=verdict[0])
        wire, deepep = work.op_bytes(comm.rank, fp8=True)["dispatch"]
        note = "x from quantize_fp8, sent as is" if variant == "fp8" else "quantize_fp8 of x + dispatch"
        if mode == "graph" and not self.cuda:
            note += "; CPU: no CUDA graphs, replay re-runs the calls"
        self.publish(work.tokens, name, mode, "dispatch", stats=stats, wire_bytes=wire, deepep_bytes=deepep,
                     capacity=capacity, checked=cfg.check, emulated=mode == "graph" and not self.cuda, note=note,
                     payload=variant, **self._said(seen.get("dispatch")))

    def all_to_all_case(self, work: Workload) -> None:
        """Baseline: `all_to_all_single` of the de-duplicated rows with the nccl dispatch's split sizes
        (rows gathered beforehand, only the collective timed); combine's floor is the reverse collective."""
        from fuser_moe.backends import routing

        cfg, comm, name = self.cfg, self.comm, "all_to_all_single"
        if name in self.skips:  # an NCCL collective: not on ranks sharing a GPU
            return self.skip(work.tokens, name, "exact", self.skips[name])
        n_to, n_from = work.n_to, work.n_from

        def prepare():
            placement = routing.make_placement(cfg.experts, comm.world_size, None, self.device)
            counts = routing.count_row(work.topk_idx, placement)
            if counts.row[:comm.world_size].tolist() != n_to:
                raise RuntimeError(f"split sizes {counts.row[:comm.world_size].tolist()} differ from the nccl "
                                   f"dispatch's {n_to}")
            send = work.x[routing.send_rows(counts).token].contiguous()
            return send, torch.empty(sum(n_from), cfg.hidden, dtype=send.dtype, device=self.device), \
                torch.empty(sum(n_to), cfg.hidden, dtype=send.dtype, device=self.device)

        buffers, problem = self.attempt("error", "gathering the rows", prepare)
        if (verdict := self.agree(problem)) is not None:
            return self.skip(work.tokens, name, "exact", verdict[1], status=verdict[0])
        send, recv, back = buffers

        def dispatch():
            comm.all_to_all_single(recv, send, n_from, n_to)

        def combine():
            comm.all_to_all_single(back, recv, n_to, n_from)

        _, problem = self.attempt("error", "all_to_all_single", lambda: (dispatch(), combine()))
        if problem is None and cfg.check:
            problem = self._check_all_to_all(work, send, recv, back)
        if (verdict := self.agree(problem)) is not None:
            return self.skip(work.tokens, name, "exact", verdict[1], status=verdict[0])
        stats = {"dispatch": self.time(dispatch), "combine": self.time(combine)}
        self._publish_pair(work, name, "exact", stats, None)

    @staticmethod
    def _check_all_to_all(work: Workload, send, recv, back) -> Optional[tuple]:
        """The rows received from rank s are its tokens for this rank in token order, so row
        (s, t) of the exact dispatch's recv_x sits at the rank of (s, t) among the distinct pairs."""
        ref = work.ref_d
        key = ref.recv_src_rank * (1 << 32) + ref.recv_src_idx
        distinct, where = torch.unique(key, sorted=True, return_inverse=True)
        if distinct.numel() != recv.shape[0]:
            return "mismatch", f"received {recv.shape[0]} rows, the nccl dispatch {distinct.numel()} distinct tokens"
        if not same_bits(recv[where], ref.recv_x):
            return "mismatch", "received rows differ from the nccl dispatch's recv_x"
        if not same_bits(back, send):
            return "mismatch", "the reverse all_to_all_single did not bring back the rows sent"
        return None


# ------------------------------------------------------------------------------------------ drivers
def machine_facts(comm) -> dict:
    """Device, world size, every rank's host and device name, which ranks share a GPU (`gpu_sharing`,
    None when none do), library versions (a group step)."""
    device = comm.device
    mine = {"host": socket.gethostname(), "device": str(device),
            "name": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")}
    ranks = comm.exchange(mine)
    facts = {"device": device.type, "world_size": comm.world_size, "ranks": ranks, "shared_gpu": gpu_sharing(ranks),
             "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        facts["cuda"] = torch.version.cuda
        try:
            facts["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001 - only informative
            pass
    return facts


def main_rank(comm, cfg: BenchConfig) -> Optional[dict]:
    """Rank body of the main phase. Returns the results document on rank 0, None elsewhere."""
    from fuser_moe import bench_report

    disable_multicast()
    facts = machine_facts(comm)
    bench = MainBench(comm, cfg, 0, shared_gpu=facts["shared_gpu"])
    bench.total_cases = bench.measurements()
    document = bench_report.new_document(cfg, facts) if comm.rank == 0 else None
    if document is not None and cfg.progress:
        shared = f"; {facts['shared_gpu']}" if facts["shared_gpu"] else ""
        print(f"bench: W={comm.world_size} {facts['ranks'][0]['name']} ({comm.device.type}{shared}), "
              f"T in {cfg.tokens}, "
              f"H={cfg.hidden}, K={cfg.topk}, E={cfg.experts}, {cfg.dtype}; {bench.total_cases} measurements",
              file=sys.stderr, flush=True)
    return bench.run(document)


def _skip_symm_mem(document: dict, cfg: BenchConfig, reason: str) -> None:
    for tokens in cfg.tokens:
        for op in OPS:
            document["results"].append({
                "tokens": tokens, "workloads": cfg.labels(tokens), "backend": "all_to_all_vdev_2d",
                "mode": "capacity", "op": op, "status": "skipped", "reason": reason, "note": None,
                "capacity": None, "checked": False, "emulated": False})


def run_benchmark(cfg: BenchConfig, device: str, world_size: int, timeout_s: float,
                  symm_mem_timeout_s: float = 300.0) -> dict:
    """Starts `world_size` ranks on this host and measures everything `cfg` asks for.

    The main phase (backends and the all_to_all_single baseline) runs in one set of processes; torch's
    all_to_all_vdev_2d baseline runs afterwards in fresh processes of its own, so that NVSHMEM (its
    initialisation, its heap) cannot disturb the main numbers and a failure there only costs that
    baseline (its rows then say why it was skipped).

    Args:
        cfg: what to measure. device: "cpu", "cuda" (rank i on GPU i) or "cuda:N" (every rank on GPU N:
            with world_size > 1 the nccl backend and the NCCL baselines are skipped, `shared_gpu_skips`).
        world_size: ranks.
        timeout_s: the main phase's limit; symm_mem_timeout_s: the baseline phase's limit.
    Returns: the results document (fuser_moe/bench_report.py), finalized.
    Raises: `fuser_moe.launch.RankFailure` when the main phase fails.
    """
    from fuser_moe import bench_report, bench_symm_mem
    from fuser_moe.launch import RankFailure, spawn

    disable_multicast()
    document = spawn(main_rank, world_size, (cfg,), device=device, timeout_s=timeout_s)[0]
    if "all_to_all_vdev_2d" in cfg.baselines:
        reason = shared_gpu_skips(launch_sharing(device, world_size)).get("all_to_all_vdev_2d") \
            or bench_symm_mem.unavailable_reason(device)
        if reason is not None:
            _skip_symm_mem(document, cfg, reason)
        else:
            try:
                document["results"] += spawn(bench_symm_mem.symm_mem_rank, world_size, (cfg,), device=device,
                                             timeout_s=symm_mem_timeout_s)[0]
            except RankFailure as exc:
                _skip_symm_mem(document, cfg, f"the all_to_all_vdev_2d phase failed: {_first_error(exc)}")
    return bench_report.finalize(document)


def run_under_launcher(cfg: BenchConfig, device: str) -> Optional[dict]:
    """Runs every phase on the ranks a launcher (torchrun, SLURM, Open MPI) started, in this process.

    Returns: the finalized results document on rank 0, None on the other ranks.
    """
    from fuser_moe import bench_report, bench_symm_mem
    from fuser_moe.backends.communicator import Communicator

    disable_multicast()
    comm = Communicator.from_environment(device=device)
    try:
        document = main_rank(comm, cfg)
        if "all_to_all_vdev_2d" in cfg.baselines:
            where = comm.exchange({"host": socket.gethostname(), "device": str(comm.device)})
            reason = shared_gpu_skips(gpu_sharing(where)).get("all_to_all_vdev_2d") \
                or bench_symm_mem.unavailable_reason(comm.device.type)
            if reason is not None:
                if document is not None:
                    _skip_symm_mem(document, cfg, reason)
            else:
                records = bench_symm_mem.symm_mem_rank(comm, cfg)
                if document is not None:
                    document["results"] += records
    finally:
        comm.close()
    return None if document is None else bench_report.finalize(document)


def _first_error(exc: BaseException) -> str:
    """The last line of the first traceback in a RankFailure (the exception itself), shortened."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("--- rank") and i + 1 < len(lines):
            body = []
            for follower in lines[i + 1:]:
                if follower.startswith("--- rank"):
                    break
                body.append(follower)
            return f"{line.strip('- ')}: {body[-1] if body else ''}"[:300]
    return (lines[-1] if lines else str(exc))[:300]


def config_dict(cfg: BenchConfig) -> dict:
    """The config as JSON-friendly data (tuples become lists)."""
    data = asdict(cfg)
    data["tokens"] = cfg.tokens
    return data
