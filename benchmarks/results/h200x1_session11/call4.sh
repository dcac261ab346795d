#!/usr/bin/env bash
# Call 4: tools/gpu_check.sh one-gpu on the tree of commit cf86ac4 (the interleave): the CUDA backend's
# GPU tests with ranks sharing cuda:0, the training demo, the W=1 bench of the standard and decode
# workloads (both backends, exact and graph, fp8 rows); logs packed into one archive.
set -u
T0=$(date +%s)
L=$OUT/logs; mkdir -p "$L"
SUITE_TIMEOUT=260 BENCH_TIMEOUT=170 OUT=$L timeout -s INT -k 20 560 bash tools/gpu_check.sh one-gpu >"$L/console.txt" 2>&1
echo "gpu_check one-gpu rc=$? at $(( $(date +%s) - T0 )) s" >>"$L/console.txt"
cat "$L/console.txt"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
