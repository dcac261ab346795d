"""Conformance of every backend with the reference, bit for bit (docs/contract.md sections 3-5).

Parametrized like gtest's INSTANTIATE_TEST_SUITE_P over backend x world size x top-k x dtype; each
case runs on real ranks started by the harness.
"""
import pytest

from harness import available_world_sizes, run_on_ranks
from moe_cases import Case, run_case

WORLD_SIZES = available_world_sizes((1, 2, 3, 4))
TOP_KS = [1, 2, 8]
DTYPE_NAMES = ["float32", "bfloat16"]


def experts_for(world_size: int, top_k: int) -> int:
    return max(8, top_k) * world_size if world_size != 3 else 24


@pytest.mark.parametrize("dtype", DTYPE_NAMES)
@pytest.mark.parametrize("top_k", TOP_KS)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_random_routing_matches_reference(backend, world_size, top_k, dtype):
    case = Case(world_size, top_k, num_experts=experts_for(world_size, top_k), dtype=dtype,
                seed=world_size * 100 + top_k)
    results = run_on_ranks(world_size, run_case, case, backend)
    assert all(r["backends"] == [backend, backend] for r in results)


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1])
def test_uneven_and_empty_ranks(backend, world_size):
    tokens = [0] + [5 + 13 * r for r in range(1, world_size)]
    case = Case(world_size, 2, num_experts=4 * world_size, tokens=tokens, seed=7)
    run_on_ranks(world_size, run_case, case, backend)


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1])
def test_all_tokens_to_one_rank(backend, world_size):
    case = Case(world_size, 2, num_experts=4 * world_size, routing="one_rank", seed=11)
    results = run_on_ranks(world_size, run_case, case, backend)
    assert results[0]["rows"] == 2 * 24 * world_size
    assert all(r["rows"] == 0 for r in results[1:])


@pytest.mark.parametrize("top_k", [2, 8])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_empty_slots(backend, world_size, top_k):
    case = Case(world_size, top_k, num_experts=8 * world_size, routing="empty_slots", seed=13)
    run_on_ranks(world_size, run_case, case, backend)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_every_slot_empty(backend, world_size):
    case = Case(world_size, 2, num_experts=4 * world_size, routing="all_empty", seed=17)
    results = run_on_ranks(world_size, run_case, case, backend)
    assert all(r["rows"] == 0 for r in results)


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1])
def test_custom_placement(backend, world_size):
    # Uneven, interleaved placement: rank 0 holds no expert, the last rank holds most.
    E = 10
    placement = [(e * 7) % (world_size - 1) + 1 for e in range(E)]
    placement[3] = world_size - 1
    case = Case(world_size, 3, num_experts=E, expert_to_rank=placement, seed=19)
    run_on_ranks(world_size, run_case, case, backend)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_int32_topk_idx_and_float16(backend, world_size):
    case = Case(world_size, 2, num_experts=4 * world_size, idx_dtype="int32", dtype="float16", seed=23)
    run_on_ranks(world_size, run_case, case, backend)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_nonlinear_expert_between_dispatch_and_combine(backend, world_size):
    case = Case(world_size, 2, num_experts=4 * world_size, seed=29)
    run_on_ranks(world_size, run_case, case, backend, "silu")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_capacity_mode_pads_and_matches(backend, world_size):
    case = Case(world_size, 2, num_experts=4 * world_size, max_recv_tokens=48 * world_size + 5, seed=31)
    results = run_on_ranks(world_size, run_case, case, backend)
    assert all(r["rows"] == 48 * world_size + 5 for r in results)


@pytest.mark.parametrize("world_size", [w for w in WORLD_SIZES if w > 1])
def test_wide_hidden_size(backend, world_size):
    case = Case(world_size, 8, num_experts=8 * world_size, hidden=1040, tokens=[40] * world_size, seed=37)
    run_on_ranks(world_size, run_case, case, backend)
