#!/usr/bin/env bash
# Call 2 (written in session 12, to run with pending/notify_and_partial_batch.diff and
# pending/combine_halves.diff applied): notify over many blocks (a warp a column; plan advances the call
# counter), partial sums that load 8 rows before adding them, and the three-kernel combine without its
# first barrier (two halves of the partial buffers by the parity of a call counter).
# - the general path's GPU tests (ranks share cuda:0 for W > 1): the plan's stage tests (the new notify
#   test), the backend's GPU tests, conformance, the combine launch tests, the reliability cases;
# - W=1, T=4096, cuda, CUDA graph: the tree before the patches (.carry_before) and this one, alternated,
#   two rounds; then this one with FM_PARTIAL_BATCH=1 (what the batching gives); the kernel table.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
L=$OUT/logs; mkdir -p "$L"
FUSER_MOE_TEST_DEVICE=cuda timeout 330 python3 -m pytest -q -p no:cacheprovider -rs -x tests/test_plan.py \
    tests/test_cuda_backend_gpu.py tests/test_conformance.py tests/test_combine_launch.py tests/test_reliability.py \
    >"$L/tests.log" 2>&1; echo "tests rc=$? at $(( $(date +%s) - T0 )) s"; tail -2 "$L/tests.log"
grep -E "^(FAILED|ERROR)" "$L/tests.log" | head -10
b() {  # label, tree, then env assignments
    local label=$1 tree=$2; shift 2
    (cd "$tree" && env PYTHONPATH="$tree" "$@" timeout -s INT -k 10 100 python3 -m fuser_moe bench --device cuda:0 \
        --world-size 1 --workloads standard --sweep none --backends cuda --modes graph --baselines none --no-fp8 \
        --warmup 5 --reps 40 --out "$L/b_$label" --no-plot >"$L/b_$label.txt" 2>"$L/b_$label.err")
    echo "$label: $(grep -E '^(dispatch|combine) +cuda' "$L/b_$label.txt" | awk '{print $1, $4}' | tr '\n' ' ') [$(( $(date +%s) - T0 )) s]"
}
A=$PWD; B=$PWD/.carry_before
for r in 1 2; do b before$r "$B" X=1; b after$r "$A" X=1; done
b after_pb1 "$A" FUSER_MOE_KERNEL_DEFINES=FM_PARTIAL_BATCH=1
(cd "$A" && timeout 100 python3 tools/profile_backend.py --backends cuda --tokens 4096 --capacity 40960 --rows 12 \
    >"$L/profile_after.txt" 2>&1); grep -E "fuser_moe_" "$L/profile_after.txt" | awk '{print $1, $(NF-1), $NF}'
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
