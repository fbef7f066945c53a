//! The Wan2.2 VAE's `Encoder3d` and `Decoder3d` (`spec/wan-model.md` §6.2): the Wan2.1
//! building blocks (residual blocks, middle attention, resampling, causal convolutions and
//! their streaming cache) grouped into levels, each with a parameter-free shortcut
//! (`AvgDown3D` down, `DupUp3D` up) around it, over 2×2-patchified frames.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use turbo_core::Result;

use super::blocks::{Keys, Resample, ResampleMode, ResidualBlock};
use super::cache::{cached_conv, FeatureCache};
use super::coder::{Head, Middle};
use super::conv::{CausalConv3d, Conv3dSpec};
use super::patch::{avg_down, dup_up, Factors, PATCH};
use super::wan22::Vae22Config;

/// Channels of a 2×2-patchified RGB frame, the encoder's input and the decoder's output.
pub const PATCH_CHANNELS: usize = 3 * PATCH * PATCH;

/// One level (`Down_ResidualBlock` / `Up_ResidualBlock`): its residual blocks, its resampler
/// and its shortcut's factors, as the configuration gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LevelPlan {
    in_channels: usize,
    out_channels: usize,
    blocks: usize,
    /// The resampler at the end of the level (none on the last level).
    resample: Option<ResampleMode>,
}

impl LevelPlan {
    /// The shortcut's factors: ×2 in space with a resampler, ×2 in time with a temporal one.
    fn factors(self) -> Factors {
        let temporal = matches!(
            self.resample,
            Some(ResampleMode::Downsample3d | ResampleMode::Upsample3d)
        );
        Factors {
            time: if temporal { 2 } else { 1 },
            space: if self.resample.is_some() { 2 } else { 1 },
        }
    }

    /// The checkpoint keys under `prefix` (`encoder.downsamples.N` / `decoder.upsamples.N`),
    /// whose inner sequence is named `inner`.
    fn keys(self, prefix: &str, inner: &str) -> Keys {
        let mut keys = Keys::new();
        let mut in_channels = self.in_channels;
        for i in 0..self.blocks {
            keys.extend(ResidualBlock::keys(
                &format!("{prefix}.{inner}.{i}"),
                in_channels,
                self.out_channels,
            ));
            in_channels = self.out_channels;
        }
        if let Some(mode) = self.resample {
            keys.extend(Resample::keys_to(
                &format!("{prefix}.{inner}.{}", self.blocks),
                self.out_channels,
                self.out_channels,
                mode,
            ));
        }
        keys
    }

    fn load(self, vb: VarBuilder) -> Result<Level> {
        let mut residuals = Vec::with_capacity(self.blocks);
        let mut in_channels = self.in_channels;
        for i in 0..self.blocks {
            residuals.push(ResidualBlock::load(
                vb.pp(i),
                in_channels,
                self.out_channels,
            )?);
            in_channels = self.out_channels;
        }
        let resample = self
            .resample
            .map(|mode| {
                Resample::load_to(
                    vb.pp(self.blocks),
                    self.out_channels,
                    self.out_channels,
                    mode,
                )
            })
            .transpose()?;
        Ok(Level {
            residuals,
            resample,
            out_channels: self.out_channels,
            factors: self.factors(),
        })
    }
}

/// A loaded level.
#[derive(Debug, Clone)]
struct Level {
    residuals: Vec<ResidualBlock>,
    resample: Option<Resample>,
    out_channels: usize,
    factors: Factors,
}

impl Level {
    /// The main path: residual blocks, then the resampler.
    fn main(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let mut x = x.clone();
        for block in &self.residuals {
            x = block.forward(&x, cache)?;
        }
        match &self.resample {
            Some(resample) => resample.forward(&x, cache),
            None => Ok(x),
        }
    }
}

/// Upstream `Encoder3d` / `Decoder3d` widths and levels.
struct CoderPlan {
    conv_in: Conv3dSpec,
    levels: Vec<LevelPlan>,
    middle_channels: usize,
    head: Conv3dSpec,
}

impl CoderPlan {
    /// Widths `dim·[1, mult…]`, `num_res_blocks` blocks per level, a downsampler ending every
    /// level but the last (temporal where `temporal_downsample` says so).
    fn encoder(cfg: &Vae22Config) -> Self {
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| cfg.dim * m)
            .collect();
        let levels = cfg.dim_mult.len();
        let plans = (0..levels)
            .map(|i| LevelPlan {
                in_channels: dims[i],
                out_channels: dims[i + 1],
                blocks: cfg.num_res_blocks,
                resample: (i + 1 != levels).then(|| {
                    if cfg.temporal_downsample[i] {
                        ResampleMode::Downsample3d
                    } else {
                        ResampleMode::Downsample2d
                    }
                }),
            })
            .collect();
        let top = dims[levels];
        Self {
            conv_in: Conv3dSpec::cube(PATCH_CHANNELS, dims[0], 3, 1),
            levels: plans,
            middle_channels: top,
            head: Conv3dSpec::cube(top, 2 * cfg.z_dim, 3, 1),
        }
    }

    /// Widths `dec_dim·[mult_last, mult reversed…]`, `num_res_blocks + 1` blocks per level,
    /// an upsampler (keeping the width) ending every level but the last (temporal where the
    /// reversed `temporal_downsample` says so).
    fn decoder(cfg: &Vae22Config) -> Self {
        let mults: Vec<usize> = cfg.dim_mult.iter().rev().copied().collect();
        let dims: Vec<usize> = std::iter::once(mults[0])
            .chain(mults.iter().copied())
            .map(|m| cfg.dec_dim * m)
            .collect();
        let temporal_upsample: Vec<bool> = cfg.temporal_downsample.iter().rev().copied().collect();
        let levels = mults.len();
        let plans = (0..levels)
            .map(|i| LevelPlan {
                in_channels: dims[i],
                out_channels: dims[i + 1],
                blocks: cfg.num_res_blocks + 1,
                resample: (i + 1 != levels).then(|| {
                    if temporal_upsample[i] {
                        ResampleMode::Upsample3d
                    } else {
                        ResampleMode::Upsample2d
                    }
                }),
            })
            .collect();
        Self {
            conv_in: Conv3dSpec::cube(cfg.z_dim, dims[0], 3, 1),
            levels: plans,
            middle_channels: dims[0],
            head: Conv3dSpec::cube(dims[levels], PATCH_CHANNELS, 3, 1),
        }
    }

    /// The decoder's halo (see [`Coder22::decoder_halo`]), counted back from the head in
    /// pixels of each scale: a convolution of spatial padding `p` adds `p`, and each ×2
    /// upsampler (nearest, then its 3×3) halves the reach, rounded up, since its input pixel `i`
    /// feeds output pixels `2i` and `2i + 1`. The shortcuts (`DupUp3D`) read one input pixel
    /// per output pixel and add nothing.
    fn upsampling_halo(&self) -> usize {
        let mut reach = self.head.padding.1;
        for level in self.levels.iter().rev() {
            if let Some(mode) = level.resample {
                reach = (reach + mode.spatial_padding()).div_ceil(2);
            }
            let mut in_channels = level.in_channels;
            for _ in 0..level.blocks {
                reach += ResidualBlock::spatial_padding(in_channels, level.out_channels);
                in_channels = level.out_channels;
            }
        }
        reach
    }

    /// The keys under `coder` (`encoder` / `decoder`), whose levels are in `sequence`
    /// (`downsamples` / `upsamples`, also the name of each level's inner sequence).
    fn keys(&self, coder: &str, sequence: &str) -> Keys {
        let mut keys = self.conv_in.keys(&format!("{coder}.conv1"));
        for (i, level) in self.levels.iter().enumerate() {
            keys.extend(level.keys(&format!("{coder}.{sequence}.{i}"), sequence));
        }
        keys.extend(Middle::keys(coder, self.middle_channels));
        keys.extend(Head::keys(coder, self.head));
        keys
    }

    fn load(&self, vb: VarBuilder, sequence: &str) -> Result<Coder22> {
        let levels = self
            .levels
            .iter()
            .enumerate()
            .map(|(i, level)| level.load(vb.pp(sequence).pp(i).pp(sequence)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Coder22 {
            conv_in: CausalConv3d::load(vb.pp("conv1"), self.conv_in)?,
            levels,
            middle: Middle::load(vb.pp("middle"), self.middle_channels)?,
            head: Head::load(vb.pp("head"), self.head)?,
        })
    }
}

/// The Wan2.2 encoder or decoder; their layouts differ only in the order of the parts and in
/// their shortcuts.
#[derive(Debug, Clone)]
pub struct Coder22 {
    conv_in: CausalConv3d,
    levels: Vec<Level>,
    middle: Middle,
    head: Head,
}

impl Coder22 {
    /// The encoder under `vb` (`encoder.*`).
    pub fn load_encoder(vb: VarBuilder, cfg: &Vae22Config) -> Result<Self> {
        CoderPlan::encoder(cfg).load(vb, "downsamples")
    }

    /// The decoder under `vb` (`decoder.*`).
    pub fn load_decoder(vb: VarBuilder, cfg: &Vae22Config) -> Result<Self> {
        CoderPlan::decoder(cfg).load(vb, "upsamples")
    }

    /// The encoder's and the decoder's checkpoint keys.
    pub fn keys(cfg: &Vae22Config) -> Keys {
        let mut keys = CoderPlan::encoder(cfg).keys("encoder", "downsamples");
        keys.extend(CoderPlan::decoder(cfg).keys("decoder", "upsamples"));
        keys
    }

    /// One encoder chunk `[B, T, 12, H, W]` (patchified frames) → features `[B, T', 2z, h, w]`.
    /// Each level adds the average of its input's blocks (`AvgDown3D`) to its main path; the
    /// shortcut needs no cache because chunks (1, then 4 frames) start on its time blocks.
    pub fn encode_chunk(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        cache.start_chunk();
        let mut x = cached_conv(&self.conv_in, x, cache)?;
        for level in &self.levels {
            let main = level.main(&x, cache)?;
            x = (main + avg_down(&x, level.out_channels, level.factors)?)?;
        }
        let x = self.middle.forward(&x, cache)?;
        self.head.forward(&x, cache)
    }

    /// One decoder chunk (one latent frame, or the whole latent with
    /// [`FeatureCache::whole_sequence`]) `[B, T, z, h, w]` → patchified frames. Each level
    /// but the last adds its input duplicated over its blocks (`DupUp3D`); on the first chunk
    /// (`first_chunk`, always in the whole-sequence form, whose first frame is that chunk's) the
    /// duplicate of the first frame in time is dropped, as the temporal upsampler keeps the
    /// first frame single.
    pub fn decode_chunk(
        &self,
        x: &Tensor,
        cache: &mut FeatureCache,
        first_chunk: bool,
    ) -> Result<Tensor> {
        cache.start_chunk();
        let x = self.middle_part(x, cache)?;
        self.upsampling_part(&x, cache, first_chunk)
    }

    /// The decoder's part at latent resolution, whose attention sees the whole frame:
    /// `conv1` and the middle blocks, for one chunk.
    pub fn decode_middle_chunk(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        cache.start_chunk();
        self.middle_part(x, cache)
    }

    /// The decoder's convolutional rest (the levels and the head) for one chunk of
    /// [`Coder22::decode_middle_chunk`]'s output, with a cache of its own; `first_chunk` as
    /// for [`Coder22::decode_chunk`].
    pub fn decode_upsampling_chunk(
        &self,
        x: &Tensor,
        cache: &mut FeatureCache,
        first_chunk: bool,
    ) -> Result<Tensor> {
        cache.start_chunk();
        self.upsampling_part(x, cache, first_chunk)
    }

    /// Latent pixels of context the decoder's levels and head read on each side of an output
    /// pixel: the halo of a band of latent rows decoded on its own.
    pub fn decoder_halo(cfg: &Vae22Config) -> usize {
        CoderPlan::decoder(cfg).upsampling_halo()
    }

    fn middle_part(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let x = cached_conv(&self.conv_in, x, cache)?;
        self.middle.forward(&x, cache)
    }

    fn upsampling_part(
        &self,
        x: &Tensor,
        cache: &mut FeatureCache,
        first_chunk: bool,
    ) -> Result<Tensor> {
        let first_chunk = first_chunk || cache.is_whole_sequence();
        let mut x = x.clone();
        for level in &self.levels {
            let main = level.main(&x, cache)?;
            x = match level.resample {
                Some(_) => (main + dup_up(&x, level.out_channels, level.factors, first_chunk)?)?,
                None => main,
            };
        }
        self.head.forward(&x, cache)
    }
}
