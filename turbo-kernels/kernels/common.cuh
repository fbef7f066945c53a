// Helpers shared by the kernels of this directory (included, not compiled on its own).
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

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

// The 32-bit shared-memory address of a generic pointer into shared memory, as PTX's
// shared::cta instructions (cp.async, ldmatrix, mbarriers, TMA, wgmma descriptors) take it.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
    return block_reduce(x, scratch, [](float a, float b) { return fmaxf(a, b); },
                        -__int_as_float(0x7f800000));
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
    return block_reduce(x, scratch, [](float a, float b) { return a + b; }, 0.f);
}

// D[16×8] += A[16×32] · B[32×8], int8 in, int32 accumulate (exact): `mma.sync` m16n8k32.
__device__ __forceinline__ void mma_s8(int c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// D[16×8] += A[16×16] · B[16×8], bf16 in, f32 accumulate.
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8×8 matrices of 16-bit elements (or 8 rows of 16 bytes) from shared memory; lane l
// gives the address of row l mod 8 of matrix l / 8 (a shared-memory address, or a generic
// pointer into shared memory).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t row_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(row_address));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row_address) {
    ldmatrix_x4(r, static_cast<uint32_t>(__cvta_generic_to_shared(row_address)));
}

// Four transposed 8×8 bf16 matrices from shared memory: the B operands of two adjacent n-tiles.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* row_address) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// 16 bytes from global memory to shared-memory address `dst` without passing through
// registers, bypassing L1; `valid` false writes zeros (`src` must still be a valid address, it
// is not read).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
    cp_async_16(static_cast<uint32_t>(__cvta_generic_to_shared(dst)), src, valid);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most `pending` committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
}

}  // namespace turbo
