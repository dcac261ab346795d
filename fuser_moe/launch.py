"""Starting ranks on this host without a launcher: used by `fuser-moe demo`, the benchmark and the tests.

`spawn(fn, world_size, ...)` starts one process per rank, initialises a process group in each (Gloo
for CPU, Gloo+NCCL for CUDA with rank i on GPU i), runs `fn(comm, *args)` and returns every rank's
result. A rank that raises fails the whole call with that rank's traceback; a rank that does not
finish within the timeout is killed, so nothing hangs.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Optional, Sequence

DEFAULT_SPAWN_TIMEOUT_S = 600.0


class RankFailure(RuntimeError):
    """One or more ranks raised, died or timed out; the message holds their tracebacks."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world_size: int, port: int, device: str, timeout_s: float):
    """Initialises the default process group for one spawned rank and returns its Communicator."""
    import torch
    import torch.distributed as dist

    from fuser_moe.backends.communicator import Communicator, pg_backend_for

    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
    else:
        dev = torch.device("cpu")
    dist.init_process_group(
        backend=pg_backend_for(dev), init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s))
    return Communicator(device=dev, timeout_s=timeout_s, owns_group=True)


def _rank_main(rank, world_size, port, device, timeout_s, fn, args, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    comm = None
    try:
        comm = init_rank(rank, world_size, port, device, timeout_s)
        results.put((rank, True, fn(comm, *args)))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc()))
    finally:
        if comm is not None:
            try:
                comm.close()
            except Exception:  # noqa: BLE001
                pass


def spawn(fn: Callable, world_size: int, args: Sequence[Any] = (), device: str = "cpu",
          timeout_s: Optional[float] = None, collective_timeout_s: float = 300.0) -> list:
    """Runs `fn(comm, *args)` on `world_size` fresh processes; returns the per-rank results in rank order.

    `fn` must be importable by name (a module-level function). Raises `RankFailure` if any rank raises,
    dies, or is still running `timeout_s` seconds after the start.
    """
    timeout_s = DEFAULT_SPAWN_TIMEOUT_S if timeout_s is None else timeout_s
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, device, collective_timeout_s, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    got: dict = {}
    failures: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(got) < world_size:
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and not p.is_alive()]
                if dead and not any(p.is_alive() for r, p in enumerate(procs) if r not in got and r not in dead):
                    # every unfinished rank is gone: give a dead rank's queued result a moment, then stop
                    time.sleep(0.5)
                    while not results.empty():
                        rank, ok, value = results.get()
                        got[rank] = (ok, value)
                    for r in dead:
                        if r not in got:
                            got[r] = (False, f"rank {r} exited with code {procs[r].exitcode} without a result")
                    continue
                if time.monotonic() > deadline:
                    for r in range(world_size):
                        if r not in got:
                            got[r] = (False, f"rank {r} did not finish within {timeout_s:.0f} s")
                    break
                continue
            got[rank] = (ok, value)
            if not ok:  # give the others a short grace, then stop waiting
                deadline = min(deadline, time.monotonic() + 10.0)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    for r in range(world_size):
        ok, value = got.get(r, (False, f"rank {r} gave no result"))
        if not ok:
            failures.append(f"--- rank {r} ---\n{value}")
    if failures:
        raise RankFailure("\n".join(failures))
    return [got[r][1] for r in range(world_size)]
