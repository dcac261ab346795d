"""Starting ranks on this host without a launcher: used by `fuser-moe demo`, the benchmark and the tests.

`spawn(fn, world_size, ...)` starts one process per rank, initialises a process group in each (Gloo
for CPU, Gloo+NCCL for CUDA with rank i on GPU i), runs `fn(comm, *args)` and returns every rank's
result. A rank that raises fails the whole call with that rank's traceback; a rank that does not
finish within the timeout is killed, so nothing hangs. `run_ranks` is the same launch returning every
rank's outcome (result, traceback or exit code) instead of raising, for callers that expect a rank to die.

Whatever ends the wait (results, a timeout, an exception such as Ctrl-C's KeyboardInterrupt in the
parent), no rank outlives the call: ranks still running are killed and joined, and the shared-memory
segments a killed rank had not yet unlinked are removed. Before a rank that gave no answer is killed, it
writes every thread's Python stack to its stderr (`STACK_SIGNAL`, faulthandler), so a timeout says where
the rank was waiting.
"""
from __future__ import annotations

import ctypes
import datetime
import faulthandler
import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

DEFAULT_SPAWN_TIMEOUT_S = 600.0
# Waiting for every rank to start (import torch, connect) can take far longer than a short collective
# timeout: the rendezvous gets at least this long, the group's collectives and store get their own timeout.
RENDEZVOUS_TIMEOUT_S = 120.0
GRACE_AFTER_FAILURE_S = 10.0  # how long the other ranks may run on once one rank has failed
# A rank writes its threads' Python stacks to stderr on this signal; `_stop` sends it before a kill.
STACK_SIGNAL = getattr(signal, "SIGUSR1", None)
STACK_DUMP_WAIT_S = 1.0  # how long a rank is given to write its stacks before it is killed


class RankFailure(RuntimeError):
    """One or more ranks raised, died or timed out; the message holds their tracebacks."""


def too_few_gpus(device: str, world_size: int) -> Optional[str]:
    """Why `world_size` ranks on `device` ("cpu" or "cuda", one GPU a rank) cannot start here, or None."""
    if device != "cuda":
        return None
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        return "--device cuda needs GPUs and none is visible (use --device cpu for CPU ranks)"
    if visible < world_size:
        return (f"--world-size {world_size} needs that many GPUs (one a rank); {visible} visible "
                f"(use --world-size {visible} or fewer, or --device cpu)")
    return None


def rank_device(device: str, rank: int):
    """The `torch.device` of spawned rank `rank` for a launch on `device`.

    "cpu": the CPU. "cuda": one GPU a rank, rank i on cuda:i. "cuda:N": every rank on cuda:N, sharing
    one GPU (the CUDA backend works so, through CUDA IPC within one device; NCCL refuses two ranks on one
    GPU, so the nccl backend cannot run there).
    """
    import torch

    if device == "cuda":
        return torch.device("cuda", rank)
    if device.startswith("cuda:"):
        return torch.device(device)
    if device != "cpu":
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    return torch.device("cpu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_rank(rank: int, world_size: int, port: int, device: str, timeout_s: float):
    """Initialises the default process group for one spawned rank and returns its Communicator.

    The rendezvous waits at least `RENDEZVOUS_TIMEOUT_S` for every rank to start; after it, the group's
    collectives and its store time out after `timeout_s`, which is also the Communicator's timeout.
    """
    import torch
    from torch.distributed.distributed_c10d import _get_default_store, _set_pg_timeout

    from fuser_moe.backends.communicator import Communicator, init_default_group, pg_timeout_for

    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        # A spawned rank has imported torch (its parent's main module) before the variable was set, so
        # torch sized its pool from the cores: ranks sharing cores would spin against each other.
        torch.set_num_threads(int(threads))
    if not device.startswith("cuda"):
        _keep_freed_memory()
    dev = rank_device(device, rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    timeout = datetime.timedelta(seconds=timeout_s)
    init_default_group(rank, world_size, "127.0.0.1", port, dev, timeout_s,
                       rendezvous_timeout_s=max(timeout_s, RENDEZVOUS_TIMEOUT_S))
    if timeout_s < RENDEZVOUS_TIMEOUT_S:
        try:
            _set_pg_timeout(pg_timeout_for(dev, timeout_s))
            _get_default_store().set_timeout(timeout)
        except (RuntimeError, ValueError, AttributeError) as exc:  # the group keeps the rendezvous timeout
            warnings.warn(f"fuser_moe.launch: could not set the group's timeout to {timeout_s:g} s: {exc}")
    return Communicator(device=dev, timeout_s=timeout_s, owns_group=True)


def _keep_freed_memory() -> None:
    """Keeps the memory a CPU rank frees for its next allocations (glibc only).

    By default glibc maps every block over 128 KiB afresh and unmaps it when freed, so each call's
    multi-megabyte outputs fault their pages in again: on a CPU rank that costs more than the copy that
    fills them. Blocks up to 32 MiB come from the heap instead, and the heap is trimmed only past 512 MiB.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc: keep the allocator's defaults
        pass


def _rank_main(rank, world_size, port, device, timeout_s, fn, args, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if STACK_SIGNAL is not None:
        faulthandler.register(STACK_SIGNAL, file=sys.stderr, all_threads=True)
    comm = None
    try:
        comm = init_rank(rank, world_size, port, device, timeout_s)
    except BaseException:  # noqa: BLE001 - the parent reports it, and stops the others at once
        results.put((rank, False, "the rank failed to start:\n" + traceback.format_exc(), False))
        return
    try:
        results.put((rank, True, fn(comm, *args), True))
    except BaseException:  # noqa: BLE001 - the parent reports it
        results.put((rank, False, traceback.format_exc(), True))
    finally:
        if comm is not None:
            try:
                comm.close()
            except Exception:  # noqa: BLE001
                pass


@dataclass
class RankOutcome:
    """How one spawned rank ended.

    rank: the rank. ok: True when `fn` returned. value: what `fn` returned, or the traceback it raised,
    or why there is no result (the rank died or ran out of time). exitcode: the process's exit code
    (negative: the signal that ended it). pid: the process id it ran as.
    """

    rank: int
    ok: bool
    value: Any
    exitcode: Optional[int] = None
    pid: Optional[int] = None


def run_ranks(fn: Callable, world_size: int, args: Sequence[Any] = (), device: str = "cpu",
              timeout_s: Optional[float] = None, collective_timeout_s: float = 300.0,
              grace_s: float = GRACE_AFTER_FAILURE_S, exit_grace_s: float = 5.0) -> list:
    """Runs `fn(comm, *args)` on `world_size` fresh processes; returns a `RankOutcome` per rank, in rank order.

    Never raises for a rank's sake: a rank that raises, dies (`os._exit`, a signal) or is still running
    `timeout_s` seconds after the start (or `grace_s` after another rank raised or died) is reported in
    its outcome; one still running is killed, and so is a rank that answered but has not exited
    `exit_grace_s` later. An exception in the caller while waiting (KeyboardInterrupt) kills every rank
    before it propagates. `fn` must be importable by name (a module-level function).
    """
    timeout_s = DEFAULT_SPAWN_TIMEOUT_S if timeout_s is None else timeout_s
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, device, collective_timeout_s, fn, args, results),
                         daemon=True) for r in range(world_size)]
    got: dict = {}  # rank -> (ok, value)
    answered: set = set()  # ranks whose result came back (they are exiting on their own)
    start = time.monotonic()
    deadline = start + timeout_s
    try:
        for p in procs:
            p.start()
        while len(got) < world_size:
            try:
                rank, ok, value, started = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r in range(world_size) if r not in got and not procs[r].is_alive()]
                if dead:  # the others may be waiting for a rank that died: a short grace, as for a failure
                    deadline = min(deadline, time.monotonic() + grace_s)
                if len(dead) == world_size - len(got):
                    # Every unfinished rank is gone: collect what a rank queued just before it exited.
                    time.sleep(0.2)
                    answered |= _drain(results, got)
                    for r in range(world_size):
                        if r not in got:
                            got[r] = (False, f"rank {r} exited with code {procs[r].exitcode} without a result")
                    break
                if time.monotonic() > deadline:
                    for r in range(world_size):
                        if r not in got:
                            got[r] = (False, f"rank {r} was still running {time.monotonic() - start:.0f} s after the "
                                             f"start (timeout {timeout_s:g} s, or {grace_s:g} s after another rank "
                                             "failed or died): killed")
                    break
                continue
            got[rank] = (ok, value)
            answered.add(rank)
            if not started:  # the others wait for it in the rendezvous, for nothing: stop them now
                for r in range(world_size):
                    if r not in got:
                        got[r] = (False, f"rank {r} was stopped: rank {rank} failed to start")
                break
            if not ok:  # the others may be waiting for it: a short grace, then stop waiting
                deadline = min(deadline, time.monotonic() + grace_s)
    finally:
        # Ranks that answered get a moment to close their group; any other is killed at once.
        _stop(procs, [procs[r] for r in sorted(answered)], exit_grace_s)
    return [RankOutcome(r, *got.get(r, (False, f"rank {r} gave no result")), exitcode=procs[r].exitcode,
                        pid=procs[r].pid) for r in range(world_size)]


def spawn(fn: Callable, world_size: int, args: Sequence[Any] = (), device: str = "cpu",
          timeout_s: Optional[float] = None, collective_timeout_s: float = 300.0) -> list:
    """Runs `fn(comm, *args)` on `world_size` fresh processes; returns the per-rank results in rank order.

    `fn` must be importable by name (a module-level function). Raises `RankFailure` if any rank raises,
    dies, or is still running `timeout_s` seconds after the start.
    """
    outcomes = run_ranks(fn, world_size, args, device=device, timeout_s=timeout_s,
                         collective_timeout_s=collective_timeout_s)
    failures = [f"--- rank {o.rank} ---\n{o.value}" for o in outcomes if not o.ok]
    if failures:
        raise RankFailure("\n".join(failures))
    return [o.value for o in outcomes]


def _drain(results, got: dict) -> set:
    """Moves every queued result into `got`; returns the ranks that had one."""
    ranks = set()
    while True:
        try:
            rank, ok, value, _ = results.get_nowait()
        except queue.Empty:
            return ranks
        got.setdefault(rank, (ok, value))
        ranks.add(rank)


def _stop(procs: Sequence, finishing: Sequence, wait_s: float = 5.0) -> None:
    """Gives the `finishing` ranks (those that answered) `wait_s` to exit, asks every other rank still
    alive for its stacks (`STACK_SIGNAL`: written to its stderr), kills every rank still alive, joins them,
    and removes the shared-memory segments of any rank that did not exit cleanly (a rank killed in the
    middle of an allocation leaves its segment's name behind)."""
    deadline = time.monotonic() + wait_s
    for p in finishing:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    silent = [p for p in procs if p.is_alive() and p not in finishing]
    if silent and STACK_SIGNAL is not None:
        for p in silent:
            print(f"fuser_moe.launch: pid {p.pid} gave no result; its Python stacks follow", file=sys.stderr,
                  flush=True)
            try:
                os.kill(p.pid, STACK_SIGNAL)
            except OSError:  # it exited meanwhile
                pass
        time.sleep(STACK_DUMP_WAIT_S)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        if p.pid is not None:
            p.join(timeout=10)
    unclean = [p.pid for p in procs if p.pid is not None and p.exitcode != 0]
    if unclean:
        from fuser_moe.backends.transport.shm import release_segments_of

        for pid in unclean:
            release_segments_of(pid)
