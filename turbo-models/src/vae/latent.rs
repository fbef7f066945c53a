//! What both Wan VAEs do around their latent: the 1×1×1 convolutions `conv1` (encoder output →
//! μ, log σ²) and `conv2` (latent → decoder input), the per-channel normalisation, and the
//! frame-by-frame streaming of the decode.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use turbo_core::{Error, Result, VAE_STRIDE};

use super::cache::FeatureCache;
use super::conv::{CausalConv3d, Conv3dSpec};
use super::{to_channel_major, to_time_major, DecodedFrames};

/// `conv1`, `conv2` and the latent statistics of a VAE with `z` latent channels.
#[derive(Debug, Clone)]
pub struct LatentSide {
    z_dim: usize,
    /// `conv1` upstream: encoder output → (μ, log σ²).
    quant_conv: CausalConv3d,
    /// `conv2` upstream: latent → decoder input.
    post_quant_conv: CausalConv3d,
    /// `[1, 1, z, 1, 1]`, broadcasting over time-major latents.
    latent_mean: Tensor,
    latent_std: Tensor,
    dtype: DType,
    device: Device,
}

impl LatentSide {
    /// Reads `conv1` and `conv2` under the model root `vb`; `mean` and `std` have `z_dim`
    /// values.
    pub fn load(vb: &VarBuilder, z_dim: usize, mean: &[f32], std: &[f32]) -> Result<Self> {
        let (quant, post_quant) = Self::convs(z_dim);
        let channel_vector = |values: &[f32]| -> Result<Tensor> {
            Ok(
                Tensor::from_slice(values, (1, 1, z_dim, 1, 1), vb.device())?
                    .to_dtype(vb.dtype())?,
            )
        };
        Ok(Self {
            z_dim,
            quant_conv: CausalConv3d::load(vb.pp("conv1"), quant)?,
            post_quant_conv: CausalConv3d::load(vb.pp("conv2"), post_quant)?,
            latent_mean: channel_vector(mean)?,
            latent_std: channel_vector(std)?,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// The keys of `conv1` and `conv2`.
    pub fn keys(z_dim: usize) -> Vec<(String, Vec<usize>)> {
        let (quant, post_quant) = Self::convs(z_dim);
        let mut keys = quant.keys("conv1");
        keys.extend(post_quant.keys("conv2"));
        keys
    }

    fn convs(z_dim: usize) -> (Conv3dSpec, Conv3dSpec) {
        (
            Conv3dSpec::cube(2 * z_dim, 2 * z_dim, 1, 0),
            Conv3dSpec::cube(z_dim, z_dim, 1, 0),
        )
    }

    /// `x` `[B, C, T, H, W]` on the model's device and dtype, time-major `[B, T, C, H, W]`.
    pub fn time_major_input(&self, x: &Tensor) -> Result<Tensor> {
        to_time_major(&x.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// The encoder output `[B, T, 2z, h, w]` → normalised μ `[B, z, T, h, w]`.
    pub fn normalised_mean(&self, features: &Tensor) -> Result<Tensor> {
        let moments = self.quant_conv.forward(features, None)?;
        let mean = moments.narrow(2, 0, self.z_dim)?;
        // Upstream multiplies by 1/std rather than dividing by std.
        let normalised = mean
            .broadcast_sub(&self.latent_mean)?
            .broadcast_mul(&self.latent_std.recip()?)?;
        to_channel_major(&normalised)
    }

    /// Checks a normalised latent `[B, z, T, h, w]`, denormalises it and applies `conv2`:
    /// `[B, T, z, h, w]`.
    pub fn decoder_input(&self, latent: &Tensor) -> Result<Tensor> {
        let z_dim = self.z_dim;
        let valid = matches!(latent.dims5(), Ok((b, c, t, h, w)) if b > 0 && c == z_dim && t > 0 && h > 0 && w > 0);
        if !valid {
            return Err(Error::Shape {
                what: "VAE latent".into(),
                expected: format!("[B, {z_dim}, T, h, w], all positive"),
                got: latent.dims().to_vec(),
            });
        }
        let z = self.time_major_input(latent)?;
        // Upstream divides by 1/std rather than multiplying by std.
        let z = z
            .broadcast_div(&self.latent_std.recip()?)?
            .broadcast_add(&self.latent_mean)?;
        self.post_quant_conv.forward(&z, None)
    }
}

/// Decodes `latent` one latent frame at a time: `decode_frame(frame, t)` turns latent frame
/// `t` of the decoder input (`[B, 1, z, h, w]`) into time-major frames, which are clamped to
/// [-1, 1] when `clamp` says so and handed to `on_frames` in channel-major order.
pub fn stream_decode(
    side: &LatentSide,
    latent: &Tensor,
    clamp: bool,
    mut decode_frame: impl FnMut(&Tensor, usize) -> Result<Tensor>,
    mut on_frames: impl FnMut(DecodedFrames) -> Result<()>,
) -> Result<()> {
    let x = side.decoder_input(latent)?;
    let mut first_frame = 0;
    for t in 0..x.dim(1)? {
        let mut frames = decode_frame(&x.narrow(1, t, 1)?, t)?;
        if clamp {
            frames = frames.clamp(-1f32, 1f32)?;
        }
        let count = frames.dim(1)?;
        on_frames(DecodedFrames {
            first_frame,
            frames: to_channel_major(&frames)?,
        })?;
        first_frame += count;
    }
    Ok(())
}

/// Streams `first` (one time-major frame) and then each chunk of `rest` through an encoder's
/// `encode_chunk`, with one feature cache for the whole run: the features `[B, T, 2z, h, w]`.
pub fn stream_encode(
    first: &Tensor,
    rest: impl Iterator<Item = candle_core::Result<Tensor>>,
    mut encode_chunk: impl FnMut(&Tensor, &mut FeatureCache) -> Result<Tensor>,
) -> Result<Tensor> {
    let mut cache = FeatureCache::default();
    let mut features = vec![encode_chunk(first, &mut cache)?];
    for chunk in rest {
        features.push(encode_chunk(&chunk?, &mut cache)?);
    }
    Ok(Tensor::cat(&features, 1)?)
}

/// The chunks a video's encode streams after its first frame: `VAE_STRIDE.0` frames each of
/// the time-major `x` `[B, T, C, H, W]`.
pub fn later_chunks(x: &Tensor) -> Result<impl Iterator<Item = candle_core::Result<Tensor>> + '_> {
    Ok((1..x.dim(1)?)
        .step_by(VAE_STRIDE.0)
        .map(move |start| x.narrow(1, start, VAE_STRIDE.0)))
}

/// Every chunk [`stream_decode`] hands out, joined along time.
pub fn collect_frames(
    decode: impl FnOnce(&mut dyn FnMut(DecodedFrames) -> Result<()>) -> Result<()>,
) -> Result<Tensor> {
    let mut chunks = Vec::new();
    decode(&mut |decoded| {
        chunks.push(decoded.frames);
        Ok(())
    })?;
    Ok(Tensor::cat(&chunks, 2)?)
}
