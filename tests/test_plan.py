"""The routing plan of backends/routing.py, stage by stage (docs/contract.md sections 3, 4 and 8).

CPU: the torch twin, run for every rank of a world in one process (rows "travel" by concatenation),
against the single-process reference, bit for bit; the order of `index_add_` the twin relies on; the
constants Python mirrors from the kernels. GPU: the kernels of backends/kernels/moe.cu, run for two
virtual ranks on one GPU (peer pointers that point into the same device), against the torch twin at
every stage: count matrix, placement of rows (the wire metadata), expansion, grouping and partials.
"""
from __future__ import annotations

import ctypes
import re
from pathlib import Path

import pytest
import torch

from fuser_moe.backends import cuda, cuda_kernels, routing
from fuser_moe.backends.common import CommStats
from fuser_moe.reference import reference_combine, reference_dispatch

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        width = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(width).cpu(), b.contiguous().view(width).cpu())
    return torch.equal(a.cpu(), b.cpu())


def make_world(world, top_k, experts, dtype, seed, hidden=24, tokens=None, empty=0.0):
    gen = torch.Generator().manual_seed(seed)
    tokens = tokens or [int(t) for t in torch.randint(0, 40, (world,), generator=gen)]
    xs, idxs, ws = [], [], []
    for t in tokens:
        xs.append((torch.randn(t, hidden, generator=gen) * 4).to(dtype))
        idx = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(t)]) if t else \
            torch.empty(0, top_k, dtype=torch.int64)
        if empty and t:
            idx[torch.rand(t, top_k, generator=gen) < empty] = -1
        idxs.append(idx)
        ws.append(torch.randn(t, top_k, generator=gen))
    return xs, idxs, ws


def twin_world(xs, idxs, ws, experts, placement=None, capacity=None, device="cpu"):
    """The torch twin for every rank: per receiver, its expansion, and per sender, its send rows."""
    world, top_k = len(xs), idxs[0].shape[1]
    xs, idxs, ws = ([t.to(device) for t in ts] for ts in (xs, idxs, ws))
    plc = routing.make_placement(experts, world, placement, torch.device(device))
    counts = [routing.count_row(idx, plc) for idx in idxs]
    matrix = torch.stack([c.row for c in counts])
    host = matrix.tolist()
    sends, metas = [], []
    for r in range(world):
        rows = routing.place_pairs(idxs[r], counts[r], matrix, plc, r)
        send = routing.send_rows(counts[r])
        sends.append(send)
        metas.append(routing.wire_meta(idxs[r], ws[r], counts[r], rows, send, r))
    received = []
    for d in range(world):
        picks = [(sends[s].rank == d).nonzero().squeeze(1) for s in range(world)]
        meta_in = torch.cat([metas[s][picks[s]] for s in range(world)])
        x_in = torch.cat([xs[s][sends[s].token[picks[s]]] for s in range(world)])
        wire = routing.pack_wire_rows(x_in, torch.arange(x_in.shape[0], device=device), meta_in)
        x_view, meta_view = routing.unpack_wire_rows(wire, x_in.dtype, x_in.shape[1], meta_in.shape[1])
        per_expert = routing.pairs_of_rank(host, plc, d)
        pairs = sum(per_expert)
        exp = routing.expand(meta_view, x_view, top_k, pairs, pairs if capacity is None else capacity)
        received.append((exp, meta_in, per_expert))
    return plc, counts, matrix, sends, received


def twin_combine(ys, received, sends, tokens, world, by_handle=True):
    """Combine for every rank with the twin: partials per expert rank, then each source's sum."""
    partials = []
    for d in range(world):
        exp, meta_in, _ = received[d]
        pairs = exp.wire_row.numel()
        if by_handle:
            partials.append(routing.weighted_partials(ys[d][:pairs], exp.topk_weights[:pairs], exp.wire_row,
                                                      meta_in.shape[0]))
        else:
            groups = routing.group_rows(exp.src_rank, exp.src_idx)
            partials.append(routing.weighted_partials(ys[d], exp.topk_weights, groups.row_group, groups.n_groups))
    out = []
    for s in range(world):
        chunks, splits = [], []
        for d in range(world):
            src = received[d][1][:, routing.META_SOURCE]
            chunk = partials[d][(src == s).nonzero().squeeze(1)]
            chunks.append(chunk)
            splits.append(chunk.shape[0])
        out.append(routing.sum_partials(torch.cat(chunks), sends[s].token, tokens[s], splits))
    return out


# ------------------------------------------------------------------------------------------ CPU
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("top_k", [1, 4])
@pytest.mark.parametrize("world", [1, 3, 4])
def test_torch_twin_matches_the_reference(world, top_k, dtype):
    experts = 4 * world * max(1, top_k // 2)
    xs, idxs, ws = make_world(world, top_k, experts, DTYPES[dtype], seed=world * 10 + top_k, empty=0.2)
    _, _, _, sends, received = twin_world(xs, idxs, ws, experts)
    ref = reference_dispatch(xs, idxs, ws, experts)
    for d in range(world):
        exp, _, per_expert = received[d]
        for name, got in (("recv_x", exp.recv_x), ("recv_topk_idx", exp.topk_idx),
                          ("recv_topk_weights", exp.topk_weights), ("recv_src_idx", exp.src_idx),
                          ("recv_src_rank", exp.src_rank)):
            assert same_bits(got, getattr(ref[d], name)), (d, name)
        assert per_expert == ref[d].n_tokens_per_expert.tolist()
    ys = [torch.nn.functional.silu(r[0].recv_x.float()).to(r[0].recv_x.dtype) for r in received]
    tokens = [x.shape[0] for x in xs]
    expected = reference_combine(ys, [r[0].topk_weights for r in received], [r[0].src_idx for r in received],
                                 [r[0].src_rank for r in received], tokens)
    for by_handle in (True, False):
        got = twin_combine(ys, received, sends, tokens, world, by_handle)
        assert all(same_bits(g, e) for g, e in zip(got, expected)), by_handle


def test_torch_twin_with_a_placement_and_capacity_padding():
    world, experts, capacity = 3, 10, 200
    placement = [(e * 7) % 2 + 1 for e in range(experts)]  # rank 0 holds none
    xs, idxs, ws = make_world(world, 3, experts, torch.bfloat16, seed=5, tokens=[0, 17, 30])
    _, _, _, _, received = twin_world(xs, idxs, ws, experts, placement, capacity=capacity)
    ref = reference_dispatch(xs, idxs, ws, experts, placement, max_recv_tokens=capacity)
    for d in range(world):
        exp = received[d][0]
        assert exp.recv_x.shape[0] == capacity
        assert same_bits(exp.recv_x, ref[d].recv_x) and torch.equal(exp.src_rank, ref[d].recv_src_rank)
        assert torch.equal(exp.topk_idx, ref[d].recv_topk_idx) and torch.equal(exp.src_idx, ref[d].recv_src_idx)


def test_placement_of_every_pair_follows_the_contract_order():
    """Output rows of one receiver are a permutation of [0, V), in (local expert, source rank, token) order."""
    world, experts = 4, 16
    xs, idxs, ws = make_world(world, 4, experts, torch.float32, seed=3)
    plc, _, _, _, received = twin_world(xs, idxs, ws, experts)
    for d in range(world):
        exp = received[d][0]
        local = plc.local_index[exp.topk_idx]
        key = (local * world + exp.src_rank) * 1000 + exp.src_idx
        assert torch.all(key[1:] > key[:-1])


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_index_add_adds_rows_serially_in_index_order(threads):
    """weighted_partials and sum_partials rely on it (docs/contract.md section 4's summation order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        rows, groups, hidden = 3000, 700, 64
        index = torch.randint(0, groups, (rows,), generator=gen)
        values = torch.randn(rows, hidden, generator=gen) * torch.logspace(-6, 6, rows).unsqueeze(1)
        got = torch.zeros(groups, hidden).index_add_(0, index, values)
        expected = torch.zeros(groups, hidden)
        for i in range(rows):  # the order the contract fixes
            expected[index[i]] = expected[index[i]] + values[i]
        assert same_bits(got, expected)
    finally:
        torch.set_num_threads(before)


def test_sums_start_at_positive_zero():
    """A partial of -0.0 products is +0.0, as in the reference (+0.0 + -0.0)."""
    y = torch.tensor([[-0.0, 1.0]])
    w = torch.tensor([1.0])
    partial = routing.weighted_partials(y, w, torch.tensor([0]), 1)
    assert same_bits(partial, torch.tensor([[0.0, 1.0]]))
    combined = routing.sum_partials(torch.tensor([[-0.0, 2.0]]), torch.tensor([0]), 2, [1])
    assert same_bits(combined, torch.tensor([[0.0, 2.0], [0.0, 0.0]]))


def _constants(path: Path) -> dict:
    return {name: int(value) for name, value in
            re.findall(r"constexpr int (FM_[A-Z0-9_]+) = (\d+);", path.read_text())}


def test_python_mirrors_the_kernels_constants():
    moe = _constants(REPO / "backends" / "kernels" / "moe.cu")
    assert moe["FM_MAX_TOP_K"] == cuda.MAX_KERNEL_TOP_K == cuda_kernels.MAX_KERNEL_TOP_K
    assert moe["FM_GROUP_CAP"] == cuda.GROUP_CAP
    errors = {"FM_ERR_NEEDED": cuda.ERR_NEEDED, "FM_ERR_GIVEN": cuda.ERR_GIVEN, "FM_ERR_BAD_ROW": cuda.ERR_BAD_ROW,
              "FM_ERR_BIG_GROUP": cuda.ERR_BIG_GROUP, "FM_ERR_TIMEOUT": cuda.ERR_TIMEOUT,
              "FM_ERR_COMBINE_TIMEOUT": cuda.ERR_COMBINE_TIMEOUT}
    assert {k: moe[k] for k in errors} == errors
    summary = {"FM_SUM_WIRE_IN": cuda_kernels._SUM_WIRE_IN, "FM_SUM_PAIRS_IN": cuda_kernels._SUM_PAIRS_IN,
               "FM_SUM_MAX_WIRE_IN": cuda_kernels._SUM_MAX_WIRE_IN, "FM_SUM_MAX_TOKENS": cuda_kernels._SUM_MAX_TOKENS,
               "FM_SUM_SENT_REMOTE": cuda_kernels._SUM_SENT_REMOTE, "FM_SUM_RECV_REMOTE": cuda_kernels._SUM_RECV_REMOTE}
    assert {k: v for k, v in moe.items() if k.startswith("FM_SUM_")} == summary
    assert {k for k in moe if k.startswith("FM_ERR_")} == set(errors)
    assert _constants(REPO / "backends" / "kernels" / "fm_device.cuh")["FM_WARP"] == 32
    # The wire-metadata layout: token, source rank, then K rows, K experts, K weight bits.
    assert (routing.META_TOKEN, routing.META_SOURCE, routing.META_ROWS) == (0, 1, 2)
    assert routing.meta_width(8) == 2 + 3 * 8


def test_every_kernel_file_includes_the_shared_header():
    for source in sorted((REPO / "backends" / "kernels").glob("*.cu")):
        text = source.read_text()
        assert '#include "fm_device.cuh"' in text, source
        assert "typedef long long fm_i64" not in text, source  # defined once, in the header


# ------------------------------------------------------------------------------------------ GPU
def _gpu_skip_reason():
    if not torch.cuda.is_available():
        return "no CUDA device: the kernels' stage tests need a GPU"
    reason = cuda.CudaBackend().unavailable_reason(torch.device("cuda", 0))
    return reason


gpu = pytest.mark.skipif(_gpu_skip_reason() is not None, reason=str(_gpu_skip_reason()))


def _k(name):
    return cuda_kernels._kernel(name, torch.device("cuda", torch.cuda.current_device()))


def _ptrs(tensors):
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device="cuda")


def _kernel_world(xs, idxs, ws, experts, out_rows_of=None, self_direct=0):
    """Dispatch with moe.cu's kernels for every virtual rank on one GPU; returns per rank its count
    matrix, its receive buffers and its outputs. self_direct=1: as the cuda backend does, a rank's rows to
    itself skip the wire buffer and the expansion reads them from its x. Launches run in order on one
    stream, so each phase of every rank ends before the next begins (what the barriers do across GPUs)."""
    i32, i64, dev = torch.int32, torch.int64, torch.device("cuda")
    world, top_k, hidden = len(xs), idxs[0].shape[1], xs[0].shape[1]
    plc = routing.make_placement(experts, world, None, dev)
    row_len = world + experts + 1
    counts = [torch.zeros(world, row_len, dtype=i64, device=dev) for _ in range(world)]
    geometry = []
    for r in range(world):
        tokens = idxs[r].shape[0]
        chunk = min(cuda_kernels._MAX_CHUNK, max(1, -(-tokens // 16)))
        n_chunks = -(-tokens // chunk)
        chunk_e = torch.empty(experts, max(n_chunks, 1), dtype=i32, device=dev)
        chunk_d = torch.empty(world, max(n_chunks, 1), dtype=i32, device=dev)
        n_to = torch.empty(world, dtype=i64, device=dev)
        if n_chunks:
            _k("fuser_moe_dispatch_count_i64").launch(n_chunks, 256, [
                idxs[r], ctypes.c_int64(tokens), ctypes.c_int32(top_k), plc.expert_to_rank, ctypes.c_int64(experts),
                ctypes.c_int32(world), ctypes.c_int64(chunk), chunk_e, chunk_d])
        _k("fuser_moe_dispatch_notify").launch(1, 1024, [
            chunk_e, chunk_d, ctypes.c_int64(n_chunks), ctypes.c_int64(experts), ctypes.c_int32(world),
            ctypes.c_int32(r), ctypes.c_int64(tokens), _ptrs(counts), n_to, None])
        geometry.append((tokens, chunk, n_chunks, chunk_e, chunk_d, n_to))
    plans, summaries, n_froms, per_experts = [], [], [], []
    for r in range(world):
        plan = torch.empty(3 * experts + world, dtype=i64, device=dev)
        summary = torch.empty(8, dtype=i64, device=dev)
        n_from = torch.empty(world, dtype=i64, device=dev)
        per_expert = torch.empty(plc.n_local[r], dtype=i64, device=dev)
        _k("fuser_moe_dispatch_plan").launch(1, 1024, [
            counts[r], ctypes.c_int64(experts), ctypes.c_int32(world), ctypes.c_int32(r), plc.expert_to_rank,
            plc.expert_order, plc.rank_begin, plan, n_from, per_expert, summary, ctypes.c_int32(0), None])
        plans.append(plan), summaries.append(summary), n_froms.append(n_from), per_experts.append(per_expert)
    capacity = max(1, int(max(int(s[cuda_kernels._SUM_MAX_WIRE_IN]) for s in summaries)))
    width = routing.meta_width(top_k)
    x_bufs = [torch.zeros(capacity, hidden, dtype=xs[0].dtype, device=dev) for _ in range(world)]
    meta_bufs = [torch.zeros(capacity, width, dtype=i64, device=dev) for _ in range(world)]
    for r in range(world):
        tokens, chunk, n_chunks, chunk_e, chunk_d, _ = geometry[r]
        shared = 4 * (2 * chunk * top_k + ((chunk * world + 1) & ~1)) + 8 * chunk
        if n_chunks:
            _k("fuser_moe_dispatch_send_i64").launch(n_chunks, 256, [
                xs[r], ctypes.c_int64(hidden * xs[r].element_size()), idxs[r], ws[r], ctypes.c_int64(tokens),
                ctypes.c_int32(top_k), plc.expert_to_rank, ctypes.c_int64(experts), ctypes.c_int32(world),
                ctypes.c_int32(r), ctypes.c_int64(chunk), chunk_e, chunk_d, plans[r], _ptrs(x_bufs),
                _ptrs(meta_bufs), ctypes.c_int64(capacity), ctypes.c_int32(self_direct)], shared_mem=shared)
    outs = []
    for d in range(world):
        pairs = int(summaries[d][cuda_kernels._SUM_PAIRS_IN])
        rows = pairs if out_rows_of is None else out_rows_of
        recv = (torch.empty(rows, hidden, dtype=xs[0].dtype, device=dev), torch.empty(rows, dtype=i64, device=dev),
                torch.empty(rows, dtype=torch.float32, device=dev), torch.empty(rows, dtype=i64, device=dev),
                torch.empty(rows, dtype=i64, device=dev))
        errors = torch.zeros(4, dtype=i64, device=dev)
        _k("fuser_moe_dispatch_expand").launch(64, 256, [
            x_bufs[d], meta_bufs[d], ctypes.c_int64(capacity), ctypes.c_int64(hidden * xs[0].element_size()),
            ctypes.c_int32(top_k), summaries[d], ctypes.c_int64(rows), *recv, errors,
            xs[d] if self_direct else None, ctypes.c_int32(d)])
        outs.append(recv)
    torch.cuda.synchronize()
    return counts, meta_bufs, summaries, n_froms, per_experts, outs


@gpu
@pytest.mark.parametrize("world", [1, 4])
def test_notify_gives_the_same_counts_on_any_grid_and_plan_advances_the_call_counter(world):
    """notify (a warp per column of the count row) writes the same prefixes, count rows and n_to whether
    one block or many take the columns; with a call counter g its rows go to the count buffers of parity
    (g + 1) & 1, which plan then reads, advancing the counter to g + 1."""
    experts, tokens, top_k = 64 * world, 300, 4
    gen = torch.Generator().manual_seed(world)
    idx = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k].cuda()
    idx[::7, 1] = -1
    plc = routing.make_placement(experts, world, None, torch.device("cuda"))
    i32, i64, rank, chunk = torch.int32, torch.int64, world - 1, 8
    n_chunks = -(-tokens // chunk)
    row_len = world + experts + 1
    results = []
    for cap, counter in ((1, None), (3, None), (1 << 30, None), (1 << 30, 5)):
        chunk_e = torch.empty(experts, n_chunks, dtype=i32, device="cuda")
        chunk_d = torch.empty(world, n_chunks, dtype=i32, device="cuda")
        _k("fuser_moe_dispatch_count_i64").launch(n_chunks, 256, [
            idx, ctypes.c_int64(tokens), ctypes.c_int32(top_k), plc.expert_to_rank, ctypes.c_int64(experts),
            ctypes.c_int32(world), ctypes.c_int64(chunk), chunk_e, chunk_d])
        counts = [torch.full((2, world, row_len), -1, dtype=i64, device="cuda") for _ in range(world)]
        n_to = torch.empty(world, dtype=i64, device="cuda")
        gen_state = None if counter is None else torch.tensor([counter], dtype=i64, device="cuda")
        stats = CommStats()
        cuda_kernels.launch_notify(chunk_e, chunk_d, n_chunks, experts, world, rank, tokens, _ptrs(counts), n_to,
                                   gen_state, cap, stats)
        assert stats.sms == min(cap, -(-row_len // 8))
        parity = 0 if counter is None else (counter + 1) & 1
        rows = [c[parity, rank].cpu() for c in counts]
        assert all(torch.equal(r, rows[0]) for r in rows)  # every rank's copy of this rank's row
        assert all(bool((c[1 - parity] == -1).all()) for c in counts)  # the other parity untouched
        if gen_state is not None:
            summary = torch.empty(8, dtype=i64, device="cuda")
            sizes = (3 * experts + world, world, plc.n_local[rank])
            scratch = [torch.empty(n, dtype=i64, device="cuda") for n in sizes]
            _k("fuser_moe_dispatch_plan").launch(1, 1024, [
                counts[rank], ctypes.c_int64(experts), ctypes.c_int32(world), ctypes.c_int32(rank),
                plc.expert_to_rank, plc.expert_order, plc.rank_begin, *scratch, summary, ctypes.c_int32(0), gen_state])
            assert int(gen_state) == counter + 1
            assert int(summary[cuda_kernels._SUM_MAX_TOKENS]) == tokens  # it read the parity notify wrote
        results.append((chunk_e.cpu(), chunk_d.cpu(), rows[0], n_to.cpu()))
    # What the counts must be, from topk_idx on the host.
    host = idx.cpu()
    per_chunk_e = torch.zeros(experts, n_chunks, dtype=i64)
    per_chunk_d = torch.zeros(world, n_chunks, dtype=i64)
    e2r = plc.expert_to_rank.cpu()
    for t in range(tokens):
        chosen = [int(e) for e in host[t] if int(e) >= 0]
        for e in chosen:
            per_chunk_e[e, t // chunk] += 1
        for d in {int(e2r[e]) for e in chosen}:
            per_chunk_d[d, t // chunk] += 1
    want_row = torch.cat([per_chunk_d.sum(1), per_chunk_e.sum(1), torch.tensor([tokens])])
    for chunk_e, chunk_d, row, n_to in results:
        assert torch.equal(chunk_e.to(i64), per_chunk_e.cumsum(1) - per_chunk_e)  # exclusive prefixes
        assert torch.equal(chunk_d.to(i64), per_chunk_d.cumsum(1) - per_chunk_d)
        assert torch.equal(row, want_row)
        assert torch.equal(n_to, want_row[:world])


@gpu
@pytest.mark.parametrize("world", [1, 3, 4])
def test_plan_local_send_places_rows_in_the_senders_own_layout(world):
    """The NCCL backend's plan (local_send=1): base_d[d] is where d's rows start in this rank's own send
    buffer (the rows it sends to ranks before d); every other output is the cuda backend's plan's."""
    experts = 4 * world
    gen = torch.Generator().manual_seed(world)
    matrix = torch.randint(0, 50, (world, world + experts + 1), generator=gen).cuda()
    plc = routing.make_placement(experts, world, None, torch.device("cuda"))
    i64 = torch.int64
    for r in range(world):
        results = []
        for local_send in (0, 1):
            plan = torch.full((3 * experts + world,), -7, dtype=i64, device="cuda")
            n_from = torch.empty(world, dtype=i64, device="cuda")
            per_expert = torch.empty(plc.n_local[r], dtype=i64, device="cuda")
            summary = torch.empty(8, dtype=i64, device="cuda")
            _k("fuser_moe_dispatch_plan").launch(1, 1024, [
                matrix, ctypes.c_int64(experts), ctypes.c_int32(world), ctypes.c_int32(r), plc.expert_to_rank,
                plc.expert_order, plc.rank_begin, plan, n_from, per_expert, summary, ctypes.c_int32(local_send),
                None])
            results.append((plan.cpu(), n_from.cpu(), per_expert.cpu(), summary.cpu()))
        (plan0, *rest0), (plan1, *rest1) = results
        host = matrix.cpu()
        assert plan1[3 * experts:].tolist() == [int(host[r, :d].sum()) for d in range(world)]
        assert plan0[3 * experts:].tolist() == [int(host[:r, d].sum()) for d in range(world)]
        assert torch.equal(plan0[:3 * experts], plan1[:3 * experts])
        assert all(torch.equal(a, b) for a, b in zip(rest0, rest1))


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("top_k", [1, 4])
@pytest.mark.parametrize("self_direct", [0, 1], ids=["own_rows_on_the_wire", "own_rows_from_x"])
def test_kernels_and_torch_twin_agree_stage_by_stage(top_k, dtype, self_direct):
    world, experts = 2, 8
    xs, idxs, ws = make_world(world, top_k, experts, DTYPES[dtype], seed=top_k, empty=0.2, tokens=[37, 0 + 21])
    gx, gidx, gw = ([t.cuda() for t in ts] for ts in (xs, idxs, ws))
    counts, meta_bufs, summaries, n_froms, per_experts, outs = _kernel_world(gx, gidx, gw, experts,
                                                                             self_direct=self_direct)
    _, twin_counts, matrix, sends, received = twin_world(xs, idxs, ws, experts)
    for d in range(world):
        assert torch.equal(counts[d].cpu(), matrix), "count matrix"
        exp, meta_in, per_expert = received[d]
        n_in = meta_in.shape[0]
        assert int(summaries[d][cuda_kernels._SUM_WIRE_IN]) == n_in
        assert torch.equal(meta_bufs[d][:n_in].cpu(), meta_in), "wire metadata (placement of every pair)"
        assert n_froms[d].tolist() == matrix[:, d].tolist() and per_experts[d].tolist() == per_expert
        for got, want in zip(outs[d], (exp.recv_x, exp.topk_idx, exp.topk_weights, exp.src_idx, exp.src_rank)):
            assert same_bits(got, want), "expansion"
    # the torch twin on CUDA gives the CPU twin's bits
    _, _, cmatrix, csends, creceived = twin_world(xs, idxs, ws, experts, device="cuda")
    for d in range(world):
        assert same_bits(creceived[d][0].recv_x, received[d][0].recv_x)
    ys = [r[0].recv_x for r in received]
    tokens = [x.shape[0] for x in xs]
    cpu_out = twin_combine(ys, received, sends, tokens, world)
    for by_handle in (True, False):
        gpu_out = twin_combine([y.cuda() for y in ys], creceived, csends, tokens, world, by_handle)
        assert all(same_bits(g, c) for g, c in zip(gpu_out, cpu_out)), ("torch twin on CUDA", by_handle)

    # combine kernels: group, send (partials into the sources' dense layout), reduce
    dev, hidden = torch.device("cuda"), xs[0].shape[1]
    stride = max(tokens)
    suffix = cuda_kernels._DTYPE_SUFFIX[xs[0].dtype]
    parts = [torch.zeros(world * stride, hidden, dtype=xs[0].dtype, device=dev) for _ in range(world)]
    flags = [torch.zeros(world * stride, dtype=torch.int32, device=dev) for _ in range(world)]
    groups, gys = [], [y.cuda() for y in ys]
    for r in range(world):
        exp = creceived[r][0]
        rows = exp.src_idx.numel()
        group_count = torch.zeros(world * stride + 2, dtype=torch.int32, device=dev)
        group_rows = torch.empty(world * stride * cuda.GROUP_CAP, dtype=torch.int32, device=dev)
        errors = torch.zeros(4, dtype=torch.int64, device=dev)
        if rows:
            _k("fuser_moe_combine_group").launch(4, 256, [
                exp.src_idx, exp.src_rank, ctypes.c_int64(rows), ctypes.c_int32(world), ctypes.c_int64(stride),
                group_count, group_rows, errors])
        _k(f"fuser_moe_combine_send_{suffix}").launch(16, 256, [
            gys[r], ctypes.c_int64(hidden), exp.topk_weights, ctypes.c_int32(world), ctypes.c_int32(r),
            ctypes.c_int64(stride), group_count, group_rows, _ptrs(parts), _ptrs(flags),
            group_count[world * stride:], ctypes.c_int32(1), ctypes.c_int32(self_direct)])
        groups.append((exp.topk_weights, group_count, group_rows))
    torch.cuda.synchronize()
    for r in range(world):  # partials: kernel rows (source s, token t) == twin groups of expert rank r
        exp = received[r][0]
        twin = routing.weighted_partials(ys[r], exp.topk_weights, exp.wire_row, received[r][1].shape[0])
        meta_in = received[r][1]
        for i in range(meta_in.shape[0]):
            s, t = int(meta_in[i, routing.META_SOURCE]), int(meta_in[i, routing.META_TOKEN])
            if self_direct and s == r:  # left for the reduce to compute
                assert int(flags[s][r * stride + t]) == 0 and not parts[s][r * stride + t].any(), "own partial"
                continue
            assert same_bits(parts[s][r * stride + t].cpu(), twin[i]), "partials"
    for s in range(world):
        out = torch.empty(tokens[s], hidden, dtype=xs[0].dtype, device=dev)
        counters = torch.zeros(2, dtype=torch.int32, device=dev)
        _k(f"fuser_moe_combine_reduce_{suffix}").launch(8, 256, [
            parts[s], flags[s], ctypes.c_int32(world), ctypes.c_int32(s), ctypes.c_int64(stride),
            ctypes.c_int64(tokens[s]), ctypes.c_int64(hidden), out, counters,
            *((gys[s], *groups[s]) if self_direct else (None, None, None, None))])
        torch.cuda.synchronize()
        assert same_bits(out, cpu_out[s]), "reduce"


# ------------------------------------------------------------------------------------------ handle
def handle_body(comm, backend, capacity):
    """Combine with the dispatch's handle, without one, and with another dispatch's: the same bits."""
    from moe_cases import Case, rank_inputs

    from fuser_moe.executors import get_backend

    impl = get_backend(backend)
    case = Case(comm.world_size, 3, num_experts=4 * comm.world_size, seed=41)
    x, idx, w = rank_inputs(comm, case)
    kwargs = dict(num_experts=case.num_experts, max_recv_tokens=capacity)
    d, handle = impl.dispatch(comm, x, idx, w, return_handle=True, **kwargs)
    other_d, other = impl.dispatch(comm, x.flip(0), idx.flip(0), w.flip(0), return_handle=True, **kwargs)
    assert not other.serves(backend, d.recv_src_idx, d.recv_src_rank, x.shape[0])
    assert handle.serves(backend, d.recv_src_idx, d.recv_src_rank, x.shape[0])
    y = torch.nn.functional.silu(d.recv_x.float()).to(d.recv_x.dtype)
    args = (comm, y, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
            d.n_tokens_from_rank, x.shape[0])
    results = []
    for check in (True, False):
        for h in (handle, None, other):
            results.append(impl.combine(*args, check_inputs=check, handle=h).cpu())
    assert all(same_bits(r, results[0]) for r in results), "combine differs with / without the handle"
    del handle
    del d  # a handle holds its dispatch's outputs weakly
    return True


@pytest.mark.parametrize("capacity", [None, 400])
def test_combine_with_and_without_the_dispatch_handle(backend, capacity):
    from harness import run_on_ranks

    assert run_on_ranks(2, handle_body, backend, capacity) == [True, True]


def back_to_back_combines_body(comm, backend):
    """Several combines of one dispatch's handle in a row, with rank 0 slow to read its partials: each
    gives the bits of a combine without the handle (the cuda backend's torch path alternates two
    partial buffers, so a fast rank's next pushes never land in a buffer rank 0 is still reading)."""
    import time

    from moe_cases import Case, rank_inputs

    from fuser_moe.executors import get_backend

    impl = get_backend(backend)
    case = Case(comm.world_size, 2, num_experts=4 * comm.world_size, seed=43)
    x, idx, w = rank_inputs(comm, case)
    d, handle = impl.dispatch(comm, x, idx, w, num_experts=case.num_experts, return_handle=True)
    args = (d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank, d.n_tokens_from_rank,
            x.shape[0])
    ys = [(d.recv_x.float() * (i + 1) - i).to(d.recv_x.dtype) for i in range(4)]
    expected = [impl.combine(comm, y, *args, check_inputs=False).cpu() for y in ys]
    real_sum = routing.sum_partials

    def slow_sum(*a, **k):
        if comm.rank == 0:
            time.sleep(0.05)  # the peers run ahead into the next combine meanwhile
        return real_sum(*a, **k)

    routing.sum_partials = slow_sum
    try:
        got = [impl.combine(comm, y, *args, check_inputs=False, handle=handle).cpu() for y in ys]
    finally:
        routing.sum_partials = real_sum
    assert all(same_bits(g, e) for g, e in zip(got, expected)), "back-to-back combines with a handle"
    return True


@pytest.mark.parametrize("world_size", [2, 3])
def test_back_to_back_combines_with_a_handle(backend, world_size):
    from harness import run_on_ranks

    assert run_on_ranks(world_size, back_to_back_combines_body, backend) == [True] * world_size


def test_a_handle_does_not_keep_the_dispatch_outputs_alive():
    import gc
    import weakref

    src_idx, src_rank = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    handle = routing.DispatchHandle("nccl", 3, 3, None, None, [3], [3], 3, 3, src_idx, src_rank)
    probe = weakref.ref(src_idx)
    assert handle.serves("nccl", src_idx, src_rank, 3) and not handle.serves("cuda", src_idx, src_rank, 3)
    del src_idx
    gc.collect()
    assert probe() is None


# ------------------------------------------------------------------------------------------ evaluator
def test_an_error_inside_a_node_names_the_node_and_keeps_its_type():
    from fuser_moe import DataType, FusionDefinition
    from fuser_moe.backends.communicator import Communicator

    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, 8], dtype=DataType.BFloat16, name="x")
        idx = fd.define_tensor(shape=[-1, 2], dtype=DataType.Int, name="topk_idx")
        w = fd.define_tensor(shape=[-1, 2], dtype=DataType.Float, name="topk_weights")
        d = fd.ops.moe_dispatch(x, idx, w, num_experts=4, backend="nccl")
        out = fd.ops.moe_combine(d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                 d.n_tokens_to_rank, d.n_tokens_from_rank, num_tokens=fd.ops.size(x, 0),
                                 backend="nccl")
        fd.add_output(out)
    bad = torch.tensor([[0, 9], [1, 2]])
    with pytest.raises(ValueError, match=r"topk_idx\[0, 1\] = 9") as caught:
        fd.execute([torch.zeros(2, 8, dtype=torch.bfloat16), bad, torch.ones(2, 2)], communicator=Communicator())
    message = str(caught.value)
    assert "while executing %" in message and "= MoeDispatch[num_experts=4, backend=nccl]" in message, message
