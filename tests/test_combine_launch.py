"""Both backends' kernel combine goes through one launcher (cuda_kernels.launch_combine): the same kernels
with the same geometry and arguments, except where the transports differ (where send writes the partial
rows, how they reach reduce, the error words). Checked on the CPU by recording the launches: each
kernel is replaced by a recorder, the transports by fakes that log their barriers and all-to-alls.
"""
from __future__ import annotations

import ctypes

import pytest
import torch

from fuser_moe.backends import cuda_kernels, nccl_kernels
from fuser_moe.backends.common import CommStats, DeviceCount

HIDDEN = 8


class _Recorder:
    """Stands in for a loaded kernel: records each launch in the shared log."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def launch(self, grid, threads, args, shared_mem=0):
        self.log.append(("launch", self.name, grid, threads, shared_mem, list(args)))


class _PeerBuffer:
    """A cuda-transport buffer: the local rows and an array of (made-up) peer addresses."""

    def __init__(self, dtype, row_shape, rows, world):
        self.rows = rows
        self.local = torch.zeros((rows,) + tuple(row_shape), dtype=dtype)
        self.peer_ptrs = torch.arange(world, dtype=torch.int64) * 4096 + 65536


class _Transport:
    def __init__(self, world, rank, log):
        self.world_size, self.rank, self.log, self.buffers = world, rank, log, {}
        self.timeout_s = 30.0
        self.barrier_gave_up = torch.zeros(1, dtype=torch.int64)

    def buffer(self, name, dtype, row_shape, rows):
        return self.buffers.setdefault(name, _PeerBuffer(dtype, row_shape, rows, self.world_size))

    def barrier(self):
        self.log.append(("barrier",))


class _Comm:
    def __init__(self, world, rank, log):
        self.world_size, self.rank, self.device, self.log = world, rank, torch.device("cpu"), log

    def on_close(self, closer):
        pass

    def all_to_all_single(self, output, input, output_split_sizes=None, input_split_sizes=None):
        self.log.append(("all_to_all", output, input))


def _run(backend, monkeypatch, world, rank, x, weights, src_idx, src_rank, num_tokens, max_tokens, num_sms):
    log: list = []
    recorder = lambda name, device, source=None: _Recorder(name, log)  # noqa: E731
    monkeypatch.setattr(cuda_kernels, "_kernel", recorder)
    monkeypatch.setattr(nccl_kernels, "_kernel", recorder)
    monkeypatch.setattr(cuda_kernels, "_multiprocessors", lambda device: 4)
    stats = CommStats(num_sms=num_sms)
    comm = _Comm(world, rank, log)
    if backend == "cuda":
        state = type("State", (), {})()
        state.transport = _Transport(world, rank, log)
        state.errors = torch.zeros(4, dtype=torch.int64)
        state.stream_words = torch.zeros(8, dtype=torch.int64)
        out = cuda_kernels.combine(comm, state, x, weights, src_idx, src_rank, num_tokens, max_tokens, stats)
        return log, out, stats, dict(errors=state.errors, words=state.stream_words,
                                     gave_up=state.transport.barrier_gave_up, **{
            name: state.transport.buffers.get(f"combine_partial_{name}") for name in ("rows", "flags", "stamps")})
    out, errors = nccl_kernels.combine(comm, x, weights, src_idx, src_rank, num_tokens, max_tokens, stats)
    return log, out, stats, dict(errors=errors, buffers=nccl_kernels._buffers_of(comm))


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr(), a.shape, a.stride(), a.dtype) == (b.data_ptr(), b.shape, b.stride(), b.dtype)


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 2)])
@pytest.mark.parametrize("rows", [0, 9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_sms", [None, 2])
def test_both_backends_launch_the_combine_kernels_alike(monkeypatch, world, rank, rows, dtype, num_sms):
    monkeypatch.delenv("FUSER_MOE_STREAM_COMBINE", raising=False)  # the cuda backend's default combine
    num_tokens, max_tokens = 5, 6
    x = torch.randn(rows, HIDDEN).to(dtype)
    weights = torch.rand(rows)
    src_idx = torch.randint(0, num_tokens, (rows,))
    src_rank = torch.randint(0, world, (rows,))
    args = (world, rank, x, weights, src_idx, src_rank, num_tokens, max_tokens, num_sms)
    cuda_log, cuda_out, cuda_stats, cuda_bufs = _run("cuda", monkeypatch, *args)
    nccl_log, nccl_out, nccl_stats, nccl_bufs = _run("nccl", monkeypatch, *args)
    suffix = cuda_kernels._DTYPE_SUFFIX[dtype]
    kernels = (["fuser_moe_combine_group"] if rows else []) + [f"fuser_moe_combine_send_{suffix}",
                                                               f"fuser_moe_combine_reduce_{suffix}"]
    cuda_launches = [e for e in cuda_log if e[0] == "launch"]
    nccl_launches = [e for e in nccl_log if e[0] == "launch"]
    assert [e[1] for e in cuda_launches] == [e[1] for e in nccl_launches] == kernels
    assert cuda_stats.sms == nccl_stats.sms > 0
    groups = world * max_tokens
    # The arguments in which the transports differ, by kernel: where the group counts and rows live, the
    # error words, where send writes, where reduce reads, the counters and the output.
    transport_args = {"fuser_moe_combine_group": {5, 6, 7}, f"fuser_moe_combine_send_{suffix}": {6, 7, 8, 9, 10},
                      f"fuser_moe_combine_reduce_{suffix}": {0, 1, 7, 8, 11, 12}}
    for (_, name, *geometry, c_args), (_, _, *n_geometry, n_args) in zip(cuda_launches, nccl_launches):
        assert geometry == n_geometry, name
        assert len(c_args) == len(n_args), name
        for i, (c, n) in enumerate(zip(c_args, n_args)):
            if i in transport_args[name]:
                assert isinstance(c, torch.Tensor) and isinstance(n, torch.Tensor) and c.shape == n.shape, (name, i)
            elif isinstance(c, ctypes._SimpleCData):
                assert type(c) is type(n) and c.value == n.value, (name, i)
            else:
                assert c is n, (name, i)  # the caller's contiguous tensors pass through as they are
    # Where each transport's send writes and its reduce reads.
    *_, c_send, c_reduce = cuda_launches
    *_, n_send, n_reduce = nccl_launches
    assert c_send[5][8] is cuda_bufs["rows"].peer_ptrs and c_send[5][9] is cuda_bufs["flags"].peer_ptrs
    assert c_reduce[5][0] is cuda_bufs["rows"].local and c_reduce[5][1] is cuda_bufs["flags"].local
    (_, recv_rows, sent_rows), (_, recv_flags, sent_flags) = [e for e in nccl_log if e[0] == "all_to_all"]
    row_bytes = HIDDEN * x.element_size()
    shift = (torch.arange(world) - rank) * max_tokens
    assert n_send[5][8].tolist() == (sent_rows.data_ptr() + shift * row_bytes).tolist()
    assert n_send[5][9].tolist() == (sent_flags.data_ptr() + shift * 4).tolist()
    assert n_reduce[5][0] is recv_rows and n_reduce[5][1] is recv_flags
    for send, reduce in ((c_send, c_reduce), (n_send, n_reduce)):
        # self-direct: send leaves this rank's own tokens out (its last argument), and reduce computes their
        # term from the same rows, weights and groups that send reads
        assert send[5][12].value == 1
        assert all(reduce[5][i] is send[5][j] for i, j in ((9, 0), (10, 2), (11, 6), (12, 7)))
    # The transports' steps between the kernels, in order.
    steps = lambda log: [e[0] if e[0] != "launch" else e[1] for e in log]  # noqa: E731
    assert steps(cuda_log) == kernels[:-2] + ["barrier", kernels[-2], "barrier", kernels[-1]]
    assert steps(nccl_log) == kernels[:-1] + ["all_to_all", "all_to_all", kernels[-1]]
    for launches, bufs in ((cuda_launches, cuda_bufs), (nccl_launches, nccl_bufs)):
        if rows:
            assert launches[0][5][7] is bufs["errors"]
        group_count = launches[-2][5][6]
        assert group_count.shape == (groups + 2,)
        assert _same_view(launches[-2][5][10], group_count[groups:])  # send's counters
        assert _same_view(launches[-1][5][8], group_count[groups:])  # reduce's counters
    assert c_reduce[5][7] is cuda_out and n_reduce[5][7] is nccl_out and cuda_out.shape == (num_tokens, HIDDEN)
    assert isinstance(cuda_stats.bytes_sent, DeviceCount) and cuda_stats.bytes_sent.factor == row_bytes + 4
    assert nccl_stats.bytes_sent == nccl_stats.bytes_recv == (world - 1) * max_tokens * (row_bytes + 4)


@pytest.mark.parametrize("backend", ["cuda", "nccl"])
def test_a_combine_of_more_tokens_than_agreed_names_the_counts(monkeypatch, backend):
    empty = torch.empty(0, HIDDEN)
    with pytest.raises(ValueError, match="num_tokens=5 on rank 1 but the ranks agreed on at most 3"):
        _run(backend, monkeypatch, 2, 1, empty, torch.empty(0), torch.empty(0, dtype=torch.int64),
             torch.empty(0, dtype=torch.int64), 5, 3, None)


@pytest.mark.parametrize("world,rank", [(1, 0), (3, 2)])
@pytest.mark.parametrize("rows", [0, 9])
@pytest.mark.parametrize("num_sms", [None, 3])
def test_the_cuda_backend_streams_its_combine_in_one_kernel_after_one_barrier(monkeypatch, world, rank, rows,
                                                                              num_sms):
    monkeypatch.setenv("FUSER_MOE_STREAM_COMBINE", "1")
    num_tokens, max_tokens, dtype = 5, 6, torch.bfloat16
    x = torch.randn(rows, HIDDEN).to(dtype)
    args = (world, rank, x, torch.rand(rows), torch.randint(0, num_tokens, (rows,)), torch.randint(0, world, (rows,)),
            num_tokens, max_tokens, num_sms)
    log, out, stats, bufs = _run("cuda", monkeypatch, *args)
    kernel = "fuser_moe_combine_send_reduce_bf16"
    steps = [e[0] if e[0] != "launch" else e[1] for e in log]
    assert steps == (["fuser_moe_combine_group"] if rows else []) + ["barrier", kernel]
    (_, _, blocks, threads, _, kargs) = log[-1]
    groups = world * max_tokens
    split = cuda_kernels.stream_split(groups)
    assert 1 <= split <= 8 and bufs["stamps"].rows == groups * split
    n_send = kargs[16].value
    assert 1 <= n_send < blocks and (num_sms is None or blocks <= num_sms) and stats.sms == min(blocks, 4)
    assert kargs[9] is bufs["rows"].peer_ptrs and kargs[10] is bufs["stamps"].peer_ptrs
    assert kargs[11] is bufs["rows"].local and kargs[12] is bufs["stamps"].local and kargs[13] is out
    assert kargs[15].value == split and _same_view(kargs[17], bufs["words"][4:7]) and kargs[18] is bufs["errors"]
    assert _same_view(kargs[14], kargs[7][groups:])  # the counters after the group counts
    assert kargs[20] is bufs["gave_up"]  # the reducers stop waiting once the call's barrier gave up
    assert (kargs[5].value, kargs[6].value) == (max_tokens, num_tokens) and out.shape == (num_tokens, HIDDEN)
    assert stats.bytes_sent.factor == HIDDEN * x.element_size() + 8


@pytest.mark.parametrize("env", [{}, {"FUSER_MOE_STREAM_COMBINE": "1", "FUSER_MOE_STREAM": "0"}])
def test_the_three_kernel_combine_unless_streaming_is_asked_for(monkeypatch, env):
    monkeypatch.delenv("FUSER_MOE_STREAM_COMBINE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    x = torch.randn(4, HIDDEN).to(torch.bfloat16)
    log, *_ = _run("cuda", monkeypatch, 2, 0, x, torch.rand(4), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 1, 0]),
                   3, 3, None)
    assert [e[1] for e in log if e[0] == "launch"] == ["fuser_moe_combine_group", "fuser_moe_combine_send_bf16",
                                                       "fuser_moe_combine_reduce_bf16"]


def test_a_one_sm_budget_keeps_the_three_kernel_combine(monkeypatch):
    # A streaming combine needs a sending and a reducing block at once.
    monkeypatch.setenv("FUSER_MOE_STREAM_COMBINE", "1")
    x = torch.randn(4, HIDDEN).to(torch.bfloat16)
    log, *_ = _run("cuda", monkeypatch, 2, 0, x, torch.rand(4), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 1, 0]),
                   3, 3, 1)
    assert [e[1] for e in log if e[0] == "launch"] == ["fuser_moe_combine_group", "fuser_moe_combine_send_bf16",
                                                       "fuser_moe_combine_reduce_bf16"]
