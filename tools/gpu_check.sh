#!/usr/bin/env bash
# GPU check: what every CUDA-backend change must pass before it is called done, on a GPU machine.
# Installs the project, then (logs under $OUT, default ./gpu_logs):
#   suite: kernels compile check; the whole parametrized suite with ranks on the GPUs
#          (FUSER_MOE_TEST_DEVICE=cuda: every world size up to the GPU count); the demo under torchrun
#          with both backends.
#   bench: the whole benchmark (docs/contract.md section 10, fuser_moe/bench.py): standard (T=4096), decode
#          (T=128) and the sweep of T from 1 to 16384; nccl and cuda backends in exact, capacity and
#          CUDA-graph mode; the all_to_all_single and all_to_all_vdev_2d baselines; every result checked
#          bit for bit before it is timed. First a short run under torchrun (the launcher path, into
#          bench_torchrun/), then the whole run: about 3 minutes on 4 H200s (limit 8). Writes bench.json,
#          bench.png, bench_progress.log (a line per measurement) and bench.txt (the tables, printed last).
#   soak:  tools/soak.py with one rank per GPU, both backends (SOAK_ROUNDS rounds each, default 1000),
#          into soak.log and soak.json: mismatches, wrong errors and leaks fail it.
#   compare: before/after on this machine in one run (docs/contract.md section 10): the standard and decode
#          workloads, every mode, with the checkout at $BEFORE (say a `git worktree add` of the commit
#          before a change) and then with this one, into compare_before.txt and compare_after.txt.
#   one-gpu: what one GPU can check, in one call of under 10 minutes: the GPU tests of the CUDA backend
#          (ranks share cuda:0 for W > 1: CUDA IPC works between processes on one GPU; NCCL cases skip),
#          the low-latency path, the routing plan's stage tests, fp8, autograd; the training demo under
#          torchrun; the W=1 benchmark of the standard and decode workloads (both backends, fp8 rows).
#   mps:   W > 1 timed on one GPU: starts the MPS daemon (nvidia-cuda-mps-control -d, so that the ranks'
#          kernels run at once; without the binary, or when it cannot start, it says so and runs without),
#          then the benchmark with 4 and then 2 ranks sharing cuda:0 (`--device cuda:0`: the cuda backend
#          in exact, capacity and graph mode on the standard and decode workloads; checked against the
#          nccl reference computed on CPU copies) into bench_mps4.txt and bench_mps2.txt (tables),
#          bench_mps{4,2}.err (progress), bench_mps{4,2}/bench.json, and the MPS server list into mps.txt;
#          quits the daemon it started whatever happens (a trap). MPS_TIMEOUT bounds each run (default 240 s).
#   combine: both combines of the cuda backend on the GPUs there are (ranks share cuda:0 where needed):
#          conformance, the backend's GPU tests and its vanished-peer cases, first with the default
#          three-kernel combine, then with the opt-in streaming one (FUSER_MOE_STREAM_COMBINE=1), then
#          the W=1 standard workload under CUDA graphs with each (combine_three.txt, combine_stream.txt).
#   ll:    the low-latency path on one GPU: its tests with conformance and the plan's (ranks share cuda:0
#          for W > 1) into ll_tests.log, the vanished-peer cases into ll_vanished.log; the decode workload (T=128) under CUDA graphs, cuda backend, at
#          W=1 and then with 4 ranks on cuda:0 under MPS, alternating with the checkout at $BEFORE when it
#          is set (LL_ROUNDS rounds of each, default 2; ll_<w1|mps4>_<before|after>_<round>.txt); then the
#          phase-stamp timeline of tools/ll_stamps.py at W=1 (eager and in a CUDA graph: ll_stamps_w1.txt,
#          ll_stamps_w1_graph.txt) and shared W=4 (ll_stamps_w4.txt; in a graph, with every rank's marks
#          against the earliest rank's send start, ll_stamps_w4_graph.txt),
#          and tools/ll_floor.py, the same bytes moved by torch in a graph (ll_floor.txt; and each of
#          the 4 ranks' share under MPS, all at once, ll_floor_w4.txt).
# Usage: tools/gpu_check.sh [suite|bench|soak|compare|one-gpu|mps|combine|ll|all]    (default all = suite, bench, soak; PYTEST_ARGS
#        passes extra pytest options)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_logs}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
what="${1:-all}"
# Install where pip can; a machine without network (pip's editable install may want to fetch build
# tools) runs from the source tree, which fuser_moe/__init__.py maps onto the package path.
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1; then
    echo "gpu_check: pip install failed (see install.log); running from the source tree"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
ngpu=$(python3 -c 'import torch; print(torch.cuda.device_count())')
{ nvidia-smi; nvidia-smi topo -m; python3 -c 'import torch; print("torch", torch.__version__)'; } >"$OUT/machine.txt" 2>&1
echo "gpu_check: $ngpu GPU(s); logs in $OUT"
status=0
if [ "$what" = suite ] || [ "$what" = all ]; then
    bash tools/check_kernels.sh 2>&1 | tee "$OUT/kernels.log"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    FUSER_MOE_TEST_DEVICE=cuda timeout "${SUITE_TIMEOUT:-480}" python3 -m pytest -q -p no:cacheprovider \
        -o junit_family=xunit1 --junitxml="$OUT/pytest_cuda.xml" -rs tests ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/pytest_cuda.log" | tail -40
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    for backend in nccl cuda; do
        timeout 180 torchrun --nproc-per-node "$ngpu" -m fuser_moe demo --device cuda --backend "$backend" \
            --tokens 512 --hidden 1024 --ffn 2048 --experts 32 --topk 4 >"$OUT/demo_$backend.log" 2>&1
        rc=$?
        tail -8 "$OUT/demo_$backend.log"
        [ "$rc" -eq 0 ] || status=1
    done
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
    # SIGINT first: the driver then stops its ranks (spawned processes) before it exits.
    timeout -s INT -k 30 120 torchrun --nproc-per-node "$ngpu" -m fuser_moe bench --device cuda \
        --workloads decode --baselines all_to_all_single --warmup 2 --reps 5 --out "$OUT/bench_torchrun" \
        >"$OUT/bench_torchrun.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || { echo "gpu_check: bench under torchrun failed ($rc):"; tail -20 "$OUT/bench_torchrun.log"; status=1; }
    timeout -s INT -k 30 "${BENCH_TIMEOUT:-480}" python3 -m fuser_moe bench --device cuda --out "$OUT" \
        --warmup 5 --reps 30 --timeout 360 --symm-mem-timeout 150 2>"$OUT/bench_progress.log" >"$OUT/bench.txt"
    rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "gpu_check: bench exit $rc (a measurement failed its check or raised, or the run failed):"
        grep -v '^bench \[' "$OUT/bench_progress.log" | tail -25
        status=1
        # the tables of whatever was measured before a crash (the JSON is rewritten after every T)
        [ -s "$OUT/bench.txt" ] || python3 -m fuser_moe bench --plot-from "$OUT/bench.json" >"$OUT/bench.txt" 2>/dev/null
    fi
    cat "$OUT/bench.txt"
fi
if [ "$what" = soak ] || [ "$what" = all ]; then
    timeout -s INT -k 30 "${SOAK_TIMEOUT:-300}" python3 tools/soak.py --device cuda --world-size "$ngpu" \
        --rounds "${SOAK_ROUNDS:-1000}" --json "$OUT/soak.json" >"$OUT/soak.log" 2>&1
    rc=$?
    tail -30 "$OUT/soak.log"
    [ "$rc" -eq 0 ] || { echo "gpu_check: soak exit $rc"; status=1; }
fi
if [ "$what" = one-gpu ]; then
    bash tools/check_kernels.sh 2>&1 | tail -3
    FUSER_MOE_TEST_DEVICE=cuda timeout "${SUITE_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider -rs --maxfail=20 \
        tests/test_cuda_ll.py tests/test_plan.py tests/test_cuda_backend_gpu.py tests/test_fp8.py tests/test_autograd.py \
        tests/test_compile.py ${PYTEST_ARGS:-} >"$OUT/suite_one_gpu.log" 2>&1
    [ $? -eq 0 ] || status=1
    grep -E "passed|failed" "$OUT/suite_one_gpu.log" | tail -1; grep -E "^(FAILED|ERROR)" "$OUT/suite_one_gpu.log" | head -20
    timeout 120 torchrun --nproc-per-node 1 -m fuser_moe train --device cuda --plot "$OUT/train_loss.png" \
        >"$OUT/train.log" 2>&1 || { echo "gpu_check: train failed"; status=1; }
    tail -4 "$OUT/train.log"
    timeout -s INT -k 30 "${BENCH_TIMEOUT:-240}" python3 -m fuser_moe bench --device cuda --world-size 1 \
        --workloads standard,decode --sweep none --backends nccl,cuda --modes exact,graph --baselines all_to_all_single \
        --warmup 5 --reps 20 --out "$OUT/bench_w1" --no-plot >"$OUT/bench_w1.txt" 2>"$OUT/bench_w1.err" || status=1
    head -50 "$OUT/bench_w1.txt"
fi
if [ "$what" = mps ]; then
    mps_started=0
    mps_quit() {
        if [ "$mps_started" -eq 1 ]; then
            echo quit | nvidia-cuda-mps-control && echo "gpu_check: MPS daemon stopped"
            mps_started=0
        fi
    }
    trap mps_quit EXIT
    trap 'exit 130' INT TERM HUP  # through exit, so that the EXIT trap stops the daemon
    if ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
        echo "gpu_check: nvidia-cuda-mps-control not found: running without MPS (the ranks' kernels time-slice the GPU)"
    elif nvidia-cuda-mps-control -d >"$OUT/mps_start.log" 2>&1; then
        mps_started=1
        echo "gpu_check: MPS daemon started"
    else
        echo "gpu_check: the MPS daemon did not start (already running, or not allowed: see mps_start.log); running with what is there"
    fi
    for world in 4 2; do
        timeout -s INT -k 30 "${MPS_TIMEOUT:-240}" python3 -m fuser_moe bench --device cuda:0 --world-size "$world" \
            --workloads standard,decode --sweep none --backends cuda --modes exact,capacity,graph --baselines none \
            --warmup 5 --reps 20 --out "$OUT/bench_mps$world" --no-plot >"$OUT/bench_mps$world.txt" 2>"$OUT/bench_mps$world.err"
        rc=$?
        echo "== W=$world ranks on cuda:0, exit $rc"
        cat "$OUT/bench_mps$world.txt"
        [ "$rc" -eq 0 ] || { grep -v '^bench \[' "$OUT/bench_mps$world.err" | tail -20; status=1; }
    done
    if [ "$mps_started" -eq 1 ]; then
        echo get_server_list | nvidia-cuda-mps-control >"$OUT/mps.txt" 2>&1
        echo "gpu_check: MPS servers during the runs: $(tr '\n' ' ' <"$OUT/mps.txt")"
    fi
    mps_quit
fi
if [ "$what" = combine ]; then
    for variant in three stream; do
        flag=0; [ "$variant" = stream ] && flag=1
        FUSER_MOE_STREAM_COMBINE=$flag FUSER_MOE_TEST_DEVICE=cuda timeout "${SUITE_TIMEOUT:-240}" python3 -m pytest -q \
            -p no:cacheprovider -rfE --tb=short tests/test_conformance.py tests/test_cuda_backend_gpu.py \
            tests/test_combine_launch.py "tests/test_reliability.py::test_vanished_peer" ${PYTEST_ARGS:-} \
            >"$OUT/combine_tests_$variant.log" 2>&1
        [ $? -eq 0 ] || status=1
        echo "== $variant combine: $(grep -E 'passed|failed' "$OUT/combine_tests_$variant.log" | tail -1)"
        grep -E "^(FAILED|ERROR)" "$OUT/combine_tests_$variant.log" | head -10
        FUSER_MOE_STREAM_COMBINE=$flag timeout -s INT -k 30 120 python3 -m fuser_moe bench --device cuda --world-size 1 \
            --workloads standard --sweep none --backends cuda --modes graph --baselines none --no-fp8 --warmup 5 \
            --reps 30 --out "$OUT/combine_$variant" --no-plot >"$OUT/combine_$variant.txt" 2>"$OUT/combine_$variant.err" \
            || status=1
        grep -E "^(dispatch|combine) +cuda" "$OUT/combine_$variant.txt"
    done
fi
if [ "$what" = compare ]; then
    [ -n "${BEFORE:-}" ] && [ -d "$BEFORE" ] || { echo "gpu_check: compare needs BEFORE=<another checkout>"; exit 2; }
    for side in before after; do
        tree="$PWD"; [ "$side" = before ] && tree="$(cd "$BEFORE" && pwd)"
        (cd "$tree" && PYTHONPATH="$tree" timeout -s INT -k 30 "${COMPARE_TIMEOUT:-240}" python3 -m fuser_moe bench \
            --device cuda --workloads standard,decode --sweep none --baselines "${COMPARE_BASELINES:-none}" \
            --warmup 5 --reps "${COMPARE_REPS:-20}" --out "$OUT/compare_$side" --no-plot \
            2>"$OUT/compare_${side}_progress.log" >"$OUT/compare_$side.txt")
        rc=$?
        echo "== $side ($tree), exit $rc"
        cat "$OUT/compare_$side.txt"
        [ "$rc" -eq 0 ] || { grep -v '^bench \[' "$OUT/compare_${side}_progress.log" | tail -20; status=1; }
    done
fi
if [ "$what" = ll ]; then
    FUSER_MOE_TEST_DEVICE=cuda timeout "${LL_TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -rs \
        tests/test_cuda_ll.py tests/test_conformance.py tests/test_plan.py >"$OUT/ll_tests.log" 2>&1 || status=1
    tail -3 "$OUT/ll_tests.log"
    FUSER_MOE_TEST_DEVICE=cuda timeout "${LL_TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider -rs \
        tests/test_reliability.py -k "vanished and cuda" >"$OUT/ll_vanished.log" 2>&1 || status=1
    tail -3 "$OUT/ll_vanished.log"
    sides="after"; [ -n "${BEFORE:-}" ] && [ -d "$BEFORE" ] && sides="before after"
    ll_bench() {  # tree, world size, label
        (cd "$1" && PYTHONPATH="$1" timeout -s INT -k 20 "${LL_BENCH_TIMEOUT:-150}" python3 -m fuser_moe bench \
            --device cuda:0 --world-size "$2" --workloads decode --sweep none --backends cuda --modes graph \
            --baselines none --no-fp8 --warmup 5 --reps "${LL_REPS:-30}" --out "$OUT/ll_$3" --no-plot \
            >"$OUT/ll_$3.txt" 2>"$OUT/ll_$3.err") || { status=1; tail -5 "$OUT/ll_$3.err"; }
        echo "== $3 ($1)"; grep -E "^(dispatch|combine) +cuda" "$OUT/ll_$3.txt"
    }
    ll_rounds() {  # world size, label: LL_ROUNDS rounds, the sides alternated
        for round in $(seq "${LL_ROUNDS:-2}"); do
            for side in $sides; do
                tree="$PWD"; [ "$side" = before ] && tree="$(cd "$BEFORE" && pwd)"
                ll_bench "$tree" "$1" "$2_${side}_$round"
            done
        done
    }
    ll_rounds 1 w1
    python3 tools/ll_stamps.py >"$OUT/ll_stamps_w1.txt" 2>&1 || status=1
    python3 tools/ll_stamps.py --graph >"$OUT/ll_stamps_w1_graph.txt" 2>&1 || status=1
    python3 tools/ll_floor.py >"$OUT/ll_floor.txt" 2>&1 || status=1
    cat "$OUT/ll_floor.txt"
    ll_mps=0
    if command -v nvidia-cuda-mps-control >/dev/null 2>&1 && nvidia-cuda-mps-control -d >"$OUT/mps_start.log" 2>&1; then
        ll_mps=1
        trap '[ "$ll_mps" -eq 1 ] && echo quit | nvidia-cuda-mps-control' EXIT
    else
        echo "gpu_check: no MPS daemon (see mps_start.log): the 4 ranks time-slice cuda:0"
    fi
    ll_rounds 4 mps4
    python3 tools/ll_stamps.py --world-size 4 --shared >"$OUT/ll_stamps_w4.txt" 2>&1 || status=1
    python3 tools/ll_stamps.py --world-size 4 --shared --graph >"$OUT/ll_stamps_w4_graph.txt" 2>&1 || status=1
    python3 tools/ll_floor.py --world-size 4 >"$OUT/ll_floor_w4.txt" 2>&1 || status=1
    cat "$OUT/ll_floor_w4.txt"
    if [ "$ll_mps" -eq 1 ]; then
        echo quit | nvidia-cuda-mps-control && echo "gpu_check: MPS daemon stopped"
        ll_mps=0
    fi
fi
echo "gpu_check: exit $status"
exit "$status"
