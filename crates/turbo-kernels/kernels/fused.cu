// Fused elementwise and row kernels of the Wan DiT and the linears: each replaces a chain of
// candle broadcast ops (one pass over memory instead of several, and no strided indexing).
// The candle compositions they replace are their references (`wan::fused`, `turbo-quant`).

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace {

using turbo::block_sum;
using turbo::store;
using turbo::to_float;

typedef __nv_bfloat16 bf16;

// LayerNorm of one row (two passes: mean, then the variance of the centred values), then
// × mul + add per column when given. One CTA per row.
template <typename T>
__device__ void layer_norm_affine(const float* __restrict__ x, const float* __restrict__ mul,
                                  const float* __restrict__ add, T* __restrict__ out, int dim,
                                  float eps) {
    __shared__ float scratch[32];
    const float* row = x + (size_t)blockIdx.x * dim;
    float sum = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) sum += row[i];
    const float mean = block_sum(sum, scratch) / dim;
    float squares = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float c = row[i] - mean;
        squares += c * c;
    }
    const float denom = sqrtf(block_sum(squares, scratch) / dim + eps);
    T* dst = out + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = (row[i] - mean) / denom;
        if (mul) v *= mul[i];
        if (add) v += add[i];
        store(dst + i, v);
    }
}

}  // namespace

// grid (rows), 256 threads. x f32 [rows, dim]; mul, add f32 [dim] or null.
extern "C" __global__ void layer_norm_affine_f32(const float* x, const float* mul, const float* add,
                                                 float* out, int dim, float eps) {
    layer_norm_affine(x, mul, add, out, dim, eps);
}

extern "C" __global__ void layer_norm_affine_bf16(const float* x, const float* mul, const float* add,
                                                  bf16* out, int dim, float eps) {
    layer_norm_affine(x, mul, add, out, dim, eps);
}

// out = x + y · gate[column], f32 x and gate, y in f32 or bf16; [rows, dim] row-major.
template <typename T>
__device__ void gated_residual(const float* __restrict__ x, const T* __restrict__ y,
                               const float* __restrict__ gate, float* __restrict__ out,
                               size_t total, int dim) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) out[i] = x[i] + to_float(y[i]) * gate[i % dim];
}

extern "C" __global__ void gated_residual_f32(const float* x, const float* y, const float* gate,
                                              float* out, size_t total, int dim) {
    gated_residual(x, y, gate, out, total, dim);
}

extern "C" __global__ void gated_residual_bf16(const float* x, const bf16* y, const float* gate,
                                               float* out, size_t total, int dim) {
    gated_residual(x, y, gate, out, total, dim);
}

// out = y + bias[column] in the dtype of y; [rows, n] row-major.
template <typename T>
__device__ void add_bias(const T* __restrict__ y, const T* __restrict__ bias, T* __restrict__ out,
                         size_t total, int n) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < total) store(out + i, to_float(y[i]) + to_float(bias[i % n]));
}

extern "C" __global__ void add_bias_f32(const float* y, const float* bias, float* out, size_t total, int n) {
    add_bias(y, bias, out, total, n);
}

extern "C" __global__ void add_bias_bf16(const bf16* y, const bf16* bias, bf16* out, size_t total, int n) {
    add_bias(y, bias, out, total, n);
}
