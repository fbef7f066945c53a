//! The two Wan VAEs as the pipeline sees them: the Wan2.1 VAE (16 latent channels, 8× spatial
//! compression) of every model but TI2V-5B, and the Wan2.2 VAE (48 channels, 16×) of TI2V-5B.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use turbo_core::parallel::Communicator;
use turbo_core::{Error, FrameSize, LatentShape, Result, VideoGeometry, PATCH_SIZE};
use turbo_models::{DecodedFrames, Vae22Config, VaeConfig, VaeTiling, Wan22Vae, WanVae};

/// Which VAE a model set uses, and its shape.
#[derive(Debug, Clone, PartialEq)]
pub enum VaeSpec {
    /// `Wan2.1_VAE.pth` (Wan2.1, Wan2.2 A14B).
    Wan21(VaeConfig),
    /// `Wan2.2_VAE.pth` (Wan2.2 TI2V-5B).
    Wan22(Vae22Config),
}

impl VaeSpec {
    /// Every checkpoint tensor the VAE reads, with its shape.
    pub fn expected_keys(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            Self::Wan21(cfg) => WanVae::expected_keys(cfg),
            Self::Wan22(cfg) => Wan22Vae::expected_keys(cfg),
        }
    }

    /// Channels of the latent (16 or 48).
    pub fn latent_channels(&self) -> usize {
        match self {
            Self::Wan21(cfg) => cfg.z_dim,
            Self::Wan22(cfg) => cfg.z_dim,
        }
    }

    /// Pixels per latent pixel along each side (8 or 16).
    pub fn spatial_stride(&self) -> usize {
        match self {
            Self::Wan21(cfg) => cfg.spatial_stride(),
            Self::Wan22(cfg) => cfg.spatial_stride(),
        }
    }

    /// The latent of a video of `geometry`: `z_dim` channels, `(F − 1)/4 + 1` frames, the
    /// frame divided by the spatial stride.
    pub fn latent_shape(&self, geometry: VideoGeometry) -> LatentShape {
        let stride = self.spatial_stride();
        LatentShape {
            channels: self.latent_channels(),
            frames: geometry.frames.latent_frames(),
            height: geometry.size.height() / stride,
            width: geometry.size.width() / stride,
        }
    }

    /// Fails unless both sides of `size` are multiples of the stride times the DiT's 2×2
    /// patch (16 for the Wan2.1 VAE, 32 for the Wan2.2 one: 1280×704, not 1280×720).
    pub fn check_frame_size(&self, size: FrameSize) -> Result<()> {
        let multiple = self.spatial_stride() * PATCH_SIZE.1;
        let (width, height) = (size.width(), size.height());
        if width % multiple == 0 && height % multiple == 0 {
            return Ok(());
        }
        Err(Error::InvalidConfig {
            field: "size".into(),
            reason: format!(
                "{width}x{height}: this model's frame sides must be multiples of {multiple}"
            ),
        })
    }

    /// Loads the VAE from `vb`.
    pub(super) fn load(&self, vb: VarBuilder) -> Result<LoadedVae> {
        Ok(match self {
            Self::Wan21(cfg) => LoadedVae::Wan21(WanVae::load(vb, cfg)?),
            Self::Wan22(cfg) => LoadedVae::Wan22(Wan22Vae::load(vb, cfg)?),
        })
    }
}

/// A loaded VAE of either kind.
pub(super) enum LoadedVae {
    Wan21(WanVae),
    Wan22(Wan22Vae),
}

impl LoadedVae {
    /// Decodes `latent` `[1, z, T, h, w]` a chunk of frames at a time (see
    /// [`WanVae::decode_streaming`]).
    pub(super) fn decode_streaming(
        &self,
        latent: &Tensor,
        on_frames: impl FnMut(DecodedFrames) -> Result<()>,
    ) -> Result<()> {
        match self {
            Self::Wan21(vae) => vae.decode_streaming(latent, on_frames),
            Self::Wan22(vae) => vae.decode_streaming(latent, on_frames),
        }
    }

    /// One band of latent rows per rank of `comm`, the frames gathered on every rank (see
    /// [`WanVae::decode_parallel`] and [`Wan22Vae::decode_parallel`]).
    pub(super) fn decode_parallel(
        &self,
        latent: &Tensor,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        match self {
            Self::Wan21(vae) => vae.decode_parallel(latent, comm),
            Self::Wan22(vae) => vae.decode_parallel(latent, comm),
        }
    }

    /// Decodes in spatial tiles (the Wan2.1 VAE; the plan refuses tiles for the other).
    pub(super) fn decode_tiled(&self, latent: &Tensor, tiling: VaeTiling) -> Result<Tensor> {
        match self {
            Self::Wan21(vae) => vae.decode_tiled(latent, tiling),
            Self::Wan22(_) => Err(tiling_unsupported()),
        }
    }

    /// The Wan2.1 VAE, for the I2V conditions that encode a video with it.
    pub(super) fn wan21(&self) -> Result<&WanVae> {
        match self {
            Self::Wan21(vae) => Ok(vae),
            Self::Wan22(_) => Err(Error::InvalidConfig {
                field: "vae".into(),
                reason: "this model's image condition needs the Wan2.1 VAE".into(),
            }),
        }
    }

    /// The Wan2.2 VAE, for TI2V's image latent.
    pub(super) fn wan22(&self) -> Result<&Wan22Vae> {
        match self {
            Self::Wan22(vae) => Ok(vae),
            Self::Wan21(_) => Err(Error::InvalidConfig {
                field: "vae".into(),
                reason: "TI2V's image latent needs the Wan2.2 VAE".into(),
            }),
        }
    }
}

/// The Wan2.2 VAE decodes untiled.
pub(super) fn tiling_unsupported() -> Error {
    Error::InvalidConfig {
        field: "vae_tiling".into(),
        reason: "the Wan2.2 VAE (TI2V-5B) decodes untiled; leave vae_tiling unset".into(),
    }
}
