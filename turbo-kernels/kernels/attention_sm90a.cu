// Dense and block-sparse flash attention on Hopper tensor cores (sm_90a only): the contracts of
// attention.cu's `sparse_attention_bf16` and `sparse_attention_sage` (same arguments,
// tokens-first [B, L, H, D], D = 128, query blocks of 128 rows, key blocks of 64, SLA's linear
// branch in the epilogue), with both products on `wgmma.mma_async` instead of `mma.sync`.
//
// One CTA per (query block, batch·head), three warpgroups. Warpgroup 0 is the producer: it
// copies the key and value tiles of the visited key blocks, two blocks (128 keys) per step,
// into a STAGES-deep ring with cp.async, signalling each stage's `full` mbarrier when its
// copies land. Warpgroups 1 and 2 are consumers, 64 query rows each, which they load into
// registers as the A fragments of S = Q·Kᵀ (bf16 k16 steps, or int8 k32 steps for SageSLA,
// quantised by the consumers with the block scale max|q|/127 + 1e-7 as the mma.sync kernel
// does). Tiles are stored in wgmma's 128-byte swizzle: rows of 128 bytes, 16-byte chunk c of
// row r at chunk c ^ (r mod 8), a bf16 tile as two column halves of 64 channels. K is the
// K-major B operand of S (m64n128); V is the MN-major B operand of O += P·V (m64n128k16 over
// the step's 128 keys), with P from registers: the S accumulator layout is the A fragment
// layout, as with mma.sync. SageSLA's V holds E4M3 values in bf16, so the bf16 product is the
// FP8 one.
//
// A consumer's step j (visited key blocks 2j and 2j + 1) issues S(j) = Q·K(j)ᵀ and
// P(j−1)·V(j−1), waits for S(j) only and computes its exponentials while its P·V runs, then
// waits for that, releases stage j−1 and rescales O. The online softmax is attention.cuh's,
// shared with the mma.sync kernels: a warp's rows of a wgmma accumulator are laid out as
// mma.sync's. The two consumers take turns to issue (named barriers), so that one computes
// its softmax while the other's products run.

#include "attention.cuh"
#include "sm90.cuh"

namespace {

using namespace attention;
using namespace sm90;
using turbo::cp_async_16;

constexpr int WARPGROUP = 128;
constexpr int KERNEL_THREADS = 3 * WARPGROUP;
constexpr int CONSUMER_THREADS = 2 * WARPGROUP;
// Key blocks per step: the tiles of a stage and the width of S.
constexpr int STEP_BLOCKS = 2;
constexpr int STEP_KEYS = STEP_BLOCKS * BLOCK_K;
// Stages of the key/value ring.
constexpr int STAGES = 3;
// A swizzled tile row: 64 bf16 or 128 int8 channels.
constexpr int ROW_BYTES = 128;
constexpr int KV_HALF_BYTES = STEP_KEYS * ROW_BYTES;
constexpr int STAGE_BYTES = 2 * 2 * KV_HALF_BYTES;  // a bf16 key and value tile
// Dynamic shared memory: the mbarriers (a `full` and an `empty` per stage), then the ring,
// aligned up to the 1024-byte swizzle atom. src/cuda.rs launches with SMEM_BYTES.
constexpr int BARRIER_BYTES = 128;
constexpr int SMEM_ALIGN = 1024;
constexpr int SMEM_BYTES = BARRIER_BYTES + SMEM_ALIGN + STAGES * STAGE_BYTES;
static_assert(SMEM_BYTES == 193 * 1024 + 128, "turbo-attention's cuda.rs launches with this");
static_assert(8 * 2 * STAGES <= BARRIER_BYTES, "the mbarriers fit");
static_assert(STAGES * STAGE_BYTES >= STATE_BYTES, "the epilogue's state fits in the ring");

// Registers per thread after the producer gives some up to the consumers (setmaxnreg).
constexpr int PRODUCER_REGISTERS = 56;
constexpr int CONSUMER_REGISTERS = 224;
static_assert(WARPGROUP * (PRODUCER_REGISTERS + 2 * CONSUMER_REGISTERS) <= 65536, "the register file");

// Named barriers of the consumers: consumer c waits on TURN + c for its turn to issue;
// ALL_CONSUMERS gathers both (the query block's maximum, the epilogue).
constexpr int TURN = 1;
constexpr int ALL_CONSUMERS = 3;

// Where the kernels' operands are; `k` is bf16, or int8 for SageSLA, whose `k_scale`
// [B·H, ⌈L/64⌉] and `v_scale` [B·H, D] are null otherwise.
struct Operands {
    const bf16* q;
    const void* k;
    const bf16* v;
    const float* k_scale;
    const float* v_scale;
    const uint32_t* block_idx;
    LinearBranch lin;
    bf16* out;
    int heads, q_len, kv_len, n_sel;
    float score_scale;
};

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile of ROWS rows (chunks
// 8.. of a bf16 row are in the second column half).
template <int ROWS>
__device__ __forceinline__ uint32_t tile_offset(int row, int chunk) {
    return (chunk / 8) * ROWS * ROW_BYTES + row * ROW_BYTES + (((chunk % 8) ^ (row & 7)) << 4);
}

// The producer's copy of one key block's 64 rows of CHUNKS 16-byte chunks, `pitch` bytes apart,
// into rows `first`.. of the swizzled tile at `dst` (TILE_ROWS rows); rows from `valid` on are
// zero. Thread `thread` of the producer.
template <int TILE_ROWS, int CHUNKS>
__device__ __forceinline__ void load_block(uint32_t dst, int first, const void* src, size_t pitch,
                                           int valid, int thread) {
    for (int c = thread; c < BLOCK_K * CHUNKS; c += WARPGROUP) {
        const int row = c / CHUNKS, chunk = c % CHUNKS;
        const bool inside = row < valid;
        const char* from = static_cast<const char*>(src) + (inside ? row * pitch + chunk * 16 : 0);
        cp_async_16(dst + tile_offset<TILE_ROWS>(first + row, chunk), from, inside);
    }
}

// S[64×128] (+)= Q[64×16]·K[128×16]ᵀ, bf16: Q from registers (A fragments), K K-major in shared
// memory; `accumulate` = 0 overwrites.
__device__ __forceinline__ void wgmma_scores(float s[64], const uint32_t q[4], uint64_t k, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
        : "+f"(s[0]), "+f"(s[1]), "+f"(s[2]), "+f"(s[3]), "+f"(s[4]), "+f"(s[5]), "+f"(s[6]), "+f"(s[7]),
          "+f"(s[8]), "+f"(s[9]), "+f"(s[10]), "+f"(s[11]), "+f"(s[12]), "+f"(s[13]), "+f"(s[14]), "+f"(s[15]),
          "+f"(s[16]), "+f"(s[17]), "+f"(s[18]), "+f"(s[19]), "+f"(s[20]), "+f"(s[21]), "+f"(s[22]), "+f"(s[23]),
          "+f"(s[24]), "+f"(s[25]), "+f"(s[26]), "+f"(s[27]), "+f"(s[28]), "+f"(s[29]), "+f"(s[30]), "+f"(s[31]),
          "+f"(s[32]), "+f"(s[33]), "+f"(s[34]), "+f"(s[35]), "+f"(s[36]), "+f"(s[37]), "+f"(s[38]), "+f"(s[39]),
          "+f"(s[40]), "+f"(s[41]), "+f"(s[42]), "+f"(s[43]), "+f"(s[44]), "+f"(s[45]), "+f"(s[46]), "+f"(s[47]),
          "+f"(s[48]), "+f"(s[49]), "+f"(s[50]), "+f"(s[51]), "+f"(s[52]), "+f"(s[53]), "+f"(s[54]), "+f"(s[55]),
          "+f"(s[56]), "+f"(s[57]), "+f"(s[58]), "+f"(s[59]), "+f"(s[60]), "+f"(s[61]), "+f"(s[62]), "+f"(s[63])
        : "r"(q[0]), "r"(q[1]), "r"(q[2]), "r"(q[3]), "l"(k), "r"(accumulate));
}

// The same with int8 operands, k 32, exact int32 sums.
__device__ __forceinline__ void wgmma_scores(int s[64], const uint32_t q[4], uint64_t k, int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p;\n}\n"
        : "+r"(s[0]), "+r"(s[1]), "+r"(s[2]), "+r"(s[3]), "+r"(s[4]), "+r"(s[5]), "+r"(s[6]), "+r"(s[7]),
          "+r"(s[8]), "+r"(s[9]), "+r"(s[10]), "+r"(s[11]), "+r"(s[12]), "+r"(s[13]), "+r"(s[14]), "+r"(s[15]),
          "+r"(s[16]), "+r"(s[17]), "+r"(s[18]), "+r"(s[19]), "+r"(s[20]), "+r"(s[21]), "+r"(s[22]), "+r"(s[23]),
          "+r"(s[24]), "+r"(s[25]), "+r"(s[26]), "+r"(s[27]), "+r"(s[28]), "+r"(s[29]), "+r"(s[30]), "+r"(s[31]),
          "+r"(s[32]), "+r"(s[33]), "+r"(s[34]), "+r"(s[35]), "+r"(s[36]), "+r"(s[37]), "+r"(s[38]), "+r"(s[39]),
          "+r"(s[40]), "+r"(s[41]), "+r"(s[42]), "+r"(s[43]), "+r"(s[44]), "+r"(s[45]), "+r"(s[46]), "+r"(s[47]),
          "+r"(s[48]), "+r"(s[49]), "+r"(s[50]), "+r"(s[51]), "+r"(s[52]), "+r"(s[53]), "+r"(s[54]), "+r"(s[55]),
          "+r"(s[56]), "+r"(s[57]), "+r"(s[58]), "+r"(s[59]), "+r"(s[60]), "+r"(s[61]), "+r"(s[62]), "+r"(s[63])
        : "r"(q[0]), "r"(q[1]), "r"(q[2]), "r"(q[3]), "l"(k), "r"(accumulate));
}

// O[64×128] += P[64×16]·V[16×128]: P from registers (A fragments), V MN-major in shared memory.
__device__ __forceinline__ void wgmma_values(float o[64], const uint32_t p[4], uint64_t v) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(o[0]), "+f"(o[1]), "+f"(o[2]), "+f"(o[3]), "+f"(o[4]), "+f"(o[5]), "+f"(o[6]), "+f"(o[7]),
          "+f"(o[8]), "+f"(o[9]), "+f"(o[10]), "+f"(o[11]), "+f"(o[12]), "+f"(o[13]), "+f"(o[14]), "+f"(o[15]),
          "+f"(o[16]), "+f"(o[17]), "+f"(o[18]), "+f"(o[19]), "+f"(o[20]), "+f"(o[21]), "+f"(o[22]), "+f"(o[23]),
          "+f"(o[24]), "+f"(o[25]), "+f"(o[26]), "+f"(o[27]), "+f"(o[28]), "+f"(o[29]), "+f"(o[30]), "+f"(o[31]),
          "+f"(o[32]), "+f"(o[33]), "+f"(o[34]), "+f"(o[35]), "+f"(o[36]), "+f"(o[37]), "+f"(o[38]), "+f"(o[39]),
          "+f"(o[40]), "+f"(o[41]), "+f"(o[42]), "+f"(o[43]), "+f"(o[44]), "+f"(o[45]), "+f"(o[46]), "+f"(o[47]),
          "+f"(o[48]), "+f"(o[49]), "+f"(o[50]), "+f"(o[51]), "+f"(o[52]), "+f"(o[53]), "+f"(o[54]), "+f"(o[55]),
          "+f"(o[56]), "+f"(o[57]), "+f"(o[58]), "+f"(o[59]), "+f"(o[60]), "+f"(o[61]), "+f"(o[62]), "+f"(o[63])
        : "r"(p[0]), "r"(p[1]), "r"(p[2]), "r"(p[3]), "l"(v), "r"(1));
}

// P of one step as the A fragments of the k16 steps of P·V.
__device__ __forceinline__ void pack_weights(uint32_t p[STEP_KEYS / 16][4], const float s[STEP_KEYS / 8][4]) {
#pragma unroll
    for (int k = 0; k < STEP_KEYS / 16; ++k) {
        p[k][0] = pack_bf16(s[2 * k][0], s[2 * k][1]);
        p[k][1] = pack_bf16(s[2 * k][2], s[2 * k][3]);
        p[k][2] = pack_bf16(s[2 * k + 1][0], s[2 * k + 1][1]);
        p[k][3] = pack_bf16(s[2 * k + 1][2], s[2 * k + 1][3]);
    }
}

// Issues (without waiting) S = Q·Kᵀ of the bf16 key tile at `k_tile` for the query fragments
// `qf`, D in k16 steps over the tile's two column halves.
__device__ __forceinline__ void issue_scores(float s[64], const uint32_t qf[HEAD_DIM / 16][4], uint32_t k_tile) {
#pragma unroll
    for (int step = 0; step < HEAD_DIM / 16; ++step) {
        const uint32_t half = step / 4, slice = (step % 4) * 32;
        wgmma_scores(s, qf[step], smem_descriptor(k_tile + half * KV_HALF_BYTES + slice), step > 0);
    }
}

// The int8 form: one 128-byte row per key, D in k32 steps.
__device__ __forceinline__ void issue_scores(int s[64], const uint32_t qf[HEAD_DIM / 32][4], uint32_t k_tile) {
#pragma unroll
    for (int step = 0; step < HEAD_DIM / 32; ++step)
        wgmma_scores(s, qf[step], smem_descriptor(k_tile + 32 * step), step > 0);
}

// Issues (without waiting) O += P·V for the value tile at `v_tile`.
__device__ __forceinline__ void issue_values(RowState& st, const uint32_t p[STEP_KEYS / 16][4], uint32_t v_tile) {
#pragma unroll
    for (int step = 0; step < STEP_KEYS / 16; ++step)
        wgmma_values(&st.o[0][0], p[step], smem_descriptor(v_tile + step * 16 * ROW_BYTES, KV_HALF_BYTES));
}

// The CTA's shared-memory ring: stage j % STAGES holds step j's key and value tiles, with a
// `full` mbarrier (the producer's copies have landed) and an `empty` one (both consumers are
// done with them).
struct Ring {
    uint32_t full_bars, empty_bars, tiles;

    __device__ uint32_t full(int j) const { return full_bars + 8 * (j % STAGES); }
    __device__ uint32_t empty(int j) const { return empty_bars + 8 * (j % STAGES); }
    __device__ uint32_t keys(int j) const { return tiles + (j % STAGES) * STAGE_BYTES; }
    __device__ uint32_t values(int j) const { return keys(j) + 2 * KV_HALF_BYTES; }
};

// The producer warpgroup: the visited key blocks of step j (`key_block(i)` is the i-th) into
// stage j % STAGES once both consumers have released the tiles that were there. A missing
// second block (n_sel odd) leaves zero rows, which the consumers mask.
template <bool SAGE, typename KeyBlock>
__device__ void produce(const Operands& in, const Ring& ring, const HeadView& kv_view, int steps,
                        KeyBlock key_block) {
    constexpr int KEY_BYTES = SAGE ? 1 : 2;
    const int thread = threadIdx.x;
    for (int j = 0; j < steps; ++j) {
        const int use = j / STAGES;
        if (use > 0) mbarrier_wait(ring.empty(j), (use - 1) & 1);
        for (int b = 0; b < STEP_BLOCKS; ++b) {
            const int i = STEP_BLOCKS * j + b;
            const int key0 = i < in.n_sel ? key_block(i) * BLOCK_K : 0;
            const int rows = i < in.n_sel ? min(BLOCK_K, in.kv_len - key0) : 0;
            const size_t offset = kv_view.base + (size_t)key0 * kv_view.pitch;
            load_block<STEP_KEYS, HEAD_DIM * KEY_BYTES / 16>(
                ring.keys(j), b * BLOCK_K, static_cast<const char*>(in.k) + offset * KEY_BYTES,
                kv_view.pitch * KEY_BYTES, rows, thread);
            load_block<STEP_KEYS, HEAD_DIM * 2 / 16>(ring.values(j), b * BLOCK_K, in.v + offset,
                                      kv_view.pitch * sizeof(bf16), rows, thread);
        }
        mbarrier_arrive_on_cp_async(ring.full(j));
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}

template <bool SAGE>
__device__ void flash_attention(const Operands& in) {
    extern __shared__ __align__(16) char smem[];
    __shared__ float scratch[CONSUMER_THREADS / 32];
    const uint32_t smem_address = (uint32_t)__cvta_generic_to_shared(smem);
    const Ring ring{smem_address, smem_address + 8 * STAGES,
                    (smem_address + BARRIER_BYTES + SMEM_ALIGN - 1) & ~(uint32_t)(SMEM_ALIGN - 1)};

    const int qb = blockIdx.x, bh = blockIdx.y, n_sel = in.n_sel;
    const int warpgroup = threadIdx.x / WARPGROUP;
    const HeadView view(bh, in.heads, in.q_len), kv_view(bh, in.heads, in.kv_len);
    const size_t select_row = (size_t)bh * gridDim.x + qb;
    auto key_block = [&](int i) { return key_block_at(in.block_idx, select_row, n_sel, i); };
    const int steps = (n_sel + STEP_BLOCKS - 1) / STEP_BLOCKS;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(ring.full(s), WARPGROUP);
            mbarrier_init(ring.empty(s), CONSUMER_THREADS);
        }
        mbarrier_init_fence();
    }
    __syncthreads();

    if (warpgroup == 0) {
        // The producer needs few registers; the consumers take them (the 384 threads get 168
        // each at launch).
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(PRODUCER_REGISTERS));
        produce<SAGE>(in, ring, kv_view, steps, key_block);
        return;
    }

    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(CONSUMER_REGISTERS));
    const int consumer = warpgroup - 1, thread = threadIdx.x - WARPGROUP;
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int row0 = qb * BLOCK_Q + consumer * 64 + (thread % WARPGROUP / 32) * 16;
    // The warp's query rows as A fragments (SageSLA: int8, one scale for the block).
    uint32_t qf[SAGE ? HEAD_DIM / 32 : HEAD_DIM / 16][4];
    float q_scale = 1.f;
    if (SAGE) {
        q_scale = quantize_query_fragments(qf, in.q, view, row0, in.q_len, g, t, [&](float amax) {
            for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, o));
            if (lane == 0) scratch[thread / 32] = amax;
            named_barrier_sync<CONSUMER_THREADS>(ALL_CONSUMERS);
            for (int w = 0; w < CONSUMER_THREADS / 32; ++w) amax = fmaxf(amax, scratch[w]);
            return amax;
        });
    } else {
        load_query_fragments(qf, in.q, view, row0, in.q_len, g, t);
    }
    // The factor that takes key block i's raw scores to base 2 (SageSLA: its int32 sums).
    const int key_blocks = (in.kv_len + BLOCK_K - 1) / BLOCK_K;
    auto block_scale = [&](int i) {
        return SAGE ? q_scale * in.score_scale * in.k_scale[(size_t)bh * key_blocks + key_block(i)]
                    : in.score_scale;
    };

    RowState st;
    st.init();
    // S(j) as the products leave it (int32 sums for SageSLA), then as floats, then P(j).
    union {
        float f[STEP_KEYS / 8][4];
        int i[STEP_KEYS / 2];
    } s;
    typedef typename std::conditional<SAGE, int, float>::type Score;
    Score* raw = reinterpret_cast<Score*>(&s);
    uint32_t p[STEP_KEYS / 16][4];  // P(j − 1) as A fragments
    float alpha[2];
    // Waits for step j's tiles. They were written through the generic proxy (cp.async); wgmma
    // reads them through the async proxy.
    auto wait_tiles = [&](int j) {
        mbarrier_wait(ring.full(j), (j / STAGES) & 1);
        fence_proxy_async();
    };
    auto take_turn = [&] {
        named_barrier_sync<CONSUMER_THREADS>(TURN + consumer);
        wgmma_fence();
    };
    // `last`: the other consumer takes no further turn after this one.
    auto end_turn = [&](bool last) {
        if (!(last && consumer == 1)) named_barrier_arrive<CONSUMER_THREADS>(TURN + 1 - consumer);
    };
    // Step j's weights from its finished scores: each block's scale (SageSLA: applied to the
    // sums first, as the CPU emulation does) and mask (a missing block: every key).
    auto weights = [&](int j) {
        fence_registers<STEP_KEYS / 2>(raw);
        float scale = in.score_scale;
#pragma unroll
        for (int b = 0; b < STEP_BLOCKS; ++b) {
            const int i = STEP_BLOCKS * j + b;
            float(*block)[4] = s.f + b * (BLOCK_K / 8);
            if (SAGE) {
                const float sum_scale = i < n_sel ? block_scale(i) : 0.f;
#pragma unroll
                for (int k = 0; k < BLOCK_K / 2; ++k) block[k / 4][k % 4] = (float)raw[b * (BLOCK_K / 2) + k] * sum_scale;
                scale = 1.f;
            }
            mask_tail(block, i < n_sel ? key_block(i) * BLOCK_K : in.kv_len, in.kv_len, t);
        }
        softmax_weights(st, s.f, scale, SAGE ? P_FP8_OFFSET : 0.f, SAGE, alpha);
    };
    auto values_done = [&] {
        wgmma_wait<0>();
        fence_registers<64>(&st.o[0][0]);
    };

    if (consumer == 1) named_barrier_arrive<CONSUMER_THREADS>(TURN);  // consumer 0 goes first
    wait_tiles(0);
    take_turn();
    issue_scores(raw, qf, ring.keys(0));
    wgmma_commit();
    end_turn(false);
    wgmma_wait<0>();
    weights(0);
    pack_weights(p, s.f);  // O is still zero: nothing to rescale
    for (int j = 1; j < steps; ++j) {
        wait_tiles(j);
        take_turn();
        issue_scores(raw, qf, ring.keys(j));
        wgmma_commit();
        issue_values(st, p, ring.values(j - 1));
        wgmma_commit();
        end_turn(false);
        wgmma_wait<1>();
        weights(j);
        values_done();
        mbarrier_arrive(ring.empty(j - 1));
        rescale_rows(st, alpha);
        pack_weights(p, s.f);
    }
    take_turn();
    issue_values(st, p, ring.values(steps - 1));
    wgmma_commit();
    end_turn(true);
    values_done();

    char* ring_memory = smem + (ring.tiles - smem_address);
    const float* channel_scale = SAGE ? in.v_scale + (size_t)bh * HEAD_DIM : nullptr;
    finish_rows(st, in.q, in.out, view, row0, in.q_len, g, t, channel_scale, in.lin, bh,
                ring_memory, thread, CONSUMER_THREADS,
                [] { named_barrier_sync<CONSUMER_THREADS>(ALL_CONSUMERS); });
}

}  // namespace

// Dense (block_idx null) or block-sparse bf16 attention with SLA's linear branch (lin_state not
// null): `sparse_attention_bf16`'s arguments. grid (⌈q_len/128⌉, B·H), 384 threads, SMEM_BYTES
// of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(KERNEL_THREADS, 1)
attention_wgmma_bf16(const bf16* q, const bf16* k, const bf16* v, const uint32_t* block_idx,
                     const bf16* lin_state, const float* lin_z, const float* lin_bias, bf16* out,
                     int heads, int q_len, int kv_len, int n_sel, float scale_log2, float lin_eps) {
    const Operands in{q, k, v, nullptr, nullptr, block_idx, {lin_state, lin_z, lin_bias, lin_eps},
                      out, heads, q_len, kv_len, n_sel, scale_log2};
    flash_attention<false>(in);
}

// SageSLA's sparse branch and SLA's linear branch: `sparse_attention_sage`'s arguments. grid
// (⌈len/128⌉, B·H), 384 threads, SMEM_BYTES of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(KERNEL_THREADS, 1)
attention_wgmma_sage(const bf16* q, const int8_t* k8, const bf16* v8, const float* k_scale,
                     const float* v_scale, const uint32_t* block_idx, const bf16* lin_state,
                     const float* lin_z, const float* lin_bias, bf16* out, int heads, int len,
                     int n_sel, float score_scale, float lin_eps) {
    const Operands in{q, k8, v8, k_scale, v_scale, block_idx, {lin_state, lin_z, lin_bias, lin_eps},
                      out, heads, len, len, n_sel, score_scale};
    flash_attention<true>(in);
}
