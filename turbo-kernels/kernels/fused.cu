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

// A warp's sum of x (every lane gets it).
__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

// LayerNorm of one row (two passes: mean, then the variance of the centred values), then
// × mul + add per column when given. One warp per row, so that the reductions are shuffles
// and no CTA waits on a barrier; each pass reads the row again (from L1 or L2), four columns
// per load when the rows are 16-byte aligned.
template <typename T>
__device__ void layer_norm_affine(const float* __restrict__ x, const float* __restrict__ mul,
                                  const float* __restrict__ add, T* __restrict__ out, int rows,
                                  int dim, float eps) {
    const int lane = threadIdx.x % 32;
    const int r = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (r >= rows) return;
    const float* row = x + (size_t)r * dim;
    const bool vectors = dim % 4 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    // Calls `f(i, value)` for the lane's columns.
    auto for_columns = [&](auto f) {
        if (vectors) {
            for (int i = 4 * lane; i < dim; i += 128) {
                const float4 v = *reinterpret_cast<const float4*>(row + i);
                f(i, v.x);
                f(i + 1, v.y);
                f(i + 2, v.z);
                f(i + 3, v.w);
            }
        } else {
            for (int i = lane; i < dim; i += 32) f(i, row[i]);
        }
    };
    float sum = 0.f;
    for_columns([&](int, float v) { sum += v; });
    const float mean = warp_sum(sum) / dim;
    float squares = 0.f;
    for_columns([&](int, float v) { squares += (v - mean) * (v - mean); });
    const float denom = sqrtf(warp_sum(squares) / dim + eps);
    T* dst = out + (size_t)r * dim;
    for_columns([&](int i, float v) {
        float y = (v - mean) / denom;
        if (mul) y *= mul[i];
        if (add) y += add[i];
        store(dst + i, y);
    });
}

}  // namespace

// grid (⌈rows / 8⌉), 256 threads (a warp per row). x f32 [rows, dim]; mul, add f32 [dim] or null.
extern "C" __global__ void layer_norm_affine_f32(const float* x, const float* mul, const float* add,
                                                 float* out, int rows, int dim, float eps) {
    layer_norm_affine(x, mul, add, out, rows, dim, eps);
}

extern "C" __global__ void layer_norm_affine_bf16(const float* x, const float* mul, const float* add,
                                                  bf16* out, int rows, int dim, float eps) {
    layer_norm_affine(x, mul, add, out, rows, dim, eps);
}

namespace {

// out = x + (y + bias[column]) · gate[column] in f32: f32 x, y and bias in f32 or bf16, f32
// gate; bias and gate may be null (0 and 1). [rows, dim] row-major, dim even.
// grid (rows), 256 threads.
template <typename T>
__device__ void gated_residual(const float* __restrict__ x, const T* __restrict__ y,
                               const T* __restrict__ bias, const float* __restrict__ gate,
                               float* __restrict__ out, int dim) {
    const size_t row = (size_t)blockIdx.x * dim;
    for (int i = 2 * threadIdx.x; i < dim; i += 2 * blockDim.x) {
        const float2 xs = *reinterpret_cast<const float2*>(x + row + i);
        float y0 = to_float(y[row + i]), y1 = to_float(y[row + i + 1]);
        if (bias) {
            y0 += to_float(bias[i]);
            y1 += to_float(bias[i + 1]);
        }
        if (gate) {
            y0 *= gate[i];
            y1 *= gate[i + 1];
        }
        *reinterpret_cast<float2*>(out + row + i) = make_float2(xs.x + y0, xs.y + y1);
    }
}

// GELU, tanh approximation (candle's `gelu`).
__device__ __forceinline__ float gelu_tanh(float x) {
    const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.f + tanhf(inner));
}

// out = gelu(y + bias[column]) (bias may be null), [rows, n] row-major. grid (rows), 256 threads.
// Eight columns per step through 16-byte loads and stores when the rows are bf16, 16-byte
// aligned and n is a multiple of 8; one at a time otherwise.
template <typename T>
__device__ void bias_gelu(const T* __restrict__ y, const T* __restrict__ bias, T* __restrict__ out,
                          int n) {
    const size_t row = (size_t)blockIdx.x * n;
    const bool aligned = n % 8 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(bias) % 16 == 0;
    if constexpr (sizeof(T) == 2) {
        if (aligned) {
            for (int i = 8 * threadIdx.x; i < n; i += 8 * blockDim.x) {
                uint4 packed = *reinterpret_cast<const uint4*>(y + row + i);
                const uint4 bias_packed = bias ? *reinterpret_cast<const uint4*>(bias + i) : make_uint4(0, 0, 0, 0);
                __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&packed);
                const __nv_bfloat162* bias_pairs = reinterpret_cast<const __nv_bfloat162*>(&bias_packed);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 v = __bfloat1622float2(pairs[j]), b = __bfloat1622float2(bias_pairs[j]);
                    pairs[j] = __floats2bfloat162_rn(gelu_tanh(v.x + b.x), gelu_tanh(v.y + b.y));
                }
                *reinterpret_cast<uint4*>(out + row + i) = packed;
            }
            return;
        }
    }
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = to_float(y[row + i]) + (bias ? to_float(bias[i]) : 0.f);
        store(out + row + i, gelu_tanh(v));
    }
}

// Wan's q/k path: RMSNorm over the row of y + bias (bias may be null) with `weight`, then,
// when `cos` is given, RoPE on the interleaved pairs of every head: the pair p of a head of
// token `row mod tokens` turns by the angle whose cosine and sine are cos/sin[token, p]
// ([tokens, head_dim/2] f32). grid (rows), 256 threads, dynamic shared memory dim floats.
template <typename T>
__device__ void rms_norm_rope(const T* __restrict__ y, const T* __restrict__ bias,
                              const float* __restrict__ weight, const float* __restrict__ cos,
                              const float* __restrict__ sin, T* __restrict__ out, int dim,
                              int head_dim, int tokens, float eps) {
    extern __shared__ float row_values[];
    __shared__ float scratch[32];
    const T* src = y + (size_t)blockIdx.x * dim;
    float squares = 0.f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = to_float(src[i]) + (bias ? to_float(bias[i]) : 0.f);
        row_values[i] = v;
        squares += v * v;
    }
    // block_sum synchronises the CTA: row_values is complete after it.
    const float inv_rms = rsqrtf(block_sum(squares, scratch) / dim + eps);
    const int pairs = head_dim / 2;
    const size_t angles = (size_t)(blockIdx.x % tokens) * pairs;
    T* dst = out + (size_t)blockIdx.x * dim;
    for (int p = threadIdx.x; p < dim / 2; p += blockDim.x) {
        const int i = 2 * p;
        float x0 = row_values[i] * inv_rms * weight[i];
        float x1 = row_values[i + 1] * inv_rms * weight[i + 1];
        if (cos) {
            const float c = cos[angles + p % pairs], s = sin[angles + p % pairs];
            const float r0 = x0 * c - x1 * s;
            x1 = x0 * s + x1 * c;
            x0 = r0;
        }
        store(dst + i, x0);
        store(dst + i + 1, x1);
    }
}

}  // namespace

extern "C" __global__ void gated_residual_f32(const float* x, const float* y, const float* bias,
                                              const float* gate, float* out, int dim) {
    gated_residual(x, y, bias, gate, out, dim);
}

extern "C" __global__ void gated_residual_bf16(const float* x, const bf16* y, const bf16* bias,
                                               const float* gate, float* out, int dim) {
    gated_residual(x, y, bias, gate, out, dim);
}

extern "C" __global__ void bias_gelu_f32(const float* y, const float* bias, float* out, int n) {
    bias_gelu(y, bias, out, n);
}

extern "C" __global__ void bias_gelu_bf16(const bf16* y, const bf16* bias, bf16* out, int n) {
    bias_gelu(y, bias, out, n);
}

extern "C" __global__ void rms_norm_rope_f32(const float* y, const float* bias, const float* weight,
                                             const float* cos, const float* sin, float* out,
                                             int dim, int head_dim, int tokens, float eps) {
    rms_norm_rope(y, bias, weight, cos, sin, out, dim, head_dim, tokens, eps);
}

extern "C" __global__ void rms_norm_rope_bf16(const bf16* y, const bf16* bias, const float* weight,
                                              const float* cos, const float* sin, bf16* out,
                                              int dim, int head_dim, int tokens, float eps) {
    rms_norm_rope(y, bias, weight, cos, sin, out, dim, head_dim, tokens, eps);
}

namespace {

// out = y + bias[column] in the dtype of y; [rows, n] row-major. grid (rows), 256 threads.
template <typename T>
__device__ void add_bias(const T* __restrict__ y, const T* __restrict__ bias, T* __restrict__ out,
                         int n) {
    const size_t row = (size_t)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x)
        store(out + row + i, to_float(y[row + i]) + to_float(bias[i]));
}

}  // namespace

extern "C" __global__ void add_bias_f32(const float* y, const float* bias, float* out, int n) {
    add_bias(y, bias, out, n);
}

extern "C" __global__ void add_bias_bf16(const bf16* y, const bf16* bias, bf16* out, int n) {
    add_bias(y, bias, out, n);
}
