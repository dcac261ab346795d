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

#include "fm_device.cuh"

// status[] words, the scalars of the control block (base.py ControlLayout): out_needed, out_capacity, bad_entry.
constexpr int FM_STATUS_OUT_NEEDED = 0;
constexpr int FM_STATUS_OUT_CAPACITY = 1;
constexpr int FM_STATUS_BAD_ENTRY = 2;

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
        fm_warp_copy_row(dst, src + source * row_bytes, row_bytes, lane);
    }
}
