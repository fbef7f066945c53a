// The Wan VAE's stride-1 convolutions on Hopper tensor cores (sm_90a only): an implicit GEMM
// on `wgmma` fed by TMA, with the causal conv3d's time windows and the spatial padding both
// read in place. conv.cu's mma.sync kernel and turbo-models' CPU code are the specification.
//
// The GEMM is D[positions × O] = A[positions × K] · B[O × K]ᵀ with K = (frame of the window,
// ky, kx, channel): A is the input in channels-last layout ([images, frames, H, W, C], written
// by conv.cu's `channels_last_bf16`: a causal layer's remembered frames, then the chunk's),
// B the weight reordered to [O, kt, k, k, C_pad] (channels zero-padded to a multiple of the
// step's, 64 or 32: see `Step`). One k step is one row of taps (frame i, ky; every kx) and the
// step's channels: the A tile is a TMA box of those channels × (64 + k − 1) columns × 4 rows ×
// 1 frame at the row's shifted coordinates, so the spatial padding and the causal front
// padding (negative or past-the-edge coordinates) read as TMA's zero fill and neither a padded
// copy nor an im2col matrix exists; tap kx's operand is that box from column kx on (a
// descriptor kx rows further: the swizzle is a function of the shared-memory address, so any
// row may start a matrix), which reads the input once per row of taps instead of once per
// tap. The B tiles are one box of the step's channels × 96 outputs per tap. All land in the
// 128-byte (64-channel steps) or 64-byte (32-channel steps) swizzle: K-major 8-row atoms, as
// wgmma reads them.
//
// One CTA per 256 positions (4 rows × 64 columns of the output) × 96 output channels of one
// window, three warpgroups: warpgroup 0's first thread is the producer, streaming k steps into a
// STAGES-deep ring (a `full` mbarrier per stage completes when its boxes have landed, an
// `empty` one when both consumers have read it); warpgroups 1 and 2 each multiply two rows of
// 64 positions against the 96 channels (the weight tiles are read once for 256 positions),
// keeping one step's wgmmas in flight while the next is issued; the epilogue stages the tile
// (plus the bias) in shared memory and writes it NCHW in runs of 8 positions of a channel,
// adding a residual where the layer has one.

#include <cuda_bf16.h>
#include <stdint.h>

#include "common.cuh"
#include "sm90.cuh"

namespace {

using namespace sm90;
using turbo::shared_address;
typedef __nv_bfloat16 bf16;

constexpr int BOX_W = 64;                    // output columns per tile
constexpr int BOX_H = 4;                     // output rows per tile
constexpr int CONSUMER_ROWS = BOX_H / 2;     // output rows per consumer warpgroup
constexpr int TILE_M = BOX_W * BOX_H;        // positions per CTA
constexpr int TILE_N = 96;                   // output channels per CTA
constexpr int MAX_K = 3;                     // taps per row: 1×1 and 3×3 kernels
constexpr int SMEM_ALIGN = 1024;             // stages start on 128-byte-swizzle atoms
constexpr int BARRIER_BYTES = 128;
constexpr int K16_BYTES = 32;                // one k16 slice of a row

// What the input channels per k step decide: 64 (128-byte rows in the 128-byte swizzle) for
// layers of a multiple of 64 channels; 32 (64-byte rows in the 64-byte swizzle) for the rest,
// so that the 96-channel layers take three steps instead of two with 32 zero channels.
template <int CHANNELS>
struct Step {
    static constexpr int STEP_C = CHANNELS;
    static constexpr int ROW_BYTES = CHANNELS * 2;  // one position's channels of a step
    static constexpr uint32_t SWIZZLE = CHANNELS == 64 ? 1 : 2;  // descriptor layout type
    static constexpr uint32_t ATOM_BYTES = 8 * ROW_BYTES;       // 8 rows: the swizzle repeat
    // The A box: 4 rows of 64 + k − 1 columns (room for k = 3), rounded up to whole atoms.
    static constexpr int A_BYTES =
        (BOX_H * (BOX_W + MAX_K - 1) * ROW_BYTES + SMEM_ALIGN - 1) / SMEM_ALIGN * SMEM_ALIGN;
    static constexpr int B_BYTES = TILE_N * ROW_BYTES;  // one tap's weights
    static constexpr int STAGE_BYTES = A_BYTES + MAX_K * B_BYTES;
    static constexpr int STAGES = CHANNELS == 64 ? 3 : 5;
    static constexpr int SMEM_BYTES = BARRIER_BYTES + SMEM_ALIGN + STAGES * STAGE_BYTES;
    static_assert(B_BYTES % SMEM_ALIGN == 0 && STAGE_BYTES % SMEM_ALIGN == 0,
                  "every tile starts on a swizzle-atom boundary");
    static_assert(2 * 8 * STAGES <= BARRIER_BYTES, "a full and an empty mbarrier per stage");
};
using Step64 = Step<64>;
using Step32 = Step<32>;
static_assert(Step64::SMEM_BYTES == 208 * 1024 + 128, "turbo-models' conv.rs launches with this");
static_assert(Step32::SMEM_BYTES == 176 * 1024 + 128, "turbo-models' conv.rs launches with this");
constexpr int THREADS = 3 * 128;
constexpr int CONSUMER_THREADS = 2 * 128;

// D[64×96] += A[64×16]·B[96×16]ᵀ, bf16 in, f32 accumulate; A (positions × channels) and B (output
// channels × channels) K-major in shared memory (descriptors).
__device__ __forceinline__ void wgmma_m64n96k16(float d[48], uint64_t a, uint64_t b) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %50, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n96k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}, %48, %49, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47])
        : "l"(a), "l"(b), "r"(1));
}

// Where a CTA works: its window's first input frame, its output tile, its k steps.
struct ConvTile {
    int image;       // the input image (5th coordinate) the window belongs to
    int base_frame;  // first frame of the window in its image (negative: front zeros)
    int window;      // index of the window among all of the launch (its output image)
    int x0, y0, o0;  // first output column, row and channel
};

struct ConvDims {
    int front_zeros, windows_per_image, time_stride, window_frames, ksize, pad;
    int channel_steps;  // C_pad / the step's channels
    int out_h, out_w;
    int stored_channels;  // output channels written: the first of the weight's (padded) ones
    int tiles_x;
};

__device__ __forceinline__ ConvTile conv_tile(const ConvDims& d) {
    const int image = blockIdx.z / d.windows_per_image, t = blockIdx.z % d.windows_per_image;
    return {image, t * d.time_stride - d.front_zeros, (int)blockIdx.z,
            (int)(blockIdx.x % d.tiles_x) * BOX_W, (int)(blockIdx.x / d.tiles_x) * BOX_H,
            (int)blockIdx.y * TILE_N};
}

// The producer: k step s (a row of taps) into stage s % STAGES once both consumers are done
// with the step that was there (its `empty` phase), then the input box and one weight box per
// tap, counted on the stage's `full` barrier.
template <typename L>
__device__ void produce(const CUtensorMap& x_map, const CUtensorMap& w_map, const ConvDims& d,
                        const ConvTile& tile, uint32_t smem_base, uint32_t full_bars,
                        uint32_t empty_bars, int steps) {
    const int box_bytes = BOX_H * (BOX_W + d.ksize - 1) * L::ROW_BYTES;
    for (int s = 0; s < steps; ++s) {
        const int stage = s % L::STAGES, use = s / L::STAGES;
        const int channel_step = s % d.channel_steps, tap_row = s / d.channel_steps;
        const int frame = tap_row / d.ksize, ky = tap_row % d.ksize;
        if (use > 0) mbarrier_wait(empty_bars + 8 * stage, (use - 1) & 1);
        const uint32_t dst = smem_base + stage * L::STAGE_BYTES, bar = full_bars + 8 * stage;
        mbarrier_arrive_expect_tx(bar, box_bytes + d.ksize * L::B_BYTES);
        tma_load_5d(dst, &x_map, channel_step * L::STEP_C, tile.x0 - d.pad,
                    tile.y0 + ky - d.pad, tile.base_frame + frame, tile.image, bar);
        for (int kx = 0; kx < d.ksize; ++kx) {
            const int tap = tap_row * d.ksize + kx;
            tma_load_2d(dst + L::A_BYTES + kx * L::B_BYTES, &w_map,
                        (tap * d.channel_steps + channel_step) * L::STEP_C, tile.o0, bar);
        }
    }
}

// One consumer's CONSUMER_ROWS output rows of 64 positions (rows consumer · CONSUMER_ROWS on)
// × 96 channels, an accumulator set per row: step s's wgmmas are issued before step s − 1's
// are waited for, so the tensor cores always have the next step queued. Tap kx reads the
// box's rows from column kx on. KSIZE is a template argument so that the taps' wgmmas unroll
// into one batch (a loop would make ptxas fence the accumulators between them).
template <typename L, int KSIZE>
__device__ void consume(float (&acc)[CONSUMER_ROWS][48], int consumer, uint32_t smem_base,
                        uint32_t full_bars, uint32_t empty_bars, int steps) {
    constexpr int box_w = BOX_W + KSIZE - 1;
    const auto descriptor = [](uint32_t address) {
        return smem_descriptor(address, 16, L::ATOM_BYTES, L::SWIZZLE);
    };
    for (int s = 0; s < steps; ++s) {
        const int stage = s % L::STAGES;
        const uint32_t stage_base = smem_base + stage * L::STAGE_BYTES;
        const uint32_t a_rows = stage_base + consumer * CONSUMER_ROWS * box_w * L::ROW_BYTES;
        const uint32_t b_taps = stage_base + L::A_BYTES;
        mbarrier_wait(full_bars + 8 * stage, (s / L::STAGES) & 1);
#pragma unroll
        for (int r = 0; r < CONSUMER_ROWS; ++r) fence_registers<48>(acc[r]);
        wgmma_fence();
#pragma unroll
        for (int kx = 0; kx < KSIZE; ++kx) {
            const uint32_t b = b_taps + kx * L::B_BYTES;
#pragma unroll
            for (int r = 0; r < CONSUMER_ROWS; ++r) {
                const uint32_t a = a_rows + (r * box_w + kx) * L::ROW_BYTES;
#pragma unroll
                for (int k = 0; k < L::STEP_C / 16; ++k)
                    wgmma_m64n96k16(acc[r], descriptor(a + k * K16_BYTES),
                                    descriptor(b + k * K16_BYTES));
            }
        }
        wgmma_commit();
        wgmma_wait<1>();
#pragma unroll
        for (int r = 0; r < CONSUMER_ROWS; ++r) fence_registers<48>(acc[r]);
        if (s > 0) mbarrier_arrive(empty_bars + 8 * ((s - 1) % L::STAGES));
    }
    wgmma_wait<0>();
#pragma unroll
    for (int r = 0; r < CONSUMER_ROWS; ++r) fence_registers<48>(acc[r]);
}

// The output tile in shared memory, f32 [TILE_N channels][TILE_M positions], rows padded by 4
// floats: the accumulators' writes (8 positions × 4 channel pairs a warp instruction) then fall
// in 32 distinct banks. It reuses the stages' memory once both consumers are done with them.
constexpr int OUT_PITCH = TILE_M + 4;
static_assert(TILE_N * OUT_PITCH * 4 <= Step64::STAGES * Step64::STAGE_BYTES &&
                  TILE_N * OUT_PITCH * 4 <= Step32::STAGES * Step32::STAGE_BYTES,
              "the output tile fits the stages");
// Named barrier of the two consumer warpgroups (0 is __syncthreads').
constexpr int CONSUMERS_BARRIER = 1;

// Accumulator layout of m64nNk16: warp w of the warpgroup holds rows 16w..16w+15; for n8
// block j, registers 4j, 4j+1 are (row g, cols 8j + 2t, +1) and 4j+2, 4j+3 row g + 8. Row r
// of the tile is output position (y0 + r / 64, x0 + r % 64). Writes acc + bias into the tile.
__device__ void stage_output(const float (&acc)[CONSUMER_ROWS][48], int consumer,
                             const ConvTile& tile, const float* __restrict__ bias,
                             float* out_tile) {
    const int lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int r = 0; r < CONSUMER_ROWS; ++r) {
        const int warp_row = ((threadIdx.x % 128) / 32) * 16 + g;
        const int first_row = (consumer * CONSUMER_ROWS + r) * 64 + warp_row;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int row = first_row + 8 * half;
#pragma unroll
            for (int j = 0; j < TILE_N / 8; ++j) {
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int o = 8 * j + 2 * t + e;
                    out_tile[o * OUT_PITCH + row] =
                        acc[r][4 * j + 2 * half + e] + bias[tile.o0 + o];
                }
            }
        }
    }
}

// The staged tile to NCHW, plus a residual (laid out as the output; null for none) before the
// one rounding to bf16: each thread takes runs of 8 positions of one channel's row, so a
// channel's 64-column row is written (and its residual read) as 128 contiguous bytes, in
// 16-byte vectors where the width and the addresses allow.
__device__ void store_output(const float* out_tile, int consumer_thread, const ConvDims& d,
                             const ConvTile& tile, const bf16* __restrict__ residual,
                             bf16* __restrict__ out) {
    constexpr int RUNS_PER_ROW = BOX_W / 8, RUNS_PER_CHANNEL = BOX_H * RUNS_PER_ROW;
    const int positions = d.out_h * d.out_w;
    const size_t image = (size_t)tile.window * d.stored_channels * positions;
    const bool vectors = d.out_w % 8 == 0 && (reinterpret_cast<uintptr_t>(residual) % 16) == 0;
    for (int item = consumer_thread; item < TILE_N * RUNS_PER_CHANNEL; item += CONSUMER_THREADS) {
        const int channel = item / RUNS_PER_CHANNEL, run = item % RUNS_PER_CHANNEL;
        const int row = run / RUNS_PER_ROW, column = (run % RUNS_PER_ROW) * 8;
        const int o = tile.o0 + channel, y = tile.y0 + row, x = tile.x0 + column;
        if (o >= d.stored_channels || y >= d.out_h || x >= d.out_w) continue;
        const float* src = out_tile + channel * OUT_PITCH + row * BOX_W + column;
        const size_t at = image + (size_t)o * positions + (size_t)y * d.out_w + x;
        if (vectors && x + 8 <= d.out_w) {
            float v[8];
            *reinterpret_cast<float4*>(v) = *reinterpret_cast<const float4*>(src);
            *reinterpret_cast<float4*>(v + 4) = *reinterpret_cast<const float4*>(src + 4);
            if (residual != nullptr) {
                const uint4 r = *reinterpret_cast<const uint4*>(residual + at);
                const bf16* rv = reinterpret_cast<const bf16*>(&r);
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] += __bfloat162float(rv[k]);
            }
            uint4 packed;
            uint32_t* words = reinterpret_cast<uint32_t*>(&packed);
#pragma unroll
            for (int k = 0; k < 4; ++k) words[k] = turbo::pack_bf16(v[2 * k], v[2 * k + 1]);
            *reinterpret_cast<uint4*>(out + at) = packed;
            continue;
        }
        for (int k = 0; k < 8 && x + k < d.out_w; ++k) {
            float v = src[k];
            if (residual != nullptr) v += __bfloat162float(residual[at + k]);
            out[at + k] = __float2bfloat16(v);
        }
    }
}

}  // namespace

namespace {

template <typename L>
__device__ void conv_wgmma(const CUtensorMap& x_map, const CUtensorMap& w_map, const float* bias,
                            const bf16* residual, bf16* out, int front_zeros,
                            int windows_per_image, int time_stride, int window_frames, int ksize,
                            int pad, int channel_steps, int out_h, int out_w,
                            int stored_channels, int tiles_x) {
    extern __shared__ __align__(16) uint8_t smem[];
    const ConvDims d{front_zeros, windows_per_image, time_stride, window_frames, ksize, pad,
                     channel_steps, out_h, out_w, stored_channels, tiles_x};
    const uint32_t full_bars = shared_address(smem), empty_bars = full_bars + 8 * L::STAGES;
    const uint32_t smem_base =
        (full_bars + BARRIER_BYTES + SMEM_ALIGN - 1) & ~(uint32_t)(SMEM_ALIGN - 1);
    const ConvTile tile = conv_tile(d);
    const int steps = window_frames * ksize * channel_steps;  // rows of taps × channel steps

    if (threadIdx.x == 0) {
        for (int s = 0; s < L::STAGES; ++s) {
            mbarrier_init(full_bars + 8 * s, 1);
            mbarrier_init(empty_bars + 8 * s, CONSUMER_THREADS);
        }
        mbarrier_init_fence();
    }
    __syncthreads();

    const int warpgroup = threadIdx.x / 128;
    if (warpgroup == 0) {
        if (threadIdx.x == 0)
            produce<L>(x_map, w_map, d, tile, smem_base, full_bars, empty_bars, steps);
        return;
    }
    float acc[CONSUMER_ROWS][48];
#pragma unroll
    for (int r = 0; r < CONSUMER_ROWS; ++r)
#pragma unroll
        for (int i = 0; i < 48; ++i) acc[r][i] = 0.f;
    if (ksize == 3)
        consume<L, 3>(acc, warpgroup - 1, smem_base, full_bars, empty_bars, steps);
    else
        consume<L, 1>(acc, warpgroup - 1, smem_base, full_bars, empty_bars, steps);
    // Both consumers' wgmmas have read their last stages before either overwrites them.
    named_barrier_sync<CONSUMER_THREADS>(CONSUMERS_BARRIER);
    float* out_tile = reinterpret_cast<float*>(smem + (smem_base - full_bars));
    stage_output(acc, warpgroup - 1, tile, bias, out_tile);
    named_barrier_sync<CONSUMER_THREADS>(CONSUMERS_BARRIER);
    store_output(out_tile, threadIdx.x - 128, d, tile, residual, out);
}

}  // namespace

// x_map: 5-D tensor map of the channels-last input [images, frames, H, W, C] (bf16, C a multiple
// of 8), box 64 × (64 + k − 1) × 4 × 1 × 1, 128-byte swizzle; w_map: 2-D map of the weight
// [O, kt·k·k·C_pad] (bf16), box 64 × 96, 128-byte swizzle (turbo-models' conv.rs builds both);
// bias [O] f32 (O the weight's output channels, a multiple of 96: a layer with fewer has its
// weight padded with zero rows); residual null or laid out as out, added to it; out
// [windows, stored_channels, out_h, out_w] bf16, the first stored_channels ≤ O channels.
// Window t of image i reads its frames t·time_stride − front_zeros + (0 .. window_frames),
// zeros where that is negative.
// grid (tiles_x · ⌈out_h/4⌉, O/96, images · windows_per_image), 384 threads, Step64::SMEM_BYTES.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
conv_wgmma_bf16(const __grid_constant__ CUtensorMap x_map,
                const __grid_constant__ CUtensorMap w_map, const float* bias,
                const bf16* residual, bf16* out,
                int front_zeros, int windows_per_image, int time_stride, int window_frames,
                int ksize, int pad, int channel_steps, int out_h, int out_w, int stored_channels,
                int tiles_x) {
    conv_wgmma<Step64>(x_map, w_map, bias, residual, out, front_zeros, windows_per_image,
                       time_stride, window_frames, ksize, pad, channel_steps, out_h, out_w,
                       stored_channels, tiles_x);
}

// The same for input channels in steps of 32 (C_pad a multiple of 32; both maps' boxes 32
// channels wide in the 64-byte swizzle); Step32::SMEM_BYTES.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
conv_wgmma_c32_bf16(const __grid_constant__ CUtensorMap x_map,
                    const __grid_constant__ CUtensorMap w_map, const float* bias,
                    const bf16* residual, bf16* out,
                    int front_zeros, int windows_per_image, int time_stride, int window_frames,
                    int ksize, int pad, int channel_steps, int out_h, int out_w,
                    int stored_channels, int tiles_x) {
    conv_wgmma<Step32>(x_map, w_map, bias, residual, out, front_zeros, windows_per_image,
                       time_stride, window_frames, ksize, pad, channel_steps, out_h, out_w,
                       stored_channels, tiles_x);
}
