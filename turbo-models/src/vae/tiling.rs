//! Spatial tiling of the decode, for frames whose full-resolution feature maps do not fit.
//!
//! The decoder's `conv1` and middle blocks run untiled at latent resolution: the middle
//! attention sees the whole frame, and these maps are small (`T × 4·dim × h × w`). Only the
//! upsampling path (the layers and the head), where the memory goes, runs tile by tile: each
//! tile of the latent is widened by a halo of [`VaeConfig::decode_halo`] latent pixels on every
//! side (clipped at the frame's edges), decoded over all frames with a temporal feature cache
//! of its own, and cropped back to its own pixels. The halo covers the receptive field of the
//! upsampling path, so every kept pixel sees exactly the inputs it sees untiled: the result
//! equals [`WanVae::decode`] up to float rounding.

use candle_core::{Shape, Tensor};
use turbo_core::parallel::{Communicator, Partition};
use turbo_core::{Error, Result};

use super::cache::FeatureCache;
#[cfg(doc)]
use super::VaeConfig;
use super::{to_channel_major, WanVae};

/// Tiles of `height × width` latent pixels (before the halo) for [`WanVae::decode_tiled`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VaeTiling {
    height: usize,
    width: usize,
}

impl VaeTiling {
    /// Tiles of `height × width` latent pixels, both positive.
    pub fn new(height: usize, width: usize) -> Result<Self> {
        if height == 0 || width == 0 {
            return Err(Error::InvalidConfig {
                field: "VAE tiling".into(),
                reason: format!(
                    "tiles of {height}×{width} latent pixels: both sides must be at least 1"
                ),
            });
        }
        Ok(Self { height, width })
    }

    /// The tiles of a `rows × cols` grid over a latent of `latent_height × latent_width`.
    pub fn grid(
        rows: usize,
        cols: usize,
        latent_height: usize,
        latent_width: usize,
    ) -> Result<Self> {
        if rows == 0 || cols == 0 || rows > latent_height || cols > latent_width {
            return Err(Error::InvalidConfig {
                field: "VAE tiling".into(),
                reason: format!(
                    "a {rows}×{cols} grid over a {latent_height}×{latent_width} latent: \
                     at least one tile and at most one per latent pixel each way"
                ),
            });
        }
        Self::new(latent_height.div_ceil(rows), latent_width.div_ceil(cols))
    }

    /// Tile height in latent pixels.
    pub fn height(self) -> usize {
        self.height
    }

    /// Tile width in latent pixels.
    pub fn width(self) -> usize {
        self.width
    }
}

/// One tile along an axis: the kept latent range and the range decoded (with the halo).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Span {
    kept: (usize, usize),
    decoded: (usize, usize),
}

impl Span {
    /// The tiles of `tile` pixels covering `len`, each widened by `halo` within `0..len`.
    fn cover(len: usize, tile: usize, halo: usize) -> Vec<Self> {
        (0..len)
            .step_by(tile)
            .map(|start| {
                let end = (start + tile).min(len);
                Self {
                    kept: (start, end),
                    decoded: (start.saturating_sub(halo), (end + halo).min(len)),
                }
            })
            .collect()
    }

    /// The kept range `kept` of an axis of `len`, widened by `halo` within `0..len`.
    pub(super) fn band(kept: std::ops::Range<usize>, len: usize, halo: usize) -> Self {
        Self {
            kept: (kept.start, kept.end),
            decoded: (kept.start.saturating_sub(halo), (kept.end + halo).min(len)),
        }
    }

    /// `x` narrowed to the decoded range along `dim`.
    pub(super) fn decoded_part(self, x: &Tensor, dim: usize) -> Result<Tensor> {
        let (start, end) = self.decoded;
        Ok(x.narrow(dim, start, end - start)?)
    }

    /// A decode of the decoded range (at `scale` pixels per latent pixel) cropped to the kept
    /// range along `dim`.
    pub(super) fn kept_part(self, decoded: &Tensor, dim: usize, scale: usize) -> Result<Tensor> {
        let offset = (self.kept.0 - self.decoded.0) * scale;
        Ok(decoded.narrow(dim, offset, (self.kept.1 - self.kept.0) * scale)?)
    }
}

/// Height and width axes of time-major `[B, T, C, H, W]` tensors.
pub(super) const HEIGHT: usize = 3;
const WIDTH: usize = 4;

impl WanVae {
    /// [`WanVae::decode`] in spatial tiles (see the module notes): the same video up to float
    /// rounding, holding the full-resolution feature maps of one tile at a time.
    pub fn decode_tiled(&self, latent: &Tensor, tiling: VaeTiling) -> Result<Tensor> {
        self.decode_tiled_with_halo(latent, tiling, self.cfg.decode_halo())
    }

    /// [`WanVae::decode_tiled`] with a given halo: below [`VaeConfig::decode_halo`] the pixels
    /// next to the cuts differ (for the test that shows the halo is needed).
    fn decode_tiled_with_halo(
        &self,
        latent: &Tensor,
        tiling: VaeTiling,
        halo: usize,
    ) -> Result<Tensor> {
        let tiling = VaeTiling::new(tiling.height, tiling.width)?;
        let x = self.latent.decoder_input(latent)?;
        let middle = self.decode_middle(&x)?;
        let (_, _, _, height, width) = x.dims5()?;
        let scale = self.cfg.spatial_stride();
        let columns = Span::cover(width, tiling.width, halo);
        let rows = Span::cover(height, tiling.height, halo)
            .into_iter()
            .map(|row| {
                let tiles = columns
                    .iter()
                    .map(|column| self.decode_tile(&middle, row, *column, scale))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&tiles, WIDTH)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let video = Tensor::cat(&rows, HEIGHT)?.clamp(-1f32, 1f32)?;
        to_channel_major(&video)
    }

    /// [`WanVae::decode`] spread over the ranks of `comm`, each rank decoding one band of
    /// latent rows (split as evenly as they go) with the halo of [`WanVae::decode_tiled`], the
    /// bands gathered on every rank: every rank returns the whole video, equal to the one-device
    /// decode up to float rounding. `conv1` and the middle blocks (small, at latent resolution,
    /// with the frame-wide attention) run whole on every rank; the upsampling path, where the
    /// time and memory go, runs on the band alone. A latent with fewer rows than ranks is an
    /// [`Error::InvalidConfig`].
    pub fn decode_parallel(&self, latent: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
        let x = self.latent.decoder_input(latent)?;
        let (_, _, _, height, width) = x.dims5()?;
        let bands = row_bands(height, comm)?;
        let scale = self.cfg.spatial_stride();
        let middle = self.decode_middle(&x)?;
        let row = Span::band(bands.range(comm.rank()), height, self.cfg.decode_halo());
        let column = Span::band(0..width, width, 0);
        let mine = self.decode_tile(&middle, row, column, scale)?;
        drop(middle);
        let video = gather_bands(&mine, &bands, scale, comm)?.clamp(-1f32, 1f32)?;
        to_channel_major(&video)
    }

    /// `conv1` and the middle blocks over every latent frame, untiled, one frame at a time.
    fn decode_middle(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let mut cache = FeatureCache::default();
        (0..x.dim(1)?)
            .map(|t| {
                self.decoder
                    .decode_middle_chunk(&x.narrow(1, t, 1)?, &mut cache)
            })
            .collect()
    }

    /// The frames of one tile, cropped to its kept pixels: `[B, F, 3, h·s, w·s]`.
    fn decode_tile(
        &self,
        middle: &[Tensor],
        row: Span,
        column: Span,
        scale: usize,
    ) -> Result<Tensor> {
        let mut cache = FeatureCache::default();
        let chunks = middle
            .iter()
            .map(|features| {
                let tile = column
                    .decoded_part(&row.decoded_part(features, HEIGHT)?, WIDTH)?
                    .contiguous()?;
                let frames = self.decoder.decode_upsampling_chunk(&tile, &mut cache)?;
                // A copy, so that the uncropped decode is freed.
                Ok(column
                    .kept_part(&row.kept_part(&frames, HEIGHT, scale)?, WIDTH, scale)?
                    .contiguous()?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&chunks, 1)?)
    }
}

/// One band of `height` latent rows per rank of `comm`, split as evenly as they go; an
/// [`Error::InvalidConfig`] when there are fewer rows than ranks.
pub(super) fn row_bands(height: usize, comm: &dyn Communicator) -> Result<Partition> {
    if height < comm.world_size() {
        return Err(Error::InvalidConfig {
            field: "parallel VAE decode".into(),
            reason: format!(
                "{height} latent rows cannot give each of {} ranks a band",
                comm.world_size()
            ),
        });
    }
    Partition::balanced(height, comm.world_size())
}

/// Every rank's decoded band (`mine`: this rank's, time-major, `scale` rows per latent row),
/// joined top to bottom on every rank.
pub(super) fn gather_bands(
    mine: &Tensor,
    bands: &Partition,
    scale: usize,
    comm: &dyn Communicator,
) -> Result<Tensor> {
    let shapes: Vec<Shape> = (0..bands.parts())
        .map(|rank| {
            let mut dims = mine.dims().to_vec();
            dims[HEIGHT] = bands.len(rank) * scale;
            Shape::from(dims)
        })
        .collect();
    Ok(Tensor::cat(&comm.all_gather(mine, &shapes)?, HEIGHT)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    use turbo_core::golden::GoldenFile;

    use super::*;
    use crate::vae::VaeConfig;

    /// Largest `|a − b|` over the largest `|b|`.
    fn max_relative_difference(a: &Tensor, b: &Tensor) -> f32 {
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        max(&(a - b).unwrap()) / max(b)
    }

    /// The golden file's small VAE (the released structure at width 8): with the derived halo
    /// every pixel of a 2×2 tiling equals the untiled decode; with half of it the pixels next
    /// to the cuts differ. (The influence fades towards the edge of the receptive field: with
    /// these weights it is below f32 rounding from about 10 latent pixels, 1e-3 at 6.)
    #[test]
    fn the_derived_halo_is_needed_and_enough() {
        let file = GoldenFile::open("vae").unwrap();
        let cfg = VaeConfig {
            dim: file.config_f64(&["dim"]).unwrap() as usize,
            num_res_blocks: file.config_f64(&["num_res_blocks"]).unwrap() as usize,
            ..VaeConfig::wan21()
        };
        let vb = VarBuilder::from_tensors(file.weights().unwrap(), DType::F32, &Device::Cpu);
        let vae = WanVae::load(vb, &cfg).unwrap();
        let halo = cfg.decode_halo();
        let (height, width) = (2 * halo + 2, 2 * halo + 2);
        // A fixed draw: the tiled decode sums in another order than the whole one, and the
        // difference, at f32 rounding, depends on the values.
        let mut rng = StdRng::seed_from_u64(5);
        let values: Vec<f32> = StandardNormal
            .sample_iter(&mut rng)
            .take(cfg.z_dim * height * width)
            .collect();
        let latent =
            Tensor::from_vec(values, (1, cfg.z_dim, 1, height, width), &Device::Cpu).unwrap();
        let whole = vae.decode(&latent).unwrap();
        let tiling = VaeTiling::grid(2, 2, height, width).unwrap();
        let tiled = |halo| {
            let video = vae.decode_tiled_with_halo(&latent, tiling, halo).unwrap();
            max_relative_difference(&video, &whole)
        };
        let (enough, half) = (tiled(halo), tiled(halo / 2));
        println!(
            "largest difference with halo {halo}: {enough:.3e}, with {}: {half:.3e}",
            halo / 2
        );
        // f32 rounding of the reordered sums (measured 1e-7 – 1.1e-6 over random draws) versus
        // the 1e-3 of a halo that is too small.
        assert!(enough <= 1e-5, "halo {halo}: {enough}");
        assert!(half > 1e-4, "halo {}: {half}", halo / 2);
    }

    /// The released decoder, counted by hand in latent pixels: per level three residual blocks
    /// of two 3×3 convolutions (6 at ×1, 6/2 at ×2, 6/4 at ×4, 6/8 at ×8), an upsampler's 3×3
    /// at ×2, ×4 and ×8 (1/2 + 1/4 + 1/8) and the head's 3×3 at ×8 (1/8): 12.25, so 13.
    #[test]
    fn the_released_decoder_needs_a_halo_of_13() {
        assert_eq!(
            super::super::coder::Coder::decoder_halo(&VaeConfig::wan21()),
            13
        );
    }

    #[test]
    fn spans_cover_the_axis_with_clipped_halos() {
        let spans = Span::cover(10, 4, 3);
        let kept: Vec<_> = spans.iter().map(|s| s.kept).collect();
        let decoded: Vec<_> = spans.iter().map(|s| s.decoded).collect();
        assert_eq!(kept, [(0, 4), (4, 8), (8, 10)]);
        assert_eq!(decoded, [(0, 7), (1, 10), (5, 10)]);
    }
}
