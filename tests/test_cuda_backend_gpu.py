"""The CUDA backend on GPUs: capacity mode under a CUDA graph, no host synchronisation, flat memory.

These need CUDA GPUs (FUSER_MOE_TEST_DEVICE=cuda: one per rank, or every rank on cuda:0 when there are
fewer GPUs than ranks, which the cuda backend allows) and are skipped elsewhere with that reason;
tools/gpu_check.sh runs them on a GPU machine.
"""
import pytest
import torch

from harness import TEST_DEVICE, available_world_sizes, run_on_ranks
from moe_cases import Case, assert_same, make_inputs

from fuser_moe.executors import get_backend
from fuser_moe.reference import reference_combine, reference_dispatch

pytestmark = pytest.mark.skipif(
    not TEST_DEVICE.startswith("cuda"),
    reason="cuda backend GPU tests need CUDA GPUs: run with FUSER_MOE_TEST_DEVICE=cuda (tools/gpu_check.sh)")

GPU_WORLDS = [w for w in available_world_sizes((2, 3, 4)) if w > 1]


def _capacity_step(comm, backend, x, idx, w, case, capacity):
    d = backend.dispatch(comm, x, idx, w, num_experts=case.num_experts, max_recv_tokens=capacity, check_inputs=False)
    out = backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                          d.n_tokens_from_rank, x.shape[0], check_inputs=False)
    return d, out


def _compare_round(comm, case, capacity, d, out):
    xs, idxs, ws = make_inputs(case)
    ref = reference_dispatch(xs, idxs, ws, case.num_experts, None, capacity)
    ref_out = reference_combine([r.recv_x for r in ref], [r.recv_topk_weights for r in ref],
                                [r.recv_src_idx for r in ref], [r.recv_src_rank for r in ref],
                                [x.shape[0] for x in xs])
    r = comm.rank
    for name, got, want in zip(ref[r]._fields, d, ref[r]):
        assert_same(name, got, want, r)
    assert_same("combined_x", out, ref_out[r], r)


def graph_body(comm, dtype):
    backend = get_backend("cuda")
    world, r, dev = comm.world_size, comm.rank, comm.device
    capacity = 2 * 32 * world + 7
    case = Case(world, 2, num_experts=4 * world, tokens=[32] * world, dtype=dtype, seed=0)
    xs, idxs, ws = make_inputs(case)
    x, idx, w = xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _capacity_step(comm, backend, x, idx, w, case, capacity)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            d, out = _capacity_step(comm, backend, x, idx, w, case, capacity)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for round_ in range(1, 5):  # new tokens and new routings each replay
        case.seed = round_
        xs, idxs, ws = make_inputs(case)
        x.copy_(xs[r].to(dev)), idx.copy_(idxs[r].to(dev)), w.copy_(ws[r].to(dev))
        graph.replay()
        torch.cuda.synchronize()
        _compare_round(comm, case, capacity, d, out)
    backend.check(comm)
    return "ok"


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_capacity_mode_captured_in_a_cuda_graph(world_size, dtype):
    run_on_ranks(world_size, graph_body, dtype)


def no_sync_body(comm):
    backend = get_backend("cuda")
    world, r, dev = comm.world_size, comm.rank, comm.device
    capacity = 2 * 24 * world + 3
    case = Case(world, 2, num_experts=4 * world, seed=3)
    xs, idxs, ws = make_inputs(case)
    x, idx, w = xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)
    _capacity_step(comm, backend, x, idx, w, case, capacity)  # warm-up: buffers, kernels, placement
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d, out = _capacity_step(comm, backend, x, idx, w, case, capacity)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    _compare_round(comm, case, capacity, d, out)
    return "ok"


@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_capacity_mode_makes_no_host_synchronisation(world_size):
    run_on_ranks(world_size, no_sync_body)


def overflow_flag_body(comm):
    backend = get_backend("cuda")
    world, r, dev = comm.world_size, comm.rank, comm.device
    case = Case(world, 2, num_experts=4 * world, routing="one_rank", seed=5)
    xs, idxs, ws = make_inputs(case)
    capacity = 2 * 24 * world - 1
    backend.dispatch(comm, xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev), num_experts=case.num_experts,
                     max_recv_tokens=capacity, check_inputs=False)
    try:
        backend.check(comm)
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("world_size", GPU_WORLDS[:1])
def test_unchecked_capacity_overflow_is_reported_at_the_next_check(world_size):
    msgs = run_on_ranks(world_size, overflow_flag_body)
    assert msgs[0] is not None and "needed capacity" in msgs[0], msgs


def memory_body(comm, rounds):
    from fuser_moe.backends.transport import open_ipc_mappings

    backend = get_backend("cuda")
    world, r, dev = comm.world_size, comm.rank, comm.device
    shapes = [(t, h, dt) for t in (0, 17, 64) for h in (8, 64, 520) for dt in ("bfloat16", "float32", "float16")]

    def one(i):
        t, h, dt = shapes[i % len(shapes)]
        case = Case(world, 1 + i % 3, num_experts=4 * world, hidden=h, tokens=[t + (i % 5) * (r + 1)] * world,
                    dtype=dt, seed=i)
        xs, idxs, ws = make_inputs(case)
        x, idx, w = xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)
        d = backend.dispatch(comm, x, idx, w, num_experts=case.num_experts, check_inputs=(i % 50 == 0))
        backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                        d.n_tokens_from_rank, x.shape[0], check_inputs=(i % 50 == 0))

    # Warm-up: every shape once at its largest token count, so every buffer reaches its final size.
    for i in range(2 * len(shapes) * 5):
        one(i)
    torch.cuda.synchronize()
    base_mem, base_maps = torch.cuda.memory_allocated(dev), open_ipc_mappings()
    for i in range(rounds):
        one(i)
    torch.cuda.synchronize()
    mem, maps = torch.cuda.memory_allocated(dev), open_ipc_mappings()
    assert maps == base_maps, f"rank {r}: open IPC mappings {base_maps} -> {maps}"
    assert mem <= base_mem, f"rank {r}: GPU memory {base_mem} -> {mem} bytes"
    return (base_mem, mem, base_maps, maps)


@pytest.mark.parametrize("world_size", GPU_WORLDS[:1] + GPU_WORLDS[-1:] if len(GPU_WORLDS) > 1 else GPU_WORLDS)
def test_thousand_calls_leave_memory_and_mappings_flat(world_size):
    run_on_ranks(world_size, memory_body, 1000, timeout_s=500)
