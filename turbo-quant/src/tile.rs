//! Symmetric int8 quantisation with one f32 scale per 128×128 tile, exactly as TurboDiffusion's
//! `quant_cuda` kernel does it (`spec/turbodiffusion.md` §12.2–12.3): for each tile,
//! `amax = max(1e-8, max|v|)`, `scale = amax / 128` and
//! `q = clamp(round_half_even(v · (128 / amax)), −128, 127)` with `128 / amax` rounded to f32 first
//! (two roundings, as upstream). The divisor is 128 while the clamp
//! is at 127, so the element equal to `amax` saturates to 127.

use turbo_core::{Error, Result};

/// Side of the square tiles that share one scale, for weights and activations alike.
pub const TILE: usize = 128;

/// The quantisation divisor: `scale = amax / QUANT_DIVISOR`.
const QUANT_DIVISOR: f32 = 128.0;

/// Floor of a tile's absolute maximum, so that an all-zero tile divides safely.
const AMAX_FLOOR: f32 = 1e-8;

/// A borrowed row-major int8 matrix and its tile scales: `scales` is row-major
/// `[⌈rows/128⌉, ⌈cols/128⌉]`, and element `(r, c)` stands for `values[r·cols + c] ·
/// scales[(r/128)·⌈cols/128⌉ + c/128]`.
#[derive(Debug, Clone, Copy)]
pub struct TileMatrix<'a> {
    values: &'a [i8],
    scales: &'a [f32],
    rows: usize,
    cols: usize,
}

impl<'a> TileMatrix<'a> {
    /// Checks that `values` holds `rows · cols` elements and `scales` one per tile.
    pub fn new(values: &'a [i8], scales: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        check_len("int8 values", values.len(), &[rows, cols])?;
        check_len("tile scales", scales.len(), &tile_grid(rows, cols))?;
        Ok(Self {
            values,
            scales,
            rows,
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` of the int8 values.
    pub fn row(&self, r: usize) -> &'a [i8] {
        &self.values[r * self.cols..(r + 1) * self.cols]
    }

    /// The scales of the tiles along row block `row_tile`, one per column tile.
    pub fn tile_row_scales(&self, row_tile: usize) -> &'a [f32] {
        let col_tiles = self.cols.div_ceil(TILE);
        &self.scales[row_tile * col_tiles..(row_tile + 1) * col_tiles]
    }

    /// The dequantised values `q · scale`, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows)
            .flat_map(|r| {
                let scales = self.tile_row_scales(r / TILE);
                self.row(r)
                    .iter()
                    .enumerate()
                    .map(move |(c, &q)| f32::from(q) * scales[c / TILE])
            })
            .collect()
    }
}

/// An owned row-major int8 matrix with one f32 scale per 128×128 tile.
#[derive(Debug, Clone, PartialEq)]
pub struct TileQuantized {
    /// `rows · cols` int8 values, row-major.
    pub values: Vec<i8>,
    /// `[⌈rows/128⌉, ⌈cols/128⌉]` scales, row-major.
    pub scales: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl TileQuantized {
    pub fn view(&self) -> TileMatrix<'_> {
        TileMatrix {
            values: &self.values,
            scales: &self.scales,
            rows: self.rows,
            cols: self.cols,
        }
    }
}

/// The `[⌈rows/128⌉, ⌈cols/128⌉]` shape of the scale grid of a `[rows, cols]` matrix.
pub fn tile_grid(rows: usize, cols: usize) -> [usize; 2] {
    [rows.div_ceil(TILE), cols.div_ceil(TILE)]
}

/// Quantises a row-major `[rows, cols]` f32 matrix tile by tile. Partial tiles at the bottom and
/// right edges take their scale from the elements they hold (out-of-bounds elements count as 0,
/// as in the CUDA kernel).
pub fn quantize_tiles(values: &[f32], rows: usize, cols: usize) -> Result<TileQuantized> {
    check_len("matrix to quantise", values.len(), &[rows, cols])?;
    let col_tiles = cols.div_ceil(TILE);
    let mut quantized = vec![0i8; values.len()];
    let mut scales = Vec::with_capacity(rows.div_ceil(TILE) * col_tiles);
    for (block, out_block) in values
        .chunks(TILE * cols.max(1))
        .zip(quantized.chunks_mut(TILE * cols.max(1)))
    {
        let amax = column_tile_amax(block, cols);
        let inverse: Vec<f32> = amax.iter().map(|&a| inverse_scale(a)).collect();
        for (row, out_row) in block.chunks(cols).zip(out_block.chunks_mut(cols)) {
            for (c, (&v, q)) in row.iter().zip(out_row.iter_mut()).enumerate() {
                *q = quantize_value(v, inverse[c / TILE]);
            }
        }
        scales.extend(amax.iter().map(|&a| a / QUANT_DIVISOR));
    }
    Ok(TileQuantized {
        values: quantized,
        scales,
        rows,
        cols,
    })
}

/// `max(1e-8, max|v|)` over each 128-wide column tile of a block of (at most 128) rows.
fn column_tile_amax(block: &[f32], cols: usize) -> Vec<f32> {
    let mut amax = vec![AMAX_FLOOR; cols.div_ceil(TILE)];
    for row in block.chunks(cols) {
        for (tile_amax, tile) in amax.iter_mut().zip(row.chunks(TILE)) {
            *tile_amax = tile.iter().fold(*tile_amax, |m, v| m.max(v.abs()));
        }
    }
    amax
}

/// `clamp(round_half_even(v · (128 / amax)), −128, 127)`: the `cvt.rni.sat.s8.f32` conversion
/// of TurboDiffusion's quantiser, which computes the reciprocal `128 / amax` once per tile and
/// multiplies by it. That rounds twice (the reciprocal, then the product), so a value close to
/// a rounding boundary can land on the other side of it than `v · 128 / amax` would: the two
/// roundings are what upstream does, and bit-exact parity needs them.
fn quantize_value(v: f32, inverse_scale: f32) -> i8 {
    // NaN becomes 0 (as the saturating PTX conversion does); the clamp makes the cast exact.
    (v * inverse_scale).round_ties_even().clamp(-128.0, 127.0) as i8
}

/// `128 / amax`, rounded to f32 once per tile as upstream does.
fn inverse_scale(amax: f32) -> f32 {
    QUANT_DIVISOR / amax
}

fn check_len(what: &str, len: usize, shape: &[usize]) -> Result<()> {
    if len == shape.iter().product::<usize>() {
        Ok(())
    } else {
        Err(Error::Shape {
            what: what.to_owned(),
            expected: format!("{shape:?} ({} elements)", shape.iter().product::<usize>()),
            got: vec![len],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amax_saturates_to_127_and_ties_go_to_even() {
        // amax 4 → v·32: 4 → 128 → 127; 0.015625·32 = 0.5 → 0; 0.046875·32 = 1.5 → 2;
        // −0.078125·32 = −2.5 → −2.
        let q = quantize_tiles(&[4.0, 0.015625, 0.046875, -0.078125], 1, 4).unwrap();
        assert_eq!(q.values, vec![127, 0, 2, -2]);
        assert_eq!(q.scales, vec![4.0 / 128.0]);
    }

    #[test]
    fn the_reciprocal_is_rounded_before_the_product() {
        // amax 3: 128/3 rounds up to 42.666668, and 0x3e63ffff · 42.666668 rounds to 9.5 → 10,
        // where the once-rounded 0x3e63ffff · 128 / 3 = 9.4999995 → 9. Upstream gives 10.
        let v = f32::from_bits(0x3e63_ffff);
        let q = quantize_tiles(&[3.0, v, -v], 1, 3).unwrap();
        assert_eq!(q.values, vec![127, 10, -10]);
    }

    #[test]
    fn negative_amax_maps_to_minus_128() {
        let q = quantize_tiles(&[-2.0, 1.0], 2, 1).unwrap();
        assert_eq!(q.values, vec![-128, 64]);
    }

    #[test]
    fn zero_tile_gets_the_floor_scale() {
        let q = quantize_tiles(&[0.0; 6], 2, 3).unwrap();
        assert_eq!(q.values, vec![0; 6]);
        assert_eq!(q.scales, vec![AMAX_FLOOR / 128.0]);
    }

    #[test]
    fn each_tile_has_its_own_scale() {
        // 130 × 129: a 2 × 2 grid with partial tiles on both edges.
        let (rows, cols) = (130, 129);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                ((r / TILE) * 2 + c / TILE + 1) as f32
            })
            .collect();
        let q = quantize_tiles(&values, rows, cols).unwrap();
        assert_eq!(
            q.scales,
            vec![1.0 / 128.0, 2.0 / 128.0, 3.0 / 128.0, 4.0 / 128.0]
        );
        assert!(q.values.iter().all(|&v| v == 127));
        assert_eq!(q.view().dequantize().len(), rows * cols);
    }

    #[test]
    fn wrong_lengths_are_rejected() {
        assert!(quantize_tiles(&[1.0; 5], 2, 3).is_err());
        assert!(TileMatrix::new(&[0; 6], &[1.0, 1.0], 2, 3).is_err());
    }
}
