"""Checked mode (docs/contract.md section 9): a bad input on one rank makes every rank raise, nothing hangs.

The rank with the bad input raises an error that names the problem; every other rank raises the same
type saying which rank rejected its input. Afterwards the group still works: each case ends with a
good dispatch + combine compared with the reference.
"""
import pytest
import torch

from harness import available_world_sizes, run_on_ranks
from moe_cases import Case, build_fusion, expect_error, rank_inputs, run_case

from fuser_moe.executors import get_backend

MULTI = [w for w in available_world_sizes((2, 3)) if w > 1] or [1]


def _mutate_dispatch(which, x, idx, w, E, W):
    placement = None
    if which == "idx_too_large":
        idx = idx.clone(); idx[3, 1] = E
    elif which == "idx_below_minus_one":
        idx = idx.clone(); idx[5, 0] = -2
    elif which == "duplicate_expert":
        idx = idx.clone(); idx[4, 1] = idx[4, 0]
    elif which == "x_not_2d":
        x = x.unsqueeze(0)
    elif which == "weights_shape":
        w = torch.cat([w, w[:, :1]], dim=1)
    elif which == "idx_rows":
        idx = idx[:-1]
    elif which == "integer_x":
        x = x.to(torch.int32)
    elif which == "float_idx":
        idx = idx.float()
    elif which == "int_weights":
        w = w.to(torch.int64)
    elif which == "devices_differ":
        x = torch.empty(x.shape, dtype=x.dtype, device="meta")
    elif which == "placement_rank":
        placement = [e % W for e in range(E)]; placement[2] = W
    elif which == "placement_length":
        placement = [e % W for e in range(E - 1)]
    return x, idx, w, placement


DISPATCH_ERRORS = {
    # which: (error type, text the bad rank's message contains)
    "idx_too_large": (ValueError, "topk_idx[3, 1]"),
    "idx_below_minus_one": (ValueError, "= -2 is outside"),
    "duplicate_expert": (ValueError, "token 4 picks expert"),
    "x_not_2d": (ValueError, "x must be 2-D"),
    "weights_shape": (ValueError, "does not match"),
    "idx_rows": (ValueError, "topk_idx must be [T, K]"),
    "integer_x": (TypeError, "x must be float32"),
    "float_idx": (TypeError, "topk_idx must be int64 or int32"),
    "int_weights": (TypeError, "topk_weights must be float32"),
    "devices_differ": (ValueError, "different devices"),
    "placement_rank": (ValueError, "outside [0,"),
    "placement_length": (ValueError, "entries but num_experts"),
}


def dispatch_error_body(comm, backend, which, bad_rank):
    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, seed=3)
    x, idx, w = rank_inputs(comm, case)
    placement = None
    if comm.rank == bad_rank:
        x, idx, w, placement = _mutate_dispatch(which, x, idx, w, case.num_experts, W)
    exc_type, text = DISPATCH_ERRORS[which]
    msg = expect_error(exc_type, lambda: get_backend(backend).dispatch(
        comm, x, idx, w, num_experts=case.num_experts, expert_to_rank=placement))
    expected = text if comm.rank == bad_rank else f"rank {bad_rank} rejected its input"
    assert expected in msg, f"rank {comm.rank}: message {msg!r} lacks {expected!r}"
    run_case(comm, case, backend)  # the group still works
    return msg


@pytest.mark.parametrize("which", sorted(DISPATCH_ERRORS))
@pytest.mark.parametrize("world_size", MULTI)
def test_dispatch_bad_input_on_one_rank(backend, world_size, which):
    msgs = run_on_ranks(world_size, dispatch_error_body, backend, which, world_size - 1)
    assert msgs[-1] != msgs[0] or world_size == 1


def indivisible_experts_body(comm, backend):
    W = comm.world_size
    x, idx, w = rank_inputs(comm, Case(W, 1, num_experts=W * 2))
    msg = expect_error(ValueError, lambda: get_backend(backend).dispatch(comm, x, idx, w, num_experts=2 * W + 1))
    assert "not divisible by the world size" in msg or "rejected its input" in msg, msg
    return msg


@pytest.mark.parametrize("world_size", [w for w in MULTI if w > 1])
def test_experts_not_divisible_without_placement(backend, world_size):
    run_on_ranks(world_size, indivisible_experts_body, backend)


COMBINE_ERRORS = {
    "length_mismatch": (ValueError, "one row each per received pair"),
    "counts_length": (ValueError, "must have shape ["),
    "src_rank_range": (ValueError, "src_rank["),
    "src_idx_range": (ValueError, "outside [0, num_tokens="),
}


def combine_error_body(comm, backend, which, bad_rank):
    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, seed=5)
    x, idx, w = rank_inputs(comm, case)
    impl = get_backend(backend)
    d = impl.dispatch(comm, x, idx, w, num_experts=case.num_experts)
    y, wts, sidx, srank, n_to, n_from = (d.recv_x, d.recv_topk_weights, d.recv_src_idx, d.recv_src_rank,
                                         d.n_tokens_to_rank, d.n_tokens_from_rank)
    if comm.rank == bad_rank:
        if which == "length_mismatch":
            wts = wts[:-1]
        elif which == "counts_length":
            n_to = torch.cat([n_to, n_to[:1]])
        elif which == "src_rank_range":
            srank = srank.clone(); srank[0] = W
        elif which == "src_idx_range":
            sidx = sidx.clone(); sidx[0] = 10_000
    exc_type, text = COMBINE_ERRORS[which]
    msg = expect_error(exc_type, lambda: impl.combine(comm, y, wts, sidx, srank, n_to, n_from, x.shape[0]))
    expected = text if comm.rank == bad_rank else f"rank {bad_rank} rejected its input"
    assert expected in msg, f"rank {comm.rank}: message {msg!r} lacks {expected!r}"
    run_case(comm, case, backend)
    return msg


@pytest.mark.parametrize("which", sorted(COMBINE_ERRORS))
@pytest.mark.parametrize("world_size", MULTI)
def test_combine_bad_input_on_one_rank(backend, world_size, which):
    run_on_ranks(world_size, combine_error_body, backend, which, 0)


def overflow_body(comm, backend):
    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, routing="one_rank", seed=9)
    x, idx, w = rank_inputs(comm, case)
    need = 2 * 24 * W
    msg = expect_error(RuntimeError, lambda: get_backend(backend).dispatch(
        comm, x, idx, w, num_experts=case.num_experts, max_recv_tokens=need - 1))
    if comm.rank == 0:
        assert f"needed capacity {need}" in msg and f"given {need - 1}" in msg, msg
    run_case(comm, case, backend)
    return msg


@pytest.mark.parametrize("world_size", MULTI)
def test_capacity_overflow_is_an_error(backend, world_size):
    run_on_ranks(world_size, overflow_body, backend)


def frontend_binding_body(comm, backend, bad_rank):
    """A tensor that does not match its TensorView on one rank: TypeError there, every rank raises."""
    W = comm.world_size
    case = Case(W, 2, num_experts=4 * W, seed=21)
    fd = build_fusion(case, backend)
    x, idx, w = rank_inputs(comm, case)
    if comm.rank == bad_rank:
        x = x.float()  # the fusion declares bf16
    exc_type = TypeError if (comm.rank == bad_rank or W > 1) else TypeError
    msg = expect_error(exc_type, lambda: fd.execute([x, idx, w], communicator=comm))
    if comm.rank == bad_rank:
        assert "input %x" in msg and "bfloat16" in msg, msg
    else:
        assert f"rank {bad_rank} rejected its input" in msg, msg
    run_case(comm, case, backend)
    return msg


@pytest.mark.parametrize("world_size", MULTI)
def test_input_not_matching_its_tensorview(backend, world_size):
    run_on_ranks(world_size, frontend_binding_body, backend, world_size - 1)
