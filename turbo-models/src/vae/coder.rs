//! `Encoder3d` and `Decoder3d`: the layer plans derived from the configuration, which both the
//! loaders and the key lists follow, and the chunk-wise forward passes.

use candle_core::Tensor;
use candle_nn::VarBuilder;
use turbo_core::{Error, Result};

use super::blocks::{AttentionBlock, ChannelRmsNorm, Keys, Resample, ResampleMode, ResidualBlock};
use super::cache::{cached_conv, cached_norm_conv, FeatureCache};
use super::conv::{CausalConv3d, Conv3dSpec};
use super::held::{Held, TimeReach};
use super::VaeConfig;

/// One entry of the flat `downsamples` / `upsamples` sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LayerPlan {
    Residual {
        in_channels: usize,
        out_channels: usize,
    },
    Resample {
        channels: usize,
        mode: ResampleMode,
    },
}

#[derive(Debug, Clone)]
enum Layer {
    Residual(ResidualBlock),
    Resample(Resample),
}

impl LayerPlan {
    fn load(self, vb: VarBuilder) -> Result<Layer> {
        Ok(match self {
            Self::Residual {
                in_channels,
                out_channels,
            } => Layer::Residual(ResidualBlock::load(vb, in_channels, out_channels)?),
            Self::Resample { channels, mode } => {
                Layer::Resample(Resample::load(vb, channels, mode)?)
            }
        })
    }

    fn keys(self, prefix: &str) -> Keys {
        match self {
            Self::Residual {
                in_channels,
                out_channels,
            } => ResidualBlock::keys(prefix, in_channels, out_channels),
            Self::Resample { channels, mode } => Resample::keys(prefix, channels, mode),
        }
    }
}

impl Layer {
    fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        match self {
            Self::Residual(block) => block.forward(x, cache),
            Self::Resample(resample) => resample.forward(x, cache),
        }
    }

    /// How the layer reads time; an error for a temporal upsampler, which has no held form.
    fn time_reach(&self) -> Result<TimeReach> {
        match self {
            Self::Residual(block) => Ok(block.time_reach()),
            Self::Resample(resample) => resample.time_reach().ok_or_else(|| Error::InvalidConfig {
                field: "VAE layers".into(),
                reason: "a temporal upsampler has no held-video form".into(),
            }),
        }
    }
}

/// Which half of the autoencoder a [`Coder`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Layers at full resolution first, the middle blocks last.
    Encoder,
    /// The middle blocks first, then the layers up to full resolution.
    Decoder,
}

impl Direction {
    /// The checkpoint name of the flat layer sequence.
    fn sequence(self) -> &'static str {
        match self {
            Self::Encoder => "downsamples",
            Self::Decoder => "upsamples",
        }
    }
}

/// The shape of an encoder or a decoder: `conv1`, the flat layer sequence, the middle width
/// and the head.
struct CoderPlan {
    direction: Direction,
    conv_in: Conv3dSpec,
    layers: Vec<LayerPlan>,
    middle_channels: usize,
    head: Conv3dSpec,
}

impl CoderPlan {
    /// Upstream `Encoder3d`: widths `dim·[1, mult…]`, `num_res_blocks` blocks per level and a
    /// downsampler between levels (temporal where `temporal_downsample` says so).
    fn encoder(cfg: &VaeConfig) -> Self {
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| cfg.dim * m)
            .collect();
        let mut layers = Vec::new();
        let levels = dims.len() - 1;
        for level in 0..levels {
            let mut in_channels = dims[level];
            let out_channels = dims[level + 1];
            for _ in 0..cfg.num_res_blocks {
                layers.push(LayerPlan::Residual {
                    in_channels,
                    out_channels,
                });
                in_channels = out_channels;
            }
            if level + 1 != levels {
                let mode = if cfg.temporal_downsample[level] {
                    ResampleMode::Downsample3d
                } else {
                    ResampleMode::Downsample2d
                };
                layers.push(LayerPlan::Resample {
                    channels: out_channels,
                    mode,
                });
            }
        }
        let top = dims[levels];
        Self {
            direction: Direction::Encoder,
            conv_in: Conv3dSpec::cube(3, dims[0], 3, 1),
            layers,
            middle_channels: top,
            head: Conv3dSpec::cube(top, 2 * cfg.z_dim, 3, 1),
        }
    }

    /// Upstream `Decoder3d`: widths `dim·[mult_last, mult reversed…]`, `num_res_blocks + 1`
    /// blocks per level whose input is halved after an upsampler, and upsamplers (temporal
    /// where the reversed `temporal_downsample` says so).
    fn decoder(cfg: &VaeConfig) -> Self {
        let mults: Vec<usize> = cfg.dim_mult.iter().rev().copied().collect();
        let dims: Vec<usize> = std::iter::once(mults[0])
            .chain(mults.iter().copied())
            .map(|m| cfg.dim * m)
            .collect();
        let temporal_upsample: Vec<bool> = cfg.temporal_downsample.iter().rev().copied().collect();
        let mut layers = Vec::new();
        let levels = dims.len() - 1;
        for level in 0..levels {
            // The upsampler before this level halved the channels.
            let mut in_channels = if level == 0 { dims[0] } else { dims[level] / 2 };
            let out_channels = dims[level + 1];
            for _ in 0..=cfg.num_res_blocks {
                layers.push(LayerPlan::Residual {
                    in_channels,
                    out_channels,
                });
                in_channels = out_channels;
            }
            if level + 1 != levels {
                let mode = if temporal_upsample[level] {
                    ResampleMode::Upsample3d
                } else {
                    ResampleMode::Upsample2d
                };
                layers.push(LayerPlan::Resample {
                    channels: out_channels,
                    mode,
                });
            }
        }
        let bottom = dims[levels];
        Self {
            direction: Direction::Decoder,
            conv_in: Conv3dSpec::cube(cfg.z_dim, dims[0], 3, 1),
            layers,
            middle_channels: dims[0],
            head: Conv3dSpec::cube(bottom, 3, 3, 1),
        }
    }

    /// Latent pixels of context the upsampling path (the layers and the head, after the
    /// middle blocks) reads on each side of an output pixel: each convolution of spatial
    /// padding `p` at upsampling scale `s` reaches `p / s` latent pixels further, summed over
    /// every convolution (two per residual block, the upsamplers' 3×3 after their ×2, the head)
    /// and rounded up.
    fn upsampling_halo(&self) -> usize {
        let upsamplers = self
            .layers
            .iter()
            .filter(|layer| matches!(layer, LayerPlan::Resample { .. }))
            .count();
        let finest = 1usize << upsamplers;
        // In pixels of the finest scale, where every scale divides evenly.
        let mut scale = 1;
        let mut reach = 0;
        for layer in &self.layers {
            match *layer {
                LayerPlan::Residual {
                    in_channels,
                    out_channels,
                } => {
                    let padding = ResidualBlock::spatial_padding(in_channels, out_channels);
                    reach += padding * finest / scale;
                }
                LayerPlan::Resample { mode, .. } => {
                    scale *= 2;
                    reach += mode.spatial_padding() * finest / scale;
                }
            }
        }
        reach += self.head.padding.1 * finest / scale;
        reach.div_ceil(finest)
    }

    fn keys(&self, prefix: &str) -> Keys {
        let mut keys = self.conv_in.keys(&format!("{prefix}.conv1"));
        for (i, layer) in self.layers.iter().enumerate() {
            keys.extend(layer.keys(&format!("{prefix}.{}.{i}", self.direction.sequence())));
        }
        keys.extend(Middle::keys(prefix, self.middle_channels));
        keys.extend(Head::keys(prefix, self.head));
        keys
    }

    fn load(&self, vb: VarBuilder) -> Result<Coder> {
        let layers = self
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| layer.load(vb.pp(self.direction.sequence()).pp(i)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Coder {
            direction: self.direction,
            conv_in: CausalConv3d::load(vb.pp("conv1"), self.conv_in)?,
            layers,
            middle: Middle::load(vb.pp("middle"), self.middle_channels)?,
            head: Head::load(vb.pp("head"), self.head)?,
        })
    }
}

/// An encoder or a decoder: the two share their structure and differ in their layer plan.
#[derive(Debug, Clone)]
pub struct Coder {
    direction: Direction,
    conv_in: CausalConv3d,
    layers: Vec<Layer>,
    middle: Middle,
    head: Head,
}

/// `middle`: residual block, attention, residual block at the lowest resolution (both VAEs).
#[derive(Debug, Clone)]
pub(super) struct Middle {
    residual_in: ResidualBlock,
    attention: AttentionBlock,
    residual_out: ResidualBlock,
}

impl Middle {
    /// `vb` is `{encoder,decoder}.middle`.
    pub(super) fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            residual_in: ResidualBlock::load(vb.pp("0"), channels, channels)?,
            attention: AttentionBlock::load(vb.pp("1"), channels)?,
            residual_out: ResidualBlock::load(vb.pp("2"), channels, channels)?,
        })
    }

    /// The keys under `{coder}.middle`.
    pub(super) fn keys(coder: &str, channels: usize) -> Keys {
        let mut keys = ResidualBlock::keys(&format!("{coder}.middle.0"), channels, channels);
        keys.extend(AttentionBlock::keys(&format!("{coder}.middle.1"), channels));
        keys.extend(ResidualBlock::keys(
            &format!("{coder}.middle.2"),
            channels,
            channels,
        ));
        keys
    }

    /// Both residual blocks' reach (the attention works per frame).
    pub(super) fn time_reach(&self) -> TimeReach {
        self.residual_in
            .time_reach()
            .then(self.residual_out.time_reach())
    }

    pub(super) fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let x = self.residual_in.forward(x, cache)?;
        let x = self.attention.forward(&x)?;
        self.residual_out.forward(&x, cache)
    }
}

/// `head`: RMS norm, SiLU (`head.1`, no weights) and the output convolution (both VAEs).
#[derive(Debug, Clone)]
pub(super) struct Head {
    norm: ChannelRmsNorm,
    conv: CausalConv3d,
}

impl Head {
    /// `vb` is `{encoder,decoder}.head`.
    pub(super) fn load(vb: VarBuilder, spec: Conv3dSpec) -> Result<Self> {
        Ok(Self {
            norm: ChannelRmsNorm::load(vb.pp("0"), spec.in_channels, 4)?,
            conv: CausalConv3d::load(vb.pp("2"), spec)?,
        })
    }

    /// The keys under `{coder}.head`.
    pub(super) fn keys(coder: &str, spec: Conv3dSpec) -> Keys {
        let mut keys = vec![(
            format!("{coder}.head.0.gamma"),
            vec![spec.in_channels, 1, 1, 1],
        )];
        keys.extend(spec.keys(&format!("{coder}.head.2")));
        keys
    }

    pub(super) fn time_reach(&self) -> TimeReach {
        self.conv.time_reach()
    }

    pub(super) fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        cached_norm_conv(&self.norm, &self.conv, x, cache, None)
    }
}

impl Coder {
    /// The encoder under `vb` (`encoder.*`).
    pub fn load_encoder(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        CoderPlan::encoder(cfg).load(vb)
    }

    /// The decoder under `vb` (`decoder.*`).
    pub fn load_decoder(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        CoderPlan::decoder(cfg).load(vb)
    }

    /// [`CoderPlan::upsampling_halo`] of the decoder of `cfg`.
    pub fn decoder_halo(cfg: &VaeConfig) -> usize {
        CoderPlan::decoder(cfg).upsampling_halo()
    }

    /// The encoder's and the decoder's checkpoint keys.
    pub fn keys(cfg: &VaeConfig) -> Keys {
        let mut keys = CoderPlan::encoder(cfg).keys("encoder");
        keys.extend(CoderPlan::decoder(cfg).keys("decoder"));
        keys
    }

    /// Runs one chunk `[B, T, C, H, W]` through every layer, continuing from `cache` (or the
    /// whole video, with [`FeatureCache::whole_sequence`]).
    pub fn forward_chunk(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        cache.start_chunk();
        let x = cached_conv(&self.conv_in, x, cache)?;
        let x = match self.direction {
            Direction::Decoder => {
                let x = self.middle(&x, cache)?;
                self.layers(&x, cache)?
            }
            Direction::Encoder => {
                let x = self.layers(&x, cache)?;
                self.middle(&x, cache)?
            }
        };
        self.head(&x, cache)
    }

    /// The encoder over a video that ends held on one frame ([`Held`]), in the whole-sequence
    /// form: each layer computes its output only up to its first settled frame. The features
    /// `[B, n, 2z, h, w]` of the held latent video.
    pub fn forward_held(&self, video: &Held) -> Result<Held> {
        self.forward_held_with(video, &mut FeatureCache::whole_sequence())
    }

    /// [`Coder::forward_held`], and the cache a streaming encode of the whole held video would
    /// leave: [`Coder::forward_chunk`] can encode the chunks that follow it.
    pub fn forward_held_then_stream(&self, video: &Held) -> Result<(Held, FeatureCache)> {
        let mut cache = FeatureCache::whole_sequence_then_stream();
        let features = self.forward_held_with(video, &mut cache)?;
        cache.start_streaming();
        Ok((features, cache))
    }

    /// `cache` is one of the whole-sequence forms. A layer's input is cut where its frames
    /// settle; its last frames, which a remembering cache keeps, are then the held frame, as
    /// they are at the end of the whole video.
    fn forward_held_with(&self, video: &Held, cache: &mut FeatureCache) -> Result<Held> {
        if self.direction != Direction::Encoder {
            return Err(Error::InvalidConfig {
                field: "VAE coder".into(),
                reason: "only the encoder runs on a held video".into(),
            });
        }
        let mut x = video.through(self.conv_in.time_reach(), |x| {
            cached_conv(&self.conv_in, x, cache)
        })?;
        for layer in &self.layers {
            x = x.through(layer.time_reach()?, |x| layer.forward(x, cache))?;
        }
        x = x.through(self.middle.time_reach(), |x| self.middle(x, cache))?;
        x.through(self.head.time_reach(), |x| self.head(x, cache))
    }

    /// The decoder's part at latent resolution, whose attention sees the whole frame:
    /// `conv1` and the middle blocks, for one chunk.
    pub fn decode_middle_chunk(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        cache.start_chunk();
        let x = cached_conv(&self.conv_in, x, cache)?;
        self.middle(&x, cache)
    }

    /// The decoder's convolutional rest (the upsampling layers and the head) for one chunk of
    /// [`Coder::decode_middle_chunk`]'s output, with a cache of its own.
    pub fn decode_upsampling_chunk(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        cache.start_chunk();
        let x = self.layers(x, cache)?;
        self.head(&x, cache)
    }

    /// The flat layer sequence.
    fn layers(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, cache)?;
        }
        Ok(x)
    }

    /// Norm, SiLU and the output convolution.
    fn head(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        self.head.forward(x, cache)
    }

    /// Residual block, attention, residual block at the lowest resolution.
    fn middle(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        self.middle.forward(x, cache)
    }
}
