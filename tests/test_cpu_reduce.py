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


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bfloat16", "float32"])
@pytest.mark.parametrize("hidden", [1, 7, 64])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "plain"])
def test_fused_sums_of_every_group_size_match_a_row_by_row_loop(monkeypatch, dtype, hidden, weighted):
    """Groups of 0, 1, 2, 3 and 9 rows (the loop writes a group's last row straight into its cast output
    row, and a group of one row never uses its float32 buffer), rows in a scattered order, against the
    contract's sum written out one row at a time: +0.0, then each float32 product added in row order,
    then the cast. A -0.0 product of a one-row group gives +0.0 (the sum starts at +0.0)."""
    sizes = [0, 1, 2, 3, 9, 1, 0, 2]
    gen = torch.Generator().manual_seed(hidden)
    group = torch.cat([torch.full((n,), g, dtype=torch.int64) for g, n in enumerate(sizes)] + [torch.tensor([-1])])
    group = group[torch.randperm(group.numel(), generator=gen)]
    y = _rows(dtype, group.numel(), hidden, seed=hidden)
    w = torch.rand(group.numel(), generator=gen)
    lone = int((group == 1).nonzero()[0])
    y[lone], w[lone] = -0.0, 0.5  # a one-row group whose product is -0.0
    y[int((group == 5).nonzero()[0])] = float("nan")  # a one-row group of NaNs
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "1")
    outs = [torch.empty(3, hidden, dtype=dtype), torch.empty(len(sizes) - 3, hidden, dtype=dtype)]
    loops = []
    real_loop = cpu_reduce.sums_loop
    monkeypatch.setattr(cpu_reduce, "sums_loop", lambda *args: loops.append(real_loop(*args)) or loops[-1])
    cpu_reduce.grouped_sums(y, w if weighted else None, group, len(sizes), [(0, outs[0]), (3, outs[1])])
    # bfloat16 rows of even length are summed two elements a uint32 word, the others one by one
    assert loops == ["pairs" if dtype == torch.bfloat16 and hidden % 2 == 0 else "elements"] * 2
    wide = torch.empty(len(sizes), hidden, dtype=torch.float32)
    cpu_reduce.grouped_sums(y, w if weighted else None, group, len(sizes), [(0, wide)])
    for g in range(len(sizes)):
        expected = torch.zeros(hidden)
        for r in (group == g).nonzero().flatten().tolist():  # ascending row order
            expected = expected + (y[r].float() * w[r] if weighted else y[r].float())
        assert torch.equal(_bits(torch.cat(outs)[g]), _bits(expected.to(dtype))), f"group {g} of {sizes[g]} rows"
        assert torch.equal(_bits(wide[g]), _bits(expected)), f"float32 sums of group {g} of {sizes[g]} rows"


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
    """A dispatch and both combines (with the dispatch's handle and without) on CPU ranks, the fused loops
    on or by the size rule, against the reference; returns how often each fused loop ran on this rank."""
    from moe_cases import Case, assert_same, rank_inputs, make_inputs

    from fuser_moe.executors import get_backend
    from fuser_moe.reference import reference_combine, reference_dispatch

    if mode is None:
        os.environ.pop("FUSER_MOE_CPU_REDUCE", None)
    else:
        os.environ["FUSER_MOE_CPU_REDUCE"] = mode
    served = {}
    real = {name: getattr(cpu_reduce, name) for name in ("grouped_sums", "expand_rows", "pack_meta", "sums_loop")}

    def counting(name):
        def counted(*args, **kwargs):
            result = real[name](*args, **kwargs)
            key = f"sums_loop {result}" if name == "sums_loop" else name  # which loop summed
            served[key] = served.get(key, 0) + 1
            return result
        return counted

    for name in real:
        setattr(cpu_reduce, name, counting(name))
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
        mine = ref[comm.rank]
        for field in ("recv_x", "recv_topk_idx", "recv_topk_weights", "recv_src_idx", "recv_src_rank"):
            assert_same(field, getattr(d, field), getattr(mine, field), comm.rank)
        y = torch.nn.functional.silu(d.recv_x)
        args = (comm, y, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                d.n_tokens_from_rank, x.shape[0])
        for h in (handle, None):
            assert_same("combined_x", impl.combine(*args, handle=h), ref_out[comm.rank], comm.rank)
    finally:
        for name, fn in real.items():
            setattr(cpu_reduce, name, fn)
    return served


@needs_numba
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("mode, hidden", [("1", 24), (None, 1024)], ids=["forced", "by_size"])
def test_combines_with_the_fused_loop_give_the_reference_bits(backend, mode, hidden, dtype):
    """Dispatch and combine on 3 CPU ranks with the fused loops, against the reference."""
    from harness import TEST_DEVICE, run_on_ranks

    if TEST_DEVICE != "cpu":
        pytest.skip("the fused loop serves CPU tensors")
    served = run_on_ranks(3, fused_combine_body, backend, mode, hidden, dtype)[0]
    assert served.get("grouped_sums"), f"the fused sums never ran on rank 0: {served}"
    assert served.get("expand_rows"), f"the fused expansion never ran on rank 0: {served}"
    loop = "pairs" if dtype == "bfloat16" else "elements"  # bfloat16 rows of even length: two a word
    assert served.get(f"sums_loop {loop}"), f"the fused sums never took the {loop} loop on rank 0: {served}"
    if mode == "1":
        assert served.get("pack_meta"), f"the fused metadata never ran on rank 0: {served}"


# ----------------------------------------------------------------------------------- the expansion
def _received(n_wire, top_k, hidden, dtype, seed, packed):
    """Received wire rows and their metadata as the plan writes them: every slot naming this rank gets
    an output row (a permutation of the pairs), the others -1; packed: the nccl layout (x rows and
    metadata in one uint8 wire row), else separate contiguous buffers (the shared-memory layout)."""
    gen = torch.Generator().manual_seed(seed)
    here = torch.rand(n_wire, top_k, generator=gen) < 0.6
    here[:, 0] |= ~here.any(1)  # every wire row names at least one slot here
    pairs = int(here.sum())
    rows = torch.full((n_wire, top_k), -1, dtype=torch.int64)
    rows[here] = torch.randperm(pairs, generator=gen)
    experts = torch.where(here, torch.randint(0, 64, (n_wire, top_k), generator=gen), -1)
    weights = routing.pack_weights(torch.rand(n_wire, top_k, generator=gen))
    token = torch.randint(0, 4096, (n_wire, 1), generator=gen)
    source = torch.randint(0, 8, (n_wire, 1), generator=gen)
    meta = torch.cat([token, source, rows, experts, weights], dim=1)
    x = torch.randn(n_wire, hidden, generator=gen).to(dtype)
    if not packed:
        return meta, x, pairs
    wire, meta_view = routing.wire_buffer(x, torch.arange(n_wire), meta.shape[1])
    meta_view.copy_(meta)
    x_in, meta_in = routing.unpack_wire_rows(wire.clone(), dtype, hidden, meta.shape[1])
    return meta_in, x_in, pairs


@needs_numba
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.float8_e4m3fn],
                         ids=["bfloat16", "float32", "float16", "float8"])
@pytest.mark.parametrize("top_k", [1, 3, 8])
@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
@pytest.mark.parametrize("spare", [0, 5, -3], ids=["exact", "padding", "overflow"])
def test_the_fused_expansion_gives_the_torch_rows(monkeypatch, dtype, top_k, packed, spare):
    hidden = 7 if top_k == 3 else 96
    meta, x, pairs = _received(300, top_k, hidden, dtype, seed=top_k, packed=packed)
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "1")
    assert cpu_reduce.expand_unused(x, meta) is None
    torch_way, fused_way = _both_ways(monkeypatch, lambda: routing.expand(meta, x, top_k, pairs, pairs + spare))
    for field in ("recv_x", "topk_idx", "topk_weights", "src_idx", "src_rank", "wire_row"):
        a, b = getattr(torch_way, field), getattr(fused_way, field)
        assert a.dtype == b.dtype and a.shape == b.shape, field
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), f"{field}: the fused expansion differs"


@needs_numba
def test_the_fused_expansion_takes_no_rows_and_names_why_it_is_not_used(monkeypatch):
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "1")
    meta, x, _ = _received(0, 2, 16, torch.bfloat16, seed=0, packed=False)
    got = routing.expand(meta, x, 2, 0, 4)  # no wire row, capacity 4: four padding rows
    assert torch.equal(got.recv_x, torch.zeros(4, 16, dtype=torch.bfloat16)) and got.wire_row.numel() == 0
    assert got.src_rank.tolist() == [-1] * 4 and got.topk_weights.tolist() == [0.0] * 4
    assert "contiguous" in cpu_reduce.expand_unused(torch.zeros(8, 4).t(), torch.zeros(4, 8, dtype=torch.int64))
    assert "int64" in cpu_reduce.expand_unused(torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="K=2 wants 8"):
        cpu_reduce.expand_rows(torch.zeros(4, 7, dtype=torch.int64), torch.zeros(4, 8), 2, 0, 0, routing.meta_layout(2))
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "0")
    assert cpu_reduce.expand_unused(torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.int64)) == "FUSER_MOE_CPU_REDUCE=0"


# ------------------------------------------------------------------------------------- the metadata
@needs_numba
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=["int64", "int32"])
@pytest.mark.parametrize("top_k", [1, 4, 9])
@pytest.mark.parametrize("into_wire", [False, True], ids=["own", "wire-view"])
def test_the_fused_metadata_gives_the_torch_words(monkeypatch, index_dtype, top_k, into_wire):
    tokens, experts, world, rank = 300, 36, 4, 2
    gen = torch.Generator().manual_seed(top_k)
    placement = routing.make_placement(experts, world, None, "cpu")
    idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    idx[::7, 0] = -1  # empty slots
    idx[::11, -1] = experts + 3  # an id outside [0, E) (only unchecked input has one): no rank takes it
    idx = idx.to(index_dtype)
    w = torch.rand(tokens, top_k, generator=gen)
    w[0, 0] = -0.0
    x = torch.randn(tokens, 24, generator=gen).to(torch.bfloat16)
    counts = routing.count_row(idx, placement)
    send = routing.send_rows(counts)
    matrix = torch.stack([counts.row] * world)
    out_rows = routing.place_pairs(idx, counts, matrix, placement, rank)

    def write():
        if into_wire:
            wire, meta = routing.wire_buffer(x, send.token, routing.meta_width(top_k))
            meta.fill_(7)
        else:
            meta = None
        partial = routing.wire_meta(idx, w, counts, None, send, rank, out=meta).clone()
        routing.wire_meta_rows(partial, counts, out_rows, send)
        whole = routing.wire_meta(idx, w, counts, out_rows, send, rank, out=meta)
        return partial, whole.clone()

    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "1")
    assert cpu_reduce.meta_unused(torch.empty(4, 8, dtype=torch.int64)) is None
    for name, a, b in zip(("in two steps", "at once"), *_both_ways(monkeypatch, write)):
        assert torch.equal(a, b), f"metadata {name}: the fused loop's words differ from torch's"


@needs_numba
def test_the_fused_metadata_checks_its_shapes_and_names_why_it_is_not_used(monkeypatch):
    monkeypatch.delenv("FUSER_MOE_CPU_REDUCE", raising=False)
    assert "words <" in cpu_reduce.meta_unused(torch.empty(10, 8, dtype=torch.int64))
    assert "int64" in cpu_reduce.meta_unused(torch.empty(1000, 8, dtype=torch.int32))
    assert "contiguous" in cpu_reduce.meta_unused(torch.empty(8, 1000, dtype=torch.int64).t())
    layout = routing.meta_layout(2)
    slots = torch.zeros(5, 2, dtype=torch.int64)
    with pytest.raises(ValueError, match="metadata"):
        cpu_reduce.pack_meta(torch.empty(3, 7, dtype=torch.int64), torch.zeros(3, dtype=torch.int64),
                             torch.zeros(3, dtype=torch.int64), slots, None, slots, slots, 0, layout)
    with pytest.raises(ValueError, match="names token 9 of 5"):
        cpu_reduce.pack_meta(torch.empty(1, 8, dtype=torch.int64), torch.tensor([9]), torch.zeros(1, dtype=torch.int64),
                             slots, None, slots, slots, 0, layout)
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "0")
    assert cpu_reduce.meta_unused(torch.empty(1000, 8, dtype=torch.int64)) == "FUSER_MOE_CPU_REDUCE=0"
    monkeypatch.setenv("FUSER_MOE_CPU_REDUCE", "yes")
    with pytest.raises(ValueError, match="FUSER_MOE_CPU_REDUCE must be"):
        cpu_reduce.meta_unused(torch.empty(1000, 8, dtype=torch.int64))
