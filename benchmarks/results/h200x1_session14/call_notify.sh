#!/usr/bin/env bash
# Session 14's second call: the tree with the notify patch alone (the combine halves taken out again):
# the plan's stage tests, the reliability cases (ranks share cuda:0) and the combine launch tests, then
# W=1 T=4096 under CUDA graphs and the kernel table. Logs into logs.tgz.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s); L=$OUT/logs; mkdir -p "$L"
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$L/gpu.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$L/install.log" 2>&1
FUSER_MOE_TEST_DEVICE=cuda timeout 170 python3 -m pytest -q -p no:cacheprovider -rs tests/test_plan.py \
    tests/test_reliability.py tests/test_combine_launch.py >"$L/tests.log" 2>&1
echo "tests rc=$? at $(( $(date +%s) - T0 )) s"; tail -1 "$L/tests.log"; grep -E "^(FAILED|ERROR)" "$L/tests.log" | head
timeout -s INT -k 10 60 python3 -m fuser_moe bench --device cuda:0 --world-size 1 --workloads standard --sweep none \
    --backends cuda --modes graph --baselines none --no-fp8 --warmup 5 --reps 40 --out "$L/b_notify" --no-plot \
    >"$L/b_notify.txt" 2>"$L/b_notify.err"; grep -E '^(dispatch|combine) +cuda' "$L/b_notify.txt" | awk '{print $1, $4, $5}'
timeout 40 python3 tools/profile_backend.py --backends cuda --tokens 4096 --capacity 40960 --rows 12 >"$L/profile.txt" 2>&1
grep -E "fuser_moe_" "$L/profile.txt" | awk '{print $1, $(NF-1), $NF}'; echo "done at $(( $(date +%s) - T0 )) s"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
