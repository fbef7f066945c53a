// CUDA kernels of turbo-attention (sm_80+; built for the GPU's compute capability by build.rs).
//
// Tensors are tokens-first [B, L, H, D] and contiguous, D = 128: element (b, t, h, d) lies at
// ((b·L + t)·H + h)·D + d. One CTA computes one query block of 128 rows of one (batch, head)
// with 8 warps of 16 rows each, walking key blocks of 64 tokens: every key block (dense
// attention) or the ones a block index lists (SLA's sparse branch). Key and value tiles stream
// through a two-stage cp.async pipeline in dynamic shared memory. Scores and softmax stay in
// f32 registers (never an L×L matrix); Q·Kᵀ and P·V run on tensor cores through `mma.sync`
// (bf16, or int8 for SageSLA's Q·Kᵀ). SLA's linear branch and `proj_l` are the epilogue of the
// same kernel: one more tensor-core product per query block against a per-head D×D state that
// `key_value_stats` gathers in one pass over K and V.
//
// The CPU implementations in src/ are the specification; `examples/gpu_check` compares.

#include "attention.cuh"

namespace {

using namespace attention;
using turbo::cp_async_16;
using turbo::cp_async_commit;
using turbo::cp_async_wait;
using turbo::ldmatrix_x4;
using turbo::ldmatrix_x4_trans;
using turbo::mma_s8;

constexpr int WARPS = BLOCK_Q / 16;
constexpr int THREADS = WARPS * 32;
// Shared-memory row pitch of the int8 key tiles (padded as PITCH_BF16 is).
constexpr int PITCH_I8 = HEAD_DIM + 16;
// Bytes of one key or value tile in shared memory.
constexpr int TILE_BYTES_BF16 = BLOCK_K * PITCH_BF16 * 2;
constexpr int TILE_BYTES_I8 = BLOCK_K * PITCH_I8;
// Dynamic shared memory of the attention kernels: two pipeline stages of a key and a value
// tile (the launchers in src/cuda.rs pass the same sizes). The epilogue reuses it for the
// linear-branch state.
constexpr int STAGE_BYTES_BF16 = 2 * TILE_BYTES_BF16;
constexpr int STAGE_BYTES_SAGE = TILE_BYTES_I8 + TILE_BYTES_BF16;
static_assert(2 * STAGE_BYTES_BF16 >= STATE_BYTES, "the state fits in the pipeline's memory");
static_assert(2 * STAGE_BYTES_SAGE >= STATE_BYTES, "the state fits in the pipeline's memory");

// Copies `rows` rows of `row_bytes` bytes (a multiple of 16) from global memory, `src_pitch`
// bytes apart, into shared memory `dst_pitch` bytes apart (rows past `rows` of the 64 are zero)
// through cp.async: returns at once, the copy lands by the next wait.
__device__ __forceinline__ void load_key_tile_async(char* dst, int dst_pitch, const char* src,
                                                    size_t src_pitch, int rows, int row_bytes) {
    const int chunks_per_row = row_bytes / 16;
    for (int c = threadIdx.x; c < BLOCK_K * chunks_per_row; c += THREADS) {
        const int r = c / chunks_per_row, offset = (c % chunks_per_row) * 16;
        const bool valid = r < rows;
        cp_async_16(dst + r * dst_pitch + offset, src + (valid ? r * src_pitch + offset : 0), valid);
    }
}

// Runs `compute(i, stage)` over key tiles i = 0..n after `load(i, stage)` has filled
// `stage` (0 or 1): tile i + 1 loads while tile i computes.
template <typename Load, typename Compute>
__device__ __forceinline__ void pipelined_tiles(int n, Load load, Compute compute) {
    if (n > 0) load(0, 0);
    cp_async_commit();
    for (int i = 0; i < n; ++i) {
        if (i + 1 < n) {
            load(i + 1, (i + 1) & 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        compute(i, i & 1);
        __syncthreads();  // stage i & 1 is refilled by the next iteration
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


}  // namespace

// Block-sparse (or, with block_idx = null, dense) flash attention in bf16: q_len queries over
// kv_len keys (equal for the block-sparse form, SLA being self-attention), plus SLA's linear
// branch when lin_state is not null.
// grid (⌈q_len/128⌉, B·H), 256 threads, 2·STAGE_BYTES_BF16 bytes of dynamic shared memory.
// block_idx: [B·H, ⌈q_len/128⌉, n_sel] ascending key blocks. scale_log2 = log2(e)/√D.
// lin_state, lin_z, lin_bias: see LinearBranch.
extern "C" __global__ void __launch_bounds__(THREADS)
sparse_attention_bf16(const bf16* __restrict__ q, const bf16* __restrict__ k,
                      const bf16* __restrict__ v, const uint32_t* __restrict__ block_idx,
                      const bf16* __restrict__ lin_state, const float* __restrict__ lin_z,
                      const float* __restrict__ lin_bias, bf16* __restrict__ out, int heads,
                      int q_len, int kv_len, int n_sel, float scale_log2, float lin_eps) {
    extern __shared__ __align__(16) char smem[];
    const int qb = blockIdx.x, bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const HeadView view(bh, heads, q_len), kv_view(bh, heads, kv_len);
    const int row0 = qb * BLOCK_Q + warp * 16;

    uint32_t qf[HEAD_DIM / 16][4];
    load_query_fragments(qf, q, view, row0, q_len, g, t);

    RowState st;
    st.init();
    const size_t select_row = (size_t)bh * gridDim.x + qb;
    auto k_tile = [&](int stage) { return reinterpret_cast<bf16*>(smem + stage * STAGE_BYTES_BF16); };
    auto v_tile = [&](int stage) { return reinterpret_cast<bf16*>(smem + stage * STAGE_BYTES_BF16 + TILE_BYTES_BF16); };
    auto load = [&](int i, int stage) {
        const int key0 = key_block_at(block_idx, select_row, n_sel, i) * BLOCK_K;
        const int rows = min(BLOCK_K, kv_len - key0);
        const size_t offset = kv_view.base + (size_t)key0 * kv_view.pitch;
        load_key_tile_async((char*)k_tile(stage), PITCH_BF16 * 2, (const char*)(k + offset), kv_view.pitch * 2, rows, HEAD_DIM * 2);
        load_key_tile_async((char*)v_tile(stage), PITCH_BF16 * 2, (const char*)(v + offset), kv_view.pitch * 2, rows, HEAD_DIM * 2);
    };
    auto compute = [&](int i, int stage) {
        const int key0 = key_block_at(block_idx, select_row, n_sel, i) * BLOCK_K;
        float s[BLOCK_K / 8][4];
        for (int n = 0; n < BLOCK_K / 8; ++n) {
            for (int j = 0; j < 4; ++j) s[n][j] = 0.f;
            // Keys n·8.. as B operands of two 16-wide slices of D per ldmatrix.
            const bf16* key_rows = k_tile(stage) + (n * 8 + (lane & 7)) * PITCH_BF16 + 8 * (lane >> 3);
            for (int kk = 0; kk < HEAD_DIM / 16; kk += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, key_rows + kk * 16);
                mma_bf16(s[n], qf[kk], b[0], b[1]);
                mma_bf16(s[n], qf[kk + 1], b[2], b[3]);
            }
        }
        mask_tail(s, key0, kv_len, t);
        softmax_tile(st, s, scale_log2, 0.f, false);
        accumulate_pv(st, s, v_tile(stage), lane);
    };
    pipelined_tiles(n_sel, load, compute);
    const LinearBranch lin{lin_state, lin_z, lin_bias, lin_eps};
    finish_rows(st, q, out, view, row0, q_len, g, t, nullptr, lin, bh, smem, threadIdx.x, THREADS,
                [] { __syncthreads(); });
}

// SageSLA's sparse branch: int8 Q·Kᵀ with per-block scales, online softmax in base 2 with
// P̃ = e4m3(exp2(s − m + log2 448)), and P̃·V̂ with V̂ the E4M3 values of V (held as bf16, which
// represents every E4M3 value exactly, so the bf16 product equals the FP8 one), times the
// per-channel V scales at the end; then SLA's linear branch from the bf16 `q`. The query
// block is quantised to int8 here (scale max|q|/127 + 1e-7 over the block).
// q: bf16 [B, L, H, D]; k8: int8 [B, L, H, D] (K already smoothed); v8: bf16 [B, L, H, D]
// holding E4M3 values; k_scale: [B·H, ⌈L/64⌉], v_scale: [B·H, D] (`quantize_keys_values`);
// score_scale = log2(e)/√D. 2·STAGE_BYTES_SAGE bytes of dynamic shared memory.
extern "C" __global__ void __launch_bounds__(THREADS)
sparse_attention_sage(const bf16* __restrict__ q, const int8_t* __restrict__ k8,
                      const bf16* __restrict__ v8, const float* __restrict__ k_scale,
                      const float* __restrict__ v_scale, const uint32_t* __restrict__ block_idx,
                      const bf16* __restrict__ lin_state, const float* __restrict__ lin_z,
                      const float* __restrict__ lin_bias, bf16* __restrict__ out, int heads,
                      int len, int n_sel, float score_scale, float lin_eps) {
    extern __shared__ __align__(16) char smem[];
    __shared__ float scratch[32];
    const int qb = blockIdx.x, bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const HeadView view(bh, heads, len);
    const int row0 = qb * BLOCK_Q + warp * 16;
    const int key_blocks = (len + BLOCK_K - 1) / BLOCK_K;

    uint32_t qf[HEAD_DIM / 32][4];
    const float q_scale = quantize_query_fragments(qf, q, view, row0, len, g, t,
                                                   [&](float x) { return turbo::block_max(x, scratch); });
    const float q_block_scale = q_scale * score_scale;

    RowState st;
    st.init();
    const size_t select_row = (size_t)bh * gridDim.x + qb;
    auto k_tile = [&](int stage) { return reinterpret_cast<int8_t*>(smem + stage * STAGE_BYTES_SAGE); };
    auto v_tile = [&](int stage) { return reinterpret_cast<bf16*>(smem + stage * STAGE_BYTES_SAGE + TILE_BYTES_I8); };
    auto load = [&](int i, int stage) {
        const int key0 = key_block_at(block_idx, select_row, n_sel, i) * BLOCK_K;
        const int rows = min(BLOCK_K, len - key0);
        const size_t offset = view.base + (size_t)key0 * view.pitch;
        load_key_tile_async((char*)k_tile(stage), PITCH_I8, (const char*)(k8 + offset), view.pitch, rows, HEAD_DIM);
        load_key_tile_async((char*)v_tile(stage), PITCH_BF16 * 2, (const char*)(v8 + offset), view.pitch * 2, rows, HEAD_DIM * 2);
    };
    auto compute = [&](int i, int stage) {
        const int kb = key_block_at(block_idx, select_row, n_sel, i);
        const int key0 = kb * BLOCK_K;
        const float segment_scale = q_block_scale * k_scale[(size_t)bh * key_blocks + kb];
        float s[BLOCK_K / 8][4];
        for (int n = 0; n < BLOCK_K / 8; ++n) {
            int acc[4] = {0, 0, 0, 0};
            // Keys n·8.. as B operands of two 32-byte slices of D per ldmatrix.
            const int8_t* key_rows = k_tile(stage) + (n * 8 + (lane & 7)) * PITCH_I8 + 16 * (lane >> 3);
            for (int kk = 0; kk < HEAD_DIM / 32; kk += 2) {
                uint32_t b[4];
                ldmatrix_x4(b, key_rows + kk * 32);
                mma_s8(acc, qf[kk], b[0], b[1]);
                mma_s8(acc, qf[kk + 1], b[2], b[3]);
            }
            for (int j = 0; j < 4; ++j) s[n][j] = (float)acc[j];
        }
        mask_tail(s, key0, len, t);
        softmax_tile(st, s, segment_scale, P_FP8_OFFSET, true);
        accumulate_pv(st, s, v_tile(stage), lane);
    };
    pipelined_tiles(n_sel, load, compute);
    const LinearBranch lin{lin_state, lin_z, lin_bias, lin_eps};
    finish_rows(st, q, out, view, row0, len, g, t, v_scale + (size_t)bh * HEAD_DIM, lin, bh, smem, threadIdx.x, THREADS,
                [] { __syncthreads(); });
}

// One pass over K and V for SLA, per (b, h) and chunk of `blocks_per_chunk` key blocks:
// - key_block_means [B·H, ⌈L/64⌉, D]: the mean of each key block (the last over its real length);
// - key_sums [B·H, C, D]: the chunk's sum of keys (for mean(K));
// - state [B·H, C, D, D]: the chunk's Σ φ(k)ᵀ v, φ = softmax over D, on tensor cores
//   (φ(k) and v in bf16, f32 accumulation);
// - z [B·H, C, D]: the chunk's Σ φ(k) in f32;
// - v_amax [B·H, C, D]: the chunk's per-channel max |v|.
// grid (C = ⌈⌈L/64⌉/blocks_per_chunk⌉, B·H), 256 threads.
extern "C" __global__ void __launch_bounds__(THREADS, 2)
key_value_stats(const bf16* __restrict__ k, const bf16* __restrict__ v,
                float* __restrict__ key_block_means, float* __restrict__ key_sums,
                float* __restrict__ state, float* __restrict__ z, float* __restrict__ v_amax,
                int heads, int len, int blocks_per_chunk) {
    __shared__ __align__(16) bf16 k_tile[BLOCK_K * PITCH_BF16];  // K, then φ(K) in place
    __shared__ __align__(16) bf16 v_tile[BLOCK_K * PITCH_BF16];
    __shared__ float z_scratch[WARPS][HEAD_DIM];
    const int chunk = blockIdx.x, chunks = gridDim.x, bh = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
    const HeadView view(bh, heads, len);
    const int key_blocks = (len + BLOCK_K - 1) / BLOCK_K;
    // Threads 0..127 sum the keys of channel threadIdx.x, 128..255 take V's max of channel
    // threadIdx.x − 128.
    const int channel = threadIdx.x % HEAD_DIM;
    const bool sums_keys = threadIdx.x < HEAD_DIM;
    float channel_acc = 0.f;
    float z_acc[4] = {0.f, 0.f, 0.f, 0.f};  // channels 4·lane.., over the warp's rows
    float acc[HEAD_DIM / 8][4];              // rows 16·warp.. of the state, all D columns
    for (int n = 0; n < HEAD_DIM / 8; ++n)
        for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;

    for (int kb = chunk * blocks_per_chunk; kb < min(key_blocks, (chunk + 1) * blocks_per_chunk); ++kb) {
        const int key0 = kb * BLOCK_K, rows = min(BLOCK_K, len - key0);
        const size_t offset = view.base + (size_t)key0 * view.pitch;
        __syncthreads();
        // All of a thread's copies in flight at once (cp.async), not one load after another.
        load_key_tile_async((char*)k_tile, PITCH_BF16 * 2, (const char*)(k + offset), view.pitch * 2, rows, HEAD_DIM * 2);
        load_key_tile_async((char*)v_tile, PITCH_BF16 * 2, (const char*)(v + offset), view.pitch * 2, rows, HEAD_DIM * 2);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
        // Four partial sums (maxima) so that the shared-memory loads of a column overlap.
        const bf16* column = (sums_keys ? k_tile : v_tile) + channel;
        auto fold = [&](float acc, int r) {
            const float x = __bfloat162float(column[r * PITCH_BF16]);
            return sums_keys ? acc + x : fmaxf(acc, fabsf(x));
        };
        float p0 = 0.f, p1 = 0.f, p2 = 0.f, p3 = 0.f;
        int r = 0;
        for (; r + 4 <= rows; r += 4) {
            p0 = fold(p0, r);
            p1 = fold(p1, r + 1);
            p2 = fold(p2, r + 2);
            p3 = fold(p3, r + 3);
        }
        for (; r < rows; ++r) p0 = fold(p0, r);
        const float block_acc = sums_keys ? (p0 + p1) + (p2 + p3) : fmaxf(fmaxf(p0, p1), fmaxf(p2, p3));
        if (sums_keys) {
            key_block_means[((size_t)bh * key_blocks + kb) * HEAD_DIM + channel] = block_acc / rows;
            channel_acc += block_acc;
        } else {
            channel_acc = fmaxf(channel_acc, block_acc);
        }
        __syncthreads();  // the raw keys are read; φ(K) overwrites them

        // φ of the warp's rows, all of them at once so that their shuffle reductions overlap.
        constexpr int ROWS_PER_WARP = BLOCK_K / WARPS;
        const int first_row = warp * ROWS_PER_WARP;
        float x[ROWS_PER_WARP][4], row_max[ROWS_PER_WARP], row_sum[ROWS_PER_WARP];
#pragma unroll
        for (int i = 0; i < ROWS_PER_WARP; ++i) {
            const bf16* row = k_tile + (first_row + i) * PITCH_BF16 + 4 * lane;
            for (int j = 0; j < 4; ++j) x[i][j] = __bfloat162float(row[j]);
            row_max[i] = fmaxf(fmaxf(x[i][0], x[i][1]), fmaxf(x[i][2], x[i][3]));
        }
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int i = 0; i < ROWS_PER_WARP; ++i)
                row_max[i] = fmaxf(row_max[i], __shfl_xor_sync(0xffffffff, row_max[i], o));
#pragma unroll
        for (int i = 0; i < ROWS_PER_WARP; ++i) {
            row_sum[i] = 0.f;
            for (int j = 0; j < 4; ++j) {
                x[i][j] = __expf(x[i][j] - row_max[i]);
                row_sum[i] += x[i][j];
            }
        }
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int i = 0; i < ROWS_PER_WARP; ++i) row_sum[i] += __shfl_xor_sync(0xffffffff, row_sum[i], o);
#pragma unroll
        for (int i = 0; i < ROWS_PER_WARP; ++i) {
            const bool inside = first_row + i < rows;  // the same for the whole warp
            bf16* row = k_tile + (first_row + i) * PITCH_BF16 + 4 * lane;
            for (int j = 0; j < 4; ++j) {
                const float phi = inside ? x[i][j] / row_sum[i] : 0.f;
                z_acc[j] += phi;
                row[j] = __float2bfloat16(phi);  // zero past the end
            }
        }
        __syncthreads();

        // state rows 16·warp.. += φ(K)ᵀ·V: A = φ(K)ᵀ by transposed loads of φ(K)'s rows.
        for (int kstep = 0; kstep < BLOCK_K / 16; ++kstep) {
            uint32_t a[4];
            const int a_key = kstep * 16 + (lane & 7) + 8 * (lane >> 4);
            ldmatrix_x4_trans(a, k_tile + a_key * PITCH_BF16 + warp * 16 + 8 * ((lane >> 3) & 1));
            const int b_key = kstep * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
            for (int n = 0; n < HEAD_DIM / 8; n += 2) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, v_tile + b_key * PITCH_BF16 + (n + (lane >> 4)) * 8);
                mma_bf16(acc[n], a, b[0], b[1]);
                mma_bf16(acc[n + 1], a, b[2], b[3]);
            }
        }
    }

    const size_t part = (size_t)bh * chunks + chunk;
    float* state_rows = state + part * HEAD_DIM * HEAD_DIM;
    for (int n = 0; n < HEAD_DIM / 8; ++n) {
        for (int i = 0; i < 4; ++i) {
            const int row = warp * 16 + g + 8 * (i >> 1), col = n * 8 + 2 * t + (i & 1);
            state_rows[row * HEAD_DIM + col] = acc[n][i];
        }
    }
    for (int j = 0; j < 4; ++j) z_scratch[warp][4 * lane + j] = z_acc[j];
    (sums_keys ? key_sums : v_amax)[part * HEAD_DIM + channel] = channel_acc;
    __syncthreads();
    if (threadIdx.x < HEAD_DIM) {
        float total = 0.f;
        for (int w = 0; w < WARPS; ++w) total += z_scratch[w][threadIdx.x];
        z[part * HEAD_DIM + threadIdx.x] = total;
    }
}

// out[b][e] = Σ_c partial[b][c][e] (or the max with `take_max`): the per-chunk results of
// `key_value_stats` reduced in chunk order. partial [batches, chunks, n]; one thread per
// (b, e); grid (⌈n/256⌉, batches), 256 threads.
extern "C" __global__ void __launch_bounds__(THREADS)
reduce_chunks(const float* __restrict__ partial, float* __restrict__ out, int chunks, int n,
              int take_max) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    const float* src = partial + (size_t)blockIdx.y * chunks * n + e;
    float acc = take_max ? src[0] : 0.f;
    for (int c = take_max ? 1 : 0; c < chunks; ++c)
        acc = take_max ? fmaxf(acc, src[(size_t)c * n]) : acc + src[(size_t)c * n];
    out[(size_t)blockIdx.y * n + e] = acc;
}

// Mean over each block of `block` tokens of bf16 [B, L, H, D] x, per (b, h): out
// [B·H, ⌈L/block⌉, D] f32, the last block over its real length. grid (⌈L/block⌉, B·H), 256
// threads.
extern "C" __global__ void __launch_bounds__(THREADS)
block_means(const bf16* __restrict__ x, float* __restrict__ out, int heads, int len, int block) {
    __shared__ float partial[THREADS];
    const int blk = blockIdx.x, bh = blockIdx.y;
    const HeadView view(bh, heads, len);
    const int first = blk * block, rows = min(block, len - first);
    const int channel = threadIdx.x % HEAD_DIM, parity = threadIdx.x / HEAD_DIM;
    float sum = 0.f;
    for (int r = parity; r < rows; r += THREADS / HEAD_DIM)
        sum += __bfloat162float(x[view.base + (size_t)(first + r) * view.pitch + channel]);
    partial[threadIdx.x] = sum;
    __syncthreads();
    if (threadIdx.x < HEAD_DIM)
        out[((size_t)bh * gridDim.x + blk) * HEAD_DIM + channel] =
            (partial[threadIdx.x] + partial[threadIdx.x + HEAD_DIM]) / rows;
}

namespace {

// Unsigned integers in the order of the floats they come from (scores are never NaN).
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t bits = __float_as_uint(x);
    return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

// Exclusive prefix sum of one count per thread, in thread order, over the CTA (THREADS
// threads); `total` receives the sum. `scratch` holds WARPS ints of shared memory.
__device__ __forceinline__ int block_exclusive_scan(int x, int* scratch, int& total) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    int inclusive = x;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffff, inclusive, o);
        if (lane >= o) inclusive += y;
    }
    __syncthreads();  // the previous scan's readers are done with scratch
    if (lane == 31) scratch[warp] = inclusive;
    __syncthreads();
    int before = 0;
    total = 0;
    for (int w = 0; w < WARPS; ++w) {
        before += w < warp ? scratch[w] : 0;
        total += scratch[w];
    }
    return before + inclusive - x;
}

}  // namespace

// The `count` largest of each row of `scores` ([rows, n] f32), ascending by index, ties to the
// lower index. The count-th largest value is found bit by bit (a radix select: 32 CTA-wide
// counts), then each thread compacts its own run of indices. grid (rows), 256 threads,
// dynamic shared memory n·4 bytes.
extern "C" __global__ void __launch_bounds__(THREADS)
top_blocks(const float* __restrict__ scores, uint32_t* __restrict__ out, int n, int count) {
    extern __shared__ uint32_t keys[];
    __shared__ int scratch[WARPS];
    const float* src = scores + (size_t)blockIdx.x * n;
    for (int i = threadIdx.x; i < n; i += THREADS) keys[i] = order_key(src[i]);
    __syncthreads();

    // The largest threshold with at least `count` keys at or above it: the count-th key.
    uint32_t threshold = 0;
    for (int bit = 31; bit >= 0; --bit) {
        const uint32_t candidate = threshold | (1u << bit);
        int at_or_above = 0;
        for (int base = 0; base < n; base += THREADS) {
            const int i = base + threadIdx.x;
            at_or_above += __syncthreads_count(i < n && keys[i] >= candidate);
        }
        if (at_or_above >= count) threshold = candidate;
    }

    // Keys above the threshold are in; ties at it go by ascending index until `count`.
    const int per_thread = (n + THREADS - 1) / THREADS;
    const int first = min(n, threadIdx.x * per_thread), last = min(n, first + per_thread);
    int above = 0, ties = 0;
    for (int i = first; i < last; ++i) {
        above += keys[i] > threshold;
        ties += keys[i] == threshold;
    }
    int total_above, total_ties;
    block_exclusive_scan(above, scratch, total_above);
    int tie_rank = block_exclusive_scan(ties, scratch, total_ties);
    const int ties_taken = count - total_above;
    int selected = 0;
    for (int i = first; i < last; ++i) {
        if (keys[i] > threshold) ++selected;
        else if (keys[i] == threshold && tie_rank++ < ties_taken) ++selected;
    }
    int total_selected;
    int position = block_exclusive_scan(selected, scratch, total_selected);
    tie_rank -= ties;  // back to this thread's first tie
    uint32_t* dst = out + (size_t)blockIdx.x * count;
    for (int i = first; i < last; ++i) {
        if (keys[i] > threshold) dst[position++] = i;
        else if (keys[i] == threshold && tie_rank++ < ties_taken) dst[position++] = i;
    }
}

// SageSLA's key and value operands, per key block of 64 tokens of (b, h): K − mean(K) in
// int8 with the block's scale max|·|/127 + 1e-7 (k_scale [B·H, ⌈L/64⌉]), and V as the E4M3
// values of v / v_scale[channel], held in bf16 (zeros where the scale is zero: an all-zero
// channel). k_mean, v_scale: [B·H, D] f32. grid (⌈L/64⌉, B·H), 256 threads: a warp per row,
// four channels a lane.
extern "C" __global__ void __launch_bounds__(THREADS)
quantize_keys_values(const bf16* __restrict__ k, const bf16* __restrict__ v,
                     const float* __restrict__ k_mean, const float* __restrict__ v_scale,
                     int8_t* __restrict__ k8, bf16* __restrict__ v8, float* __restrict__ k_scale,
                     int heads, int len) {
    __shared__ float scratch[32];
    constexpr int ROWS_PER_WARP = BLOCK_K / WARPS;
    const int kb = blockIdx.x, bh = blockIdx.y;
    const int warp = threadIdx.x / 32, d = (threadIdx.x % 32) * 4;
    const HeadView view(bh, heads, len);
    const int key0 = kb * BLOCK_K, rows = min(BLOCK_K, len - key0);
    auto offset = [&](int j) { return view.base + (size_t)(key0 + warp + WARPS * j) * view.pitch + d; };
    auto valid = [&](int j) { return warp + WARPS * j < rows; };

    float keys[ROWS_PER_WARP][4];
    float amax = 0.f;
    #pragma unroll
    for (int j = 0; j < ROWS_PER_WARP; ++j) {
        load_bf16x4(keys[j], valid(j) ? k + offset(j) : nullptr);
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
            keys[j][c] = valid(j) ? keys[j][c] - k_mean[(size_t)bh * HEAD_DIM + d + c] : 0.f;
            amax = fmaxf(amax, fabsf(keys[j][c]));
        }
    }
    const float scale = turbo::block_max(amax, scratch) / 127.f + 1e-7f;
    #pragma unroll
    for (int j = 0; j < ROWS_PER_WARP; ++j)
        if (valid(j)) *reinterpret_cast<uint32_t*>(k8 + offset(j)) = quantize_int8x4(keys[j], scale);
    if (threadIdx.x == 0) k_scale[(size_t)bh * gridDim.x + kb] = scale;

    #pragma unroll

    for (int j = 0; j < ROWS_PER_WARP; ++j) {
        if (!valid(j)) continue;
        float values[4];
        load_bf16x4(values, v + offset(j));
        float e4m3[4];
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
            const float scale_c = v_scale[(size_t)bh * HEAD_DIM + d + c];
            e4m3[c] = scale_c > 0.f ? round_e4m3(values[c] / scale_c) : 0.f;
        }
        *reinterpret_cast<uint2*>(v8 + offset(j)) =
            make_uint2(pack_bf16(e4m3[0], e4m3[1]), pack_bf16(e4m3[2], e4m3[3]));
    }
}
