// Device helpers that every kernel file of the backends includes (kernels/*.cu).
//
// Fixed-width types by typedef and no system headers, so that every file compiles unchanged under
// nvcc (tools/check_kernels.sh) and NVRTC (backends/transport/nvrtc.py passes this folder as the
// include path, and a change here changes every kernel's cache key: the headers beside a source are
// hashed with it).
#pragma once

typedef long long fm_i64;
typedef unsigned long long fm_u64;
typedef unsigned int fm_u32;
typedef unsigned short fm_u16;

constexpr int FM_WARP = 32;

__device__ __forceinline__ bool fm_aligned16(const void* p) { return (reinterpret_cast<fm_u64>(p) & 15u) == 0u; }

// One warp copies one row of `row_bytes` from src to dst (16-byte vectors when both are aligned).
__device__ __forceinline__ void fm_warp_copy_row(unsigned char* dst, const unsigned char* src, fm_i64 row_bytes,
                                                 int lane)
{
    const fm_u64 alignment = reinterpret_cast<fm_u64>(dst) | reinterpret_cast<fm_u64>(src)
                             | static_cast<fm_u64>(row_bytes);
    if ((alignment & 15u) == 0u) {
        const int4* src4 = reinterpret_cast<const int4*>(src);
        int4* dst4 = reinterpret_cast<int4*>(dst);
        const fm_i64 n4 = row_bytes >> 4;
        fm_i64 k = lane;
        // Four loads in flight per lane before the stores: remote stores are slow to retire.
        for (; k + 3 * FM_WARP < n4; k += 4 * FM_WARP) {
            const int4 a = src4[k];
            const int4 b = src4[k + FM_WARP];
            const int4 c = src4[k + 2 * FM_WARP];
            const int4 d = src4[k + 3 * FM_WARP];
            dst4[k] = a;
            dst4[k + FM_WARP] = b;
            dst4[k + 2 * FM_WARP] = c;
            dst4[k + 3 * FM_WARP] = d;
        }
        for (; k < n4; k += FM_WARP) {
            dst4[k] = src4[k];
        }
    } else if ((alignment & 3u) == 0u) {
        const fm_u32* src1 = reinterpret_cast<const fm_u32*>(src);
        fm_u32* dst1 = reinterpret_cast<fm_u32*>(dst);
        for (fm_i64 k = lane; k < (row_bytes >> 2); k += FM_WARP) {
            dst1[k] = src1[k];
        }
    } else {
        for (fm_i64 k = lane; k < row_bytes; k += FM_WARP) {
            dst[k] = src[k];
        }
    }
}
