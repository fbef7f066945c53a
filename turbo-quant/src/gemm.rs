//! The block-scaled int8 GEMM of TurboDiffusion's W8A8 linears (`spec/turbodiffusion.md` §12.4):
//! `Y[m, n] = Σ_kb X_s[m/128, kb] · W_s[n/128, kb] · Σ_{k ∈ kb} X_q[m, k] · W_q[n, k]`.
//!
//! As in the CUDA kernel, each 128-wide k tile is accumulated exactly in i32, then converted to
//! f32, multiplied by the product of its two tile scales and added to an f32 accumulator.

use rayon::prelude::*;
use turbo_core::{Error, Result};

use crate::tile::{TileMatrix, TILE};

/// Rows of the output computed by one rayon task: each weight row is read from memory once per
/// task, so more rows mean less traffic, and fewer rows spread small products over the threads.
const ROWS_PER_TASK: usize = 32;
/// Rows of the micro-kernel's output block.
const MR: usize = 2;
/// Columns of the micro-kernel's output block.
const NR: usize = 4;

/// `X · Wᵀ` for int8 `x` `[M, K]` and int8 `w` `[N, K]` with their tile scales: a row-major
/// `[M, N]` f32 result (no bias).
pub fn int8_gemm(x: TileMatrix<'_>, w: TileMatrix<'_>) -> Result<Vec<f32>> {
    if x.cols() != w.cols() {
        return Err(Error::Shape {
            what: "int8 GEMM weight (its inner dimension must match the activations')".into(),
            expected: format!("[N, {}]", x.cols()),
            got: vec![w.rows(), w.cols()],
        });
    }
    let n = w.rows();
    let mut out = vec![0f32; x.rows() * n];
    if n == 0 {
        return Ok(out);
    }
    out.par_chunks_mut(ROWS_PER_TASK * n)
        .enumerate()
        .for_each(|(task, out_rows)| gemm_rows_dispatch(x, w, task * ROWS_PER_TASK, out_rows));
    Ok(out)
}

fn gemm_rows_dispatch(x: TileMatrix<'_>, w: TileMatrix<'_>, first_row: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { avx2::gemm_rows(x, w, first_row, out) };
        return;
    }
    gemm_rows(x, w, first_row, out, tiled_dot_block)
}

/// The operands of one `MR × NR` block of outputs: `MR` activation rows and `NR` weight rows
/// (all of length K) with their scales along the k tiles.
#[derive(Clone, Copy)]
struct Block<'a> {
    x_rows: [&'a [i8]; MR],
    w_rows: [&'a [i8]; NR],
    x_scales: [&'a [f32]; MR],
    w_scales: [&'a [f32]; NR],
}

/// Fills `out_rows` (whole rows of the output, starting at row `first_row`) block by block:
/// each `MR × NR` block of outputs walks the k tiles once, so every loaded activation row serves
/// `NR` weight rows and every weight row `MR` activation rows. The column blocks are the outer
/// loop so that a block's weight rows stay in cache across all rows of the task.
#[inline(always)]
fn gemm_rows(
    x: TileMatrix<'_>,
    w: TileMatrix<'_>,
    first_row: usize,
    out_rows: &mut [f32],
    block_kernel: impl Fn(Block<'_>) -> [[f32; NR]; MR],
) {
    let n = w.rows();
    let rows = out_rows.len() / n;
    for first_col in (0..n).step_by(NR) {
        // Edge blocks repeat the last row or column; the duplicates are computed and dropped.
        let cols: [usize; NR] = std::array::from_fn(|j| (first_col + j).min(n - 1));
        let w_rows = cols.map(|c| w.row(c));
        let w_scales = cols.map(|c| w.tile_row_scales(c / TILE));
        for block_row in (0..rows).step_by(MR) {
            let ids: [usize; MR] =
                std::array::from_fn(|i| first_row + (block_row + i).min(rows - 1));
            let block = block_kernel(Block {
                x_rows: ids.map(|r| x.row(r)),
                w_rows,
                x_scales: ids.map(|r| x.tile_row_scales(r / TILE)),
                w_scales,
            });
            for (i, block_out) in block.iter().enumerate().take(rows - block_row) {
                let out = &mut out_rows[(block_row + i) * n + first_col..];
                for (o, &v) in out.iter_mut().zip(block_out).take(n - first_col) {
                    *o = v;
                }
            }
        }
    }
}

/// For each (row, column) pair of the block:
/// `Σ_kb (Σ_{k ∈ kb} x[k]·w[k]) · (x_scales[kb] · w_scales[kb])` over the 128-wide k tiles.
/// Portable version; [`avx2::tiled_dot_block`] computes the same bits.
#[inline(always)]
fn tiled_dot_block(block: Block<'_>) -> [[f32; NR]; MR] {
    let mut acc = [[0f32; NR]; MR];
    let k = block.x_rows[0].len();
    for (kb, start) in (0..k).step_by(TILE).enumerate() {
        let end = (start + TILE).min(k);
        for ((acc_row, x_row), x_scales) in acc.iter_mut().zip(block.x_rows).zip(block.x_scales) {
            for ((acc, w_row), w_scales) in acc_row.iter_mut().zip(block.w_rows).zip(block.w_scales)
            {
                let dot = dot_i8(&x_row[start..end], &w_row[start..end]);
                *acc += dot as f32 * (x_scales[kb] * w_scales[kb]);
            }
        }
    }
    acc
}

/// Exact int8 dot product. Each product fits in i16 (|q| ≤ 128, so |x·w| ≤ 16384) and a sum of
/// 128 of them in i32.
#[inline(always)]
fn dot_i8(x: &[i8], w: &[i8]) -> i32 {
    x.iter()
        .zip(w)
        .map(|(&a, &b)| i32::from(i16::from(a) * i16::from(b)))
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_add_epi32, _mm256_add_ps, _mm256_cvtepi32_ps,
        _mm256_cvtepi8_epi16, _mm256_hadd_epi32, _mm256_madd_epi16, _mm256_mul_ps,
        _mm256_permute2x128_si256, _mm256_setr_epi32, _mm256_setr_ps, _mm256_setzero_ps,
        _mm256_setzero_si256, _mm256_storeu_ps, _mm_loadu_si128,
    };

    use super::{dot_i8, Block, TileMatrix, MR, NR, TILE};

    /// Elements per step: 16 int8 values widen to one register of 16 i16.
    const LANES: usize = 16;

    /// [`super::gemm_rows`] with the AVX2 block kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemm_rows(
        x: TileMatrix<'_>,
        w: TileMatrix<'_>,
        first_row: usize,
        out: &mut [f32],
    ) {
        // SAFETY (closure): this function only runs on CPUs with AVX2.
        super::gemm_rows(x, w, first_row, out, |block| unsafe {
            tiled_dot_block(block)
        })
    }

    /// [`super::tiled_dot_block`] vectorised: 16-wide sign extension to i16 and `vpmaddwd`
    /// (pairwise sums of i16 products, exact in i32), one horizontal reduction of the eight
    /// accumulators per k tile, then the same f32 operations as the portable version, lane by
    /// lane (the i32 tile sums, below 2^22, convert to f32 exactly).
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    pub unsafe fn tiled_dot_block(block: Block<'_>) -> [[f32; NR]; MR] {
        const { assert!(MR == 2 && NR == 4, "the reduction below packs 2 × 4 sums") };
        let k = block.x_rows[0].len();
        // Re-slicing checks that every row holds `k` elements, which the loads below rely on.
        let x = block.x_rows.map(|r| &r[..k]);
        let w = block.w_rows.map(|r| &r[..k]);
        let mut acc = _mm256_setzero_ps();
        for (kb, start) in (0..k).step_by(TILE).enumerate() {
            let end = (start + TILE).min(k);
            let vector_end = start + (end - start) / LANES * LANES;
            let mut sums = [_mm256_setzero_si256(); MR * NR];
            for offset in (start..vector_end).step_by(LANES) {
                // SAFETY: `offset + LANES <= vector_end <= k`, the length of every row.
                let xv = [0, 1].map(|i| unsafe { widen(x[i].as_ptr().add(offset)) });
                let wv = [0, 1, 2, 3].map(|j| unsafe { widen(w[j].as_ptr().add(offset)) });
                for i in 0..MR {
                    for j in 0..NR {
                        let product = _mm256_madd_epi16(xv[i], wv[j]);
                        sums[i * NR + j] = _mm256_add_epi32(sums[i * NR + j], product);
                    }
                }
            }
            let tail = |i: usize, j: usize| dot_i8(&x[i][vector_end..end], &w[j][vector_end..end]);
            let tails = _mm256_setr_epi32(
                tail(0, 0),
                tail(0, 1),
                tail(0, 2),
                tail(0, 3),
                tail(1, 0),
                tail(1, 1),
                tail(1, 2),
                tail(1, 3),
            );
            let dots = _mm256_add_epi32(reduce_lanes(sums), tails);
            let [sx0, sx1] = [0, 1].map(|i| block.x_scales[i][kb]);
            let [sw0, sw1, sw2, sw3] = [0, 1, 2, 3].map(|j| block.w_scales[j][kb]);
            let scales = _mm256_mul_ps(
                _mm256_setr_ps(sx0, sx0, sx0, sx0, sx1, sx1, sx1, sx1),
                _mm256_setr_ps(sw0, sw1, sw2, sw3, sw0, sw1, sw2, sw3),
            );
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_cvtepi32_ps(dots), scales));
        }
        let mut out = [0f32; MR * NR];
        _mm256_storeu_ps(out.as_mut_ptr(), acc);
        [
            [out[0], out[1], out[2], out[3]],
            [out[4], out[5], out[6], out[7]],
        ]
    }

    /// The eight lane sums of eight vectors, in order, as one vector.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn reduce_lanes(v: [__m256i; 8]) -> __m256i {
        // Each hadd level halves the vectors; the last step adds the two 128-bit halves.
        let pairs = [
            _mm256_hadd_epi32(v[0], v[1]),
            _mm256_hadd_epi32(v[2], v[3]),
            _mm256_hadd_epi32(v[4], v[5]),
            _mm256_hadd_epi32(v[6], v[7]),
        ];
        let low = _mm256_hadd_epi32(pairs[0], pairs[1]);
        let high = _mm256_hadd_epi32(pairs[2], pairs[3]);
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(low, high),
            _mm256_permute2x128_si256::<0x31>(low, high),
        )
    }

    /// Loads 16 int8 values and sign-extends them to 16 i16 lanes.
    ///
    /// # Safety
    /// `ptr` must point to 16 readable bytes; the CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn widen(ptr: *const i8) -> __m256i {
        _mm256_cvtepi8_epi16(_mm_loadu_si128(ptr.cast::<__m128i>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tile::quantize_tiles;

    /// The same contraction with every term widened to f64 and summed in one pass.
    fn reference(x: TileMatrix<'_>, w: TileMatrix<'_>) -> Vec<f64> {
        let (xd, wd) = (x.dequantize(), w.dequantize());
        let k = x.cols();
        (0..x.rows())
            .flat_map(|m| (0..w.rows()).map(move |n| (m, n)))
            .map(|(m, n)| {
                (0..k)
                    .map(|i| f64::from(xd[m * k + i]) * f64::from(wd[n * k + i]))
                    .sum()
            })
            .collect()
    }

    #[test]
    fn dot_is_exact_at_the_extremes() {
        assert_eq!(dot_i8(&[-128; TILE], &[-128; TILE]), 1 << 21);
        assert_eq!(dot_i8(&[127; TILE], &[-128; TILE]), -127 << 14);
    }

    /// The AVX2 kernel computes the same bits as the portable one, partial tiles included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_kernel_matches_the_portable_one_bit_for_bit() {
        if !is_x86_feature_detected!("avx2") {
            return;
        }
        let k = 2 * TILE + 37;
        let values = |seed: usize| -> Vec<i8> {
            (0..k)
                .map(|i| ((i * 7919 + seed * 104729) % 256) as u8 as i8)
                .collect()
        };
        let rows: Vec<Vec<i8>> = (0..MR + NR).map(values).collect();
        let scales: Vec<Vec<f32>> = (0..MR + NR)
            .map(|r| {
                (0..3)
                    .map(|kb| 0.001 * (1 + r + 7 * kb) as f32 / 3.0)
                    .collect()
            })
            .collect();
        let block = Block {
            x_rows: [0, 1].map(|i| rows[i].as_slice()),
            w_rows: [2, 3, 4, 5].map(|j| rows[j].as_slice()),
            x_scales: [0, 1].map(|i| scales[i].as_slice()),
            w_scales: [2, 3, 4, 5].map(|j| scales[j].as_slice()),
        };
        let portable = tiled_dot_block(block);
        // SAFETY: AVX2 support was checked above.
        let vectorised = unsafe { avx2::tiled_dot_block(block) };
        let bits = |b: [[f32; NR]; MR]| b.map(|row| row.map(f32::to_bits));
        assert_eq!(bits(portable), bits(vectorised));
    }

    #[test]
    fn matches_the_dequantised_product_on_partial_tiles() {
        let (m, n, k) = (131, 9, 300);
        let gen = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed) % 1013) as f32 / 1013.0 - 0.5) * (1 + i % 5) as f32)
                .collect()
        };
        let xq = quantize_tiles(&gen(m * k, 1), m, k).unwrap();
        let wq = quantize_tiles(&gen(n * k, 2), n, k).unwrap();
        let y = int8_gemm(xq.view(), wq.view()).unwrap();
        let expected = reference(xq.view(), wq.view());
        for (got, want) in y.iter().zip(&expected) {
            assert!((f64::from(*got) - want).abs() <= 1e-5 * want.abs().max(1.0));
        }
    }

    #[test]
    fn mismatched_inner_dimensions_are_rejected() {
        let x = quantize_tiles(&[1.0; 6], 2, 3).unwrap();
        let w = quantize_tiles(&[1.0; 8], 2, 4).unwrap();
        assert!(int8_gemm(x.view(), w.view()).is_err());
    }
}
