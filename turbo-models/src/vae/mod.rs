//! The Wan2.1 video VAE (`Wan2.1_VAE.pth`; `spec/wan-model.md` §6.1), and the Wan2.2 VAE of
//! TI2V-5B ([`Wan22Vae`], §6.2) built from the same blocks.
//!
//! A causal 3-D convolutional autoencoder compressing ×4 in time and ×8 in space: a video
//! `[B, 3, 4n+1, H, W]` in [-1, 1] maps to a normalised latent `[B, 16, n+1, H/8, W/8]`.
//!
//! Both directions stream, as upstream does, so memory does not grow with the video length:
//! [`WanVae::encode`] feeds the frames in chunks of 1, 4, 4, … and [`WanVae::decode_streaming`]
//! decodes one latent frame at a time, handing each chunk of frames (1, then 4 per latent frame)
//! to a callback as soon as it exists. Every temporal convolution remembers the last two frames
//! of its input between chunks, which reproduces upstream's `feat_cache` exactly, quirks
//! included (the first chunk skips the temporal resampling convolutions, and the temporal
//! upsampler convolves its second chunk with zero history).
//!
//! The official model runs in f32; load it in f32 for parity.

mod blocks;
mod cache;
mod coder;
mod coder22;
mod conv;
mod held;
mod latent;
mod patch;
mod tiling;
mod wan22;

use crate::checkpoint::Checkpoint;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use turbo_core::{Error, FrameCount, Result, VAE_STRIDE};

pub use blocks::ResampleMode;
pub use conv::{
    causal_conv3d_reference, conv2d_biased, conv2d_biased_reference, upsampled_conv2d_biased,
    CausalConv3d, Conv3dSpec,
};

pub use tiling::VaeTiling;
pub use wan22::{Vae22Config, Wan22Vae, WAN22_LATENT_MEAN, WAN22_LATENT_STD};

use cache::FeatureCache;
use coder::Coder;
use held::Held;
use latent::{collect_frames, later_chunks, stream_decode, stream_encode, LatentSide};

/// The per-channel latent mean of the released Wan2.1 VAE (`WanVAE.mean` upstream).
pub const WAN21_LATENT_MEAN: [f32; 16] = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517,
    -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
];

/// The per-channel latent standard deviation of the released Wan2.1 VAE (`WanVAE.std`).
pub const WAN21_LATENT_STD: [f32; 16] = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579,
    1.6382, 1.1253, 2.8251, 1.9160,
];

/// The construction parameters of a Wan2.1 VAE (`WanVAE_` upstream); attention sits only in
/// the middle blocks, as in every released model.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeConfig {
    /// Base width (96 in the released model).
    pub dim: usize,
    /// Latent channels (16).
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

impl VaeConfig {
    /// The released `Wan2.1_VAE.pth`.
    pub fn wan21() -> Self {
        Self {
            dim: 96,
            z_dim: 16,
            dim_mult: vec![1, 2, 4, 4],
            num_res_blocks: 2,
            temporal_downsample: vec![false, true, true],
            latent_mean: WAN21_LATENT_MEAN.to_vec(),
            latent_std: WAN21_LATENT_STD.to_vec(),
        }
    }

    /// Spatial compression: ×2 per downsampler.
    pub fn spatial_stride(&self) -> usize {
        1 << (self.dim_mult.len() - 1)
    }

    /// Latent pixels of context the decoder's upsampling path reads on each side: the halo of
    /// a tile of [`WanVae::decode_tiled`] (13 for the released VAE).
    pub fn decode_halo(&self) -> usize {
        Coder::decoder_halo(self)
    }

    /// Checks that the parameters describe a VAE this implementation runs: the ×4 temporal
    /// compression that 4n+1 frame counts assume, and one mean and std per latent channel.
    pub fn validate(&self) -> Result<()> {
        let invalid = |expected: String, got: Vec<usize>| {
            Err(Error::Shape {
                what: "VAE configuration".into(),
                expected,
                got,
            })
        };
        let levels = self.dim_mult.len();
        if levels < 2 || self.temporal_downsample.len() != levels - 1 {
            return invalid(
                "dim_mult with at least 2 levels and one temporal_downsample flag per downsampler"
                    .into(),
                vec![levels, self.temporal_downsample.len()],
            );
        }
        let temporal = self.temporal_downsample.iter().filter(|&&t| t).count();
        if 1 << temporal != VAE_STRIDE.0 {
            return invalid(
                format!("temporal compression ×{}", VAE_STRIDE.0),
                vec![1 << temporal],
            );
        }
        if self.latent_mean.len() != self.z_dim || self.latent_std.len() != self.z_dim {
            return invalid(
                format!("{} latent means and stds", self.z_dim),
                vec![self.latent_mean.len(), self.latent_std.len()],
            );
        }
        if self.dim == 0 || self.z_dim == 0 || self.dim_mult.contains(&0) {
            return invalid("positive widths".into(), self.dim_mult.clone());
        }
        Ok(())
    }
}

/// A chunk of decoded frames handed out by [`WanVae::decode_streaming`].
#[derive(Debug, Clone)]
pub struct DecodedFrames {
    /// Index of the chunk's first frame within the whole video.
    pub first_frame: usize,
    /// `[B, 3, n, H, W]` in [-1, 1]: 1 frame for the first latent frame, 4 for each later one.
    pub frames: Tensor,
}

/// The Wan2.1 VAE: encoder, decoder, and the 1×1×1 convolutions around the latent.
#[derive(Debug, Clone)]
pub struct WanVae {
    cfg: VaeConfig,
    encoder: Coder,
    decoder: Coder,
    /// `conv1`, `conv2` and the latent statistics.
    latent: LatentSide,
}

impl WanVae {
    /// Loads the weights under `vb` by their checkpoint names (`encoder.*`, `decoder.*`,
    /// `conv1.*`, `conv2.*`). The model computes in `vb`'s dtype and device.
    pub fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            encoder: Coder::load_encoder(vb.pp("encoder"), cfg)?,
            decoder: Coder::load_decoder(vb.pp("decoder"), cfg)?,
            latent: LatentSide::load(&vb, cfg.z_dim, &cfg.latent_mean, &cfg.latent_std)?,
            cfg: cfg.clone(),
        })
    }

    /// Opens a checkpoint (any container [`Checkpoint::open`] reads), checks that it holds
    /// exactly the tensors of `cfg`, and loads it to compute in `dtype` on `device`.
    pub fn from_checkpoint(
        path: impl AsRef<std::path::Path>,
        cfg: &VaeConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let vb = checkpoint.checked_var_builder(&Self::expected_keys(cfg), dtype, device)?;
        Self::load(vb, cfg)
    }

    /// Every checkpoint tensor the model reads, with its shape, in a fixed order.
    pub fn expected_keys(cfg: &VaeConfig) -> Vec<(String, Vec<usize>)> {
        let mut keys = LatentSide::keys(cfg.z_dim);
        keys.extend(Coder::keys(cfg));
        keys
    }

    /// The configuration the model was built with.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// Encodes a video `[B, 3, T, H, W]` in [-1, 1] (T = 4n+1, H and W multiples of the
    /// spatial stride) to its normalised latent mean `[B, z, n+1, H/8, W/8]`.
    pub fn encode(&self, video: &Tensor) -> Result<Tensor> {
        self.check_video(video)?;
        let x = self.latent.time_major_input(video)?;
        let features = self.encode_chunks(&x.narrow(1, 0, 1)?, later_chunks(&x)?)?;
        self.latent.normalised_mean(&features)
    }

    /// Encodes `image` `[B, 3, 1, H, W]` in [-1, 1] followed by `frames − 1` zero frames, the
    /// conditioning video of image-to-video (upstream encodes `cat[image, zeros]`): the latent
    /// of [`WanVae::encode`] of that video, computed only where it can differ. The video is
    /// [`Held`] on a zero frame from its second frame on, and each of the encoder's causal
    /// layers computes its output only up to its first frame past the image's reach (12 of 81
    /// frames at full resolution); later frames repeat that one. The encoder runs in its
    /// whole-sequence form, which holds those frames at once.
    pub fn encode_image(&self, image: &Tensor, frames: FrameCount) -> Result<Tensor> {
        let video = self.image_then_zeros(image, frames.get())?;
        let features = self.encoder.forward_held(&video)?.into_full()?;
        self.latent.normalised_mean(&features)
    }

    /// Encodes `first` and `last` `[B, 3, 1, H, W]` in [-1, 1] with `frames − 2` zero frames
    /// between them, the conditioning video of first-last-frame-to-video (upstream encodes
    /// `cat[first, zeros, last]`): the latent of [`WanVae::encode`] of that video. The encoder
    /// is causal, so every chunk before the last one, which holds `last`, is
    /// [`WanVae::encode_image`]'s work on `first`; the last chunk then streams on from the cache
    /// that work leaves. `frames` is at least 5 (two chunks).
    pub fn encode_first_last(
        &self,
        first: &Tensor,
        last: &Tensor,
        frames: FrameCount,
    ) -> Result<Tensor> {
        if frames.get() <= VAE_STRIDE.0 || first.dims() != last.dims() {
            return Err(Error::Shape {
                what: format!(
                    "VAE first and last frames of a {}-frame video",
                    frames.get()
                ),
                expected: format!(
                    "two images of one shape and at least {} frames",
                    VAE_STRIDE.0 + 1
                ),
                got: last.dims().to_vec(),
            });
        }
        let before_last = self.image_then_zeros(first, frames.get() - VAE_STRIDE.0)?;
        let (held, mut cache) = self.encoder.forward_held_then_stream(&before_last)?;
        let last = self.image_frame(last)?;
        let mut zeros_shape = last.dims().to_vec();
        zeros_shape[1] = VAE_STRIDE.0 - 1;
        let zeros = Tensor::zeros(zeros_shape, last.dtype(), last.device())?;
        let last_chunk = Tensor::cat(&[&zeros, &last], 1)?;
        let tail = self.encoder.forward_chunk(&last_chunk, &mut cache)?;
        let features = Tensor::cat(&[&held.into_full()?, &tail], 1)?;
        self.latent.normalised_mean(&features)
    }

    /// `image` `[B, 3, 1, H, W]` then zero frames, `frames` in all, held on the zero frame.
    fn image_then_zeros(&self, image: &Tensor, frames: usize) -> Result<Held> {
        let x = self.image_frame(image)?;
        if frames == 1 {
            return Held::new(x, 1);
        }
        let zero_frame = x.zeros_like()?;
        Held::new(Tensor::cat(&[&x, &zero_frame], 1)?, frames)
    }

    /// `image` `[B, 3, 1, H, W]` checked and time-major, `[B, 1, 3, H, W]`.
    fn image_frame(&self, image: &Tensor) -> Result<Tensor> {
        self.check_video(image)?;
        if image.dim(2)? != 1 {
            return Err(Error::Shape {
                what: "VAE input image".into(),
                expected: "[B, 3, 1, H, W]".into(),
                got: image.dims().to_vec(),
            });
        }
        self.latent.time_major_input(image)
    }

    /// [`stream_encode`] through this VAE's encoder.
    fn encode_chunks(
        &self,
        first: &Tensor,
        rest: impl Iterator<Item = candle_core::Result<Tensor>>,
    ) -> Result<Tensor> {
        stream_encode(first, rest, |chunk, cache| {
            self.encoder.forward_chunk(chunk, cache)
        })
    }

    /// The reference twin of [`WanVae::encode`]: the whole video in one pass through the
    /// sequence-equivalent form of every streaming rule. Same result; memory grows with the
    /// length. For tests.
    pub fn encode_reference(&self, video: &Tensor) -> Result<Tensor> {
        self.check_video(video)?;
        let x = self.latent.time_major_input(video)?;
        let features = self
            .encoder
            .forward_chunk(&x, &mut FeatureCache::whole_sequence())?;
        self.latent.normalised_mean(&features)
    }

    /// Decodes a normalised latent `[B, z, T, h, w]` to a video `[B, 3, 4(T−1)+1, 8h, 8w]`
    /// clamped to [-1, 1] (upstream `WanVAE.decode`). Collects the chunks of
    /// [`WanVae::decode_streaming`].
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        self.collect_chunks(latent, true)
    }

    /// [`WanVae::decode`] without the final clamp (upstream `WanVAE_.decode`): the decoder's
    /// output can stray slightly outside [-1, 1].
    pub fn decode_unclamped(&self, latent: &Tensor) -> Result<Tensor> {
        self.collect_chunks(latent, false)
    }

    /// Decodes one latent frame at a time and hands each chunk of frames, clamped to [-1, 1],
    /// to `on_frames` as soon as it is ready, so a caller can show or write the first frames
    /// before the rest exist. Memory stays that of one chunk whatever the length. An error from
    /// `on_frames` stops the decode and is returned.
    pub fn decode_streaming(
        &self,
        latent: &Tensor,
        on_frames: impl FnMut(DecodedFrames) -> Result<()>,
    ) -> Result<()> {
        self.decode_chunks(latent, true, on_frames)
    }

    fn collect_chunks(&self, latent: &Tensor, clamp: bool) -> Result<Tensor> {
        collect_frames(|on_frames| self.decode_chunks(latent, clamp, on_frames))
    }

    /// The reference twin of [`WanVae::decode_unclamped`]: all latent frames in one pass
    /// through the sequence-equivalent form of every streaming rule. Same result; memory grows
    /// with the length. For tests.
    pub fn decode_reference(&self, latent: &Tensor) -> Result<Tensor> {
        let x = self.latent.decoder_input(latent)?;
        let video = self
            .decoder
            .forward_chunk(&x, &mut FeatureCache::whole_sequence())?;
        to_channel_major(&video)
    }

    fn decode_chunks(
        &self,
        latent: &Tensor,
        clamp: bool,
        on_frames: impl FnMut(DecodedFrames) -> Result<()>,
    ) -> Result<()> {
        let mut cache = FeatureCache::default();
        let decode_frame = |frame: &Tensor, _| self.decoder.forward_chunk(frame, &mut cache);
        stream_decode(&self.latent, latent, clamp, decode_frame, on_frames)
    }

    fn check_video(&self, video: &Tensor) -> Result<(usize, usize, usize, usize, usize)> {
        let stride = self.cfg.spatial_stride();
        let dims = video.dims5().map_err(|_| Error::Shape {
            what: "VAE input video".into(),
            expected: "[B, 3, T, H, W]".into(),
            got: video.dims().to_vec(),
        })?;
        let (batch, channels, frames, height, width) = dims;
        let fits = |side: usize| side > 0 && side % stride == 0;
        if batch == 0 || channels != 3 || !fits(height) || !fits(width) {
            return Err(Error::Shape {
                what: "VAE input video".into(),
                expected: format!(
                    "[B, 3, T, H, W] with B ≥ 1 and H, W positive multiples of {stride}"
                ),
                got: video.dims().to_vec(),
            });
        }
        FrameCount::new(frames)?;
        Ok(dims)
    }
}

/// `[B, C, T, H, W]` → `[B, T, C, H, W]`.
fn to_time_major(x: &Tensor) -> Result<Tensor> {
    Ok(x.permute((0, 2, 1, 3, 4))?.contiguous()?)
}

/// `[B, T, C, H, W]` → `[B, C, T, H, W]`.
fn to_channel_major(x: &Tensor) -> Result<Tensor> {
    Ok(x.permute((0, 2, 1, 3, 4))?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    use super::*;

    /// The released structure at a small width, with seeded random weights.
    fn small_vae() -> WanVae {
        let cfg = VaeConfig {
            dim: 8,
            ..VaeConfig::wan21()
        };
        let mut rng = StdRng::seed_from_u64(7);
        let weights = WanVae::expected_keys(&cfg)
            .into_iter()
            .map(|(name, shape)| {
                let count = shape.iter().product::<usize>();
                let values: Vec<f32> = (0..count)
                    .map(|_| {
                        let value: f32 = StandardNormal.sample(&mut rng);
                        0.2 * value
                    })
                    .collect();
                (name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap())
            })
            .collect();
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        WanVae::load(vb, &cfg).unwrap()
    }

    /// A random image `[1, 3, 1, 16, 24]` in [-1, 1].
    fn random_image() -> Tensor {
        Tensor::randn(0f32, 0.5, (1, 3, 1, 16, 24), &Device::Cpu)
            .unwrap()
            .clamp(-1f32, 1f32)
            .unwrap()
    }

    /// Asserts that `shortcut` is `vae.encode(video)` bit for bit.
    fn assert_is_the_full_encode(vae: &WanVae, video: &[&Tensor], shortcut: Tensor) {
        let full = vae.encode(&Tensor::cat(video, 2).unwrap()).unwrap();
        assert_eq!(full.dims(), shortcut.dims());
        let differing = full
            .ne(&shortcut)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let frames = full.dim(2).unwrap();
        assert_eq!(
            differing, 0.0,
            "{frames} latent frames: latents differ from the full encode"
        );
    }

    fn zero_frames(count: usize) -> Tensor {
        Tensor::zeros((1, 3, count, 16, 24), DType::F32, &Device::Cpu).unwrap()
    }

    /// The image encode is the full encode of `cat[image, zeros]` bit for bit: videos shorter
    /// than the encoder's reach (1, 5 frames), one whose deepest layers reach its end (41), and
    /// one that every level holds for long (81).
    #[test]
    fn image_encode_equals_the_encode_of_image_and_zero_frames() {
        let vae = small_vae();
        let image = random_image();
        for count in [1, 5, 41, 81] {
            let shortcut = vae
                .encode_image(&image, FrameCount::new(count).unwrap())
                .unwrap();
            assert_is_the_full_encode(&vae, &[&image, &zero_frames(count - 1)], shortcut);
        }
    }

    /// The first-last encode is the full encode of `cat[first, zeros, last]` bit for bit: the
    /// shortest video (one chunk before the last, no zero frame held), one whose deepest layers
    /// reach its end, and a long one.
    #[test]
    fn first_last_encode_equals_the_encode_of_the_whole_video() {
        let vae = small_vae();
        let (first, last) = (random_image(), random_image());
        for count in [5, 9, 41, 81] {
            let shortcut = vae
                .encode_first_last(&first, &last, FrameCount::new(count).unwrap())
                .unwrap();
            let zeros = zero_frames(count - 2);
            assert_is_the_full_encode(&vae, &[&first, &zeros, &last], shortcut);
        }
    }

    #[test]
    fn first_last_encode_needs_two_chunks_and_images_of_one_shape() {
        let vae = small_vae();
        let image = Tensor::zeros((1, 3, 1, 16, 16), DType::F32, &Device::Cpu).unwrap();
        let wider = Tensor::zeros((1, 3, 1, 16, 24), DType::F32, &Device::Cpu).unwrap();
        let one = FrameCount::new(1).unwrap();
        let nine = FrameCount::new(9).unwrap();
        for (last, frames) in [(&image, one), (&wider, nine)] {
            assert!(matches!(
                vae.encode_first_last(&image, last, frames),
                Err(Error::Shape { .. })
            ));
        }
    }

    #[test]
    fn image_encode_takes_one_frame() {
        let vae = small_vae();
        let video = Tensor::zeros((1, 3, 5, 16, 16), DType::F32, &Device::Cpu).unwrap();
        let frames = FrameCount::new(9).unwrap();
        assert!(matches!(
            vae.encode_image(&video, frames),
            Err(Error::Shape { .. })
        ));
    }
}
