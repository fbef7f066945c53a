//! Wan's 3-D rotary position embedding (`spec/wan-model.md` §2.5).

use candle_core::{Device, Tensor};
use turbo_core::Result;

use super::fused::RopeTables;

const THETA: f64 = 10000.0;

/// The rotation angles of every token of a (frames, height, width) patch grid: `cos` and `sin`,
/// each `[L, 1, head_dim/2]` f32, tokens in (f, h, w) order.
///
/// The head dim splits into rotary pairs for time, height and width as `c − 2⌊c/3⌋`, `⌊c/3⌋`,
/// `⌊c/3⌋` (c = head_dim/2; 22/21/21 at 128), each axis normalising its frequencies by its own
/// sub-dimension: ω_j = θ^(−2j/n) with n = 2 × its pair count.
#[derive(Debug, Clone)]
pub(crate) struct Rope3d {
    cos: Tensor,
    sin: Tensor,
}

impl Rope3d {
    pub(crate) fn new(
        grid: (usize, usize, usize),
        head_dim: usize,
        device: &Device,
    ) -> Result<Self> {
        let pairs = head_dim / 2;
        let spatial = pairs / 3;
        let axis_pairs = [pairs - 2 * spatial, spatial, spatial];
        let axis_freqs: Vec<Vec<f64>> = axis_pairs
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|j| THETA.powf(-2.0 * j as f64 / (2 * n) as f64))
                    .collect()
            })
            .collect();
        let (frames, height, width) = grid;
        let tokens = frames * height * width;
        let mut angles = Vec::with_capacity(tokens * pairs);
        for f in 0..frames {
            for y in 0..height {
                for x in 0..width {
                    for (position, freqs) in [f, y, x].iter().zip(&axis_freqs) {
                        angles.extend(freqs.iter().map(|w| *position as f64 * w));
                    }
                }
            }
        }
        let table = |op: fn(f64) -> f64| -> Result<Tensor> {
            let values: Vec<f32> = angles.iter().map(|&a| op(a) as f32).collect();
            Ok(Tensor::from_vec(values, (tokens, 1, pairs), device)?)
        };
        Ok(Self {
            cos: table(f64::cos)?,
            sin: table(f64::sin)?,
        })
    }

    /// The tables of the tokens `rows` (global positions) alone: a sequence-parallel rank's
    /// shard rotates by the positions its tokens have in the whole grid. Copied, so that the
    /// fused kernels read tables that start at offset 0.
    pub(crate) fn rows(&self, rows: std::ops::Range<usize>) -> Result<Self> {
        let narrow =
            |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, rows.start, rows.len())?.copy()?) };
        Ok(Self {
            cos: narrow(&self.cos)?,
            sin: narrow(&self.sin)?,
        })
    }

    /// The angles' cosines and sines, `[L, 1, head_dim/2]` each.
    pub(crate) fn tables(&self) -> RopeTables<'_> {
        RopeTables {
            cos: &self.cos,
            sin: &self.sin,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_head_dim_128_as_22_21_21() {
        let rope = Rope3d::new((2, 3, 4), 128, &Device::Cpu).unwrap();
        assert_eq!(rope.cos.dims(), &[24, 1, 64]);
        // Token (f=1, y=2, x=3) is row 1·12 + 2·4 + 3 = 23; its first pair of each axis has ω = 1.
        let angles: Vec<f32> = rope
            .sin
            .get(23)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let first = |offset: usize| angles[offset];
        assert!((first(0) - 1f32.sin()).abs() < 1e-6);
        assert!((first(22) - 2f32.sin()).abs() < 1e-6);
        assert!((first(43) - 3f32.sin()).abs() < 1e-6);
        // Second time pair: ω = 10000^(−2/44).
        let omega = 10000f64.powf(-2.0 / 44.0);
        assert!((angles[1] as f64 - omega.sin()).abs() < 1e-6);
    }

    #[test]
    fn rotates_interleaved_pairs() {
        let rope = Rope3d::new((2, 1, 1), 6, &Device::Cpu).unwrap();
        let x = Tensor::new(
            &[
                [[[1f32, 0.0, 0.0, 1.0, 1.0, 1.0]]],
                [[[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]]],
            ],
            &Device::Cpu,
        )
        .unwrap()
        .reshape((1, 2, 1, 6))
        .unwrap();
        let out: Vec<f32> = super::super::fused::rotate_pairs_reference(&x, rope.tables())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // Token 0 sits at position 0 on every axis: unchanged.
        assert_eq!(&out[..6], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
        // Token 1 has f = 1: the time pair (x0, x1) = (1, 0) rotates by 1 radian.
        assert!((out[6] - 1f32.cos()).abs() < 1e-6 && (out[7] - 1f32.sin()).abs() < 1e-6);
        assert_eq!(&out[8..], &[0.0, 1.0, 1.0, 1.0]);
    }
}
