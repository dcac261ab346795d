"""`fuser-moe bench` (docs/contract.md section 10) on CPU ranks: Gloo and the shared-memory transport run the same
measurement code as on GPUs. Every measurement is checked against the nccl backend before it is timed
and recorded; the tables print; the results land in JSON, and in a PNG where matplotlib is installed
(it stays optional); a case that fails is recorded and the run goes on.
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fuser_moe import bench_report
from fuser_moe.backends.common import DispatchOutputs
from fuser_moe.bench import BenchConfig, compare_with_reference, parse_sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import matplotlib  # noqa: F401 - only whether it imports

    HAS_MATPLOTLIB = True
except ImportError:
    HAS_MATPLOTLIB = False
TINY = ["--device", "cpu", "--world-size", "2", "--hidden", "64", "--experts", "8", "--topk", "2",
        "--warmup", "1", "--reps", "3"]
SWEEP = [1, 2, 4, 8]
REPS = 3


def run_cli(*args, timeout=120, prelude=""):
    """`python -m fuser_moe bench ARGS` in a fresh interpreter (the module entry point, as users run it)."""
    code = (f"{prelude}import sys; from fuser_moe.cli import main; sys.exit(main(sys.argv[1:]))" if prelude
            else None)
    cmd = [sys.executable, "-c", code, "bench", *args] if code else [sys.executable, "-m", "fuser_moe", "bench", *args]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One run: both backends, exact, capacity and graph mode, both baselines, T in 1..8 (T=4 is also
    the standard workload), 2 CPU ranks."""
    out = tmp_path_factory.mktemp("bench")
    start = time.monotonic()
    proc = run_cli(*TINY, "--workloads", "standard,sweep", "--tokens", "4", "--sweep", "1:8", "--out", str(out))
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    with open(out / "bench.json") as f:
        document = json.load(f)
    return proc, out, document, elapsed


def test_bench_takes_less_than_a_minute(bench_run):
    _, _, _, elapsed = bench_run
    assert elapsed < 60, f"the tiny CPU benchmark took {elapsed:.1f} s"


def test_json_holds_every_measurement(bench_run):
    _, _, doc, _ = bench_run
    assert doc["format"] == bench_report.FORMAT and doc["complete"] is True
    assert doc["machine"]["device"] == "cpu" and doc["machine"]["world_size"] == 2
    assert doc["config"]["tokens"] == SWEEP and doc["workloads"] == {"standard": [4], "sweep": SWEEP}
    series = [("nccl", "exact"), ("nccl", "capacity"), ("nccl", "graph"), ("cuda", "exact"), ("cuda", "capacity"),
              ("cuda", "graph"), ("all_to_all_single", "exact"), ("all_to_all_vdev_2d", "capacity")]
    keys = sorted((r["tokens"], r["backend"], r["mode"], r["op"], r.get("payload", "")) for r in doc["results"])
    fp8_rows = [(4, b, m, "dispatch", v) for b in ("nccl", "cuda") for m in ("exact", "capacity", "graph")
                for v in ("fp8", "fp8+quantize")]  # the standard workload's T gets fp8 dispatch rows
    assert keys == sorted([(t, b, m, op, "") for t in SWEEP for b, m in series for op in ("dispatch", "combine")]
                          + fp8_rows)
    for r in doc["results"]:
        assert r["workloads"] == (["standard", "sweep"] if r["tokens"] == 4 else ["sweep"])
        assert r["status"] in ("ok", "skipped"), r
        if r["status"] != "ok":
            assert r["reason"], r
            continue
        assert 0 < r["min_us"] <= r["median_us"] and r["wire_gbps"] >= 0 and r["deepep_gbps"] >= r["wire_gbps"]
        assert r["speedup_vs_nccl"] > 0
        assert len(r["per_rank"]) == 2
        for rank in r["per_rank"]:
            assert len(rank["samples_us"]) == REPS and rank["deepep_bytes"] >= rank["wire_bytes"] > 0
        if r["mode"] != "exact":
            assert r["capacity"] >= 1


def test_every_measured_row_was_checked_against_nccl(bench_run):
    _, _, doc, _ = bench_run
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert ok and all(r["checked"] for r in ok)
    by_series = {(r["backend"], r["mode"]): r for r in doc["results"] if not r.get("payload")}
    for backend in ("nccl", "cuda"):
        for mode in ("exact", "capacity"):
            assert by_series[backend, mode]["status"] == "ok"
    assert by_series["cuda", "graph"]["status"] == "ok" and by_series["cuda", "graph"]["emulated"]
    assert by_series["nccl", "graph"]["status"] == "skipped" and "host" in by_series["nccl", "graph"]["reason"]
    assert by_series["all_to_all_single", "exact"]["status"] == "ok"
    assert by_series["all_to_all_vdev_2d", "capacity"]["status"] == "skipped"
    assert "CUDA" in by_series["all_to_all_vdev_2d", "capacity"]["reason"]


def test_rows_say_the_path_and_the_sms_the_backend_used(bench_run):
    """The backends' rows carry the protocol their calls took and the SMs their kernels used, as the
    backend's CommStats said (on CPU ranks: the cuda backend's general protocol, in torch, no SMs); the
    baselines' rows say neither. The tables show them in the note column."""
    proc, _, doc, _ = bench_run
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    cuda_rows = [r for r in ok if r["backend"] == "cuda"]
    assert cuda_rows and all(r["path"] == "general" and r.get("sms") is None for r in cuda_rows)
    assert all("path" not in r and "sms" not in r for r in ok if r["backend"] == "all_to_all_single")
    assert "general path" in proc.stdout
    shown = bench_report._status_text({"status": "ok", "checked": True, "path": "low-latency", "sms": 66,
                                       "note": "a note"})
    assert shown == "low-latency path, 66 SMs; a note"


def test_table_and_progress_print(bench_run):
    proc, _, doc, _ = bench_run
    table = proc.stdout
    assert "fuser-moe bench: W=2" in table and "T=4 (standard, sweep)" in table
    for heading in ("dispatch: median us", "dispatch: wire GB/s per rank", "combine: median us", "notes:"):
        assert heading in table, heading
    assert "nccl graph" in table and "not capturable" in table and "vdev2d" in table
    progress = [line for line in proc.stderr.splitlines() if line.startswith("bench [")]
    main_phase = [r for r in doc["results"] if r["backend"] != "all_to_all_vdev_2d"]
    assert len(progress) == len(main_phase)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed: the plot is optional")
def test_plot_is_written(bench_run):
    _, out, _, _ = bench_run
    with open(out / "bench.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed: the plot is optional")
def test_plot_is_redrawn_from_the_json(bench_run, tmp_path):
    _, out, _, _ = bench_run
    again = run_cli("--plot-from", str(out / "bench.json"), "--plot", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    assert "T=4 (standard, sweep)" in again.stdout and (tmp_path / "again.png").stat().st_size > 0
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    driver = subprocess.run([sys.executable, "-m", "benchmarks.plot", str(out / "bench.json"), "-o",
                             str(tmp_path / "driver.png")], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert driver.returncode == 0, driver.stderr
    assert (tmp_path / "driver.png").stat().st_size > 0


def test_without_matplotlib_the_plot_is_skipped_and_said_so(bench_run, tmp_path):
    _, out, _, _ = bench_run
    proc = run_cli("--plot-from", str(out / "bench.json"), "--plot", str(tmp_path / "none.png"),
                   prelude="import sys; sys.modules['matplotlib'] = None; ")
    assert proc.returncode == 0, proc.stderr
    assert "plot skipped: matplotlib is not installed" in proc.stderr
    assert not (tmp_path / "none.png").exists() and "T=4 (standard, sweep)" in proc.stdout


def test_a_failing_case_is_recorded_and_the_run_goes_on(tmp_path):
    # A capacity below what a rank receives: the capacity modes fail on every rank, exact mode is timed.
    proc = run_cli(*TINY, "--workloads", "standard", "--tokens", "8", "--capacity", "3", "--baselines", "none",
                   "--no-plot", "--quiet", "--out", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED" in proc.stdout
    with open(tmp_path / "bench.json") as f:
        doc = json.load(f)
    status = {(r["backend"], r["mode"]): r["status"] for r in doc["results"]}
    assert status["nccl", "exact"] == status["cuda", "exact"] == "ok"
    assert status["nccl", "capacity"] == "error" and status["cuda", "capacity"] == "mismatch"
    assert all("capacity" in r["reason"] for r in doc["results"] if r["status"] in ("error", "mismatch"))


@pytest.mark.parametrize("spec, values", [("1:16384", [2 ** k for k in range(15)]), ("3:20", [4, 8, 16]),
                                          ("8,1,8,3", [1, 3, 8]), ("none", [])])
def test_sweep_spec(spec, values):
    assert parse_sweep(spec) == values


def test_capacity_comes_from_the_routing():
    cfg = BenchConfig(topk=8)
    assert cfg.capacity_for(4096, 30000) == 40960  # 1.25 * T * K
    assert cfg.capacity_for(1, 27) == 32  # more pairs than 1.25 * T * K: the routing decides, rounded up
    assert BenchConfig(capacity=100).capacity_for(4096, 30000) == 100


def _outputs(rows, capacity=None):
    """Dispatch outputs of `rows` rows, padded to `capacity` rows as capacity mode pads them."""
    gen = torch.Generator().manual_seed(0)
    pad = 0 if capacity is None else capacity - rows
    minus = torch.full((pad,), -1, dtype=torch.int64)
    return DispatchOutputs(
        recv_x=torch.cat([torch.randn(rows, 4, generator=gen).bfloat16(), torch.zeros(pad, 4, dtype=torch.bfloat16)]),
        recv_topk_idx=torch.cat([torch.arange(rows), minus]),
        recv_topk_weights=torch.cat([torch.rand(rows, generator=gen), torch.zeros(pad)]),
        recv_src_idx=torch.cat([torch.arange(rows), minus]),
        recv_src_rank=torch.cat([torch.zeros(rows, dtype=torch.int64), minus]),
        n_tokens_to_rank=torch.tensor([rows, 0]), n_tokens_from_rank=torch.tensor([rows, 0]),
        n_tokens_per_expert=torch.tensor([rows]))


def test_check_compares_bits_rows_and_padding():
    ref, out = _outputs(5), torch.randn(5, 4).bfloat16()
    assert compare_with_reference(_outputs(5), out.clone(), ref, out, None) is None
    assert compare_with_reference(_outputs(5, capacity=8), out.clone(), ref, out, 8) is None
    flipped = _outputs(5)
    flipped.recv_x.view(torch.int16)[2, 1] ^= 1
    assert "recv_x" in compare_with_reference(flipped, out, ref, out, None)
    signed_zero = out.clone()
    signed_zero[0, 0] = 0.0
    negative_zero = signed_zero.clone()
    negative_zero[0, 0] = -0.0
    assert "combined_x" in compare_with_reference(_outputs(5), negative_zero, ref, signed_zero, None)
    bad_pad = _outputs(5, capacity=8)
    bad_pad.recv_src_rank[6] = 0
    assert "padding" in compare_with_reference(bad_pad, out, ref, out, 8)
    assert "capacity" in compare_with_reference(_outputs(5), out, ref, out, 4)


def test_fp8_dispatch_rows(bench_run):
    """fp8 dispatch of the standard workload: checked, timed, wire bytes with the scales, ratio to bf16."""
    proc, _, doc, _ = bench_run
    rows = [r for r in doc["results"] if r.get("payload")]
    assert rows and all(r["op"] == "dispatch" and r["tokens"] == 4 for r in rows)
    plain = {(r["backend"], r["mode"]): r for r in doc["results"]
             if not r.get("payload") and r["op"] == "dispatch" and r["tokens"] == 4}
    for r in rows:
        if r["backend"] == "nccl" and r["mode"] == "graph":
            assert r["status"] == "skipped" and "host" in r["reason"]
            continue
        assert r["status"] == "ok" and r["checked"], r
        assert r["fp8_time_ratio"] == r["median_us"] / plain[r["backend"], r["mode"]]["median_us"]
        for rank, base in zip(r["per_rank"], plain[r["backend"], r["mode"]]["per_rank"]):
            # a row is H = 64 fp8 bytes and one float32 scale instead of 64 bfloat16 values
            assert rank["wire_bytes"] * 128 == base["wire_bytes"] * 68
    assert "fp8 dispatch vs bfloat16 dispatch" in proc.stdout and "fp8+quantize" in proc.stdout
