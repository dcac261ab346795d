// Device-side barrier of the symmetric-memory transport (docs/contract.md section 8).
//
// Every rank owns a control block of int64 words in symmetric memory. Its layout is `ControlLayout`
// in backends/transport/base.py and must match the FM_* constants below (tests/test_transport.py
// compares them). Per-peer arrays of `world` words start at `k * world`; the scalars follow them.
//
//   arrive[s]        generation that rank s last announced here (written by rank s, release store)
//   in_needed[s]     rows needed by a push from rank s that overflowed this rank's buffer
//   in_capacity[s]   capacity of that buffer
//   missing[s]       generation at which this rank gave up waiting for rank s
//   fwd_needed[d]    overflow of this rank's pushes into rank d, not yet forwarded to d
//   fwd_capacity[d]  capacity of that buffer
//   out_needed, out_capacity, bad_entry, timeout_generation, generation
//
// The generation counter lives in device memory and is incremented by the kernel itself, so a CUDA
// graph that replays a captured barrier (with the same kernel arguments) still uses a fresh generation.
// Generations only grow, so a peer that is already one barrier ahead (slot > generation) counts as
// arrived and consecutive barriers never alias.
//
// Compiles unchanged under nvcc and NVRTC: no system headers, fixed-width types by typedef.

#include "fm_device.cuh"

// Per-peer arrays, in units of `world` words.
enum FmControlArray {
    FM_ARRIVE = 0,
    FM_IN_NEEDED = 1,
    FM_IN_CAPACITY = 2,
    FM_MISSING = 3,
    FM_FWD_NEEDED = 4,
    FM_FWD_CAPACITY = 5,
    FM_PER_PEER_ARRAYS = 6,
};

// Scalars, after the per-peer arrays.
enum FmControlScalar {
    FM_OUT_NEEDED = 0,
    FM_OUT_CAPACITY = 1,
    FM_BAD_ENTRY = 2,
    FM_TIMEOUT_GENERATION = 3,
    FM_GENERATION = 4,
    FM_SCALARS = 5,
};

// Spins this many polls before it starts to nap, so a barrier whose peers are close behind stays fast.
constexpr unsigned int FM_POLLS_BEFORE_NAP = 1024;

// One block; thread t announces this rank to peers t, t + blockDim.x, ... and then waits for them.
//   control_ptrs: [world] base address of every rank's control block, mapped in this process
//   rank, world:  this rank and the group size
//   timeout_ns:   how long to wait for a peer before giving up (sets missing[] and timeout_generation)
extern "C" __global__ void fuser_moe_barrier(const fm_u64* __restrict__ control_ptrs, int rank, int world,
                                             fm_i64 timeout_ns)
{
    fm_i64* local = reinterpret_cast<fm_i64*>(control_ptrs[rank]);
    fm_i64* scalars = local + FM_PER_PEER_ARRAYS * world;

    __shared__ fm_i64 generation_shared;
    __shared__ int skip_wait_shared;
    if (threadIdx.x == 0) {
        generation_shared = scalars[FM_GENERATION] + 1;
        scalars[FM_GENERATION] = generation_shared;
        // After a timeout nobody waits again until the host has seen it (Transport.check clears it):
        // otherwise every later barrier on the stream would wait out the full timeout once more.
        skip_wait_shared = scalars[FM_TIMEOUT_GENERATION] != 0;
    }
    __syncthreads();
    const fm_i64 generation = generation_shared;

    // Rows pushed by earlier kernels on this stream must be visible before a peer sees the arrival.
    __threadfence_system();
    for (int peer = threadIdx.x; peer < world; peer += blockDim.x) {
        fm_i64* remote = reinterpret_cast<fm_i64*>(control_ptrs[peer]);
        const fm_i64 needed = local[FM_FWD_NEEDED * world + peer];
        if (needed != 0) {
            // Only this rank writes its in_needed slot on the peer; the peer only clears it.
            volatile fm_i64* in_needed = remote + FM_IN_NEEDED * world + rank;
            if (*in_needed < needed) {
                *in_needed = needed;
            }
            remote[FM_IN_CAPACITY * world + rank] = local[FM_FWD_CAPACITY * world + peer];
            local[FM_FWD_NEEDED * world + peer] = 0;
        }
        fm_store_release_sys(remote + FM_ARRIVE * world + rank, generation);
    }
    if (skip_wait_shared) {
        return;
    }

    for (int peer = threadIdx.x; peer < world; peer += blockDim.x) {
        const fm_i64* slot = local + FM_ARRIVE * world + peer;
        const fm_u64 start = fm_globaltimer_ns();
        unsigned int polls = 0;
        while (fm_load_acquire_sys(slot) < generation) {
            ++polls;
            if ((polls & 63u) == 0u && static_cast<fm_i64>(fm_globaltimer_ns() - start) > timeout_ns) {
                local[FM_MISSING * world + peer] = generation;
                atomicMax(&scalars[FM_TIMEOUT_GENERATION], generation);
                break;
            }
            if (polls > FM_POLLS_BEFORE_NAP) {
                __nanosleep(128);
            }
        }
    }
    __syncthreads();
    // Each thread acquired its own peers; the fence lets the whole device (the kernels that follow on
    // the stream) observe what every peer released.
    __threadfence_system();
}

// A start gate for ranks that share one GPU (the bench, tools/ll_stamps.py). %globaltimer is one clock
// for every process on a GPU, so ranks that agree on a moment of it (each reads it, they exchange the
// readings through the host, and take the latest plus a margin) and hold their streams until then
// start their timed work within a microsecond or so of each other, however late each host enqueued it.
//   fuser_moe_clock_read:  out[0] = the GPU's %globaltimer now (ns)
//   fuser_moe_clock_wait:  returns once %globaltimer reaches `until`, or after `most_ns` of waiting (a
//                          moment far ahead, or one read on another GPU, never holds the stream long)
extern "C" __global__ void fuser_moe_clock_read(fm_i64* out)
{
    out[0] = static_cast<fm_i64>(fm_globaltimer_ns());
}

extern "C" __global__ void fuser_moe_clock_wait(fm_i64 until, fm_i64 most_ns)
{
    const fm_u64 start = fm_globaltimer_ns();
    for (fm_u64 now = start; static_cast<fm_i64>(now) < until; now = fm_globaltimer_ns()) {
        if (static_cast<fm_i64>(now - start) > most_ns) {
            break;
        }
    }
}
