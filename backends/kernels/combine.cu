// Combine's sending kernel of the CUDA backend (SPEC.md sections 4 and 8).
//
// One partial row per (source token, this expert rank): the float32 sum, in row order, of
// float32(w) * float32(y) over the rows of that token, cast to y's dtype, written straight into the
// source rank's receive buffer (a push over NVLink), together with the token's index there.
//
// Rounding is the contract's: every product and every sum is rounded on its own (__fmul_rn and
// __fadd_rn are never contracted into a fused multiply-add), the sum starts at +0.0, and the casts
// round to nearest even, as torch does on the CPU and the GPU.
//
// Compiles unchanged under nvcc and NVRTC: no system headers, fixed-width types by typedef.

typedef long long fm_i64;
typedef unsigned long long fm_u64;
typedef unsigned short fm_u16;

struct fm_bf16 { fm_u16 bits; };
struct fm_f16 { fm_u16 bits; };

__device__ __forceinline__ float fm_to_float(float v) { return v; }
__device__ __forceinline__ float fm_to_float(fm_bf16 v) { return __uint_as_float(static_cast<unsigned>(v.bits) << 16); }
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

// A 16-byte vector of elements: VEC = 16 / sizeof(T) of them.
template <typename T> struct fm_vec_traits { static constexpr int VEC = 16 / sizeof(T); };

union fm_vec16 {
    int4 raw;
    float f32[4];
    fm_u16 u16[8];
};

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

__device__ __forceinline__ bool fm_aligned16(const void* p) { return (reinterpret_cast<fm_u64>(p) & 15u) == 0u; }

//   y [rows, hidden], w [rows]: expert outputs and their weights
//   order [rows]: rows sorted by (src_rank, src_idx), stable, so a group's rows keep their row order
//   group_start [max_groups + 1]: the group g holds order[group_start[g] .. group_start[g + 1])
//   n_groups: device scalar, groups in use (groups past it are skipped: no host synchronisation)
//   dst_rank, dst_row, src_idx [max_groups]: where each group's partial row goes and its token index
//   part_ptrs, idx_ptrs [world]: every rank's partial-row buffer and token-index buffer
//   capacity: rows of those buffers; overflow [2]: (largest row needed, capacity), raised, never written past
template <typename T>
__device__ __forceinline__ void fm_combine_send(const T* __restrict__ y, fm_i64 hidden, const float* __restrict__ w,
                                                const fm_i64* __restrict__ order,
                                                const fm_i64* __restrict__ group_start,
                                                const fm_i64* __restrict__ n_groups, fm_i64 max_groups,
                                                const fm_i64* __restrict__ dst_rank,
                                                const fm_i64* __restrict__ dst_row,
                                                const fm_i64* __restrict__ src_idx,
                                                const fm_u64* __restrict__ part_ptrs,
                                                const fm_u64* __restrict__ idx_ptrs, fm_i64 capacity,
                                                fm_i64* overflow)
{
    // Rows are 16-byte aligned when y is and a row is a whole number of vectors.
    const bool vectorized = fm_aligned16(y) && (hidden % fm_vec_traits<T>::VEC) == 0;
    const fm_i64 groups = *n_groups < max_groups ? *n_groups : max_groups;
    for (fm_i64 g = blockIdx.x; g < groups; g += gridDim.x) {
        const fm_i64 row = dst_row[g];
        const fm_i64 peer = dst_rank[g];
        if (row < 0 || peer < 0) {
            continue;
        }
        if (row >= capacity) {
            if (threadIdx.x == 0) {
                atomicMax(&overflow[0], row + 1);
                overflow[1] = capacity;
            }
            continue;
        }
        const fm_i64 begin = group_start[g];
        const fm_i64 end = group_start[g + 1];
        T* out = reinterpret_cast<T*>(part_ptrs[peer]) + row * hidden;
        constexpr int VEC = fm_vec_traits<T>::VEC;
        if (vectorized && fm_aligned16(out)) {
            // 16-byte loads of every row of the group and one 16-byte store to the peer per vector.
            const fm_i64 n_vec = hidden / VEC;
            for (fm_i64 v = threadIdx.x; v < n_vec; v += blockDim.x) {
                float acc[VEC];
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    acc[k] = 0.0f;
                }
                for (fm_i64 i = begin; i < end; ++i) {
                    const fm_i64 r = order[i];
                    const float wr = w[r];
                    fm_vec16 in;
                    in.raw = reinterpret_cast<const int4*>(y + r * hidden)[v];
#pragma unroll
                    for (int k = 0; k < VEC; ++k) {
                        acc[k] = __fadd_rn(acc[k], __fmul_rn(wr, fm_lane_to_float<T>(in, k)));
                    }
                }
                fm_vec16 packed;
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    fm_lane_from_float<T>(packed, k, acc[k]);
                }
                reinterpret_cast<int4*>(out)[v] = packed.raw;
            }
            if (threadIdx.x == 0) {
                reinterpret_cast<fm_i64*>(idx_ptrs[peer])[row] = src_idx[g];
            }
            continue;
        }
        for (fm_i64 h = threadIdx.x; h < hidden; h += blockDim.x) {
            float acc = 0.0f;
            for (fm_i64 i = begin; i < end; ++i) {
                const fm_i64 r = order[i];
                acc = __fadd_rn(acc, __fmul_rn(w[r], fm_to_float(y[r * hidden + h])));
            }
            out[h] = fm_from_float<T>(acc);
        }
        if (threadIdx.x == 0) {
            reinterpret_cast<fm_i64*>(idx_ptrs[peer])[row] = src_idx[g];
        }
    }
}

#define FM_COMBINE_SEND(NAME, T)                                                                          \
    extern "C" __global__ void NAME(const T* y, fm_i64 hidden, const float* w, const fm_i64* order,       \
                                    const fm_i64* group_start, const fm_i64* n_groups, fm_i64 max_groups, \
                                    const fm_i64* dst_rank, const fm_i64* dst_row, const fm_i64* src_idx, \
                                    const fm_u64* part_ptrs, const fm_u64* idx_ptrs, fm_i64 capacity,     \
                                    fm_i64* overflow)                                                     \
    {                                                                                                     \
        fm_combine_send<T>(y, hidden, w, order, group_start, n_groups, max_groups, dst_rank, dst_row,     \
                           src_idx, part_ptrs, idx_ptrs, capacity, overflow);                             \
    }

FM_COMBINE_SEND(fuser_moe_combine_send_f32, float)
FM_COMBINE_SEND(fuser_moe_combine_send_bf16, fm_bf16)
FM_COMBINE_SEND(fuser_moe_combine_send_f16, fm_f16)

// The source's side: combined[t] = float32 sum of t's partial rows in ascending expert-rank order, cast.
//   partials [capacity, hidden]: this rank's receive buffer; slot [world, num_tokens]: the row of the
//   partial that rank e sent for token t, or -1 (then nothing is added, as in the contract).
template <typename T>
__device__ __forceinline__ void fm_combine_reduce(const T* __restrict__ partials, const fm_i64* __restrict__ slot,
                                                  fm_i64 num_tokens, int world, fm_i64 hidden, T* __restrict__ out)
{
    constexpr int VEC = fm_vec_traits<T>::VEC;
    const bool vectorized = fm_aligned16(partials) && fm_aligned16(out) && (hidden % VEC) == 0;
    for (fm_i64 t = blockIdx.x; t < num_tokens; t += gridDim.x) {
        if (vectorized) {
            const fm_i64 n_vec = hidden / VEC;
            for (fm_i64 v = threadIdx.x; v < n_vec; v += blockDim.x) {
                float acc[VEC];
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    acc[k] = 0.0f;
                }
                for (int e = 0; e < world; ++e) {
                    const fm_i64 r = slot[e * num_tokens + t];
                    if (r < 0) {
                        continue;
                    }
                    fm_vec16 in;
                    in.raw = reinterpret_cast<const int4*>(partials + r * hidden)[v];
#pragma unroll
                    for (int k = 0; k < VEC; ++k) {
                        acc[k] = __fadd_rn(acc[k], fm_lane_to_float<T>(in, k));
                    }
                }
                fm_vec16 packed;
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    fm_lane_from_float<T>(packed, k, acc[k]);
                }
                reinterpret_cast<int4*>(out + t * hidden)[v] = packed.raw;
            }
        } else {
            for (fm_i64 h = threadIdx.x; h < hidden; h += blockDim.x) {
                float acc = 0.0f;
                for (int e = 0; e < world; ++e) {
                    const fm_i64 r = slot[e * num_tokens + t];
                    if (r >= 0) {
                        acc = __fadd_rn(acc, fm_to_float(partials[r * hidden + h]));
                    }
                }
                out[t * hidden + h] = fm_from_float<T>(acc);
            }
        }
    }
}

#define FM_COMBINE_REDUCE(NAME, T)                                                                        \
    extern "C" __global__ void NAME(const T* partials, const fm_i64* slot, fm_i64 num_tokens, int world,  \
                                    fm_i64 hidden, T* out)                                                \
    {                                                                                                     \
        fm_combine_reduce<T>(partials, slot, num_tokens, world, hidden, out);                             \
    }

FM_COMBINE_REDUCE(fuser_moe_combine_reduce_f32, float)
FM_COMBINE_REDUCE(fuser_moe_combine_reduce_bf16, fm_bf16)
FM_COMBINE_REDUCE(fuser_moe_combine_reduce_f16, fm_f16)
