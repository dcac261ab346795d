#!/usr/bin/env bash
# Experiment call (session 10): LL dispatch receive fan-out, A/B against .carry_before, knobs, stamps, floors.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
nvidia-smi >"$OUT/machine.txt" 2>&1
FUSER_MOE_TEST_DEVICE=cuda timeout 230 python3 -m pytest -q -p no:cacheprovider -rs -x tests/test_cuda_ll.py \
    tests/test_conformance.py -k "cuda" >"$OUT/tests.log" 2>&1; echo "tests rc=$? at $(( $(date +%s) - T0 )) s"; tail -2 "$OUT/tests.log"
FUSER_MOE_TEST_DEVICE=cuda timeout 100 python3 -m pytest -q -p no:cacheprovider -rs tests/test_reliability.py \
    -k "vanished and cuda" >"$OUT/vanished.log" 2>&1; echo "vanished rc=$?"; tail -1 "$OUT/vanished.log"
b() {  # label, tree, world, env...
    local label=$1 tree=$2 w=$3; shift 3
    (cd "$tree" && env PYTHONPATH="$tree" "$@" timeout -s INT -k 10 90 python3 -m fuser_moe bench --device cuda:0 \
        --world-size "$w" --workloads decode --sweep none --backends cuda --modes graph --baselines none --no-fp8 \
        --warmup 5 --reps 40 --out "$OUT/b_$label" --no-plot >"$OUT/b_$label.txt" 2>"$OUT/b_$label.err")
    echo "$label: $(grep -E '^(dispatch|combine) +cuda' "$OUT/b_$label.txt" | awk '{print $1, $4}' | tr '\n' ' ') [$(( $(date +%s) - T0 )) s]"
}
A=$PWD; B=$PWD/.carry_before
for r in 1 2; do
    b before$r "$B" 1 X=1
    b after$r "$A" 1 X=1
done
timeout 60 python3 tools/ll_stamps.py >"$OUT/stamps_after.txt" 2>&1; cat "$OUT/stamps_after.txt"
timeout 60 python3 tools/ll_floor.py >"$OUT/floor.txt" 2>&1; cat "$OUT/floor.txt"
if nvidia-cuda-mps-control -d >"$OUT/mps_start.log" 2>&1; then
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
    b mps4_before "$B" 4 X=1
    b mps4_after "$A" 4 X=1
    echo quit | nvidia-cuda-mps-control; trap - EXIT
fi
left=$(( 560 - ($(date +%s) - T0) ))
if [ "$left" -gt 40 ]; then
    timeout $left ncu --clock-control none --kernel-name regex:ll_dispatch --launch-skip 6 --launch-count 2 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section LaunchStats --section Occupancy \
        python3 tools/ll_stamps.py --reps 4 >"$OUT/ncu.txt" 2>&1; echo "ncu rc=$?"
    grep -E "Duration|DRAM Through|Memory Through|L2 Cache Through|Registers Per|Achieved Occ|ll_dispatch" "$OUT/ncu.txt" | head -30
fi
