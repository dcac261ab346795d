"""Inputs and rank bodies shared by the multi-rank tests.

Every rank builds the inputs of *all* ranks from one seed, runs the fusion on its own share through
the backend under test, and compares its outputs with the single-process reference bit for bit.
Functions here run inside the harness's rank processes, so they are module-level and take the
rank's `Communicator` first.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from fuser_moe import CommunicatorBackend, DataType, FusionDefinition
from fuser_moe.reference import reference_combine, reference_dispatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IR_DTYPES = {torch.float32: DataType.Float, torch.bfloat16: DataType.BFloat16, torch.float16: DataType.Half}


@dataclass
class Case:
    """One routing scenario for every rank of a world."""

    world_size: int
    top_k: int
    num_experts: int = 8
    hidden: int = 16
    tokens: Optional[list] = None  # tokens per rank; default 24 each
    dtype: str = "bfloat16"
    routing: str = "random"  # random | one_rank | empty_slots | all_empty
    expert_to_rank: Optional[list] = None
    max_recv_tokens: Optional[int] = None
    idx_dtype: str = "int64"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def token_counts(self) -> list:
        return self.tokens if self.tokens is not None else [24] * self.world_size


def make_inputs(case: Case):
    """(xs, topk_idxs, topk_weights) for every rank, on the CPU."""
    gen = torch.Generator().manual_seed(1000 + case.seed)
    dtype = DTYPES[case.dtype]
    E, K = case.num_experts, case.top_k
    xs, idxs, ws = [], [], []
    for r, T in enumerate(case.token_counts()):
        x = torch.randn(T, case.hidden, generator=gen).to(dtype)
        if case.routing == "one_rank":  # every token of every rank picks experts of rank 0 only
            pool = [e for e in range(E) if _rank_of(case, e) == 0]
            idx = torch.stack([torch.tensor(pool)[torch.randperm(len(pool), generator=gen)[:K]]
                               for _ in range(T)]) if T else torch.empty(0, K, dtype=torch.int64)
        else:
            idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else \
                torch.empty(0, K, dtype=torch.int64)
        if case.routing == "empty_slots" and T:
            idx[torch.rand(T, K, generator=gen) < 0.3] = -1
            idx[0] = -1  # one token routed nowhere
        if case.routing == "all_empty":
            idx[:] = -1
        w = torch.rand(T, K, generator=gen)
        w = w / w.sum(dim=1, keepdim=True).clamp(min=1e-6)
        xs.append(x)
        idxs.append(idx.to(getattr(torch, case.idx_dtype)))
        ws.append(w.float())
    return xs, idxs, ws


def _rank_of(case: Case, e: int) -> int:
    if case.expert_to_rank is not None:
        return case.expert_to_rank[e]
    return e // (case.num_experts // case.world_size)


def build_fusion(case: Case, backend: str, expert_fn: str = "identity") -> FusionDefinition:
    dt = IR_DTYPES[DTYPES[case.dtype]]
    idx_dt = DataType.Int if case.idx_dtype == "int64" else DataType.Int32
    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, case.hidden], dtype=dt, name="x")
        idx = fd.define_tensor(shape=[-1, case.top_k], dtype=idx_dt, name="topk_idx")
        w = fd.define_tensor(shape=[-1, case.top_k], dtype=DataType.Float, name="topk_weights")
        d = fd.ops.moe_dispatch(x, idx, w, num_experts=case.num_experts, expert_to_rank=case.expert_to_rank,
                                backend=CommunicatorBackend.parse(backend), max_recv_tokens=case.max_recv_tokens)
        y = d.recv_x
        if expert_fn == "silu":
            y = fd.ops.silu(y)
        out = fd.ops.moe_combine(y, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                                 d.n_tokens_from_rank, num_tokens=fd.ops.size(x, 0), backend=CommunicatorBackend.parse(backend))
        for v in d:
            fd.add_output(v)
        fd.add_output(out)
    return fd


def assert_same(name: str, got: torch.Tensor, want: torch.Tensor, rank: int) -> None:
    got = got.detach().cpu()
    if got.dtype != want.dtype or got.shape != want.shape:
        raise AssertionError(f"rank {rank}: {name}: got {got.dtype}{list(got.shape)}, want {want.dtype}{list(want.shape)}")
    if not torch.equal(got.view(-1).view(torch.uint8) if got.is_floating_point() else got,
                       want.view(-1).view(torch.uint8) if want.is_floating_point() else want):
        diff = (got.float() - want.float()).abs()
        where = (diff > 0).nonzero()[:5].tolist() if got.is_floating_point() else (got != want).nonzero()[:5].tolist()
        raise AssertionError(f"rank {rank}: {name} differs from the reference (bitwise) at {where}; "
                             f"max abs diff {diff.max().item() if diff.numel() else 0}")


def run_case(comm, case: Case, backend: str, expert_fn: str = "identity") -> dict:
    """Rank body: dispatch + (expert) + combine through the frontend, compared with the reference."""
    device = comm.device
    xs, idxs, ws = make_inputs(case)
    ref = reference_dispatch(xs, idxs, ws, case.num_experts, case.expert_to_rank, case.max_recv_tokens)
    ys = [r.recv_x for r in ref]
    if expert_fn == "silu":
        ys = [torch.nn.functional.silu(y) for y in ys]
    ref_combined = reference_combine(ys, [r.recv_topk_weights for r in ref], [r.recv_src_idx for r in ref],
                                     [r.recv_src_rank for r in ref], [x.shape[0] for x in xs])
    fd = build_fusion(case, backend, expert_fn)
    r = comm.rank
    outs = fd.execute([xs[r].to(device), idxs[r].to(device), ws[r].to(device)], communicator=comm, trace=True)
    for name, got, want in zip(ref[r]._fields, outs[:8], ref[r]):
        assert_same(name, got, want, r)
    assert_same("combined_x", outs[8], ref_combined[r], r)
    events = fd.last_trace.events
    return {"backends": [e.backend for e in events if e.backend], "rows": int(outs[0].shape[0]),
            "syncs": [e.host_syncs for e in events]}


def rank_inputs(comm, case: Case):
    """This rank's share of `make_inputs(case)`, on the rank's device."""
    xs, idxs, ws = make_inputs(case)
    r, dev = comm.rank, comm.device
    return xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)


def expect_error(exc_type, fn) -> str:
    """Runs `fn`; returns the message of the `exc_type` it raised, fails on anything else or nothing."""
    try:
        fn()
    except exc_type as exc:
        return str(exc)
    except BaseException as exc:  # noqa: BLE001
        raise AssertionError(f"expected {exc_type.__name__}, got {type(exc).__name__}: {exc}") from exc
    raise AssertionError(f"expected {exc_type.__name__}, nothing was raised")
