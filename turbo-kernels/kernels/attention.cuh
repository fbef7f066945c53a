// Per-warp pieces of the attention kernels (attention.cu: mma.sync, sm_80+; attention_sm90a.cu:
// wgmma): a warp owns 16 query rows in the mma C layout (lane quad g = lane / 4 holds rows g and
// g + 8, columns 2t, 2t + 1 of every 8-wide block, t = lane % 4), which is also the layout of a
// warp's rows in a wgmma m64 accumulator. Online softmax, normalisation, SLA's linear branch and
// the stores work on that layout whichever instruction produced it. Included, not compiled on
// its own.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <math_constants.h>
#include <stdint.h>

#include "common.cuh"

#define NEG_INF (-CUDART_INF_F)

namespace attention {

typedef __nv_bfloat16 bf16;
using turbo::mma_bf16;
using turbo::pack_bf16;

constexpr int HEAD_DIM = 128;
constexpr int BLOCK_Q = 128;
constexpr int BLOCK_K = 64;
// Shared-memory row pitch of the bf16 tiles the mma.sync paths read, padded by 16 bytes so
// that the 8 rows a quad of lanes reads fall in distinct banks.
constexpr int PITCH_BF16 = HEAD_DIM + 8;
// Bytes of the D×D linear-branch state staged in shared memory.
constexpr int STATE_BYTES = HEAD_DIM * PITCH_BF16 * 2;

// 2^x on the special-function unit (flushing subnormal results to zero, which the softmax
// weights never need).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// log2(448): SageSLA exponentiates P̃ against the running max plus this offset, so that P̃
// spans the E4M3 range [0, 448].
constexpr float P_FP8_OFFSET = 8.807355f;

// x / scale rounded half away from zero into [−127, 127] (SageSLA's int8 rounding).
__device__ __forceinline__ uint32_t quantize_int8(float x, float scale) {
    const float scaled = x / scale;
    const float rounded = fminf(fmaxf(truncf(scaled + copysignf(0.5f, scaled)), -127.f), 127.f);
    return (uint32_t)(uint8_t)(int8_t)rounded;
}

// Four values quantised and packed little-endian, the first in the lowest byte.
__device__ __forceinline__ uint32_t quantize_int8x4(const float x[4], float scale) {
    return quantize_int8(x[0], scale) | quantize_int8(x[1], scale) << 8 |
           quantize_int8(x[2], scale) << 16 | quantize_int8(x[3], scale) << 24;
}

// The nearest E4M3 value (round to nearest even, saturating), as a float.
__device__ __forceinline__ float round_e4m3(float x) {
    return float(__nv_fp8_e4m3(x));
}

// Where (b, h)'s rows start, and how far apart they are, in elements.
struct HeadView {
    size_t base;
    size_t pitch;
    __device__ HeadView(int bh, int heads, int len) {
        const int b = bh / heads, h = bh % heads;
        pitch = (size_t)heads * HEAD_DIM;
        base = (size_t)b * len * pitch + (size_t)h * HEAD_DIM;
    }
};

// Four consecutive bf16 values (8-byte aligned) as floats; zeros for a null source.
__device__ __forceinline__ void load_bf16x4(float out[4], const bf16* src) {
    if (!src) {
        for (int j = 0; j < 4; ++j) out[j] = 0.f;
        return;
    }
    const uint2 raw = *reinterpret_cast<const uint2*>(src);
    const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.x));
    const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&raw.y));
    out[0] = lo.x;
    out[1] = lo.y;
    out[2] = hi.x;
    out[3] = hi.y;
}

// The warp's 16 query rows from `row0` as the bf16 A fragments of Q·Kᵀ, one per 16-wide slice
// of D (rows g, g + 8; columns 2t.., 8 + 2t..); rows past `len` are zero.
__device__ __forceinline__ void load_query_fragments(uint32_t qf[HEAD_DIM / 16][4], const bf16* q,
                                                     const HeadView& view, int row0, int len,
                                                     int g, int t) {
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + 8 * (i & 1), col = kk * 16 + 2 * t + 8 * (i >> 1);
            qf[kk][i] = row < len ? *reinterpret_cast<const uint32_t*>(q + view.base + (size_t)row * view.pitch + col) : 0u;
        }
    }
}

// SageSLA: the warp's 16 query rows from `row0` quantised to int8 as the A fragments of the
// int8 Q·Kᵀ, one per 32-wide slice of D (rows g, g + 8; columns 4t.., 16 + 4t..), with the
// query block's scale max|q|/127 + 1e-7, which it returns. `block_max` takes this thread's
// max |q| to the block's (every thread of the block calls it).
template <typename BlockMax>
__device__ __forceinline__ float quantize_query_fragments(uint32_t qf[HEAD_DIM / 32][4], const bf16* q,
                                                          const HeadView& view, int row0, int len,
                                                          int g, int t, BlockMax block_max) {
    float qv[HEAD_DIM / 32][4][4];
    float amax = 0.f;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 32; ++kk) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + 8 * (i & 1), col = kk * 32 + 4 * t + 16 * (i >> 1);
            load_bf16x4(qv[kk][i], row < len ? q + view.base + (size_t)row * view.pitch + col : nullptr);
            for (int j = 0; j < 4; ++j) amax = fmaxf(amax, fabsf(qv[kk][i][j]));
        }
    }
    const float scale = block_max(amax) / 127.f + 1e-7f;
#pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 32; ++kk)
#pragma unroll
        for (int i = 0; i < 4; ++i) qf[kk][i] = quantize_int8x4(qv[kk][i], scale);
    return scale;
}

// The running softmax state of the two rows (g and g + 8) a lane holds, and its share of O.
struct RowState {
    float max[2];
    float sum[2];  // this lane's partial row sums; the quad's four are added at the end
    float o[HEAD_DIM / 8][4];

    __device__ void init() {
        for (int r = 0; r < 2; ++r) {
            max[r] = NEG_INF;
            sum[r] = 0.f;
        }
        for (int n = 0; n < HEAD_DIM / 8; ++n)
            for (int i = 0; i < 4; ++i) o[n][i] = 0.f;
    }
};

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// One key tile of online softmax, without touching O: `s` holds the raw scores (masked keys
// −∞) of the lane's rows over the tile's 8·COLS keys in the mma C layout, `scale` (> 0) takes them
// to base 2. Updates the row max and sum, turns `s` into the weights
// P = 2^(s·scale − max + offset) and returns in `alpha` what O's rows must be multiplied by
// (`rescale_rows`). `fp8_weights` rounds P to E4M3 (the row sums take P before rounding, as
// SageAttention does).
template <int COLS>
__device__ __forceinline__ void softmax_weights(RowState& st, float (&s)[COLS][4], float scale,
                                                float offset, bool fp8_weights, float alpha[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float tile_max = NEG_INF;
#pragma unroll
        for (int n = 0; n < COLS; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        const float new_max = fmaxf(st.max[r], quad_max(tile_max) * scale);
        alpha[r] = fast_exp2(st.max[r] - new_max);
        const float shift = offset - new_max;
        float tile_sum = 0.f;
#pragma unroll
        for (int n = 0; n < COLS; ++n) {
#pragma unroll
            for (int i = 2 * r; i < 2 * r + 2; ++i) {
                const float p = fast_exp2(fmaf(s[n][i], scale, shift));
                tile_sum += p;
                s[n][i] = fp8_weights ? round_e4m3(p) : p;
            }
        }
        st.sum[r] = st.sum[r] * alpha[r] + tile_sum;
        st.max[r] = new_max;
    }
}

// O's two rows of the lane times `alpha` (from `softmax_weights`).
__device__ __forceinline__ void rescale_rows(RowState& st, const float alpha[2]) {
#pragma unroll
    for (int n = 0; n < HEAD_DIM / 8; ++n) {
#pragma unroll
        for (int i = 0; i < 4; ++i) st.o[n][i] *= alpha[i >> 1];
    }
}

// `softmax_weights` and `rescale_rows` at once.
__device__ __forceinline__ void softmax_tile(RowState& st, float (&s)[BLOCK_K / 8][4], float scale,
                                             float offset, bool fp8_weights) {
    float alpha[2];
    softmax_weights(st, s, scale, offset, fp8_weights, alpha);
    rescale_rows(st, alpha);
}

// Scores of one key tile are −∞ past the sequence end.
__device__ __forceinline__ void mask_tail(float s[BLOCK_K / 8][4], int key0, int len, int t) {
    if (key0 + BLOCK_K <= len) return;
    for (int n = 0; n < BLOCK_K / 8; ++n)
        for (int i = 0; i < 4; ++i)
            if (key0 + n * 8 + 2 * t + (i & 1) >= len) s[n][i] = NEG_INF;
}

// O / l for the lane's two rows, times a per-channel scale when given.
__device__ __forceinline__ void normalize_rows(RowState& st, int t, const float* channel_scale) {
    // The quad reductions come first: every lane of the warp must take part in the shuffles.
    const float inv_sum[2] = {1.f / quad_sum(st.sum[0]), 1.f / quad_sum(st.sum[1])};
    for (int n = 0; n < HEAD_DIM / 8; ++n) {
        for (int i = 0; i < 4; ++i) {
            st.o[n][i] *= inv_sum[i >> 1];
            if (channel_scale) st.o[n][i] *= channel_scale[n * 8 + 2 * t + (i & 1)];
        }
    }
}

// SLA's linear branch after `proj_l`, per (b, h): with φ = softmax over D,
// proj_l(φ(q)·H / (φ(q)·z + eps)) = (φ(q) / (φ(q)·z + eps))·(H·Wᵀ) + b.
struct LinearBranch {
    const bf16* state;  // [B·H, D, D]: (H·Wᵀ)ᵀ, so that a row holds one output channel
    const float* z;     // [B·H, D]
    const float* bias;  // [D]
    float eps;
};

// Copies (b, h)'s D×D state into shared memory (pitch PITCH_BF16) for the B operands.
// Threads `thread` (0-based among them) of `threads` share the copy.
__device__ __forceinline__ void stage_linear_state(bf16* dst, const bf16* state, int bh,
                                                   int thread, int threads) {
    const char* src = reinterpret_cast<const char*>(state + (size_t)bh * HEAD_DIM * HEAD_DIM);
    constexpr int CHUNKS_PER_ROW = HEAD_DIM * 2 / 16;
    for (int c = thread; c < HEAD_DIM * CHUNKS_PER_ROW; c += threads) {
        const int r = c / CHUNKS_PER_ROW, offset = (c % CHUNKS_PER_ROW) * 16;
        *reinterpret_cast<uint4*>(reinterpret_cast<char*>(dst + r * PITCH_BF16) + offset) =
            *reinterpret_cast<const uint4*>(src + r * HEAD_DIM * 2 + offset);
    }
}

// Adds the linear branch to the lane's rows g and g + 8 of O. The query rows are read again
// from bf16 `q` (rows past the end as zeros; they are never stored); `state` is the staged
// D×D state.
__device__ __forceinline__ void add_linear_branch(RowState& st, const bf16* q, const HeadView& view,
                                                  int row0, int len, int g, int t,
                                                  const bf16* state, const LinearBranch& lin,
                                                  int bh) {
    // x[r][4·kk + j]: row g + 8r, column 16kk + 2t + (j & 1) + 8(j >> 1): the A layout.
    float x[2][HEAD_DIM / 4];
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        const bf16* src = q + view.base + (size_t)row * view.pitch;
        #pragma unroll
        for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
            #pragma unroll
            for (int half = 0; half < 2; ++half) {
                float2 pair = make_float2(0.f, 0.f);
                if (row < len)
                    pair = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src + kk * 16 + 8 * half + 2 * t));
                x[r][4 * kk + 2 * half] = pair.x;
                x[r][4 * kk + 2 * half + 1] = pair.y;
            }
        }
    }
    const float* z = lin.z + (size_t)bh * HEAD_DIM;
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
        float row_max = NEG_INF;
        #pragma unroll
        for (int j = 0; j < HEAD_DIM / 4; ++j) row_max = fmaxf(row_max, x[r][j]);
        row_max = quad_max(row_max);
        float sum = 0.f;
        #pragma unroll
        for (int j = 0; j < HEAD_DIM / 4; ++j) {
            x[r][j] = __expf(x[r][j] - row_max);
            sum += x[r][j];
        }
        const float inv_sum = 1.f / quad_sum(sum);
        float dot = 0.f;
        #pragma unroll
        for (int j = 0; j < HEAD_DIM / 4; ++j) {
            x[r][j] *= inv_sum;
            dot += x[r][j] * z[16 * (j / 4) + 2 * t + (j & 1) + 8 * ((j >> 1) & 1)];
        }
        const float inv_den = 1.f / (quad_sum(dot) + lin.eps);
        #pragma unroll
        for (int j = 0; j < HEAD_DIM / 4; ++j) x[r][j] *= inv_den;
    }
    #pragma unroll
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        const uint32_t a[4] = {
            pack_bf16(x[0][4 * kk], x[0][4 * kk + 1]),
            pack_bf16(x[1][4 * kk], x[1][4 * kk + 1]),
            pack_bf16(x[0][4 * kk + 2], x[0][4 * kk + 3]),
            pack_bf16(x[1][4 * kk + 2], x[1][4 * kk + 3]),
        };
        #pragma unroll
        for (int n = 0; n < HEAD_DIM / 8; ++n) {
            const bf16* row = state + (n * 8 + g) * PITCH_BF16 + kk * 16 + 2 * t;
            mma_bf16(st.o[n], a, *reinterpret_cast<const uint32_t*>(row),
                     *reinterpret_cast<const uint32_t*>(row + 8));
        }
    }
    #pragma unroll
    for (int n = 0; n < HEAD_DIM / 8; ++n)
        #pragma unroll
        for (int i = 0; i < 4; ++i) st.o[n][i] += lin.bias[n * 8 + 2 * t + (i & 1)];
}

// Writes the lane's two rows of O.
__device__ __forceinline__ void store_rows(const RowState& st, bf16* out, const HeadView& view,
                                           int row0, int len, int g, int t) {
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row >= len) continue;
        bf16* dst = out + view.base + (size_t)row * view.pitch;
        for (int n = 0; n < HEAD_DIM / 8; ++n)
            *reinterpret_cast<uint32_t*>(dst + n * 8 + 2 * t) = pack_bf16(st.o[n][2 * r], st.o[n][2 * r + 1]);
    }
}

// Normalises O, adds the linear branch when `lin.state` is given, and stores. `smem` is the
// kernel's pipeline memory, free once all the threads that `sync` gathers have left the key
// loop; `thread` is this thread's index among those `threads`.
template <typename Sync>
__device__ __forceinline__ void finish_rows(RowState& st, const bf16* q, bf16* out,
                                            const HeadView& view, int row0, int len, int g, int t,
                                            const float* channel_scale, const LinearBranch& lin,
                                            int bh, char* smem, int thread, int threads,
                                            Sync sync) {
    normalize_rows(st, t, channel_scale);
    if (lin.state) {
        bf16* state = reinterpret_cast<bf16*>(smem);
        sync();
        stage_linear_state(state, lin.state, bh, thread, threads);
        sync();
        add_linear_branch(st, q, view, row0, len, g, t, state, lin, bh);
    }
    store_rows(st, out, view, row0, len, g, t);
}

// The key block visited `i`-th by query block `qb`: listed, or all in order.
__device__ __forceinline__ int key_block_at(const uint32_t* block_idx, size_t row, int n_sel, int i) {
    return block_idx ? (int)block_idx[row * n_sel + i] : i;
}

}  // namespace attention
