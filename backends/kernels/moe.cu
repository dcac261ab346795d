// Dispatch and combine kernels of the CUDA backend (docs/contract.md sections 3, 4 and 8).
//
// Dispatch, on rank r (W ranks, T tokens, K slots, E experts), tokens cut into chunks of `chunk` tokens:
//   count   (a block per chunk)  per chunk: tokens for each destination rank, pairs for each expert.
//   notify  (one block)          exclusive prefix of those over chunks (coalesced: the counts are laid
//                                out by row over chunks); this rank's count row [tokens to each rank (W),
//                                pairs per expert (E), T] goes to row r of every rank's count buffer.
//                                                                                      -- barrier --
//   plan    (one block)          from the W x (W + E + 1) count matrix: where this rank's rows start in
//                                every peer's wire buffer, and where its pairs of each expert start in
//                                that expert's rank's output (local expert, source rank, source token).
//   send    (a block per chunk)  each token travels once to each destination rank: its row of x and a
//                                metadata row [token, source rank, K output rows, K experts, K weight
//                                bits] go straight into the peer's wire buffer (rows split over warps
//                                when a block has few).                                -- barrier --
//   expand  (warp per wire row)  the receiver copies each wire row to the output rows its metadata
//                                names (one read, one write per pair) and pads capacity mode's rest.
// The receiver's order comes out of the sender's arithmetic: no sort.
//
// Combine, on expert rank r, partial rows in a dense [W, T_max] layout on every source rank:
//   group   (thread per row)     rows of each (source rank, token) into a list.      -- barrier --
//   send    (warps per group)    float32 sum of w * y over the group's rows in row order, cast; written
//                                to row r * T_max + token of the source's partial buffer, with a flag.
//                                                                                      -- barrier --
//   reduce  (warp per token)     the source adds its partials in ascending expert-rank order, in float32,
//                                and clears the flags.
//
// Destinations are base pointers, one per rank (count_ptrs, x_ptrs, meta_ptrs, part_ptrs, flag_ptrs), to
// which a kernel adds the row the plan gives. The cuda backend passes its peers' mapped buffers; the NCCL
// backend passes pointers into its own send buffers, shifted so that the rows land in the layout that
// all_to_all_single sends (backends/nccl_kernels.py). The torch twin of every step is backends/routing.py.
//
// Rounding is the contract's: every product and sum is rounded on its own (__fmul_rn, __fadd_rn), sums
// start at +0.0, casts round to nearest even. Compiles unchanged under nvcc and NVRTC: no system headers.

#include "fm_device.cuh"

// The host uses these kernels for W <= 64 (destination sets are 64-bit masks) and K <= FM_MAX_TOP_K.
constexpr int FM_MAX_TOP_K = 64;
constexpr int FM_GROUP_CAP = 64;   // rows of one (source rank, token) on one expert rank in combine

// Words of the error block (int64, local to each rank; read and cleared by the host at check()).
constexpr int FM_ERR_NEEDED = 0;       // capacity mode: rows needed (largest)
constexpr int FM_ERR_GIVEN = 1;        // capacity given
constexpr int FM_ERR_BAD_ROW = 2;      // combine: 1 + a row whose src_rank / src_idx is out of range
constexpr int FM_ERR_BIG_GROUP = 3;    // combine: rows of one token on this rank beyond FM_GROUP_CAP
constexpr int FM_ERR_TIMEOUT = 4;      // streaming dispatch: 1 + a wire row whose stamp never came
constexpr int FM_ERR_COMBINE_TIMEOUT = 5;  // streaming combine: 1 + a token whose partial rows never came

// Summary words that plan writes for the host and the later kernels.
constexpr int FM_SUM_WIRE_IN = 0;      // wire rows this rank receives
constexpr int FM_SUM_PAIRS_IN = 1;     // pairs (output rows) this rank receives: V
constexpr int FM_SUM_MAX_WIRE_IN = 2;  // the most wire rows any rank receives
constexpr int FM_SUM_MAX_TOKENS = 3;   // the most tokens any rank has
constexpr int FM_SUM_SENT_REMOTE = 4;  // wire rows this rank sends to other ranks
constexpr int FM_SUM_RECV_REMOTE = 5;  // wire rows this rank receives from other ranks
// (8 words in all; the last two are zero)

// ------------------------------------------------------------------------------------------ helpers
template <typename I>
__device__ __forceinline__ fm_u64 fm_dest_mask(const I* topk_idx, fm_i64 t, int top_k, const fm_i64* expert_to_rank,
                                               fm_i64 num_experts)
{
    fm_u64 mask = 0;
    for (int k = 0; k < top_k; ++k) {
        const fm_i64 e = fm_expert(topk_idx, t, top_k, k, num_experts);
        if (e >= 0) {
            mask |= 1ull << expert_to_rank[e];
        }
    }
    return mask;
}

// ------------------------------------------------------------------------------------------ dispatch
//   chunk_e [E, n_chunks], chunk_d [W, n_chunks] (int32, column c is chunk c = blockIdx.x; gridDim.x chunks):
//   filled with this chunk's counts. Rows run over chunks so that notify's scans read them coalesced.
template <typename I>
__device__ __forceinline__ void fm_dispatch_count(const I* __restrict__ topk_idx, fm_i64 tokens, int top_k,
                                                  const fm_i64* __restrict__ expert_to_rank, fm_i64 num_experts,
                                                  int world, fm_i64 chunk, int* chunk_e, int* chunk_d)
{
    const fm_i64 c = blockIdx.x;
    const fm_i64 t0 = c * chunk;
    const fm_i64 t1 = t0 + chunk < tokens ? t0 + chunk : tokens;
    const fm_i64 n_chunks = gridDim.x;
    int* row_e = chunk_e + c;  // row_e[e * n_chunks], row_d[d * n_chunks]
    int* row_d = chunk_d + c;
    for (fm_i64 i = threadIdx.x; i < num_experts; i += blockDim.x) {
        row_e[i * n_chunks] = 0;
    }
    for (int i = threadIdx.x; i < world; i += blockDim.x) {
        row_d[i * n_chunks] = 0;
    }
    __syncthreads();
    for (fm_i64 p = threadIdx.x; p < (t1 - t0) * top_k; p += blockDim.x) {
        const fm_i64 e = fm_expert(topk_idx, t0 + p / top_k, top_k, static_cast<int>(p % top_k), num_experts);
        if (e >= 0) {
            atomicAdd(&row_e[e * n_chunks], 1);
        }
    }
    for (fm_i64 t = t0 + threadIdx.x; t < t1; t += blockDim.x) {
        fm_u64 mask = fm_dest_mask(topk_idx, t, top_k, expert_to_rank, num_experts);
        while (mask) {
            const int d = __ffsll(static_cast<long long>(mask)) - 1;
            mask &= mask - 1;
            atomicAdd(&row_d[d * n_chunks], 1);
        }
    }
}

#define FM_DISPATCH_COUNT(NAME, I)                                                                        \
    extern "C" __global__ void NAME(const I* topk_idx, fm_i64 tokens, int top_k, const fm_i64* expert_to_rank, \
                                    fm_i64 num_experts, int world, fm_i64 chunk, int* chunk_e, int* chunk_d) \
    {                                                                                                     \
        fm_dispatch_count<I>(topk_idx, tokens, top_k, expert_to_rank, num_experts, world, chunk, chunk_e,  \
                             chunk_d);                                                                    \
    }

FM_DISPATCH_COUNT(fuser_moe_dispatch_count_i64, fm_i64)
FM_DISPATCH_COUNT(fuser_moe_dispatch_count_i32, int)

constexpr int FM_SCAN_BATCH = 8;

// Warp-wide inclusive scan.
template <typename V> __device__ __forceinline__ V fm_warp_inclusive_scan(V value, int lane)
{
    for (int offset = 1; offset < FM_WARP; offset <<= 1) {
        const V other = __shfl_up_sync(0xffffffffu, value, offset);
        if (lane >= offset) {
            value += other;
        }
    }
    return value;
}

// Block-wide exclusive scan of data[0, n) in place (every thread of the block calls it; blockDim.x is a
// multiple of 32). Each thread scans a contiguous run, so loads are independent. Returns the total.
__device__ fm_i64 fm_block_exclusive_scan(fm_i64* data, fm_i64 n)
{
    __shared__ fm_i64 warp_totals[FM_WARP];
    __shared__ fm_i64 grand_total;
    const int lane = threadIdx.x & (FM_WARP - 1);
    const int warp = threadIdx.x / FM_WARP;
    const fm_i64 per = (n + blockDim.x - 1) / blockDim.x;
    const fm_i64 begin = threadIdx.x * per < n ? threadIdx.x * per : n;
    const fm_i64 end = begin + per < n ? begin + per : n;
    fm_i64 local = 0;
    for (fm_i64 i = begin; i < end; ++i) {
        local += data[i];
    }
    const fm_i64 inclusive = fm_warp_inclusive_scan(local, lane);
    if (lane == FM_WARP - 1) {
        warp_totals[warp] = inclusive;
    }
    __syncthreads();
    if (warp == 0) {
        const int n_warps = blockDim.x / FM_WARP;
        const fm_i64 mine = lane < n_warps ? warp_totals[lane] : 0;
        const fm_i64 scanned = fm_warp_inclusive_scan(mine, lane);
        if (lane < n_warps) {
            warp_totals[lane] = scanned - mine;
        }
        if (lane == FM_WARP - 1) {
            grand_total = scanned;
        }
    }
    __syncthreads();
    fm_i64 running = warp_totals[warp] + inclusive - local;
    for (fm_i64 i = begin; i < end; ++i) {
        const fm_i64 v = data[i];
        data[i] = running;
        running += v;
    }
    __syncthreads();
    return grand_total;
}

// Any grid (a warp per column; cuda_kernels.launch_notify gives a block to 8 columns). Turns chunk_e /
// chunk_d into exclusive prefixes over chunks and sends this rank's count row [tokens to each rank (W),
// pairs per expert (E), tokens (1)] to row `rank` of every rank's count buffer: each warp writes its
// columns' totals there itself, so no block waits for another.
//   count_ptrs [world]: every rank's count buffer, [world, W + E + 1] int64 (two of them, by parity, with
//                       gen_state)
//   n_to [W] int64: this rank's n_tokens_to_rank output
//   gen_state: null, or the call counter (int64, local): this call is gen_state[0] + 1 and its rows go to
//              the count buffer of its parity; plan advances the counter (every block here has read it by
//              then: plan follows this kernel in stream order). With streaming (no barrier after the
//              send) a fast rank's next call may write its row before a slow peer's plan has read this
//              one: two buffers by parity keep them apart (the next call's barrier orders the call after,
//              which writes this parity again).
// One H200, W=1, T=4096 (257 columns of 256 chunks): one block of 32 warps, 8 columns a warp one after
// the other, took 15.8 us; a warp a column over 33 blocks takes one column's scan.
extern "C" __global__ void fuser_moe_dispatch_notify(int* chunk_e, int* chunk_d, fm_i64 n_chunks, fm_i64 num_experts,
                                                     int world, int rank, fm_i64 tokens,
                                                     const fm_u64* __restrict__ count_ptrs, fm_i64* n_to,
                                                     const fm_i64* gen_state)
{
    const fm_i64 row_len = world + num_experts + 1;
    const fm_i64 parity_rows = gen_state != nullptr ? ((gen_state[0] + 1) & 1) * world * row_len : 0;
    const fm_i64 row = parity_rows + rank * row_len;  // this rank's row in every rank's count buffer
    const int lane = threadIdx.x & (FM_WARP - 1);
    const fm_i64 warps = static_cast<fm_i64>(gridDim.x) * (blockDim.x / FM_WARP);
    // A warp per column (W destination ranks, then E experts); a column's chunks are contiguous, scanned
    // 32 at a time (coalesced), FM_SCAN_BATCH rounds of loads issued before the first is used.
    for (fm_i64 col = blockIdx.x * static_cast<fm_i64>(blockDim.x / FM_WARP) + threadIdx.x / FM_WARP;
         col < world + num_experts; col += warps) {
        int* base = col < world ? chunk_d + col * n_chunks : chunk_e + (col - world) * n_chunks;
        int carry = 0;
        for (fm_i64 c0 = 0; c0 < n_chunks; c0 += FM_SCAN_BATCH * FM_WARP) {
            int v[FM_SCAN_BATCH];
#pragma unroll
            for (int j = 0; j < FM_SCAN_BATCH; ++j) {
                const fm_i64 c = c0 + j * FM_WARP + lane;
                v[j] = c < n_chunks ? base[c] : 0;
            }
#pragma unroll
            for (int j = 0; j < FM_SCAN_BATCH; ++j) {
                const fm_i64 c = c0 + j * FM_WARP + lane;
                const int inclusive = fm_warp_inclusive_scan(v[j], lane);
                if (c < n_chunks) {
                    base[c] = carry + inclusive - v[j];
                }
                carry += __shfl_sync(0xffffffffu, inclusive, FM_WARP - 1);
            }
        }
        for (int peer = lane; peer < world; peer += FM_WARP) {  // every rank's copy of the row, its own too
            reinterpret_cast<fm_i64*>(count_ptrs[peer])[row + col] = carry;
        }
        if (lane == 0 && col < world) {
            n_to[col] = carry;
        }
    }
    if (blockIdx.x == 0) {
        for (int peer = threadIdx.x; peer < world; peer += blockDim.x) {
            reinterpret_cast<fm_i64*>(count_ptrs[peer])[row + world + num_experts] = tokens;
        }
    }
}

// One block, after the barrier. From the count matrix M [W, W + E + 1] (row s: what rank s sends):
//   base_d[d]  = where this rank's rows start in d's wire buffer: sum_{s < rank} M[s][d]; with
//                local_send (the NCCL backend: every destination's rows in this rank's own send buffer,
//                by destination) where they start there instead: sum_{d' < d} M[rank][d']
//   start_e[e] = where this rank's pairs of expert e start in the output of e's rank d:
//                (pairs of d's experts before e, from every rank) + sum_{s < rank} M[s][W + e]
// (send adds the chunk's exclusive prefix to them) and this rank's receiving outputs: n_from [W],
// n_per_expert [E_local], summary (FM_SUM_*, 8 words).
//   expert_order [E]: experts by (rank, local index); rank_begin [W + 1]: each rank's run in it
//   gen_state: null, or the call counter that notify read: the matrix is then the one of this call's
//              parity (gen_state[0] + 1), and the counter is advanced at the end
//   scratch [3 * E + W] int64: totals, start_e, the scan, base_d
extern "C" __global__ void fuser_moe_dispatch_plan(const fm_i64* __restrict__ matrix, fm_i64 num_experts, int world,
                                                   int rank, const fm_i64* __restrict__ expert_to_rank,
                                                   const fm_i64* __restrict__ expert_order,
                                                   const fm_i64* __restrict__ rank_begin, fm_i64* scratch,
                                                   fm_i64* n_from, fm_i64* n_per_expert, fm_i64* summary,
                                                   int local_send, fm_i64* gen_state)
{
    // With gen_state (the call counter, which this kernel advances: this call is gen_state[0] + 1) the
    // matrix is the one of this call's parity.
    const fm_i64 generation = gen_state != nullptr ? gen_state[0] + 1 : 0;
    if (gen_state != nullptr) {
        matrix += (generation & 1) * world * (world + num_experts + 1);
    }
    __shared__ fm_i64 sums[4];  // wire rows in, sent remote, received remote (sums); most wire rows in
    __shared__ fm_i64 max_tokens_s;
    const fm_i64 row_len = world + num_experts + 1;
    fm_i64* total = scratch;
    fm_i64* start = scratch + num_experts;
    fm_i64* ordered = scratch + 2 * num_experts;  // totals in expert_order, then their exclusive scan
    fm_i64* base_d = scratch + 3 * num_experts;
    if (threadIdx.x < 4) {
        sums[threadIdx.x] = 0;
    }
    if (threadIdx.x == 0) {
        max_tokens_s = 0;
    }
    for (fm_i64 e = threadIdx.x; e < num_experts; e += blockDim.x) {
        fm_i64 all = 0, before = 0;
        for (int s = 0; s < world; ++s) {
            const fm_i64 v = matrix[s * row_len + world + e];
            all += v;
            before += s < rank ? v : 0;
        }
        total[e] = all;
        start[e] = before;
    }
    __syncthreads();
    for (fm_i64 i = threadIdx.x; i < num_experts; i += blockDim.x) {
        ordered[i] = total[expert_order[i]];
    }
    __syncthreads();
    const fm_i64 grand_total = fm_block_exclusive_scan(ordered, num_experts);
    for (fm_i64 i = threadIdx.x; i < num_experts; i += blockDim.x) {
        const fm_i64 e = expert_order[i];
        start[e] += ordered[i] - ordered[rank_begin[expert_to_rank[e]]];
    }
    for (int d = threadIdx.x; d < world; d += blockDim.x) {
        fm_i64 base = 0;
        if (local_send) {
            for (int d2 = 0; d2 < d; ++d2) {
                base += matrix[rank * row_len + d2];
            }
        } else {
            for (int s = 0; s < rank; ++s) {
                base += matrix[s * row_len + d];
            }
        }
        base_d[d] = base;
    }
    const fm_i64 local_begin = rank_begin[rank];
    const fm_i64 local_end = rank_begin[rank + 1];
    for (fm_i64 j = threadIdx.x; j < local_end - local_begin; j += blockDim.x) {
        n_per_expert[j] = total[expert_order[local_begin + j]];
    }
    for (int d = threadIdx.x; d < world; d += blockDim.x) {
        fm_i64 in = 0;
        for (int s = 0; s < world; ++s) {
            in += matrix[s * row_len + d];
        }
        const fm_i64 from = matrix[d * row_len + rank];
        n_from[d] = from;
        if (d == rank) {
            atomicAdd(reinterpret_cast<unsigned long long*>(&sums[0]), static_cast<unsigned long long>(from));
        } else {
            atomicAdd(reinterpret_cast<unsigned long long*>(&sums[0]), static_cast<unsigned long long>(from));
            atomicAdd(reinterpret_cast<unsigned long long*>(&sums[1]),
                      static_cast<unsigned long long>(matrix[rank * row_len + d]));
            atomicAdd(reinterpret_cast<unsigned long long*>(&sums[2]), static_cast<unsigned long long>(from));
        }
        atomicMax(&sums[3], in);
        atomicMax(&max_tokens_s, matrix[d * row_len + world + num_experts]);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const fm_i64 pairs_end = local_end < num_experts ? ordered[local_end] : grand_total;
        const fm_i64 pairs_begin = local_begin < num_experts ? ordered[local_begin] : grand_total;
        summary[FM_SUM_WIRE_IN] = sums[0];
        summary[FM_SUM_PAIRS_IN] = pairs_end - pairs_begin;
        summary[FM_SUM_MAX_WIRE_IN] = sums[3];
        summary[FM_SUM_MAX_TOKENS] = max_tokens_s;
        summary[FM_SUM_SENT_REMOTE] = sums[1];
        summary[FM_SUM_RECV_REMOTE] = sums[2];
        summary[6] = 0;
        summary[7] = 0;
        if (gen_state != nullptr) {
            gen_state[0] = generation;  // every thread read it before the barriers above
        }
    }
}

// A block per chunk. Each token goes once to each rank that holds one of its experts: its x row and its
// metadata row [token, source rank, K output rows, K experts, K weight bits] (-1 for slots of other
// ranks) go to row base_d[d] + chunk_d[c][d] + (its position among the chunk's tokens for d) of d's wire
// buffers; its pair of expert e lands in output row start_e[e] + chunk_e[c][e] + (its position among
// the chunk's tokens for e) on e's rank. base_d and start_e come from plan (its scratch).
// Rows at or past wire_capacity are not written (exact mode sends again into a larger buffer; capacity
// mode's receiver then finds more pairs than its capacity and reports the overflow).
// self_direct: the rows this rank sends itself get their metadata only; the expansion reads their x rows
// from x itself (fm_dispatch_expand's self_x), which saves a copy of them through the wire buffer.
//   x_ptrs / meta_ptrs [world]: every rank's wire x buffer ([capacity, H]) and metadata buffer
template <typename I>
__device__ __forceinline__ void fm_dispatch_send(const unsigned char* __restrict__ x, fm_i64 row_bytes,
                                                 const I* __restrict__ topk_idx,
                                                 const float* __restrict__ topk_weights, fm_i64 tokens,
                                                 int top_k, const fm_i64* __restrict__ expert_to_rank,
                                                 fm_i64 num_experts, int world, int rank, fm_i64 chunk,
                                                 const int* __restrict__ chunk_e, const int* __restrict__ chunk_d,
                                                 const fm_i64* __restrict__ plan,
                                                 const fm_u64* __restrict__ x_ptrs,
                                                 const fm_u64* __restrict__ meta_ptrs, fm_i64 wire_capacity,
                                                 fm_i64 c, fm_i64 n_chunks, const fm_u64* __restrict__ stamp_ptrs,
                                                 fm_i64 generation, int self_direct)
{
    extern __shared__ int fm_shared[];
    // [chunk * K] experts, [chunk * K] output rows, [chunk * W] wire rows, then [chunk] masks (8-aligned)
    int* expert_s = fm_shared;
    int* out_row_s = expert_s + chunk * top_k;
    int* wire_row_s = out_row_s + chunk * top_k;
    fm_u64* mask_s = reinterpret_cast<fm_u64*>(wire_row_s + ((chunk * world + 1) & ~static_cast<fm_i64>(1)));

    const fm_i64* start_e = plan + num_experts;      // the plan kernel's scratch: start_e, base_d
    const fm_i64* base_d = plan + 3 * num_experts;
    const fm_i64 t0 = c * chunk;
    const fm_i64 n = (t0 + chunk < tokens ? t0 + chunk : tokens) - t0;
    for (fm_i64 p = threadIdx.x; p < n * top_k; p += blockDim.x) {
        expert_s[p] = static_cast<int>(fm_expert(topk_idx, t0 + p / top_k, top_k, static_cast<int>(p % top_k),
                                                 num_experts));
    }
    for (fm_i64 i = threadIdx.x; i < n; i += blockDim.x) {
        mask_s[i] = fm_dest_mask(topk_idx, t0 + i, top_k, expert_to_rank, num_experts);
    }
    __syncthreads();
    // Positions: earlier tokens of the chunk with the same expert (experts of a row are distinct when
    // the input is valid; a repeated one still gets a slot of its own).
    for (fm_i64 p = threadIdx.x; p < n * top_k; p += blockDim.x) {
        const int e = expert_s[p];
        int row = -1;
        if (e >= 0) {
            const fm_i64 i = p / top_k;
            int before = 0;
            for (fm_i64 q = 0; q < i * top_k; ++q) {
                before += expert_s[q] == e;
            }
            for (fm_i64 q = i * top_k; q < p; ++q) {
                before += expert_s[q] == e;
            }
            row = static_cast<int>(start_e[e]) + chunk_e[e * n_chunks + c] + before;
        }
        out_row_s[p] = row;
    }
    for (fm_i64 p = threadIdx.x; p < n * world; p += blockDim.x) {
        const fm_i64 i = p / world;
        const int d = static_cast<int>(p % world);
        int row = -1;
        if ((mask_s[i] >> d) & 1ull) {
            int before = 0;
            for (fm_i64 q = 0; q < i; ++q) {
                before += static_cast<int>((mask_s[q] >> d) & 1ull);
            }
            row = static_cast<int>(base_d[d]) + chunk_d[d * n_chunks + c] + before;
        }
        wire_row_s[p] = row;
    }
    __syncthreads();

    const int lane = threadIdx.x & (FM_WARP - 1);
    const int warp = threadIdx.x / FM_WARP;
    const int n_warps = blockDim.x / FM_WARP;
    const fm_i64 meta_width = 2 + 3 * static_cast<fm_i64>(top_k);
    // Work items (token, destination) dealt to warps in turn; with fewer items than warps (small chunks)
    // each row is cut into `parts` slices of whole 16-byte vectors, one warp a slice.
    const fm_i64 items = n * world;
    const fm_i64 parts = items >= n_warps ? 1 : n_warps / items;
    const fm_i64 slice = ((row_bytes + parts - 1) / parts + 15) & ~static_cast<fm_i64>(15);
    for (fm_i64 job = warp; job < items * parts; job += n_warps) {
        const fm_i64 item = job / parts;
        const fm_i64 part = job % parts;
        const fm_i64 i = item / world;
        const int d = static_cast<int>(item % world);
        const int row = wire_row_s[item];
        if (row < 0 || row >= wire_capacity) {
            continue;
        }
        const fm_i64 t = t0 + i;
        const fm_i64 offset = part * slice;
        if (offset < row_bytes && !(self_direct && d == rank)) {
            const fm_i64 length = offset + slice < row_bytes ? slice : row_bytes - offset;
            fm_warp_copy_row(reinterpret_cast<unsigned char*>(x_ptrs[d]) + row * row_bytes + offset,
                             x + t * row_bytes + offset, length, lane);
        }
        if (part != 0) {
            continue;
        }
        fm_i64* meta = reinterpret_cast<fm_i64*>(meta_ptrs[d]) + row * meta_width;
        for (fm_i64 w = lane; w < meta_width; w += FM_WARP) {
            fm_i64 value;
            if (w == 0) {
                value = t;
            } else if (w == 1) {
                value = rank;
            } else {
                const int k = static_cast<int>((w - 2) % top_k);
                const int field = static_cast<int>((w - 2) / top_k);
                const int e = expert_s[i * top_k + k];
                const bool here = e >= 0 && expert_to_rank[e] == d;
                if (field == 0) {
                    value = here ? out_row_s[i * top_k + k] : -1;
                } else if (field == 1) {
                    value = here ? e : -1;
                } else {
                    value = static_cast<fm_i64>(__float_as_uint(topk_weights[t * top_k + k]));
                }
            }
            meta[w] = value;
        }
    }
    if (stamp_ptrs == nullptr) {
        return;
    }
    // Streaming: once the whole chunk is written (every warp, every part of a row), one system-scope fence
    // and then each wire row's stamp, the call's generation, on its receiver (who expands a row as soon as
    // its stamp says so).
    __syncthreads();
    __threadfence_system();
    for (fm_i64 item = threadIdx.x; item < items; item += blockDim.x) {
        const int row = wire_row_s[item];
        if (row >= 0 && row < wire_capacity) {
            fm_store_release_sys(reinterpret_cast<fm_i64*>(stamp_ptrs[item % world]) + row, generation);
        }
    }
}

#define FM_DISPATCH_SEND(NAME, I)                                                                         \
    extern "C" __global__ void NAME(const unsigned char* x, fm_i64 row_bytes, const I* topk_idx,           \
                                    const float* topk_weights, fm_i64 tokens, int top_k,                  \
                                    const fm_i64* expert_to_rank, fm_i64 num_experts, int world, int rank, \
                                    fm_i64 chunk, const int* chunk_e, const int* chunk_d,                 \
                                    const fm_i64* plan, const fm_u64* x_ptrs, const fm_u64* meta_ptrs,    \
                                    fm_i64 wire_capacity, int self_direct)                                \
    {                                                                                                     \
        fm_dispatch_send<I>(x, row_bytes, topk_idx, topk_weights, tokens, top_k, expert_to_rank,          \
                            num_experts, world, rank, chunk, chunk_e, chunk_d, plan, x_ptrs, meta_ptrs,   \
                            wire_capacity, blockIdx.x, gridDim.x, nullptr, 0, self_direct);               \
    }

FM_DISPATCH_SEND(fuser_moe_dispatch_send_i64, fm_i64)
FM_DISPATCH_SEND(fuser_moe_dispatch_send_i32, int)

// Warp per item: items [0, wire rows received) expand a wire row into its output rows; items after them
// write capacity mode's padding rows [V, out_rows). Sizes the host does not know come from `summary`.
//   wire_x [wire_capacity, H], wire_meta [wire_capacity, 2 + 3K]: this rank's wire buffers
//   outputs: recv_x [out_rows, H], recv_idx, recv_src_idx, recv_src_rank [out_rows] int64, recv_w float
//   errors: FM_ERR_NEEDED / FM_ERR_GIVEN raised when a pair's row is at or past out_rows
//   self_x, rank: this rank's x [T, H]: the rows whose source is `rank` are read from it, not from the wire
//   (their sender left them out: fm_dispatch_send's self_direct); null: every row from the wire
//   stamps (streaming; null after a barrier): [wire_capacity] int64, a row is in place once its stamp is
//   `generation`; a wait that outlasts timeout_ns records FM_ERR_TIMEOUT (1 + the row) and, from then
//   on, nobody waits (the rows are garbage; the host raises a TimeoutError at its next check). Nor does
//   anybody wait once the call's barrier gave up (barrier_gave_up: the transport's timeout_generation
//   word, nonzero from then until the host has seen it): a peer that missed the barrier sends nothing.
constexpr int FM_EXPAND_BATCH = 4;  // 16-byte vectors a lane loads before it stores them
#ifndef FM_STREAM_STORES
#define FM_STREAM_STORES 1  // 0: the expansion's output rows are stored with plain stores
#endif
// An expansion output row store, which nobody in this kernel reads again: with FM_STREAM_STORES the
// evict-first kind (st.global.cs), so that the rows written do not push the rows still to be read out
// of L2. One H200, W=1, T=4096, CUDA graph: dispatch 221.7 us against 225.0 with plain stores (session
// 5), then 222.0 / 222.0 against 224.7 / 225.3 in two alternated rounds of one call (session 12), so
// it is on. The same stores in combine's reduce took it from 152.2 to 184.2 us, so the reduce keeps
// plain stores.
__device__ __forceinline__ void fm_store_out(int4* at, const int4& v)
{
#if FM_STREAM_STORES
    __stcs(at, v);
#else
    *at = v;
#endif
}

__device__ __forceinline__ bool fm_wait_stamp(const fm_i64* stamp, fm_i64 generation, fm_i64 row, fm_i64* errors,
                                              fm_i64 timeout_ns, const fm_i64* barrier_gave_up, int lane)
{
    int ok = 1;
    if (lane == 0) {
        volatile fm_i64* timed_out = &errors[FM_ERR_TIMEOUT];
        const volatile fm_i64* barrier_out = barrier_gave_up;
        const fm_u64 start = fm_globaltimer_ns();
        unsigned int polls = 0;
        while (fm_load_acquire_sys(stamp) != generation) {
            if (*timed_out != 0 || *barrier_out != 0) {
                ok = 0;
                break;
            }
            ++polls;
            if ((polls & 63u) == 0u && static_cast<fm_i64>(fm_globaltimer_ns() - start) > timeout_ns) {
                atomicCAS(reinterpret_cast<unsigned long long*>(&errors[FM_ERR_TIMEOUT]), 0ull,
                          static_cast<unsigned long long>(row + 1));
                ok = 0;
                break;
            }
            if (polls > 256u) {
                __nanosleep(64);
            }
        }
    }
    ok = __shfl_sync(0xffffffffu, ok, 0);
    __syncwarp();
    __threadfence();  // every lane's loads of the row after lane 0's acquire (as the low-latency path does)
    return ok != 0;
}

// (wire_x and wire_meta are not __restrict__: with stamps, peers write them while this kernel runs, so
// their loads must be the coherent kind that the acquire on a row's stamp orders, not read-only-cache loads.)
__device__ __forceinline__ void fm_dispatch_expand(const unsigned char* wire_x,
                                                   const fm_i64* wire_meta, fm_i64 wire_capacity,
                                                   fm_i64 row_bytes, int top_k, const fm_i64* __restrict__ summary,
                                                   fm_i64 out_rows, unsigned char* __restrict__ recv_x,
                                                   fm_i64* recv_idx, float* recv_w, fm_i64* recv_src_idx,
                                                   fm_i64* recv_src_rank, fm_i64* errors, fm_i64 warp,
                                                   fm_i64 n_warps, const fm_i64* stamps, fm_i64 generation,
                                                   fm_i64 timeout_ns, const fm_i64* barrier_gave_up,
                                                   const unsigned char* self_x, int rank)
{
    __shared__ int targets_s[8][FM_MAX_TOP_K];
    const int lane = threadIdx.x & (FM_WARP - 1);
    int* targets = targets_s[(threadIdx.x / FM_WARP) & 7];
    const fm_i64 wire_in_all = summary[FM_SUM_WIRE_IN];
    const fm_i64 wire_in = wire_in_all < wire_capacity ? wire_in_all : wire_capacity;
    const fm_i64 pairs_in = summary[FM_SUM_PAIRS_IN];
    const fm_i64 pad_begin = pairs_in < out_rows ? pairs_in : out_rows;
    const fm_i64 meta_width = 2 + 3 * static_cast<fm_i64>(top_k);
    const fm_i64 items = wire_in + (out_rows - pad_begin);
    if (warp == 0 && lane == 0 && (pairs_in > out_rows || wire_in_all > wire_capacity)) {
        const fm_i64 needed = pairs_in > wire_in_all ? pairs_in : wire_in_all;
        atomicMax(&errors[FM_ERR_NEEDED], needed);
        errors[FM_ERR_GIVEN] = out_rows;
    }
    // Padding rows first: they wait for nobody.
    for (fm_i64 j = warp; j < items; j += n_warps) {
        const fm_i64 item = j < items - wire_in ? wire_in + j : j - (items - wire_in);
        if (item >= wire_in) {  // padding row
            const fm_i64 row = pad_begin + (item - wire_in);
            unsigned char* dst = recv_x + row * row_bytes;
            if ((reinterpret_cast<fm_u64>(dst) & 15u) == 0u && (row_bytes & 15) == 0) {
                const int4 zero = make_int4(0, 0, 0, 0);
                for (fm_i64 k = lane; k < (row_bytes >> 4); k += FM_WARP) {
                    fm_store_out(reinterpret_cast<int4*>(dst) + k, zero);
                }
            } else {
                for (fm_i64 k = lane; k < row_bytes; k += FM_WARP) {
                    dst[k] = 0;
                }
            }
            if (lane == 0) {
                recv_idx[row] = -1;
                recv_w[row] = 0.0f;
                recv_src_idx[row] = -1;
                recv_src_rank[row] = -1;
            }
            continue;
        }
        if (stamps != nullptr
            && !fm_wait_stamp(stamps + item, generation, item, errors, timeout_ns, barrier_gave_up, lane)) {
            continue;
        }
        const fm_i64* meta = wire_meta + item * meta_width;
        const fm_i64 token = meta[0];
        const fm_i64 source = meta[1];
        int n_targets = 0;
        // Lanes take the slots; the output rows they own are gathered in slot order.
        for (int k0 = 0; k0 < top_k; k0 += FM_WARP) {
            const int k = k0 + lane;
            fm_i64 row = -1;
            if (k < top_k) {
                row = meta[2 + k];
                if (row >= out_rows) {
                    row = -1;  // reported above: pairs_in > out_rows
                }
                if (row >= 0) {
                    recv_idx[row] = meta[2 + top_k + k];
                    recv_w[row] = __uint_as_float(static_cast<fm_u32>(meta[2 + 2 * top_k + k]));
                    recv_src_idx[row] = token;
                    recv_src_rank[row] = source;
                }
            }
            const fm_u32 ballot = __ballot_sync(0xffffffffu, row >= 0);
            if (row >= 0) {
                targets[n_targets + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int>(row);
            }
            n_targets += __popc(ballot);
        }
        __syncwarp();
        // A row this rank sent itself comes from x when the sender left it out of the wire (self_direct).
        const unsigned char* src = self_x != nullptr && source == rank ? self_x + token * row_bytes
                                                                       : wire_x + item * row_bytes;
        fm_u64 alignment = reinterpret_cast<fm_u64>(src) | reinterpret_cast<fm_u64>(recv_x)
                           | static_cast<fm_u64>(row_bytes);
        if ((alignment & 15u) == 0u) {
            // FM_EXPAND_BATCH loads in flight per lane before their stores (the row is read once).
            const int4* src4 = reinterpret_cast<const int4*>(src);
            const fm_i64 vectors = row_bytes >> 4;
            for (fm_i64 k0 = lane; k0 < vectors; k0 += FM_WARP * FM_EXPAND_BATCH) {
                int4 v[FM_EXPAND_BATCH];
#pragma unroll
                for (int b = 0; b < FM_EXPAND_BATCH; ++b) {
                    const fm_i64 k = k0 + b * FM_WARP;
                    if (k < vectors) {
                        v[b] = src4[k];
                    }
                }
                for (int j = 0; j < n_targets; ++j) {
                    int4* dst4 = reinterpret_cast<int4*>(recv_x + targets[j] * row_bytes);
#pragma unroll
                    for (int b = 0; b < FM_EXPAND_BATCH; ++b) {
                        const fm_i64 k = k0 + b * FM_WARP;
                        if (k < vectors) {
                            fm_store_out(dst4 + k, v[b]);
                        }
                    }
                }
            }
        } else {
            for (fm_i64 k = lane; k < row_bytes; k += FM_WARP) {
                const unsigned char v = src[k];
                for (int j = 0; j < n_targets; ++j) {
                    recv_x[targets[j] * row_bytes + k] = v;
                }
            }
        }
        __syncwarp();
    }
}

extern "C" __global__ void fuser_moe_dispatch_expand(const unsigned char* __restrict__ wire_x,
                                                     const fm_i64* __restrict__ wire_meta, fm_i64 wire_capacity,
                                                     fm_i64 row_bytes, int top_k,
                                                     const fm_i64* __restrict__ summary, fm_i64 out_rows,
                                                     unsigned char* __restrict__ recv_x, fm_i64* recv_idx,
                                                     float* recv_w, fm_i64* recv_src_idx, fm_i64* recv_src_rank,
                                                     fm_i64* errors, const unsigned char* self_x, int rank)
{
    fm_dispatch_expand(wire_x, wire_meta, wire_capacity, row_bytes, top_k, summary, out_rows, recv_x, recv_idx,
                       recv_w, recv_src_idx, recv_src_rank, errors,
                       (static_cast<fm_i64>(blockIdx.x) * blockDim.x + threadIdx.x) / FM_WARP,
                       (static_cast<fm_i64>(gridDim.x) * blockDim.x) / FM_WARP, nullptr, 0, 0, nullptr, self_x,
                       rank);
}

// Streaming dispatch (capacity mode, after plan): send and expand in one kernel, with no barrier between
// them. A block takes a ticket when it starts; the first n_send tickets send chunk `ticket` (then stamp
// their rows on the receivers), the others expand this rank's wire rows as their stamps arrive. A block
// that expands waits only for blocks that started before it or for peers, so the kernel cannot deadlock
// however many of its blocks are resident at once. The last block to finish resets the tickets.
//   gen_state: the call counter (this call's generation: plan advanced it); tickets [2] int64, zero between calls;
//   stamp_ptrs [world]: every rank's stamp buffer; stamps: this rank's.
template <typename I>
__device__ __forceinline__ void fm_dispatch_send_expand(
    const unsigned char* x, fm_i64 row_bytes, const I* topk_idx, const float* topk_weights, fm_i64 tokens,
    int top_k, const fm_i64* expert_to_rank, fm_i64 num_experts, int world, int rank, fm_i64 chunk,
    const int* chunk_e, const int* chunk_d, const fm_i64* plan, const fm_u64* x_ptrs, const fm_u64* meta_ptrs,
    const fm_u64* stamp_ptrs, fm_i64 wire_capacity, fm_i64 n_send, const unsigned char* wire_x,
    const fm_i64* wire_meta, const fm_i64* stamps, const fm_i64* summary, fm_i64 out_rows, unsigned char* recv_x,
    fm_i64* recv_idx, float* recv_w, fm_i64* recv_src_idx, fm_i64* recv_src_rank, fm_i64* errors,
    const fm_i64* gen_state, fm_i64* tickets, fm_i64 timeout_ns, const fm_i64* barrier_gave_up)
{
    __shared__ fm_i64 ticket_s;
    if (threadIdx.x == 0) {
        ticket_s = static_cast<fm_i64>(atomicAdd(reinterpret_cast<unsigned long long*>(&tickets[0]), 1ull));
    }
    __syncthreads();
    const fm_i64 ticket = ticket_s;
    const fm_i64 generation = gen_state[0];
    if (ticket < n_send) {
        fm_dispatch_send<I>(x, row_bytes, topk_idx, topk_weights, tokens, top_k, expert_to_rank, num_experts, world,
                            rank, chunk, chunk_e, chunk_d, plan, x_ptrs, meta_ptrs, wire_capacity, ticket, n_send,
                            stamp_ptrs, generation, 1);
    } else {
        const fm_i64 warps_per_block = blockDim.x / FM_WARP;
        fm_dispatch_expand(wire_x, wire_meta, wire_capacity, row_bytes, top_k, summary, out_rows, recv_x, recv_idx,
                           recv_w, recv_src_idx, recv_src_rank, errors,
                           (ticket - n_send) * warps_per_block + threadIdx.x / FM_WARP,
                           (static_cast<fm_i64>(gridDim.x) - n_send) * warps_per_block, stamps, generation,
                           timeout_ns, barrier_gave_up, x, rank);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        const unsigned long long done = atomicAdd(reinterpret_cast<unsigned long long*>(&tickets[1]), 1ull);
        if (done == static_cast<unsigned long long>(gridDim.x) - 1ull) {
            tickets[0] = 0;
            tickets[1] = 0;
        }
    }
}

#define FM_DISPATCH_SEND_EXPAND(NAME, I)                                                                  \
    extern "C" __global__ void NAME(                                                                      \
        const unsigned char* x, fm_i64 row_bytes, const I* topk_idx, const float* topk_weights, fm_i64 tokens, \
        int top_k, const fm_i64* expert_to_rank, fm_i64 num_experts, int world, int rank, fm_i64 chunk,   \
        const int* chunk_e, const int* chunk_d, const fm_i64* plan, const fm_u64* x_ptrs,                 \
        const fm_u64* meta_ptrs, const fm_u64* stamp_ptrs, fm_i64 wire_capacity, fm_i64 n_send,           \
        const unsigned char* wire_x, const fm_i64* wire_meta, const fm_i64* stamps, const fm_i64* summary, \
        fm_i64 out_rows, unsigned char* recv_x, fm_i64* recv_idx, float* recv_w, fm_i64* recv_src_idx,    \
        fm_i64* recv_src_rank, fm_i64* errors, const fm_i64* gen_state, fm_i64* tickets, fm_i64 timeout_ns, \
        const fm_i64* barrier_gave_up)                                                                    \
    {                                                                                                     \
        fm_dispatch_send_expand<I>(x, row_bytes, topk_idx, topk_weights, tokens, top_k, expert_to_rank,   \
                                   num_experts, world, rank, chunk, chunk_e, chunk_d, plan, x_ptrs,       \
                                   meta_ptrs, stamp_ptrs, wire_capacity, n_send, wire_x, wire_meta,       \
                                   stamps, summary, out_rows, recv_x, recv_idx, recv_w, recv_src_idx,    \
                                   recv_src_rank, errors, gen_state, tickets, timeout_ns, barrier_gave_up); \
    }

FM_DISPATCH_SEND_EXPAND(fuser_moe_dispatch_send_expand_i64, fm_i64)
FM_DISPATCH_SEND_EXPAND(fuser_moe_dispatch_send_expand_i32, int)

// ------------------------------------------------------------------------------------------ combine
// Thread per row: rows of each (source rank s, token t) go to list g = s * t_stride + t, in any order
// (send sorts them). group_count [W * t_stride] int32 starts at zero; group_rows [W * t_stride * CAP].
extern "C" __global__ void fuser_moe_combine_group(const fm_i64* __restrict__ src_idx,
                                                   const fm_i64* __restrict__ src_rank, fm_i64 rows, int world,
                                                   fm_i64 t_stride, int* group_count, int* group_rows,
                                                   fm_i64* errors)
{
    for (fm_i64 v = static_cast<fm_i64>(blockIdx.x) * blockDim.x + threadIdx.x; v < rows;
         v += static_cast<fm_i64>(gridDim.x) * blockDim.x) {
        const fm_i64 s = src_rank[v];
        if (s < 0) {
            continue;  // capacity mode's padding
        }
        const fm_i64 t = src_idx[v];
        if (s >= world || t < 0 || t >= t_stride) {
            atomicMax(&errors[FM_ERR_BAD_ROW], v + 1);
            continue;
        }
        const fm_i64 g = s * t_stride + t;
        const int slot = atomicAdd(&group_count[g], 1);
        if (slot < FM_GROUP_CAP) {
            group_rows[g * FM_GROUP_CAP + slot] = static_cast<int>(v);
        } else {
            atomicMax(&errors[FM_ERR_BIG_GROUP], static_cast<fm_i64>(slot) + 1);
        }
    }
}

// Elements [*begin, *end) of part `part` of `split` of n (contiguous shares, the last one shorter).
__device__ __forceinline__ void fm_part_range(fm_i64 n, int part, int split, fm_i64* begin, fm_i64* end)
{
    const fm_i64 share = (n + split - 1) / split;
    *begin = part * share;
    *end = (part + 1) * share < n ? (part + 1) * share : n;
}

// A warp loads group g's rows into `list` (its per-warp shared array) and sorts them ascending (the
// contract's summation order); returns how many (at most FM_GROUP_CAP).
__device__ __forceinline__ int fm_combine_sorted_rows(const int* __restrict__ group_count,
                                                      const int* __restrict__ group_rows, fm_i64 g, int* list,
                                                      int lane)
{
    int n = group_count[g];
    n = n < FM_GROUP_CAP ? n : FM_GROUP_CAP;
    for (int i = lane; i < n; i += FM_WARP) {
        list[i] = group_rows[g * FM_GROUP_CAP + i];
    }
    __syncwarp();
    if (lane == 0) {  // insertion sort: a group holds a few rows
        for (int i = 1; i < n; ++i) {
            const int v = list[i];
            int j = i - 1;
            while (j >= 0 && list[j] > v) {
                list[j + 1] = list[j];
                --j;
            }
            list[j + 1] = v;
        }
    }
    __syncwarp();
    return n;
}

// The partial's arithmetic, in one place (the sender writes it; a self-direct reduce computes it where it
// needs it, so both must be these): the float32 sum, in the order of `list`, of w * y over its n rows, cast
// to T. fm_partial_vector: 16-byte vector v of the row into `packed` (the caller checked the alignment);
// fm_partial_element: element h.
template <typename T>
__device__ __forceinline__ void fm_partial_vector(const T* __restrict__ y, fm_i64 hidden,
                                                  const float* __restrict__ w, const int* list, int n, fm_i64 v,
                                                  fm_vec16& packed)
{
    constexpr int VEC = fm_vec_traits<T>::VEC;
    float acc[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        acc[k] = 0.0f;
    }
    for (int i = 0; i < n; ++i) {
        const fm_i64 r = list[i];
        const float wr = w[r];
        fm_vec16 in;
        in.raw = reinterpret_cast<const int4*>(y + r * hidden)[v];
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
            acc[k] = __fadd_rn(acc[k], __fmul_rn(wr, fm_lane_to_float<T>(in, k)));
        }
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
        fm_lane_from_float<T>(packed, k, acc[k]);
    }
}

template <typename T>
__device__ __forceinline__ T fm_partial_element(const T* __restrict__ y, fm_i64 hidden, const float* __restrict__ w,
                                                const int* list, int n, fm_i64 h)
{
    float acc = 0.0f;
    for (int i = 0; i < n; ++i) {
        const fm_i64 r = list[i];
        acc = __fadd_rn(acc, __fmul_rn(w[r], fm_to_float(y[r * hidden + h])));
    }
    return fm_from_float<T>(acc);
}

// A warp writes part `part` of `split` (a contiguous share of the columns) of a partial row: the float32
// sum of w * y over the n rows of `list` in that order, cast.
template <typename T>
__device__ __forceinline__ void fm_combine_partial_part(const T* __restrict__ y, fm_i64 hidden,
                                                        const float* __restrict__ w, const int* list, int n,
                                                        T* out, int part, int split, int lane)
{
    constexpr int VEC = fm_vec_traits<T>::VEC;
    if (fm_aligned16(y) && (hidden % VEC) == 0 && fm_aligned16(out)) {
        fm_i64 v_begin, v_end;
        fm_part_range(hidden / VEC, part, split, &v_begin, &v_end);
        for (fm_i64 v = v_begin + lane; v < v_end; v += FM_WARP) {
            fm_vec16 packed;
            fm_partial_vector<T>(y, hidden, w, list, n, v, packed);
            reinterpret_cast<int4*>(out)[v] = packed.raw;
        }
    } else {
        fm_i64 h_begin, h_end;
        fm_part_range(hidden, part, split, &h_begin, &h_end);
        for (fm_i64 h = h_begin + lane; h < h_end; h += FM_WARP) {
            out[h] = fm_partial_element<T>(y, hidden, w, list, n, h);
        }
    }
}

// The combine's own partial (self-direct): the partial row of this rank's own tokens is not written to
// the partial buffer and read back; the reduce computes it where it needs it, with the sender's helpers
// (fm_partial_vector / fm_partial_element), so its bits are the same. `self` says which rows: y and w
// (the expert outputs and weights), the group's sorted rows, their count, and the expert rank whose term
// they are (-1: none, every partial comes from the buffer).
template <typename T>
struct fm_self_partial {
    const T* y;
    const float* w;
    const int* list;
    int n;
    int rank;
};

// A warp writes part `part` of `split` of a token's combined row: the float32 sum of the partial rows of
// the expert ranks in `present` (bit e), in ascending rank order, cast. partials: row e * t_stride + t;
// the term of expert rank self.rank (when it is present) is computed from self's rows instead.
template <typename T>
__device__ __forceinline__ void fm_combine_reduce_part(const T* partials, fm_i64 t_stride, fm_i64 t,
                                                       fm_i64 hidden, int world, fm_u64 present, T* out_row,
                                                       int part, int split, int lane,
                                                       const fm_self_partial<T>& self)
{
    constexpr int VEC = fm_vec_traits<T>::VEC;
    if (fm_aligned16(partials) && fm_aligned16(out_row) && (hidden % VEC) == 0
        && (self.rank < 0 || fm_aligned16(self.y))) {
        fm_i64 v_begin, v_end;
        fm_part_range(hidden / VEC, part, split, &v_begin, &v_end);
        for (fm_i64 v = v_begin + lane; v < v_end; v += FM_WARP) {
            float acc[VEC];
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                acc[k] = 0.0f;
            }
            for (int e = 0; e < world; ++e) {
                if (!((present >> e) & 1ull)) {
                    continue;
                }
                fm_vec16 in;
                if (e == self.rank) {  // the partial as the buffer would hold it
                    fm_partial_vector<T>(self.y, hidden, self.w, self.list, self.n, v, in);
                } else {
                    const T* row = partials + (static_cast<fm_i64>(e) * t_stride + t) * hidden;
                    in.raw = reinterpret_cast<const int4*>(row)[v];
                }
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
            reinterpret_cast<int4*>(out_row)[v] = packed.raw;
        }
    } else {
        fm_i64 h_begin, h_end;
        fm_part_range(hidden, part, split, &h_begin, &h_end);
        for (fm_i64 h = h_begin + lane; h < h_end; h += FM_WARP) {
            float acc = 0.0f;
            for (int e = 0; e < world; ++e) {
                if (!((present >> e) & 1ull)) {
                    continue;
                }
                if (e == self.rank) {
                    acc = __fadd_rn(acc, fm_to_float(fm_partial_element<T>(self.y, hidden, self.w, self.list,
                                                                           self.n, h)));
                } else {
                    acc = __fadd_rn(acc, fm_to_float(partials[(static_cast<fm_i64>(e) * t_stride + t) * hidden + h]));
                }
            }
            out_row[h] = fm_from_float<T>(acc);
        }
    }
}

// `split` warps per group g = s * t_stride + t: the float32 sum of w * y over the group's rows in row order, cast,
// into row rank * t_stride + t of rank s's partial buffer, and that row's flag set to 1. counts [2]:
// partial rows sent to other ranks (for traces).
template <typename T>
__device__ __forceinline__ void fm_combine_send(const T* __restrict__ y, fm_i64 hidden,
                                                const float* __restrict__ w, int world, int rank, fm_i64 t_stride,
                                                const int* __restrict__ group_count,
                                                const int* __restrict__ group_rows,
                                                const fm_u64* __restrict__ part_ptrs,
                                                const fm_u64* __restrict__ flag_ptrs, int* counts, int split,
                                                int self_direct)
{
    __shared__ int rows_s[8][FM_GROUP_CAP];
    const int lane = threadIdx.x & (FM_WARP - 1);
    int* list = rows_s[threadIdx.x / FM_WARP];
    const fm_i64 warp = (static_cast<fm_i64>(blockIdx.x) * blockDim.x + threadIdx.x) / FM_WARP;
    const fm_i64 n_warps = (static_cast<fm_i64>(gridDim.x) * blockDim.x) / FM_WARP;
    // `split` warps per group (few groups: decode), each a contiguous share of the row's columns.
    for (fm_i64 job = warp; job < world * t_stride * split; job += n_warps) {
        const fm_i64 g = job / split;
        const int part = static_cast<int>(job % split);
        if (group_count[g] == 0 || (self_direct && g / t_stride == rank)) {
            continue;  // no rows; or this rank's own tokens, whose partial the reduce computes (self_direct)
        }
        const int n = fm_combine_sorted_rows(group_count, group_rows, g, list, lane);
        const int s = static_cast<int>(g / t_stride);
        const fm_i64 t = g % t_stride;
        T* out = reinterpret_cast<T*>(part_ptrs[s]) + (static_cast<fm_i64>(rank) * t_stride + t) * hidden;
        fm_combine_partial_part<T>(y, hidden, w, list, n, out, part, split, lane);
        if (lane == 0 && part == 0) {
            reinterpret_cast<int*>(flag_ptrs[s])[static_cast<fm_i64>(rank) * t_stride + t] = 1;
            if (s != rank) {
                atomicAdd(&counts[0], 1);
            }
        }
        __syncwarp();
    }
}

#define FM_COMBINE_SEND(NAME, T)                                                                          \
    extern "C" __global__ void NAME(const T* y, fm_i64 hidden, const float* w, int world, int rank,       \
                                    fm_i64 t_stride, const int* group_count, const int* group_rows,       \
                                    const fm_u64* part_ptrs, const fm_u64* flag_ptrs, int* counts,        \
                                    int split, int self_direct)                                           \
    {                                                                                                     \
        fm_combine_send<T>(y, hidden, w, world, rank, t_stride, group_count, group_rows, part_ptrs,       \
                           flag_ptrs, counts, split, self_direct);                                        \
    }

FM_COMBINE_SEND(fuser_moe_combine_send_f32, float)
FM_COMBINE_SEND(fuser_moe_combine_send_bf16, fm_bf16)
FM_COMBINE_SEND(fuser_moe_combine_send_f16, fm_f16)

// Warp per token t < t_stride: out[t] = float32 sum of the partials present for t, in ascending expert-rank order,
// cast; a token with none gets zeros. Clears the flags it read. counts[1]: partial rows from other ranks.
// self_y (self-direct; null: off): this rank's expert outputs [V, H] with self_w [V] and the group kernel's
// group_count / group_rows: this rank's own term (expert rank `rank`) is computed from them, not read.
template <typename T>
__device__ __forceinline__ void fm_combine_reduce(const T* __restrict__ partials, int* flags, int world, int rank,
                                                  fm_i64 t_stride, fm_i64 num_tokens, fm_i64 hidden,
                                                  T* __restrict__ out, int* counts, const T* __restrict__ self_y,
                                                  const float* __restrict__ self_w,
                                                  const int* __restrict__ group_count,
                                                  const int* __restrict__ group_rows)
{
    __shared__ int rows_s[8][FM_GROUP_CAP];
    int* list = rows_s[(threadIdx.x / FM_WARP) & 7];
    const int lane = threadIdx.x & (FM_WARP - 1);
    const fm_i64 warp = (static_cast<fm_i64>(blockIdx.x) * blockDim.x + threadIdx.x) / FM_WARP;
    const fm_i64 n_warps = (static_cast<fm_i64>(gridDim.x) * blockDim.x) / FM_WARP;
    // Every token slot of the layout, so that no flag outlives the call (a row for a token past
    // num_tokens only comes from an unchecked bad input; it is dropped, not kept for the next call).
    for (fm_i64 t = warp; t < t_stride; t += n_warps) {
        if (t >= num_tokens) {
            for (int e = lane; e < world; e += FM_WARP) {
                flags[static_cast<fm_i64>(e) * t_stride + t] = 0;
            }
            continue;
        }
        fm_u64 present = 0;
        for (int e = 0; e < world; ++e) {
            if (flags[static_cast<fm_i64>(e) * t_stride + t] != 0) {
                present |= 1ull << e;
            }
        }
        fm_self_partial<T> self{nullptr, nullptr, list, 0, -1};
        if (self_y != nullptr) {
            const fm_i64 g = static_cast<fm_i64>(rank) * t_stride + t;
            self = fm_self_partial<T>{self_y, self_w, list, 0, rank};
            present &= ~(1ull << rank);  // the group says, not a flag (none is set for this rank's own term)
            if (group_count[g] != 0) {
                self.n = fm_combine_sorted_rows(group_count, group_rows, g, list, lane);
                present |= 1ull << rank;
            }
        }
        __syncwarp();
        fm_combine_reduce_part<T>(partials, t_stride, t, hidden, world, present, out + t * hidden, 0, 1, lane,
                                  self);
        for (int e = lane; e < world; e += FM_WARP) {
            if ((present >> e) & 1ull) {
                flags[static_cast<fm_i64>(e) * t_stride + t] = 0;
                if (e != rank) {
                    atomicAdd(&counts[1], 1);
                }
            }
        }
        __syncwarp();  // `list` is read by every lane before the next token overwrites it
    }
}

#define FM_COMBINE_REDUCE(NAME, T)                                                                        \
    extern "C" __global__ void NAME(const T* partials, int* flags, int world, int rank, fm_i64 t_stride,  \
                                    fm_i64 num_tokens, fm_i64 hidden, T* out, int* counts,                \
                                    const T* self_y, const float* self_w, const int* group_count,         \
                                    const int* group_rows)                                                \
    {                                                                                                     \
        fm_combine_reduce<T>(partials, flags, world, rank, t_stride, num_tokens, hidden, out, counts,     \
                             self_y, self_w, group_count, group_rows);                                    \
    }

FM_COMBINE_REDUCE(fuser_moe_combine_reduce_f32, float)
FM_COMBINE_REDUCE(fuser_moe_combine_reduce_bf16, fm_bf16)
FM_COMBINE_REDUCE(fuser_moe_combine_reduce_f16, fm_f16)

// Streaming combine (the cuda backend, after group and the call's one barrier): send and reduce in one
// kernel, with no barrier between them. A block takes a ticket when it starts; the first n_send tickets
// send, the others reduce. Senders go over (token, source rank, part) jobs token-major, so every source
// gets its first tokens' partials first; each job writes its part of the partial row (when the group has
// rows) and then stamps it on the source: stamp 2g + 1 (a partial is there) or 2g (none), g the call's
// generation. A reducing warp takes (token, part) jobs in token order, waits until every expert rank's
// stamp of that part reads at least 2g, and sums the partials present in ascending expert-rank order, as
// fm_combine_reduce does. Stamps only grow (generations start at 1 on zeroed buffers), so a stamp of an
// earlier call, whatever its layout, is never taken for this one; the call's barrier keeps a fast rank
// from stamping the next call before a slow source has read this one. A block that reduces waits only
// for senders, which started before it or run on peers, so the kernel cannot deadlock.
//   part_ptrs / stamp_ptrs [world]: every rank's partial rows [W * t_stride, H] and stamps
//   [W * t_stride * split] int64 (row e * t_stride + t, part p at (e * t_stride + t) * split + p);
//   partials / stamps: this rank's. words [3] int64: generation (calls done), start ticket, end ticket.
//   errors[FM_ERR_COMBINE_TIMEOUT]: 1 + a token whose partial never came (then nobody waits again; the
//   host raises a TimeoutError at its next check). barrier_gave_up: the transport's timeout_generation
//   word; once the call's barrier gave up (a peer missed it and sends nothing) nobody waits either.
//   counts [2]: partial rows sent to / received from peers.

#ifndef FM_COMBINE_STAMP_FENCE
#define FM_COMBINE_STAMP_FENCE 1  // 0: the stamp's release alone orders the warp's part (for timing)
#endif
template <typename T>
__device__ __forceinline__ void fm_combine_send_reduce(
    const T* __restrict__ y, fm_i64 hidden, const float* __restrict__ w, int world, int rank, fm_i64 t_stride,
    fm_i64 num_tokens, const int* __restrict__ group_count, const int* __restrict__ group_rows,
    const fm_u64* __restrict__ part_ptrs, const fm_u64* __restrict__ stamp_ptrs, const T* partials,
    const fm_i64* stamps, T* out, int* counts, int split, fm_i64 n_send, fm_i64* words, fm_i64* errors,
    fm_i64 timeout_ns, const fm_i64* barrier_gave_up)
{
    __shared__ int rows_s[8][FM_GROUP_CAP];
    __shared__ fm_i64 ticket_s;
    if (threadIdx.x == 0) {
        ticket_s = static_cast<fm_i64>(atomicAdd(reinterpret_cast<unsigned long long*>(&words[1]), 1ull));
    }
    __syncthreads();
    const fm_i64 ticket = ticket_s;
    const fm_i64 generation = words[0] + 1;
    const int lane = threadIdx.x & (FM_WARP - 1);
    const fm_i64 warps_per_block = blockDim.x / FM_WARP;
    if (ticket < n_send) {
        int* list = rows_s[threadIdx.x / FM_WARP];
        const fm_i64 per_token = static_cast<fm_i64>(world) * split;
        for (fm_i64 job = ticket * warps_per_block + threadIdx.x / FM_WARP; job < t_stride * per_token;
             job += n_send * warps_per_block) {
            const fm_i64 t = job / per_token;
            const int s = static_cast<int>((job % per_token) / split + rank) % world;  // this rank's first
            const int part = static_cast<int>(job % split);
            const fm_i64 g = static_cast<fm_i64>(s) * t_stride + t;
            const fm_i64 row = static_cast<fm_i64>(rank) * t_stride + t;
            const bool present = group_count[g] != 0;
            if (present) {
                const int n = fm_combine_sorted_rows(group_count, group_rows, g, list, lane);
                fm_combine_partial_part<T>(y, hidden, w, list, n, reinterpret_cast<T*>(part_ptrs[s]) + row * hidden,
                                           part, split, lane);
            }
            __syncwarp();
            if (lane == 0) {
                if (present) {
#if FM_COMBINE_STAMP_FENCE
                    __threadfence_system();  // the warp's part (after __syncwarp) before its stamp
#endif
                    if (part == 0 && s != rank) {
                        atomicAdd(&counts[0], 1);
                    }
                }
                fm_store_release_sys(reinterpret_cast<fm_i64*>(stamp_ptrs[s]) + row * split + part,
                                     2 * generation + (present ? 1 : 0));
            }
            __syncwarp();
        }
    } else {
        const fm_i64 n_reduce = static_cast<fm_i64>(gridDim.x) - n_send;
        volatile fm_i64* timed_out = &errors[FM_ERR_COMBINE_TIMEOUT];
        const volatile fm_i64* barrier_out = barrier_gave_up;
        for (fm_i64 job = (ticket - n_send) * warps_per_block + threadIdx.x / FM_WARP; job < num_tokens * split;
             job += n_reduce * warps_per_block) {
            const fm_i64 t = job / split;
            const int part = static_cast<int>(job % split);
            // Lane e % 32 waits for expert rank e's stamp (every rank stamps every token, rows or not).
            fm_u64 present = 0;
            bool ok = true;
            for (int e0 = 0; e0 < world; e0 += FM_WARP) {
                const int e = e0 + lane;
                fm_i64 stamp = 2 * generation;
                if (e < world) {
                    const fm_i64* at = stamps + (static_cast<fm_i64>(e) * t_stride + t) * split + part;
                    stamp = fm_load_acquire_sys(at);
                    const fm_u64 start = fm_globaltimer_ns();
                    unsigned int polls = 0;
                    while (stamp < 2 * generation) {
                        if (*timed_out != 0 || *barrier_out != 0) {
                            break;
                        }
                        ++polls;
                        if ((polls & 63u) == 0u && static_cast<fm_i64>(fm_globaltimer_ns() - start) > timeout_ns) {
                            atomicCAS(reinterpret_cast<unsigned long long*>(&errors[FM_ERR_COMBINE_TIMEOUT]), 0ull,
                                      static_cast<unsigned long long>(t + 1));
                            break;
                        }
                        if (polls > 256u) {
                            __nanosleep(64);
                        }
                        stamp = fm_load_acquire_sys(at);
                    }
                }
                ok = __all_sync(0xffffffffu, stamp >= 2 * generation) && ok;
                const unsigned int here = __ballot_sync(0xffffffffu, e < world && stamp == 2 * generation + 1);
                present |= static_cast<fm_u64>(here) << e0;
            }
            __threadfence();  // every lane's loads of the partials after the acquires
            if (!ok) {
                continue;  // a peer never stamped: the output is garbage, the host raises
            }
            // Not self-direct: at W=1 it moved every sum onto the reducers (one block an SM) and took the
            // combine from 208 to 446 us on one H200; this rank's own partials travel as the peers' do.
            const fm_self_partial<T> self{nullptr, nullptr, nullptr, 0, -1};
            fm_combine_reduce_part<T>(partials, t_stride, t, hidden, world, present, out + t * hidden, part, split,
                                      lane, self);
            if (part == 0) {
                for (int e = lane; e < world; e += FM_WARP) {
                    if (e != rank && ((present >> e) & 1ull)) {
                        atomicAdd(&counts[1], 1);
                    }
                }
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned long long done = atomicAdd(reinterpret_cast<unsigned long long*>(&words[2]), 1ull);
        if (done == static_cast<unsigned long long>(gridDim.x) - 1ull) {
            words[1] = 0;
            words[2] = 0;
            words[0] = generation;
        }
    }
}

#define FM_COMBINE_SEND_REDUCE(NAME, T)                                                                   \
    extern "C" __global__ void NAME(const T* y, fm_i64 hidden, const float* w, int world, int rank,       \
                                    fm_i64 t_stride, fm_i64 num_tokens, const int* group_count,           \
                                    const int* group_rows, const fm_u64* part_ptrs, const fm_u64* stamp_ptrs, \
                                    const T* partials, const fm_i64* stamps, T* out, int* counts, int split, \
                                    fm_i64 n_send, fm_i64* words, fm_i64* errors, fm_i64 timeout_ns,      \
                                    const fm_i64* barrier_gave_up)                                        \
    {                                                                                                     \
        fm_combine_send_reduce<T>(y, hidden, w, world, rank, t_stride, num_tokens, group_count, group_rows, \
                                  part_ptrs, stamp_ptrs, partials, stamps, out, counts, split, n_send, words, \
                                  errors, timeout_ns, barrier_gave_up);                                   \
    }

FM_COMBINE_SEND_REDUCE(fuser_moe_combine_send_reduce_f32, float)
FM_COMBINE_SEND_REDUCE(fuser_moe_combine_send_reduce_bf16, fm_bf16)
FM_COMBINE_SEND_REDUCE(fuser_moe_combine_send_reduce_f16, fm_f16)
