// The im2col step of a stride-1 2-D convolution, laid out for one GEMM per image that writes
// NCHW directly: col[n][k][j] with k the (channel, tap) row and j the output position, so that
// consecutive threads read consecutive input pixels and write consecutive outputs (candle's
// im2col, [n][position][k], reads across channels and runs far below memory bandwidth).
// An extra all-ones row carries the bias through the GEMM. Also the VAE's channel RMS norm
// (with the SiLU that follows it), in one pass instead of candle's chain of broadcasts.

#include <cuda_bf16.h>
#include <stdint.h>
#include "common.cuh"

namespace {

typedef __nv_bfloat16 bf16;

template <typename T> __device__ __forceinline__ T one();
template <> __device__ __forceinline__ float one<float>() { return 1.f; }
template <> __device__ __forceinline__ bf16 one<bf16>() { return __float2bfloat16(1.f); }
template <typename T> __device__ __forceinline__ T zero();
template <> __device__ __forceinline__ float zero<float>() { return 0.f; }
template <> __device__ __forceinline__ bf16 zero<bf16>() { return __float2bfloat16(0.f); }

// x [N, C, H, W]; col [N, rows, count] for output positions first .. first + count of an
// out_w-wide output: row k < C·k·k is tap k = (c·ksize + ky)·ksize + kx, row C·k·k is ones
// (the bias), the rows after it zeros (padding `rows` to a multiple of 8 keeps the GEMM's
// leading dimensions 16-byte aligned, which cuBLAS's fast kernels need).
// grid (⌈count/256⌉, rows, N), 256 threads: the row and the image come from the grid, so the
// index arithmetic per element is a few 32-bit operations.
template <typename T>
__device__ void im2col_rows(const T* __restrict__ x, T* __restrict__ col, int channels, int height,
                            int width, int ksize, int pad, int out_w, long long first, int count,
                            int rows) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= count) return;
    const int k = blockIdx.y, n = blockIdx.z;
    const int taps = channels * ksize * ksize;
    T value = zero<T>();
    if (k == taps) {
        value = one<T>();
    } else if (k < taps) {
        const long long p = first + j;
        const int oy = (int)(p / out_w), ox = (int)(p % out_w);
        const int kx = k % ksize, ky = (k / ksize) % ksize, c = k / (ksize * ksize);
        const int iy = oy + ky - pad, ix = ox + kx - pad;
        if (iy >= 0 && iy < height && ix >= 0 && ix < width)
            value = x[(((size_t)n * channels + c) * height + iy) * width + ix];
    }
    col[((size_t)n * rows + k) * count + j] = value;
}

}  // namespace

extern "C" __global__ void im2col_rows_f32(const float* x, float* col, int channels, int height,
                                           int width, int ksize, int pad, int out_w,
                                           long long first, int count, int rows) {
    im2col_rows(x, col, channels, height, width, ksize, pad, out_w, first, count, rows);
}

extern "C" __global__ void im2col_rows_bf16(const bf16* x, bf16* col, int channels, int height,
                                            int width, int ksize, int pad, int out_w,
                                            long long first, int count, int rows) {
    im2col_rows(x, col, channels, height, width, ksize, pad, out_w, first, count, rows);
}

namespace {

// The Wan VAE's channel RMS norm: x / max(‖x‖₂ over the channels, 1e-12) · scale[channel],
// then SiLU when asked, computed in f32. x is [outer, channels, inner] (inner: the pixels of a
// frame). A CTA holds NORM_PIXELS pixels' channel columns in shared memory, so x is read once;
// it writes them back either in x's layout or channels last, [outer, inner, channels] (the
// layout conv_sm90a.cu's TMA boxes read, so a convolution after the norm needs no transpose).
constexpr int NORM_PIXELS = 32;
constexpr int NORM_THREADS = 256;
constexpr int NORM_PARTS = NORM_THREADS / NORM_PIXELS;  // threads summing one pixel's squares
// Row pitch of the shared tile: with 34 bf16 a row, the channels-last write's reads of 32
// consecutive channels of one pixel fall in 32 distinct banks.
constexpr int NORM_PITCH = NORM_PIXELS + 2;

template <typename T>
__device__ __forceinline__ float normalised(T value, float inv_norm, float scale, bool silu) {
    float v = turbo::to_float(value) * inv_norm * scale;
    return silu ? v / (1.f + __expf(-v)) : v;
}

// Both norms' reduction: `parts` threads per pixel each summed some of its channels' squares
// (this thread's share is `squares`, of pixel p); after it, every thread may read each pixel's
// 1 / max(‖x‖₂, 1e-12) in inv_norm.
template <int PIXELS, int PARTS>
__device__ __forceinline__ void inverse_norms(float squares, int part, int p,
                                              float (&partial)[PARTS][PIXELS],
                                              float (&inv_norm)[PIXELS]) {
    partial[part][p] = squares;
    __syncthreads();
    if (threadIdx.x < PIXELS) {
        float sum = 0.f;
        for (int i = 0; i < PARTS; ++i) sum += partial[i][threadIdx.x];
        inv_norm[threadIdx.x] = 1.f / fmaxf(sqrtf(sum), 1e-12f);
    }
    __syncthreads();
}

template <typename T>
__device__ void channel_rms_norm(const T* __restrict__ x, const float* __restrict__ scale,
                                 T* __restrict__ out, int channels, int inner, bool silu,
                                 bool channels_last) {
    extern __shared__ __align__(16) unsigned char norm_smem[];
    T* tile = reinterpret_cast<T*>(norm_smem);  // [channels][NORM_PITCH]
    __shared__ float partial[NORM_PARTS][NORM_PIXELS];
    __shared__ float inv_norm[NORM_PIXELS];
    const int p0 = blockIdx.x * NORM_PIXELS, pixels = min(NORM_PIXELS, inner - p0);
    const int p = threadIdx.x % NORM_PIXELS, part = threadIdx.x / NORM_PIXELS;
    const size_t frame = (size_t)blockIdx.y * channels * inner;
    float squares = 0.f;
#pragma unroll 4
    for (int c = part; c < channels; c += NORM_PARTS) {
        const T v = p < pixels ? x[frame + (size_t)c * inner + p0 + p] : zero<T>();
        tile[c * NORM_PITCH + p] = v;
        const float f = turbo::to_float(v);
        squares += f * f;
    }
    inverse_norms(squares, part, p, partial, inv_norm);
    if (channels_last) {
        T* dst = out + ((size_t)blockIdx.y * inner + p0) * channels;
        for (int i = threadIdx.x; i < pixels * channels; i += NORM_THREADS) {
            const int q = i / channels, c = i % channels;
            turbo::store(dst + i, normalised(tile[c * NORM_PITCH + q], inv_norm[q], scale[c], silu));
        }
        return;
    }
    if (p >= pixels) return;
    for (int c = part; c < channels; c += NORM_PARTS)
        turbo::store(out + frame + (size_t)c * inner + p0 + p,
                     normalised(tile[c * NORM_PITCH + p], inv_norm[p], scale[c], silu));
}

// The same norm for bf16 frames whose pixels per frame and channels are multiples of 8 (the
// VAE's, at every level), moving 16 bytes a thread: a CTA reads NORM8_PIXELS pixels' channel
// columns as runs of 8 pixels of one channel and keeps them channels last in shared memory,
// rows of channels + 2 values (an odd number of 4-byte words, so the threads summing one
// channel of consecutive pixels read distinct banks); it writes runs of 8 pixels of one channel
// or, channels last, of 8 channels of one pixel.
constexpr int NORM8_PIXELS = 64;
constexpr int NORM8_PARTS = NORM_THREADS / NORM8_PIXELS;  // threads summing one pixel's squares
constexpr int NORM8_ROWS = NORM_THREADS / 8;              // channel rows read at once

__device__ __forceinline__ uint4 normalised_run(const bf16* tile, int first, int step,
                                                const float* inv_norm, int inv_step,
                                                const float* scale, int scale_step, bool silu) {
    uint4 packed;
    uint32_t* words = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const int a = 2 * k, b = 2 * k + 1;
        words[k] = turbo::pack_bf16(
            normalised(tile[first + a * step], inv_norm[a * inv_step], scale[a * scale_step], silu),
            normalised(tile[first + b * step], inv_norm[b * inv_step], scale[b * scale_step], silu));
    }
    return packed;
}

__device__ void channel_rms_norm_x8(const bf16* __restrict__ x, const float* __restrict__ scale,
                                    bf16* __restrict__ out, int channels, int inner, bool silu,
                                    bool channels_last) {
    extern __shared__ __align__(16) unsigned char norm_smem[];
    bf16* tile = reinterpret_cast<bf16*>(norm_smem);  // [NORM8_PIXELS][channels + 2]
    __shared__ float partial[NORM8_PARTS][NORM8_PIXELS];
    __shared__ float inv_norm[NORM8_PIXELS];
    const int pitch = channels + 2;
    const int p0 = blockIdx.x * NORM8_PIXELS, pixels = min(NORM8_PIXELS, inner - p0);
    const size_t frame = (size_t)blockIdx.y * channels * inner;
    const int run = (threadIdx.x % 8) * 8, row = threadIdx.x / 8;  // pixels run .. run + 7
    const bool run_inside = run < pixels;                        // pixels is a multiple of 8
    for (int c = row; run_inside && c < channels; c += NORM8_ROWS) {
        const uint4 v = *reinterpret_cast<const uint4*>(x + frame + (size_t)c * inner + p0 + run);
        const bf16* values = reinterpret_cast<const bf16*>(&v);
#pragma unroll
        for (int k = 0; k < 8; ++k) tile[(run + k) * pitch + c] = values[k];
    }
    __syncthreads();
    const int p = threadIdx.x % NORM8_PIXELS, part = threadIdx.x / NORM8_PIXELS;
    float squares = 0.f;
    for (int c = part; p < pixels && c < channels; c += NORM8_PARTS) {
        const float f = __bfloat162float(tile[p * pitch + c]);
        squares += f * f;
    }
    inverse_norms(squares, part, p, partial, inv_norm);
    if (channels_last) {
        const int groups = channels / 8;
        bf16* dst = out + ((size_t)blockIdx.y * inner + p0) * channels;
        for (int i = threadIdx.x; i < pixels * groups; i += NORM_THREADS) {
            const int q = i / groups, c0 = (i % groups) * 8;
            *reinterpret_cast<uint4*>(dst + (size_t)q * channels + c0) = normalised_run(
                tile, q * pitch + c0, 1, inv_norm + q, 0, scale + c0, 1, silu);
        }
        return;
    }
    for (int c = row; run_inside && c < channels; c += NORM8_ROWS)
        *reinterpret_cast<uint4*>(out + frame + (size_t)c * inner + p0 + run) = normalised_run(
            tile, run * pitch + c, pitch, inv_norm + run, 1, scale + c, 0, silu);
}

}  // namespace

// grid (⌈inner/NORM_PIXELS⌉, outer), NORM_THREADS threads, channels · NORM_PITCH · sizeof(T)
// bytes of dynamic shared memory; scale f32 [channels]; out [outer, channels, inner], or
// [outer, inner, channels] when channels_last is set.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
channel_rms_norm_f32(const float* x, const float* scale, float* out, int channels, int inner,
                     int silu, int channels_last) {
    channel_rms_norm(x, scale, out, channels, inner, silu != 0, channels_last != 0);
}

extern "C" __global__ void __launch_bounds__(NORM_THREADS)
channel_rms_norm_bf16(const bf16* x, const float* scale, bf16* out, int channels, int inner,
                      int silu, int channels_last) {
    channel_rms_norm(x, scale, out, channels, inner, silu != 0, channels_last != 0);
}

// channels and inner multiples of 8, x and out 16-byte aligned; grid (⌈inner/NORM8_PIXELS⌉,
// outer), NORM_THREADS threads, NORM8_PIXELS · (channels + 2) · 2 bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(NORM_THREADS)
channel_rms_norm_x8_bf16(const bf16* x, const float* scale, bf16* out, int channels, int inner,
                         int silu, int channels_last) {
    channel_rms_norm_x8(x, scale, out, channels, inner, silu != 0, channels_last != 0);
}

namespace {

using turbo::cp_async_16;
using turbo::cp_async_commit;
using turbo::cp_async_wait;
using turbo::ldmatrix_x4;
using turbo::ldmatrix_x4_trans;
using turbo::mma_bf16;

// Implicit-GEMM tiles: BM output channels × 128 output positions per CTA, 32 taps per step, 8
// warps. BM is 128 (warps of 64 channels × 32 positions) or, for the layers with a handful of
// output channels (the decoder's 3-channel head), 16 (warps of 16 channels × 16 positions):
// padding 3 channels to 128 made that layer 8 ms a chunk at 480p, 43 products of 44 on zeros.
constexpr int CONV_BN = 128;
constexpr int CONV_BK = 32;
constexpr int CONV_THREADS = 256;
// Shared-memory pitches padded by 16 bytes: the 8 rows an ldmatrix reads fall in distinct banks.
constexpr int A_PITCH = CONV_BK + 8;
constexpr int B_PITCH = CONV_BN + 8;
// Each thread gathers runs of RUN consecutive output positions, for CONV_BK / TAP_ROWS taps
// per step: the index arithmetic is done once per run, the shared-memory store is 16 bytes.
constexpr int RUN = 8;
constexpr int TAP_ROWS = CONV_THREADS / (CONV_BN / RUN);
constexpr int TAPS_PER_THREAD = CONV_BK / TAP_ROWS;

// A stride-1 convolution as a GEMM whose B operand, the im2col matrix, is gathered from the
// input tile by tile and never stored: out[n][o][p] = Σ_k W[o][k] · col[k][p] + bias[o], tap
// k = (c·KSIZE + ky)·KSIZE + kx. bf16 in and out, f32 accumulation on tensor cores. Weight
// tiles stream in through cp.async; the next step's input values are gathered into registers
// while the tensor cores work on the current step.
template <int KSIZE, int BM>
__device__ void conv2d_implicit(const bf16* __restrict__ x, long long image_stride,
                                const bf16* __restrict__ weight, const float* __restrict__ bias,
                                bf16* __restrict__ out, int channels, int height, int width,
                                int pad, int out_w, int positions, int out_channels, int k_pad) {
    constexpr int WARPS_M = BM >= 64 ? BM / 64 : 1, WARPS_N = 8 / WARPS_M;
    constexpr int MI = BM / WARPS_M / 16;        // m16 tiles per warp
    constexpr int NJ = CONV_BN / WARPS_N / 8;    // n8 tiles per warp
    static_assert(MI >= 1 && NJ % 2 == 0, "whole m16 tiles, n8 tiles in ldmatrix pairs");
    __shared__ __align__(16) bf16 a_tile[2][BM * A_PITCH];
    __shared__ __align__(16) bf16 b_tile[2][CONV_BK * B_PITCH];
    const int n = blockIdx.z, o0 = blockIdx.y * BM, p0 = blockIdx.x * CONV_BN;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const int warp_m = (warp / WARPS_N) * (16 * MI), warp_n = (warp % WARPS_N) * (8 * NJ);
    const int taps = channels * KSIZE * KSIZE;
    const bf16* image = x + (size_t)n * image_stride;
    const int run = (threadIdx.x % (CONV_BN / RUN)) * RUN, first_tap = threadIdx.x / (CONV_BN / RUN);
    const int run_start = p0 + run;
    const int run_y = run_start / out_w, run_x = run_start % out_w;

    auto load_a = [&](int step, int stage) {
        for (int c = threadIdx.x; c < BM * CONV_BK / 8; c += CONV_THREADS) {
            const int r = c / (CONV_BK / 8), chunk = (c % (CONV_BK / 8)) * 8;
            const bool valid = o0 + r < out_channels;
            const bf16* src = weight + (size_t)(valid ? o0 + r : 0) * k_pad + step * CONV_BK + chunk;
            cp_async_16(&a_tile[stage][r * A_PITCH + chunk], src, valid);
        }
    };
    // values[i][e]: tap first_tap + i·TAP_ROWS of the step, position run_start + e.
    auto gather_b = [&](int step, bf16 (&values)[TAPS_PER_THREAD][RUN]) {
        for (int i = 0; i < TAPS_PER_THREAD; ++i) {
            const int k = step * CONV_BK + first_tap + i * TAP_ROWS;
            const bool tap_valid = k < taps;
            const int c = k / (KSIZE * KSIZE), tap = k % (KSIZE * KSIZE);
            const int dy = tap / KSIZE - pad, dx = tap % KSIZE - pad;
            const bf16* plane = image + (size_t)c * height * width;
            int y = run_y, xx = run_x;
            for (int e = 0; e < RUN; ++e) {
                const int iy = y + dy, ix = xx + dx;
                const bool valid = tap_valid && run_start + e < positions && iy >= 0 &&
                                   iy < height && ix >= 0 && ix < width;
                values[i][e] = valid ? plane[iy * width + ix] : zero<bf16>();
                if (++xx == out_w) {
                    xx = 0;
                    ++y;
                }
            }
        }
    };
    auto store_b = [&](int stage, const bf16 (&values)[TAPS_PER_THREAD][RUN]) {
        for (int i = 0; i < TAPS_PER_THREAD; ++i)
            *reinterpret_cast<uint4*>(&b_tile[stage][(first_tap + i * TAP_ROWS) * B_PITCH + run]) =
                *reinterpret_cast<const uint4*>(values[i]);
    };

    float acc[MI][NJ][4];
    for (int i = 0; i < MI; ++i)
        for (int j = 0; j < NJ; ++j)
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

    const int steps = k_pad / CONV_BK;
    __align__(16) bf16 next[TAPS_PER_THREAD][RUN];
    load_a(0, 0);
    cp_async_commit();
    gather_b(0, next);
    store_b(0, next);
    for (int step = 0; step < steps; ++step) {
        const int stage = step & 1;
        cp_async_wait<0>();
        __syncthreads();  // step's tiles are in; the other stage is free
        const bool more = step + 1 < steps;
        if (more) {
            load_a(step + 1, stage ^ 1);
            cp_async_commit();
            gather_b(step + 1, next);
        }
        for (int ks = 0; ks < CONV_BK; ks += 16) {
            uint32_t a[MI][4];
            for (int i = 0; i < MI; ++i) {
                const int row = warp_m + i * 16 + (lane & 7) + 8 * ((lane >> 3) & 1);
                ldmatrix_x4(a[i], &a_tile[stage][row * A_PITCH + ks + 8 * (lane >> 4)]);
            }
            const int b_row = ks + ((lane >> 3) & 1) * 8 + (lane & 7);
            for (int jj = 0; jj < NJ / 2; ++jj) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, &b_tile[stage][b_row * B_PITCH + warp_n + jj * 16 + (lane >> 4) * 8]);
                for (int i = 0; i < MI; ++i) {
                    mma_bf16(acc[i][2 * jj], a[i], b[0], b[1]);
                    mma_bf16(acc[i][2 * jj + 1], a[i], b[2], b[3]);
                }
            }
        }
        if (more) store_b(stage ^ 1, next);
    }

    bf16* dst = out + (size_t)n * out_channels * positions;
    for (int i = 0; i < MI; ++i) {
        for (int j = 0; j < NJ; ++j) {
            for (int e = 0; e < 4; ++e) {
                const int o = o0 + warp_m + i * 16 + g + 8 * (e >> 1);
                const int q = p0 + warp_n + j * 8 + 2 * t + (e & 1);
                if (o < out_channels && q < positions)
                    dst[(size_t)o * positions + q] = __float2bfloat16(acc[i][j][e] + bias[o]);
            }
        }
    }
}

}  // namespace

// Image n of x is the C·H·W values from x + n·image_stride: C·H·W for an [N, C, H, W] tensor,
// or a smaller stride for images that overlap (the time windows of a causal conv3d over a
// time-major [T, C', H, W] video are the C = kt·C' channels from frame t on, so consecutive
// windows are C'·H·W apart and need no copy). weight [O, k_pad] bf16 (taps then zeros up to
// k_pad, a multiple of 32); bias [O] f32; out [N, O, out_h, out_w] with positions = out_h·out_w.
// grid (⌈positions/128⌉, ⌈O/128⌉, N), 256 threads; the `_o16` kernels take ⌈O/16⌉ CTAs in y
// (for O ≤ 16).
#define CONV2D_IMPLICIT(name, ksize, bm)                                                        \
    extern "C" __global__ void __launch_bounds__(CONV_THREADS)                                  \
    name(const bf16* x, long long image_stride, const bf16* weight, const float* bias,          \
         bf16* out, int channels, int height, int width, int pad, int out_w, int positions,     \
         int out_channels, int k_pad) {                                                         \
        conv2d_implicit<ksize, bm>(x, image_stride, weight, bias, out, channels, height, width, \
                                   pad, out_w, positions, out_channels, k_pad);                 \
    }
CONV2D_IMPLICIT(conv2d_implicit_k3_bf16, 3, 128)
CONV2D_IMPLICIT(conv2d_implicit_k1_bf16, 1, 128)
CONV2D_IMPLICIT(conv2d_implicit_k3_o16_bf16, 3, 16)
CONV2D_IMPLICIT(conv2d_implicit_k1_o16_bf16, 1, 16)

// x [N, C, H, W] → y [N, H·scale, W·scale, C] (channels last, the layout conv_sm90a.cu's TMA
// boxes read; scale > 1 repeats each pixel scale × scale times: the VAE upsamplers' nearest
// upsampling, done in the same pass), in 32 × 32 tiles through shared memory so that both the
// reads and the writes are coalesced.
// grid (⌈H·W/32⌉, ⌈C/32⌉, N), 32 × 8 threads.
extern "C" __global__ void channels_last_bf16(const bf16* __restrict__ x, bf16* __restrict__ y,
                                              int channels, int height, int width, int scale) {
    __shared__ bf16 tile[32][33];
    const int positions = height * width;
    const size_t image = (size_t)blockIdx.z * channels * positions;
    const int p0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    for (int r = threadIdx.y; r < 32; r += 8) {
        const int c = c0 + r, p = p0 + threadIdx.x;
        if (c < channels && p < positions) tile[r][threadIdx.x] = x[image + (size_t)c * positions + p];
    }
    __syncthreads();
    bf16* out = y + image * scale * scale;
    const int out_w = width * scale;
    for (int r = threadIdx.y; r < 32; r += 8) {
        const int p = p0 + r, c = c0 + threadIdx.x;
        if (p >= positions || c >= channels) continue;
        const int iy = p / width, ix = p % width;
        for (int dy = 0; dy < scale; ++dy)
            for (int dx = 0; dx < scale; ++dx)
                out[((size_t)(iy * scale + dy) * out_w + ix * scale + dx) * channels + c] =
                    tile[threadIdx.x][r];
    }
}
