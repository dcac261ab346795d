"""The CUDA backend's low-latency path (backends/cuda_ll.py): when it serves a call, and its bits.

The choice is a unit test that runs anywhere. The kernels need CUDA GPUs (FUSER_MOE_TEST_DEVICE=cuda);
several ranks may share one GPU (CUDA IPC works between processes on one device).
"""
import os
import types

import pytest
import torch

from harness import TEST_DEVICE, available_world_sizes, run_on_ranks
from moe_cases import Case, assert_same, make_inputs

from fuser_moe.backends import cuda_ll
from fuser_moe.executors import get_backend
from fuser_moe.reference import reference_combine, reference_dispatch

on_gpu = pytest.mark.skipif(
    not TEST_DEVICE.startswith("cuda"),
    reason="the low-latency kernels need CUDA GPUs: run with FUSER_MOE_TEST_DEVICE=cuda (tools/gpu_check.sh)")


def _fake_cuda_x(tokens=8, hidden=64, dtype=torch.bfloat16):
    return types.SimpleNamespace(is_cuda=True, shape=(tokens, hidden), dtype=dtype,
                                 element_size=lambda: torch.empty((), dtype=dtype).element_size())


@pytest.mark.parametrize("capacity, expected", [
    (None, "exact mode"), (64, None), (cuda_ll.max_rows() + 1, "capacity"),
])
def test_low_latency_path_serves_small_capacity_mode_calls(capacity, expected, monkeypatch):
    monkeypatch.delenv("FUSER_MOE_LL", raising=False)
    reason = cuda_ll.unavailable_reason(_fake_cuda_x(), 2, 4, 8, 2, capacity)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason


def test_low_latency_path_refusals_name_the_reason(monkeypatch):
    monkeypatch.delenv("FUSER_MOE_LL", raising=False)
    assert "CPU" in cuda_ll.unavailable_reason(torch.zeros(4, 8), 2, 2, 4, 2, 16)
    assert "16 bytes" in cuda_ll.unavailable_reason(_fake_cuda_x(hidden=3), 2, 2, 4, 2, 16)
    assert "K=40" in cuda_ll.unavailable_reason(_fake_cuda_x(), 40, 2, 64, 32, 16)
    # Every expert on one of two ranks, E=2048: the receive's tables would pass 48 KiB of shared memory,
    # all a launch gets where no device says that a block may opt in to more.
    assert "shared memory" in cuda_ll.unavailable_reason(_fake_cuda_x(), 32, 2, 2048, 2048, 16)
    assert cuda_ll.unavailable_reason(_fake_cuda_x(), 8, 64, 1024, 16, 16) is None
    monkeypatch.setenv("FUSER_MOE_LL", "0")
    assert cuda_ll.unavailable_reason(_fake_cuda_x(), 2, 2, 4, 2, 16) == "FUSER_MOE_LL=0"
    monkeypatch.setenv("FUSER_MOE_LL", "1")
    assert cuda_ll.unavailable_reason(_fake_cuda_x(), 2, 2, 4, 2, cuda_ll.max_rows() * 2) is None


def test_the_shared_memory_limit_is_the_devices(monkeypatch):
    from fuser_moe.backends.transport import nvrtc

    monkeypatch.delenv("FUSER_MOE_LL", raising=False)
    x = _fake_cuda_x()
    x.device = torch.device("cuda", 0)
    tables = cuda_ll._recv_shared(cuda_ll._MAX_CHUNK, 2048, 2, 32, 2048)
    assert tables > cuda_ll.SHARED_LIMIT
    # A block may opt in to 227 KiB on compute capability 9.0: E=2048 on two ranks fits.
    monkeypatch.setattr(nvrtc, "shared_memory_limit", lambda device: 227 * 1024)
    assert cuda_ll.shared_limit(x.device) == 227 * 1024 - cuda_ll._STATIC_SHARED_ROOM
    assert cuda_ll.unavailable_reason(x, 32, 2, 2048, 2048, 16) is None
    # A device that allows less refuses it, and says how much it allows.
    monkeypatch.setattr(nvrtc, "shared_memory_limit", lambda device: tables)
    reason = cuda_ll.unavailable_reason(x, 32, 2, 2048, 2048, 16)
    assert "shared memory" in reason and f"takes {tables - cuda_ll._STATIC_SHARED_ROOM} on this device" in reason
    assert cuda_ll.shared_limit(None) == cuda_ll.SHARED_LIMIT


def _reference(case, capacity):
    xs, idxs, ws = make_inputs(case)
    ref = reference_dispatch(xs, idxs, ws, case.num_experts, case.expert_to_rank, capacity)
    ref_out = reference_combine([r.recv_x for r in ref], [r.recv_topk_weights for r in ref],
                                [r.recv_src_idx for r in ref], [r.recv_src_rank for r in ref],
                                [x.shape[0] for x in xs])
    return xs, idxs, ws, ref, ref_out


def _assert_round_trip(r, d, out, ref, ref_out):
    """Rank r's dispatch outputs and combined rows are the reference's, bit for bit."""
    for name, got, want in zip(ref[r]._fields, d, ref[r]):
        assert_same(name, got.cpu(), want, r)
    assert_same("combined_x", out.cpu(), ref_out[r], r)


def _checked_round_trip(comm, backend, case, capacity, seed, check_inputs=True):
    """One dispatch and combine of `case` with `seed` on this rank, checked against the reference;
    returns the dispatch outputs."""
    r, dev = comm.rank, comm.device
    case.seed = seed
    xs, idxs, ws, ref, ref_out = _reference(case, capacity)
    d = backend.dispatch(comm, xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev), num_experts=case.num_experts,
                         expert_to_rank=case.expert_to_rank, max_recv_tokens=capacity, check_inputs=check_inputs)
    out = backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                          d.n_tokens_to_rank, d.n_tokens_from_rank, xs[r].shape[0], check_inputs=check_inputs)
    torch.cuda.synchronize()
    _assert_round_trip(r, d, out, ref, ref_out)
    return d


def ll_round_body(comm, case, capacity, mode, rounds):
    os.environ["FUSER_MOE_LL"] = mode
    try:
        backend = get_backend("cuda")
        for round_ in range(rounds):  # consecutive calls exercise both buffer parities
            d = _checked_round_trip(comm, backend, case, capacity, round_)
            assert (cuda_ll.handle_for(d.recv_src_idx, d.recv_src_rank) is not None) == (mode == "1")
        backend.check(comm)
    finally:
        os.environ.pop("FUSER_MOE_LL", None)
    return "ok"


GPU_WORLDS = available_world_sizes((1, 2, 3, 4)) if TEST_DEVICE.startswith("cuda") else [1]


@on_gpu
@pytest.mark.parametrize("mode", ["1", "0"], ids=["low_latency", "general"])
@pytest.mark.parametrize("top_k, routing, dtype", [
    (1, "random", "bfloat16"), (2, "empty_slots", "float32"), (8, "random", "bfloat16"), (4, "one_rank", "float16"),
])
@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_low_latency_path_gives_the_reference_bits(world_size, top_k, routing, dtype, mode):
    experts = max(8, 2 * top_k) * world_size
    case = Case(world_size, top_k, num_experts=experts, hidden=64, tokens=[13 + 5 * r for r in range(world_size)],
                dtype=dtype, routing=routing)
    capacity = sum(case.token_counts()) * min(top_k, experts // world_size) + 3
    run_on_ranks(world_size, ll_round_body, case, capacity, mode, 3)


@on_gpu
@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_many_experts_opt_in_to_more_shared_memory(world_size):
    # E=2048 (2046 at W=3), K=8: the receive's routing tables pass 48 KiB of shared memory at W = 1 to 4
    # (67 to 55 KB: three int tables of E entries, int64 bases for every (source, local expert)), so its
    # launch opts in to more.
    experts = 2048 // world_size * world_size  # contiguous placement: a multiple of W
    case = Case(world_size, 8, num_experts=experts, hidden=64, tokens=[13 + 5 * r for r in range(world_size)], seed=3)
    shared = cuda_ll._recv_shared(cuda_ll._MAX_CHUNK, experts, world_size, 8, experts // world_size)
    capacity = sum(case.token_counts()) * 8 + 3
    assert shared > cuda_ll.SHARED_LIMIT
    run_on_ranks(world_size, ll_round_body, case, capacity, "1", 2)


@on_gpu
@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_low_latency_path_with_any_placement_and_an_idle_rank(world_size):
    experts = 6 * world_size
    placement = [(e * 7) % world_size for e in range(experts)]
    tokens = [0] + [9] * (world_size - 1) if world_size > 1 else [0]
    case = Case(world_size, 3, num_experts=experts, hidden=32, tokens=tokens, expert_to_rank=placement)
    run_on_ranks(world_size, ll_round_body, case, 3 * sum(tokens) + 1, "1", 2)


def ll_overflow_body(comm):
    os.environ["FUSER_MOE_LL"] = "1"
    try:
        backend = get_backend("cuda")
        case = Case(comm.world_size, 4, num_experts=8 * comm.world_size, hidden=32, tokens=[16] * comm.world_size)
        xs, idxs, ws = make_inputs(case)
        r, dev = comm.rank, comm.device
        with pytest.raises(RuntimeError, match="capacity"):
            backend.dispatch(comm, xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev), num_experts=case.num_experts,
                             max_recv_tokens=5)
        # The path goes on working after the error was reported.
        capacity = 4 * 16 * comm.world_size
        d = backend.dispatch(comm, xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev), num_experts=case.num_experts,
                             max_recv_tokens=capacity)
        ref = reference_dispatch(xs, idxs, ws, case.num_experts, None, capacity)
        assert_same("recv_x", d.recv_x.cpu(), ref[r].recv_x, r)
    finally:
        os.environ.pop("FUSER_MOE_LL", None)
    return "ok"


@on_gpu
@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_low_latency_overflow_is_reported(world_size):
    run_on_ranks(world_size, ll_overflow_body)


def ll_graph_body(comm):
    os.environ["FUSER_MOE_LL"] = "1"
    try:
        backend = get_backend("cuda")
        r, dev, world = comm.rank, comm.device, comm.world_size
        case = Case(world, 8, num_experts=16 * world, hidden=128, tokens=[24] * world)
        capacity = 8 * 24 * world
        xs, idxs, ws = make_inputs(case)
        x, idx, w = xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)

        def step():
            d = backend.dispatch(comm, x, idx, w, num_experts=case.num_experts, max_recv_tokens=capacity,
                                 check_inputs=False)
            out = backend.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                  d.n_tokens_to_rank, d.n_tokens_from_rank, x.shape[0], check_inputs=False)
            return d, out

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.cuda.graph(graph):
                d, out = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        for round_ in range(1, 6):
            case.seed = round_
            xs, idxs, ws, ref, ref_out = _reference(case, capacity)
            x.copy_(xs[r].to(dev)), idx.copy_(idxs[r].to(dev)), w.copy_(ws[r].to(dev))
            graph.replay()
            torch.cuda.synchronize()
            _assert_round_trip(r, d, out, ref, ref_out)
        backend.check(comm)
    finally:
        os.environ.pop("FUSER_MOE_LL", None)
    return "ok"


@on_gpu
@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_low_latency_path_replays_in_a_cuda_graph(world_size):
    run_on_ranks(world_size, ll_graph_body)


def ll_wrap_body(comm):
    os.environ["FUSER_MOE_LL"] = "1"
    try:
        backend = get_backend("cuda")
        world = comm.world_size
        case = Case(world, 4, num_experts=8 * world, hidden=64, tokens=[12] * world)
        capacity = 4 * 12 * world

        def round_trip(seed):
            _checked_round_trip(comm, backend, case, capacity, seed, check_inputs=False)

        round_trip(0)  # allocates the buffers and the state words
        # Jump both generations to 2^31 - 1: the next call's flag target, generation * 2^32, leaves int64.
        state = backend._state(comm)
        tr = state.transport
        last = 2 ** 31 - 1
        arrived = ((last << 32) + 2 ** 63) % 2 ** 64 - 2 ** 63
        state.ll.words[cuda_ll.GEN_DISPATCH] = last
        state.ll.words[cuda_ll.GEN_COMBINE] = last
        for purpose in ("ll_dispatch_flag", "ll_combine_flag"):
            tr.buffer(purpose, torch.int64, (), world).local.fill_(arrived)
        torch.cuda.synchronize()
        comm.barrier()
        for seed in range(1, 4):
            round_trip(seed)
        assert state.ll.words[cuda_ll.GEN_DISPATCH].item() == last + 3
        backend.check(comm)
    finally:
        os.environ.pop("FUSER_MOE_LL", None)
    return "ok"


@on_gpu
@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_low_latency_flags_survive_the_int64_wrap(world_size):
    """Flags count 2^32 a call; past 2^31 calls the target wraps, and receivers still wait for their rows."""
    run_on_ranks(world_size, ll_wrap_body)


# ---------------------------------------------------------------------------------------- SM budget
def test_num_sms_is_an_attribute_of_both_nodes_and_prints():
    from fuser_moe import DataType, FusionDefinition

    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, 64], dtype=DataType.BFloat16)
        idx = fd.define_tensor(shape=[-1, 2], dtype=DataType.Int)
        w = fd.define_tensor(shape=[-1, 2], dtype=DataType.Float)
        d = fd.ops.moe_dispatch(x, idx, w, num_experts=4, num_sms=8)
        out = fd.ops.moe_combine(d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                 d.n_tokens_to_rank, d.n_tokens_from_rank, num_tokens=fd.ops.size(x, 0), num_sms=4)
        fd.add_output(out)
    text = str(fd)
    assert "MoeDispatch[num_experts=4, backend=auto, num_sms=8]" in text
    assert "MoeCombine[backend=auto, num_sms=4]" in text


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_num_sms_must_be_a_positive_int(bad):
    from fuser_moe import DataType, FusionDefinition

    with pytest.raises(ValueError, match="num_sms must be a positive int"):
        with FusionDefinition() as fd:
            x = fd.define_tensor(shape=[-1, 64], dtype=DataType.BFloat16)
            idx = fd.define_tensor(shape=[-1, 2], dtype=DataType.Int)
            w = fd.define_tensor(shape=[-1, 2], dtype=DataType.Float)
            fd.ops.moe_dispatch(x, idx, w, num_experts=4, num_sms=bad)


def sm_budget_body(comm, budget, capacity):
    from moe_cases import build_fusion  # noqa: F401 - the harness's path

    from fuser_moe import DataType, FusionDefinition

    r, dev, world = comm.rank, comm.device, comm.world_size
    case = Case(world, 4, num_experts=8 * world, hidden=256, tokens=[40] * world)
    xs, idxs, ws = make_inputs(case)
    with FusionDefinition() as fd:
        x = fd.define_tensor(shape=[-1, 256], dtype=DataType.BFloat16)
        idx = fd.define_tensor(shape=[-1, 4], dtype=DataType.Int)
        w = fd.define_tensor(shape=[-1, 4], dtype=DataType.Float)
        d = fd.ops.moe_dispatch(x, idx, w, num_experts=case.num_experts, backend="cuda", max_recv_tokens=capacity,
                                num_sms=budget)
        out = fd.ops.moe_combine(d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                 d.n_tokens_to_rank, d.n_tokens_from_rank, num_tokens=fd.ops.size(x, 0),
                                 num_sms=budget)
        fd.add_output(out)
    (combined,) = fd.execute([xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)], communicator=comm, trace=True)
    _, _, _, _, ref_out = _reference(case, capacity)
    assert_same("combined_x", combined.cpu(), ref_out[r], r)
    events = [e for e in fd.last_trace.events if e.op in ("MoeDispatch", "MoeCombine")]
    props = torch.cuda.get_device_properties(dev)
    gpus = comm.exchange(str(props.uuid))
    transport = get_backend("cuda")._state(comm).transport
    return ([(e.op, e.path, e.sms) for e in events], transport.ranks_on_device, gpus.count(str(props.uuid)),
            props.multi_processor_count)


@on_gpu
@pytest.mark.parametrize("capacity", [4 * 40 * 4, 40000], ids=["low_latency", "general"])
@pytest.mark.parametrize("world_size", GPU_WORLDS[-1:])
def test_an_sm_budget_caps_every_kernel_and_the_trace_says_so(world_size, capacity):
    capacity = min(capacity, 4 * 40 * world_size) if capacity < 40000 else capacity
    for rank_events, _, _, _ in run_on_ranks(world_size, sm_budget_body, 6, capacity):
        for op, path, sms in rank_events:
            assert path == ("low-latency" if capacity < 40000 else "general"), (op, path)
            assert sms is not None and 1 <= sms <= 6, (op, sms)


@on_gpu
@pytest.mark.parametrize("capacity", [4 * 40 * 4, 40000], ids=["low_latency", "general"])
@pytest.mark.parametrize("world_size", GPU_WORLDS)
def test_ranks_sharing_a_gpu_each_take_their_share_of_its_sms(world_size, capacity):
    # Without a budget a rank's kernels take at most SMs / (ranks on its GPU): with more, the spinning
    # receivers of some ranks could keep the others' senders off the GPU under MPS until the timeout.
    capacity = min(capacity, 4 * 40 * world_size) if capacity < 40000 else capacity
    for rank_events, on_device, sharing, sm_count in run_on_ranks(world_size, sm_budget_body, None, capacity):
        assert on_device == sharing, (on_device, sharing)
        for op, path, sms in rank_events:
            # (a rank alone on its GPU may launch more blocks than it has SMs: they queue)
            assert sms >= 1 and (sharing == 1 or sms <= sm_count // sharing), (op, path, sms, sharing)


def test_the_sm_budget_splits_a_shared_gpu(monkeypatch):
    from fuser_moe.backends import cuda_kernels
    from fuser_moe.backends.common import CommStats

    monkeypatch.setitem(cuda_kernels._sm_counts, 0, 132)
    gpu = torch.device("cuda", 0)
    assert cuda_kernels.sm_budget(gpu, CommStats()) == (132, 1 << 30)
    assert cuda_kernels.sm_budget(gpu, CommStats(num_sms=20)) == (20, 20)
    assert cuda_kernels.sm_budget(gpu, CommStats(device_share=4)) == (33, 33)
    assert cuda_kernels.sm_budget(gpu, CommStats(device_share=4, num_sms=100)) == (33, 33)
    assert cuda_kernels.sm_budget(gpu, CommStats(device_share=4, num_sms=10)) == (10, 10)
    assert cuda_kernels.sm_budget(gpu, CommStats(device_share=200)) == (1, 1)


def test_python_mirrors_the_kernels_constants():
    import re

    text = open(cuda_ll.KERNEL_SOURCE).read()
    consts = {m.group(1): int(m.group(2)) for m in re.finditer(r"constexpr int (FM_LL_\w+) = (\d+);", text)}
    names = ("GEN_DISPATCH", "TICKET_DSEND", "TICKET_DRECV", "GEN_COMBINE", "TICKET_CSEND", "TICKET_CRECV",
             "TIMEOUT_PHASE", "TIMEOUT_MISSING", "STATE_WORDS", "THREADS", "MAX_WORLD", "MAX_TOP_K")
    for name in names:
        assert consts[f"FM_LL_{name}"] == getattr(cuda_ll, name), name
    assert consts["FM_LL_SLOTS"] == cuda_ll._SLOTS  # sizes the send kernel's shared memory
