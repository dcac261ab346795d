"""The expert-parallel group a host IR runs on: ranks, device, store, timeout and collectives.

A `Communicator` wraps a `torch.distributed` process group (or no group at all, for a single rank).
Backends talk to their peers only through it, so that a collective that times out surfaces as a
`TimeoutError` (docs/contract.md section 9) and so that launcher detection (docs/contract.md section 6) lives in one place.
"""
from __future__ import annotations

import atexit
import datetime
import os
import pickle
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300.0
_rounds_lock = threading.Lock()
_exchange_rounds: dict = {}  # store prefix (one per group) -> next exchange round
_TIMEOUT_MARKERS = ("timed out", "timeout", "deadline exceeded")


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout read from a launcher's environment variables."""

    rank: int
    world_size: int
    local_rank: int
    launcher: str


def detect_launcher(environ: Optional[dict] = None) -> Optional[LaunchEnv]:
    """Reads torchrun, SLURM or Open MPI variables; returns None when no launcher started us."""
    env = os.environ if environ is None else environ
    layouts = (
        ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
        ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    )
    for launcher, rank_var, size_var, local_var in layouts:
        if rank_var in env and size_var in env:
            rank, size = int(env[rank_var]), int(env[size_var])
            local = int(env.get(local_var, rank))
            return LaunchEnv(rank, size, local, launcher)
    return None


def timeout_from_env(environ: Optional[dict] = None) -> float:
    env = os.environ if environ is None else environ
    raw = env.get("FUSER_MOE_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"FUSER_MOE_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"FUSER_MOE_TIMEOUT_S must be positive, got {value}")
    return value


def _is_timeout(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, TimeoutError) or any(m in text for m in _TIMEOUT_MARKERS)


class Communicator:
    """The ranks of one expert-parallel group.

    Args:
        group: a `torch.distributed` process group, or None for the default group. Ignored when
            `torch.distributed` is not initialised (then this is a single-rank communicator).
        device: the device this rank computes on (`torch.device`); defaults to the CPU.
        timeout_s: how long a peer may stay silent before a call raises `TimeoutError`. For a group
            passed in by the user this only bounds fuser_moe's own waits (the CUDA backend's barrier,
            store look-ups); the group's collectives keep the user's timeout.
        owns_group: True when fuser_moe initialised the process group and must destroy it on close.
    """

    def __init__(self, group=None, device=None, timeout_s: Optional[float] = None, owns_group: bool = False):
        self._distributed = dist.is_available() and dist.is_initialized()
        self.group = group if (group is not None or not self._distributed) else dist.group.WORLD
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timeout_s = float(timeout_s) if timeout_s is not None else timeout_from_env()
        self.owns_group = owns_group
        self._closers: list = []
        self._closed = False
        self._exit_state: Optional[dict] = None
        # What this rank runs now, (node, backend), set by the evaluator around each communication node,
        # e.g. ("MoeDispatch (node 0)", "nccl"); the backend is None while it is being chosen. Every store
        # exchange carries it, so that ranks that run different nodes or backends all raise at the first
        # exchange instead of waiting in different transports. None (or a None part) matches anything.
        self.context: Optional[tuple] = None
        if self._distributed:
            self.rank = dist.get_rank(self.group)
            if self.rank < 0:
                raise ValueError(f"this process (global rank {dist.get_rank()}) is not a member of the group it "
                                 "was given: only the group's members wrap it in a Communicator")
            self.world_size = dist.get_world_size(self.group)
            self.global_ranks = list(dist.get_process_group_ranks(self.group))
            self.group_name = str(self.group.group_name)
        else:
            self.rank, self.world_size, self.global_ranks = 0, 1, [0]
            self.group_name = "local"
        # Connected now, while the store's host is surely alive: a connection opened later to a host that
        # has exited would retry for the store's whole timeout (the user's, for a group passed in).
        self._store = self._open_store() if self._distributed else None
        if owns_group:
            # A group fuser_moe initialised is closed at interpreter exit, before torch's own teardown,
            # when the user never calls close() (`fd.execute` makes such a communicator by itself).
            self._exit_state = {"open": True, "group_name": self.group_name}
            atexit.register(_close_at_exit, weakref.ref(self), self._exit_state)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_environment(cls, device=None) -> "Communicator":
        """The communicator `fd.execute` uses when it is given none (docs/contract.md section 6).

        The default process group if one is initialised; otherwise one initialised from the launcher's
        environment (Gloo for CPU tensors, NCCL for CUDA tensors); otherwise a single rank.
        """
        if dist.is_available() and dist.is_initialized():
            return cls(device=device)
        launch = detect_launcher()
        if launch is None or launch.world_size == 1:
            return cls(device=device)
        timeout_s = timeout_from_env()
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type == "cuda":
            torch.cuda.set_device(launch.local_rank)
            dev = torch.device("cuda", launch.local_rank)
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
        init_default_group(launch.rank, launch.world_size, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           dev, timeout_s)
        return cls(device=dev, timeout_s=timeout_s, owns_group=True)

    # ------------------------------------------------------------------ facts
    @property
    def is_distributed(self) -> bool:
        return self._distributed and self.world_size > 1

    @property
    def store(self):
        """The group's key-value store (a PrefixStore unique to this group), or None on one rank."""
        return self._store

    def _open_store(self):
        """A PrefixStore unique to this group, over a connection of its own where the store can open one
        (a TCPStore client serves one call at a time, so a wait of one group would otherwise hold up the
        calls of another group of this process, made from another thread, until it timed out)."""
        from torch.distributed.distributed_c10d import _get_default_store

        base = _get_default_store()
        try:
            base = base.clone()
        except (RuntimeError, AttributeError):  # a store without clone(): share the process's client
            pass
        return dist.PrefixStore(self._store_prefix, base)

    @property
    def group_key(self) -> str:
        """Names this group, the same on every one of its ranks and different for every other group of the
        job: the process group's name (torch names groups in creation order, which every rank follows)
        and its global ranks. Two groups over the same ranks (used from two threads, say) differ."""
        return f"{self.group_name}/" + "_".join(str(r) for r in self.global_ranks)

    @property
    def _store_prefix(self) -> str:
        return "fuser_moe/" + self.group_key

    # ------------------------------------------------------------------ collectives
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise RuntimeError(f"{what}: this communicator (rank {self.rank} of {self.world_size}) is closed")

    def _call(self, what: str, fn, *args, **kwargs):
        self._check_open(what)
        try:
            return fn(*args, **kwargs)
        except TimeoutError:
            raise
        except RuntimeError as exc:
            if _is_timeout(exc):
                raise TimeoutError(
                    f"{what}: a peer did not answer within the timeout on rank {self.rank} "
                    f"of {self.world_size}: {exc}"
                ) from exc
            raise

    def all_to_all_single(self, output: torch.Tensor, input: torch.Tensor,
                          output_split_sizes: Optional[Sequence[int]] = None,
                          input_split_sizes: Optional[Sequence[int]] = None, async_op: bool = False):
        """Variable-split all-to-all; on one rank it is a copy.

        Args:
            output, input: the received and the sent rows (dim 0 split by the sizes, or evenly).
            output_split_sizes, input_split_sizes: rows from / to each rank (host ints), or None.
            async_op: return at once with a `PendingCollective` (the caller works meanwhile, touching
                neither tensor, and calls its `wait()` before reading output or issuing another
                collective).
        Returns: output, or with async_op a `PendingCollective` whose `wait()` returns output.
        """
        if not self.is_distributed:
            output.copy_(input)
            return PendingCollective(self, None, output, "all_to_all_single") if async_op else output
        watched = self._watch_collectives(output)
        work = self._call(
            "all_to_all_single", dist.all_to_all_single, output, input,
            output_split_sizes=None if output_split_sizes is None else list(output_split_sizes),
            input_split_sizes=None if input_split_sizes is None else list(input_split_sizes),
            group=self.group, async_op=watched or async_op,
        )
        pending = PendingCollective(self, work, output, "all_to_all_single", watched)
        return pending if async_op else pending.wait()

    def _watch_collectives(self, tensor: torch.Tensor) -> bool:
        """Whether a collective on `tensor` must be waited for here, within `timeout_s`.

        An NCCL collective whose peer has vanished never completes: the call returns at once, and the
        rank hangs later, in whatever waits for the GPU (or is torn down by NCCL's watchdog after the
        group's timeout). On a group fuser_moe initialised, the host instead waits for the collective
        for at most `timeout_s` (the watchdog's timeout is longer, see `pg_timeout_for`) and raises
        TimeoutError. A group the user passes in keeps the user's own handling; a collective being
        captured into a CUDA graph is not waited for.
        """
        return (self.owns_group and tensor.is_cuda and not torch.cuda.is_current_stream_capturing())

    def _wait_within_timeout(self, work, what: str) -> None:
        """Polls `work` (no stream synchronisation) until it completes or `timeout_s` passes.

        On timeout the group is aborted, which stops its NCCL kernels, so that this rank can raise,
        clean up and exit instead of hanging in a CUDA call; the group is unusable afterwards.
        """
        start = time.monotonic()
        deadline = start + self.timeout_s
        while not work.is_completed():
            now = time.monotonic()
            if now > deadline:
                self._abort_group()
                raise TimeoutError(
                    f"{what}: a peer did not answer within the timeout of {self.timeout_s:g} s on rank "
                    f"{self.rank} of {self.world_size} (the collective never completed); the process group "
                    "was aborted")
            # Spin through the first _SPIN_S (a collective usually ends within it, and a nap would
            # delay the rank by up to its length), then nap briefly between polls.
            if now - start > _SPIN_S:
                time.sleep(_NAP_S)
        self._call(what, work.wait)

    def _abort_group(self) -> None:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is None:
            return
        try:
            abort(self.group)
        except (RuntimeError, ValueError) as exc:  # already aborted or destroyed: nothing left to stop
            warnings.warn(f"fuser_moe: could not abort the process group after a timeout: {exc}")
        self.owns_group = False  # nothing left to destroy

    def exchange(self, obj: Any) -> list:
        """All-gather of a small picklable object through the group's store, in rank order.

        No collective runs, so this is safe for either backend (the CUDA backend makes no NCCL call)
        and every backend's checked mode agrees through the same channel. Every rank must call it the
        same number of times; rounds are numbered per group. A peer that never answers makes
        `store.get` time out, which is raised as `TimeoutError`.
        """
        if not self.is_distributed:
            return [obj]
        self._check_open("store exchange")
        with _rounds_lock:
            n = _exchange_rounds.get(self._store_prefix, 0)
            _exchange_rounds[self._store_prefix] = n + 1
        store = self.store
        keys = [f"x/{n}/{s}" for s in range(self.world_size)]
        self._call("store exchange", store.set, keys[self.rank], pickle.dumps((self.context, obj)))
        self._wait_for_keys(store, keys, "store exchange")
        got = [pickle.loads(self._call("store exchange", store.get, key)) for key in keys]
        if n > 0:
            # Every peer has published round n, so it has finished reading round n-1: drop our old key.
            try:
                store.delete_key(f"x/{n - 1}/{self.rank}")
            except Exception:  # noqa: BLE001 - only housekeeping
                pass
        _check_contexts([c for c, _ in got])  # every rank read the same round: all raise together
        return [o for _, o in got]

    def _wait_for_keys(self, store, keys: list, what: str) -> None:
        """Waits until every rank has published its key, at most `timeout_s` (the store's own timeout may
        be longer: a group passed in by the user keeps its settings). Raises TimeoutError naming the
        ranks that did not answer."""
        try:
            store.wait(keys, datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            if not _is_timeout(exc):
                raise
            try:
                missing = [s for s, key in enumerate(keys) if not store.check([key])]
            except RuntimeError:
                missing = "unknown"
            raise TimeoutError(
                f"{what}: rank(s) {missing} did not answer within the timeout of {self.timeout_s:g} s "
                f"(rank {self.rank} of {self.world_size})"
            ) from exc

    def all_gather_object(self, obj: Any) -> list:
        if not self.is_distributed:
            return [obj]
        out = [None] * self.world_size
        self._call("all_gather_object", dist.all_gather_object, out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.is_distributed:
            self._call("barrier", dist.barrier, group=self.group)

    def agree(self, error: Optional[BaseException]) -> None:
        """Makes every rank raise when any rank found an error (docs/contract.md section 9).

        Each rank passes the error it found in its own input, or None. The rank that found one raises
        it; every other rank raises the same type saying which rank rejected its input. Nothing else
        has travelled yet, so the group stays usable afterwards.
        """
        summary = None if error is None else (type(error).__name__, str(error))
        if not self.is_distributed:
            if error is not None:
                raise error
            return
        verdicts = self.exchange(summary)
        if error is not None:
            raise error
        for peer, verdict in enumerate(verdicts):
            if verdict is not None:
                kind, message = verdict
                exc_type = {"ValueError": ValueError, "TypeError": TypeError,
                            "RuntimeError": RuntimeError, "TimeoutError": TimeoutError}.get(kind, RuntimeError)
                raise exc_type(f"rank {peer} rejected its input ({kind}: {message})")

    # ------------------------------------------------------------------ lifetime
    def on_close(self, closer) -> None:
        """Registers a callable that releases a resource tied to this group (buffers, mappings)."""
        self._closers.append(closer)

    @property
    def closed(self) -> bool:
        """True once `close` has run: the communicator holds no group or store any more."""
        return self._closed

    def close(self) -> None:
        """Releases what this communicator holds, in order; idempotent.

        First the resources registered with `on_close` (the CUDA backend's buffers and mappings, which
        may still talk to the store), newest first; then this communicator's references to the store
        connection and to the process group; last, the process group itself when fuser_moe initialised
        it (`owns_group`). A reference to a group that outlives `destroy_process_group()` is destroyed
        late, during interpreter shutdown, where Gloo and the store's threads abort the process
        ("terminate called without an active exception"): dropping every reference first avoids it.
        A closed communicator cannot run collectives any more.
        """
        try:
            while self._closers:
                self._closers.pop()()
        finally:
            self._closed = True
            self._store = None
            self.group = None
            self._selection_facts = None
            if self._exit_state is not None:
                self._exit_state["open"] = False
            if self.owns_group:
                self.owns_group = False
                if dist.is_available() and dist.is_initialized():
                    dist.destroy_process_group()

    def __repr__(self) -> str:
        return f"Communicator(rank={self.rank}, world_size={self.world_size}, device={self.device})"


class PendingCollective:
    """A collective started with `async_op=True`: `wait()` blocks until it has completed and returns its
    output. A peer that does not answer makes `wait()` raise TimeoutError, as the blocking call would:
    within the communicator's `timeout_s` for a watched NCCL collective (`Communicator._watch_collectives`),
    else within the group's own timeout (Gloo's, the user's for a group passed in)."""

    def __init__(self, comm: Communicator, work, output: torch.Tensor, what: str, watched: bool = False):
        self._comm, self._work, self._output, self._what, self._watched = comm, work, output, what, watched

    def wait(self) -> torch.Tensor:
        work, self._work = self._work, None
        if work is not None:
            if self._watched:
                self._comm._wait_within_timeout(work, self._what)
            else:
                self._comm._call(self._what, work.wait)
        return self._output


def _check_contexts(contexts: list) -> None:
    """Raises ValueError when the ranks of one exchange round run different nodes or backends."""
    known = [c for c in contexts if c is not None]
    nodes = {node for node, _ in known}
    backends = {backend for _, backend in known if backend is not None}
    if len(nodes) <= 1 and len(backends) <= 1:
        return

    def describe(c):
        if c is None:
            return "not in a node of a fusion"
        return f"{c[0]} on backend {c[1]}" if c[1] is not None else f"{c[0]}, choosing its backend"
    runs = "; ".join(f"rank {s}: {describe(c)}" for s, c in enumerate(contexts))
    what = "the backend" if len(nodes) <= 1 else "the node they run"
    raise ValueError(f"ranks disagree on {what} ({runs}); every rank must run the same fusion with the same "
                     "backend (docs/contract.md section 9)")


def _close_at_exit(ref, state: dict) -> None:
    """atexit hook of a communicator that owns its group: closes it, or, when the communicator itself is
    gone but never closed, destroys the group it initialised."""
    if not state["open"]:
        return
    comm = ref()
    try:
        if comm is not None:
            comm.close()
        elif dist.is_available() and dist.is_initialized() and str(dist.group.WORLD.group_name) == state["group_name"]:
            state["open"] = False
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - at exit, report and go on
        warnings.warn(f"fuser_moe: closing the communicator at exit failed: {exc}")


_SPIN_S = 5e-3  # _wait_within_timeout polls without sleeping this long, then naps _NAP_S between polls
_NAP_S = 5e-5

# NCCL's watchdog tears the process down when a collective outlives the group's timeout. fuser_moe waits
# for its own NCCL collectives with `timeout_s` and raises TimeoutError; the watchdog gets this much longer,
# so that the error reaches the caller first.
WATCHDOG_MARGIN_S = 10.0


def pg_timeout_for(device: torch.device, timeout_s: float) -> datetime.timedelta:
    """The timeout of a process group fuser_moe initialises for `device` tensors and a `timeout_s` communicator."""
    margin = WATCHDOG_MARGIN_S + 0.1 * timeout_s if device.type == "cuda" else 0.0
    return datetime.timedelta(seconds=timeout_s + margin)


_inits = 0  # default groups this process has initialised (each one's arrival keys are its own)


def init_default_group(rank: int, world_size: int, host: str, port: int, device: torch.device, timeout_s: float,
                       rendezvous_timeout_s: Optional[float] = None) -> None:
    """Initialises the default process group, every wait bounded and every missing rank named.

    torch's own set-up waits for the other ranks in places that raise a raw `DistStoreError` (or wait
    for the group's whole timeout) when a rank never joins: the store's host waiting for its clients,
    the backends' connections. Here every rank first connects to the store (rank 0 hosts it unless a
    torchrun agent does), publishes that it arrived and waits for the others' arrival for at most
    `rendezvous_timeout_s` (default `timeout_s`); only then does torch set up the group, with every
    rank present.

    Args:
        rank, world_size: this rank and the number of ranks.
        host, port: where the store is (MASTER_ADDR, MASTER_PORT).
        device: the device this rank computes on; picks the backends (`pg_backend_for`).
        timeout_s: the group's collectives and store time out after this (plus a margin on CUDA).
        rendezvous_timeout_s: how long to wait for every rank to arrive.
    Raises:
        TimeoutError: naming the rank(s) that did not arrive (or the store's host that never answered).
    """
    global _inits
    wait_s = timeout_s if rendezvous_timeout_s is None else rendezvous_timeout_s
    wait = datetime.timedelta(seconds=wait_s)
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(host, port, world_size, is_master=(rank == 0 and not agent_store), timeout=wait,
                              wait_for_workers=False, multi_tenant=True)
    except (RuntimeError, TimeoutError) as exc:
        if not _is_timeout(exc) and "connect" not in str(exc).lower():
            raise
        raise TimeoutError(f"rank {rank} of {world_size} could not reach the group's store at {host}:{port} within "
                           f"{wait_s:g} s: rank 0 (the store's host) did not start, or did not start fuser_moe "
                           f"({exc})") from exc
    _inits += 1
    keys = [f"fuser_moe/arrived/{_inits}/{r}" for r in range(world_size)]
    store.set(keys[rank], "1")
    try:
        store.wait(keys, wait)
    except RuntimeError as exc:
        if not _is_timeout(exc):
            raise
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        raise TimeoutError(f"rank(s) {missing} did not join the group within the timeout of {wait_s:g} s "
                           f"(rank {rank} of {world_size} waited): every rank must call execute (or make its "
                           "communicator) the same number of times; FUSER_MOE_TIMEOUT_S sets the timeout") from exc
    group_timeout = max(pg_timeout_for(device, timeout_s), wait)
    store.set_timeout(group_timeout)
    dist.init_process_group(backend=pg_backend_for(device), store=dist.PrefixStore("default_pg", store), rank=rank,
                            world_size=world_size, timeout=group_timeout)


def pg_backend_for(device: torch.device) -> str:
    """Gloo for CPU tensors, NCCL for CUDA tensors; both where CUDA exists so either tensor works."""
    if device.type == "cuda":
        return "cpu:gloo,cuda:nccl"
    return "gloo"
