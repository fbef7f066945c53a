// CUDA kernels of TurboDiffusion's W8A8 linears (sm_80+): activation quantisation into
// 128×128 tiles and the block-scaled int8 GEMM (v2: cp.async pipeline + ldmatrix + mma.sync).
// turbo-quant's CPU code (tile.rs, gemm.rs) is the specification; `examples/gpu_check`
// compares. The Hopper (wgmma) GEMM is in w8a8_sm90a.cu; it shares this file's quantiser.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"
#include "w8a8.cuh"

namespace {

using turbo::block_max;
using turbo::cp_async_16;
using turbo::cp_async_commit;
using turbo::cp_async_wait;
using turbo::ldmatrix_x4;
using turbo::mma_s8;
using turbo::to_float;

using namespace w8a8;

// ---------------------------------------------------------------------------------------------
// Quantisation. Per tile: amax = max(1e-8, max|x|), scale = amax/128,
// q = clamp(rint(x·128/amax), −128, 127) — tile.rs's rules, so f32 input quantises
// bit-identically. One pass over x: each thread holds 8 chunks of 8 consecutive elements
// (64 values) in registers between the block amax and the int8 stores.
// ---------------------------------------------------------------------------------------------

constexpr int CHUNK = 8;                         // elements per thread per load
constexpr int CHUNKS_PER_ROW = TILE / CHUNK;     // 16
constexpr int ROWS_PER_PASS = THREADS / CHUNKS_PER_ROW;  // 16
constexpr int PASSES = TILE / ROWS_PER_PASS;     // 8

__device__ __forceinline__ void load_chunk(const float* p, float v[CHUNK]) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w;
    v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
}

__device__ __forceinline__ void load_chunk(const bf16* p, float v[CHUNK]) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        __nv_bfloat162 pair;
        memcpy(&pair, &words[i], sizeof(pair));
        const float2 f = __bfloat1622float2(pair);
        v[2 * i] = f.x, v[2 * i + 1] = f.y;
    }
}

// TurboDiffusion's rule, bit for bit: the tile's reciprocal 128/amax is rounded to f32 once,
// then each value is multiplied by it (a second rounding) and converted with round-half-even
// and saturation. The explicit _rn intrinsics keep nvcc from contracting or reassociating.
__device__ __forceinline__ float inverse_scale(float amax) { return __fdiv_rn(128.f, amax); }

__device__ __forceinline__ int8_t quantize_value(float v, float inverse) {
    return (int8_t)fminf(fmaxf(rintf(__fmul_rn(v, inverse)), -128.f), 127.f);
}

// grid (⌈K/128⌉, ⌈M/128⌉), 256 threads; scales [⌈M/128⌉, ⌈K/128⌉]. Any K; 16-byte loads and
// 8-byte stores when K is a multiple of 8 and x is 16-byte aligned.
template <typename T>
__device__ void quantize_tiles(const T* __restrict__ x, int8_t* __restrict__ q,
                               float* __restrict__ scales, int m, int k) {
    __shared__ float scratch[32];
    const int first_row = blockIdx.y * TILE + threadIdx.x / CHUNKS_PER_ROW;
    const int col = blockIdx.x * TILE + (threadIdx.x % CHUNKS_PER_ROW) * CHUNK;
    const bool vector = k % CHUNK == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;

    // All eight loads are issued before any value is used (a load's latency is paid once, not
    // once per chunk): the fast path has no branch between them.
    float v[PASSES][CHUNK];
    const bool whole_rows = (int)(blockIdx.y + 1) * TILE <= m;
    if (vector && whole_rows && col < k) {
#pragma unroll
        for (int p = 0; p < PASSES; ++p)
            load_chunk(x + (size_t)(first_row + p * ROWS_PER_PASS) * k + col, v[p]);
    } else {
#pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int row = first_row + p * ROWS_PER_PASS;
            const T* src = x + (size_t)row * k + col;
            if (vector && row < m && col < k) {
                load_chunk(src, v[p]);
            } else {
#pragma unroll
                for (int e = 0; e < CHUNK; ++e)
                    v[p][e] = row < m && col + e < k ? to_float(src[e]) : 0.f;
            }
        }
    }
    float amax = 1e-8f;
#pragma unroll
    for (int p = 0; p < PASSES; ++p)
#pragma unroll
        for (int e = 0; e < CHUNK; ++e) amax = fmaxf(amax, fabsf(v[p][e]));
    amax = block_max(amax, scratch);
    const float inverse = inverse_scale(amax);

#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        const int row = first_row + p * ROWS_PER_PASS;
        if (row >= m) break;
        int8_t* dst = q + (size_t)row * k + col;
        if (vector && col < k) {
            uint32_t words[2] = {0, 0};
#pragma unroll
            for (int e = 0; e < CHUNK; ++e)
                words[e / 4] |= (uint32_t)(uint8_t)quantize_value(v[p][e], inverse) << (8 * (e % 4));
            *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
        } else {
#pragma unroll
            for (int e = 0; e < CHUNK; ++e)
                if (col + e < k) dst[e] = quantize_value(v[p][e], inverse);
        }
    }
    if (threadIdx.x == 0) scales[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = amax / 128.f;
}

// ---------------------------------------------------------------------------------------------
// GEMM. y = Σ_kt (x_q·w_qᵀ over k tile kt) · (x_scale[m tile, kt] · w_scale[n tile, kt]),
// accumulated in f32 in k-tile order with separately rounded products and sums (gemm.rs's
// arithmetic, so f32 results match the CPU bit for bit).
//
// One CTA per 128×128 output tile, 8 warps of 64 (m) × 32 (n). Per k tile (128 bytes of k) the
// activation and weight tiles (16 KiB each) stream into a STAGES-deep ring of dynamic shared
// memory with 16-byte cp.async.cg (zero-filled past the matrix edges), XOR-swizzled (w8a8.cuh).
// Fragments come from ldmatrix.x4; mma.sync.m16n8k32 s8 accumulates exact int32 tile sums,
// which are folded into the f32 accumulators once per k tile.
// ---------------------------------------------------------------------------------------------

// Two ring depths: 4 stages (128 KiB of dynamic shared memory, `w8a8_gemm_*`) where a CTA may
// have that much (sm_80, sm_90), 3 stages (96 KiB, `w8a8_gemm_s3_*`) on GPUs that allow about
// 99 KiB (sm_86, sm_89, sm_120). cuda.rs picks one and launches with STAGES · STAGE_BYTES.
static_assert(4 * STAGE_BYTES == 128 * 1024, "turbo-quant's cuda.rs launches with 128 KiB");

// Copies the 128×128 int8 tile at (row0, col0) of a row-major [rows, k] matrix into the
// swizzled tile at `dst`; rows ≥ `rows` and columns ≥ k read as zero (k is a multiple of 16,
// so a chunk is wholly inside or outside). Every thread of the CTA copies 1024 / THREADS chunks;
// consecutive threads read consecutive 16-byte chunks of a row.
__device__ __forceinline__ void load_tile_async(uint32_t dst, const int8_t* src, int row0,
                                                int rows, int col0, int k) {
    // `% THREADS` (a no-op at THREADS threads) tells the compiler the index is small, which
    // keeps the address arithmetic narrow: 216 registers instead of 235.
    const int loader = threadIdx.x % THREADS, chunk = loader % 8, col = col0 + chunk * 16;
#pragma unroll
    for (int i = 0; i < TILE * 8 / THREADS; ++i) {
        const int row = loader / 8 + i * (THREADS / 8);
        const bool valid = row0 + row < rows && col < k;
        const int8_t* from = valid ? src + (size_t)(row0 + row) * k + col : src;
        cp_async_16(dst + swizzled(row, chunk), from, valid);
    }
}

// x_q [M, K], w_q [N, K] int8 row-major, K a multiple of 16; scales [⌈M/128⌉, ⌈K/128⌉] and
// [⌈N/128⌉, ⌈K/128⌉]. grid ⌈M/128⌉·⌈N/128⌉ (1-D), 256 threads, STAGES · STAGE_BYTES of
// dynamic shared memory.
template <typename T, int STAGES>
__device__ void gemm(const int8_t* __restrict__ xq, const float* __restrict__ x_scales,
                     const int8_t* __restrict__ wq, const float* __restrict__ w_scales,
                     T* __restrict__ y, int m, int n, int k) {
    extern __shared__ __align__(128) int8_t smem[];
    const uint32_t smem_base = shared_address(smem);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int warp_m = (warp / 4) * 64, warp_n = (warp % 4) * 32;

    const TileCoord tile =
        grouped_tile(blockIdx.x, (m + TILE - 1) / TILE, (n + TILE - 1) / TILE, GROUP_M);
    const int m0 = tile.m_tile * TILE, n0 = tile.n_tile * TILE;
    const int k_tiles = (k + TILE - 1) / TILE;
    const float* x_scale_row = x_scales + (size_t)tile.m_tile * k_tiles;
    const float* w_scale_row = w_scales + (size_t)tile.n_tile * k_tiles;

    auto load_stage = [&](int kt) {
        const uint32_t stage = smem_base + (kt % STAGES) * STAGE_BYTES;
        load_tile_async(stage, xq, m0, m, kt * TILE, k);
        load_tile_async(stage + TILE_BYTES, wq, n0, n, kt * TILE, k);
    };

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < k_tiles) load_stage(s);
        cp_async_commit();
    }

    // ldmatrix row addresses (before the k offset). A, m16 tile i: lanes 0-15 rows 0-15 at
    // k bytes 0-15, lanes 16-31 the same rows at k bytes 16-31 → registers a0..a3 of the
    // m16n8k32 A fragment. B, n8 tiles 2p and 2p+1: lanes 0-7 n rows 0-7 at k 0-15, lanes 8-15
    // the same at k 16-31, lanes 16-31 n rows 8-15 likewise → b0, b1 of tile 2p, then 2p+1.
    const int a_row = warp_m + (lane & 15), a_half = lane >> 4;
    const int b_row = warp_n + (lane & 7) + ((lane >> 4) << 3), b_half = (lane >> 3) & 1;

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    for (int kt = 0; kt < k_tiles; ++kt) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // k tile kt is visible; every warp is done with k tile kt − 1
        if (kt + STAGES - 1 < k_tiles) load_stage(kt + STAGES - 1);
        cp_async_commit();
        const float scale = __fmul_rn(__ldg(x_scale_row + kt), __ldg(w_scale_row + kt));

        const uint32_t a_tile = smem_base + (kt % STAGES) * STAGE_BYTES;
        const uint32_t b_tile = a_tile + TILE_BYTES;
        int tile_acc[4][4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) tile_acc[i][j][e] = 0;

#pragma unroll
        for (int step = 0; step < TILE / 32; ++step) {
            uint32_t a[4][4], b[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i)
                ldmatrix_x4(a[i], a_tile + swizzled(a_row + 16 * i, 2 * step + a_half));
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                uint32_t r[4];
                ldmatrix_x4(r, b_tile + swizzled(b_row + 16 * p, 2 * step + b_half));
                b[2 * p][0] = r[0], b[2 * p][1] = r[1];
                b[2 * p + 1][0] = r[2], b[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_s8(tile_acc[i][j], a[i], b[j][0], b[j][1]);
        }

#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    acc[i][j][e] = __fadd_rn(acc[i][j][e],
                                             __fmul_rn(exact_float(tile_acc[i][j][e]), scale));
    }
    cp_async_wait<0>();

    // C fragment: c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at row g + 8.
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = m0 + warp_m + 16 * i + g + 8 * half;
            if (row >= m) continue;
            T* y_row = y + (size_t)row * n;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int col = n0 + warp_n + 8 * j + 2 * t;
                if (col < n)
                    store_pair(y_row, col, n, acc[i][j][2 * half], acc[i][j][2 * half + 1]);
            }
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
quantize_tiles_f32(const float* x, int8_t* q, float* scales, int m, int k) {
    quantize_tiles(x, q, scales, m, k);
}

extern "C" __global__ void __launch_bounds__(THREADS)
quantize_tiles_bf16(const bf16* x, int8_t* q, float* scales, int m, int k) {
    quantize_tiles(x, q, scales, m, k);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
w8a8_gemm_f32(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws, float* y,
              int m, int n, int k) {
    gemm<float, 4>(xq, xs, wq, ws, y, m, n, k);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
w8a8_gemm_bf16(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws, bf16* y,
               int m, int n, int k) {
    gemm<bf16, 4>(xq, xs, wq, ws, y, m, n, k);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
w8a8_gemm_s3_f32(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws, float* y,
                 int m, int n, int k) {
    gemm<float, 3>(xq, xs, wq, ws, y, m, n, k);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
w8a8_gemm_s3_bf16(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws, bf16* y,
                  int m, int n, int k) {
    gemm<bf16, 3>(xq, xs, wq, ws, y, m, n, k);
}
