#!/usr/bin/env bash
# Call 2: the interleave with the receive grid sized as before (64 blocks at W=1): decode under CUDA
# graphs, W=1 then 4 ranks under MPS, the tree before (.carry_before, 23b4dfd) and this one alternated;
# the graph stamps; the low-latency tests (ranks share cuda:0 for W > 1).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
L=$OUT/logs; mkdir -p "$L"
b() {  # label, tree, world
    (cd "$2" && PYTHONPATH="$2" timeout -s INT -k 10 120 python3 -m fuser_moe bench --device cuda:0 \
        --world-size "$3" --workloads decode --sweep none --backends cuda --modes graph --baselines none --no-fp8 \
        --warmup 5 --reps 40 --out "$L/b_$1" --no-plot >"$L/b_$1.txt" 2>"$L/b_$1.err")
    echo "$1: $(grep -E '^(dispatch|combine) +cuda' "$L/b_$1.txt" | awk '{print $1, $4}' | tr '\n' ' ') [$(( $(date +%s) - T0 )) s]"
}
A=$PWD; B=$PWD/.carry_before
for r in 1 2 3; do b w1_before$r "$B" 1; b w1_after$r "$A" 1; done
timeout 60 python3 tools/ll_stamps.py --graph >"$L/st_graph.txt" 2>&1
grep -E "dispatch recv: (start|offsets|rows|ticket)|blocks" "$L/st_graph.txt"
nvidia-cuda-mps-control -d >"$L/mps_start.log" 2>&1 && mps=1 || mps=0
for r in 1 2; do b mps4_before$r "$B" 4; b mps4_after$r "$A" 4; done
[ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control
FUSER_MOE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -x tests/test_cuda_ll.py \
    >"$L/tests.log" 2>&1; echo "tests rc=$? at $(( $(date +%s) - T0 )) s"; tail -1 "$L/tests.log"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
