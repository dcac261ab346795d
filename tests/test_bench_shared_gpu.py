"""`fuser-moe bench --device cuda:N`: every rank on one GPU (docs/benchmarks.md, "Ranks sharing one GPU").

NCCL refuses two ranks on one GPU, so with W > 1 the nccl backend and the NCCL baselines are skipped
and say so, no NCCL collective runs on a CUDA tensor (the reference is computed on CPU copies over Gloo,
the ranks start each repetition at an agreed moment of the host clock instead of an all-reduce), and the
cuda backend is timed. On the CPU: the option's checks, the skip logic, and the shared-GPU code path of
the rank side on CPU ranks told that they share a GPU. On a GPU: the command itself, W=1 and W=2 on cuda:0.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from harness import available_world_sizes, run_on_ranks, shares_gpu

from fuser_moe import bench_report
from fuser_moe.bench import (BenchConfig, MainBench, device_problem, gpu_sharing, launch_sharing, machine_facts,
                             parse_device, shared_gpu_skips)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--hidden", "64", "--experts", "8", "--topk", "2", "--warmup", "1", "--reps", "3", "--no-plot", "--quiet"]
SHARED = "2 ranks share cuda:0"


def _cli(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "fuser_moe", "bench", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


# ------------------------------------------------------------------------------------------ the option
@pytest.mark.parametrize("text, device", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:0", "cuda:0"),
                                          ("CUDA:01", "cuda:1")])
def test_device_forms(text, device):
    assert parse_device(text) == device


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda0"])
def test_a_bad_device_is_refused_by_argparse(text, capsys):
    from fuser_moe.cli import main

    with pytest.raises(SystemExit) as info:
        main(["bench", "--device", text])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --device" in err and "cuda:N" in err and repr(text) in err, err


@pytest.mark.parametrize("device, world, visible, words", [
    ("cuda:0", 2, 0, "--device cuda:0 needs a GPU and none is visible"),
    ("cuda:1", 4, 1, "--device cuda:1: no such GPU, 1 visible (cuda:0)"),
    ("cuda:2", 1, 2, "--device cuda:2: no such GPU, 2 visible (cuda:0 to cuda:1)"),
    ("cuda", 4, 2, "--world-size 4 needs one GPU a rank; 2 visible"),
    ("cuda", 1, 0, "--device cuda (the default) needs GPUs and none is visible"),
    ("cuda:0", 0, 1, "--world-size must be >= 1"),
    ("cpu", 0, 0, "--world-size must be >= 1"),
])
def test_device_problems(device, world, visible, words):
    assert words in device_problem(device, world, visible)


@pytest.mark.parametrize("device, world, visible", [("cuda:0", 4, 1), ("cuda:1", 8, 2), ("cuda", 2, 2), ("cpu", 4, 0)])
def test_devices_that_can_start(device, world, visible):
    assert device_problem(device, world, visible) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without GPUs")
def test_cuda_n_without_a_gpu_exits_2_before_any_rank_starts(monkeypatch, capsys):
    import fuser_moe.launch
    from fuser_moe.cli import main

    monkeypatch.setattr(fuser_moe.launch, "spawn", lambda *args, **kwargs: pytest.fail("ranks were started"))
    assert main(["bench", "--device", "cuda:0", "--world-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:0 needs a GPU and none is visible" in err and "--device cpu" in err, err


def test_cuda_n_under_a_launcher_is_refused(monkeypatch, capsys):
    from fuser_moe.cli import main

    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")):
        monkeypatch.setenv(name, value)
    assert main(["bench", "--device", "cuda:0"]) == 2
    err = capsys.readouterr().err
    assert "under a launcher" in err and "--device cuda" in err, err


# ------------------------------------------------------------------------------------------ what runs
def test_which_ranks_share_a_gpu():
    assert launch_sharing("cuda:0", 4) == "4 ranks share cuda:0"
    assert launch_sharing("cuda:1", 2) == "2 ranks share cuda:1"
    for device, world in (("cuda:0", 1), ("cuda", 4), ("cpu", 4)):
        assert launch_sharing(device, world) is None, (device, world)
    two_hosts = [{"host": h, "device": "cuda:0"} for h in ("a", "a", "b")]
    assert gpu_sharing(two_hosts) == "2 ranks share cuda:0 of a"
    assert gpu_sharing([{"host": "a", "device": "cpu"}] * 3) is None


def test_what_is_skipped_on_a_shared_gpu():
    assert shared_gpu_skips(None) == {}
    skips = shared_gpu_skips("4 ranks share cuda:0")
    assert sorted(skips) == ["all_to_all_single", "all_to_all_vdev_2d", "nccl"]
    assert all("4 ranks share cuda:0" in reason for reason in skips.values())
    assert "NCCL refuses two ranks on one GPU" in skips["nccl"]
    assert "NCCL refuses two ranks on one GPU" in skips["all_to_all_single"]


# ------------------------------------------------------------------------------------------ rank side
def _shared_body(comm, cfg):
    """The main phase on ranks told that they share a GPU: CPU ranks run the same code path (the CPU
    reference is then a no-op copy), so what it skips, checks and times is tested without a GPU."""
    facts = machine_facts(comm)
    sharing = f"{comm.world_size} ranks share cuda:0"
    bench = MainBench(comm, cfg, 0, shared_gpu=sharing)
    bench.total_cases = bench.measurements()
    document = bench_report.new_document(cfg, dict(facts, shared_gpu=sharing)) if comm.rank == 0 else None
    return bench.run(document)


@pytest.mark.skipif(2 not in available_world_sizes((2,)),
                    reason="needs 2 ranks (a GPU with FUSER_MOE_TEST_DEVICE=cuda)")
def test_shared_gpu_path_skips_nccl_and_checks_the_cuda_backend():
    cfg = BenchConfig(hidden=32, topk=2, experts=8, workloads={"standard": [6]}, warmup=1, reps=3,
                      baselines=("all_to_all_single",), progress=False)
    document = bench_report.finalize(run_on_ranks(2, _shared_body, cfg)[0])
    rows = document["results"]
    status = {(r["backend"], r["mode"], r["op"], r.get("payload")): r for r in rows}
    modes, ops = ("exact", "capacity", "graph"), ("dispatch", "combine")
    plain = [(b, m, op, None) for b in ("nccl", "cuda") for m in modes for op in ops]
    plain += [("all_to_all_single", "exact", op, None) for op in ops]
    fp8 = [(b, m, "dispatch", v) for b in ("nccl", "cuda") for m in modes for v in ("fp8", "fp8+quantize")]
    assert len(rows) == len(status) and sorted(status, key=str) == sorted(plain + fp8, key=str)
    for key, r in status.items():
        backend, mode, _, payload = key
        if backend == "nccl" and mode == "graph":
            assert r["status"] == "skipped" and "host" in r["reason"], r  # not capturable, as anywhere
        elif backend in ("nccl", "all_to_all_single"):
            assert r["status"] == "skipped" and SHARED in r["reason"] and "NCCL refuses" in r["reason"], r
        else:
            assert backend == "cuda" and r["status"] == "ok" and r["checked"], r
            assert len(r["per_rank"]) == 2 and all(len(p["samples_us"]) == 3 for p in r["per_rank"])
    assert {k[:3] for k, r in status.items() if r["status"] == "ok" and not k[3]} == \
        {("cuda", m, op) for m in ("exact", "capacity", "graph") for op in ("dispatch", "combine")}
    assert any(r["status"] == "ok" and r.get("payload") == "fp8" for r in rows)  # fp8 checked against the CPU reference
    report = bench_report.format_report(document)
    assert "W=2 on" in report and f"{SHARED}, the nccl reference on CPU copies over Gloo" in report, report
    assert "NCCL refuses two ranks on one GPU" in report and "FAILED" not in report


def _start_body(comm, late_s):
    import time

    from fuser_moe.bench import _HOST_START_AHEAD_S

    bench = MainBench(comm, BenchConfig(progress=False), 0, shared_gpu=f"{comm.world_size} ranks share cuda:0")
    if comm.rank == 1:
        time.sleep(late_s)
    arrived = time.monotonic()
    bench.start_together()
    return arrived, time.monotonic(), _HOST_START_AHEAD_S


@pytest.mark.skipif(2 not in available_world_sizes((2,)),
                    reason="needs 2 ranks (a GPU with FUSER_MOE_TEST_DEVICE=cuda)")
def test_ranks_sharing_a_gpu_start_together_after_the_last_one():
    """The host-clock start that replaces the barrier and the all-reduce: no rank starts before the last
    one has arrived plus the margin (one host, so one monotonic clock)."""
    (arrived0, left0, ahead), (arrived1, left1, _) = run_on_ranks(2, _start_body, 0.05)
    assert arrived1 > arrived0
    assert left0 >= arrived1 + ahead and left1 >= arrived1 + ahead


# ------------------------------------------------------------------------------------------ on a GPU
def _gate_body(comm, late_s):
    import time

    from fuser_moe.backends.transport.nvrtc import get_kernel
    from fuser_moe.bench import _HOST_START_AHEAD_S, gpu_start_gate

    clock = torch.empty(1, dtype=torch.int64, device=comm.device)
    read = get_kernel("barrier.cu", "fuser_moe_clock_read", comm.device)
    if comm.rank == 1:
        time.sleep(late_s)
    read.launch(1, 1, [clock])
    arrived = int(clock.item())
    gpu_start_gate(comm, comm.device)
    read.launch(1, 1, [clock])  # the first work after the gate
    return arrived, int(clock.item()), int(_HOST_START_AHEAD_S * 1e9), str(comm.device)


@pytest.mark.skipif(not (torch.cuda.is_available() and shares_gpu(2) and 2 in available_world_sizes((2,))),
                    reason="needs 2 ranks on cuda:0 (FUSER_MOE_TEST_DEVICE=cuda on a one-GPU machine)")
def test_the_gpu_start_gate_holds_every_rank_until_the_agreed_moment():
    """Ranks sharing a GPU start a timed repetition at one moment of its %globaltimer: the early rank's
    stream waits for the late rank's reading plus the margin, then both go."""
    (arrived0, left0, ahead, dev0), (arrived1, left1, _, dev1) = run_on_ranks(2, _gate_body, 0.05)
    assert dev0 == dev1 == "cuda:0"
    assert arrived1 - arrived0 > 40e6  # rank 1 came 50 ms later (one clock)
    assert left0 >= arrived1 + ahead and left1 >= arrived1 + ahead
    assert left0 - arrived1 < ahead + 50e6  # and the gate let go soon after the moment


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: runs the bench with its ranks on cuda:0")
@pytest.mark.parametrize("world", [1, 2])
def test_bench_on_cuda0(world, tmp_path):
    # W=2 names every baseline (each is skipped at once); W=1 leaves out NVSHMEM's (its start-up is slow)
    baselines = "all_to_all_single" + (",all_to_all_vdev_2d" if world > 1 else "")
    proc = _cli("--device", "cuda:0", "--world-size", str(world), "--workloads", "standard,decode", "--tokens", "16",
                "--decode-tokens", "4", "--sweep", "none", "--baselines", baselines, *TINY, "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(tmp_path / "bench.json") as f:
        document = json.load(f)
    machine = document["machine"]
    assert machine["world_size"] == world and {r["device"] for r in machine["ranks"]} == {"cuda:0"}
    status = {(r["backend"], r["mode"], r["op"], r.get("payload")): r for r in document["results"]}
    cuda = [r for k, r in status.items() if k[0] == "cuda"]
    assert cuda and all(r["status"] == "ok" and r["checked"] for r in cuda), cuda
    if world == 1:  # as --device cuda --world-size 1: nothing is shared, nccl runs
        assert machine["shared_gpu"] is None
        assert status["nccl", "exact", "dispatch", None]["status"] == "ok"
        assert status["all_to_all_single", "exact", "dispatch", None]["status"] == "ok"
        assert "share" not in proc.stdout.splitlines()[0]
        return
    assert machine["shared_gpu"] == SHARED
    assert SHARED in proc.stdout.splitlines()[0], proc.stdout
    for key, r in status.items():
        if key[0] in ("nccl", "all_to_all_single", "all_to_all_vdev_2d") and key[:2] != ("nccl", "graph"):
            assert r["status"] == "skipped" and SHARED in r["reason"], r
