// CUDA kernels of TurboDiffusion's W8A8 linears (sm_80+): activation quantisation into
// 128×128 tiles and the block-scaled int8 GEMM. turbo-quant's CPU code (tile.rs, gemm.rs) is
// the specification; `examples/gpu_check` compares.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

using turbo::block_max;
using turbo::mma_s8;
using turbo::store;
using turbo::to_float;

constexpr int TILE = 128;
constexpr int THREADS = 256;
// Shared-memory pitch of an int8 tile row: 16 bytes of padding keep a quad's rows in distinct
// banks.
constexpr int PITCH = TILE + 16;

typedef __nv_bfloat16 bf16;

// Per tile: amax = max(1e-8, max|x|), scale = amax/128, q = clamp(rint(x·128/amax), −128, 127).
// grid (⌈K/128⌉, ⌈M/128⌉), 256 threads; scales [⌈M/128⌉, ⌈K/128⌉].
template <typename T>
__device__ void quantize_tiles(const T* __restrict__ x, int8_t* __restrict__ q,
                               float* __restrict__ scales, int m, int k) {
    __shared__ float scratch[32];
    const int row0 = blockIdx.y * TILE, col0 = blockIdx.x * TILE;
    const int rows = min(TILE, m - row0), cols = min(TILE, k - col0);
    float amax = 1e-8f;
    for (int e = threadIdx.x; e < rows * cols; e += blockDim.x)
        amax = fmaxf(amax, fabsf(to_float(x[(size_t)(row0 + e / cols) * k + col0 + e % cols])));
    amax = block_max(amax, scratch);
    for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
        const size_t i = (size_t)(row0 + e / cols) * k + col0 + e % cols;
        q[i] = (int8_t)fminf(fmaxf(rintf(to_float(x[i]) * 128.f / amax), -128.f), 127.f);
    }
    if (threadIdx.x == 0) scales[(size_t)blockIdx.y * gridDim.x + blockIdx.x] = amax / 128.f;
}


// Copies a 128×128 int8 tile (rows `row0`.., columns `col0`.. of a row-major [rows, k]
// matrix) into shared memory, zero past the matrix edge. k is a multiple of 16.
__device__ __forceinline__ void load_tile(int8_t* dst, const int8_t* src, int row0, int rows,
                                          int col0, int k) {
    for (int c = threadIdx.x; c < TILE * (TILE / 16); c += THREADS) {
        const int r = c / (TILE / 16), col = (c % (TILE / 16)) * 16;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (row0 + r < rows && col0 + col < k)
            v = *reinterpret_cast<const uint4*>(src + (size_t)(row0 + r) * k + col0 + col);
        *reinterpret_cast<uint4*>(dst + r * PITCH + col) = v;
    }
}

// y = Σ_kt (x_q·w_qᵀ over k tile kt) · x_scale[m tile, kt] · w_scale[n tile, kt], accumulated
// in f32 in k-tile order. One CTA per 128×128 output tile, 8 warps of 64×32.
// x_q [M, K], w_q [N, K] int8 row-major; grid (⌈N/128⌉, ⌈M/128⌉), 256 threads.
template <typename T>
__device__ void gemm(const int8_t* __restrict__ xq, const float* __restrict__ x_scales,
                     const int8_t* __restrict__ wq, const float* __restrict__ w_scales,
                     T* __restrict__ y, int m, int n, int k) {
    __shared__ __align__(16) int8_t a_tile[TILE * PITCH];
    __shared__ __align__(16) int8_t b_tile[TILE * PITCH];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int warp_row = (warp / 4) * 64, warp_col = (warp % 4) * 32;
    const int m0 = blockIdx.y * TILE, n0 = blockIdx.x * TILE;
    const int k_tiles = (k + TILE - 1) / TILE;

    float acc[4][4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    for (int kt = 0; kt < k_tiles; ++kt) {
        __syncthreads();
        load_tile(a_tile, xq, m0, m, kt * TILE, k);
        load_tile(b_tile, wq, n0, n, kt * TILE, k);
        __syncthreads();
        int tile_acc[4][4][4] = {};
        for (int ks = 0; ks < TILE; ks += 32) {
            uint32_t a[4][4], b[4][2];
            for (int i = 0; i < 4; ++i) {
                const int8_t* row = a_tile + (warp_row + i * 16 + g) * PITCH + ks + 4 * t;
                a[i][0] = *reinterpret_cast<const uint32_t*>(row);
                a[i][1] = *reinterpret_cast<const uint32_t*>(row + 8 * PITCH);
                a[i][2] = *reinterpret_cast<const uint32_t*>(row + 16);
                a[i][3] = *reinterpret_cast<const uint32_t*>(row + 8 * PITCH + 16);
            }
            for (int j = 0; j < 4; ++j) {
                const int8_t* col = b_tile + (warp_col + j * 8 + g) * PITCH + ks + 4 * t;
                b[j][0] = *reinterpret_cast<const uint32_t*>(col);
                b[j][1] = *reinterpret_cast<const uint32_t*>(col + 16);
            }
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) mma_s8(tile_acc[i][j], a[i], b[j][0], b[j][1]);
        }
        const float scale = x_scales[(size_t)blockIdx.y * k_tiles + kt] * w_scales[(size_t)blockIdx.x * k_tiles + kt];
        for (int i = 0; i < 4; ++i)
            for (int j = 0; j < 4; ++j)
                for (int e = 0; e < 4; ++e) acc[i][j][e] += (float)tile_acc[i][j][e] * scale;
    }

    for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + warp_row + i * 16 + g + 8 * (e >> 1);
                const int col = n0 + warp_col + j * 8 + 2 * t + (e & 1);
                if (row < m && col < n) store(y + (size_t)row * n + col, acc[i][j][e]);
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

extern "C" __global__ void __launch_bounds__(THREADS)
w8a8_gemm_f32(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws, float* y,
              int m, int n, int k) {
    gemm(xq, xs, wq, ws, y, m, n, k);
}

extern "C" __global__ void __launch_bounds__(THREADS)
w8a8_gemm_bf16(const int8_t* xq, const float* xs, const int8_t* wq, const float* ws, bf16* y,
               int m, int n, int k) {
    gemm(xq, xs, wq, ws, y, m, n, k);
}
