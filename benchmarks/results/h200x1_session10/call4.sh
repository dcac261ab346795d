#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
L=$OUT/logs; mkdir -p "$L"
b() {  # label, tree
    local label=$1 tree=$2
    (cd "$tree" && PYTHONPATH="$tree" timeout -s INT -k 10 90 python3 -m fuser_moe bench --device cuda:0 \
        --world-size 1 --workloads decode --sweep none --backends cuda --modes graph --baselines none --no-fp8 \
        --warmup 5 --reps 40 --out "$L/b_$label" --no-plot >"$L/b_$label.txt" 2>"$L/b_$label.err")
    echo "$label: $(grep -E '^(dispatch|combine) +cuda' "$L/b_$label.txt" | awk '{print $1, $4}' | tr '\n' ' ') [$(( $(date +%s) - T0 )) s]"
}
A=$PWD; B=$PWD/.carry_before
timeout 60 python3 tools/ll_stamps.py --graph >"$L/st_graph.txt" 2>&1
grep -E "dispatch recv: (start|offsets|rows|ticket)|arrival added|blocks" "$L/st_graph.txt" | grep -v combine
b before1 "$B"; b after1 "$A"; b before2 "$B"; b after2 "$A"
FUSER_MOE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider -rs -x tests/test_cuda_ll.py \
    tests/test_conformance.py -k "cuda" >"$L/tests.log" 2>&1; echo "tests rc=$? at $(( $(date +%s) - T0 )) s"; tail -1 "$L/tests.log"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
