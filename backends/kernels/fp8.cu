// FP8 kernels: e4m3fn quantisation with one float32 scale per 128 columns, its inverse, and the packing
// of (fp8 row, scales) into one opaque payload row for MoeDispatch (docs/contract.md section 12).
//
// Rounding points, the same as the torch formulation in backends/fp8.py (the oracle):
//   per row and block of 128 columns (the last block possibly shorter)
//     amax  = max |float32(x)|                        (NaN propagates, as torch.amax)
//     scale = amax / 448, rounded to float32; scale = 1 where it is 0 (a zero block, or amax so small
//             that amax / 448 underflows)
//     q     = e4m3fn(clamp(float32(x) / scale, -448, 448)), the division rounded to float32, the
//             conversion rounded to nearest even (ties to the even code); clamp keeps a NaN a NaN
//   dequantisation: cast(float32(q) * scale), the product rounded to float32, the cast to nearest even.
// The conversions are done in integer arithmetic (no cvt.e4m3 instruction), so every architecture and
// the host give the same bits; fp8_e4m3_from_float and fp8_e4m3_to_float are __host__ __device__ so a
// host program can test them exhaustively.
//
// Layout of a packed payload row (bytes), written where the pointer arithmetic is:
//   [0, H)                 the fp8 row
//   [H, scale_offset)      zero (scale_offset = H rounded up to 16)
//   [scale_offset, +4*nb)  the nb = ceil(H / 128) float32 scales
//   [.., row_bytes)        zero (row_bytes = scale_offset + 4*nb rounded up to 16)
//
// Compiles unchanged under nvcc (tools/check_kernels.sh) and NVRTC: no system headers.

typedef long long f8_i64;
typedef unsigned long long f8_u64;
typedef unsigned int f8_u32;
typedef unsigned short f8_u16;
typedef unsigned char f8_u8;

constexpr int F8_WARP = 32;
constexpr int F8_BLOCK_COLS = 128;  // columns per scale; a warp handles one block, 4 columns a lane
constexpr float F8_MAX = 448.0f;

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define F8_DEVICE_CODE 1
#include "fm_device.cuh"  // the helpers every kernel file shares (only under a CUDA compiler: the host
                          // test of the conversions compiles this file without it)
#endif

#ifdef F8_DEVICE_CODE
#define F8_HD __host__ __device__ __forceinline__
#else
#define F8_HD inline
#endif

// ------------------------------------------------------------------------------------------ scalars
F8_HD f8_u32 f8_bits(float f)
{
    union { float f; f8_u32 u; } v;
    v.f = f;
    return v.u;
}

F8_HD float f8_float(f8_u32 u)
{
    union { float f; f8_u32 u; } v;
    v.u = u;
    return v.f;
}

F8_HD float f8_add_rn(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}

// float32 -> e4m3fn, round to nearest even. |f| must be at most 448 or f a NaN (the caller clamps).
F8_HD f8_u8 fp8_e4m3_from_float(float f)
{
    const f8_u32 bits = f8_bits(f);
    const f8_u8 sign = static_cast<f8_u8>((bits >> 24) & 0x80u);
    const f8_u32 magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) {
        return static_cast<f8_u8>(sign | 0x7fu);  // NaN
    }
    if (magnitude >= (121u << 23)) {  // normal in e4m3 (>= 2^-6): rebias 127 -> 7, keep 3 of 23 mantissa bits
        const f8_u32 round_bias = 0x7ffffu + ((magnitude >> 20) & 1u);
        return static_cast<f8_u8>(sign | ((magnitude + round_bias - (120u << 23)) >> 20));
    }
    // Subnormal in e4m3 (steps of 2^-9): adding 2^14, whose float32 ulp is 2^-9, rounds to a multiple of
    // 2^-9 to nearest even; what is left above 2^14 is the code (8 = the smallest normal, 2^-6).
    const float shifted = f8_add_rn(f8_float(magnitude), f8_float(141u << 23));
    return static_cast<f8_u8>(sign | (f8_bits(shifted) - (141u << 23)));
}

// e4m3fn -> float32 (exact).
F8_HD float fp8_e4m3_to_float(f8_u8 code)
{
    const f8_u32 sign = static_cast<f8_u32>(code & 0x80u) << 24;
    const f8_u32 exponent = (code >> 3) & 0xfu;
    const f8_u32 mantissa = code & 0x7u;
    if ((code & 0x7fu) == 0x7fu) {
        return f8_float(sign | 0x7fc00000u);  // NaN
    }
    if (exponent == 0) {  // subnormal: mantissa * 2^-9, exact in float32
        return f8_float(sign | f8_bits(static_cast<float>(mantissa) * 0.001953125f));
    }
    return f8_float(sign | ((exponent + 120u) << 23) | (mantissa << 20));
}

#ifdef F8_DEVICE_CODE
// ------------------------------------------------------------------------------------------ device helpers
// Float conversions and the bf16 / f16 types are fm_device.cuh's (fm_bf16, fm_to_float, fm_from_float).

// Four values of T in one aligned word (16 bytes for float, 8 for 16-bit types).
template <typename T> union f8_quad {
    float4 f4;
    uint2 u2;
    T lanes[4];
};

// max that propagates a NaN (as torch.amax does)
__device__ __forceinline__ float f8_max_nan(float a, float b)
{
    if (a != a) return a;
    if (b != b) return b;
    return b > a ? b : a;
}

__device__ __forceinline__ float f8_clamp(float v)
{
    if (v != v) return v;
    return v < -F8_MAX ? -F8_MAX : (v > F8_MAX ? F8_MAX : v);
}

__device__ __forceinline__ int f8_total_warps() { return static_cast<int>((gridDim.x * blockDim.x) / F8_WARP); }
__device__ __forceinline__ int f8_warp_id() { return static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) / F8_WARP); }

// ------------------------------------------------------------------------------------------ quantize
// A warp per (row, block of 128 columns); lane l holds columns 4l..4l+3 of the block.
// x: [rows, hidden] with row stride x_stride elements (columns contiguous).
// q: fp8 bytes, row stride q_stride bytes; scales: float32, row stride s_stride floats.
// The row's last block's warp also zeroes the byte ranges [zero_a, zero_b) and [zero_c, zero_d) of q's
// row (the padding of a packed payload row; empty ranges otherwise).
template <typename T>
__device__ __forceinline__ void fp8_quantize(const T* __restrict__ x, f8_i64 x_stride, f8_i64 rows, f8_i64 hidden,
                                             f8_u8* __restrict__ q, f8_i64 q_stride, float* __restrict__ scales,
                                             f8_i64 s_stride, f8_i64 zero_a, f8_i64 zero_b, f8_i64 zero_c,
                                             f8_i64 zero_d)
{
    const int lane = threadIdx.x % F8_WARP;
    const f8_i64 blocks = (hidden + F8_BLOCK_COLS - 1) / F8_BLOCK_COLS;
    const f8_i64 items = rows * blocks;
    for (f8_i64 item = f8_warp_id(); item < items; item += f8_total_warps()) {
        const f8_i64 row = item / blocks;
        const f8_i64 block = item - row * blocks;
        const f8_i64 col = block * F8_BLOCK_COLS + 4 * lane;
        const T* src = x + row * x_stride + col;
        float v[4];
        const bool whole = col + 4 <= hidden;
        if (whole && (reinterpret_cast<f8_u64>(src) & (4 * sizeof(T) - 1)) == 0) {
            f8_quad<T> w;
            if (sizeof(T) == 4) {
                w.f4 = *reinterpret_cast<const float4*>(src);
            } else {
                w.u2 = *reinterpret_cast<const uint2*>(src);
            }
            for (int j = 0; j < 4; ++j) v[j] = fm_to_float(w.lanes[j]);
        } else {
            for (int j = 0; j < 4; ++j) v[j] = col + j < hidden ? fm_to_float(src[j]) : 0.0f;
        }
        float amax = 0.0f;
        for (int j = 0; j < 4; ++j) amax = f8_max_nan(amax, fabsf(v[j]));
        for (int offset = F8_WARP / 2; offset > 0; offset /= 2) {
            amax = f8_max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
        }
        float scale = __fdiv_rn(amax, F8_MAX);
        if (scale == 0.0f) scale = 1.0f;
        f8_u32 packed = 0;
        for (int j = 0; j < 4; ++j) {
            packed |= static_cast<f8_u32>(fp8_e4m3_from_float(f8_clamp(__fdiv_rn(v[j], scale)))) << (8 * j);
        }
        f8_u8* dst = q + row * q_stride + col;
        if (whole && (reinterpret_cast<f8_u64>(dst) & 3u) == 0) {
            *reinterpret_cast<f8_u32*>(dst) = packed;
        } else {
            for (int j = 0; j < 4; ++j) {
                if (col + j < hidden) dst[j] = static_cast<f8_u8>(packed >> (8 * j));
            }
        }
        if (lane == 0) scales[row * s_stride + block] = scale;
        if (block == blocks - 1) {
            f8_u8* line = q + row * q_stride;
            for (f8_i64 b = zero_a + lane; b < zero_b; b += F8_WARP) line[b] = 0;
            for (f8_i64 b = zero_c + lane; b < zero_d; b += F8_WARP) line[b] = 0;
        }
    }
}

#define F8_QUANTIZE(NAME, T)                                                                                   \
    extern "C" __global__ void NAME(const T* x, f8_i64 x_stride, f8_i64 rows, f8_i64 hidden, f8_u8* q,        \
                                    f8_i64 q_stride, float* scales, f8_i64 s_stride, f8_i64 zero_a,           \
                                    f8_i64 zero_b, f8_i64 zero_c, f8_i64 zero_d)                               \
    {                                                                                                          \
        fp8_quantize<T>(x, x_stride, rows, hidden, q, q_stride, scales, s_stride, zero_a, zero_b, zero_c,     \
                        zero_d);                                                                               \
    }
F8_QUANTIZE(fuser_moe_fp8_quantize_f32, float)
F8_QUANTIZE(fuser_moe_fp8_quantize_bf16, fm_bf16)
F8_QUANTIZE(fuser_moe_fp8_quantize_f16, fm_f16)

// ------------------------------------------------------------------------------------------ dequantize
// A warp per (row, block); out: [rows, hidden] contiguous in T.
template <typename T>
__device__ __forceinline__ void fp8_dequantize(const f8_u8* __restrict__ q, f8_i64 q_stride,
                                               const float* __restrict__ scales, f8_i64 s_stride, f8_i64 rows,
                                               f8_i64 hidden, T* __restrict__ out)
{
    const int lane = threadIdx.x % F8_WARP;
    const f8_i64 blocks = (hidden + F8_BLOCK_COLS - 1) / F8_BLOCK_COLS;
    const f8_i64 items = rows * blocks;
    for (f8_i64 item = f8_warp_id(); item < items; item += f8_total_warps()) {
        const f8_i64 row = item / blocks;
        const f8_i64 block = item - row * blocks;
        const f8_i64 col = block * F8_BLOCK_COLS + 4 * lane;
        if (col >= hidden) continue;
        const float scale = scales[row * s_stride + block];
        const f8_u8* src = q + row * q_stride + col;
        const bool whole = col + 4 <= hidden;
        f8_u32 codes = 0;
        if (whole && (reinterpret_cast<f8_u64>(src) & 3u) == 0) {
            codes = *reinterpret_cast<const f8_u32*>(src);
        } else {
            for (int j = 0; j < 4; ++j) {
                if (col + j < hidden) codes |= static_cast<f8_u32>(src[j]) << (8 * j);
            }
        }
        f8_quad<T> values;
        for (int j = 0; j < 4; ++j) {
            values.lanes[j] = fm_from_float<T>(
                __fmul_rn(fp8_e4m3_to_float(static_cast<f8_u8>(codes >> (8 * j))), scale));
        }
        T* dst = out + row * hidden + col;
        if (whole && (reinterpret_cast<f8_u64>(dst) & (4 * sizeof(T) - 1)) == 0) {
            if (sizeof(T) == 4) {
                *reinterpret_cast<float4*>(dst) = values.f4;
            } else {
                *reinterpret_cast<uint2*>(dst) = values.u2;
            }
        } else {
            for (int j = 0; j < 4; ++j) {
                if (col + j < hidden) dst[j] = values.lanes[j];
            }
        }
    }
}

#define F8_DEQUANTIZE(NAME, T)                                                                                 \
    extern "C" __global__ void NAME(const f8_u8* q, f8_i64 q_stride, const float* scales, f8_i64 s_stride,    \
                                    f8_i64 rows, f8_i64 hidden, T* out)                                        \
    {                                                                                                          \
        fp8_dequantize<T>(q, q_stride, scales, s_stride, rows, hidden, out);                                  \
    }
F8_DEQUANTIZE(fuser_moe_fp8_dequantize_f32, float)
F8_DEQUANTIZE(fuser_moe_fp8_dequantize_bf16, fm_bf16)
F8_DEQUANTIZE(fuser_moe_fp8_dequantize_f16, fm_f16)

// ------------------------------------------------------------------------------------------ pack
// A warp per row: copies the fp8 row (q, row stride q_stride bytes) and its scales (row stride s_stride
// bytes) into packed row `row` (row_bytes apart) and zeroes the padding (layout at the top of the file).
// 16-byte vectors where both sides are aligned, bytes otherwise.
__device__ __forceinline__ void f8_warp_copy(f8_u8* dst, const f8_u8* src, f8_i64 n, int lane)
{
    if (((reinterpret_cast<f8_u64>(dst) | reinterpret_cast<f8_u64>(src) | static_cast<f8_u64>(n)) & 15u) == 0) {
        for (f8_i64 k = lane; k < (n >> 4); k += F8_WARP) {
            reinterpret_cast<int4*>(dst)[k] = reinterpret_cast<const int4*>(src)[k];
        }
        return;
    }
    if (((reinterpret_cast<f8_u64>(dst) | reinterpret_cast<f8_u64>(src) | static_cast<f8_u64>(n)) & 3u) == 0) {
        for (f8_i64 k = lane; k < (n >> 2); k += F8_WARP) {
            reinterpret_cast<f8_u32*>(dst)[k] = reinterpret_cast<const f8_u32*>(src)[k];
        }
        return;
    }
    for (f8_i64 k = lane; k < n; k += F8_WARP) dst[k] = src[k];
}

extern "C" __global__ void fuser_moe_fp8_pack_rows(const f8_u8* q, f8_i64 q_stride, const f8_u8* scales,
                                                   f8_i64 s_stride, f8_i64 rows, f8_i64 hidden,
                                                   f8_i64 scale_offset, f8_i64 scale_bytes, f8_i64 row_bytes,
                                                   f8_u8* packed)
{
    const int lane = threadIdx.x % F8_WARP;
    for (f8_i64 row = f8_warp_id(); row < rows; row += f8_total_warps()) {
        f8_u8* line = packed + row * row_bytes;
        f8_warp_copy(line, q + row * q_stride, hidden, lane);
        f8_warp_copy(line + scale_offset, scales + row * s_stride, scale_bytes, lane);
        for (f8_i64 b = hidden + lane; b < scale_offset; b += F8_WARP) line[b] = 0;
        for (f8_i64 b = scale_offset + scale_bytes + lane; b < row_bytes; b += F8_WARP) line[b] = 0;
    }
}
#endif  // F8_DEVICE_CODE
