//! The block-scaled int8 GEMM of TurboDiffusion's W8A8 linears (`spec/turbodiffusion.md` §12.4):
//! `Y[m, n] = Σ_kb X_s[m/128, kb] · W_s[n/128, kb] · Σ_{k ∈ kb} X_q[m, k] · W_q[n, k]`.
//!
//! As in the CUDA kernel, each 128-wide k tile is accumulated exactly in i32, then converted to
//! f32, multiplied by the product of its two tile scales and added to an f32 accumulator.

use rayon::prelude::*;
use turbo_core::{Error, Result};

use crate::tile::{TileMatrix, TILE};

/// Rows of the output computed by one rayon task: enough to reuse each weight row from L1 a few
/// times, few enough to spread small products over the threads.
const ROWS_PER_TASK: usize = 8;

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
        .for_each(|(task, out_rows)| gemm_rows(x, w, task * ROWS_PER_TASK, out_rows));
    Ok(out)
}

/// Fills `out_rows` (whole rows of the output, starting at row `first_row`).
fn gemm_rows(x: TileMatrix<'_>, w: TileMatrix<'_>, first_row: usize, out_rows: &mut [f32]) {
    let n = w.rows();
    for col in 0..n {
        let w_row = w.row(col);
        let w_scales = w.tile_row_scales(col / TILE);
        for (offset, out_row) in out_rows.chunks_mut(n).enumerate() {
            let row = first_row + offset;
            let x_scales = x.tile_row_scales(row / TILE);
            out_row[col] = tiled_dot(x.row(row), w_row, x_scales, w_scales);
        }
    }
}

/// `Σ_kb (Σ_{k ∈ kb} x[k]·w[k]) · (x_scales[kb] · w_scales[kb])` over the 128-wide k tiles.
fn tiled_dot(x: &[i8], w: &[i8], x_scales: &[f32], w_scales: &[f32]) -> f32 {
    x.chunks(TILE)
        .zip(w.chunks(TILE))
        .zip(x_scales.iter().zip(w_scales))
        .fold(0f32, |acc, ((x_tile, w_tile), (&sx, &sw))| {
            acc + dot_i8(x_tile, w_tile) as f32 * (sx * sw)
        })
}

/// Exact int8 dot product of at most 128 elements. Each product fits in i16 (|q| ≤ 128, so
/// |x·w| ≤ 16384) and the sum of 128 of them fits in i32; written so that LLVM vectorises it
/// into widening multiply-adds.
fn dot_i8(x: &[i8], w: &[i8]) -> i32 {
    x.iter()
        .zip(w)
        .map(|(&a, &b)| i32::from(i16::from(a) * i16::from(b)))
        .sum()
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
        assert_eq!(dot_i8(&[-128; 128], &[-128; 128]), 128 * 128 * 128);
        assert_eq!(dot_i8(&[127; 128], &[-128; 128]), -127 * 128 * 128);
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
