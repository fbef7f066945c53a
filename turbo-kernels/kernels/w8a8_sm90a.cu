// The W8A8 GEMM on Hopper tensor cores (sm_90a only): `wgmma.mma_async` s8 × s8 → s32 from
// shared-memory descriptors. Same contract, tiles, scales and raster as w8a8.cu's mma.sync
// GEMM (w8a8.cuh); the quantiser stays in w8a8.cu. turbo-quant's CPU code is the specification.
//
// One CTA per 128×128 output tile (or, persistent, one per SM walking its share of them),
// three warpgroups. Warpgroup 0 is the producer: one of its
// threads streams k tiles (128 bytes of k) into a STAGES-deep ring with TMA (two 128×128-byte
// boxes per k tile, from tensor maps in the 128-byte swizzle: at a 1024-byte-aligned tile the
// layout of w8a8.cuh, K-major 8-row atoms of 1024 bytes), each stage's `full` mbarrier
// completing when its bytes have landed. CTAs may run as clusters on neighbouring tiles
// (`Cluster` below) that split the loads of the tiles they share and multicast them, which
// cuts the bytes each k tile moves from L2.
// Warpgroups 1 and 2 are consumers, each m64 × n128 (its 64 rows of the activation tile
// against the whole weight tile): wait for `full`, issue four m64n128k32 wgmmas into int32
// registers (exact sums), wait for them, release the stage on its `empty` mbarrier and fold
// the sums into f32: acc = fma(sum, x_scale · w_scale, acc), in k-tile order. The fold's single
// rounding differs from the CPU's separate product and sum by at most an ulp of each term.
// No CTA-wide barrier in the loop, so the consumers drift apart and one's fold overlaps the
// other's wgmmas. (Two alternating accumulator sets per consumer would overlap them within a
// warpgroup, but ptxas then serialises every wgmma: C7514, accumulator registers read while a
// wgmma is in flight.)

#include <cuda_bf16.h>
#include <stdint.h>

#include "sm90.cuh"
#include "w8a8.cuh"

namespace {

using namespace w8a8;
using namespace sm90;

// Stages of the ring (up to STAGES − 1 k tiles in flight while one is multiplied; 6 measured
// 2–3 % faster than 4 on an H200).
constexpr int STAGES = 6;
// Dynamic shared memory: the stages' mbarriers (BARRIER_BYTES) first, then the tiles, which
// must sit on 1024-byte boundaries (the swizzle atom): their start is aligned up at run time,
// hence up to SMEM_ALIGN more bytes. cuda.rs launches with GEMM_SMEM_BYTES.
constexpr int SMEM_ALIGN = 1024;
constexpr int BARRIER_BYTES = 128;
constexpr int GEMM_SMEM_BYTES = BARRIER_BYTES + SMEM_ALIGN + STAGES * STAGE_BYTES;
static_assert(GEMM_SMEM_BYTES == 193 * 1024 + 128, "turbo-quant's cuda.rs launches with this");
static_assert(2 * 8 * STAGES <= BARRIER_BYTES, "a full and an empty mbarrier per stage");

// D[64×128] (+)= A[64×32] · B[32×128] (s8 in, exact s32 accumulate), A and B K-major in shared
// memory (descriptors); `accumulate` = 0 overwrites D instead of adding to it.
__device__ __forceinline__ void wgmma_m64n128k32(int d[64], uint64_t a, uint64_t b,
                                                 int accumulate) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n}\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]),
          "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]),
          "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]),
          "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]),
          "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]),
          "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]),
          "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]),
          "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
        : "l"(a), "l"(b), "r"(accumulate));
}

// Issues the four k32 wgmmas of one k tile into `d` (overwriting it) and commits them, from
// the descriptors of its two operand tiles. The next 32 bytes of k are 2 on in a descriptor
// (its start address counts 16-byte units, and stays inside its 14-bit field: shared memory
// ends below 256 KiB), so the loop computes no descriptor.
__device__ __forceinline__ void issue_k_tile(int d[64], uint64_t a_tile, uint64_t b_tile) {
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

// Warpgroup 0 loads, warpgroups 1 and 2 multiply (rows 0-63 and 64-127 of the tile).
constexpr int WGMMA_THREADS = 3 * 128;
constexpr int CONSUMER_THREADS = 2 * 128;
constexpr int CONSUMER_WARPS = CONSUMER_THREADS / 32;

// Named barriers (0 is __syncthreads') that order the two consumers' wgmma issues, so that
// their wgmmas queue one warpgroup after the other and one folds while the other multiplies:
// one warpgroup arrives, the other waits (CONSUMER_THREADS in all).
constexpr int CONSUMER_0_ISSUED = 1;
constexpr int CONSUMER_1_ISSUED = 2;

// A cluster of CM × CN CTAs (1 or 2 each) on neighbouring output tiles: the CM CTAs of one n
// tile share its weight tile, the CN CTAs of one m tile its activation tile. Each loads its
// 1/CN of the activation tile's rows and 1/CM of the weight tile's and multicasts them to the
// CTAs that share them, so a k tile moves 32 KiB · (1/CN + 1/CM) / 2 from L2 per CTA.
// In a 1-D grid a cluster is CM·CN consecutive CTAs; rank r is at (r % CM, r / CM) in it.
template <int CM, int CN>
struct Cluster {
    static constexpr int SIZE = CM * CN;
    int m_rank, n_rank;

    __device__ Cluster() : m_rank(blockIdx.x % SIZE % CM), n_rank(blockIdx.x % SIZE / CM) {}

    // Clusters' worth of tiles along m and n: the tiles rounded up to whole clusters.
    __device__ static int m_units(int m) { return ((m + TILE - 1) / TILE + CM - 1) / CM; }
    __device__ static int n_units(int n) { return ((n + TILE - 1) / TILE + CN - 1) / CN; }

    // This CTA's output tile in cluster tile `unit`: units rastered like single tiles in
    // GROUP_M / CM rows of units; a partner past M or N computes zeros that are not stored.
    __device__ TileCoord tile(int unit, int m, int n) const {
        const TileCoord at = grouped_tile(unit, m_units(m), n_units(n), GROUP_M / CM);
        return {at.m_tile * CM + m_rank, at.n_tile * CN + n_rank};
    }

    // The CTAs that share this CTA's activation tile (same m rank) and weight tile (same n
    // rank), as multicast masks.
    __device__ uint16_t x_sharers() const {
        uint16_t mask = 0;
        for (int j = 0; j < CN; ++j) mask |= 1 << (m_rank + CM * j);
        return mask;
    }
    __device__ uint16_t w_sharers() const { return ((1 << CM) - 1) << (CM * n_rank); }
};

// Releases a stage once this warp's wgmmas have read it: one arrival per consumer warp on the
// stage's `empty` mbarrier in every CTA of the cluster, whose producers write into it.
template <int SIZE>
__device__ __forceinline__ void release_stage(uint32_t empty_bar) {
    __syncwarp();
    if (threadIdx.x % 32 != 0) return;
    if constexpr (SIZE == 1) {
        mbarrier_arrive(empty_bar);
    } else {
#pragma unroll
        for (int cta = 0; cta < SIZE; ++cta) mbarrier_arrive_cluster(empty_bar, cta);
    }
}

// Rows [row0 + part·rows/parts, +rows/parts) of a 128-row tile of `map` at k offset `x` into the
// same part of the tile at `dst`, for this CTA alone or multicast to `sharers`.
template <int PARTS>
__device__ __forceinline__ void load_tile_part(uint32_t dst, const CUtensorMap* map, int x,
                                               int row0, int part, uint32_t full,
                                               uint16_t sharers) {
    const uint32_t at = dst + part * (TILE_BYTES / PARTS);
    const int row = row0 + part * (TILE / PARTS);
    if constexpr (PARTS == 1) tma_load_2d(at, map, x, row, full);
    else tma_load_2d_multicast(at, map, x, row, full, sharers);
}

// The consumer's half of an output tile (rows consumer·64 … +63) from its f32 accumulators.
// Accumulator layout of m64nNk32: warp w of the warpgroup holds rows 16w..16w+15; for n8 block
// j, registers 4j, 4j+1 are (row g, cols 8j + 2t, +1) and 4j+2, 4j+3 row g + 8.
template <typename T>
__device__ __forceinline__ void store_tile(T* __restrict__ y, const float acc[64], TileCoord tile,
                                           int consumer, int m, int n) {
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int warp_row = tile.m_tile * TILE + consumer * 64 + (threadIdx.x % 128 / 32) * 16 + g;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = warp_row + 8 * half;
        if (row >= m) continue;
        T* y_row = y + (size_t)row * n;
#pragma unroll
        for (int j = 0; j < TILE / 8; ++j) {
            const int col = tile.n_tile * TILE + 8 * j + 2 * t;
            if (col < n) store_pair(y_row, col, n, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
        }
    }
}

// x_map, w_map: 2-D tensor maps of x_q [M, K] and w_q [N, K] (int8 row-major, K a multiple of
// 16, 128-byte swizzle: turbo-quant's cuda.rs) in boxes of 128 / CN and 128 / CM rows × 128
// bytes; scales [⌈M/128⌉, ⌈K/128⌉] and [⌈N/128⌉, ⌈K/128⌉]. grid: the m and n tiles each
// rounded up to whole clusters, 1-D (PERSISTENT: at most one CTA per SM, clusters of one);
// 384 threads, GEMM_SMEM_BYTES dynamic smem.
//
// Stage s of the ring has two mbarriers: `full` completes a phase when the k tile's bytes have
// landed in this CTA (its producer's one arrival with the stage's byte count, which the copies
// of every producer writing into the stage complete), `empty` when the consumer warps of every
// CTA of the cluster have finished reading stage s (one arrival per warp, 8 per CTA). The
// CTA's k tile `it` (counted over all of its output tiles) is use u = it / STAGES of stage
// it % STAGES: it waits for `full` phase u and, before the refill, `empty` phase u − 1 (parities u & 1 and (u − 1) & 1): a stage cannot get two phases ahead
// of any waiter.
template <typename T, int CM, int CN, bool PERSISTENT, Convert CONVERT>
__device__ void gemm(const CUtensorMap& x_map, const float* __restrict__ x_scales,
                     const CUtensorMap& w_map, const float* __restrict__ w_scales,
                     T* __restrict__ y, int m, int n, int k) {
    using ThisCluster = Cluster<CM, CN>;
    constexpr int SIZE = ThisCluster::SIZE;
    extern __shared__ __align__(16) int8_t smem[];
    const uint32_t full_bars = shared_address(smem), empty_bars = full_bars + 8 * STAGES;
    const uint32_t smem_base =
        (full_bars + BARRIER_BYTES + SMEM_ALIGN - 1) & ~(uint32_t)(SMEM_ALIGN - 1);
    const int warpgroup = threadIdx.x / 128;

    const ThisCluster cluster;
    const int k_tiles = (k + TILE - 1) / TILE;
    // The cluster units this CTA computes: its own, or with PERSISTENT every (gridDim.x /
    // SIZE)-th from it, so that the ring loads a unit's first k tiles while the consumers
    // still multiply and store the last unit's. `it` counts a CTA's k tiles over all of its
    // units: the ring's position, for stage and phase.
    const int units = ThisCluster::m_units(m) * ThisCluster::n_units(n);
    const int first_unit = blockIdx.x / SIZE;
    const int unit_step = PERSISTENT ? gridDim.x / SIZE : units;
    auto stage_of = [&](int it) { return smem_base + (it % STAGES) * STAGE_BYTES; };

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(full_bars + 8 * s, 1);
            mbarrier_init(empty_bars + 8 * s, SIZE * CONSUMER_WARPS);
        }
        mbarrier_init_fence();
    }
    // The partners' copies and arrivals may reach this CTA's barriers only once they exist.
    if constexpr (SIZE == 1) {
        __syncthreads();
    } else {
        cluster_arrive_relaxed();
        cluster_wait();
    }

    if (warpgroup == 0) {
        // Producer: k tile `it` into stage it % STAGES once every consumer is done with the k
        // tile that was there. One thread issues the copies; the rest have nothing to do.
        if (threadIdx.x == 0) {
            int it = 0;
            for (int unit = first_unit; unit < units; unit += unit_step) {
                const TileCoord tile = cluster.tile(unit, m, n);
                for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                    const int s = it % STAGES, use = it / STAGES;
                    const uint32_t full = full_bars + 8 * s;
                    if (use > 0) mbarrier_wait(empty_bars + 8 * s, (use - 1) & 1);
                    mbarrier_arrive_expect_tx(full, STAGE_BYTES);
                    load_tile_part<CN>(stage_of(it), &x_map, kt * TILE, tile.m_tile * TILE,
                                       cluster.n_rank, full, cluster.x_sharers());
                    load_tile_part<CM>(stage_of(it) + TILE_BYTES, &w_map, kt * TILE,
                                       tile.n_tile * TILE, cluster.m_rank, full,
                                       cluster.w_sharers());
                }
            }
        }
    } else {
        const int consumer = warpgroup - 1;
        // Descriptors of this consumer's operand tiles in stage 0; stage s is s · STAGE_BYTES / 16
        // on in the start address.
        const uint64_t x_descriptor = smem_descriptor(smem_base + consumer * (TILE_BYTES / 2));
        const uint64_t w_descriptor = smem_descriptor(smem_base + TILE_BYTES);
        auto in_stage = [](uint64_t descriptor, int it) {
            return descriptor + (uint64_t)((it % STAGES) * (STAGE_BYTES >> 4));
        };
        int it = 0;
        for (int unit = first_unit; unit < units; unit += unit_step) {
            const TileCoord tile = cluster.tile(unit, m, n);
            // A partner past M or N reads the last real row of scales; its products are not
            // stored.
            const int scale_m_tile = min(tile.m_tile, (m - 1) / TILE);
            const int scale_n_tile = min(tile.n_tile, (n - 1) / TILE);
            const float* x_scale_row = x_scales + (size_t)scale_m_tile * k_tiles;
            const float* w_scale_row = w_scales + (size_t)scale_n_tile * k_tiles;
            float acc[64];
#pragma unroll
            for (int i = 0; i < 64; ++i) acc[i] = 0.f;
            int sums[64];  // one k tile's exact sums

            const bool last_unit = unit + unit_step >= units;
            for (int kt = 0; kt < k_tiles; ++kt, ++it) {
                const int s = it % STAGES;
                const float scale = __fmul_rn(__ldg(x_scale_row + kt), __ldg(w_scale_row + kt));
                // Ping-pong over all of the CTA's k tiles: consumer 1 issues k tile `it` after
                // consumer 0 has, consumer 0 issues `it` + 1 after consumer 1 has issued `it`
                // (also across units, or consumer 0 could arrive twice on one named barrier
                // before consumer 1 waits on it once).
                if (consumer == 1) named_barrier_sync<CONSUMER_THREADS>(CONSUMER_0_ISSUED);
                else if (it > 0) named_barrier_sync<CONSUMER_THREADS>(CONSUMER_1_ISSUED);
                mbarrier_wait(full_bars + 8 * s, (it / STAGES) & 1);
                issue_k_tile(sums, in_stage(x_descriptor, it), in_stage(w_descriptor, it));
                if (consumer == 0) named_barrier_arrive<CONSUMER_THREADS>(CONSUMER_0_ISSUED);
                else if (kt + 1 < k_tiles || !last_unit)
                    named_barrier_arrive<CONSUMER_THREADS>(CONSUMER_1_ISSUED);
                wgmma_wait<0>();
                fence_registers<64>(sums);
                release_stage<SIZE>(empty_bars + 8 * s);
                fold<CONVERT>(acc, sums, scale);
            }
            store_tile(y, acc, tile, consumer, m, n);
        }
    }
    // No CTA of a cluster leaves while a partner may still arrive on its barriers.
    if constexpr (SIZE > 1) {
        cluster_arrive();
        cluster_wait();
    }
}

}  // namespace

// The kernels: f32 or bf16 output; one CTA per tile, clusters of two along m (sharing the
// weight tile) or of 2 × 2 (sharing both operands), a persistent grid, or one CTA per tile
// folding with cvt.
#define W8A8_GEMM_WGMMA(NAME, T, CM, CN, PERSISTENT, CONVERT, CLUSTER_DIMS)                  \
    extern "C" __global__ void CLUSTER_DIMS __launch_bounds__(WGMMA_THREADS, 1)             \
        NAME(const __grid_constant__ CUtensorMap x_map, const float* xs,                    \
             const __grid_constant__ CUtensorMap w_map, const float* ws, T* y, int m, int n, \
             int k) {                                                                        \
        gemm<T, CM, CN, PERSISTENT, Convert::CONVERT>(x_map, xs, w_map, ws, y, m, n, k);     \
    }

W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_f32, float, 1, 1, false, MagicNumber, )
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_bf16, bf16, 1, 1, false, MagicNumber, )
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_pair_f32, float, 2, 1, false, MagicNumber, __cluster_dims__(2, 1, 1))
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_pair_bf16, bf16, 2, 1, false, MagicNumber, __cluster_dims__(2, 1, 1))
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_quad_f32, float, 2, 2, false, MagicNumber, __cluster_dims__(4, 1, 1))
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_quad_bf16, bf16, 2, 2, false, MagicNumber, __cluster_dims__(4, 1, 1))
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_persistent_f32, float, 1, 1, true, MagicNumber, )
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_persistent_bf16, bf16, 1, 1, true, MagicNumber, )
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_cvt_f32, float, 1, 1, false, Cvt, )
W8A8_GEMM_WGMMA(w8a8_gemm_wgmma_cvt_bf16, bf16, 1, 1, false, Cvt, )
