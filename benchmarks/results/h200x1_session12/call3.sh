#!/usr/bin/env bash
# Call 3 (written in session 12, to run with pending/gpu_start_gate.diff applied): ranks sharing cuda:0
# start each timed repetition at one agreed moment of the GPU's %globaltimer (a gate kernel).
# - the gate's test and the shared-GPU bench tests (2 ranks on cuda:0);
# - under MPS, 4 ranks on cuda:0: tools/ll_stamps.py --shared --graph (the skew table that is left), then
#   the decode workload under CUDA graphs, the tree before the patch (.carry_before: host-clock start) and
#   this one (gate) alternated, two rounds each; then tools/ll_floor.py --world-size 4: each rank's share of
#   the HBM traffic, all four at once, against the backend in the same run.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
L=$OUT/logs; mkdir -p "$L"
FUSER_MOE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -p no:cacheprovider -rs tests/test_bench_shared_gpu.py \
    >"$L/tests.log" 2>&1; echo "tests rc=$? at $(( $(date +%s) - T0 )) s"; tail -2 "$L/tests.log"
grep -E "^(FAILED|ERROR)" "$L/tests.log" | head -10
b() {  # label, tree
    (cd "$2" && PYTHONPATH="$2" timeout -s INT -k 10 120 python3 -m fuser_moe bench --device cuda:0 --world-size 4 \
        --workloads decode --sweep none --backends cuda --modes graph --baselines none --no-fp8 --warmup 5 --reps 40 \
        --out "$L/b_$1" --no-plot >"$L/b_$1.txt" 2>"$L/b_$1.err")
    echo "$1: $(grep -E '^(dispatch|combine) +cuda' "$L/b_$1.txt" | awk '{print $1, $4, $5}' | tr '\n' ' ') [$(( $(date +%s) - T0 )) s]"
}
A=$PWD; B=$PWD/.carry_before
nvidia-cuda-mps-control -d >"$L/mps_start.log" 2>&1 && mps=1 || mps=0
timeout 90 python3 tools/ll_stamps.py --world-size 4 --shared --graph --reps 40 >"$L/st_w4_graph.txt" 2>&1
echo "st_w4_graph rc=$?"; tail -6 "$L/st_w4_graph.txt"
for r in 1 2; do b mps4_before$r "$B"; b mps4_after$r "$A"; done
timeout 120 python3 tools/ll_floor.py --world-size 4 >"$L/floor_w4.txt" 2>&1; echo "floor_w4 rc=$?"
cat "$L/floor_w4.txt"
[ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
