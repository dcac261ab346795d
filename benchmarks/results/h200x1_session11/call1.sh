#!/usr/bin/env bash
# Call 1: the low-latency path's checks and its decode timings, the tree before (.carry_before, commit
# 23b4dfd) against this one, alternated (tools/gpu_check.sh ll), logs packed into one archive.
set -u
T0=$(date +%s)
L=$OUT/logs; mkdir -p "$L"
BEFORE=$PWD/.carry_before LL_ROUNDS=2 LL_REPS=40 OUT=$L timeout -s INT -k 20 540 bash tools/gpu_check.sh ll >"$L/console.txt" 2>&1
echo "gpu_check ll rc=$? at $(( $(date +%s) - T0 )) s" >>"$L/console.txt"
cat "$L/console.txt"
tar -czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
