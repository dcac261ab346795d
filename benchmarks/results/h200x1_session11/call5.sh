#!/usr/bin/env bash
# Call 5: the low-latency path's kernels opt in to more than 48 KiB of dynamic shared memory (E=2048
# now takes the path): tests/test_cuda_ll.py on cuda:0 (ranks sharing it for W = 2, 3, 4), then the
# decode workload under CUDA graphs at W=1 (no change expected: its tables fit in 48 KiB).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
L=$OUT/logs; mkdir -p "$L"
FUSER_MOE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_ll.py \
    >"$L/tests.log" 2>&1; echo "tests rc=$? at $(( $(date +%s) - T0 )) s"; tail -3 "$L/tests.log"
grep -E "^(FAILED|ERROR)|Error" "$L/tests.log" | head -10
timeout -s INT -k 10 60 python3 -m fuser_moe bench --device cuda:0 --world-size 1 --workloads decode --sweep none \
    --backends cuda --modes graph --baselines none --no-fp8 --warmup 5 --reps 40 --out "$L/b_w1" --no-plot \
    >"$L/b_w1.txt" 2>"$L/b_w1.err"
grep -E '^(dispatch|combine) +cuda' "$L/b_w1.txt"; echo "[$(( $(date +%s) - T0 )) s]"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
