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

// ------------------------------------------------------------------ float conversions, 16-byte vectors
// Casts round to nearest even; a vector of 16 bytes holds 4 float32 or 8 bf16 / f16 lanes.
struct fm_bf16 { fm_u16 bits; };
struct fm_f16 { fm_u16 bits; };

__device__ __forceinline__ float fm_to_float(float v) { return v; }
__device__ __forceinline__ float fm_to_float(fm_bf16 v) { return __uint_as_float(static_cast<fm_u32>(v.bits) << 16); }
__device__ __forceinline__ float fm_to_float(fm_f16 v)
{
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

template <typename T> __device__ __forceinline__ T fm_from_float(float f);
template <> __device__ __forceinline__ float fm_from_float<float>(float f) { return f; }
template <> __device__ __forceinline__ fm_bf16 fm_from_float<fm_bf16>(float f)
{
    fm_bf16 r;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}
template <> __device__ __forceinline__ fm_f16 fm_from_float<fm_f16>(float f)
{
    fm_f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
    return r;
}

union fm_vec16 {
    int4 raw;
    float f32[4];
    fm_u16 u16[8];
};

template <typename T> struct fm_vec_traits { static constexpr int VEC = 16 / sizeof(T); };

template <typename T> __device__ __forceinline__ float fm_lane_to_float(const fm_vec16& v, int k);
template <> __device__ __forceinline__ float fm_lane_to_float<float>(const fm_vec16& v, int k) { return v.f32[k]; }
template <> __device__ __forceinline__ float fm_lane_to_float<fm_bf16>(const fm_vec16& v, int k)
{
    return fm_to_float(fm_bf16{v.u16[k]});
}
template <> __device__ __forceinline__ float fm_lane_to_float<fm_f16>(const fm_vec16& v, int k)
{
    return fm_to_float(fm_f16{v.u16[k]});
}

template <typename T> __device__ __forceinline__ void fm_lane_from_float(fm_vec16& v, int k, float f);
template <> __device__ __forceinline__ void fm_lane_from_float<float>(fm_vec16& v, int k, float f) { v.f32[k] = f; }
template <> __device__ __forceinline__ void fm_lane_from_float<fm_bf16>(fm_vec16& v, int k, float f)
{
    v.u16[k] = fm_from_float<fm_bf16>(f).bits;
}
template <> __device__ __forceinline__ void fm_lane_from_float<fm_f16>(fm_vec16& v, int k, float f)
{
    v.u16[k] = fm_from_float<fm_f16>(f).bits;
}

// The expert of slot (t, k), or -1 for an empty slot or an id outside [0, E) (never indexes out of range).
template <typename I>
__device__ __forceinline__ fm_i64 fm_expert(const I* topk_idx, fm_i64 t, int top_k, int k, fm_i64 num_experts)
{
    const fm_i64 e = static_cast<fm_i64>(topk_idx[t * top_k + k]);
    return (e >= 0 && e < num_experts) ? e : -1;
}

// ------------------------------------------------------------------ cross-GPU flags
// System-scope acquire / release (peers are other GPUs) and the nanosecond clock the timeouts read.
__device__ __forceinline__ fm_i64 fm_load_acquire_sys(const fm_i64* address)
{
    fm_i64 value;
    asm volatile("ld.acquire.sys.global.b64 %0, [%1];" : "=l"(value) : "l"(address) : "memory");
    return value;
}

__device__ __forceinline__ void fm_store_release_sys(fm_i64* address, fm_i64 value)
{
    asm volatile("st.release.sys.global.b64 [%0], %1;" : : "l"(address), "l"(value) : "memory");
}

// Adds `value` to a peer's word with release semantics (a reduction: nothing comes back to wait for).
__device__ __forceinline__ void fm_red_add_release_sys(fm_i64* address, fm_i64 value)
{
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" : : "l"(address), "l"(value) : "memory");
}

__device__ __forceinline__ fm_u64 fm_globaltimer_ns()
{
    fm_u64 now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    return now;
}

// ------------------------------------------------------------------ programmatic dependent launch
// Lets the next kernel of the stream start (when it was launched with programmatic stream serialisation,
// backends/transport/nvrtc.py `overlap_previous`) once every block of this one has called this or ended.
// That kernel must order itself after this one by flags of its own. A no-op before compute capability 9.0
// and when the next kernel was launched normally.
__device__ __forceinline__ void fm_launch_dependents()
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
