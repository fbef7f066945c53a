// The im2col step of a stride-1 2-D convolution, laid out for one GEMM per image that writes
// NCHW directly: col[n][k][j] with k the (channel, tap) row and j the output position, so that
// consecutive threads read consecutive input pixels and write consecutive outputs (candle's
// im2col, [n][position][k], reads across channels and runs far below memory bandwidth).
// An extra all-ones row carries the bias through the GEMM.

#include <cuda_bf16.h>
#include <stdint.h>

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
