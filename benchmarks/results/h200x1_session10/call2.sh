#!/usr/bin/env bash
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
T0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1
L=$OUT/logs; mkdir -p "$L"
b() {  # label, tree, world, env...
    local label=$1 tree=$2 w=$3; shift 3
    (cd "$tree" && env PYTHONPATH="$tree" "$@" timeout -s INT -k 10 90 python3 -m fuser_moe bench --device cuda:0 \
        --world-size "$w" --workloads decode --sweep none --backends cuda --modes graph --baselines none --no-fp8 \
        --warmup 5 --reps 40 --out "$L/b_$label" --no-plot >"$L/b_$label.txt" 2>"$L/b_$label.err")
    echo "$label: $(grep -E '^(dispatch|combine) +cuda' "$L/b_$label.txt" | awk '{print $1, $4}' | tr '\n' ' ') [$(( $(date +%s) - T0 )) s]"
}
st() {  # label, tree, args...
    local label=$1 tree=$2; shift 2
    (cd "$tree" && env PYTHONPATH="$tree" timeout 60 python3 tools/ll_stamps.py "$@" >"$L/st_$label.txt" 2>&1)
    echo "== stamps $label"; grep -E "dispatch" "$L/st_$label.txt"
}
A=$PWD; B=$PWD/.carry_before
cp tools/ll_stamps.py "$B/tools/ll_stamps_graph.py"
st after_graph "$A" --graph
(cd "$B" && PYTHONPATH="$B" timeout 60 python3 tools/ll_stamps_graph.py --graph >"$L/st_before_graph.txt" 2>&1); echo "== stamps before_graph"; grep dispatch "$L/st_before_graph.txt"

b after "$A" 1 X=1
b before "$B" 1 X=1
b after_pdl0 "$A" 1 FUSER_MOE_PDL=0
b before_pdl0 "$B" 1 FUSER_MOE_PDL=0
b after_spread132 "$A" 1 FUSER_MOE_LL_SEND_SPREAD=132
b after2 "$A" 1 X=1
b before2 "$B" 1 X=1
(FUSER_MOE_LL_SEND_SPREAD=132 st after_graph_spread132 "$A" --graph)
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
