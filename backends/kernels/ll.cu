// Low-latency path of the CUDA backend: dispatch in two kernels and combine in two kernels, with no
// group barrier and no host work, for small batches (decode) in capacity mode.
//
// Every rank owns, in symmetric memory, receive buffers laid out by (parity, source rank, slot), where a
// slot is a token's position among the tokens that its source sends to this rank (so at most the
// capacity C of slots per source are ever needed), and one flag word per source rank. A call's
// generation g (a device-resident counter, so a replayed CUDA graph gets a fresh one) picks the parity
// g & 1 of the buffers, and a source announces that its rows for generation g are in place through its
// flag word on the receiver: each of its send blocks adds its arrival there (release; the arrivals of one
// call sum to FM_LL_ARRIVAL), and the receiver waits for flag >= g * FM_LL_ARRIVAL (acquire). Double
// buffering is enough: a source can only start writing generation g + 2 after its own receive kernel of
// g + 1, which waited for this rank's send of g + 1, which this rank issued after its receive of g.
//
// Dispatch, on source rank r:
//   send  (a block per chunk of tokens)  each token's row of x goes once to each other destination rank d
//         that one of its experts lives on, into slot (parity, r, position of the token among r's tokens
//         for d) of d's wire buffer, with a metadata row [token, K x (expert or -1, position of the token
//         among r's tokens for that expert, weight bits)]. Every block routes all T tokens (fm_ll_route:
//         counts only, then its chunk's positions), so each knows the totals; block 0 writes, for every
//         d != r, the header [tokens for d, T, pairs for each of d's local experts] beside its rows, and
//         every block adds its arrival to every rank's flag (its own included) once its rows are out.
//   recv  block b routes chunk b of r's own tokens with the same fm_ll_route (self-routed: r sends
//         itself nothing, so at W=1 nothing is waited for before the copies), then waits for every peer's
//         flag; from its own counts and the peers' headers, expert j's rows from source s start at (rows
//         of experts < j) + (rows of j from sources < s), so each pair's output row is that plus the
//         position the sender computed: the contract's order (local expert, source rank, source token)
//         without a sort. A warp reads a part of a row once (r's own tokens from x, the peers' wire rows)
//         and stores it to the output row of each of the row's pairs here (up to K); padding rows [V, C)
//         are filled, a warp a row. Last, it waits for its own send's arrival (the generation it
//         advances and the handle that the combine reads follow that kernel).
// Combine, on expert rank r, with the handle the low-latency dispatch left (each wire row's output
// rows; each of the source's tokens' slot on each expert rank):
//   send  (warps over wire rows)  float32 sum of w * y over the wire row's output rows in ascending row
//         order, cast, written to slot (parity, r, slot) of the source's partial buffer, for every source
//         but r itself; the last block sets the flags.
//   recv  (warps over tokens)  waits for every expert rank's flag and adds a token's partials in
//         ascending expert-rank order, in float32 from +0.0; its own rank's partial it computes itself
//         from y with the send's arithmetic (self-direct).
// Each receive kernel is launched with programmatic stream serialisation where the device has it (it
// may start while its send kernel runs, which lets it go at once: fm_launch_dependents); it orders
// itself after every send, its own included, by the flags alone.
//
// Rounding is the contract's (docs/contract.md section 4): products and sums are rounded one by one
// (__fmul_rn, __fadd_rn), casts round to nearest even. Compiles under nvcc and NVRTC: no system headers
// (fm_device.cuh holds the types every kernel file shares).

#include "fm_device.cuh"

constexpr int FM_LL_WARP = FM_WARP;
constexpr int FM_LL_MAX_WORLD = 64;
constexpr int FM_LL_MAX_TOP_K = 32;  // a warp's lanes hold one slot each in combine send
constexpr int FM_LL_THREADS = 512;   // every kernel here: 16 warps a block (per-warp tables below)
constexpr int FM_LL_WARPS = FM_LL_THREADS / FM_LL_WARP;
constexpr int FM_LL_BATCH = 8;       // rows whose vectors are loaded before they are summed

// Words of the path's own state block (int64, local to each rank).
constexpr int FM_LL_GEN_DISPATCH = 0;    // dispatch calls completed by this rank's receive kernel
constexpr int FM_LL_TICKET_DSEND = 1;    // unused (the send kernels count arrivals in the flags)
constexpr int FM_LL_TICKET_DRECV = 2;
constexpr int FM_LL_GEN_COMBINE = 3;
constexpr int FM_LL_TICKET_CSEND = 4;    // unused
constexpr int FM_LL_TICKET_CRECV = 5;
constexpr int FM_LL_TIMEOUT_PHASE = 6;   // 1 dispatch, 2 combine: a wait that gave up (sticky until checked)
constexpr int FM_LL_TIMEOUT_MISSING = 7; // bit s set: source s never announced its rows
constexpr int FM_LL_STATE_WORDS = 8;

// Words of the backend's error block that these kernels set (the same as moe.cu's FM_ERR_*).
constexpr int FM_LL_ERR_NEEDED = 0;
constexpr int FM_LL_ERR_GIVEN = 1;

// ------------------------------------------------------------------------------------------ helpers
// Phase stamps, for kernel work only (FUSER_MOE_KERNEL_DEFINES="FM_LL_STAMPS"; tools/ll_stamps.py reads
// them): for stamp i, the first and the last %globaltimer at which a block's thread 0 passed point i.
// Compiled out by default.
#ifdef FM_LL_STAMPS
constexpr int FM_LL_STAMP_COUNT = 32;
__device__ fm_u64 fm_ll_stamp_first[FM_LL_STAMP_COUNT];
__device__ fm_u64 fm_ll_stamp_last[FM_LL_STAMP_COUNT];
__device__ fm_u64 fm_ll_block_start[1024];  // the dispatch receive's blocks: when each began
#define FM_LL_BLOCK_START()                                                               \
    do {                                                                                  \
        if (threadIdx.x == 0 && blockIdx.x < 1024) {                                      \
            fm_ll_block_start[blockIdx.x] = fm_globaltimer_ns();                          \
        }                                                                                 \
    } while (0)
#define FM_LL_STAMP(i)                                                          \
    do {                                                                        \
        if (threadIdx.x == 0) {                                                 \
            const fm_u64 stamp_now = fm_globaltimer_ns();                       \
            atomicMin(&fm_ll_stamp_first[i], static_cast<unsigned long long>(stamp_now)); \
            atomicMax(&fm_ll_stamp_last[i], static_cast<unsigned long long>(stamp_now));  \
        }                                                                       \
    } while (0)
#else
#define FM_LL_BLOCK_START() \
    do {                    \
    } while (0)
#define FM_LL_STAMP(i) \
    do {               \
    } while (0)
#endif

extern __shared__ fm_u64 fm_ll_shared[];  // dynamic shared memory of every kernel here
static_assert(FM_LL_TIMEOUT_MISSING < FM_LL_STATE_WORDS, "the state block holds every word");
static_assert(FM_LL_TICKET_DSEND != FM_LL_TICKET_CSEND, "words 1 and 4 stay reserved (the layout Python mirrors)");

// A warp copies bytes [begin, end) of a row (16-byte vectors when everything is 16-byte aligned). Each
// lane issues up to FM_LL_COPY_BATCH loads before its stores, the tail included (predicated), so a part
// of n vectors costs ceil(n / (32 * FM_LL_COPY_BATCH)) memory round trips: at decode sizes a copy is
// bound by round trips, not bandwidth.
#ifndef FM_LL_COPY_BATCH
#define FM_LL_COPY_BATCH 8
#endif
__device__ __forceinline__ void fm_ll_warp_copy(unsigned char* dst, const unsigned char* src, fm_i64 begin,
                                                fm_i64 end, int lane)
{
    const fm_u64 alignment = reinterpret_cast<fm_u64>(dst) | reinterpret_cast<fm_u64>(src)
                             | static_cast<fm_u64>(begin) | static_cast<fm_u64>(end);
    if ((alignment & 15u) == 0u) {
        const int4* s4 = reinterpret_cast<const int4*>(src + begin);
        int4* d4 = reinterpret_cast<int4*>(dst + begin);
        const fm_i64 n4 = (end - begin) >> 4;
        for (fm_i64 k0 = lane; k0 < n4; k0 += FM_LL_COPY_BATCH * FM_LL_WARP) {
            int4 v[FM_LL_COPY_BATCH];
#pragma unroll
            for (int u = 0; u < FM_LL_COPY_BATCH; ++u) {
                if (k0 + u * FM_LL_WARP < n4) {
                    v[u] = s4[k0 + u * FM_LL_WARP];
                }
            }
#pragma unroll
            for (int u = 0; u < FM_LL_COPY_BATCH; ++u) {
                if (k0 + u * FM_LL_WARP < n4) {
                    d4[k0 + u * FM_LL_WARP] = v[u];
                }
            }
        }
    } else {
        for (fm_i64 k = begin + lane; k < end; k += FM_LL_WARP) {
            dst[k] = src[k];
        }
    }
}

__device__ __forceinline__ void fm_ll_warp_zero(unsigned char* dst, fm_i64 begin, fm_i64 end, int lane)
{
    const fm_u64 alignment = reinterpret_cast<fm_u64>(dst) | static_cast<fm_u64>(begin) | static_cast<fm_u64>(end);
    if ((alignment & 15u) == 0u) {
        int4* d4 = reinterpret_cast<int4*>(dst + begin);
        const int4 zero = make_int4(0, 0, 0, 0);
        for (fm_i64 k = lane; k < (end - begin) >> 4; k += FM_LL_WARP) {
            d4[k] = zero;
        }
    } else {
        for (fm_i64 k = begin + lane; k < end; k += FM_LL_WARP) {
            dst[k] = 0;
        }
    }
}

// Bytes [begin, end) of part `part` of `parts` of a row of `row_bytes` (parts cut at 16-byte bounds).
__device__ __forceinline__ void fm_ll_part(fm_i64 row_bytes, int part, int parts, fm_i64* begin, fm_i64* end)
{
    fm_i64 seg = (row_bytes + parts - 1) / parts;
    seg = (seg + 15) & ~static_cast<fm_i64>(15);
    *begin = part * seg < row_bytes ? part * seg : row_bytes;
    *end = *begin + seg < row_bytes ? *begin + seg : row_bytes;
}

// Flags count arrivals: every block of a send kernel adds to this rank's flag word on every receiver,
// block 0 FM_LL_ARRIVAL - (blocks - 1) and each other block 1, so a call adds exactly FM_LL_ARRIVAL
// and the word reaches generation * FM_LL_ARRIVAL when, and only when, the call's last block has
// arrived (before block 0 arrives the others add at most blocks - 1 < FM_LL_ARRIVAL; after it, the sum
// stays short until the last). No block waits for another (no ticket): the receiver sees the last
// block's rows one reduction after they are written.
constexpr fm_i64 FM_LL_ARRIVAL = fm_i64(1) << 32;

// The flag value that says a call of `generation` has fully arrived, and whether `flag` is still short
// of `target`. Both in modular (unsigned) arithmetic: generation * FM_LL_ARRIVAL leaves int64 after 2^31
// calls (half a day of decode at 20 us a call), and a flag is never more than one call away from the
// target, so the signed difference orders them across the wrap.
__device__ __forceinline__ fm_i64 fm_ll_arrived(fm_i64 generation)
{
    return static_cast<fm_i64>(static_cast<fm_u64>(generation) * static_cast<fm_u64>(FM_LL_ARRIVAL));
}

__device__ __forceinline__ bool fm_ll_behind(fm_i64 flag, fm_i64 target)
{
    return static_cast<fm_i64>(static_cast<fm_u64>(flag) - static_cast<fm_u64>(target)) < 0;
}

// Waits (threads s < world of the block, one source each, those that `which` selects) until no flag[s] is behind `generation`
// (fm_ll_behind), or gives up after timeout_ns and records which sources never came. After a recorded timeout nobody waits again
// until the host has seen it. Ends with a block-wide barrier and a fence; returns true when this block
// gave up or found an earlier timeout (then the caller reads no peer's rows).
constexpr int FM_LL_WAIT_ALL = 0;    // every source
constexpr int FM_LL_WAIT_PEERS = 1;  // every source but `rank`
constexpr int FM_LL_WAIT_SELF = 2;   // `rank` alone
__device__ bool fm_ll_wait_flags(const fm_i64* flags, int world, fm_i64 generation, fm_i64* state, int phase,
                                 fm_i64 timeout_ns, int rank, int which)
{
    __shared__ int gave_up;
    if (threadIdx.x == 0) {
        gave_up = 0;
    }
    __syncthreads();
    for (int s = threadIdx.x; s < world; s += blockDim.x) {
        if ((which == FM_LL_WAIT_PEERS && s == rank) || (which == FM_LL_WAIT_SELF && s != rank)) {
            continue;
        }
        // The sticky timeout word is read with the first poll (one memory round trip for both).
        const fm_i64 earlier = *reinterpret_cast<volatile fm_i64*>(&state[FM_LL_TIMEOUT_PHASE]);
        fm_i64 flag = fm_load_acquire_sys(flags + s);
        if (earlier != 0) {
            gave_up = 1;
            continue;
        }
        const fm_u64 start = fm_globaltimer_ns();
        unsigned int polls = 0;
        while (fm_ll_behind(flag, generation)) {
            ++polls;
            if ((polls & 63u) == 0u && static_cast<fm_i64>(fm_globaltimer_ns() - start) > timeout_ns) {
                atomicOr(reinterpret_cast<unsigned long long*>(&state[FM_LL_TIMEOUT_MISSING]), 1ull << s);
                atomicMax(reinterpret_cast<unsigned long long*>(&state[FM_LL_TIMEOUT_PHASE]),
                          static_cast<unsigned long long>(phase));
                gave_up = 1;
                break;
            }
            if (polls > 256u) {
                __nanosleep(64);
            }
            flag = fm_load_acquire_sys(flags + s);
        }
    }
    __syncthreads();
    __threadfence();
    return gave_up != 0;
}

// Exclusive prefix sum of data[0, n) in shared memory, in place, by the whole block; returns the total.
// Each thread sums a contiguous run, a warp scan combines the runs.
__device__ fm_i64 fm_ll_block_scan(fm_i64* data, int n)
{
    __shared__ fm_i64 warp_total[FM_LL_WARPS];
    __shared__ fm_i64 total;
    const int lane = threadIdx.x & (FM_LL_WARP - 1);
    const int warp = threadIdx.x / FM_LL_WARP;
    const int per = (n + blockDim.x - 1) / blockDim.x;
    const int begin = threadIdx.x * per < n ? threadIdx.x * per : n;
    const int end = begin + per < n ? begin + per : n;
    fm_i64 run = 0;
    for (int i = begin; i < end; ++i) {
        run += data[i];
    }
    fm_i64 inclusive = run;
    for (int offset = 1; offset < FM_LL_WARP; offset <<= 1) {
        const fm_i64 other = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) {
            inclusive += other;
        }
    }
    if (lane == FM_LL_WARP - 1) {
        warp_total[warp] = inclusive;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        fm_i64 sum = 0;
        for (int w = 0; w < static_cast<int>(blockDim.x / FM_LL_WARP); ++w) {
            const fm_i64 v = warp_total[w];
            warp_total[w] = sum;
            sum += v;
        }
        total = sum;
    }
    __syncthreads();
    fm_i64 prefix = warp_total[warp] + inclusive - run;
    for (int i = begin; i < end; ++i) {
        const fm_i64 v = data[i];
        data[i] = prefix;
        prefix += v;
    }
    __syncthreads();
    return total;
}

// The end of a send kernel: after the block's barrier, threads d < world each add the block's arrival
// to this rank's flag word on rank d with a system-scope release reduction. The release is cumulative
// over the barrier, so it orders every thread's writes of the block before the arrival (one fence; a
// __threadfence_system before it would be a second).
__device__ __forceinline__ void fm_ll_finish_send(const fm_u64* flag_ptrs, int world, int rank)
{
    __syncthreads();
    const fm_i64 arrival = blockIdx.x == 0 ? FM_LL_ARRIVAL - static_cast<fm_i64>(gridDim.x - 1) : fm_i64(1);
    for (int d = threadIdx.x; d < world; d += blockDim.x) {
        fm_red_add_release_sys(reinterpret_cast<fm_i64*>(flag_ptrs[d]) + rank, arrival);
    }
}

// The end of a receive kernel: the last block to arrive (a ticket) resets the ticket and advances the
// generation, after every block has read the old one. Receivers write only local memory, so a GPU-scope
// fence orders a block's reads and writes before its ticket.
__device__ __forceinline__ void fm_ll_finish_receive(fm_i64* state, int ticket_word, int generation_word,
                                                     fm_i64 generation)
{
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        const unsigned long long old = atomicAdd(reinterpret_cast<unsigned long long*>(&state[ticket_word]), 1ull);
        if (old == static_cast<unsigned long long>(gridDim.x) - 1ull) {
            state[ticket_word] = 0;
            state[generation_word] = generation;
        }
    }
}

// ------------------------------------------------------------------------------------------ dispatch
// Buffers of every rank (rows of the wire and metadata buffers: (parity * world + source) * slots + slot):
//   x_ptrs[d]    wire rows, row_bytes each
//   meta_ptrs[d] int32 rows of 1 + 4K: token, then K x (expert or -1, its local index on d, position
//                among the source's tokens of that expert, weight bits)
//   head_ptrs[d] int64 rows (parity * world + source) of head_width = 2 + L: tokens for d, T, pairs for
//                each local expert of d (local order)
//   flag_ptrs[d] int64 [world]: the generation whose rows source s has put in place
// A rank writes none of these for itself: its receive kernel routes its own tokens from topk_idx
// (fm_ll_route, the send kernel's arithmetic) and reads their rows from x.
// Local: state [FM_LL_STATE_WORDS]; n_to [W] int64 output; sent_remote [1] int64: tokens sent to other
//   ranks; send_pos int32 [T, W] (the handle: token's slot on each rank, -1 if not sent).
constexpr int FM_LL_SLOTS = 4;  // slots a thread loads at once while counting

// The routing tables of one chunk of tokens, in dynamic shared memory (both dispatch kernels):
// u64 mask[chunk]; int before_e[E], before_d[W], all_e[E], all_d[W], route[E], pos[chunk * W],
// slot_pos, chunk_e, chunk_d and chunk_w [chunk * K] each, tile_d[FM_LL_SLOTS * blockDim.x]
// (cuda_ll.py's _route_shared counts the same bytes).
struct FmLlRoute {
    fm_u64* mask;     // [chunk] destination ranks of a token
    int* before_e;    // [E] pairs of each expert before the chunk
    int* before_d;    // [W] tokens for each rank before the chunk
    int* all_e;       // [E] pairs of each expert, all T
    int* all_d;       // [W] tokens for each rank, all T
    int* route;       // [E] rank << 16 | local index
    int* pos;         // [chunk * W] a chunk token's slot on each rank, -1 if it goes nowhere there
    int* slot_pos;    // [chunk * K] a slot's position among the source's pairs of its expert
    int* chunk_e;     // [chunk * K] experts of the chunk's slots (-1: empty)
    int* chunk_d;     // [chunk * K] their ranks
    float* chunk_w;   // [chunk * K] their weights
    int* tile_d;      // [FM_LL_SLOTS * blockDim.x]
    void* end;        // the first byte after the tables
};

__device__ __forceinline__ FmLlRoute fm_ll_route_tables(void* shared, fm_i64 chunk, fm_i64 num_experts, int world,
                                                        int top_k)
{
    FmLlRoute r;
    r.mask = reinterpret_cast<fm_u64*>(shared);
    r.before_e = reinterpret_cast<int*>(r.mask + chunk);
    r.before_d = r.before_e + num_experts;
    r.all_e = r.before_d + world;
    r.all_d = r.all_e + num_experts;
    r.route = r.all_d + world;
    r.pos = r.route + num_experts;
    r.slot_pos = r.pos + chunk * world;
    r.chunk_e = r.slot_pos + chunk * top_k;
    r.chunk_d = r.chunk_e + chunk * top_k;
    r.chunk_w = reinterpret_cast<float*>(r.chunk_d + chunk * top_k);
    r.tile_d = reinterpret_cast<int*>(r.chunk_w + chunk * top_k);
    r.end = r.tile_d + FM_LL_SLOTS * blockDim.x;
    return r;
}

// Routes the chunk [t0, t1) of a source's T tokens, by the whole block: counts all T tokens' slots
// (pairs of each expert and tokens for each rank before the chunk and in all; counts only, so the order
// of the atomics does not matter), then the chunk's own experts, ranks, weights, rank sets, and each
// slot's and token's position (the chunk's earlier tokens with the same expert / rank, plus those
// before the chunk). Every block of both dispatch kernels runs it, so each knows the totals. Ends with
// a block barrier. `stamp` numbers its three phase stamps.
template <typename I>
__device__ void fm_ll_route(const FmLlRoute& r, const I* __restrict__ topk_idx, const float* __restrict__ weights,
                            fm_i64 tokens, int top_k, const fm_i64* __restrict__ expert_to_rank,
                            const fm_i64* __restrict__ local_index, fm_i64 num_experts, int world, fm_i64 t0,
                            fm_i64 t1, int stamp)
{
    const fm_i64 n = t1 > t0 ? t1 - t0 : 0;
    // The first tile's slots are loaded before the tables: both loads in one memory round trip.
    const int tile = (FM_LL_SLOTS * static_cast<int>(blockDim.x) / top_k) * top_k;
    fm_i64 e[FM_LL_SLOTS];
    float w[FM_LL_SLOTS];
    auto load_tile = [&](fm_i64 base) {
#pragma unroll
        for (int j = 0; j < FM_LL_SLOTS; ++j) {
            const int at = j * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
            const fm_i64 p = base + at;
            e[j] = -1;
            w[j] = 0.0f;
            if (at < tile && p < tokens * top_k) {
                e[j] = fm_expert(topk_idx, p / top_k, top_k, static_cast<int>(p % top_k), num_experts);
                if (p >= t0 * top_k && p < t1 * top_k) {
                    w[j] = weights[p];
                }
            }
        }
    };
    load_tile(0);
    for (fm_i64 i = threadIdx.x; i < num_experts; i += blockDim.x) {
        r.before_e[i] = 0;
        r.all_e[i] = 0;
        r.route[i] = static_cast<int>(expert_to_rank[i] << 16 | local_index[i]);
    }
    for (int i = threadIdx.x; i < world; i += blockDim.x) {
        r.before_d[i] = 0;
        r.all_d[i] = 0;
    }
    for (fm_i64 i = threadIdx.x; i < n; i += blockDim.x) {
        r.mask[i] = 0;
    }
    __syncthreads();
    FM_LL_STAMP(stamp);
    // Slots of all T tokens in tiles of whole tokens, FM_LL_SLOTS slots a thread (their loads at once).
    for (fm_i64 base = 0; base < tokens * top_k; base += tile) {
        if (base > 0) {
            load_tile(base);
        }
#pragma unroll
        for (int j = 0; j < FM_LL_SLOTS; ++j) {
            const int at = j * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
            if (at < tile) {
                r.tile_d[at] = e[j] >= 0 ? r.route[e[j]] >> 16 : -1;
            }
        }
        __syncthreads();
#pragma unroll
        for (int j = 0; j < FM_LL_SLOTS; ++j) {
            const int at = j * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
            const fm_i64 p = base + at;
            if (at >= tile || p >= tokens * top_k) {
                continue;
            }
            const int k = static_cast<int>(p % top_k);
            const int d = r.tile_d[at];
            bool first_on_d = d >= 0;  // the token's first slot on rank d
            for (int k2 = 0; k2 < k && first_on_d; ++k2) {
                first_on_d = r.tile_d[at - k + k2] != d;
            }
            const fm_i64 t = p / top_k;
            if (e[j] >= 0) {
                atomicAdd(&r.all_e[e[j]], 1);
            }
            if (first_on_d) {
                atomicAdd(&r.all_d[d], 1);
            }
            if (t < t0) {
                if (e[j] >= 0) {
                    atomicAdd(&r.before_e[e[j]], 1);
                }
                if (first_on_d) {
                    atomicAdd(&r.before_d[d], 1);
                }
            } else if (t < t1) {
                r.chunk_e[p - t0 * top_k] = static_cast<int>(e[j]);
                r.chunk_d[p - t0 * top_k] = d;
                r.chunk_w[p - t0 * top_k] = w[j];
                if (d >= 0) {
                    atomicOr(&r.mask[t - t0], 1ull << d);
                }
            }
        }
        __syncthreads();
    }
    FM_LL_STAMP(stamp + 1);
    for (fm_i64 q = threadIdx.x; q < n * top_k; q += blockDim.x) {
        const fm_i64 i = q / top_k;
        const int ex = r.chunk_e[q];
        int p = -1;
        if (ex >= 0) {
            p = r.before_e[ex];
            for (fm_i64 q2 = 0; q2 < i * top_k; ++q2) {
                p += r.chunk_e[q2] == ex;
            }
        }
        r.slot_pos[q] = p;
    }
    for (fm_i64 q = threadIdx.x; q < n * world; q += blockDim.x) {
        const fm_i64 i = q / world;
        const int d = static_cast<int>(q % world);
        int p = -1;
        if ((r.mask[i] >> d) & 1ull) {
            p = r.before_d[d];
            for (fm_i64 i2 = 0; i2 < i; ++i2) {
                p += static_cast<int>((r.mask[i2] >> d) & 1ull);
            }
        }
        r.pos[q] = p;
    }
    __syncthreads();
    FM_LL_STAMP(stamp + 2);
}

template <typename I>
__device__ void fm_ll_dispatch_send(const unsigned char* __restrict__ x, fm_i64 row_bytes, const I* __restrict__ topk_idx,
                                    const float* __restrict__ weights, fm_i64 tokens, int top_k,
                                    const fm_i64* __restrict__ expert_to_rank, const fm_i64* __restrict__ local_index,
                                    fm_i64 num_experts, int world, int rank,
                                    fm_i64 chunk, fm_i64 slots, int head_width, const fm_u64* __restrict__ x_ptrs,
                                    const fm_u64* __restrict__ meta_ptrs, const fm_u64* __restrict__ head_ptrs,
                                    const fm_u64* __restrict__ flag_ptrs, fm_i64* state, fm_i64* n_to,
                                    fm_i64* sent_remote, int* send_pos, int split)
{
    const FmLlRoute r = fm_ll_route_tables(fm_ll_shared, chunk, num_experts, world, top_k);
    const fm_i64 generation = state[FM_LL_GEN_DISPATCH] + 1;
    const fm_i64 parity = generation & 1;
    fm_launch_dependents();  // the receive kernel may start now: it waits for the flags this kernel stores
    const fm_i64 t0 = blockIdx.x * chunk;
    FM_LL_STAMP(0);
    const fm_i64 t1 = t0 + chunk < tokens ? t0 + chunk : tokens;
    const fm_i64 n = t1 > t0 ? t1 - t0 : 0;
    const int meta_width = 1 + 4 * top_k;
    const int lane = threadIdx.x & (FM_LL_WARP - 1);
    const int warp = threadIdx.x / FM_LL_WARP;
    const int n_warps = blockDim.x / FM_LL_WARP;
    const fm_i64 items = n * world * split;  // (token, destination, part) of the chunk: a warp each

    // A warp's first row part is loaded now, while the block routes (the source row does not depend on
    // where it goes); its stores wait for the positions.
    int4 first[FM_LL_COPY_BATCH];
    fm_i64 first_begin = 0, first_end = 0;
    bool prefetched = false;
    if (warp < items && static_cast<int>((warp / split) % world) != rank) {
        fm_ll_part(row_bytes, static_cast<int>(warp % split), split, &first_begin, &first_end);
        const unsigned char* src = x + (t0 + warp / split / world) * row_bytes + first_begin;
        prefetched = fm_aligned16(src);
        if (prefetched) {
            const fm_i64 n4 = (first_end - first_begin) >> 4;
#pragma unroll
            for (int u = 0; u < FM_LL_COPY_BATCH; ++u) {
                if (lane + u * FM_LL_WARP < n4) {
                    first[u] = reinterpret_cast<const int4*>(src)[lane + u * FM_LL_WARP];
                }
            }
        }
    }

    fm_ll_route<I>(r, topk_idx, weights, tokens, top_k, expert_to_rank, local_index, num_experts, world, t0, t1, 1);
    for (fm_i64 q = threadIdx.x; q < n * world; q += blockDim.x) {
        send_pos[t0 * world + q] = r.pos[q];
    }
    if (blockIdx.x == 0) {
        // Headers (for the peers) and this rank's n_tokens_to_rank, from the totals every block has
        // (block 0's arrival, which every flag needs, orders them before the flags as it does the
        // block's rows).
        if (threadIdx.x == 0) {
            fm_i64 remote = 0;
            for (int d = 0; d < world; ++d) {
                remote += d == rank ? 0 : r.all_d[d];
            }
            *sent_remote = remote;
        }
        for (int d = threadIdx.x; d < world; d += blockDim.x) {
            const fm_i64 sent = r.all_d[d];
            n_to[d] = sent;
            if (d != rank) {
                fm_i64* head = reinterpret_cast<fm_i64*>(head_ptrs[d]) + (parity * world + rank) * head_width;
                head[0] = sent;
                head[1] = tokens;
            }
        }
        for (fm_i64 e = threadIdx.x; e < num_experts; e += blockDim.x) {
            const int d = r.route[e] >> 16;
            if (d != rank) {
                fm_i64* head = reinterpret_cast<fm_i64*>(head_ptrs[d]) + (parity * world + rank) * head_width;
                head[2 + (r.route[e] & 0xffff)] = r.all_e[e];
            }
        }
    }

    // Rows and metadata for the peers, a warp per (token, destination, part).
    for (fm_i64 q = warp; q < items; q += n_warps) {
        const int part = static_cast<int>(q % split);
        const fm_i64 item = q / split;
        const fm_i64 i = item / world;
        const int d = static_cast<int>(item % world);
        const int p = r.pos[item];
        if (d == rank || p < 0 || p >= slots) {
            continue;  // this rank (self-routed), not for d, or past the capacity (d reports the overflow)
        }
        const fm_i64 row = (parity * world + rank) * slots + p;
        unsigned char* dst = reinterpret_cast<unsigned char*>(x_ptrs[d]) + row * row_bytes;
        if (q == warp && prefetched) {
            const fm_i64 n4 = (first_end - first_begin) >> 4;
            int4* dst4 = reinterpret_cast<int4*>(dst + first_begin);
#pragma unroll
            for (int u = 0; u < FM_LL_COPY_BATCH; ++u) {
                if (lane + u * FM_LL_WARP < n4) {
                    dst4[lane + u * FM_LL_WARP] = first[u];
                }
            }
            const fm_i64 done = first_begin + static_cast<fm_i64>(FM_LL_COPY_BATCH) * FM_LL_WARP * 16;
            if (done < first_end) {
                fm_ll_warp_copy(dst, x + (t0 + i) * row_bytes, done, first_end, lane);
            }
        } else {
            fm_i64 begin, end;
            fm_ll_part(row_bytes, part, split, &begin, &end);
            fm_ll_warp_copy(dst, x + (t0 + i) * row_bytes, begin, end, lane);
        }
        if (part == 0) {
            int* meta = reinterpret_cast<int*>(meta_ptrs[d]) + row * meta_width;
            if (lane == 0) {
                meta[0] = static_cast<int>(t0 + i);
            }
            for (int k = lane; k < top_k; k += FM_LL_WARP) {
                const int e = r.chunk_e[i * top_k + k];
                const bool mine = e >= 0 && r.chunk_d[i * top_k + k] == d;
                meta[1 + 4 * k] = mine ? e : -1;
                meta[2 + 4 * k] = mine ? (r.route[e] & 0xffff) : 0;
                meta[3 + 4 * k] = mine ? r.slot_pos[i * top_k + k] : 0;
                meta[4 + 4 * k] = __float_as_int(r.chunk_w[i * top_k + k]);
            }
        }
    }

    // Every block's rows (and block 0's headers) before its arrival.
    FM_LL_STAMP(4);
    fm_ll_finish_send(flag_ptrs, world, rank);
    FM_LL_STAMP(5);
}

#define FM_LL_DISPATCH_SEND(NAME, I)                                                                         \
    extern "C" __global__ void __launch_bounds__(FM_LL_THREADS) NAME(const unsigned char* x, fm_i64 row_bytes, const I* topk_idx,             \
                                    const float* weights, fm_i64 tokens, int top_k, const fm_i64* expert_to_rank, \
                                    const fm_i64* local_index, fm_i64 num_experts,                             \
                                    int world, int rank, fm_i64 chunk, fm_i64 slots, int head_width,           \
                                    const fm_u64* x_ptrs, const fm_u64* meta_ptrs, const fm_u64* head_ptrs,     \
                                    const fm_u64* flag_ptrs, fm_i64* state, fm_i64* n_to,                      \
                                    fm_i64* sent_remote, int* send_pos, int split)                             \
    {                                                                                                        \
        fm_ll_dispatch_send<I>(x, row_bytes, topk_idx, weights, tokens, top_k, expert_to_rank, local_index,  \
                               num_experts, world, rank, chunk, slots, head_width, x_ptrs,       \
                               meta_ptrs, head_ptrs, flag_ptrs, state, n_to, sent_remote, send_pos, split);          \
    }

FM_LL_DISPATCH_SEND(fuser_moe_ll_dispatch_send_i64, fm_i64)
FM_LL_DISPATCH_SEND(fuser_moe_ll_dispatch_send_i32, int)

// A warp stores the vectors v (its part [begin, begin + 16 n4) of a row, FM_LL_COPY_BATCH a lane from
// vector v0) to the output row that each lane k < K holds in `out` (-1: none).
__device__ __forceinline__ void fm_ll_fan_out(unsigned char* recv_x, fm_i64 row_bytes, fm_i64 begin, fm_i64 n4,
                                              fm_i64 v0, const int4* v, fm_i64 out, int top_k, int lane)
{
    for (int k = 0; k < top_k; ++k) {
        const fm_i64 o = __shfl_sync(0xffffffffu, out, k);
        if (o < 0) {
            continue;
        }
        int4* dst4 = reinterpret_cast<int4*>(recv_x + o * row_bytes + begin);
#pragma unroll
        for (int u = 0; u < FM_LL_COPY_BATCH; ++u) {
            if (v0 + lane + u * FM_LL_WARP < n4) {
                dst4[v0 + lane + u * FM_LL_WARP] = v[u];
            }
        }
    }
}

// A warp copies part [begin, end) of the row at src to the output rows in `out` (lane k: slot k's),
// reading it once; `v` holds the part's first FM_LL_COPY_BATCH vectors a lane, loaded already.
__device__ __forceinline__ void fm_ll_copy_out(unsigned char* recv_x, fm_i64 row_bytes, const unsigned char* src,
                                               fm_i64 begin, fm_i64 end, int4* v, fm_i64 out, int top_k, int lane)
{
    const int4* src4 = reinterpret_cast<const int4*>(src + begin);
    const fm_i64 n4 = (end - begin) >> 4;
    for (fm_i64 v0 = 0; v0 < n4; v0 += FM_LL_COPY_BATCH * FM_LL_WARP) {
        if (v0 > 0) {
#pragma unroll
            for (int u = 0; u < FM_LL_COPY_BATCH; ++u) {
                if (v0 + lane + u * FM_LL_WARP < n4) {
                    v[u] = src4[v0 + lane + u * FM_LL_WARP];
                }
            }
        }
        fm_ll_fan_out(recv_x, row_bytes, begin, n4, v0, v, out, top_k, lane);
    }
}

__device__ __forceinline__ void fm_ll_load_part(const unsigned char* src, fm_i64 begin, fm_i64 end, int4* v, int lane)
{
    const int4* src4 = reinterpret_cast<const int4*>(src + begin);
    const fm_i64 n4 = (end - begin) >> 4;
#pragma unroll
    for (int u = 0; u < FM_LL_COPY_BATCH; ++u) {
        if (lane + u * FM_LL_WARP < n4) {
            v[u] = src4[lane + u * FM_LL_WARP];
        }
    }
}

// Receiver. Outputs have `capacity` rows; rows [V, capacity) are padding (-1, weight 0, zero row).
//   wire_rows int32 [world * slots * K] (the handle): output row of each (source, slot, k), -1 if none.
//   summary int64 [4]: V, wire rows in, wire rows in from other ranks, (unused).
// Block b routes chunk b of this rank's own tokens (chunks of `chunk` tokens, not the send kernel's; the
// grid has a block for each) and copies their rows from x; the peers' wire rows and the padding go to
// every warp.
// Dynamic shared memory: the routing tables (FmLlRoute), then fm_i64 base[world * n_local], tot[n_local + 1].
template <typename I>
__device__ void fm_ll_dispatch_recv(
    const unsigned char* __restrict__ x_buf, const int* __restrict__ meta_buf, const fm_i64* __restrict__ head_buf,
    const fm_i64* flag_buf, const unsigned char* __restrict__ x, fm_i64 row_bytes, const I* __restrict__ topk_idx,
    const float* __restrict__ weights, fm_i64 tokens, int top_k, const fm_i64* __restrict__ expert_to_rank,
    const fm_i64* __restrict__ local_index, fm_i64 num_experts, fm_i64 chunk, int world, int rank,
    fm_i64 slots, int head_width, int n_local, fm_i64 capacity, unsigned char* recv_x, fm_i64* recv_idx,
    float* recv_w, fm_i64* src_idx, fm_i64* src_rank, fm_i64* n_from, fm_i64* per_expert, fm_i64* summary,
    int* wire_rows, fm_i64* state, fm_i64* errors, fm_i64 timeout_ns, int split)
{
    const FmLlRoute r = fm_ll_route_tables(fm_ll_shared, chunk, num_experts, world, top_k);
    fm_i64* base = reinterpret_cast<fm_i64*>((reinterpret_cast<fm_u64>(r.end) + 7) & ~fm_u64(7));  // [world * n_local]
    fm_i64* tot = base + world * n_local;  // [n_local + 1]: exclusive prefix, then V
    __shared__ fm_i64 wire_base[FM_LL_MAX_WORLD + 1];  // the peers' wire rows, this rank's left out
    __shared__ fm_i64 received[FM_LL_MAX_WORLD];

    FM_LL_BLOCK_START();
    const fm_i64 generation = state[FM_LL_GEN_DISPATCH] + 1;
    const fm_i64 parity = generation & 1;
    FM_LL_STAMP(8);
    const fm_i64 t0 = blockIdx.x * chunk < tokens ? blockIdx.x * chunk : tokens;
    const fm_i64 t1 = t0 + chunk < tokens ? t0 + chunk : tokens;
    const fm_i64 n = t1 - t0;
    fm_ll_route<I>(r, topk_idx, weights, tokens, top_k, expert_to_rank, local_index, num_experts, world, t0, t1, 24);
    const bool timed_out = fm_ll_wait_flags(flag_buf, world, fm_ll_arrived(generation), state, 1, timeout_ns, rank, FM_LL_WAIT_PEERS);
    FM_LL_STAMP(9);

    // Pairs of each source for each local expert: this rank's from its own routing, the peers' from
    // their headers.
    const fm_i64* heads = head_buf + parity * world * head_width;
    for (int s = threadIdx.x; s < world; s += blockDim.x) {
        received[s] = timed_out ? 0 : (s == rank ? r.all_d[rank] : heads[s * head_width]);
    }
    for (fm_i64 e = threadIdx.x; e < num_experts; e += blockDim.x) {
        if ((r.route[e] >> 16) == rank) {
            base[rank * n_local + (r.route[e] & 0xffff)] = timed_out ? 0 : r.all_e[e];
        }
    }
    for (int q = threadIdx.x; q < world * n_local; q += blockDim.x) {
        const int s = q / n_local;
        if (s != rank) {
            base[q] = timed_out ? 0 : heads[s * head_width + 2 + q % n_local];
        }
    }
    FM_LL_STAMP(13);
    __syncthreads();
    for (int j = threadIdx.x; j < n_local; j += blockDim.x) {
        fm_i64 sum = 0;
        for (int s = 0; s < world; ++s) {
            sum += base[s * n_local + j];
        }
        tot[j] = sum;
    }
    __syncthreads();
    FM_LL_STAMP(14);
    const fm_i64 all_pairs = fm_ll_block_scan(tot, n_local);
    FM_LL_STAMP(15);
    if (threadIdx.x == 0) {
        tot[n_local] = all_pairs;
        fm_i64 wire = 0;
        for (int s = 0; s < world; ++s) {
            wire_base[s] = wire;
            wire += s == rank ? 0 : (received[s] < slots ? received[s] : slots);
        }
        wire_base[world] = wire;
    }
    __syncthreads();
    for (int j = threadIdx.x; j < n_local; j += blockDim.x) {
        fm_i64 run = tot[j];
        for (int s = 0; s < world; ++s) {
            const fm_i64 c = base[s * n_local + j];
            base[s * n_local + j] = run;
            run += c;
        }
    }
    __syncthreads();
    const fm_i64 pairs = tot[n_local];
    const fm_i64 kept = pairs < capacity ? pairs : capacity;
    if (blockIdx.x == 0) {
        for (int s = threadIdx.x; s < world; s += blockDim.x) {
            n_from[s] = received[s];
        }
        for (int j = threadIdx.x; j < n_local; j += blockDim.x) {
            per_expert[j] = (j + 1 < n_local ? tot[j + 1] : pairs) - tot[j];
        }
        if (threadIdx.x == 0) {
            fm_i64 in = 0, remote = 0;
            for (int s = 0; s < world; ++s) {
                in += received[s];
                remote += s == rank ? 0 : received[s];
            }
            summary[0] = pairs;
            summary[1] = in;
            summary[2] = remote;
            summary[3] = 0;
            if (pairs > capacity) {
                atomicMax(reinterpret_cast<unsigned long long*>(&errors[FM_LL_ERR_NEEDED]),
                          static_cast<unsigned long long>(pairs));
                errors[FM_LL_ERR_GIVEN] = capacity;
            }
        }
    }
    FM_LL_STAMP(10);

    const int lane = threadIdx.x & (FM_LL_WARP - 1);
    const int warp = threadIdx.x / FM_LL_WARP;
    const int n_warps = blockDim.x / FM_LL_WARP;
    int4 v[FM_LL_COPY_BATCH];
    // This rank's own tokens of the block's chunk, (token, part) a warp: each token's row is read from x
    // once and stored to the output row of each of its slots here.
    if (!timed_out) {
        int split_own = n > 0 ? static_cast<int>(n_warps / n) : 1;
        split_own = split_own < 1 ? 1 : split_own;
        const int most = static_cast<int>(row_bytes / 512);
        split_own = split_own > most ? (most > 1 ? most : 1) : split_own;
        for (fm_i64 q = warp; q < n * split_own; q += n_warps) {
            const int part = static_cast<int>(q % split_own);
            const fm_i64 i = q / split_own;
            const int p = r.pos[i * world + rank];
            if (p < 0 || p >= slots) {
                continue;  // nothing of this token here, or past the capacity (then so are its rows)
            }
            fm_i64 begin, end;
            fm_ll_part(row_bytes, part, split_own, &begin, &end);
            const unsigned char* src = x + (t0 + i) * row_bytes;
            fm_ll_load_part(src, begin, end, v, lane);
            fm_i64 out = -1;
            if (lane < top_k) {
                const int e = r.chunk_e[i * top_k + lane];
                if (e >= 0 && r.chunk_d[i * top_k + lane] == rank) {
                    out = base[rank * n_local + (r.route[e] & 0xffff)] + r.slot_pos[i * top_k + lane];
                    if (out >= capacity) {
                        out = -1;
                    }
                }
                if (part == 0) {
                    wire_rows[(static_cast<fm_i64>(rank) * slots + p) * top_k + lane] = static_cast<int>(out);
                    if (out >= 0) {
                        recv_idx[out] = e;
                        recv_w[out] = r.chunk_w[i * top_k + lane];
                        src_idx[out] = t0 + i;
                        src_rank[out] = rank;
                    }
                }
            }
            fm_ll_copy_out(recv_x, row_bytes, src, begin, end, v, out, top_k, lane);
        }
    }

    // The peers' wire rows, then the padding rows, (row, part) a warp. Items go round the blocks (item q
    // to block q % gridDim.x), so that every block takes a like share of them: given out block by block,
    // the padding (zero rows, written after the wire rows) fell to the first blocks, which then wrote
    // twice the bytes of the others.
    const fm_i64 warps = static_cast<fm_i64>(gridDim.x) * n_warps;
    const fm_i64 copy_items = wire_base[world] * split;
    const fm_i64 items = copy_items + (capacity - kept) * split;
    const int meta_width = 1 + 4 * top_k;
    for (fm_i64 q = static_cast<fm_i64>(warp) * gridDim.x + blockIdx.x; q < items; q += warps) {
        const int part = static_cast<int>(q % split);
        const fm_i64 g = q / split;
        if (q >= copy_items) {
            const fm_i64 out = kept + (g - wire_base[world]);
            fm_i64 begin, end;
            fm_ll_part(row_bytes, part, split, &begin, &end);
            fm_ll_warp_zero(recv_x + out * row_bytes, begin, end, lane);
            if (lane == 0 && part == 0) {
                recv_idx[out] = -1;
                recv_w[out] = 0.0f;
                src_idx[out] = -1;
                src_rank[out] = -1;
            }
            continue;
        }
        int s = 0;
        while (wire_base[s + 1] <= g) {
            ++s;
        }
        const fm_i64 i = g - wire_base[s];
        const fm_i64 row = (parity * world + s) * slots + i;
        const int* meta = meta_buf + row * meta_width;
        fm_i64 begin, end;
        fm_ll_part(row_bytes, part, split, &begin, &end);
        // The part's first vectors are loaded together with the metadata that says where they go (one
        // memory round trip for both; the host checks that rows are 16-byte multiples).
        const unsigned char* src = x_buf + row * row_bytes;
        fm_ll_load_part(src, begin, end, v, lane);
        fm_i64 out = -1;
        if (lane < top_k) {
            const int e = meta[1 + 4 * lane];
            if (e >= 0) {
                out = base[s * n_local + meta[2 + 4 * lane]] + meta[3 + 4 * lane];
                if (out >= capacity) {
                    out = -1;
                }
            }
            if (part == 0) {
                wire_rows[(s * slots + i) * top_k + lane] = static_cast<int>(out);
                if (out >= 0) {
                    recv_idx[out] = e;
                    recv_w[out] = __int_as_float(meta[4 + 4 * lane]);
                    src_idx[out] = meta[0];
                    src_rank[out] = s;
                }
            }
        }
        fm_ll_copy_out(recv_x, row_bytes, src, begin, end, v, out, top_k, lane);
    }
    FM_LL_STAMP(11);
    // Its own send's arrival, last: nothing here reads what that kernel writes, but the generation this
    // kernel advances, and the handle (send_pos) that the combine reads, must follow it.
    fm_ll_wait_flags(flag_buf, world, fm_ll_arrived(generation), state, 1, timeout_ns, rank, FM_LL_WAIT_SELF);
    fm_ll_finish_receive(state, FM_LL_TICKET_DRECV, FM_LL_GEN_DISPATCH, generation);
    FM_LL_STAMP(12);
}

#define FM_LL_DISPATCH_RECV(NAME, I)                                                                         \
    extern "C" __global__ void __launch_bounds__(FM_LL_THREADS) NAME(                                        \
        const unsigned char* x_buf, const int* meta_buf, const fm_i64* head_buf, const fm_i64* flag_buf,      \
        const unsigned char* x, fm_i64 row_bytes, const I* topk_idx, const float* weights, fm_i64 tokens,     \
        int top_k, const fm_i64* expert_to_rank, const fm_i64* local_index, fm_i64 num_experts, fm_i64 chunk, \
        int world, int rank, fm_i64 slots, int head_width, int n_local, fm_i64 capacity,                     \
        unsigned char* recv_x, fm_i64* recv_idx, float* recv_w, fm_i64* src_idx, fm_i64* src_rank,            \
        fm_i64* n_from, fm_i64* per_expert, fm_i64* summary, int* wire_rows, fm_i64* state, fm_i64* errors,   \
        fm_i64 timeout_ns, int split)                                                                        \
    {                                                                                                        \
        fm_ll_dispatch_recv<I>(x_buf, meta_buf, head_buf, flag_buf, x, row_bytes, topk_idx, weights, tokens, \
                               top_k, expert_to_rank, local_index, num_experts, chunk, world, rank, slots,   \
                               head_width, n_local, capacity, recv_x, recv_idx, recv_w, src_idx, src_rank,    \
                               n_from, per_expert, summary, wire_rows, state, errors, timeout_ns, split);    \
    }

FM_LL_DISPATCH_RECV(fuser_moe_ll_dispatch_recv_i64, fm_i64)
FM_LL_DISPATCH_RECV(fuser_moe_ll_dispatch_recv_i32, int)

// ------------------------------------------------------------------------------------------ combine
// The partial's arithmetic, in one place for this path (the send writes it for its peers; the receive
// computes its own rank's term with it, self-direct): vector v of the float32 sum, in the order given, of
// w * y over `count` rows (rows[i], weight w[i]), cast to T. The loads go FM_LL_BATCH rows at a time.
template <typename T>
__device__ __forceinline__ void fm_ll_partial_vector(const T* __restrict__ y, fm_i64 hidden, const int* rows,
                                                     const float* w, int count, fm_i64 v, fm_vec16& packed)
{
    constexpr int VEC = 16 / sizeof(T);
    float sum[VEC];
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
        sum[c] = 0.0f;
    }
    for (int r0 = 0; r0 < count; r0 += FM_LL_BATCH) {
        fm_vec16 in[FM_LL_BATCH];
#pragma unroll
        for (int b = 0; b < FM_LL_BATCH; ++b) {
            if (r0 + b < count) {
                in[b].raw = reinterpret_cast<const int4*>(y + static_cast<fm_i64>(rows[r0 + b]) * hidden)[v];
            }
        }
#pragma unroll
        for (int b = 0; b < FM_LL_BATCH; ++b) {
            if (r0 + b < count) {
                const float wb = w[r0 + b];
#pragma unroll
                for (int c = 0; c < VEC; ++c) {
                    sum[c] = __fadd_rn(sum[c], __fmul_rn(wb, fm_lane_to_float<T>(in[b], c)));
                }
            }
        }
    }
#pragma unroll
    for (int c = 0; c < VEC; ++c) {
        fm_lane_from_float<T>(packed, c, sum[c]);
    }
}

// A warp's list of a wire row's output rows in ascending order (the contract's row order) with their
// weights, into rows_out / w_out; returns how many. `wire` points at the row's K entries of the handle
// (-1: none). A lane's place is the number of lanes with a smaller row (the rows are distinct).
__device__ __forceinline__ int fm_ll_sorted_rows(const int* wire, const float* __restrict__ weights, int top_k,
                                                 int lane, int* rows_out, float* w_out)
{
    const int mine = lane < top_k ? wire[lane] : -1;
    const float mine_w = mine >= 0 ? weights[mine] : 0.0f;
    const int key = mine >= 0 ? mine : 0x7fffffff;
    int place = 0;
    for (int k2 = 0; k2 < top_k; ++k2) {
        place += __shfl_sync(0xffffffffu, key, k2) < key;
    }
    const int count = __popc(__ballot_sync(0xffffffffu, mine >= 0));
    if (mine >= 0) {
        rows_out[place] = mine;
        w_out[place] = mine_w;
    }
    __syncwarp();
    return count;
}

// Expert rank: one partial row per wire row (source s, slot i) of the dispatch whose handle this is.
//   wire_rows int32 [world * slots * K], n_from int64 [world] (the dispatch's n_tokens_from_rank)
//   part_ptrs[s]: every rank's partial buffer, rows (parity * world + expert rank) * slots + slot
//   flag_ptrs[s]: every rank's combine flags [world]
template <typename T>
__device__ void fm_ll_combine_send(const T* __restrict__ x, fm_i64 hidden, const float* __restrict__ weights,
                                   const int* __restrict__ wire_rows, const fm_i64* __restrict__ n_from, int top_k,
                                   int world, int rank, fm_i64 slots, const fm_u64* __restrict__ part_ptrs,
                                   const fm_u64* __restrict__ flag_ptrs, fm_i64* state, int split)
{
    constexpr int VEC = 16 / sizeof(T);
    __shared__ fm_i64 wire_base[FM_LL_MAX_WORLD + 1];
    __shared__ int rows_of[FM_LL_WARPS][FM_LL_MAX_TOP_K];
    __shared__ float weight_of[FM_LL_WARPS][FM_LL_MAX_TOP_K];

    const fm_i64 generation = state[FM_LL_GEN_COMBINE] + 1;
    const fm_i64 parity = generation & 1;
    fm_launch_dependents();  // the receive kernel may start now: it waits for the flags this kernel stores
    FM_LL_STAMP(16);
    for (int s = threadIdx.x; s < world; s += blockDim.x) {  // the loads at once, then the sums
        // This rank's own rows are not sent: its receive kernel computes their term (self-direct).
        const fm_i64 in = s == rank ? 0 : n_from[s];
        wire_base[s + 1] = in < slots ? in : slots;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        fm_i64 wire = 0;
        for (int s = 0; s < world; ++s) {
            const fm_i64 in = wire_base[s + 1];
            wire_base[s] = wire;
            wire += in;
        }
        wire_base[world] = wire;
    }
    __syncthreads();
    const int lane = threadIdx.x & (FM_LL_WARP - 1);
    const int warp = threadIdx.x / FM_LL_WARP;
    const fm_i64 warps = static_cast<fm_i64>(gridDim.x) * (blockDim.x / FM_LL_WARP);
    const fm_i64 vectors = hidden / VEC;  // the host checks hidden * sizeof(T) % 16 == 0
    const fm_i64 per_part = (vectors + split - 1) / split;
    for (fm_i64 q = blockIdx.x * (blockDim.x / FM_LL_WARP) + warp; q < wire_base[world] * split; q += warps) {
        const int part = static_cast<int>(q % split);
        const fm_i64 g = q / split;
        int s = 0;
        while (wire_base[s + 1] <= g) {
            ++s;
        }
        const fm_i64 i = g - wire_base[s];
        const int count = fm_ll_sorted_rows(wire_rows + (s * slots + i) * top_k, weights, top_k, lane,
                                            rows_of[warp], weight_of[warp]);
        T* dst = reinterpret_cast<T*>(part_ptrs[s]) + ((parity * world + rank) * slots + i) * hidden;
        const fm_i64 v0 = part * per_part;
        const fm_i64 v1 = v0 + per_part < vectors ? v0 + per_part : vectors;
        for (fm_i64 v = v0 + lane; v < v1; v += FM_LL_WARP) {
            fm_vec16 out;
            fm_ll_partial_vector<T>(x, hidden, rows_of[warp], weight_of[warp], count, v, out);
            reinterpret_cast<int4*>(dst)[v] = out.raw;
        }
        __syncwarp();
    }
    // Every block's partials before its arrival.
    FM_LL_STAMP(17);
    fm_ll_finish_send(flag_ptrs, world, rank);
    FM_LL_STAMP(18);
}

// sum += the partials (vector v) of expert ranks [e_begin, e_end) in ascending order, from the slots in
// `slot_of` (-1 or >= slots: none); loads FM_LL_BATCH ranks at a time. None after a timeout.
template <typename T>
__device__ __forceinline__ void fm_ll_add_partials(float* sum, const T* __restrict__ part_buf, const int* slot_of,
                                                   int e_begin, int e_end, int world, fm_i64 parity, fm_i64 slots,
                                                   fm_i64 hidden, fm_i64 v, bool timed_out)
{
    constexpr int VEC = 16 / sizeof(T);
    for (int e0 = e_begin; e0 < e_end; e0 += FM_LL_BATCH) {
        fm_vec16 in[FM_LL_BATCH];
        bool have[FM_LL_BATCH];
#pragma unroll
        for (int b = 0; b < FM_LL_BATCH; ++b) {
            const int e = e0 + b;
            const int p = e < e_end ? slot_of[e] : -1;
            have[b] = p >= 0 && p < slots && !timed_out;
            if (have[b]) {
                in[b].raw = reinterpret_cast<const int4*>(part_buf + ((parity * world + e) * slots + p) * hidden)[v];
            }
        }
#pragma unroll
        for (int b = 0; b < FM_LL_BATCH; ++b) {
            if (have[b]) {
#pragma unroll
                for (int c = 0; c < VEC; ++c) {
                    sum[c] = __fadd_rn(sum[c], fm_lane_to_float<T>(in[b], c));
                }
            }
        }
    }
}

// Source rank: out[t] = float32 sum over expert ranks e ascending of the partial in slot send_pos[t, e];
// this rank's own term (self-direct: its send kernel skipped it) is computed here from y, weights and the
// handle's wire rows, with the send's arithmetic (fm_ll_partial_vector), so its bits are the same.
template <typename T>
__device__ void fm_ll_combine_recv(const T* __restrict__ part_buf, const fm_i64* flag_buf,
                                   const int* __restrict__ send_pos, fm_i64 tokens, fm_i64 hidden, int world,
                                   int rank, fm_i64 slots, const T* __restrict__ y, const float* __restrict__ weights,
                                   const int* __restrict__ wire_rows, int top_k, T* out, fm_i64* state,
                                   fm_i64 timeout_ns, int split)
{
    constexpr int VEC = 16 / sizeof(T);
    __shared__ int slot_of[FM_LL_WARPS][FM_LL_MAX_WORLD];  // a warp's token's slot on each expert rank
    __shared__ int rows_of[FM_LL_WARPS][FM_LL_MAX_TOP_K];  // its own rows here, ascending, and their weights
    __shared__ float weight_of[FM_LL_WARPS][FM_LL_MAX_TOP_K];
    const fm_i64 generation = state[FM_LL_GEN_COMBINE] + 1;
    const fm_i64 parity = generation & 1;
    const int lane = threadIdx.x & (FM_LL_WARP - 1);
    const int warp = threadIdx.x / FM_LL_WARP;
    const fm_i64 warps = static_cast<fm_i64>(gridDim.x) * (blockDim.x / FM_LL_WARP);
    const fm_i64 first = blockIdx.x * (blockDim.x / FM_LL_WARP) + warp;
    // A token's slots on every rank, and the rows of its own term: -1 when the token has none here.
    auto load_token = [&](fm_i64 t) -> int {
        for (int e = lane; e < world; e += FM_LL_WARP) {
            slot_of[warp][e] = send_pos[t * world + e];
        }
        __syncwarp();
        const int p = slot_of[warp][rank];
        if (p < 0 || p >= slots) {
            return -1;
        }
        return fm_ll_sorted_rows(wire_rows + (static_cast<fm_i64>(rank) * slots + p) * top_k, weights, top_k, lane,
                                 rows_of[warp], weight_of[warp]);
    };
    // The first token's slots and own rows are local (this rank's dispatch wrote them): read before the wait.
    int own = -1;
    if (first < tokens * split) {
        own = load_token(first / split);
    }
    FM_LL_STAMP(20);
    const bool timed_out = fm_ll_wait_flags(flag_buf, world, fm_ll_arrived(generation), state, 2, timeout_ns, rank, FM_LL_WAIT_ALL);
    FM_LL_STAMP(21);
    const fm_i64 vectors = hidden / VEC;
    const fm_i64 per_part = (vectors + split - 1) / split;
    for (fm_i64 q = first; q < tokens * split; q += warps) {
        const int part = static_cast<int>(q % split);
        const fm_i64 t = q / split;
        if (q != first) {
            __syncwarp();
            own = load_token(t);
        }
        const fm_i64 v0 = part * per_part;
        const fm_i64 v1 = v0 + per_part < vectors ? v0 + per_part : vectors;
        for (fm_i64 v = v0 + lane; v < v1; v += FM_LL_WARP) {
            float sum[VEC];
#pragma unroll
            for (int c = 0; c < VEC; ++c) {
                sum[c] = 0.0f;
            }
            // Ascending expert rank: the peers below this rank, its own term, the peers above.
            fm_ll_add_partials<T>(sum, part_buf, slot_of[warp], 0, rank, world, parity, slots, hidden, v, timed_out);
            if (own >= 0) {
                fm_vec16 mine;
                fm_ll_partial_vector<T>(y, hidden, rows_of[warp], weight_of[warp], own, v, mine);
#pragma unroll
                for (int c = 0; c < VEC; ++c) {
                    sum[c] = __fadd_rn(sum[c], fm_lane_to_float<T>(mine, c));
                }
            }
            fm_ll_add_partials<T>(sum, part_buf, slot_of[warp], rank + 1, world, world, parity, slots, hidden, v,
                                  timed_out);
            fm_vec16 o;
#pragma unroll
            for (int c = 0; c < VEC; ++c) {
                fm_lane_from_float<T>(o, c, sum[c]);
            }
            reinterpret_cast<int4*>(out + t * hidden)[v] = o.raw;
        }
    }
    FM_LL_STAMP(22);
    fm_ll_finish_receive(state, FM_LL_TICKET_CRECV, FM_LL_GEN_COMBINE, generation);
    FM_LL_STAMP(23);
}

#define FM_LL_COMBINE(SUFFIX, T)                                                                              \
    extern "C" __global__ void __launch_bounds__(FM_LL_THREADS) fuser_moe_ll_combine_send_##SUFFIX(                                            \
        const T* x, fm_i64 hidden, const float* weights, const int* wire_rows, const fm_i64* n_from, int top_k, \
        int world, int rank, fm_i64 slots, const fm_u64* part_ptrs, const fm_u64* flag_ptrs, fm_i64* state,    \
        int split)                                                                                             \
    {                                                                                                         \
        fm_ll_combine_send<T>(x, hidden, weights, wire_rows, n_from, top_k, world, rank, slots, part_ptrs,     \
                              flag_ptrs, state, split);                                                       \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(FM_LL_THREADS) fuser_moe_ll_combine_recv_##SUFFIX(            \
        const T* part_buf, const fm_i64* flag_buf, const int* send_pos, fm_i64 tokens, fm_i64 hidden, int world, \
        int rank, fm_i64 slots, const T* y, const float* weights, const int* wire_rows, int top_k, T* out,     \
        fm_i64* state, fm_i64 timeout_ns, int split)                                                           \
    {                                                                                                         \
        fm_ll_combine_recv<T>(part_buf, flag_buf, send_pos, tokens, hidden, world, rank, slots, y, weights,    \
                              wire_rows, top_k, out, state, timeout_ns, split);                               \
    }

FM_LL_COMBINE(f32, float)
FM_LL_COMBINE(bf16, fm_bf16)
FM_LL_COMBINE(f16, fm_f16)
