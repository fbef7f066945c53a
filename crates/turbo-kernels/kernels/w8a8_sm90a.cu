// The W8A8 GEMM on Hopper tensor cores (sm_90a only): `wgmma.mma_async` s8 × s8 → s32 from
// shared-memory descriptors. Same contract, tiles, scale fold and raster as w8a8.cu's mma.sync
// GEMM (w8a8.cuh); the quantiser stays in w8a8.cu. turbo-quant's CPU code is the specification.
//
// One CTA per 128×128 output tile: 2 warpgroups, each m64 × n128 (its 64 rows of the
// activation tile against the whole weight tile). All 256 threads stream k tiles (128 bytes of
// k) into a STAGES-deep ring with cp.async in the swizzled layout of w8a8.cuh, which at a
// 1024-byte-aligned tile is wgmma's 128-byte swizzle (K-major, 8-row atoms of 1024 bytes).
// Per k tile each warpgroup issues four m64n128k32 wgmmas into int32 registers (exact sums),
// waits for them and folds the sums into its f32 accumulators: acc = fma(sum, x_scale ·
// w_scale, acc), in k-tile order. The fold's single rounding differs from the CPU's separate
// product and sum by at most an ulp of each term. While one warpgroup folds, the other's
// wgmmas can run; within a warpgroup there is no overlap: reading one accumulator set while
// another's wgmmas are in flight makes ptxas serialise every wgmma (warning C7514).

#include <cuda_bf16.h>
#include <stdint.h>

#include "w8a8.cuh"

namespace {

using namespace w8a8;

// Stages of the ring (STAGES − 1 k tiles in flight while one is multiplied).
constexpr int STAGES = 4;
// The tiles must sit on 1024-byte boundaries (the swizzle atom); the dynamic shared memory
// base is aligned up at run time, hence the extra 1 KiB. cuda.rs launches with this size.
constexpr int SMEM_ALIGN = 1024;
constexpr int GEMM_SMEM_BYTES = STAGES * STAGE_BYTES + SMEM_ALIGN;
static_assert(GEMM_SMEM_BYTES == 129 * 1024, "turbo-quant's cuda.rs launches with 129 KiB");

// Shared-memory matrix descriptor of a K-major operand in the 128-byte swizzle mode: start
// address (bits 0-13, in 16-byte units), leading-dimension offset 1 (unused for swizzled
// K-major operands), stride-dimension offset 1024 bytes (from one 8-row atom to the next,
// bits 32-45), swizzle mode 1 = 128 bytes (bits 62-63). Advancing the start address by 32
// bytes selects the next k32 slice inside the atom.
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address) {
    return (uint64_t)((address & 0x3FFFF) >> 4) | (uint64_t)1 << 16 |
           (uint64_t)(1024 >> 4) << 32 | (uint64_t)1 << 62;
}

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

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

template <int PENDING>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(PENDING) : "memory");
}

// Tells the compiler that the accumulators may change here, so that no read of them moves
// above a wgmma wait and no write below a wgmma issue.
__device__ __forceinline__ void fence_accumulators(int d[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// Makes this thread's completed cp.async writes visible to the async proxy that wgmma reads
// shared memory through.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// Issues the four k32 wgmmas of one k tile into `d` (overwriting it) and commits them.
__device__ __forceinline__ void issue_k_tile(int d[64], uint32_t a_tile, uint32_t b_tile) {
    fence_accumulators(d);
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < TILE / 32; ++step)
        wgmma_m64n128k32(d, smem_descriptor(a_tile + 32 * step),
                         smem_descriptor(b_tile + 32 * step), step);
    wgmma_commit();
}

// acc += sum · scale for one k tile's exact sums.
__device__ __forceinline__ void fold(float acc[64], const int d[64], float scale) {
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = fmaf(exact_float(d[i]), scale, acc[i]);
}

// x_q [M, K], w_q [N, K] int8 row-major, K a multiple of 16; scales [⌈M/128⌉, ⌈K/128⌉] and
// [⌈N/128⌉, ⌈K/128⌉]. grid ⌈M/128⌉·⌈N/128⌉ (1-D), 256 threads, GEMM_SMEM_BYTES dynamic smem.
template <typename T>
__device__ void gemm(const int8_t* __restrict__ xq, const float* __restrict__ x_scales,
                     const int8_t* __restrict__ wq, const float* __restrict__ w_scales,
                     T* __restrict__ y, int m, int n, int k) {
    extern __shared__ __align__(1024) int8_t smem[];
    const uint32_t smem_base =
        (shared_address(smem) + SMEM_ALIGN - 1) & ~(uint32_t)(SMEM_ALIGN - 1);
    const int warpgroup = threadIdx.x / 128;

    const TileCoord tile = grouped_tile(m, n);
    const int m0 = tile.m_tile * TILE, n0 = tile.n_tile * TILE;
    const int k_tiles = (k + TILE - 1) / TILE;
    const float* x_scale_row = x_scales + (size_t)tile.m_tile * k_tiles;
    const float* w_scale_row = w_scales + (size_t)tile.n_tile * k_tiles;

    auto stage_of = [&](int kt) { return smem_base + (kt % STAGES) * STAGE_BYTES; };
    auto load_stage = [&](int kt) {
        load_tile_async(stage_of(kt), xq, m0, m, kt * TILE, k);
        load_tile_async(stage_of(kt) + TILE_BYTES, wq, n0, n, kt * TILE, k);
    };
    auto scale_of = [&](int kt) {
        return __fmul_rn(__ldg(x_scale_row + kt), __ldg(w_scale_row + kt));
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s);
        cp_async_commit();
    }

    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    int sums[64];  // one k tile's exact sums

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        fence_proxy_async();
        // k tile kt is visible to both warpgroups' wgmmas, and both are done with k tile kt − 1
        // (each waited for its wgmmas before folding).
        __syncthreads();
        if (kt + STAGES - 1 < k_tiles) load_stage(kt + STAGES - 1);
        cp_async_commit();
        const float scale = scale_of(kt);
        issue_k_tile(sums, stage_of(kt) + warpgroup * (TILE_BYTES / 2), stage_of(kt) + TILE_BYTES);
        wgmma_wait<0>();
        fence_accumulators(sums);
        fold(acc, sums, scale);
    }
    cp_async_wait<0>();

    // Accumulator layout of m64nNk32: warp w of the warpgroup holds rows 16w..16w+15; for n8
    // block j, registers 4j, 4j+1 are (row g, cols 8j + 2t, +1) and 4j+2, 4j+3 row g + 8.
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int warp_row = m0 + warpgroup * 64 + ((threadIdx.x / 32) % 4) * 16 + g;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int row = warp_row + 8 * half;
        if (row >= m) continue;
        T* y_row = y + (size_t)row * n;
#pragma unroll
        for (int j = 0; j < TILE / 8; ++j) {
            const int col = n0 + 8 * j + 2 * t;
            if (col < n) store_pair(y_row, col, n, acc[4 * j + 2 * half], acc[4 * j + 2 * half + 1]);
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, 1)
w8a8_gemm_wgmma_f32(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws,
                    float* y, int m, int n, int k) {
    gemm(xq, xs, wq, ws, y, m, n, k);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
w8a8_gemm_wgmma_bf16(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws,
                     bf16* y, int m, int n, int k) {
    gemm(xq, xs, wq, ws, y, m, n, k);
}
