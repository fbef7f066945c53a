// Hopper (sm_90a) building blocks shared by the *_sm90a.cu kernels: wgmma's shared-memory
// matrix descriptors and its fence / commit / wait, the async-proxy fence, mbarriers and named
// barriers. Included, not compiled on its own.
#pragma once

#include <cuda.h>  // CUtensorMap
#include <stdint.h>

namespace sm90 {

// Shared-memory matrix descriptor of an operand in the 128-byte swizzle mode (swizzle mode 1,
// bits 62-63): start address (bits 0-13), leading-dimension byte offset (bits 16-29) and
// stride-dimension byte offset (bits 32-45), all in 16-byte units. Tiles are made of 8-row
// atoms of 128-byte rows (1024 bytes, 1024-aligned), 16-byte chunk c of row r stored at chunk
// c ^ (r mod 8).
// - K-major operand (k contiguous in a row): `stride` = 1024, from one atom of 8 rows to the
//   next; `leading` is unused (1). The next k slice inside a row is the start address + its
//   byte offset.
// - MN-major operand (n contiguous in a row, a row per k): `leading` = the bytes from one
//   64-element group of n to the next, `stride` = 1024, from one group of 8 k to the next.
// `swizzle` is the layout type: 1 for the 128-byte swizzle, 2 for the 64-byte one (whose
// 8-row atoms are 512 bytes: `stride` 512 for K-major rows of 64 bytes).
__device__ __forceinline__ uint64_t smem_descriptor(uint32_t address, uint32_t leading = 16,
                                                    uint32_t stride = 1024,
                                                    uint32_t swizzle = 1) {
    return (uint64_t)((address & 0x3FFFF) >> 4) | (uint64_t)(leading >> 4) << 16 |
           (uint64_t)(stride >> 4) << 32 | (uint64_t)swizzle << 62;
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

// Tells the compiler that N registers (wgmma accumulators) may change here, so that no read of
// them moves above a wgmma wait and no write below a wgmma issue. The constraint matches the
// register class, or the compiler would copy the registers (reading them) to satisfy it.
__device__ __forceinline__ void fence_register(float& x) { asm volatile("" : "+f"(x)::"memory"); }
__device__ __forceinline__ void fence_register(int& x) { asm volatile("" : "+r"(x)::"memory"); }

// Sets this warpgroup's registers per thread to REGISTERS (a multiple of 8 in 24..256),
// returning some to the CTA's pool (INCREASE false) or taking them from it (true). Every thread
// of the warpgroup runs it.
template <int REGISTERS, bool INCREASE>
__device__ __forceinline__ void set_max_registers() {
    if (INCREASE) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
    else asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGISTERS));
}

// `x`, which ptxas can no longer trace to its computation: a loop that uses it keeps it in a
// register instead of recomputing it every iteration (ptxas rebuilt the W8A8 GEMM's shared-memory
// addresses from %cgactaid in every k tile to save registers it had to spare).
__device__ __forceinline__ uint32_t opaque(uint32_t x) {
    asm volatile("" : "+r"(x));
    return x;
}

template <int N, typename T>
__device__ __forceinline__ void fence_registers(T* x) {
#pragma unroll
    for (int i = 0; i < N; ++i) fence_register(x[i]);
}

// Makes this thread's completed cp.async writes visible to the async proxy that wgmma reads
// shared memory through.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// mbarrier helpers (shared::cta, 64-bit barriers addressed by their shared-memory address).
__device__ __forceinline__ void mbarrier_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

// Makes the initialised mbarriers visible to the other threads (before a CTA barrier).
__device__ __forceinline__ void mbarrier_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// Arrives on `bar` once all of this thread's earlier cp.asyncs have landed (counts as one of
// the arrivals the barrier was initialised with).
__device__ __forceinline__ void mbarrier_arrive_on_cp_async(uint32_t bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void mbarrier_arrive(uint32_t bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Arrives on `bar` (one of its arrivals) and adds `bytes` to the transfer count its phase
// waits for (the TMA copies that signal it).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}

// TMA: the box of `map` at element coordinates (x, y) (x the contiguous dimension) into shared
// memory at `dst`, in the map's swizzle; completes `bytes` of `bar`'s transfer count when it
// lands. Out-of-range elements are zeros. `map` is a __grid_constant__ kernel parameter.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int x, int y,
                                            uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(bar)
        : "memory");
}

// The same for the box of a 5-D `map` at element coordinates (c0 the contiguous dimension … c4).
__device__ __forceinline__ void tma_load_5d(uint32_t dst, const CUtensorMap* map, int c0, int c1,
                                            int c2, int c3, int c4, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.5d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
        "[%0], [%1, {%2, %3, %4, %5, %6}], [%7];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(c4),
        "r"(bar)
        : "memory");
}

// Waits until the phase of `bar` with parity `parity` has completed.
__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT;\n}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// Named barriers (0 is __syncthreads') of THREADS threads: `sync` waits for all of them,
// `arrive` counts this warp in without waiting.
template <int THREADS>
__device__ __forceinline__ void named_barrier_sync(int id) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory");
}

template <int THREADS>
__device__ __forceinline__ void named_barrier_arrive(int id) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "n"(THREADS) : "memory");
}

}  // namespace sm90
