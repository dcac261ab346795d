"""What a new user meets in the first hour (issue 10): exits, mismatched ranks, the command line, messages.

  1. Lifetime: the torchrun demo and a script that never closes its communicator exit 0, with no abort.
  2. Ranks that disagree on the backend or the node, and a rank that never calls execute: every rank
     raises at once (ValueError), or within the timeout (TimeoutError naming the missing rank).
  3. The command line: the demo's verdict is its exit code, options are checked before ranks start,
     --help shows defaults, --version.
  4. Messages: dtype names, extents, Int vs Int32, the trace's cut cells, combine's backend.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from harness import TEST_DEVICE, available_world_sizes, run_on_ranks
from moe_cases import Case, build_fusion, expect_error, rank_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_two_ranks = pytest.mark.skipif(2 not in available_world_sizes((2,)), reason="needs 2 ranks")


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    env.update(extra)
    return env


# =============================================================================== 2. disagreeing ranks
def backend_disagreement_body(comm, backends: list):
    """Rank r runs the fusion with backend backends[r]; returns (message, seconds) of the error it raised."""
    case = Case(world_size=comm.world_size, top_k=2)
    fd = build_fusion(case, backends[comm.rank])
    start = time.monotonic()
    msg = expect_error(ValueError, lambda: fd.execute(list(rank_inputs(comm, case)), communicator=comm))
    return msg, time.monotonic() - start


@needs_two_ranks
@pytest.mark.parametrize("odd_one", ["cuda", "nccl"])
def test_ranks_that_disagree_on_the_backend_all_raise_at_once(odd_one):
    from conftest import cuda_backend_skip_reason

    reason = cuda_backend_skip_reason(TEST_DEVICE)
    if reason:
        pytest.skip(reason)
    other = "nccl" if odd_one == "cuda" else "cuda"
    results = run_on_ranks(2, backend_disagreement_body, [other, odd_one], timeout_s=60)
    for rank, (msg, seconds) in enumerate(results):
        assert "ranks disagree on the backend" in msg, (rank, msg)
        assert "rank 0: MoeDispatch (node 0) on backend " + other in msg, msg
        assert "rank 1: MoeDispatch (node 0) on backend " + odd_one in msg, msg
        assert seconds < 20, (rank, seconds)  # at once, not after the group's 60 s timeout
    # The group is still usable: the same fusion with one backend everywhere runs.
    from moe_cases import run_case
    run_on_ranks(2, run_case, Case(world_size=2, top_k=2), "nccl")


def node_disagreement_body(comm):
    """Rank 0 runs a dispatch+combine fusion, rank 1 a fusion whose first node is a combine."""
    from fuser_moe import DataType, FusionDefinition

    case = Case(world_size=comm.world_size, top_k=2)
    if comm.rank == 0:
        fd = build_fusion(case, "nccl")
        inputs = list(rank_inputs(comm, case))
    else:
        with FusionDefinition() as fd:
            x = fd.define_tensor(shape=[-1, 16], dtype=DataType.BFloat16)
            meta = [fd.define_tensor(shape=[-1], dtype=dt) for dt in (DataType.Float, DataType.Int, DataType.Int)]
            counts = [fd.define_tensor(shape=[-1], dtype=DataType.Int) for _ in range(2)]
            fd.add_output(fd.ops.moe_combine(x, *meta, *counts, num_tokens=0, backend="nccl"))
        inputs = [torch.zeros(0, 16, dtype=torch.bfloat16), torch.zeros(0), torch.zeros(0, dtype=torch.int64),
                  torch.zeros(0, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)]
        inputs = [t.to(comm.device) for t in inputs]
    return expect_error(ValueError, lambda: fd.execute(inputs, communicator=comm))


@needs_two_ranks
def test_ranks_that_run_different_nodes_all_raise_at_once():
    for rank, msg in enumerate(run_on_ranks(2, node_disagreement_body, timeout_s=60)):
        assert "ranks disagree on the node they run" in msg, (rank, msg)
        assert "rank 0: MoeDispatch (node 0)" in msg and "rank 1: MoeCombine (node 0)" in msg, msg
