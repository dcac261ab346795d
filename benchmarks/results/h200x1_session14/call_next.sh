#!/usr/bin/env bash
# For the next session with a GPU (written in session 14, not run yet). Run from the repository root
# with OUT set, pending/send_peer_groups.diff applied to the working tree (combine's send gives warps
# to the peers' groups only), and the commit before it beside it in .carry_before
# (`mkdir .carry_before && git archive HEAD | tar -x -C .carry_before`, before applying). Logs into
# logs.tgz, re-packed after each step, and every step only while the 600 s limit leaves room:
#   1. the general path's GPU tests (ranks share cuda:0 for W > 1), the reliability cases included;
#   2. W=1, T=4096, cuda, CUDA graph: before and this tree alternated, two rounds; the kernel table of each;
#   3. 4 ranks under MPS, T=4096 (the general path at W > 1, where send has rows to send): before and
#      this tree, one round each.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
L=$OUT/logs; mkdir -p "$L"
pack() { tar -czf "$OUT/logs.tgz" -C "$OUT" logs; }
left() { [ $(( ${LIMIT:-600} - $(el) )) -gt "$1" ]; }  # true while more than $1 s of the call are left
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$L/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$L/install.log" 2>&1
A=$PWD; B=$PWD/.carry_before
FUSER_MOE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider -rs tests/test_plan.py \
    tests/test_combine_launch.py tests/test_cuda_backend_gpu.py tests/test_conformance.py tests/test_reliability.py \
    >"$L/tests.log" 2>&1; echo "tests rc=$? at $(el) s"; tail -1 "$L/tests.log"
grep -E "^(FAILED|ERROR)" "$L/tests.log" | head -10; pack
b() {  # label, tree, world
    (cd "$2" && PYTHONPATH="$2" timeout -s INT -k 10 100 python3 -m fuser_moe bench --device cuda:0 --world-size "$3" \
        --workloads standard --sweep none --backends cuda --modes graph --baselines none --no-fp8 --warmup 5 \
        --reps 40 --out "$L/b_$1" --no-plot >"$L/b_$1.txt" 2>"$L/b_$1.err")
    echo "$1: $(grep -E '^(dispatch|combine) +cuda' "$L/b_$1.txt" | awk '{print $1, $4, $5}' | tr '\n' ' ') [$(el) s]"
}
prof() {  # label, tree
    (cd "$2" && PYTHONPATH="$2" timeout 90 python3 tools/profile_backend.py --backends cuda --tokens 4096 --capacity 40960 \
        --rows 12 >"$L/profile_$1.txt" 2>&1); echo "profile $1:"; grep -E "fuser_moe_" "$L/profile_$1.txt" | awk '{print $1, $(NF-1), $NF}'
}
for r in 1 2; do left 120 && b before$r "$B" 1; left 120 && b after$r "$A" 1; done; pack
left 150 && prof before "$B"; left 150 && prof after "$A"; pack
if left 150; then
    nvidia-cuda-mps-control -d >"$L/mps_start.log" 2>&1 && mps=1 || mps=0; echo "mps=$mps"
    left 110 && b mps4_before "$B" 4; left 110 && b mps4_after "$A" 4
    [ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control
fi
echo "done at $(el) s"; pack
