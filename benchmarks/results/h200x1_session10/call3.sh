#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
L=$OUT/logs; mkdir -p "$L"
b() {  # label, env...
    local label=$1; shift
    env "$@" timeout -s INT -k 10 90 python3 -m fuser_moe bench --device cuda:0 \
        --world-size 1 --workloads decode --sweep none --backends cuda --modes graph --baselines none --no-fp8 \
        --warmup 5 --reps 40 --out "$L/b_$label" --no-plot >"$L/b_$label.txt" 2>"$L/b_$label.err"
    echo "$label: $(grep -E '^(dispatch|combine) +cuda' "$L/b_$label.txt" | awk '{print $1, $4}' | tr '\n' ' ') [$(( $(date +%s) - T0 )) s]"
}
st() {  # label, env...
    local label=$1; shift
    env "$@" timeout 60 python3 tools/ll_stamps.py --graph >"$L/st_$label.txt" 2>&1
    echo "== stamps $label"; grep -E "dispatch recv: (start|offsets|rows|ticket)|arrival added|blocks" "$L/st_$label.txt" | grep -v combine
}
st default X=1
st recv32 FUSER_MOE_LL_RECV_SPREAD=32
st recv128 FUSER_MOE_LL_RECV_SPREAD=128
st spread132 FUSER_MOE_LL_SEND_SPREAD=132
b default X=1
b recv32 FUSER_MOE_LL_RECV_SPREAD=32
b recv128 FUSER_MOE_LL_RECV_SPREAD=128
b recv16 FUSER_MOE_LL_RECV_SPREAD=16
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
