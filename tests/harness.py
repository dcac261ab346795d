"""Multi-rank test harness: the single `pytest` command starts the ranks itself.

A `RankPool` keeps `world_size` spawned processes with an initialised process group alive across
tests (starting torch in a process costs seconds; the suite runs hundreds of multi-rank cases). Each
test sends a module-level function to every rank and gets every rank's result. A rank that raises
fails the test with its traceback; a job that does not finish within its timeout, or a rank that dies,
kills the pool, which is started afresh for the next test. Nothing can hang.

Environment: FUSER_MOE_TEST_DEVICE=cuda runs ranks on GPUs: rank i on cuda:i when there are as many
GPUs as ranks, otherwise every rank on cuda:0 (`pool_device`). The cuda backend runs so (CUDA IPC
within one device); NCCL refuses two ranks on one GPU, so nccl cases of such a world are skipped with
that reason (`nccl_skip_reason`, applied by tests/conftest.py and by `run_on_ranks`).
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import time
import traceback

TEST_DEVICE = os.environ.get("FUSER_MOE_TEST_DEVICE", "cpu")
JOB_TIMEOUT_S = float(os.environ.get("FUSER_MOE_TEST_TIMEOUT_S", "120"))
COLLECTIVE_TIMEOUT_S = 60.0


def gpu_count() -> int:
    """GPUs visible to the tests (0 unless FUSER_MOE_TEST_DEVICE=cuda)."""
    if not TEST_DEVICE.startswith("cuda"):
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pool_device(world_size: int) -> str:
    """Where the ranks of a `world_size` job run, as `fuser_moe.launch.rank_device` reads it: "cpu",
    "cuda" (rank i on cuda:i) or "cuda:0" (every rank on one GPU, when there are fewer GPUs than ranks)."""
    if not TEST_DEVICE.startswith("cuda"):
        return "cpu"
    return "cuda" if gpu_count() >= world_size else "cuda:0"


def shares_gpu(world_size: int) -> bool:
    """True when the ranks of a `world_size` job share one GPU."""
    return pool_device(world_size) == "cuda:0" and world_size > 1


def nccl_skip_reason(world_size: int):
    """Why the nccl backend cannot run `world_size` ranks here, or None."""
    if shares_gpu(world_size):
        return (f"nccl backend skipped: {world_size} ranks share cuda:0 ({gpu_count()} GPU(s) visible) and NCCL "
                "refuses two ranks on one GPU")
    return None


def _worker(rank, world_size, port, device, jobs, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        if os.environ.get("FUSER_MOE_TEST_BREAK_START") == str(rank):  # tests of the harness itself
            raise RuntimeError(f"rank {rank}: a start failure planted by FUSER_MOE_TEST_BREAK_START")
        from fuser_moe.launch import init_rank

        comm = init_rank(rank, world_size, port, device, COLLECTIVE_TIMEOUT_S)
    except BaseException:  # noqa: BLE001
        results.put((rank, -1, False, traceback.format_exc()))
        return
    results.put((rank, -1, True, "ready"))
    while True:
        job = jobs.get()
        if job is None:
            break
        job_id, fn, args = job
        try:
            results.put((rank, job_id, True, fn(comm, *args)))
        except BaseException:  # noqa: BLE001
            results.put((rank, job_id, False, traceback.format_exc()))
    try:
        comm.close()
    except Exception:  # noqa: BLE001
        pass


class RankFailure(AssertionError):
    pass


class RankPool:
    """`world_size` rank processes with an initialised group, kept across tests; `device` as
    `fuser_moe.launch.rank_device` reads it (default: `pool_device(world_size)`)."""

    def __init__(self, world_size: int, device=None):
        from fuser_moe.launch import free_port

        device = pool_device(world_size) if device is None else device
        self.world_size, self.device = world_size, device
        ctx = mp.get_context("spawn")
        self.results = ctx.Queue()
        self.jobs = [ctx.Queue() for _ in range(world_size)]
        port = free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, device, self.jobs[r], self.results),
                                  daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()
        self._job_id = 0
        self._collect(-1, JOB_TIMEOUT_S, "start")

    def _collect(self, job_id: int, timeout_s: float, what: str) -> list:
        got: dict = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.world_size:
            try:
                rank, jid, ok, value = self.results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive() and r not in got]
                if dead or time.monotonic() > deadline:
                    self.kill()
                    why = (f"rank(s) {dead} died" if dead else f"timed out after {timeout_s:.0f} s")
                    done = {r: v for r, (ok, v) in got.items()}
                    errors = "\n".join(f"--- rank {r} ---\n{v}" for r, (ok, v) in got.items() if not ok)
                    raise RankFailure(f"{what}: {why}; finished ranks {sorted(done)}\n{errors}")
                continue
            if jid != job_id:
                continue
            got[rank] = (ok, value)
            if not ok and job_id == -1:
                # A rank that failed to start leaves the others waiting in the rendezvous: stop them now.
                self.kill()
                raise RankFailure(f"{what}: rank {rank} failed to start (the other ranks were stopped):\n{value}")
            if not ok:
                deadline = min(deadline, time.monotonic() + 10.0)  # the others may be stuck waiting for it
        failures = [f"--- rank {r} ---\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
        if failures:
            raise RankFailure(f"{what} failed on rank(s) {[r for r, (ok, _) in sorted(got.items()) if not ok]}:\n"
                              + "\n".join(failures))
        return [got[r][1] for r in range(self.world_size)]

    def run(self, fn, *args, timeout_s: float = JOB_TIMEOUT_S) -> list:
        self._job_id += 1
        for q in self.jobs:
            q.put((self._job_id, fn, args))
        try:
            return self._collect(self._job_id, timeout_s, getattr(fn, "__name__", "job"))
        except RankFailure:
            # A failed job can leave ranks in mismatched collectives: start afresh next time.
            self.kill()
            raise

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=5)
        release_segments_of_dead(self.procs)

    def close(self) -> None:
        for q in self.jobs:
            try:
                q.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=10)
        self.kill()


def running(pid: int) -> bool:
    """True while `pid` is a process that has not exited (a zombie has)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def release_segments_of_dead(procs) -> list:
    """Removes the shared-memory segments that ranks killed mid-allocation left in /dev/shm; returns them."""
    from fuser_moe.backends.transport.shm import release_segments_of

    return [name for p in procs if p.pid is not None and p.exitcode not in (None, 0)
            for name in release_segments_of(p.pid)]


_pools: dict = {}


def run_on_ranks(world_size: int, fn, *args, timeout_s: float = JOB_TIMEOUT_S) -> list:
    """Runs `fn(comm, *args)` on every rank of a pool of `world_size` ranks; returns per-rank results."""
    pool = _pools.get(world_size)
    if pool is None or not pool.alive:
        if pool is not None:
            pool.kill()
        pool = _pools[world_size] = RankPool(world_size)
    try:
        return pool.run(fn, *args, timeout_s=timeout_s)
    except RankFailure as exc:
        # A test that runs the nccl backend among others (a soak over both, say) on ranks sharing a GPU.
        if shares_gpu(world_size) and "Duplicate GPU detected" in str(exc):
            import pytest

            pytest.skip(nccl_skip_reason(world_size))
        raise


def close_pools() -> None:
    while _pools:
        _, pool = _pools.popitem()
        pool.close()


atexit.register(close_pools)


def available_world_sizes(candidates=(1, 2, 3, 4)) -> list:
    """The world sizes of `candidates` that can run here: all of them on the CPU and on one GPU or
    more (ranks share cuda:0 when there are fewer GPUs than ranks); none without a GPU on cuda."""
    if TEST_DEVICE.startswith("cuda"):
        return list(candidates) if gpu_count() >= 1 else []
    return list(candidates)
