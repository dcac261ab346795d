#!/usr/bin/env bash
# Session 14's one call (a machine was hard to get, so calls 2 and 3 of session 12 run as one, each
# step only while the 600 s limit leaves room). Run from the repository root with OUT set, the working
# tree holding the notify/partial-batch and combine-halves patches, and beside it:
#   .carry_before  the commit before them (HEAD);  .carry_gate  this tree plus the GPU start gate.
# Steps (logs into logs.tgz, re-packed after each one so that a cut-off call still brings them back):
#   1. the general path's GPU tests with this tree (ranks share cuda:0 for W > 1);
#   2. W=1, T=4096, cuda, CUDA graph: before and this tree alternated, two rounds; the kernel table of
#      each; then FM_PARTIAL_BATCH=1 (what the batched partial sums give);
#   3. the gate's tests (.carry_gate), then under MPS, 4 ranks on cuda:0, T=128 decode: this tree
#      (host-clock start) and .carry_gate (gate) alternated, and tools/ll_floor.py --world-size 4.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=$OUT/logs; mkdir -p "$L"
pack() { tar -czf "$OUT/logs.tgz" -C "$OUT" logs; }
left() { [ $(( ${LIMIT:-600} - $(el) )) -gt "$1" ]; }  # true while more than $1 s of the call (LIMIT, default 600 s) are left
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$L/install.log" 2>&1
A=$PWD; B=$PWD/.carry_before; G=$PWD/.carry_gate
FUSER_MOE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider -rs -x tests/test_plan.py \
    tests/test_cuda_backend_gpu.py tests/test_conformance.py tests/test_combine_launch.py tests/test_reliability.py \
    >"$L/tests.log" 2>&1; echo "tests rc=$? at $(el) s"; tail -2 "$L/tests.log"
grep -E "^(FAILED|ERROR)" "$L/tests.log" | head -10; pack
b() {  # label, tree, world, workload, then env assignments
    local label=$1 tree=$2 w=$3 wl=$4; shift 4
    (cd "$tree" && env PYTHONPATH="$tree" "$@" timeout -s INT -k 10 100 python3 -m fuser_moe bench --device cuda:0 \
        --world-size "$w" --workloads "$wl" --sweep none --backends cuda --modes graph --baselines none --no-fp8 \
        --warmup 5 --reps 40 --out "$L/b_$label" --no-plot >"$L/b_$label.txt" 2>"$L/b_$label.err")
    echo "$label: $(grep -E '^(dispatch|combine) +cuda' "$L/b_$label.txt" | awk '{print $1, $4, $5}' | tr '\n' ' ') [$(el) s]"
}
prof() {  # label, tree
    (cd "$2" && PYTHONPATH="$2" timeout 90 python3 tools/profile_backend.py --backends cuda --tokens 4096 --capacity 40960 \
        --rows 12 >"$L/profile_$1.txt" 2>&1); echo "profile $1:"; grep -E "fuser_moe_" "$L/profile_$1.txt" | awk '{print $1, $(NF-1), $NF}'
}
for r in 1 2; do left 150 && b before$r "$B" 1 standard X=1; left 150 && b after$r "$A" 1 standard X=1; done; pack
left 200 && prof before "$B"; left 200 && prof after "$A"; pack
left 230 && b after_pb1 "$A" 1 standard FUSER_MOE_KERNEL_DEFINES=FM_PARTIAL_BATCH=1; pack
if left 200; then
    (cd "$G" && FUSER_MOE_TEST_DEVICE=cuda PYTHONPATH="$G" timeout 120 python3 -m pytest -q -p no:cacheprovider -rs \
        tests/test_bench_shared_gpu.py >"$L/tests_gate.log" 2>&1); echo "gate tests rc=$? at $(el) s"; tail -2 "$L/tests_gate.log"
    nvidia-cuda-mps-control -d >"$L/mps_start.log" 2>&1 && mps=1 || mps=0; echo "mps=$mps"
    for r in 1 2; do left 90 && b mps4_host$r "$A" 4 decode; left 90 && b mps4_gate$r "$G" 4 decode; done
    left 70 && { (cd "$G" && timeout 60 python3 tools/ll_floor.py --world-size 4 >"$L/floor_w4.txt" 2>&1); tail -15 "$L/floor_w4.txt"; }
    [ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control
fi
echo "done at $(el) s"; pack
