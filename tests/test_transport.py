"""The symmetric-memory transport of the CUDA backend (docs/contract.md section 8).

Every behaviour runs on W spawned ranks (W in 1, 2, 4), on the CPU (`ShmTransport`, POSIX shared memory)
and on GPUs (`CudaIpcTransport`, rank i on cuda:i; skipped where fewer than W GPUs exist). The harness is
self-contained: a `_RankGroup` keeps W spawned processes with a gloo process group alive across tests
(starting torch costs seconds a process) and runs one module-level body per test on every rank, each
with a fresh `Communicator` and so a fresh transport. A rank that raises fails the test with its
traceback; a body that does not finish in time, or a rank that dies, kills the group. Nothing hangs.
"""
from __future__ import annotations

import ctypes
import datetime
import glob
import math
import multiprocessing as mp
import os
import queue
import re
import signal
import subprocess
import time
import traceback
from pathlib import Path

import pytest
import torch

from fuser_moe.backends.transport import ControlLayout, SymmetricTensor, open_ipc_mappings, transport_for

REPO = Path(__file__).resolve().parent.parent
KERNELS = REPO / "backends" / "kernels"
START_TIMEOUT_S = 120.0
JOB_TIMEOUT_S = 90.0
COMM_TIMEOUT_S = 20.0
SHORT_TIMEOUT_S = 2.0  # the barrier-timeout tests

WORLD_SIZES = [1, 2, 4]
KINDS = ["cpu", "cuda"]


# ---------------------------------------------------------------------- harness
def _rank_main(rank, world_size, port, kind, jobs, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch.distributed as dist

        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=60))
        if kind == "cuda":
            torch.cuda.set_device(rank)
        from fuser_moe.backends.communicator import Communicator
    except BaseException:  # noqa: BLE001
        results.put((rank, None, False, traceback.format_exc()))
        return
    results.put((rank, None, True, os.getpid()))
    device = "cpu" if kind == "cpu" else f"cuda:{rank}"
    while True:
        job = jobs.get()
        if job is None:
            break
        job_id, body, args, comm_timeout_s = job
        comm = None
        try:
            comm = Communicator(device=device, timeout_s=comm_timeout_s)
            results.put((rank, job_id, True, body(comm, *args)))
        except BaseException:  # noqa: BLE001
            results.put((rank, job_id, False, traceback.format_exc()))
        finally:
            if comm is not None:
                try:
                    comm.close()
                except Exception:  # noqa: BLE001
                    pass
    dist.destroy_process_group()


class _RankGroup:
    """W spawned ranks sharing a gloo process group whose TCP store lives in this (the parent) process."""

    def __init__(self, world_size: int, kind: str):
        import torch.distributed as dist

        self.world_size, self.kind = world_size, kind
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=60))
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        self.procs = [
            ctx.Process(target=_rank_main, args=(r, world_size, self.store.port, kind, self.jobs[r], self.results),
                        daemon=True)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self._job_id = 0
        self.pids = self._collect(None, START_TIMEOUT_S)

    def run(self, body, *args, comm_timeout_s: float = COMM_TIMEOUT_S, timeout_s: float = JOB_TIMEOUT_S,
            may_exit=()) -> list:
        """Runs `body(comm, *args)` on every rank; returns the ranks' results in rank order.

        `may_exit` names ranks that are allowed to die instead of answering (their result is None).
        """
        self._job_id += 1
        for q in self.jobs:
            q.put((self._job_id, body, args, comm_timeout_s))
        return self._collect(self._job_id, timeout_s, may_exit)

    def _collect(self, job_id, timeout_s: float, may_exit=()) -> list:
        done, failed = {}, {}
        deadline = time.monotonic() + timeout_s
        while len(done) + len(failed) < self.world_size:
            try:
                rank, answered_id, ok, value = self.results.get(timeout=0.1)
            except queue.Empty:
                waiting = [r for r in range(self.world_size) if r not in done and r not in failed]
                dead = [r for r in waiting if not self.procs[r].is_alive()]
                for r in dead:
                    if r in may_exit:
                        done[r] = None
                unexpected = [r for r in dead if r not in may_exit]
                if unexpected:
                    codes = [self.procs[r].exitcode for r in unexpected]
                    self.kill()
                    raise AssertionError(f"rank(s) {unexpected} died with exit code(s) {codes}")
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"rank(s) {waiting} did not finish within {timeout_s:g} s; killed them")
                continue
            if answered_id != job_id:
                continue
            (done if ok else failed)[rank] = value
        if failed:
            if job_id is None:  # a rank could not even start: the group is useless
                self.kill()
            raise AssertionError("\n".join(f"rank {r} raised:\n{tb}" for r, tb in sorted(failed.items())))
        return [done[r] for r in range(self.world_size)]

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=10)
        if _groups.get((self.world_size, self.kind)) is self:  # a private group must not drop the shared one
            _groups.pop((self.world_size, self.kind))

    def close(self) -> None:
        for q, p in zip(self.jobs, self.procs):
            if p.is_alive():
                q.put(None)
        deadline = time.monotonic() + 20
        for p in self.procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        self.kill()


_groups: dict = {}


def _skip_unless_runnable(kind: str, world_size: int) -> None:
    if kind != "cuda":
        return
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < world_size:
        pytest.skip(f"cuda transport needs CUDA GPUs: {world_size} wanted, {found} found")
    try:
        from cuda.bindings import driver  # noqa: F401
    except ImportError:
        try:
            from cuda import cuda  # noqa: F401
        except ImportError:
            pytest.skip("cuda transport needs cuda-python, which is not installed")


def _group(kind: str, world_size: int) -> _RankGroup:
    _skip_unless_runnable(kind, world_size)
    group = _groups.get((world_size, kind))
    if group is None or not group.alive:
        if group is not None:
            group.kill()
        group = _RankGroup(world_size, kind)
        _groups[(world_size, kind)] = group
    return group


@pytest.fixture(scope="module", autouse=True)
def _close_groups():
    yield
    for group in list(_groups.values()):
        group.close()
    _groups.clear()


def _finish_phase(transport) -> None:
    """A barrier that has completed on this rank, with every device-side error raised."""
    transport.barrier()
    if transport.device.type == "cuda":
        torch.cuda.synchronize(transport.device)
        transport.check()


# ---------------------------------------------------------------------- push_rows delivers
def _source_rows(rank: int, n_rows: int, dtype: torch.dtype, trailing: tuple) -> torch.Tensor:
    """Rank `rank`'s source rows: distinct values every rank can recompute."""
    count = n_rows * math.prod(trailing)
    values = torch.arange(count, dtype=torch.int64) % 97 + 100 * (rank + 1)
    return values.to(dtype).view(n_rows, *trailing)


def _routing(seed: int, rank: int, world_size: int, per_peer: int, n_src: int, layout: str = "padded"):
    """Rank `rank`'s push plan: (src_row, dst_rank, dst_row), every rank can recompute it.

    Rank s writes into rows [s * per_peer, (s + 1) * per_peer) of every destination, leaving one row of
    its block unwritten. layout "padded": in shuffled order, mixed with padding entries (dst_row -1,
    garbage elsewhere); "shuffled": the same without padding; "runs": by destination rank, each
    destination's rows consecutive and ascending (the CUDA backend's pushes).
    """
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    src_row, dst_rank, dst_row = [], [], []
    for d in range(world_size):
        rows = torch.randperm(per_peer, generator=g)[: per_peer - 1] + rank * per_peer
        if layout == "runs":
            rows = torch.arange(per_peer - 1) + rank * per_peer + (d % 2)
        for row in rows.tolist():
            src_row.append(int(torch.randint(n_src, (1,), generator=g)))
            dst_rank.append(d)
            dst_row.append(row)
    for _ in range(3 if layout == "padded" else 0):  # padding: skipped whatever its other fields say
        src_row.append(n_src + 7)
        dst_rank.append(-1)
        dst_row.append(-1)
    order = torch.randperm(len(src_row), generator=g)
    if layout == "runs":
        order = torch.arange(len(src_row))
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64)[order]  # noqa: E731
    return as_tensor(src_row), as_tensor(dst_rank), as_tensor(dst_row)


def _body_push_delivers(comm, dtype_name: str, trailing: tuple, seed: int, layout: str = "padded"):
    dtype = getattr(torch, dtype_name)
    transport = transport_for(comm)
    world, rank, device = comm.world_size, comm.rank, comm.device
    per_peer, n_src = 4, 6
    buffer = transport.buffer("deliver", dtype, trailing, world * per_peer)
    assert buffer.local.dtype == dtype and tuple(buffer.local.shape) == (world * per_peer, *trailing)
    src = _source_rows(rank, n_src, dtype, trailing).to(device)
    src_row, dst_rank, dst_row = (t.to(device) for t in _routing(seed, rank, world, per_peer, n_src, layout))
    transport.push_rows(src, src_row, dst_rank, dst_row, buffer)
    _finish_phase(transport)

    expected = torch.zeros(world * per_peer, *trailing, dtype=dtype)
    for sender in range(world):
        rows = _source_rows(sender, n_src, dtype, trailing)
        s_row, d_rank, d_row = _routing(seed, sender, world, per_peer, n_src, layout)
        for i in range(s_row.shape[0]):
            if int(d_row[i]) >= 0 and int(d_rank[i]) == rank:
                expected[int(d_row[i])] = rows[int(s_row[i])]
    got = buffer.local.cpu()
    assert torch.equal(got, expected), f"rank {rank}: received\n{got}\nexpected\n{expected}"
    transport.check()


ROW_LAYOUTS = [
    ("float32", (3, 5)),    # 60-byte rows: 4-byte words on CUDA
    ("bfloat16", (8,)),     # 16-byte rows: 16-byte vectors
    ("bfloat16", (7168,)),  # the standard workload's hidden size
    ("int64", ()),          # one element a row (counts)
    ("uint8", (3,)),        # 3-byte rows: bytewise
]


@pytest.mark.parametrize("dtype_name,trailing", ROW_LAYOUTS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_push_rows_delivers_rows_to_peer_offsets_and_skips_padding(kind, world_size, dtype_name, trailing):
    _group(kind, world_size).run(_body_push_delivers, dtype_name, trailing, 7)


@pytest.mark.parametrize("layout", ["shuffled", "runs"])
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_push_rows_without_padding_in_any_order_and_in_runs(kind, world_size, layout):
    """Pushes with no padding entry take ShmTransport's fast paths: a scatter of shuffled rows, and one
    gather per destination of consecutive rows (the layout of the CUDA backend's pushes)."""
    _group(kind, world_size).run(_body_push_delivers, "bfloat16", (8,), 11, layout)
    _group(kind, world_size).run(_body_push_delivers, "int64", (), 12, layout)


# ---------------------------------------------------------------------- overflow
def _body_overflow(comm):
    transport = transport_for(comm)
    world, rank, device = comm.world_size, comm.rank, comm.device
    capacity = 6
    buffer = transport.buffer("overflow", torch.float32, (4,), capacity)
    assert buffer.rows == capacity
    target = (rank + 1) % world
    src = torch.full((3, 4), float(rank + 1), device=device)
    src_row = torch.tensor([0, 1, 2], device=device)
    dst_rank = torch.tensor([target, target, target], device=device)
    dst_row = torch.tensor([rank % capacity, capacity + 3, capacity], device=device)  # two past the end
    transport.push_rows(src, src_row, dst_rank, dst_row, buffer)
    transport.barrier()
    if transport.device.type == "cuda":
        torch.cuda.synchronize(device)
    try:
        transport.check()
    except RuntimeError as exc:
        message = str(exc)
    else:
        raise AssertionError("check() did not report the overflow")
    sender = (rank - 1) % world
    assert f"push_rows from rank {rank} overflowed" in message, message
    assert f"rank {sender} pushed past the capacity of rank {rank}'s symmetric buffer" in message, message
    assert message.count(f"needed capacity {capacity + 4} rows, given capacity {capacity} rows") == 2, message
    transport.check()  # cleared

    got = buffer.local.cpu()
    expected = torch.zeros(capacity, 4)
    expected[sender % capacity] = float(sender + 1)
    assert torch.equal(got, expected), got
    _finish_phase(transport)  # everyone has read before anyone writes again

    # The transport keeps working after an overflow.
    transport.push_rows(src[:1], src_row[:1], dst_rank[:1], torch.tensor([capacity - 1], device=device), buffer)
    _finish_phase(transport)
    assert torch.equal(buffer.local[capacity - 1].cpu(), torch.full((4,), float(sender + 1)))
    return message


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_overflow_is_reported_by_check_with_needed_and_given_capacity(kind, world_size):
    messages = _group(kind, world_size).run(_body_overflow)
    assert all("needed capacity 10 rows, given capacity 6 rows" in m for m in messages)


# ---------------------------------------------------------------------- buffer cache
def _body_buffer_cache(comm):
    transport = transport_for(comm)
    world, rank, device = comm.world_size, comm.rank, comm.device
    first = transport.buffer("cache", torch.float32, (4,), 10)
    assert first.rows == 10 and first.local.shape == (10, 4) and first.local.dtype == torch.float32
    assert first.local.device == torch.device(device)
    assert transport.buffer("cache", torch.float32, (4,), 3) is first
    assert transport.buffer("cache", torch.float32, [4], 10) is first

    others = {
        "dtype": transport.buffer("cache", torch.bfloat16, (4,), 3),
        "shape": transport.buffer("cache", torch.float32, (2, 2), 3),
        "rank-1": transport.buffer("cache", torch.float32, (), 3),
        "purpose": transport.buffer("other", torch.float32, (4,), 3),
    }
    assert all(b is not first for b in others.values())
    assert len({id(b) for b in others.values()}) == len(others)
    assert others["dtype"].local.dtype == torch.bfloat16 and others["dtype"].local.shape == (3, 4)
    assert others["shape"].local.dtype == torch.float32 and others["shape"].local.shape == (3, 2, 2)
    assert others["rank-1"].local.shape == (3,)

    grown = transport.buffer("cache", torch.float32, (4,), 11)
    assert grown is not first and grown.rows == 20 and first.retired and not grown.retired
    assert grown.local.dtype == torch.float32 and grown.local.shape == (20, 4)
    assert first.local.sum().item() == 0.0  # a retired buffer stays readable while viewed
    try:
        transport.push_rows(torch.zeros(1, 4, device=device), *(torch.zeros(1, dtype=torch.int64, device=device),) * 3,
                            first)
    except RuntimeError as exc:
        assert "replaced by a larger buffer" in str(exc)
    else:
        raise AssertionError("push_rows into a retired buffer was accepted")
    assert transport.buffer("cache", torch.float32, (4,), 20) is grown
    big = transport.buffer("cache", torch.float32, (4,), 50)
    assert big.rows == 50 and grown.retired
    assert transport.buffer("cache", torch.bfloat16, (4,), 3) is others["dtype"]

    # Growth keeps working: every rank fills its block of the grown buffer on every peer.
    block = big.rows // world
    src = torch.arange(block * 4, dtype=torch.float32, device=device).view(block, 4) + 1000 * rank
    rows = torch.arange(block, device=device)
    for peer in range(world):
        transport.push_rows(src, rows, torch.full((block,), peer, device=device), rows + rank * block, big)
    _finish_phase(transport)
    got = big.local.cpu()
    for sender in range(world):
        expected = torch.arange(block * 4, dtype=torch.float32).view(block, 4) + 1000 * sender
        assert torch.equal(got[sender * block:(sender + 1) * block], expected)
    transport.check()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_buffer_cache_reuses_grows_and_keys_on_dtype_and_shape(kind, world_size):
    _group(kind, world_size).run(_body_buffer_cache)


def _body_disagreeing_buffer(comm):
    transport = transport_for(comm)
    try:
        transport.buffer("disagree", torch.float32, (4,), 10 + comm.rank)
    except RuntimeError as exc:
        assert "collective" in str(exc), exc
    else:
        raise AssertionError("ranks asking for different buffers were not told")
    buffer = transport.buffer("agree", torch.float32, (4,), 8)  # the transport is still usable
    _finish_phase(transport)
    return buffer.rows


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_buffer_with_different_arguments_on_different_ranks_raises_on_every_rank(kind, world_size):
    assert _group(kind, world_size).run(_body_disagreeing_buffer) == [8] * world_size


def _body_released_without_gc(comm):
    """A retired buffer, and one whose overflow check() raised, are released by reference counting
    alone: nothing in the transport keeps them in a reference cycle until the cyclic GC runs."""
    import gc
    import weakref

    transport = transport_for(comm)
    rank, device = comm.rank, comm.device
    gc.collect()
    gc.disable()
    try:
        probe = transport.buffer("probe", torch.float32, (4,), 2)
        probe_ref = weakref.ref(probe)
        one = torch.zeros(1, dtype=torch.int64, device=device)
        transport.push_rows(torch.ones(1, 4, device=device), one, one + rank, one + 5, probe)  # overflows
        transport.barrier()
        try:
            transport.check()
        except RuntimeError:
            pass
        else:
            raise AssertionError("check() did not report the overflow")
        del probe
        allocations = _transport_allocations()
        grown = transport.buffer("probe", torch.float32, (4,), 8)
        assert probe_ref() is None, "the retired buffer is still referenced"
        transport.check()  # on CUDA frees the released memory
        assert _transport_allocations() == allocations, (allocations, _transport_allocations())
        return grown.rows
    finally:
        gc.enable()


def _transport_allocations() -> int:
    from fuser_moe.backends.transport.cuda_ipc import _live_device_allocations

    return _live_device_allocations()


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_retired_buffers_are_released_without_waiting_for_gc(kind, world_size):
    assert _group(kind, world_size).run(_body_released_without_gc) == [8] * world_size


# ---------------------------------------------------------------------- barrier
def _body_barrier_generations(comm, rounds: int):
    transport = transport_for(comm)
    world, rank, device = comm.world_size, comm.rank, comm.device
    board = transport.buffer("board", torch.int64, (), world)
    everyone = torch.arange(world, device=device)
    zeros = torch.zeros(world, dtype=torch.int64, device=device)
    mine = torch.full((world,), rank, device=device)
    for step in range(1, rounds + 1):
        value = torch.full((1,), 1000 * step + rank, dtype=torch.int64, device=device)
        transport.push_rows(value, zeros, everyone, mine, board)
        transport.barrier()
        got = board.local.tolist()  # on CUDA a sync on the stream, after the barrier
        expected = [1000 * step + s for s in range(world)]
        assert got == expected, f"step {step}: rank {rank} sees {got}, expected {expected}"
        transport.barrier()  # nobody writes step + 1 before everyone has read step
    _finish_phase(transport)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_consecutive_barriers_never_alias(kind, world_size):
    _group(kind, world_size).run(_body_barrier_generations, 100)


def _body_barrier_timeout(comm, absent: int, run_id: str):
    transport = transport_for(comm)
    _finish_phase(transport)
    gave_up = f"test_transport/{run_id}/gave_up"
    if comm.rank == absent:
        # Never arrives: waits until every other rank gave up (or long past the timeout), then leaves.
        deadline = time.monotonic() + 3 * comm.timeout_s
        while comm.store.add(gave_up, 0) < comm.world_size - 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        return None
    start = time.monotonic()
    try:
        _finish_phase(transport)
    except TimeoutError as exc:
        waited = time.monotonic() - start
        comm.store.add(gave_up, 1)
        return str(exc), waited
    comm.store.add(gave_up, 1)
    raise AssertionError("the barrier returned although a rank never arrived")


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_barrier_times_out_naming_the_missing_rank(kind, world_size):
    absent = world_size - 1
    results = _group(kind, world_size).run(_body_barrier_timeout, absent, f"{kind}-{world_size}-{os.getpid()}",
                                            comm_timeout_s=SHORT_TIMEOUT_S)
    for rank, result in enumerate(results):
        if rank == absent:
            continue
        message, waited = result
        assert f"rank(s) [{absent}] never arrived" in message, message
        assert f"{SHORT_TIMEOUT_S:g} s" in message, message
        assert SHORT_TIMEOUT_S - 0.05 <= waited < SHORT_TIMEOUT_S + 3.0, waited


# ---------------------------------------------------------------------- shared memory is released
def _body_allocate_then_maybe_die(comm, victim: int):
    transport = transport_for(comm)
    for rows in (4, 9, 40):
        transport.buffer("leak", torch.float32, (16,), rows)
    transport.buffer("leak", torch.int64, (), 3)
    _finish_phase(transport)
    mine = glob.glob(f"/dev/shm/fuser_moe_{os.getpid()}_*")
    transport.barrier()
    if comm.rank == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return mine


def _leftover_segments(pids) -> list:
    return sorted(p for pid in pids for p in glob.glob(f"/dev/shm/fuser_moe_{pid}_*"))


@pytest.mark.parametrize("world_size", [2, 4])
def test_no_shared_memory_is_left_after_ranks_exit_or_die(world_size):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this host")
    group = _RankGroup(world_size, "cpu")
    try:
        victim = world_size - 1
        listings = group.run(_body_allocate_then_maybe_die, victim, may_exit=(victim,))
        for rank, listing in enumerate(listings):
            assert rank == victim or listing == [], f"rank {rank} still names segments while running: {listing}"
    finally:
        group.close()
    assert _leftover_segments(group.pids) == []


# ---------------------------------------------------------------------- CUDA only
def _body_graph_replay(comm, replays: int):
    transport = transport_for(comm)
    world, rank, device = comm.world_size, comm.rank, comm.device
    hidden, per_sender = 256, 2
    buffer = transport.buffer("graph", torch.float32, (hidden,), per_sender * world)
    src = torch.zeros(3, hidden, device=device)
    src_row = torch.tensor([0, 1, 2], device=device)
    dst_rank = torch.tensor([(rank + 1) % world, (rank + world - 1) % world, 0], device=device)
    dst_row = torch.tensor([per_sender * rank, per_sender * rank + 1, -1], device=device)  # last: padding

    def fill(step):
        for i in range(3):
            src[i] = torch.arange(hidden, device=device, dtype=torch.float32) + 10000 * step + 100 * rank + i

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm-up: every buffer exists before capture
        transport.push_rows(src, src_row, dst_rank, dst_row, buffer)
        transport.barrier()
    torch.cuda.synchronize(device)
    transport.check()
    _finish_phase(transport)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        transport.push_rows(src, src_row, dst_rank, dst_row, buffer)
        transport.barrier()
    for step in range(1, replays + 1):
        fill(step)
        graph.replay()
        torch.cuda.synchronize(device)
        got = buffer.local.cpu()
        for sender in range(world):
            for i in range(2):
                peer = (sender + 1) % world if i == 0 else (sender + world - 1) % world
                if peer != rank:
                    continue
                expected = torch.arange(hidden, dtype=torch.float32) + 10000 * step + 100 * sender + i
                assert torch.equal(got[per_sender * sender + i], expected), (step, sender, i)
        _finish_phase(transport)  # eager barriers between replays share the device generation counter
    transport.check()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_cuda_graph_replays_push_rows_and_barrier(world_size):
    _group("cuda", world_size).run(_body_graph_replay, 5)


def _leak_round(transport, rows: int, hidden: int, device) -> None:
    world, rank = transport.world_size, transport.rank
    buffer = transport.buffer("leak", torch.bfloat16, (hidden,), rows)
    src = torch.randn(rows, hidden, device=device).to(torch.bfloat16)
    index = torch.arange(rows, device=device)
    transport.push_rows(src, index, torch.full((rows,), (rank + 1) % world, device=device), index, buffer)
    transport.barrier()


def _body_no_leak(comm, rounds: int):
    from fuser_moe.backends.transport.cuda_ipc import _live_device_allocations

    import gc

    gc.collect()  # what earlier jobs of this process left behind is not this test's business
    transport = transport_for(comm)
    device, hidden = comm.device, 512
    g = torch.Generator().manual_seed(1234)  # the same sizes on every rank: buffer() is collective
    sizes = torch.randint(1, 257, (rounds,), generator=g).tolist()
    sizes[3] = 256
    baseline = None
    for step, rows in enumerate(sizes):
        _leak_round(transport, rows, hidden, device)
        if step == 20:
            torch.cuda.synchronize(device)
            transport.check()
            baseline = (open_ipc_mappings(), torch.cuda.memory_allocated(device), _live_device_allocations())
    torch.cuda.synchronize(device)
    transport.check()
    final = (open_ipc_mappings(), torch.cuda.memory_allocated(device), _live_device_allocations())
    assert final == baseline, f"(open IPC mappings, torch bytes, transport allocations): {baseline} -> {final}"
    return final


@pytest.mark.parametrize("world_size", [2, 4])
def test_cuda_resources_stay_flat_over_many_rounds(world_size):
    results = _group("cuda", world_size).run(_body_no_leak, 200)
    for mappings, _, _ in results:
        assert mappings >= 2 * (world_size - 1)  # control block and the buffer, from every peer


# ---------------------------------------------------------------------- in-process checks
def test_control_layout_matches_barrier_kernel():
    source = (KERNELS / "barrier.cu").read_text()
    constants = {name: int(value) for name, value in re.findall(r"\b(FM_[A-Z_]+) = (\d+),", source)}
    for position, name in enumerate(ControlLayout.ARRAYS):
        assert constants[f"FM_{name.upper()}"] == position, name
    assert constants["FM_PER_PEER_ARRAYS"] == len(ControlLayout.ARRAYS)
    for position, name in enumerate(ControlLayout.SCALARS):
        assert constants[f"FM_{name.upper()}"] == position, name
    assert constants["FM_SCALARS"] == len(ControlLayout.SCALARS)
    push = (KERNELS / "alltoallv.cu").read_text()
    status = {name: int(value) for name, value in re.findall(r"\bFM_STATUS_([A-Z_]+) = (\d+);", push)}
    assert status == {n.upper(): ControlLayout.SCALARS.index(n) for n in ("out_needed", "out_capacity", "bad_entry")}


def test_transport_is_cached_per_communicator_and_closed_with_it():
    from fuser_moe.backends.communicator import Communicator

    comm = Communicator(device="cpu", timeout_s=5)
    transport = transport_for(comm)
    assert transport_for(comm) is transport
    other = Communicator(device="cpu", timeout_s=5)
    assert transport_for(other) is not transport
    buffer = transport.buffer("x", torch.float32, (2,), 3)
    comm.close()
    assert transport.closed and buffer.retired
    transport.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        transport.buffer("x", torch.float32, (2,), 3)
    assert transport_for(comm) is not transport
    other.close()


def test_push_rows_rejects_malformed_arguments():
    from fuser_moe.backends.communicator import Communicator

    comm = Communicator(device="cpu", timeout_s=5)
    transport = transport_for(comm)
    buffer = transport.buffer("x", torch.float32, (2,), 3)
    index = torch.zeros(1, dtype=torch.int64)
    good = torch.zeros(1, 2)
    with pytest.raises(TypeError, match="holds torch.float32"):
        transport.push_rows(good.double(), index, index, index, buffer)
    with pytest.raises(ValueError, match=r"\[N, \*\(2,\)\]"):
        transport.push_rows(torch.zeros(1, 3), index, index, index, buffer)
    with pytest.raises(TypeError, match="dst_row must be int64"):
        transport.push_rows(good, index, index, index.int(), buffer)
    with pytest.raises(ValueError, match="one length"):
        transport.push_rows(good, index, index, torch.zeros(2, dtype=torch.int64), buffer)
    with pytest.raises(ValueError, match="dst_rank 1"):
        transport.push_rows(good, index, index + 1, index, buffer)
    with pytest.raises(ValueError, match="src_row 5"):
        transport.push_rows(good, index + 5, index, index, buffer)
    with pytest.raises(ValueError, match="SymmetricTensor"):
        transport.push_rows(good, index, index, index, buffer.local)
    with pytest.raises(TypeError):
        transport.buffer("x", "float32", (2,), 3)
    with pytest.raises(ValueError):
        transport.buffer("x", torch.float32, (2,), -1)
    assert isinstance(buffer, SymmetricTensor)
    comm.close()


def test_kernel_arguments_are_explicitly_typed():
    from fuser_moe.backends.transport.nvrtc import Kernel

    kernel = Kernel("k", torch.device("cuda", 0), function=None, param_sizes=[8, 8, 4])
    kernel._pack([None, ctypes.c_int64(1), ctypes.c_int32(2)])
    with pytest.raises(TypeError, match="explicit ctypes"):
        kernel._pack([None, 1, ctypes.c_int32(2)])
    with pytest.raises(TypeError, match="4 bytes"):
        kernel._pack([None, ctypes.c_int64(1), ctypes.c_int64(2)])
    with pytest.raises(TypeError, match="takes 3 arguments"):
        kernel._pack([None, ctypes.c_int64(1)])
    with pytest.raises(ValueError, match="on cpu"):
        kernel._pack([torch.zeros(1), ctypes.c_int64(1), ctypes.c_int32(2)])


def test_kernels_compile_with_nvrtc(tmp_path, monkeypatch):
    try:
        from fuser_moe.backends.transport import _cuda, nvrtc

        _cuda.call(_cuda.nvrtc().nvrtcVersion(), "nvrtcVersion")
    except Exception as exc:  # noqa: BLE001 - no cuda-python or no NVRTC library
        pytest.skip(f"NVRTC through cuda-python is not available: {exc}")
    monkeypatch.setenv("FUSER_MOE_KERNEL_CACHE", str(tmp_path))
    for source in sorted(KERNELS.glob("*.cu")):
        binary = nvrtc.compiled_binary(source, (9, 0))
        assert binary[:4] == b"\x7fELF", source
        assert nvrtc.compiled_binary(source, (9, 0)) == binary  # from the disk cache
    assert len(list(tmp_path.iterdir())) == len(list(KERNELS.glob("*.cu")))


def test_check_kernels_script_passes():
    result = subprocess.run(["bash", str(REPO / "tools" / "check_kernels.sh")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "check_kernels:" in result.stdout


def test_kernel_defines_become_compile_options(monkeypatch):
    from fuser_moe.backends.transport import nvrtc

    monkeypatch.delenv("FUSER_MOE_KERNEL_DEFINES", raising=False)
    assert nvrtc.compile_options() == nvrtc.COMPILE_OPTIONS
    monkeypatch.setenv("FUSER_MOE_KERNEL_DEFINES", " FM_LL_COPY_BATCH=16  FM_COMBINE_STAMP_FENCE=0 ")
    assert nvrtc.compile_options() == nvrtc.COMPILE_OPTIONS + ("-DFM_LL_COPY_BATCH=16", "-DFM_COMBINE_STAMP_FENCE=0")
    monkeypatch.setenv("FUSER_MOE_KERNEL_DEFINES", "FM_OK -Dbad")
    with pytest.raises(ValueError, match="'-Dbad' is not NAME or NAME=VALUE"):
        nvrtc.compile_options()
