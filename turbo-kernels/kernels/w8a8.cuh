// Pieces shared by the W8A8 GEMMs (w8a8.cu: mma.sync, sm_80+; w8a8_sm90a.cu: wgmma): the
// tile geometry, the swizzled shared-memory tile layout, the tile raster, the exact int → float
// conversion and the output stores. Included, not compiled on its own.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"

namespace w8a8 {


typedef __nv_bfloat16 bf16;

// Side of the square tiles that share one scale; also the CTA's output tile and its k step,
// so that every k step of a CTA has exactly one (activation, weight) scale pair.
constexpr int TILE = 128;
constexpr int THREADS = 256;
constexpr int TILE_BYTES = TILE * TILE;  // one int8 operand tile
constexpr int STAGE_BYTES = 2 * TILE_BYTES;
// CTAs that walk down the m tiles before moving to the next n tile, so that the CTAs resident
// at one time share their activation and weight tiles in L2.
constexpr int GROUP_M = 8;

// Output tile `index` of a 1-D grid over m_tiles × n_tiles tiles, rastered in groups of
// `group` m tiles per column of n tiles.
struct TileCoord {
    int m_tile, n_tile;
};

__device__ __forceinline__ TileCoord grouped_tile(int index, int m_tiles, int n_tiles, int group) {
    const int per_group = group * n_tiles;
    const int first_m_tile = (index / per_group) * group;
    const int group_rows = min(m_tiles - first_m_tile, group);
    const int in_group = index % per_group;
    return {first_m_tile + in_group % group_rows, in_group / group_rows};
}

// A tile row is 128 bytes = eight 16-byte chunks; chunk c of row r is stored at chunk
// c ^ (r mod 8). Eight consecutive rows at one logical chunk then hit distinct banks (an
// ldmatrix phase, a warp's cp.asyncs), and at a 1024-byte-aligned tile this is exactly the
// layout that wgmma's 128-byte swizzle mode reads.
using turbo::shared_address;

// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled 128×128 tile.
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
    return row * TILE + ((chunk ^ (row & 7)) << 4);
}

// (float)v for |v| < 2²², exactly, on the integer and FP32 pipes: adding v to the bits of
// 1.5·2²³ puts it in the mantissa. A k tile's int32 sum is at most 128·128² = 2²¹ in size. On
// an H100 the one-instruction conversion (I2FP, `GemmKernel::WgmmaCvt`) measured faster at
// every Wan shape once the loop around it was shortened (`docs/performance.md` v17; in v16 it
// was 3–6 % slower at two 14B shapes); `GemmKernel::Fastest` still times both.
__device__ __forceinline__ float exact_float(int v) {
    return __fsub_rn(__int_as_float(v + 0x4B400000), 12582912.f);
}

// Output pair (col, col + 1) of one row: a vector store when both are inside and aligned.
__device__ __forceinline__ void store_pair(float* y, int col, int n, float a, float b) {
    if (col + 1 < n && n % 2 == 0) {
        *reinterpret_cast<float2*>(y + col) = make_float2(a, b);
    } else {
        y[col] = a;
        if (col + 1 < n) y[col + 1] = b;
    }
}

__device__ __forceinline__ void store_pair(bf16* y, int col, int n, float a, float b) {
    if (col + 1 < n && n % 2 == 0) {
        *reinterpret_cast<__nv_bfloat162*>(y + col) = __floats2bfloat162_rn(a, b);
    } else {
        y[col] = __float2bfloat16(a);
        if (col + 1 < n) y[col + 1] = __float2bfloat16(b);
    }
}

}  // namespace w8a8
