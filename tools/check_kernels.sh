#!/usr/bin/env bash
# Compile-checks every CUDA kernel source of the backends (backends/**/*.cu) with nvcc, the way NVRTC
# builds them at run time (docs/contract.md section 8): sm_90, no fused multiply-add, C++17. Needs no GPU.
# Exits non-zero on a compile error; prints a skip message and exits 0 where nvcc is missing.
#
# Usage: tools/check_kernels.sh [ARCH]      (ARCH defaults to sm_90, or $FUSER_MOE_CHECK_ARCH)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
arch="${1:-${FUSER_MOE_CHECK_ARCH:-sm_90}}"

if ! command -v nvcc >/dev/null 2>&1; then
    echo "check_kernels: skipped, nvcc is not on PATH"
    exit 0
fi

mapfile -t sources < <(find "$root/backends" -name '*.cu' -type f | sort)
if [ "${#sources[@]}" -eq 0 ]; then
    echo "check_kernels: no .cu files under backends/"
    exit 0
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

failed=0
for src in "${sources[@]}"; do
    rel="${src#"$root"/}"
    cubin="$out/$(echo "$rel" | tr '/' '_').cubin"
    if nvcc -arch="$arch" -fmad=false -std=c++17 --cubin -o "$cubin" "$src"; then
        echo "check_kernels: ok     $rel ($arch)"
    else
        echo "check_kernels: FAILED $rel ($arch)"
        failed=1
    fi
done
exit "$failed"
