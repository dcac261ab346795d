// Push-rows kernel of the symmetric-memory transport (docs/contract.md section 8): the alltoallv's data path.
//
// For every entry i: peer buffer dst_rank[i], row dst_row[i]  <-  src row src_row[i], whole rows,
// written straight into the peer's memory (over NVLink when the buffer is mapped from another GPU).
//   - dst_row[i] < 0 marks padding: skipped, so the host never has to size the work.
//   - dst_row[i] >= dst_capacity is not written; the entry raises the overflow words instead
//     (out_needed / out_capacity for this rank, fwd_needed[d] / fwd_capacity[d] that the next barrier
//     forwards to rank d), so an overflow is reported, never silently truncated.
//   - dst_rank outside [0, world) or src_row outside [0, n_src_rows) is not written either; bad_entry
//     keeps the largest such i + 1.
//
// One warp per row, grid-stride over rows. A row moves in 16-byte vectors when its two addresses and
// its length are 16-byte aligned, else in 4-byte words when they are 4-byte aligned, else bytewise.
//
// Compiles unchanged under nvcc and NVRTC: no system headers, fixed-width types by typedef.

typedef long long fm_i64;
typedef unsigned long long fm_u64;
typedef unsigned int fm_u32;

constexpr int FM_WARP = 32;

// status[] words, the scalars of the control block (base.py ControlLayout): out_needed, out_capacity, bad_entry.
constexpr int FM_STATUS_OUT_NEEDED = 0;
constexpr int FM_STATUS_OUT_CAPACITY = 1;
constexpr int FM_STATUS_BAD_ENTRY = 2;

__device__ __forceinline__ void fm_copy_row(unsigned char* dst, const unsigned char* src, fm_i64 row_bytes,
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
        const fm_i64 n1 = row_bytes >> 2;
        for (fm_i64 k = lane; k < n1; k += FM_WARP) {
            dst1[k] = src1[k];
        }
    } else {
        for (fm_i64 k = lane; k < row_bytes; k += FM_WARP) {
            dst[k] = src[k];
        }
    }
}

//   src:          [n_src_rows, row_bytes] bytes, contiguous
//   src_row, dst_rank, dst_row: [n] int64 on this device
//   dst_ptrs:     [world] base address of every rank's destination buffer, mapped in this process
//   dst_capacity: rows of every destination buffer; row_bytes: bytes per row
//   fwd_needed, fwd_capacity: [world] this rank's control words (see barrier.cu)
//   status:       the control block's scalars: out_needed, out_capacity, bad_entry
extern "C" __global__ void fuser_moe_push_rows(const unsigned char* __restrict__ src, fm_i64 n_src_rows,
                                               const fm_i64* __restrict__ src_row,
                                               const fm_i64* __restrict__ dst_rank,
                                               const fm_i64* __restrict__ dst_row, fm_i64 n,
                                               const fm_u64* __restrict__ dst_ptrs, fm_i64 dst_capacity,
                                               fm_i64 row_bytes, int world, fm_i64* fwd_needed,
                                               fm_i64* fwd_capacity, fm_i64* status)
{
    const int lane = threadIdx.x & (FM_WARP - 1);
    const fm_i64 warp = (static_cast<fm_i64>(blockIdx.x) * blockDim.x + threadIdx.x) / FM_WARP;
    const fm_i64 n_warps = (static_cast<fm_i64>(gridDim.x) * blockDim.x) / FM_WARP;
    for (fm_i64 i = warp; i < n; i += n_warps) {
        const fm_i64 row = dst_row[i];
        if (row < 0) {
            continue;
        }
        const fm_i64 peer = dst_rank[i];
        const fm_i64 source = src_row[i];
        if (peer < 0 || peer >= world || source < 0 || source >= n_src_rows) {
            if (lane == 0) {
                atomicMax(&status[FM_STATUS_BAD_ENTRY], i + 1);
            }
            continue;
        }
        if (row >= dst_capacity) {
            if (lane == 0) {
                atomicMax(&status[FM_STATUS_OUT_NEEDED], row + 1);
                status[FM_STATUS_OUT_CAPACITY] = dst_capacity;
                atomicMax(&fwd_needed[peer], row + 1);
                fwd_capacity[peer] = dst_capacity;
            }
            continue;
        }
        unsigned char* dst = reinterpret_cast<unsigned char*>(dst_ptrs[peer]) + row * row_bytes;
        fm_copy_row(dst, src + source * row_bytes, row_bytes, lane);
    }
}
