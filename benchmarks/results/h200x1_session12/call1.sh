#!/usr/bin/env bash
# Call 1 (session 12): what has not run on a GPU yet, and where the time of T=4096 goes.
# - tests/test_cuda_ll.py -k many_experts: E = 2048 // W * W through the low-latency path, W = 1..4 on cuda:0;
# - under MPS, 4 ranks on cuda:0: tools/ll_stamps.py --shared eager and in a graph (the skew table), then the
#   decode workload under CUDA graphs, two rounds;
# - W=1, T=4096, cuda, CUDA graph: the default, the expansion's evict-first stores (FM_STREAM_STORES=1) and the
#   low-latency path forced (FUSER_MOE_LL_MAX_ROWS / _MAX_BYTES raised), alternated;
# - tools/profile_backend.py, cuda backend, W=1, T=4096, C=40960 (the bench's capacity): the kernel table.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
L=$OUT/logs; mkdir -p "$L"
FUSER_MOE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_cuda_ll.py -k many_experts \
    >"$L/tests.log" 2>&1; echo "tests rc=$? at $(( $(date +%s) - T0 )) s"; tail -3 "$L/tests.log"
b() {  # label, world, workload, then env assignments
    local label=$1 world=$2 wl=$3; shift 3
    env "$@" timeout -s INT -k 10 120 python3 -m fuser_moe bench --device cuda:0 --world-size "$world" --workloads "$wl" \
        --sweep none --backends cuda --modes graph --baselines none --no-fp8 --warmup 5 --reps 40 --out "$L/b_$label" \
        --no-plot >"$L/b_$label.txt" 2>"$L/b_$label.err"
    echo "$label: $(grep -E '^(dispatch|combine) +cuda' "$L/b_$label.txt" | awk '{print $1, $4}' | tr '\n' ' ') [$(( $(date +%s) - T0 )) s]"
}
nvidia-cuda-mps-control -d >"$L/mps_start.log" 2>&1 && mps=1 || mps=0
timeout 90 python3 tools/ll_stamps.py --world-size 4 --shared --reps 40 >"$L/st_w4.txt" 2>&1; echo "st_w4 rc=$?"
timeout 90 python3 tools/ll_stamps.py --world-size 4 --shared --graph --reps 40 >"$L/st_w4_graph.txt" 2>&1; echo "st_w4_graph rc=$?"
for r in 1 2; do b mps4_$r 4 decode; done
[ "$mps" = 1 ] && echo quit | nvidia-cuda-mps-control
LL="FUSER_MOE_LL_MAX_ROWS=65536 FUSER_MOE_LL_MAX_BYTES=8000000000"
for r in 1 2; do
    b t4096_default_$r 1 standard X=1
    b t4096_cs_$r 1 standard FUSER_MOE_KERNEL_DEFINES=FM_STREAM_STORES=1
    b t4096_ll_$r 1 standard $LL
done
timeout 120 python3 tools/profile_backend.py --backends cuda --tokens 4096 --capacity 40960 --rows 25 \
    >"$L/profile_t4096.txt" 2>&1; echo "profile rc=$? [$(( $(date +%s) - T0 )) s]"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
