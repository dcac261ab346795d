"""Reliability: what docs/contract.md section 9 promises, held under stress, on both backends.

  1. Bad inputs on one rank only (the rows of section 9 that tests/test_errors.py leaves out): every
     rank raises, the bad one naming the problem, and the group works afterwards.
  2. A peer that vanishes (exits or stalls) before or in the middle of a dispatch or a combine: the
     others raise within the configured timeout, every process ends, no segment stays in /dev/shm.
  3. A soak (fuser_moe/soak.py, the short version of tools/soak.py): hundreds of random rounds against
     the reference with injected faults, host memory, fds, threads and segments flat after warm-up.
  4. Property tests: hypothesis draws routings (one expert for every token, every slot empty, a single
     token, ranks without tokens, random rows) that must match the reference bit for bit.
  5. Two expert-parallel groups in one world at once, without crosstalk.
  6. Cleanup: a failed job, and Ctrl-C on `fuser-moe demo`, leave no process and no segment.

Ranks run where the harness puts them (FUSER_MOE_TEST_DEVICE=cuda: rank i on cuda:i, or every rank on
cuda:0 when there are fewer GPUs than ranks; nccl cases of such a world are skipped). Tests that kill
or stall a rank start their own processes (`fuser_moe.launch.run_ranks`), never the shared pool.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from harness import (TEST_DEVICE, RankFailure, RankPool, available_world_sizes, nccl_skip_reason,
                     pool_device, run_on_ranks, running, shares_gpu)
from moe_cases import Case, expect_error, rank_inputs, run_case

from fuser_moe.backends import cuda_kernels
from fuser_moe.backends.transport.shm import segments_of
from fuser_moe.executors import get_backend
from fuser_moe.executors.backend_selection import cuda_backend_missing
from fuser_moe.launch import run_ranks
from fuser_moe.reference import reference_combine, reference_dispatch
from fuser_moe.soak import SoakConfig, leaks, same_bits, soak_rank, verdict, warmup_rounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("nccl", "cuda")
# The bad input sits on a middle rank where there is one (neither the store's host nor the last rank).
BAD_INPUT_WORLD = (available_world_sizes((3, 2)) or [1])[0]
BAD_RANK = 1
needs_two_ranks = pytest.mark.skipif(BAD_INPUT_WORLD < 2, reason="needs 2 ranks (a GPU with FUSER_MOE_TEST_DEVICE=cuda)")


# =============================================================================== 1. bad input matrix
# Each entry: (error type, text in the bad rank's message, text in the others' (None: "rank b rejected
# its input"), known bug of a backend that makes the case fail: {backend: reason}).
DISPATCH_ROWS = {
    "top_k_differs": (ValueError, "disagree", "disagree", {}),
    "hidden_size_differs": (ValueError, "disagree", "disagree", {}),
    "dtype_differs": (ValueError, "disagree", "disagree", {}),
    "num_experts_differs": (ValueError, "disagree", "disagree", {}),
    "placement_differs": (ValueError, "disagree", "disagree", {}),
    "capacity_differs": (ValueError, "disagree on max_recv_tokens", "disagree on max_recv_tokens", {}),
    "exact_mode_on_one_rank": (ValueError, "disagree on max_recv_tokens", "disagree on max_recv_tokens", {}),
    "experts_not_divisible_on_one_rank": (ValueError, "not divisible by the world size", None, {}),
    "placement_names_negative_rank": (ValueError, "=-1 names a rank outside", None, {}),
    "topk_idx_one_dimensional": (ValueError, "topk_idx must be [T, K]", None, {}),
}


def dispatch_row_body(comm, backend, which, bad_rank):
    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, seed=61)
    x, idx, w = rank_inputs(comm, case)
    E, placement = case.num_experts, None
    # capacity cases: every rank in capacity mode with room for every pair, but one rank's C differs
    capacity = 4 * 2 * sum(case.token_counts()) if which in ("capacity_differs", "exact_mode_on_one_rank") else None
    if comm.rank == bad_rank:
        if which == "top_k_differs":
            x, idx, w = rank_inputs(comm, Case(W, 3, num_experts=4 * W, seed=62))
        elif which == "hidden_size_differs":
            x, idx, w = rank_inputs(comm, Case(W, 2, num_experts=4 * W, hidden=24, seed=62))
        elif which == "dtype_differs":
            x = x.float()
        elif which == "num_experts_differs":
            E = 8 * W  # every id of the others' routing is still valid here
        elif which == "placement_differs":
            placement = [(e // 4 + 1) % W for e in range(E)]
        elif which == "experts_not_divisible_on_one_rank":
            E = 4 * W + 1
        elif which == "placement_names_negative_rank":
            placement = [e // 4 for e in range(E)]
            placement[2] = -1
        elif which == "topk_idx_one_dimensional":
            idx = idx[:, 0]
        elif which == "capacity_differs":
            capacity += 16
        elif which == "exact_mode_on_one_rank":
            capacity = None
    exc_type, bad_text, other_text, _ = DISPATCH_ROWS[which]
    msg = expect_error(exc_type, lambda: get_backend(backend).dispatch(comm, x, idx, w, num_experts=E,
                                                                  expert_to_rank=placement,
                                                                  max_recv_tokens=capacity))
    expected = bad_text if comm.rank == bad_rank else (other_text or f"rank {bad_rank} rejected its input")
    assert expected in msg, f"rank {comm.rank}: message {msg!r} lacks {expected!r}"
    run_case(comm, case, backend)  # the group still works
    return msg


def _with_known_bugs(rows: dict):
    """Parameters of `rows`, a case that a known backend bug makes fail marked xfail(strict) for that backend."""
    params = []
    for which, (*_, bugs) in rows.items():
        for backend in BACKENDS:
            marks = [pytest.mark.xfail(strict=True, reason=bugs[backend])] if backend in bugs else []
            params.append(pytest.param(backend, which, marks=marks, id=f"{backend}-{which}"))
    return params


def cuda_backend_skip_reason(device: str):
    """Why the cuda backend cannot run on `device` here, or None (conftest's `backend` fixture skips alike)."""
    missing = cuda_backend_missing(device)
    return None if missing is None else f"cuda backend skipped: {missing}"


def _skip_missing(backend: str, world_size: int = 2) -> None:
    reason = cuda_backend_skip_reason(TEST_DEVICE) if backend == "cuda" else nccl_skip_reason(world_size)
    if reason:
        pytest.skip(reason)


@needs_two_ranks
@pytest.mark.parametrize("backend_name,which", _with_known_bugs(DISPATCH_ROWS))
def test_dispatch_bad_input_on_one_rank(backend_name, which):
    _skip_missing(backend_name, BAD_INPUT_WORLD)
    bad = min(BAD_RANK, BAD_INPUT_WORLD - 1)
    run_on_ranks(BAD_INPUT_WORLD, dispatch_row_body, backend_name, which, bad)


COMBINE_ROWS = {
    "src_rank_below_minus_one": (ValueError, "src_rank[0] = -2 is outside", None),
    "src_rank_far_above_world": (ValueError, "is outside [0,", None),
    "src_idx_negative": (ValueError, "src_idx[0] = -3 is negative", None),
    "src_idx_equal_to_num_tokens": (ValueError, "outside [0, num_tokens=24)", None),
    "n_tokens_from_rank_length": (ValueError, "n_tokens_from_rank must have shape", None),
    "counts_disagree_with_the_source": (ValueError, "says it sent", None),
    "x_not_two_dimensional": (ValueError, "x must be 2-D", None),
    "integer_x": (TypeError, "x must be float32", None),
    "int32_src_idx": (TypeError, "src_idx must be int64", None),
    "float16_weights": (TypeError, "topk_weights must be float32", None),
    "tensors_on_different_devices": (ValueError, "different devices", None),
    "hidden_size_differs": (ValueError, "disagree on hidden size", "disagree on hidden size"),
    "negative_num_tokens": (ValueError, "num_tokens must be a non-negative int", None),
}


def combine_row_body(comm, backend, which, bad_rank):
    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, seed=63)
    x, idx, w = rank_inputs(comm, case)
    impl = get_backend(backend)
    d = impl.dispatch(comm, x, idx, w, num_experts=case.num_experts)
    y, wts, sidx, srank, n_to, n_from = (d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                         d.n_tokens_to_rank, d.n_tokens_from_rank)
    num_tokens = x.shape[0]
    if comm.rank == bad_rank:
        assert y.shape[0] > 0, "the bad rank needs received rows to corrupt"
        sidx, srank = sidx.clone(), srank.clone()
        if which == "src_rank_below_minus_one":
            srank[0] = -2
        elif which == "src_rank_far_above_world":
            srank[0] = W + 7
        elif which == "src_idx_negative":
            sidx[0] = -3
        elif which == "src_idx_equal_to_num_tokens":
            sidx[0] = 24  # every rank has 24 tokens: one past the last
        elif which == "n_tokens_from_rank_length":
            n_from = n_from[:-1]
        elif which == "counts_disagree_with_the_source":
            n_from = n_from.clone()
            n_from[0] += 1
        elif which == "x_not_two_dimensional":
            y = y.unsqueeze(0)
        elif which == "integer_x":
            y = y.to(torch.int32)
        elif which == "int32_src_idx":
            sidx = sidx.int()
        elif which == "float16_weights":
            wts = wts.half()
        elif which == "tensors_on_different_devices":
            sidx = torch.empty(sidx.shape, dtype=sidx.dtype, device="meta")
        elif which == "hidden_size_differs":
            y = torch.cat([y, y[:, :1]], dim=1)
        elif which == "negative_num_tokens":
            num_tokens = -1
    exc_type, bad_text, other_text = COMBINE_ROWS[which]
    msg = expect_error(exc_type, lambda: impl.combine(comm, y, wts, sidx, srank, n_to, n_from, num_tokens))
    expected = bad_text if comm.rank == bad_rank else (other_text or f"rank {bad_rank} rejected its input")
    assert expected in msg, f"rank {comm.rank}: message {msg!r} lacks {expected!r}"
    run_case(comm, case, backend)
    return msg


@needs_two_ranks
@pytest.mark.parametrize("which", sorted(COMBINE_ROWS))
def test_combine_bad_input_on_one_rank(backend, which):
    run_on_ranks(BAD_INPUT_WORLD, combine_row_body, backend, which, min(BAD_RANK, BAD_INPUT_WORLD - 1))


def _swap_first_and_last(W: int, E: int) -> list:
    """Contiguous blocks, with the blocks of rank 0 and rank W-1 swapped."""
    per = E // W
    return [{0: W - 1, W - 1: 0}.get(e // per, e // per) for e in range(E)]


def overflow_on_last_rank_body(comm, backend, check_inputs):
    """Every token of every rank picks experts that live on the last rank only: that rank, and no other,
    needs more rows than the capacity."""
    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, routing="one_rank", seed=65)  # experts 0..3, moved to rank W-1
    x, idx, w = rank_inputs(comm, case)
    placement = _swap_first_and_last(W, case.num_experts)
    need = 2 * 24 * W
    impl = get_backend(backend)
    msg = None
    try:
        impl.dispatch(comm, x, idx, w, num_experts=case.num_experts, expert_to_rank=placement,
                      max_recv_tokens=need - 1, check_inputs=check_inputs)
        if not check_inputs and hasattr(impl, "check"):
            impl.check(comm)  # the device-side flag, read at the next host synchronisation
    except RuntimeError as exc:
        msg = str(exc)
    run_case(comm, case, backend)
    return msg


@needs_two_ranks
def test_capacity_overflow_on_another_rank_than_the_first(backend):
    W = BAD_INPUT_WORLD
    need = 2 * 24 * W
    msgs = run_on_ranks(W, overflow_on_last_rank_body, backend, True)
    assert f"needed capacity {need}" in msgs[-1] and f"given {need - 1}" in msgs[-1], msgs[-1]
    assert all(m is not None and f"rank {W - 1} rejected its input" in m for m in msgs[:-1]), msgs


@needs_two_ranks
def test_unchecked_capacity_overflow_is_reported_not_truncated(backend):
    """check_inputs=False: no agreement, but the overflowing rank still gets a RuntimeError naming the
    needed and the given capacity (at once, or from the device flag at the next check)."""
    W = BAD_INPUT_WORLD
    need = 2 * 24 * W
    msgs = run_on_ranks(W, overflow_on_last_rank_body, backend, False)
    assert msgs[-1] is not None and f"{need}" in msgs[-1] and f"{need - 1}" in msgs[-1], msgs[-1]
    assert msgs[:-1] == [None] * (W - 1), msgs


@needs_two_ranks
def test_capacity_exactly_enough_is_not_an_overflow(backend):
    W = BAD_INPUT_WORLD
    case = Case(W, 2, num_experts=4 * W, routing="one_rank", max_recv_tokens=2 * 24 * W, seed=67)
    results = run_on_ranks(W, run_case, case, backend)
    assert results[0]["rows"] == 2 * 24 * W


# =============================================================================== 2. a vanished peer
PEER_TIMEOUT_S = 3.0  # the group's timeout in these tests (the Communicator's timeout_s)
STALL_S = PEER_TIMEOUT_S + 2.0  # a stalled rank wakes up after its peers gave up on it
TIMEOUT_SLACK_S = 4.0  # scheduling on a loaded CI machine
PLANTED_EXIT = 17


@dataclass(frozen=True)
class Vanishing:
    """A rank that exits (`os._exit`) or stalls (`time.sleep`) at one point of dispatch + combine.

    at: before_dispatch | mid_dispatch (after the first phase) | between (after dispatch, before combine) |
        mid_combine (after its first phase) | mid_allocation (CUDA backend: inside the first symmetric
        buffer's rendezvous, its shared-memory segment created and not yet unlinked).
    victim: the rank that vanishes (-1: the last). user_group: the group is created with a long timeout
        and the Communicator given a short one (docs/contract.md section 9: fuser_moe's own waits keep the Communicator's).
    """

    how: str
    at: str
    victim: int = -1
    world_size: int = 2
    backends: tuple = BACKENDS
    user_group: bool = False

    def backend_error_allowed(self, backend: str) -> bool:
        """A peer that exits closes its sockets: Gloo (inside a collective) and the store's clients (when
        the store's host, rank 0, exits) raise their own error at once instead of timing out."""
        return self.how == "exit" and (self.victim == 0 or (backend == "nccl" and self.at.startswith("mid")))


VANISHINGS = {
    "exits_before_dispatch": Vanishing("exit", "before_dispatch"),
    "exits_mid_dispatch": Vanishing("exit", "mid_dispatch", world_size=3),
    "exits_between_dispatch_and_combine": Vanishing("exit", "between"),
    "exits_mid_combine": Vanishing("exit", "mid_combine"),
    "exits_mid_allocation": Vanishing("exit", "mid_allocation", backends=("cuda",)),
    "store_host_exits_mid_dispatch": Vanishing("exit", "mid_dispatch", victim=0),
    "stalls_mid_dispatch": Vanishing("stall", "mid_dispatch"),
    "stalls_between_dispatch_and_combine": Vanishing("stall", "between"),
    "stalls_mid_combine": Vanishing("stall", "mid_combine"),
    "stalls_mid_allocation": Vanishing("stall", "mid_allocation", backends=("cuda",)),
    "stalls_before_dispatch_in_a_user_group": Vanishing("stall", "before_dispatch", user_group=True),
}
# The call of the backend's transport at which a rank vanishes "in the middle" (1-based): the CUDA
# backend's barriers (dispatch: counts, data; combine: counts, partials), the NCCL backend's
# all-to-alls (dispatch: counts, metadata, rows; combine: partial rows, token indices).
_MIDDLE_CALL = {("cuda", "mid_dispatch"): 2, ("cuda", "mid_combine"): 4,
                ("nccl", "mid_dispatch"): 2, ("nccl", "mid_combine"): 5}
# On GPUs a streaming combine (backends/cuda_kernels.py, opt-in) has one barrier: the third call.
if TEST_DEVICE != "cpu" and cuda_kernels.streaming_combine():
    _MIDDLE_CALL["cuda", "mid_combine"] = 3


def vanishing_body(comm, backend, scenario, marker_path):
    """One rank vanishes at the scenario's point; every other rank reports what it raised and when."""
    import torch.distributed as dist

    from fuser_moe.backends.communicator import Communicator
    from fuser_moe.backends.transport import transport_for

    spec = VANISHINGS[scenario]
    if spec.user_group:
        comm = Communicator(group=dist.group.WORLD, device=comm.device, timeout_s=PEER_TIMEOUT_S)
    victim = spec.victim % comm.world_size
    impl = get_backend(backend)
    case = Case(comm.world_size, 2, num_experts=4 * comm.world_size, seed=71)
    x, idx, w = rank_inputs(comm, case)

    def vanish(transport=None):
        if spec.how == "exit":
            if transport is not None and hasattr(transport, "_segments"):
                with open(marker_path, "w") as f:  # what this rank leaves in /dev/shm by dying now
                    json.dump(sorted(transport._segments.pending), f)
            os._exit(PLANTED_EXIT)
        time.sleep(STALL_S)

    if comm.rank == victim and spec.at in ("mid_dispatch", "mid_combine", "mid_allocation"):
        if spec.at == "mid_allocation":
            owner, name, when = transport_for(comm), "_rendezvous", 1
        elif backend == "cuda":
            owner, name, when = transport_for(comm), "barrier", _MIDDLE_CALL[backend, spec.at]
        else:
            owner, name, when = comm, "all_to_all_single", _MIDDLE_CALL[backend, spec.at]
        original, calls = getattr(owner, name), [0]

        def vanishing_call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == when:
                vanish(owner if spec.at == "mid_allocation" else None)
            return original(*args, **kwargs)
        setattr(owner, name, vanishing_call)

    start = time.monotonic()
    try:
        if comm.rank == victim and spec.at == "before_dispatch":
            vanish()
        d = impl.dispatch(comm, x, idx, w, num_experts=case.num_experts)
        if comm.rank == victim and spec.at == "between":
            vanish()
        impl.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank, d.n_tokens_to_rank,
                     d.n_tokens_from_rank, x.shape[0])
    except Exception as exc:  # noqa: BLE001 - what was raised, and when, is the result
        return {"pid": os.getpid(), "raised": [c.__name__ for c in type(exc).__mro__], "message": str(exc)[:500],
                "waited_s": time.monotonic() - start}
    finally:
        if spec.user_group:
            comm.close()
    return {"pid": os.getpid(), "raised": None, "waited_s": time.monotonic() - start}


@pytest.fixture(scope="module")
def vanished(request, tmp_path_factory):
    """Runs every selected (backend, scenario) at once, each in its own world (a vanishing rank spends most
    of its time waiting), and returns {(backend, scenario): (outcomes, marker path)}."""
    wanted = sorted({(item.callspec.params["backend"], item.callspec.params["scenario"])
                     for item in request.session.items
                     if getattr(item, "originalname", "") == "test_vanished_peer" and hasattr(item, "callspec")})
    wanted = [(b, s) for b, s in wanted if b in VANISHINGS[s].backends and not
              (b == "cuda" and cuda_backend_skip_reason(TEST_DEVICE))
              and not (b == "nccl" and nccl_skip_reason(VANISHINGS[s].world_size))
              and VANISHINGS[s].world_size in available_world_sizes((1, 2, 3, 4))]
    folder = tmp_path_factory.mktemp("vanished")

    def launch(key):
        backend, scenario = key
        spec = VANISHINGS[scenario]
        marker = str(folder / f"{backend}-{scenario}.json")
        outcomes = run_ranks(vanishing_body, spec.world_size, (backend, scenario, marker),
                             device=pool_device(spec.world_size),
                             timeout_s=60, collective_timeout_s=60.0 if spec.user_group else PEER_TIMEOUT_S,
                             grace_s=30, exit_grace_s=30)  # slow with this many processes on few cores
        return key, (outcomes, marker)

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(launch, wanted))


@pytest.mark.parametrize("scenario", sorted(VANISHINGS))
def test_vanished_peer(backend, scenario, vanished):
    spec = VANISHINGS[scenario]
    if backend not in spec.backends:
        pytest.skip(f"{scenario} concerns the {' and '.join(spec.backends)} backend only")
    if (backend, scenario) not in vanished:
        pytest.skip(nccl_skip_reason(spec.world_size) if backend == "nccl" and nccl_skip_reason(spec.world_size)
                    else f"needs {spec.world_size} ranks")
    outcomes, marker = vanished[backend, scenario]
    victim = spec.victim % spec.world_size
    for o in outcomes:
        if o.rank == victim and spec.how == "exit":
            assert o.exitcode == PLANTED_EXIT, f"the victim should have exited with {PLANTED_EXIT}: {o}"
            continue
        if o.rank == victim:
            # A stalled victim wakes up to peers that gave up: any error is fine, a hang is not. It may also
            # finish: an NCCL all-to-all whose peers had already delivered their rows before they timed out
            # and aborted completes on the late rank (seen on 4 H200s), with the rows it was sent.
            assert o.ok and o.exitcode == 0, f"the stalled rank hung or died: {o}"
            continue
        # Every other rank raised in time and then exited cleanly.
        assert o.ok and o.exitcode == 0, f"rank {o.rank} did not end cleanly: {o}"
        result = o.value
        assert result["raised"], f"rank {o.rank} returned although a peer vanished: {result}"
        allowed = {"TimeoutError"} | ({"RuntimeError"} if spec.backend_error_allowed(backend) else set())
        assert allowed & set(result["raised"]), f"rank {o.rank} raised {result['raised'][0]}: {result['message']}"
        assert result["waited_s"] <= PEER_TIMEOUT_S + TIMEOUT_SLACK_S, \
            f"rank {o.rank} waited {result['waited_s']:.1f} s for a timeout of {PEER_TIMEOUT_S} s"
    left = [name for o in outcomes for name in segments_of(o.pid)]
    assert not left, f"segments left in /dev/shm: {left}"
    if spec.at == "mid_allocation" and spec.how == "exit" and TEST_DEVICE == "cpu":
        with open(marker) as f:
            dropped = json.load(f)
        assert dropped, "the victim should have died holding a segment"
        assert not [n for n in dropped if os.path.exists(os.path.join("/dev/shm", n))], dropped


# =============================================================================== 3. soak
SOAK_WORLDS = {2: 120, 3: 40}  # world size -> rounds per backend (after the warm-up)


@pytest.mark.parametrize("world_size", [w for w in available_world_sizes((2, 3)) if w in SOAK_WORLDS])
def test_soak_short(world_size):
    backends = tuple(b for b in BACKENDS if not (b == "cuda" and cuda_backend_skip_reason(TEST_DEVICE))
                     and not (b == "nccl" and nccl_skip_reason(world_size)))
    if not backends:
        pytest.skip(nccl_skip_reason(world_size) or "no backend can run here")
    cfg = SoakConfig(rounds=SOAK_WORLDS[world_size], backends=backends, seed=world_size, fault_every=10)
    per_rank = run_on_ranks(world_size, soak_rank, cfg, timeout_s=300)
    assert not verdict(per_rank), "\n".join(verdict(per_rank))
    for reports in per_rank:
        assert [r["backend"] for r in reports] == list(backends)
        for r in reports:
            assert r["rounds"] == cfg.rounds and r["faults_injected"] == cfg.rounds // cfg.fault_every
            assert r["warmup_rounds"] == len(warmup_rounds(cfg, world_size, r["backend"]))


class _Corrupting:
    """A backend whose combine flips the sign of one output row: the soak must call that a mismatch."""

    def __init__(self, inner):
        self.inner = inner

    def dispatch(self, *args, **kwargs):
        return self.inner.dispatch(*args, **kwargs)

    def combine(self, *args, **kwargs):
        out = self.inner.combine(*args, **kwargs)
        if out.numel():
            out[0] = -out[0] if bool(out[0].any()) else out[0] + 1
        return out


class _LeakingFds:
    """A backend that opens a file on every dispatch and never closes it."""

    def __init__(self, inner):
        self.inner, self.kept = inner, []

    def dispatch(self, *args, **kwargs):
        self.kept.append(open(os.devnull))
        return self.inner.dispatch(*args, **kwargs)

    def combine(self, *args, **kwargs):
        return self.inner.combine(*args, **kwargs)


def soak_self_check_body(comm, inner: str = "nccl"):
    cfg = SoakConfig(rounds=12, backends=("corrupting", "leaking"), fault_every=0, max_tokens=6)
    backend = get_backend(inner)
    return soak_rank(comm, cfg, backends={"corrupting": _Corrupting(backend), "leaking": _LeakingFds(backend)})


def test_soak_catches_wrong_results_and_leaks():
    inner = "cuda" if shares_gpu(2) else "nccl"  # NCCL refuses two ranks on one GPU
    _skip_missing(inner)
    per_rank = run_on_ranks(2, soak_self_check_body, inner)
    corrupting, leaking = per_rank[0]
    assert corrupting["mismatches"] > 0 and "combined_x differs" in corrupting["problems"][0], corrupting
    assert any("fds grew" in line for line in leaking["leaks"]), leaking
    before = {"rss_mb": 100.0, "fds": 10, "threads": 4, "shm_named": 0, "shm_mapped": 8, "shm_mapped_mb": 1.0}
    assert leaks(before, dict(before, rss_mb=110.0), SoakConfig(rss_slack_mb=16)) == []
    grown = leaks(before, dict(before, rss_mb=130.0, shm_mapped=9), SoakConfig(rss_slack_mb=16))
    assert len(grown) == 2 and "shm_mapped grew" in grown[0] and "rss grew" in grown[1], grown


@pytest.mark.skipif(2 not in available_world_sizes((2,)) or shares_gpu(2),
                    reason="needs 2 ranks (2 GPUs with FUSER_MOE_TEST_DEVICE=cuda: the tool puts one rank on each)")
def test_soak_tool_prints_what_it_ran_and_exits_zero():
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "soak.py"), "--rounds", "20",
                          "--world-size", "2", "--backends", "nccl,cuda", "--fault-every", "5",
                          "--device", TEST_DEVICE],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "rss MB before->after" in out.stdout and "PASS" in out.stdout, out.stdout
    assert "rounds on each of 2 ranks (8 with a fault injected)" in out.stdout, out.stdout


# =============================================================================== 4. property tests
SHAPES = ("random", "one_expert_for_every_token", "every_slot_empty", "single_token", "ranks_without_tokens")
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@st.composite
def routing_case(draw, world_size: int, shape: str) -> dict:
    """One routing for every rank of a world, drawn as plain lists (sent to the ranks as is)."""
    top_k = draw(st.integers(1, 4))
    placement = None
    if draw(st.booleans()):
        num_experts = draw(st.integers(top_k, top_k + 3 * world_size))
        placement = draw(st.lists(st.integers(0, world_size - 1), min_size=num_experts, max_size=num_experts))
    else:
        num_experts = world_size * draw(st.integers(max(1, -(-top_k // world_size)), 3))
    if shape == "single_token":
        tokens = [0] * world_size
        tokens[draw(st.integers(0, world_size - 1))] = 1
    else:
        tokens = draw(st.lists(st.integers(0, 6), min_size=world_size, max_size=world_size))
        if shape == "ranks_without_tokens":
            tokens[draw(st.integers(0, world_size - 1))] = 0
    hot = draw(st.integers(0, num_experts - 1))
    rows = []
    for count in tokens:
        rank_rows = []
        for _ in range(count):
            if shape == "every_slot_empty":
                row = [-1] * top_k
            elif shape == "one_expert_for_every_token":
                row = [-1] * top_k
                row[draw(st.integers(0, top_k - 1))] = hot
            else:  # duplicate-free, with empty slots anywhere
                picked = draw(st.lists(st.integers(0, num_experts - 1), unique=True, max_size=top_k))
                row = list(draw(st.permutations(picked + [-1] * (top_k - len(picked)))))
            rank_rows.append(row)
        rows.append(rank_rows)
    capacity_slack = draw(st.one_of(st.none(), st.integers(0, 2)))
    return {"shape": shape, "tokens": tokens, "rows": rows, "top_k": top_k, "num_experts": num_experts,
            "placement": placement, "hidden": draw(st.sampled_from((1, 3, 16))),
            "dtype": draw(st.sampled_from(DTYPE_NAMES)), "idx_dtype": draw(st.sampled_from(("int64", "int32"))),
            "capacity_slack": capacity_slack, "seed": draw(st.integers(0, 2 ** 16))}


def routing_batches(world_size: int):
    """Every special shape once, and three random routings: one job for the ranks per example."""
    return st.tuples(*(routing_case(world_size, s) for s in SHAPES),
                     *(routing_case(world_size, "random") for _ in range(3)))


def _case_inputs(case: dict, world_size: int):
    xs, idxs, ws = [], [], []
    for r in range(world_size):
        gen = torch.Generator().manual_seed(case["seed"] * 31 + r)
        T, K = case["tokens"][r], case["top_k"]
        xs.append(torch.randn(T, case["hidden"], generator=gen).to(getattr(torch, case["dtype"])))
        idxs.append(torch.tensor(case["rows"][r], dtype=torch.int64).view(T, K).to(getattr(torch, case["idx_dtype"])))
        ws.append(torch.rand(T, K, generator=gen))
    return xs, idxs, ws


def property_batch_body(comm, backend, cases):
    """Runs every case of the batch; returns what differed from the reference (nothing, when all is well)."""
    impl = get_backend(backend)
    W, r, dev = comm.world_size, comm.rank, comm.device
    problems = []
    for n, case in enumerate(cases):
        xs, idxs, ws = _case_inputs(case, W)
        placement = case["placement"] or [e // (case["num_experts"] // W) for e in range(case["num_experts"])]
        capacity = None
        if case["capacity_slack"] is not None:
            pairs = [sum(1 for i in idxs for e in i.flatten().tolist() if e >= 0 and placement[e] == d)
                     for d in range(W)]
            capacity = max(pairs) + case["capacity_slack"]
        ref = reference_dispatch(xs, idxs, ws, case["num_experts"], case["placement"], capacity)
        ref_out = reference_combine([o.recv_x for o in ref], [o.recv_topk_weights for o in ref],
                                    [o.recv_src_idx for o in ref], [o.recv_src_rank for o in ref], case["tokens"])
        d = impl.dispatch(comm, xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev), num_experts=case["num_experts"],
                          expert_to_rank=case["placement"], max_recv_tokens=capacity)
        out = impl.combine(comm, d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                           d.n_tokens_to_rank, d.n_tokens_from_rank, case["tokens"][r])
        got = list(zip(ref[r]._fields, d, ref[r])) + [("combined_x", out, ref_out[r])]
        for name, value, want in got:
            if not same_bits(value, want):
                problems.append(f"rank {r}, case {n} ({case['shape']}): {name} differs from the reference; case={case}")
    return problems


PROPERTY_SETTINGS = settings(max_examples=10, deadline=None, database=None, print_blob=True,
                             phases=(Phase.explicit, Phase.generate),  # a failing batch is printed whole
                             suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                    HealthCheck.large_base_example])


@pytest.mark.parametrize("world_size", [w for w in available_world_sizes((2, 3)) if w > 1])
def test_drawn_routings_match_the_reference(backend, world_size):
    @PROPERTY_SETTINGS
    @given(batch=routing_batches(world_size))
    def check(batch):
        problems = run_on_ranks(world_size, property_batch_body, backend, list(batch), timeout_s=90)
        flat = [p for rank in problems for p in rank]
        assert not flat, "\n".join(flat[:5])

    check()


# =============================================================================== 5. two groups at once
GROUPS = ([0, 1], [2, 3])
# Each group its own shapes, so that a row or a count crossing from one group to the other shows.
GROUP_CASES = (dict(top_k=2, num_experts=8, hidden=16, dtype="bfloat16", tokens=[24, 9]),
               dict(top_k=3, num_experts=6, hidden=24, dtype="float32", tokens=[5, 17],
                    expert_to_rank=[1, 0, 1, 0, 0, 1]))


def two_groups_body(comm, backends, rounds):
    """Ranks {0, 1} and {2, 3} each form a group and run dispatch + combine at the same time."""
    import torch.distributed as dist

    from fuser_moe.backends.communicator import Communicator
    from fuser_moe.backends.transport import transport_for

    groups = [dist.new_group(members) for members in GROUPS]  # every rank creates both, in one order
    g = comm.rank // 2
    sub = Communicator(group=groups[g], device=comm.device, timeout_s=30)
    try:
        facts = {"group": g, "rank": sub.rank, "world_size": sub.world_size, "global_ranks": sub.global_ranks,
                 "store_prefix": sub._store_prefix, "exchange": sub.exchange(comm.rank)}
        for _ in range(3 * g):  # group 1 runs ahead in exchange rounds: counts are per group
            sub.exchange(None)
        for i in range(rounds):
            case = Case(2, seed=1000 * g + i, routing=("random", "empty_slots", "one_rank")[i % 3],
                        **GROUP_CASES[g])
            run_case(sub, case, backends[g])
        if backends[g] == "cuda":
            facts["transport_keys"] = sub._store_prefix + "/" + transport_for(sub)._namespace
    finally:
        sub.close()
        dist.destroy_process_group(groups[g])
    return facts


@pytest.mark.skipif(4 not in available_world_sizes((4,)), reason="needs 4 ranks (a GPU with FUSER_MOE_TEST_DEVICE=cuda)")
@pytest.mark.parametrize("backends", [("nccl", "nccl"), ("cuda", "cuda"), ("nccl", "cuda")], ids="-".join)
def test_two_groups_in_one_world_do_not_cross(backends):
    for b in backends:
        _skip_missing(b, 4)
    facts = run_on_ranks(4, two_groups_body, backends, 8)
    for rank, f in enumerate(facts):
        g = rank // 2
        assert (f["group"], f["rank"], f["world_size"], f["global_ranks"]) == (g, rank % 2, 2, GROUPS[g]), f
        assert f["exchange"] == GROUPS[g], f"rank {rank}'s exchange saw {f['exchange']}"
    assert facts[0]["store_prefix"] == facts[1]["store_prefix"] != facts[2]["store_prefix"] == facts[3]["store_prefix"]
    if backends == ("cuda", "cuda"):
        assert facts[0]["transport_keys"] == facts[1]["transport_keys"] != facts[2]["transport_keys"]


def same_ranks_two_threads_body(comm, backends, rounds):
    """Two groups over the same ranks, each driven by its own thread at the same time."""
    import torch.distributed as dist

    from fuser_moe.backends.communicator import Communicator

    groups = [dist.new_group(list(range(comm.world_size))) for _ in backends]
    subs = [Communicator(group=g, device=comm.device, timeout_s=30) for g in groups]
    errors = []

    def drive(i):
        try:
            for k in range(rounds):
                assert subs[i].exchange((i, k)) == [(i, k)] * comm.world_size, "exchange crossed groups"
                case = Case(comm.world_size, seed=500 * i + k, **GROUP_CASES[i % 2])
                run_case(subs[i], case, backends[i])
        except BaseException as exc:  # noqa: BLE001
            errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

    def drive_on_own_stream(i):
        # On GPUs each group needs a stream of its own: the CUDA backend's barrier is stream-ordered, and two
        # groups whose kernels queue on one stream in a different order on each rank wait for each other.
        if comm.device.type != "cuda":
            return drive(i)
        torch.cuda.set_device(comm.device)
        with torch.cuda.stream(torch.cuda.Stream(comm.device)):
            drive(i)

    threads = [threading.Thread(target=drive_on_own_stream, args=(i,)) for i in range(len(backends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sub, group in zip(subs, groups):
        sub.close()
        dist.destroy_process_group(group)
    return errors


@pytest.mark.skipif(2 not in available_world_sizes((2,)), reason="needs 2 ranks")
@pytest.mark.parametrize("backends", [("nccl", "nccl"), ("cuda", "cuda"), ("nccl", "cuda")], ids="-".join)
def test_two_groups_over_the_same_ranks_from_two_threads(backends):
    for b in backends:
        _skip_missing(b)
    errors = run_on_ranks(2, same_ranks_two_threads_body, backends, 6, timeout_s=90)
    assert errors == [[], []], errors


def _fuser_moe_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("/dev/shm/fuser_moe_" in line for line in f)


def dropped_communicator_body(comm):
    """A communicator of a fresh group runs the CUDA backend, then is dropped without close()."""
    import gc

    import torch.distributed as dist

    from fuser_moe.backends.communicator import Communicator

    group = dist.new_group(list(range(comm.world_size)))
    before = _fuser_moe_mappings()
    dropped = Communicator(group=group, device=comm.device, timeout_s=30)
    run_case(dropped, Case(comm.world_size, 2, num_experts=4 * comm.world_size, seed=73), "cuda")
    during = _fuser_moe_mappings()
    del dropped
    gc.collect()
    return before, during, _fuser_moe_mappings()


@pytest.mark.skipif(TEST_DEVICE != "cpu" or 2 not in available_world_sizes((2,)),
                    reason="counts the shared-memory mappings of CPU ranks")
def test_a_dropped_communicator_releases_the_cuda_backends_buffers():
    for before, during, after in run_on_ranks(2, dropped_communicator_body):
        assert during > before, "the CUDA backend should have mapped its buffers"
        assert after == before, f"{after - before} shared-memory mappings outlived their communicator"


# =============================================================================== 6. cleanup
def stuck_allocation_body(comm, marker_path):
    """Rank 0 enters a symmetric-buffer allocation (its segment created, waiting for rank 1); rank 1
    never comes. The job times out and the pool kills both."""
    from fuser_moe.backends.transport import transport_for

    if comm.rank == 1:
        time.sleep(60)
        return None
    transport = transport_for(comm)
    rendezvous = transport._rendezvous

    def recording_rendezvous(*args, **kwargs):
        if hasattr(transport, "_segments"):
            with open(marker_path, "w") as f:
                json.dump(sorted(transport._segments.pending), f)
        return rendezvous(*args, **kwargs)
    transport._rendezvous = recording_rendezvous
    transport.buffer("probe", torch.float32, (4,), 8)
    return None


def test_a_failed_job_leaves_no_process_and_no_segment(tmp_path):
    pool = RankPool(2)
    pids = [p.pid for p in pool.procs]
    marker = str(tmp_path / "segments.json")
    try:
        with pytest.raises(RankFailure, match="timed out"):
            pool.run(stuck_allocation_body, marker, timeout_s=4)
    finally:
        pool.kill()
    assert not [pid for pid in pids if running(pid)]
    assert not [name for pid in pids for name in segments_of(pid)]
    if TEST_DEVICE == "cpu":
        with open(marker) as f:
            held = json.load(f)
        assert held, "rank 0 should have been killed holding a segment"
        assert not [n for n in held if os.path.exists(os.path.join("/dev/shm", n))]


def _processes_with(token: str) -> list:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if token.encode() in f.read().split(b"\0") and running(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _shm_mappings(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return sum("/dev/shm/fuser_moe_" in line for line in f)
    except OSError:
        return 0


@pytest.mark.parametrize("target", ["parent", "process_group"])
def test_ctrl_c_on_the_demo_stops_every_rank_and_leaves_nothing(target):
    """SIGINT to the demo while its ranks run the layer (to the parent alone, or to the whole process
    group as a terminal's Ctrl-C does): the parent exits promptly with 130, no rank survives it, no
    segment stays in /dev/shm."""
    token = f"FUSER_MOE_DEMO_RUN={os.getpid()}.{target}.{time.monotonic_ns()}"
    env = dict(os.environ, FUSER_MOE_DEMO_RUN=token.split("=", 1)[1])
    demo = subprocess.Popen([sys.executable, "-m", "fuser_moe", "demo", "--world-size", "2", "--backend", "cuda",
                             "--tokens", "8192", "--hidden", "256", "--ffn", "512", "--experts", "4", "--no-trace"],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        ranks = []
        while time.monotonic() < deadline and demo.poll() is None:
            ranks = [pid for pid in _processes_with(token) if pid != demo.pid and _shm_mappings(pid)]
            if len(ranks) == 2:
                break  # both ranks are inside the CUDA backend (they map its shared memory)
            time.sleep(0.05)
        assert len(ranks) == 2, f"the demo's ranks never got to the layer: {demo.poll()}"
        interrupted = time.monotonic()
        if target == "parent":
            os.kill(demo.pid, signal.SIGINT)
        else:
            os.killpg(demo.pid, signal.SIGINT)
        _, stderr = demo.communicate(timeout=30)
        took = time.monotonic() - interrupted
        print(f"the demo stopped {took:.2f} s after SIGINT")
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    assert demo.returncode == 130 and "interrupted" in stderr, (demo.returncode, stderr[-2000:])
    assert took < 5, f"the demo took {took:.1f} s to stop"
    assert not [pid for pid in ranks if running(pid)], "a rank outlived the demo"
    for _ in range(50):  # multiprocessing's resource tracker leaves once its parent is gone
        if not _processes_with(token):
            break
        time.sleep(0.1)
    assert not _processes_with(token), "a process of the demo outlived it"
    assert not [name for pid in ranks + [demo.pid] for name in segments_of(pid)]
