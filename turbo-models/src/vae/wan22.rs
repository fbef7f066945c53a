//! The Wan2.2 video VAE (`Wan2.2_VAE.pth`; `spec/wan-model.md` §6.2), used by TI2V-5B.
//!
//! A video `[B, 3, 4n+1, H, W]` in [-1, 1] maps to a normalised latent
//! `[B, 48, n+1, H/16, W/16]`: a 2×2 pixel unshuffle into 12 channels, then an encoder of the
//! Wan2.1 building blocks compressing ×8 in space and ×4 in time, whose levels add averaging
//! shortcuts; the decoder mirrors it with duplicating shortcuts and a wider base. Encode and
//! decode stream chunk by chunk with the same cache rules as the Wan2.1 VAE.
//!
//! The official model runs in f32; load it in f32 for parity.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use turbo_core::parallel::Communicator;
use turbo_core::{Error, FrameCount, Result};

use super::cache::FeatureCache;
use super::coder22::Coder22;
use super::latent::{collect_frames, later_chunks, stream_decode, stream_encode, LatentSide};
use super::patch::{patchify, unpatchify, PATCH};
use super::tiling::{gather_bands, row_bands, Span, HEIGHT};
use super::{to_channel_major, DecodedFrames, VaeConfig};
use crate::checkpoint::Checkpoint;

/// The per-channel latent mean of the released Wan2.2 VAE (`Wan2_2_VAE.mean` upstream).
pub const WAN22_LATENT_MEAN: [f32; 48] = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
    0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
    -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
    -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
    0.3573, -0.0548, -0.1681, -0.0667,
];

/// The per-channel latent standard deviation of the released Wan2.2 VAE (`Wan2_2_VAE.std`).
pub const WAN22_LATENT_STD: [f32; 48] = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
];

/// The construction parameters of a Wan2.2 VAE (`WanVAE_` of `vae2_2.py`).
#[derive(Debug, Clone, PartialEq)]
pub struct Vae22Config {
    /// Encoder base width (160 in the release).
    pub dim: usize,
    /// Decoder base width (256 in the release).
    pub dec_dim: usize,
    /// Latent channels (48).
    pub z_dim: usize,
    /// Width multipliers per level (`[1, 2, 4, 4]`).
    pub dim_mult: Vec<usize>,
    /// Residual blocks per encoder level (2; the decoder has one more).
    pub num_res_blocks: usize,
    /// Which encoder downsamplers also halve time (`[false, true, true]`); the decoder uses the
    /// reverse.
    pub temporal_downsample: Vec<bool>,
    /// Per-channel latent mean, `z_dim` values.
    pub latent_mean: Vec<f32>,
    /// Per-channel latent standard deviation, `z_dim` values.
    pub latent_std: Vec<f32>,
}

impl Vae22Config {
    /// From a JSON config with upstream's `WanVAE_` arguments (`dim`, `dec_dim`, `z_dim`,
    /// `dim_mult`, `num_res_blocks`, `temperal_downsample`, as upstream spells it) and the
    /// latent statistics, which upstream keeps beside the model rather than in its arguments.
    pub fn from_value(
        value: &serde_json::Value,
        latent_mean: Vec<f32>,
        latent_std: Vec<f32>,
    ) -> Result<Self> {
        let fields = crate::config_fields::ConfigFields(value);
        Ok(Self {
            dim: fields.usize("dim")?,
            dec_dim: fields.usize("dec_dim")?,
            z_dim: fields.usize("z_dim")?,
            dim_mult: fields.usize_list("dim_mult")?,
            num_res_blocks: fields.usize("num_res_blocks")?,
            temporal_downsample: fields.bool_list("temperal_downsample")?,
            latent_mean,
            latent_std,
        })
    }

    /// The released `Wan2.2_VAE.pth`.
    pub fn wan22() -> Self {
        Self {
            dim: 160,
            dec_dim: 256,
            z_dim: 48,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            temporal_downsample: vec![false, true, true],
            latent_mean: WAN22_LATENT_MEAN.to_vec(),
            latent_std: WAN22_LATENT_STD.to_vec(),
        }
    }

    /// Spatial compression: the 2×2 patch, then ×2 per downsampler (16 in the release).
    pub fn spatial_stride(&self) -> usize {
        PATCH << (self.dim_mult.len() - 1)
    }

    /// Latent pixels of context the decoder's levels and head read on each side: the halo of
    /// a band of [`Wan22Vae::decode_parallel`] (13 for the released VAE).
    pub fn decode_halo(&self) -> usize {
        Coder22::decoder_halo(self)
    }

    /// Checks that the parameters describe a VAE this implementation runs: the checks of
    /// [`VaeConfig::validate`] on the shared parameters (×4 temporal compression, one mean and
    /// std per latent channel, positive widths) and a positive decoder width.
    pub fn validate(&self) -> Result<()> {
        VaeConfig {
            dim: self.dim,
            z_dim: self.z_dim,
            dim_mult: self.dim_mult.clone(),
            num_res_blocks: self.num_res_blocks,
            temporal_downsample: self.temporal_downsample.clone(),
            latent_mean: self.latent_mean.clone(),
            latent_std: self.latent_std.clone(),
        }
        .validate()?;
        if self.dec_dim == 0 || self.num_res_blocks == 0 {
            return Err(Error::Shape {
                what: "Wan2.2 VAE configuration".into(),
                expected: "positive dec_dim and num_res_blocks".into(),
                got: vec![self.dec_dim, self.num_res_blocks],
            });
        }
        Ok(())
    }
}

/// The Wan2.2 VAE: encoder, decoder, and the 1×1×1 convolutions around the latent.
#[derive(Debug, Clone)]
pub struct Wan22Vae {
    cfg: Vae22Config,
    encoder: Coder22,
    decoder: Coder22,
    /// `conv1`, `conv2` and the latent statistics.
    latent: LatentSide,
}

impl Wan22Vae {
    /// Loads the weights under `vb` by their checkpoint names (`encoder.*`, `decoder.*`,
    /// `conv1.*`, `conv2.*`). The model computes in `vb`'s dtype and device.
    pub fn load(vb: VarBuilder, cfg: &Vae22Config) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            encoder: Coder22::load_encoder(vb.pp("encoder"), cfg)?,
            decoder: Coder22::load_decoder(vb.pp("decoder"), cfg)?,
            latent: LatentSide::load(&vb, cfg.z_dim, &cfg.latent_mean, &cfg.latent_std)?,
            cfg: cfg.clone(),
        })
    }

    /// Opens a checkpoint (any container [`Checkpoint::open`] reads: `Wan2.2_VAE.pth`, a
    /// conversion), checks that it holds exactly the tensors of `cfg`, and loads it to compute
    /// in `dtype` on `device`.
    pub fn from_checkpoint(
        path: impl AsRef<std::path::Path>,
        cfg: &Vae22Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let vb = checkpoint.checked_var_builder(&Self::expected_keys(cfg), dtype, device)?;
        Self::load(vb, cfg)
    }

    /// Every checkpoint tensor the model reads, with its shape, in a fixed order.
    pub fn expected_keys(cfg: &Vae22Config) -> Vec<(String, Vec<usize>)> {
        let mut keys = Coder22::keys(cfg);
        keys.extend(LatentSide::keys(cfg.z_dim));
        keys
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &Vae22Config {
        &self.cfg
    }

    /// Encodes a video `[B, 3, T, H, W]` in [-1, 1] (T = 4n+1, H and W multiples of 16) to its
    /// normalised latent mean `[B, z, n+1, H/16, W/16]`, in chunks of 1, 4, 4, … frames.
    /// TI2V's image condition is the encode of the image as a one-frame video.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        let x = self.encoder_input(video)?;
        let features = stream_encode(&x.narrow(1, 0, 1)?, later_chunks(&x)?, |chunk, cache| {
            self.encoder.encode_chunk(chunk, cache)
        })?;
        self.latent.normalised_mean(&features)
    }

    /// The reference twin of [`Wan22Vae::encode`]: the whole video in one pass through the
    /// sequence-equivalent form of every streaming rule. For tests.
    pub fn encode_reference(&self, video: &Tensor) -> Result<Tensor> {
        let x = self.encoder_input(video)?;
        let features = self
            .encoder
            .encode_chunk(&x, &mut FeatureCache::whole_sequence())?;
        self.latent.normalised_mean(&features)
    }

    /// Checks `video` and patchifies it, time-major: `[B, T, 12, H/2, W/2]`.
    fn encoder_input(&self, video: &Tensor) -> Result<Tensor> {
        let stride = self.cfg.spatial_stride();
        let valid = match video.dims5() {
            Ok((b, 3, t, h, w)) => {
                b > 0 && h > 0 && w > 0 && h % stride == 0 && w % stride == 0 && t > 0
            }
            _ => false,
        };
        if !valid {
            return Err(Error::Shape {
                what: "Wan2.2 VAE input video".into(),
                expected: format!(
                    "[B, 3, T, H, W] with B ≥ 1 and H, W positive multiples of {stride}"
                ),
                got: video.dims().to_vec(),
            });
        }
        FrameCount::new(video.dim(2)?)?;
        patchify(&self.latent.time_major_input(video)?)
    }

    /// Decodes a normalised latent `[B, z, T, h, w]` to a video `[B, 3, 4(T−1)+1, 16h, 16w]`
    /// clamped to [-1, 1] (upstream `Wan2_2_VAE.decode`).
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        self.collect_chunks(latent, true)
    }

    /// [`Wan22Vae::decode`] without the final clamp (upstream `WanVAE_.decode`).
    pub fn decode_unclamped(&self, latent: &Tensor) -> Result<Tensor> {
        self.collect_chunks(latent, false)
    }

    /// Decodes one latent frame at a time and hands each chunk of frames (1, then 4 per latent
    /// frame), clamped to [-1, 1], to `on_frames` as soon as it is ready. An error from
    /// `on_frames` stops the decode and is returned.
    pub fn decode_streaming(
        &self,
        latent: &Tensor,
        on_frames: impl FnMut(DecodedFrames) -> Result<()>,
    ) -> Result<()> {
        self.decode_chunks(latent, true, on_frames)
    }

    /// The reference twin of [`Wan22Vae::decode_unclamped`]: all latent frames in one pass
    /// through the sequence-equivalent form of every streaming rule. For tests.
    pub fn decode_reference(&self, latent: &Tensor) -> Result<Tensor> {
        let x = self.latent.decoder_input(latent)?;
        let frames = self
            .decoder
            .decode_chunk(&x, &mut FeatureCache::whole_sequence(), true)?;
        to_channel_major(&unpatchify(&frames)?)
    }

    /// [`Wan22Vae::decode`] spread over the ranks of `comm`, as [`WanVae::decode_parallel`]
    /// spreads the Wan2.1 decode: `conv1` and the middle blocks (at latent resolution, with the
    /// frame-wide attention) run whole on every rank, the levels and the head on one band of
    /// latent rows per rank widened by [`Vae22Config::decode_halo`], and the bands are gathered
    /// on every rank. Every rank returns the whole video, equal to the one-device decode up to
    /// float rounding. A latent with fewer rows than ranks is an [`Error::InvalidConfig`].
    ///
    /// [`WanVae::decode_parallel`]: super::WanVae::decode_parallel
    pub fn decode_parallel(&self, latent: &Tensor, comm: &dyn Communicator) -> Result<Tensor> {
        let x = self.latent.decoder_input(latent)?;
        let (_, frames, _, height, _) = x.dims5()?;
        let bands = row_bands(height, comm)?;
        let row = Span::band(bands.range(comm.rank()), height, self.cfg.decode_halo());
        // The decoder's output is patchified: 2×2 pixels per position.
        let scale = self.cfg.spatial_stride() / PATCH;
        let mut middle_cache = FeatureCache::default();
        let mut band_cache = FeatureCache::default();
        let chunks = (0..frames)
            .map(|t| {
                let middle = self
                    .decoder
                    .decode_middle_chunk(&x.narrow(1, t, 1)?, &mut middle_cache)?;
                let band = row.decoded_part(&middle, HEIGHT)?.contiguous()?;
                let decoded =
                    self.decoder
                        .decode_upsampling_chunk(&band, &mut band_cache, t == 0)?;
                // A copy, so that the uncropped decode is freed.
                Ok(row.kept_part(&decoded, HEIGHT, scale)?.contiguous()?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mine = Tensor::cat(&chunks, 1)?;
        let video = unpatchify(&gather_bands(&mine, &bands, scale, comm)?)?;
        to_channel_major(&video.clamp(-1f32, 1f32)?)
    }

    fn collect_chunks(&self, latent: &Tensor, clamp: bool) -> Result<Tensor> {
        collect_frames(|on_frames| self.decode_chunks(latent, clamp, on_frames))
    }

    /// Streams the decode; the first latent frame is the decoder's first chunk.
    fn decode_chunks(
        &self,
        latent: &Tensor,
        clamp: bool,
        on_frames: impl FnMut(DecodedFrames) -> Result<()>,
    ) -> Result<()> {
        let mut cache = FeatureCache::default();
        let decode_frame = |frame: &Tensor, t: usize| {
            unpatchify(&self.decoder.decode_chunk(frame, &mut cache, t == 0)?)
        };
        stream_decode(&self.latent, latent, clamp, decode_frame, on_frames)
    }
}
