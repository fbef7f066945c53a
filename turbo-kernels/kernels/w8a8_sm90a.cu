// The W8A8 GEMM on Hopper tensor cores (sm_90a only): `wgmma.mma_async` s8 × s8 → s32 from
// shared-memory descriptors. Same contract, tiles, scales and raster as w8a8.cu's mma.sync
// GEMM (w8a8.cuh); the quantiser stays in w8a8.cu. turbo-quant's CPU code is the specification.
//
// One CTA per 128×128 output tile (or, persistent, one per SM walking its share of them),
// three warpgroups; or 192×128 tiles and four. Warpgroup 0 is the producer: one of its
// threads streams k tiles (128 bytes of k) into a STAGES-deep ring with TMA (a 128- or 192-row
// and a 128-row box of 128 bytes per k tile, from tensor maps in the 128-byte swizzle: at a
// 1024-byte-aligned tile the layout of w8a8.cuh, K-major 8-row atoms of 1024 bytes), each
// stage's `full` mbarrier completing when its bytes have landed. (Clusters of 2 and 2 × 2 CTAs
// that multicast the tiles they share were measured 4–24 % slower than one CTA per tile on an
// H100 and removed: docs/kernels.md v15–v17.)
// The other warpgroups are consumers, each m64 × n128 (its 64 rows of the activation tile
// against the whole weight tile): wait for `full`, issue four m64n128k32 wgmmas into int32
// registers (exact sums), wait for them, release the stage on its `empty` mbarrier and fold
// the sums into f32: acc = fma(sum, x_scale · w_scale, acc), in k-tile order. The fold's single
// rounding differs from the CPU's separate product and sum by at most an ulp of each term.
// No CTA-wide barrier in the loop: the consumers take turns issuing, so that the others fold
// while one's wgmmas run. (Two alternating accumulator sets per consumer would overlap them
// within a warpgroup, but ptxas then serialises every wgmma: C7514, accumulator registers read
// while a wgmma is in flight.)

#include <cuda_bf16.h>
#include <stdint.h>

#include "sm90.cuh"
#include "w8a8.cuh"

namespace {

using namespace w8a8;
using namespace sm90;

// Dynamic shared memory: the stages' mbarriers (BARRIER_BYTES) first, then the tiles, which
// must sit on 1024-byte boundaries (the swizzle atom): their start is aligned up at run time,
// hence up to SMEM_ALIGN more bytes.
constexpr int SMEM_ALIGN = 1024;
constexpr int BARRIER_BYTES = 128;

// The shape of a GEMM with CONSUMERS consumer warpgroups, each computing 64 rows of a
// (64 · CONSUMERS) × 128 output tile, and one producer warpgroup.
template <int CONSUMERS>
struct Geometry {
    static constexpr int BLOCK_M = 64 * CONSUMERS;  // rows of an output tile
    static constexpr int X_TILE_BYTES = BLOCK_M * TILE;
    static constexpr int STAGE_BYTES = X_TILE_BYTES + TILE_BYTES;
    // Stages of the ring (up to STAGES − 1 k tiles in flight while one is multiplied): with two
    // consumers 6 measured 2–3 % faster than 4 on an H200; with three, 5 are all that fit.
    static constexpr int STAGES = CONSUMERS == 2 ? 6 : 5;
    static constexpr int THREADS = (CONSUMERS + 1) * 128;
    static constexpr int CONSUMER_WARPS = CONSUMERS * 4;
    // cuda.rs launches with this.
    static constexpr int SMEM_BYTES = BARRIER_BYTES + SMEM_ALIGN + STAGES * STAGE_BYTES;
    static_assert(2 * 8 * STAGES <= BARRIER_BYTES, "a full and an empty mbarrier per stage");
    static_assert(SMEM_BYTES <= 227 * 1024, "Hopper's shared memory per CTA");
};
static_assert(Geometry<2>::SMEM_BYTES == 193 * 1024 + 128, "turbo-quant's cuda.rs: WGMMA");
static_assert(Geometry<3>::SMEM_BYTES == 201 * 1024 + 128, "turbo-quant's cuda.rs: WGMMA_M192");

// The high word of every operand descriptor of this GEMM (sm90.cuh's smem_descriptor): 1024 bytes
// between 8-row atoms, the 128-byte swizzle. Only the low word (the start address) varies, so the
// loop adds 32-bit offsets to it and builds the 64-bit descriptor inside the wgmma's asm: with
// 64-bit descriptors ptxas spent ~40 instructions a k tile moving and carrying their halves.
constexpr uint32_t DESCRIPTOR_HIGH = (1024 >> 4) | 1u << 30;

// D[64×128] (+)= A[64×32] · B[32×128] (s8 in, exact s32 accumulate), A and B K-major in shared
// memory (the low words of their descriptors); `accumulate` = 0 overwrites D instead of adding
// to it.
__device__ __forceinline__ void wgmma_m64n128k32(int d[64], uint32_t a, uint32_t b,
                                                 int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %66, 0;\n"
        "mov.b64 da, {%64, %67};\nmov.b64 db, {%65, %67};\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, da, db, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
          "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
          "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
          "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
          "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
          "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
          "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
          "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "r"(a), "r"(b), "r"(accumulate), "n"(DESCRIPTOR_HIGH));
}

// Issues the four k32 wgmmas of one k tile into `d` (overwriting it) and commits them, from
// the descriptors' low words of its two operand tiles. The next 32 bytes of k are 2 on in a
// descriptor (its start address counts 16-byte units, and stays inside its 14-bit field:
// shared memory ends below 256 KiB).
__device__ __forceinline__ void issue_k_tile(int d[64], uint32_t a_tile, uint32_t b_tile) {
    fence_registers<64>(d);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < TILE / 32; ++step)
        wgmma_m64n128k32(d, a_tile + 2 * step, b_tile + 2 * step, step);
    wgmma_commit();
}

// How the fold turns a k tile's int32 sums into floats, both exact (|sum| ≤ 2²¹):
enum class Convert {
    // exact_float: an integer add and a float subtract (w8a8.cuh).
    MagicNumber,
    // cvt.rn.f32.s32, one instruction (I2FP on sm_90).
    Cvt,
};

// acc += sum · scale for one k tile's exact sums.
template <Convert CONVERT>
__device__ __forceinline__ void fold(float acc[64], const int d[64], float scale) {
#pragma unroll
    for (int i = 0; i < 64; ++i) {
        const float sum = CONVERT == Convert::Cvt ? __int2float_rn(d[i]) : exact_float(d[i]);
        acc[i] = fmaf(sum, scale, acc[i]);
    }
}

// Named barriers (0 is __syncthreads') that order the consumers' wgmma issues, so that their
// wgmmas queue one warpgroup after the other and the others fold while one multiplies: consumer
// c arrives on issued(c) once it has issued a k tile, and consumer c + 1 waits on it before
// issuing its own (the arriving and the waiting warpgroup, 256 threads).
__device__ __forceinline__ int issued(int consumer) { return 1 + consumer; }
constexpr int PAIR_THREADS = 2 * 128;

// A place in a ring of STAGES stages: the stage of a k tile and the parity of the stage's phase
// that the k tile is (use u = it / STAGES of the stage: parity u & 1), advanced by one k tile at
// a time, so that no loop divides by STAGES (the SASS of `it % STAGES` and `it / STAGES` was a
// tenth of the consumers' loop).
template <int STAGES>
struct RingPosition {
    int stage = 0;
    uint32_t phase = 0;

    __device__ __forceinline__ void advance() {
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1;
        }
    }
};

// Releases a stage once this warp's wgmmas have read it: one arrival per consumer warp on the
// stage's `empty` mbarrier.
__device__ __forceinline__ void release_stage(uint32_t empty_bar) {
    __syncwarp();
    if (threadIdx.x % 32 == 0) mbarrier_arrive(empty_bar);
}

// The consumer's 64 rows of an output tile from its f32 accumulators. Accumulator layout of
// m64nNk32: warp w of the warpgroup holds rows 16w..16w+15; for n8 block j, registers 4j, 4j+1
// are (row g, cols 8j + 2t, +1) and 4j+2, 4j+3 row g + 8.
template <typename T>
__device__ __forceinline__ void store_tile(T* __restrict__ y, const float acc[64], int first_row,
                                           int n_tile, int m, int n) {
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int warp_row = first_row + (threadIdx.x % 128 / 32) * 16 + g;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = warp_row + 8 * half;
        if (row >= m) continue;
        T* y_row = y + (size_t)row * n;
#pragma unroll
        for (int j = 0; j < TILE / 8; ++j) {
            const int col = n_tile * TILE + 8 * j + 2 * t;
            if (col < n) store_pair(y_row, col, n, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
        }
    }
}

// Whether the consumers take turns issuing their wgmmas (named barriers), so that the others
// fold while one's wgmmas run, or issue as soon as their k tile has landed.
enum class Issue {
    InTurn,
    Unordered,
};

// Registers per thread after the warpgroups trade them (setmaxnreg) in a GEMM of three consumers:
// 512 threads leave 128 each, too few for a consumer's 64 accumulators, 64 sums and addresses.
// The producer's one thread needs few. 32 + 3 · 160 = 4 · 128.
constexpr int PRODUCER_REGISTERS = 32;
constexpr int CONSUMER_REGISTERS = 160;

// x_map, w_map: 2-D tensor maps of x_q [M, K] and w_q [N, K] (int8 row-major, K a multiple of
// 16, 128-byte swizzle: turbo-quant's cuda.rs) in boxes of BLOCK_M and 128 rows × 128 bytes;
// scales [⌈M/128⌉, ⌈K/128⌉] and [⌈N/128⌉, ⌈K/128⌉]. grid: one CTA per output tile, 1-D
// (PERSISTENT: at most one CTA per SM); Geometry's THREADS and SMEM_BYTES.
//
// Stage s of the ring has two mbarriers: `full` completes a phase when the k tile's bytes have
// landed (the producer's one arrival with the stage's byte count, which its two copies
// complete), `empty` when the consumer warps have finished reading stage s (one arrival per
// warp). The CTA's k tile `it` (counted over all of its output tiles) is use u = it / STAGES
// of stage it % STAGES: it waits for `full` phase u and, before the refill, `empty` phase
// u − 1 (parities u & 1 and (u − 1) & 1; for u = 0 the wait on parity 1 returns at once, as a
// new mbarrier counts as having completed the phase before its first): a stage cannot get two
// phases ahead of any waiter.
template <typename T, int CONSUMERS, bool PERSISTENT, Convert CONVERT, Issue ISSUE>
__device__ void gemm(const CUtensorMap& x_map, const float* __restrict__ x_scales,
                     const CUtensorMap& w_map, const float* __restrict__ w_scales,
                     T* __restrict__ y, int m, int n, int k) {
    using G = Geometry<CONSUMERS>;
    extern __shared__ __align__(16) int8_t smem[];
    const uint32_t full_bars = shared_address(smem), empty_bars = full_bars + 8 * G::STAGES;
    const uint32_t smem_base =
        (full_bars + BARRIER_BYTES + SMEM_ALIGN - 1) & ~(uint32_t)(SMEM_ALIGN - 1);
    // Broadcast from lane 0 so that ptxas knows it is warp-uniform: the descriptors built from it
    // then stay in uniform registers instead of being moved into them before every wgmma.
    const int warpgroup = __shfl_sync(0xffffffff, threadIdx.x / 128, 0);

    const int k_tiles = (k + TILE - 1) / TILE;
    const int m_tiles = (m + G::BLOCK_M - 1) / G::BLOCK_M, n_tiles = (n + TILE - 1) / TILE;
    // The output tiles this CTA computes: its own, or with PERSISTENT every gridDim.x-th from
    // it, so that the ring loads a tile's first k tiles while the consumers still multiply and
    // store the last one. The ring position runs on over all of the CTA's output tiles.
    const int tiles = m_tiles * n_tiles;
    const int tile_step = PERSISTENT ? gridDim.x : tiles;
    auto tile_at = [&](int index) { return grouped_tile(index, m_tiles, n_tiles, GROUP_M); };

    if (threadIdx.x == 0) {
        for (int s = 0; s < G::STAGES; ++s) {
            mbarrier_init(full_bars + 8 * s, 1);
            mbarrier_init(empty_bars + 8 * s, G::CONSUMER_WARPS);
        }
        mbarrier_init_fence();
    }
    __syncthreads();

    if (warpgroup == 0) {
        if (CONSUMERS > 2) set_max_registers<PRODUCER_REGISTERS, false>();
        // Producer: each k tile into the next stage once every consumer is done with the k tile
        // that was there. One thread issues the copies; the rest have nothing to do.
        if (threadIdx.x == 0) {
            RingPosition<G::STAGES> at;
            for (int index = blockIdx.x; index < tiles; index += tile_step) {
                const TileCoord tile = tile_at(index);
                for (int kt = 0; kt < k_tiles; ++kt, at.advance()) {
                    const uint32_t full = full_bars + 8 * at.stage;
                    const uint32_t stage = smem_base + at.stage * G::STAGE_BYTES;
                    mbarrier_wait(empty_bars + 8 * at.stage, at.phase ^ 1);
                    mbarrier_arrive_expect_tx(full, G::STAGE_BYTES);
                    tma_load_2d(stage, &x_map, kt * TILE, tile.m_tile * G::BLOCK_M, full);
                    tma_load_2d(stage + G::X_TILE_BYTES, &w_map, kt * TILE, tile.n_tile * TILE,
                                full);
                }
            }
        }
    } else {
        if (CONSUMERS > 2) set_max_registers<CONSUMER_REGISTERS, true>();
        const int consumer = warpgroup - 1;
        // Descriptors of this consumer's operand tiles in stage 0; stage s is s · STAGE_BYTES / 16
        // on in the start address (16-byte units; shared memory ends below 256 KiB, so the
        // 14-bit field never carries).
        const uint32_t x_descriptor =
            opaque((uint32_t)smem_descriptor(smem_base + consumer * (64 * TILE)));
        const uint32_t w_descriptor =
            opaque((uint32_t)smem_descriptor(smem_base + G::X_TILE_BYTES));
        const uint32_t full = opaque(full_bars), empty = full + 8 * G::STAGES;
        const int x_scale_rows = (m + TILE - 1) / TILE;
        RingPosition<G::STAGES> at;
        bool first = true;
        for (int index = blockIdx.x; index < tiles; index += tile_step) {
            const TileCoord tile = tile_at(index);
            const int first_row = tile.m_tile * G::BLOCK_M + consumer * 64;
            // This consumer's 64 rows lie in one 128-row scale tile (the last one if they are
            // all past m: their zeros are not stored).
            const int x_scale_row = min(first_row / TILE, x_scale_rows - 1);
            const float* x_scale = x_scales + (size_t)x_scale_row * k_tiles;
            const float* w_scale = w_scales + (size_t)tile.n_tile * k_tiles;
            float acc[64];
#pragma unroll
            for (int i = 0; i < 64; ++i) acc[i] = 0.f;
            int sums[64];  // one k tile's exact sums
            // The scales of k tile kt + 1 load while k tile kt is multiplied, so the fold never
            // waits for them (their global-load latency was the third stall reason under ncu).
            float x_scale_next = __ldg(x_scale), w_scale_next = __ldg(w_scale);

            const bool last_tile = index + tile_step >= tiles;
            for (int kt = 0; kt < k_tiles; ++kt, at.advance()) {
                const float x_scale_now = x_scale_next, w_scale_now = w_scale_next;
                const int next = min(kt + 1, k_tiles - 1);  // in bounds; unused after the last
                x_scale_next = __ldg(x_scale + next);
                w_scale_next = __ldg(w_scale + next);
                // In turn over all of the CTA's k tiles: consumer c issues a k tile after
                // consumer c − 1 has, consumer 0 the next after the last consumer has issued this
                // one (also across output tiles, or consumer 0 could arrive twice on one named
                // barrier before consumer 1 waits on it once).
                if (ISSUE == Issue::InTurn) {
                    if (consumer > 0) named_barrier_sync<PAIR_THREADS>(issued(consumer - 1));
                    else if (!first) named_barrier_sync<PAIR_THREADS>(issued(CONSUMERS - 1));
                    first = false;
                }
                mbarrier_wait(full + 8 * at.stage, at.phase);
                const uint32_t stage_offset = at.stage * (G::STAGE_BYTES >> 4);
                issue_k_tile(sums, x_descriptor + stage_offset, w_descriptor + stage_offset);
                // Nobody waits for the last consumer's last k tile.
                if (ISSUE == Issue::InTurn &&
                    (consumer < CONSUMERS - 1 || kt + 1 < k_tiles || !last_tile))
                    named_barrier_arrive<PAIR_THREADS>(issued(consumer));
                wgmma_wait<0>();
                fence_registers<64>(sums);
                release_stage(empty + 8 * at.stage);
                fold<CONVERT>(acc, sums, __fmul_rn(x_scale_now, w_scale_now));
            }
            store_tile(y, acc, first_row, tile.n_tile, m, n);
        }
    }
}

}  // namespace

// The kernels: f32 or bf16 output; two consumers and 128-row tiles or three and 192-row tiles;
// one CTA per tile or a persistent grid; folding with the magic number or with cvt; consumers
// in turn or unordered. The same sums in the same order: the same output bit for bit.
#define W8A8_GEMM_WGMMA(NAME, T, CONSUMERS, PERSISTENT, CONVERT, ISSUE)                       \
    extern "C" __global__ void __launch_bounds__(Geometry<CONSUMERS>::THREADS, 1)             \
        NAME(const __grid_constant__ CUtensorMap x_map, const float* xs,                      \
             const __grid_constant__ CUtensorMap w_map, const float* ws, T* y, int m, int n,   \
             int k) {                                                                          \
        gemm<T, CONSUMERS, PERSISTENT, Convert::CONVERT, Issue::ISSUE>(x_map, xs, w_map, ws,   \
                                                                       y, m, n, k);            \
    }

W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_f32, float, 2, false, MagicNumber, InTurn)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_bf16, bf16, 2, false, MagicNumber, InTurn)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_persistent_f32, float, 2, true, MagicNumber, InTurn)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_persistent_bf16, bf16, 2, true, MagicNumber, InTurn)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_cvt_f32, float, 2, false, Cvt, InTurn)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_cvt_bf16, bf16, 2, false, Cvt, InTurn)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_persistent_cvt_f32, float, 2, true, Cvt, InTurn)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_persistent_cvt_bf16, bf16, 2, true, Cvt, InTurn)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_persistent_cvt_unordered_f32, float, 2, true, Cvt, Unordered)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_persistent_cvt_unordered_bf16, bf16, 2, true, Cvt, Unordered)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_m192_persistent_cvt_f32, float, 3, true, Cvt, InTurn)
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_m192_persistent_cvt_bf16, bf16, 3, true, Cvt, InTurn)
