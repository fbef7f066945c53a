// Helpers shared by the kernels of this directory (included, not compiled on its own).
#pragma once

#include <cuda_bf16.h>

namespace turbo {

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void store(float* dst, float x) { *dst = x; }
__device__ __forceinline__ void store(bf16* dst, float x) { *dst = __float2bfloat16(x); }

// Reduces `x` over the CTA with `op`, whose neutral element is `identity` (blockDim.x a
// multiple of 32, at most 1024); every thread gets the result. `scratch` holds 32 floats of
// shared memory; consecutive calls may reuse it.
template <typename Op>
__device__ __forceinline__ float block_reduce(float x, float* scratch, Op op, float identity) {
    for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffff, x, o));
    __syncthreads();  // the previous call's readers are done with scratch
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
    __syncthreads();
    if (threadIdx.x < 32) {
        x = threadIdx.x < blockDim.x / 32 ? scratch[threadIdx.x] : identity;
        for (int o = 16; o > 0; o >>= 1) x = op(x, __shfl_xor_sync(0xffffffff, x, o));
        if (threadIdx.x == 0) scratch[0] = x;
    }
    __syncthreads();
    return scratch[0];
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
    return block_reduce(x, scratch, [](float a, float b) { return fmaxf(a, b); },
                        -__int_as_float(0x7f800000));
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
    return block_reduce(x, scratch, [](float a, float b) { return a + b; }, 0.f);
}

}  // namespace turbo
