// CUDA kernels of turbo-attention (sm_80+; built for the GPU's compute capability by build.rs).
//
// Tensors are tokens-first [B, L, H, D] and contiguous, D = 128: element (b, t, h, d) lies at
// ((b·L + t)·H + h)·D + d. One CTA computes one query block of 128 rows of one (batch, head)
// with 8 warps of 16 rows each, walking key blocks of 64 tokens: every key block (dense
// attention) or the ones a block index lists (SLA's sparse branch). Scores and softmax stay in
// f32 registers (never an L×L matrix); Q·Kᵀ and P·V run on tensor cores through `mma.sync`
// (bf16, or int8 for SageSLA's Q·Kᵀ).
//
// The CPU implementations in src/ are the specification; `examples/gpu_check` compares.

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <math_constants.h>
#include <stdint.h>

#include "common.cuh"

#define NEG_INF (-CUDART_INF_F)

namespace {

constexpr int HEAD_DIM = 128;
constexpr int BLOCK_Q = 128;
constexpr int BLOCK_K = 64;
constexpr int WARPS = BLOCK_Q / 16;
constexpr int THREADS = WARPS * 32;
// Shared-memory row pitches, padded by 16 bytes so that the 8 rows a quad of lanes reads fall
// in distinct banks.
constexpr int PITCH_BF16 = HEAD_DIM + 8;
constexpr int PITCH_I8 = HEAD_DIM + 16;
// log2(448): SageSLA exponentiates P̃ against the running max plus this offset, so that P̃
// spans the E4M3 range [0, 448].
constexpr float P_FP8_OFFSET = 8.807355f;

typedef __nv_bfloat16 bf16;
using turbo::mma_s8;

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// The nearest E4M3 value (round to nearest even, saturating), as a float.
__device__ __forceinline__ float round_e4m3(float x) {
    return float(__nv_fp8_e4m3(x));
}

// D[16×8] += A[16×16] · B[16×8], bf16 in, f32 accumulate.
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}


// Four transposed 8×8 bf16 matrices from shared memory: the B operands of two adjacent n-tiles.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const bf16* row_address) {
    uint32_t addr = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Copies `rows` rows of `row_bytes` bytes (a multiple of 16) from global memory, `src_pitch`
// bytes apart, into shared memory `dst_pitch` bytes apart; rows past `rows` of the 64 are zero.
__device__ __forceinline__ void load_key_tile(char* dst, int dst_pitch, const char* src,
                                              size_t src_pitch, int rows, int row_bytes) {
    const int chunks_per_row = row_bytes / 16;
    for (int c = threadIdx.x; c < BLOCK_K * chunks_per_row; c += THREADS) {
        const int r = c / chunks_per_row, offset = (c % chunks_per_row) * 16;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r < rows) v = *reinterpret_cast<const uint4*>(src + r * src_pitch + offset);
        *reinterpret_cast<uint4*>(dst + r * dst_pitch + offset) = v;
    }
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

// One key tile of online softmax: `s` holds base-2 scores (masked keys −∞) of the lane's rows
// over the tile's 64 keys in the mma C layout. Updates the row state, rescales O, and turns
// `s` into the bf16 weights P of the P·V product. `offset` is added to every exponent;
// `fp8_weights` rounds P to E4M3 (the row sums take P before rounding, as SageAttention does).
__device__ __forceinline__ void softmax_tile(RowState& st, float s[BLOCK_K / 8][4], float offset,
                                             bool fp8_weights) {
    for (int r = 0; r < 2; ++r) {
        float tile_max = NEG_INF;
        for (int n = 0; n < BLOCK_K / 8; ++n) tile_max = fmaxf(tile_max, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        const float new_max = fmaxf(st.max[r], quad_max(tile_max));
        const float alpha = exp2f(st.max[r] - new_max);
        float tile_sum = 0.f;
        for (int n = 0; n < BLOCK_K / 8; ++n) {
            for (int i = 2 * r; i < 2 * r + 2; ++i) {
                const float p = exp2f(s[n][i] - new_max + offset);
                tile_sum += p;
                s[n][i] = fp8_weights ? round_e4m3(p) : p;
            }
        }
        st.sum[r] = st.sum[r] * alpha + tile_sum;
        st.max[r] = new_max;
        for (int n = 0; n < HEAD_DIM / 8; ++n) {
            st.o[n][2 * r] *= alpha;
            st.o[n][2 * r + 1] *= alpha;
        }
    }
}

// O += P·V for one key tile: P from the score registers (the C layout of two adjacent n-tiles
// is the A layout of one k-step), V from shared memory through ldmatrix.trans.
__device__ __forceinline__ void accumulate_pv(RowState& st, const float p[BLOCK_K / 8][4],
                                              const bf16* v_tile, int lane) {
    for (int kstep = 0; kstep < BLOCK_K / 16; ++kstep) {
        const uint32_t a[4] = {
            pack_bf16(p[2 * kstep][0], p[2 * kstep][1]),
            pack_bf16(p[2 * kstep][2], p[2 * kstep][3]),
            pack_bf16(p[2 * kstep + 1][0], p[2 * kstep + 1][1]),
            pack_bf16(p[2 * kstep + 1][2], p[2 * kstep + 1][3]),
        };
        // Lane l addresses row (l mod 8) of matrix l/8: keys +8 for odd matrices, d +8 for the
        // upper two.
        const int key = kstep * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        for (int n = 0; n < HEAD_DIM / 8; n += 2) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, v_tile + key * PITCH_BF16 + (n + (lane >> 4)) * 8);
            mma_bf16(st.o[n], a, b[0], b[1]);
            mma_bf16(st.o[n + 1], a, b[2], b[3]);
        }
    }
}

// Scores of one key tile are −∞ past the sequence end.
__device__ __forceinline__ void mask_tail(float s[BLOCK_K / 8][4], int key0, int len, int t) {
    if (key0 + BLOCK_K <= len) return;
    for (int n = 0; n < BLOCK_K / 8; ++n)
        for (int i = 0; i < 4; ++i)
            if (key0 + n * 8 + 2 * t + (i & 1) >= len) s[n][i] = NEG_INF;
}

// Writes O / l (times a per-channel scale when given) for the lane's two rows.
__device__ __forceinline__ void store_rows(const RowState& st, bf16* out, const HeadView& view,
                                           int row0, int len, int g, int t,
                                           const float* channel_scale) {
    // The quad reductions come first: every lane of the warp must take part in the shuffles.
    const float inv_sum[2] = {1.f / quad_sum(st.sum[0]), 1.f / quad_sum(st.sum[1])};
    for (int r = 0; r < 2; ++r) {
        const int row = row0 + g + 8 * r;
        if (row >= len) continue;
        const float inv = inv_sum[r];
        bf16* dst = out + view.base + (size_t)row * view.pitch;
        for (int n = 0; n < HEAD_DIM / 8; ++n) {
            const int d = n * 8 + 2 * t;
            float x0 = st.o[n][2 * r] * inv, x1 = st.o[n][2 * r + 1] * inv;
            if (channel_scale) {
                x0 *= channel_scale[d];
                x1 *= channel_scale[d + 1];
            }
            *reinterpret_cast<uint32_t*>(dst + d) = pack_bf16(x0, x1);
        }
    }
}

// The key block visited `i`-th by query block `qb`: listed, or all in order.
__device__ __forceinline__ int key_block_at(const uint32_t* block_idx, size_t row, int n_sel, int i) {
    return block_idx ? (int)block_idx[row * n_sel + i] : i;
}

}  // namespace

// Block-sparse (or, with block_idx = null, dense) flash attention in bf16: q_len queries over
// kv_len keys (equal for the block-sparse form, SLA being self-attention).
// grid (⌈q_len/128⌉, B·H), 256 threads. block_idx: [B·H, ⌈q_len/128⌉, n_sel] ascending key
// blocks. scale_log2 = log2(e)/√D.
extern "C" __global__ void __launch_bounds__(THREADS)
sparse_attention_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k,
                      const bf16* __restrict__ v, const uint32_t* __restrict__ block_idx,
                      bf16* __restrict__ out, int heads, int q_len, int kv_len, int n_sel,
                      float scale_log2) {
    __shared__ __align__(16) bf16 k_tile[BLOCK_K * PITCH_BF16];
    __shared__ __align__(16) bf16 v_tile[BLOCK_K * PITCH_BF16];
    const int qb = blockIdx.x, bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const HeadView view(bh, heads, q_len), kv_view(bh, heads, kv_len);
    const int row0 = qb * BLOCK_Q + warp * 16;

    // The warp's 16 query rows as A operands, one per 16-wide slice of D.
    uint32_t qf[HEAD_DIM / 16][4];
    for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + 8 * (i & 1), col = kk * 16 + 2 * t + 8 * (i >> 1);
            qf[kk][i] = row < q_len ? *reinterpret_cast<const uint32_t*>(q + view.base + (size_t)row * view.pitch + col) : 0u;
        }
    }

    RowState st;
    st.init();
    const size_t select_row = (size_t)bh * gridDim.x + qb;
    for (int i = 0; i < n_sel; ++i) {
        const int key0 = key_block_at(block_idx, select_row, n_sel, i) * BLOCK_K;
        const int rows = min(BLOCK_K, kv_len - key0);
        __syncthreads();
        load_key_tile((char*)k_tile, PITCH_BF16 * 2, (const char*)(k + kv_view.base + (size_t)key0 * kv_view.pitch),
                      kv_view.pitch * 2, rows, HEAD_DIM * 2);
        load_key_tile((char*)v_tile, PITCH_BF16 * 2, (const char*)(v + kv_view.base + (size_t)key0 * kv_view.pitch),
                      kv_view.pitch * 2, rows, HEAD_DIM * 2);
        __syncthreads();

        float s[BLOCK_K / 8][4];
        for (int n = 0; n < BLOCK_K / 8; ++n) {
            for (int j = 0; j < 4; ++j) s[n][j] = 0.f;
            const bf16* key_row = k_tile + (n * 8 + g) * PITCH_BF16 + 2 * t;
            for (int kk = 0; kk < HEAD_DIM / 16; ++kk) {
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(key_row + kk * 16);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(key_row + kk * 16 + 8);
                mma_bf16(s[n], qf[kk], b0, b1);
            }
            for (int j = 0; j < 4; ++j) s[n][j] *= scale_log2;
        }
        mask_tail(s, key0, kv_len, t);
        softmax_tile(st, s, 0.f, false);
        accumulate_pv(st, s, v_tile, lane);
    }
    store_rows(st, out, view, row0, q_len, g, t, nullptr);
}

// SageSLA's sparse branch: int8 Q·Kᵀ with per-block scales, online softmax in base 2 with
// P̃ = e4m3(exp2(s − m + log2 448)), and P̃·V̂ with V̂ the E4M3 values of V (held as bf16, which
// represents every E4M3 value exactly, so the bf16 product equals the FP8 one), times the
// per-channel V scales at the end.
// q8, k8: int8 [B, L, H, D] (K already smoothed); v8: bf16 [B, L, H, D] holding E4M3 values;
// q_scale: [B·H, ⌈L/128⌉], k_scale: [B·H, ⌈L/64⌉], v_scale: [B·H, D];
// score_scale = log2(e)/√D.
extern "C" __global__ void __launch_bounds__(THREADS)
sparse_attention_sage(const int8_t* __restrict__ q8, const int8_t* __restrict__ k8,
                      const bf16* __restrict__ v8, const float* __restrict__ q_scale,
                      const float* __restrict__ k_scale, const float* __restrict__ v_scale,
                      const uint32_t* __restrict__ block_idx, bf16* __restrict__ out, int heads,
                      int len, int n_sel, float score_scale) {
    __shared__ __align__(16) int8_t k_tile[BLOCK_K * PITCH_I8];
    __shared__ __align__(16) bf16 v_tile[BLOCK_K * PITCH_BF16];
    const int qb = blockIdx.x, bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const HeadView view(bh, heads, len);
    const int row0 = qb * BLOCK_Q + warp * 16;
    const int key_blocks = (len + BLOCK_K - 1) / BLOCK_K;

    // A operands of m16n8k32: per 32-wide slice of D, rows g / g+8, bytes 4t.. and 16+4t..
    uint32_t qf[HEAD_DIM / 32][4];
    for (int kk = 0; kk < HEAD_DIM / 32; ++kk) {
        for (int i = 0; i < 4; ++i) {
            const int row = row0 + g + 8 * (i & 1), col = kk * 32 + 4 * t + 16 * (i >> 1);
            qf[kk][i] = row < len ? *reinterpret_cast<const uint32_t*>(q8 + view.base + (size_t)row * view.pitch + col) : 0u;
        }
    }
    const float q_block_scale = q_scale[(size_t)bh * gridDim.x + qb] * score_scale;

    RowState st;
    st.init();
    const size_t select_row = (size_t)bh * gridDim.x + qb;
    for (int i = 0; i < n_sel; ++i) {
        const int kb = key_block_at(block_idx, select_row, n_sel, i);
        const int key0 = kb * BLOCK_K;
        const int rows = min(BLOCK_K, len - key0);
        __syncthreads();
        load_key_tile((char*)k_tile, PITCH_I8, (const char*)(k8 + view.base + (size_t)key0 * view.pitch),
                      view.pitch, rows, HEAD_DIM);
        load_key_tile((char*)v_tile, PITCH_BF16 * 2, (const char*)(v8 + view.base + (size_t)key0 * view.pitch),
                      view.pitch * 2, rows, HEAD_DIM * 2);
        __syncthreads();

        const float segment_scale = q_block_scale * k_scale[(size_t)bh * key_blocks + kb];
        float s[BLOCK_K / 8][4];
        for (int n = 0; n < BLOCK_K / 8; ++n) {
            int acc[4] = {0, 0, 0, 0};
            const int8_t* key_row = k_tile + (n * 8 + g) * PITCH_I8 + 4 * t;
            for (int kk = 0; kk < HEAD_DIM / 32; ++kk) {
                const uint32_t b0 = *reinterpret_cast<const uint32_t*>(key_row + kk * 32);
                const uint32_t b1 = *reinterpret_cast<const uint32_t*>(key_row + kk * 32 + 16);
                mma_s8(acc, qf[kk], b0, b1);
            }
            for (int j = 0; j < 4; ++j) s[n][j] = (float)acc[j] * segment_scale;
        }
        mask_tail(s, key0, len, t);
        softmax_tile(st, s, P_FP8_OFFSET, true);
        accumulate_pv(st, s, v_tile, lane);
    }
    store_rows(st, out, view, row0, len, g, t, v_scale + (size_t)bh * HEAD_DIM);
}

// The `count` largest of each row of `scores` ([rows, n] f32), ascending by index, ties to the
// lower index. grid (rows), 256 threads, dynamic shared memory n·8 bytes.
extern "C" __global__ void top_blocks(const float* __restrict__ scores, uint32_t* __restrict__ out,
                                      int n, int count) {
    extern __shared__ float shared[];
    float* row = shared;
    int* selected = reinterpret_cast<int*>(shared + n);
    const float* src = scores + (size_t)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = src[i];
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const float x = row[i];
        int rank = 0;
        for (int j = 0; j < n; ++j) rank += (row[j] > x) || (row[j] == x && j < i);
        selected[i] = rank < count;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t* dst = out + (size_t)blockIdx.x * count;
        int written = 0;
        for (int i = 0; i < n && written < count; ++i)
            if (selected[i]) dst[written++] = i;
    }
}


// Symmetric int8 quantisation per block of `block` tokens of each (b, h) of bf16 [B, L, H, D]
// x, after subtracting a per-(b·h, channel) f32 `mean` when given: scale = max|x|/127 + 1e-7,
// q = x/scale rounded half away from zero. grid (⌈L/block⌉, B·H), 256 threads.
extern "C" __global__ void quantize_int8_blocks(const bf16* __restrict__ x, const float* __restrict__ mean,
                                                int8_t* __restrict__ out, float* __restrict__ scales,
                                                int heads, int len, int block) {
    __shared__ float scratch[32];
    const int blk = blockIdx.x, bh = blockIdx.y;
    const HeadView view(bh, heads, len);
    const int first = blk * block, rows = min(block, len - first);
    const float* channel_mean = mean ? mean + (size_t)bh * HEAD_DIM : nullptr;
    auto value = [&](int e) {
        const int row = first + e / HEAD_DIM, d = e % HEAD_DIM;
        const float v = __bfloat162float(x[view.base + (size_t)row * view.pitch + d]);
        return channel_mean ? v - channel_mean[d] : v;
    };
    float amax = 0.f;
    for (int e = threadIdx.x; e < rows * HEAD_DIM; e += blockDim.x) amax = fmaxf(amax, fabsf(value(e)));
    const float scale = turbo::block_max(amax, scratch) / 127.f + 1e-7f;
    for (int e = threadIdx.x; e < rows * HEAD_DIM; e += blockDim.x) {
        const float scaled = value(e) / scale;
        const float q = fminf(fmaxf(truncf(scaled + copysignf(0.5f, scaled)), -127.f), 127.f);
        out[view.base + (size_t)(first + e / HEAD_DIM) * view.pitch + e % HEAD_DIM] = (int8_t)q;
    }
    if (threadIdx.x == 0) scales[(size_t)bh * gridDim.x + blk] = scale;
}

// E4M3 values of bf16 [B, L, H, D] v divided by their per-(b·h, channel) scale, as bf16; a zero
// scale (an all-zero channel) gives zeros. One thread per element.
extern "C" __global__ void quantize_fp8_channels(const bf16* __restrict__ v, const float* __restrict__ scale,
                                                 bf16* __restrict__ out, int heads, int len, size_t total) {
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    const int d = i % HEAD_DIM;
    const size_t token_head = i / HEAD_DIM;
    const int h = token_head % heads;
    const size_t b = token_head / heads / len;
    const float s = scale[(b * heads + h) * HEAD_DIM + d];
    const float q = s > 0.f ? round_e4m3(__bfloat162float(v[i]) / s) : 0.f;
    out[i] = __float2bfloat16(q);
}
