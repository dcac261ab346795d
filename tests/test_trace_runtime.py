"""Traces, the communicator's environment handling, timeouts, and the command line."""
import json
import os
import subprocess
import sys
import time

import pytest

from harness import available_world_sizes, run_on_ranks
from moe_cases import Case, build_fusion, make_inputs

from fuser_moe.backends.communicator import detect_launcher, timeout_from_env
from fuser_moe.launch import RankFailure, spawn

MULTI = [w for w in available_world_sizes((2, 4)) if w > 1]


def trace_body(comm, backend, out_dir):
    case = Case(comm.world_size, 2, num_experts=4 * comm.world_size, seed=41)
    fd = build_fusion(case, backend)
    xs, idxs, ws = make_inputs(case)
    r, dev = comm.rank, comm.device
    fd.execute([xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)], communicator=comm, trace=True)
    trace = fd.last_trace
    events = trace.events
    assert [e.op for e in events] == ["MoeDispatch", "Size", "MoeCombine"]
    dispatch, _, combine = events
    assert dispatch.backend == backend and dispatch.reason
    assert dispatch.inputs[0] == ("%x", (24, 16), "bf16")
    assert dispatch.outputs[0][0] == "%recv_x" and dispatch.outputs[0][2] == "bf16"
    # wire bytes: rows that left this rank times the row size (payload + metadata), self excluded
    assert dispatch.bytes_sent > 0 and combine.bytes_sent > 0
    assert dispatch.host_syncs >= 1 and dispatch.sync_reasons
    assert all(e.wall_ms >= 0 for e in events)
    if dev.type == "cuda":
        assert all(e.device_ms is not None and e.device_ms >= 0 for e in events)
    table = trace.summary()
    assert "MoeDispatch" in table and "MoeCombine" in table and backend in table
    path = trace.to_chrome(os.path.join(out_dir, f"explicit_rank{r}.json"))
    with open(path) as f:
        chrome = json.load(f)
    spans = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert {e["name"] for e in spans} >= {"MoeDispatch", "MoeCombine"}
    assert all(e["pid"] == r and e["dur"] > 0 for e in spans)
    return dispatch.bytes_sent


@pytest.mark.parametrize("world_size", MULTI)
def test_trace_records_every_expression(backend, world_size, tmp_path):
    sent = run_on_ranks(world_size, trace_body, backend, str(tmp_path))
    assert all(s > 0 for s in sent)


def env_trace_body(comm, out_dir):
    os.environ["FUSER_MOE_TRACE"] = out_dir
    try:
        case = Case(comm.world_size, 1, num_experts=2 * comm.world_size, seed=43)
        fd = build_fusion(case, "nccl")
        xs, idxs, ws = make_inputs(case)
        r, dev = comm.rank, comm.device
        fd.execute([xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)], communicator=comm)  # no trace=True
    finally:
        del os.environ["FUSER_MOE_TRACE"]
    with open(os.path.join(out_dir, f"trace_rank{comm.rank}.json")) as f:
        return len([e for e in json.load(f)["traceEvents"] if e["ph"] == "X"])


@pytest.mark.parametrize("world_size", MULTI[:1])
def test_fuser_moe_trace_env_writes_one_file_per_rank(world_size, tmp_path):
    counts = run_on_ranks(world_size, env_trace_body, str(tmp_path))
    assert all(c >= 3 for c in counts)
    assert sorted(os.listdir(tmp_path)) == [f"trace_rank{r}.json" for r in range(world_size)]


def test_launcher_detection():
    assert detect_launcher({}) is None
    t = detect_launcher({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"})
    assert (t.rank, t.world_size, t.local_rank, t.launcher) == (3, 8, 1, "torchrun")
    s = detect_launcher({"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_LOCALID": "2"})
    assert (s.rank, s.world_size, s.launcher) == (2, 4, "slurm")
    m = detect_launcher({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
                         "OMPI_COMM_WORLD_LOCAL_RANK": "1"})
    assert (m.rank, m.world_size, m.launcher) == (1, 2, "openmpi")


def test_timeout_from_env():
    assert timeout_from_env({}) == 300.0
    assert timeout_from_env({"FUSER_MOE_TIMEOUT_S": "12.5"}) == 12.5
    with pytest.raises(ValueError, match="FUSER_MOE_TIMEOUT_S"):
        timeout_from_env({"FUSER_MOE_TIMEOUT_S": "soon"})


def test_single_rank_without_launcher_runs_in_process():
    case = Case(1, 2, num_experts=4, seed=47)
    fd = build_fusion(case, "nccl")
    xs, idxs, ws = make_inputs(case)
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE") if k in os.environ}
    try:
        outs = fd.execute([xs[0], idxs[0], ws[0]])
    finally:
        os.environ.update(env)
    assert outs[0].shape[0] == int(outs[7].sum())


def silent_peer_body(comm, backend):
    """Rank 1 never joins the dispatch; rank 0 must raise TimeoutError within the group's timeout."""
    from fuser_moe.executors import get_backend

    case = Case(comm.world_size, 2, num_experts=4 * comm.world_size, seed=53)
    xs, idxs, ws = make_inputs(case)
    if comm.rank == 1:
        time.sleep(12)
        return "slept"
    start = time.monotonic()
    try:
        get_backend(backend).dispatch(comm, xs[0], idxs[0], ws[0], num_experts=case.num_experts)
    except TimeoutError as exc:
        return ("timeout", time.monotonic() - start, str(exc))
    raise AssertionError("dispatch returned although a peer never joined")


def test_silent_peer_raises_timeout_error_not_a_hang(backend):
    if backend == "cuda" and os.environ.get("FUSER_MOE_TEST_DEVICE", "cpu") != "cpu":
        pytest.skip("the CUDA-device variant is covered by the reliability suite")
    results = spawn(silent_peer_body, 2, (backend,), timeout_s=90, collective_timeout_s=3.0)
    kind, waited, message = results[0]
    assert kind == "timeout" and waited < 10, results[0]
    assert results[1] == "slept"


def test_spawn_reports_a_failing_rank():
    with pytest.raises(RankFailure, match="rank 1"):
        spawn(_fail_on_rank_one, 2, timeout_s=60)


def _fail_on_rank_one(comm):
    if comm.rank == 1:
        raise ValueError("planted failure")
    return comm.rank


def test_demo_command_runs_and_reports_rounding_level_difference():
    out = subprocess.run([sys.executable, "-m", "fuser_moe", "demo", "--world-size", "2", "--tokens", "16",
                          "--hidden", "32", "--ffn", "64", "--experts", "4"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "MoeDispatch[num_experts=4, backend=auto]" in text and "GroupedMm" in text and "MoeCombine" in text
    assert "trace of rank 0" in text
    assert "at bfloat16 rounding level" in text, text


def test_demo_command_rejects_bad_options():
    out = subprocess.run([sys.executable, "-m", "fuser_moe", "demo", "--topk", "9", "--experts", "4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--topk 9 exceeds --experts 4" in out.stderr


def auto_backend_body(comm):
    case = Case(comm.world_size, 2, num_experts=4 * comm.world_size, seed=59)
    fd = build_fusion(case, "auto")
    xs, idxs, ws = make_inputs(case)
    r, dev = comm.rank, comm.device
    fd.execute([xs[r].to(dev), idxs[r].to(dev), ws[r].to(dev)], communicator=comm, trace=True)
    return [(e.backend, e.reason) for e in fd.last_trace.events if e.backend]


@pytest.mark.parametrize("world_size", MULTI[:1])
def test_auto_backend_resolves_per_node_and_says_why(world_size):
    """docs/contract.md section 7: cuda for CUDA tensors on one host with peer access, nccl otherwise."""
    choices = run_on_ranks(world_size, auto_backend_body)
    for per_rank in choices:
        assert len(per_rank) == 2
        for backend, reason in per_rank:
            if os.environ.get("FUSER_MOE_TEST_DEVICE", "cpu").startswith("cuda"):
                assert backend == "cuda" and "peer access" in reason, per_rank
            else:
                assert backend == "nccl" and reason == "auto: tensors are on the CPU", per_rank
