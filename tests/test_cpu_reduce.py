"""The fused CPU reductions of backends/cpu_reduce.py: the same bits as the torch passes and the reference.

Unit tests run the plan's reductions both ways (`FUSER_MOE_CPU_REDUCE=0` and `=1`) on rows with NaN,
infinities, signed zeros and values over twelve orders of magnitude; the multi-rank test runs both
backends' combines on CPU ranks with the fused loop forced, and with the default size rule on rows
big enough to take it, against the single-process reference.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fuser_moe.backends import cpu_reduce, routing

needs_numba = pytest.mark.skipif(importlib.util.find_spec("numba") is None,
                                 reason="Numba is not installed (pip install 'fuser_moe[cpu]')")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _rows(dtype, rows, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, hidden, generator=gen) * torch.logspace(-6, 6, rows).unsqueeze(1)
    h = torch.arange(4) % hidden
    y[torch.arange(4), h] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    y[4] = -0.0
    y[5:8, 0] = torch.tensor([3.0e38, 3.0e38, -3.0e38])  # sums that overflow to infinity
    return y.to(dtype)


def _both_ways(monkeypatch, fn):
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "0")
    torch_way = fn()
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "1")
    fused_way = fn()
    return torch_way, fused_way


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("hidden", [1, 7, 96])
def test_fused_reductions_give_the_torch_bits(monkeypatch, dtype, hidden):
    rows, groups, tokens = 400, 150, 60
    gen = torch.Generator().manual_seed(hidden)
    y = _rows(dtype, rows, hidden, hidden)
    w = torch.rand(rows, generator=gen)
    w[6], w[7] = -0.0, 0.0
    group = torch.randint(-1, groups, (rows,), generator=gen)  # -1: a padding row, in no group
    group[:groups] = torch.arange(groups)[torch.randperm(groups, generator=gen)]
    group[5:8] = group[5]  # rows 5-7 share a group: its sum overflows to infinity, and an emptied group stays 0
    w[5:8] = 1.0
    token = torch.randint(0, tokens - 5, (groups,), generator=gen)  # the last tokens get no partial

    def reduce():
        partials = routing.weighted_partials(y, w, group, groups)
        sums = routing.weighted_sums(y, w, group, groups).clone()
        into = torch.full((groups, hidden), 7.0, dtype=dtype)
        routing.weighted_partials(y, w, group, groups, out=into)
        pieces = [torch.empty(40, hidden, dtype=dtype), torch.empty(groups - 40, hidden, dtype=dtype)]
        routing.weighted_partials(y, w, group, groups, pieces=[(0, pieces[0]), (40, pieces[1])])
        combined = routing.sum_partials(partials, token, tokens, [groups])
        return partials, sums, into, torch.cat(pieces), combined

    for name, a, b in zip(("partials", "sums", "out=", "pieces", "combined"), *_both_ways(monkeypatch, reduce)):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(_bits(a), _bits(b)), f"{name}: the fused loop's bits differ from torch's"


@needs_numba
def test_fused_reductions_keep_the_row_order(monkeypatch):
    """Float32 addition is not associative: sums of rows of very different sizes show any reordering."""
    hidden, rows = 8, 64
    y = (torch.logspace(-8, 8, rows).unsqueeze(1) * torch.randn(rows, hidden)).to(torch.float32)
    w = torch.ones(rows)
    group = torch.zeros(rows, dtype=torch.int64)
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "1")
    got = routing.weighted_partials(y, w, group, 1)
    expected = torch.zeros(hidden)
    for r in range(rows):
        expected = expected + y[r] * w[r]
    assert torch.equal(_bits(got[0]), _bits(expected))


def test_when_the_fused_loop_is_not_used_the_reason_is_named(monkeypatch):
    bf16 = torch.zeros(512, 256, dtype=torch.bfloat16)
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "0")
    assert cpu_reduce.reason_unused(bf16) == "FUSER_MOE_CPU_REDUCE=0"
    monkeypatch.delenv("FUSER_MOE_CPU_REDUCE")
    assert "float16" in cpu_reduce.reason_unused(bf16.half())
    assert "contiguous" in cpu_reduce.reason_unused(bf16.t())
    assert "float64 weights" in cpu_reduce.reason_unused(bf16, torch.zeros(512, dtype=torch.float64))
    small = torch.zeros(4, 8, dtype=torch.bfloat16)
    assert "FUSER_MOE_CPU_REDUCE_MIN" in cpu_reduce.reason_unused(small)
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE_MIN", "16")
    if importlib.util.find_spec("numba") is None:
        assert "Numba is not installed" in cpu_reduce.reason_unused(small)
    else:
        assert cpu_reduce.reason_unused(small) is None


@pytest.mark.parametrize("name, value", [("FUSER_MOE_CPU_REDUCE", "yes"), ("FUSER_MOE_CPU_REDUCE_MIN", "-1"),
                                         ("FUSER_MOE_CPU_REDUCE_MIN", "lots")])
def test_a_bad_setting_is_named(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        cpu_reduce.reason_unused(torch.zeros(4, 8))


@needs_numba
def test_shapes_that_do_not_fit_are_refused_before_the_loop_runs():
    rows = torch.zeros(6, 4)
    with pytest.raises(ValueError, match="6 rows, 5 group indices"):
        cpu_reduce.grouped_sums(rows, None, torch.zeros(5, dtype=torch.int64), 2, [(0, torch.empty(2, 4))])
    with pytest.raises(ValueError, match="weights"):
        cpu_reduce.grouped_sums(rows, torch.ones(3), torch.zeros(6, dtype=torch.int64), 2, [(0, torch.empty(2, 4))])
    with pytest.raises(ValueError, match="groups from 1 of 2"):
        cpu_reduce.grouped_sums(rows, None, torch.zeros(6, dtype=torch.int64), 2, [(1, torch.empty(2, 4))])
    # an output of another dtype gets torch's cast of the float32 sums
    half = torch.empty(2, 4, dtype=torch.float16)
    cpu_reduce.grouped_sums(rows + 1, None, torch.tensor([0, 0, 1, 1, 1, -1]), 2, [(0, half)])
    assert half.tolist() == [[2.0] * 4, [3.0] * 4]


@needs_numba
def test_the_nan_probe_agrees_with_torchs_cast():
    cpu_reduce._load()
    if cpu_reduce._nan_bits is None:
        pytest.skip("torch's cast gives NaNs different bits by length here: the fused loop leaves NaNs to it")
    cast = torch.full((33,), float("nan")).to(torch.bfloat16).view(torch.int16)
    assert {int(b) & 0xFFFF for b in cast.tolist()} == {cpu_reduce._nan_bits}


def fused_combine_body(comm, backend, mode, hidden, dtype):
    """Both combines (with the dispatch's handle and without) on CPU ranks, the fused loop on or by the
    size rule; returns how many reductions it served."""
    from moe_cases import Case, assert_same, rank_inputs, make_inputs

    from fuser_moe.executors import get_backend
    from fuser_moe.reference import reference_combine, reference_dispatch

    if mode is None:
        os.environ.pop("FUSER_MOE_CPU_REDUCE", None)
    else:
        os.environ["FUSER_MOE_CPU_REDUCE"] = mode
    served = [0]
    real = cpu_reduce.grouped_sums

    def counted(*args, **kwargs):
        served[0] += 1
        return real(*args, **kwargs)

    cpu_reduce.grouped_sums = counted
    try:
        impl = get_backend(backend)
        case = Case(comm.world_size, 4, num_experts=4 * comm.world_size, hidden=hidden, dtype=dtype,
                    tokens=[48, 0, 33][:comm.world_size], seed=7)
        xs, idxs, ws = make_inputs(case)
        ref = reference_dispatch(xs, idxs, ws, case.num_experts, None, None)
        ys = [torch.nn.functional.silu(r.recv_x) for r in ref]
        ref_out = reference_combine(ys, [r.recv_topk_weights for r in ref], [r.recv_src_idx for r in ref],
                                    [r.recv_src_rank for r in ref], [x.shape[0] for x in xs])
        x, idx, w = rank_inputs(comm, case)
        d, handle = impl.dispatch(comm, x, idx, w, num_experts=case.num_experts, return_handle=True)
        y = torch.nn.functional.silu(d.recv_x)
        args = (comm, y, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                d.n_tokens_from_rank, x.shape[0])
        for h in (handle, None):
            assert_same("combined_x", impl.combine(*args, handle=h), ref_out[comm.rank], comm.rank)
    finally:
        cpu_reduce.grouped_sums = real
    return served[0]


@needs_numba
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("mode, hidden", [("1", 24), (None, 1024)], ids=["forced", "by_size"])
def test_combines_with_the_fused_loop_give_the_reference_bits(backend, mode, hidden, dtype):
    from harness import TEST_DEVICE, run_on_ranks

    if TEST_DEVICE != "cpu":
        pytest.skip("the fused loop serves CPU tensors")
    served = run_on_ranks(3, fused_combine_body, backend, mode, hidden, dtype)
    assert served[0] > 0, "the fused loop never ran on rank 0"
