//! The building blocks of the Wan2.1 VAE (`spec/wan-model.md` §6.1): the channel RMS norm,
//! residual blocks, the mid attention block and the resampling layers. Activations are
//! time-major, `[B, T, C, H, W]`.

use candle_core::{DType, Tensor, D};
use candle_nn::ops::softmax_last_dim;
use candle_nn::VarBuilder;
use turbo_core::{Error, Result, VAE_STRIDE};

use super::cache::{cached_norm_conv, frames_to_remember, FeatureCache, Slot};
use super::conv::{conv2d_biased, upsampled, upsampled_conv2d_biased, CausalConv3d, Conv3dSpec};
use super::held::TimeReach;

/// Attention scores one pass of [`AttentionBlock::forward`] may hold: frames beyond it are
/// attended in further passes (one frame of 720p's latent, 14 400 pixels, holds 207 M).
const SCORES_PER_PASS: usize = 1 << 28;

/// Applies the per-frame `layer` to `x` `[B, T, …]` at most `frames_per_pass` frames at a
/// time, which bounds its temporary buffers on a long sequence.
fn in_frame_groups(
    x: &Tensor,
    frames_per_pass: usize,
    layer: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let frames = x.dim(1)?;
    let per_pass = frames_per_pass.max(1);
    if frames <= per_pass {
        return layer(x);
    }
    let groups = (0..frames)
        .step_by(per_pass)
        .map(|start| layer(&x.narrow(1, start, per_pass.min(frames - start))?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&groups, 1)?)
}

/// A checkpoint key list: `(name, shape)` pairs.
pub type Keys = Vec<(String, Vec<usize>)>;

/// Upstream `RMS_norm`: L2 normalisation over the channels, times `√C` and a learned `gamma`
/// (no bias, no epsilon beyond `F.normalize`'s 1e-12).
#[derive(Debug, Clone)]
pub struct ChannelRmsNorm {
    /// `gamma · √C`, `[C]` f32.
    scale: Tensor,
}

/// `F.normalize`'s lower bound on the norm.
const NORM_EPS: f64 = 1e-12;

impl ChannelRmsNorm {
    /// Reads `gamma`, shaped `[C, 1, 1, 1]` in 3-D blocks and `[C, 1, 1]` in the attention block.
    pub fn load(vb: VarBuilder, channels: usize, gamma_rank: usize) -> Result<Self> {
        let gamma = vb.get(gamma_shape(channels, gamma_rank), "gamma")?;
        let scale = (gamma.flatten_all()?.to_dtype(DType::F32)? * (channels as f64).sqrt())?;
        Ok(Self { scale })
    }

    fn keys(prefix: &str, channels: usize, gamma_rank: usize) -> Keys {
        vec![(format!("{prefix}.gamma"), gamma_shape(channels, gamma_rank))]
    }

    /// `gamma · √C`, `[C]` f32.
    #[cfg(feature = "cuda")]
    pub(super) fn scale(&self) -> &Tensor {
        &self.scale
    }

    /// Normalises `x` `[…, C, H, W]` over `C`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.normalise(x, false)
    }

    /// `silu(forward(x))`, in one pass on CUDA.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.normalise(x, true)
    }

    fn normalise(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda()
            && matches!(x.dtype(), DType::F32 | DType::BF16)
            && x.rank() >= 3
            && x.dim(x.rank() - 3)? <= super::conv::NORM_MAX_CHANNELS
        {
            return super::conv::channel_rms_norm(x, &self.scale, silu);
        }
        let y = self.forward_reference(x)?;
        Ok(if silu { candle_nn::ops::silu(&y)? } else { y })
    }

    /// [`ChannelRmsNorm::forward`] as candle ops: the norm computed in f32 whatever the dtype.
    pub fn forward_reference(&self, x: &Tensor) -> Result<Tensor> {
        let channel_dim = x.rank() - 3;
        let norm = x
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_keepdim(channel_dim)?
            .sqrt()?
            .clamp(NORM_EPS, f64::MAX)?
            .to_dtype(x.dtype())?;
        let scale = self
            .scale
            .reshape((self.scale.elem_count(), 1, 1))?
            .to_dtype(x.dtype())?;
        Ok(x.broadcast_div(&norm)?.broadcast_mul(&scale)?)
    }
}

fn gamma_shape(channels: usize, rank: usize) -> Vec<usize> {
    let mut shape = vec![1; rank];
    shape[0] = channels;
    shape
}

/// `RMS_norm → SiLU → conv(3) → RMS_norm → SiLU → conv(3)`, plus a 1×1×1 shortcut when the
/// channel count changes (keys `residual.{0,2,3,6}`, `shortcut`).
#[derive(Debug, Clone)]
pub struct ResidualBlock {
    norm_in: ChannelRmsNorm,
    conv_in: CausalConv3d,
    norm_out: ChannelRmsNorm,
    conv_out: CausalConv3d,
    shortcut: Option<CausalConv3d>,
}

impl ResidualBlock {
    pub fn load(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        let residual = vb.pp("residual");
        let (conv_in, conv_out, shortcut) = Self::convs(in_channels, out_channels);
        Ok(Self {
            norm_in: ChannelRmsNorm::load(residual.pp("0"), in_channels, 4)?,
            conv_in: CausalConv3d::load(residual.pp("2"), conv_in)?,
            norm_out: ChannelRmsNorm::load(residual.pp("3"), out_channels, 4)?,
            conv_out: CausalConv3d::load(residual.pp("6"), conv_out)?,
            shortcut: shortcut
                .map(|spec| CausalConv3d::load(vb.pp("shortcut"), spec))
                .transpose()?,
        })
    }

    pub fn keys(prefix: &str, in_channels: usize, out_channels: usize) -> Keys {
        let (conv_in, conv_out, shortcut) = Self::convs(in_channels, out_channels);
        let mut keys = ChannelRmsNorm::keys(&format!("{prefix}.residual.0"), in_channels, 4);
        keys.extend(conv_in.keys(&format!("{prefix}.residual.2")));
        keys.extend(ChannelRmsNorm::keys(
            &format!("{prefix}.residual.3"),
            out_channels,
            4,
        ));
        keys.extend(conv_out.keys(&format!("{prefix}.residual.6")));
        if let Some(shortcut) = shortcut {
            keys.extend(shortcut.keys(&format!("{prefix}.shortcut")));
        }
        keys
    }

    /// Pixels of context the block's two convolutions read on each side, together.
    pub fn spatial_padding(in_channels: usize, out_channels: usize) -> usize {
        let (conv_in, conv_out, _) = Self::convs(in_channels, out_channels);
        conv_in.padding.1 + conv_out.padding.1
    }

    fn convs(
        in_channels: usize,
        out_channels: usize,
    ) -> (Conv3dSpec, Conv3dSpec, Option<Conv3dSpec>) {
        let shortcut = (in_channels != out_channels)
            .then(|| Conv3dSpec::cube(in_channels, out_channels, 1, 0));
        (
            Conv3dSpec::cube(in_channels, out_channels, 3, 1),
            Conv3dSpec::cube(out_channels, out_channels, 3, 1),
            shortcut,
        )
    }

    /// Both convolutions' reach (the shortcut works per frame).
    pub fn time_reach(&self) -> TimeReach {
        self.conv_in.time_reach().then(self.conv_out.time_reach())
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let identity = match &self.shortcut {
            Some(shortcut) => shortcut.forward(x, None)?,
            None => x.clone(),
        };
        let h = cached_norm_conv(&self.norm_in, &self.conv_in, x, cache, None)?;
        cached_norm_conv(&self.norm_out, &self.conv_out, &h, cache, Some(&identity))
    }
}

/// Single-head self-attention over the pixels of each frame, with a residual connection
/// (keys `norm.gamma`, `to_qkv`, `proj`).
#[derive(Debug, Clone)]
pub struct AttentionBlock {
    norm: ChannelRmsNorm,
    to_qkv: candle_nn::Conv2d,
    proj: candle_nn::Conv2d,
}

impl AttentionBlock {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        let config = candle_nn::Conv2dConfig::default();
        Ok(Self {
            norm: ChannelRmsNorm::load(vb.pp("norm"), channels, 3)?,
            to_qkv: candle_nn::conv2d(channels, 3 * channels, 1, config, vb.pp("to_qkv"))?,
            proj: candle_nn::conv2d(channels, channels, 1, config, vb.pp("proj"))?,
        })
    }

    pub fn keys(prefix: &str, channels: usize) -> Keys {
        let mut keys = ChannelRmsNorm::keys(&format!("{prefix}.norm"), channels, 3);
        for (name, out) in [("to_qkv", 3 * channels), ("proj", channels)] {
            keys.push((format!("{prefix}.{name}.weight"), vec![out, channels, 1, 1]));
            keys.push((format!("{prefix}.{name}.bias"), vec![out]));
        }
        keys
    }

    /// Attends within each frame of `x` `[B, T, C, H, W]`, in passes of as many frames as
    /// [`SCORES_PER_PASS`] allows.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, _, _, height, width) = x.dims5()?;
        let scores_per_frame = batch * (height * width).pow(2);
        in_frame_groups(x, SCORES_PER_PASS / scores_per_frame, |x| self.attend(x))
    }

    fn attend(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, frames, channels, height, width) = x.dims5()?;
        let images = x.reshape((batch * frames, channels, height, width))?;
        let qkv = self
            .to_qkv
            .forward_t(&self.norm.forward(&images)?)?
            .reshape((batch * frames, 3 * channels, height * width))?
            .transpose(1, 2)?;
        let part = |i: usize| qkv.narrow(D::Minus1, i * channels, channels)?.contiguous();
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let scores = (q.matmul(&k.t()?)? / (channels as f64).sqrt())?;
        let attended = softmax_last_dim(&scores)?.matmul(&v)?;
        let attended =
            attended
                .transpose(1, 2)?
                .reshape((batch * frames, channels, height, width))?;
        let out = self.proj.forward_t(&attended)?;
        Ok((out.reshape(x.dims())? + x)?)
    }
}

/// `Module::forward` through candle's trait, returning this crate's error.
trait ForwardT {
    fn forward_t(&self, x: &Tensor) -> Result<Tensor>;

    /// The layer on `x` upsampled ×2 by repeating each pixel.
    fn forward_upsampled_t(&self, x: &Tensor) -> Result<Tensor>;
}

impl ForwardT for candle_nn::Conv2d {
    /// Stride-1 convolutions with a bias go through [`conv2d_biased`] (our kernels on CUDA).
    fn forward_t(&self, x: &Tensor) -> Result<Tensor> {
        match plain_bias(self) {
            Some(bias) => conv2d_biased(x, self.weight(), bias, self.config().padding),
            None => Ok(candle_nn::Module::forward(self, x)?),
        }
    }

    /// Through [`upsampled_conv2d_biased`] where [`ForwardT::forward_t`] takes
    /// [`conv2d_biased`].
    fn forward_upsampled_t(&self, x: &Tensor) -> Result<Tensor> {
        match plain_bias(self) {
            Some(bias) => upsampled_conv2d_biased(x, self.weight(), bias, self.config().padding),
            None => self.forward_t(&upsampled(x, 2)?),
        }
    }
}

/// The bias of a stride-1, undilated, ungrouped convolution: what [`conv2d_biased`] takes.
fn plain_bias(conv: &candle_nn::Conv2d) -> Option<&Tensor> {
    let cfg = conv.config();
    let plain = cfg.stride == 1 && cfg.dilation == 1 && cfg.groups == 1;
    conv.bias().filter(|_| plain)
}

/// The four resampling layers (`Resample` upstream); the spatial convolution is `resample.1`,
/// the temporal one `time_conv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleMode {
    /// Stride-2 spatial convolution per frame.
    Downsample2d,
    /// [`ResampleMode::Downsample2d`], then a stride-2 temporal convolution.
    Downsample3d,
    /// Nearest ×2 spatial upsampling and a convolution to half the channels.
    Upsample2d,
    /// A temporal convolution to twice the channels, read as two frames, then
    /// [`ResampleMode::Upsample2d`].
    Upsample3d,
}

impl ResampleMode {
    /// Pixels of context the spatial convolution reads on each side (upsamplers pad 1; the
    /// downsamplers pad right and bottom only and are not tiled).
    pub fn spatial_padding(self) -> usize {
        match self {
            Self::Downsample2d | Self::Downsample3d => 0,
            Self::Upsample2d | Self::Upsample3d => 1,
        }
    }

    fn spatial_out(self, channels: usize) -> usize {
        match self {
            Self::Downsample2d | Self::Downsample3d => channels,
            Self::Upsample2d | Self::Upsample3d => channels / 2,
        }
    }

    fn time_conv(self, channels: usize) -> Option<Conv3dSpec> {
        let spec = |out_channels, padding, time_stride| Conv3dSpec {
            in_channels: channels,
            out_channels,
            kernel: (3, 1, 1),
            padding: (padding, 0),
            time_stride,
        };
        match self {
            Self::Downsample2d | Self::Upsample2d => None,
            Self::Downsample3d => Some(spec(channels, 0, 2)),
            Self::Upsample3d => Some(spec(2 * channels, 1, 1)),
        }
    }
}

/// One resampling layer over `channels` input channels.
#[derive(Debug, Clone)]
pub struct Resample {
    mode: ResampleMode,
    spatial: candle_nn::Conv2d,
    time_conv: Option<CausalConv3d>,
}

impl Resample {
    /// The Wan2.1 layer: upsamplers halve the channels in their spatial convolution.
    pub fn load(vb: VarBuilder, channels: usize, mode: ResampleMode) -> Result<Self> {
        Self::load_to(vb, channels, mode.spatial_out(channels), mode)
    }

    /// A layer whose spatial convolution gives `out_channels` (the Wan2.2 VAE's upsamplers keep
    /// the width: `channels`).
    pub fn load_to(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        mode: ResampleMode,
    ) -> Result<Self> {
        // Downsampling pads asymmetrically itself (see `spatial`), then strides by 2.
        let stride = match mode {
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => 2,
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => 1,
        };
        let padding = mode.spatial_padding();
        let config = candle_nn::Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let spatial =
            candle_nn::conv2d(channels, out_channels, 3, config, vb.pp("resample").pp("1"))?;
        let time_conv = mode
            .time_conv(channels)
            .map(|spec| CausalConv3d::load(vb.pp("time_conv"), spec))
            .transpose()?;
        Ok(Self {
            mode,
            spatial,
            time_conv,
        })
    }

    pub fn keys(prefix: &str, channels: usize, mode: ResampleMode) -> Keys {
        Self::keys_to(prefix, channels, mode.spatial_out(channels), mode)
    }

    /// The keys of [`Resample::load_to`].
    pub fn keys_to(prefix: &str, channels: usize, out: usize, mode: ResampleMode) -> Keys {
        let mut keys = vec![
            (
                format!("{prefix}.resample.1.weight"),
                vec![out, channels, 3, 3],
            ),
            (format!("{prefix}.resample.1.bias"), vec![out]),
        ];
        if let Some(spec) = mode.time_conv(channels) {
            keys.extend(spec.keys(&format!("{prefix}.time_conv")));
        }
        keys
    }

    pub fn forward(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        match self.mode {
            ResampleMode::Downsample2d | ResampleMode::Upsample2d => self.spatial(x),
            ResampleMode::Downsample3d => self.downsample_time(&self.spatial(x)?, cache),
            ResampleMode::Upsample3d => self.spatial(&self.upsample_time(x, cache)?),
        }
    }

    /// How the layer reads time, where it can be said with a [`TimeReach`]: the downsamplers
    /// (a temporal upsampler makes two frames of each).
    pub fn time_reach(&self) -> Option<TimeReach> {
        match self.mode {
            ResampleMode::Downsample2d | ResampleMode::Upsample2d => Some(TimeReach::PER_FRAME),
            ResampleMode::Downsample3d => self.time_conv.as_ref().map(CausalConv3d::time_reach),
            ResampleMode::Upsample3d => None,
        }
    }

    /// The per-frame spatial step, a streaming chunk's frames at a time, so that the
    /// whole-sequence form holds no larger temporaries than a chunk does (the downsamplers'
    /// stride-2 convolution runs through candle's im2col, whose buffer is 9× its output).
    fn spatial(&self, x: &Tensor) -> Result<Tensor> {
        in_frame_groups(x, VAE_STRIDE.0, |x| self.spatial_frames(x))
    }

    fn spatial_frames(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, frames, channels, height, width) = x.dims5()?;
        let images = x.reshape((batch * frames, channels, height, width))?;
        let out = match self.mode {
            // Upstream pads right and bottom only (ZeroPad2d(0, 1, 0, 1)) before the stride-2 conv.
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => self
                .spatial
                .forward_t(&images.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?)?,
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                self.spatial.forward_upsampled_t(&images)?
            }
        };
        let (_, out_channels, out_height, out_width) = out.dims4()?;
        Ok(out.reshape((batch, frames, out_channels, out_height, out_width))?)
    }

    /// The stride-2 temporal convolution. The first chunk's frame passes through unchanged;
    /// each later chunk is convolved after the last frame of the chunk before.
    fn downsample_time(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        if cache.is_whole_sequence() {
            // Sequence form: out[0] = in[0], out[k] = conv(in[2k−2], in[2k−1], in[2k]).
            let last = || {
                Ok(Slot::Frames(
                    x.narrow(1, x.dim(1)? - 1, 1)?.force_contiguous()?,
                ))
            };
            cache.remember_after_sequence(last)?;
            if x.dim(1)? == 1 {
                return Ok(x.clone());
            }
            let rest = self.time_conv()?.forward(x, None)?;
            return Ok(Tensor::cat(&[&x.narrow(1, 0, 1)?, &rest], 1)?);
        }
        let slot = cache.next_slot();
        let previous = match slot {
            Slot::Frames(previous) => previous.clone(),
            Slot::Empty => {
                *slot = Slot::Frames(x.clone());
                return Ok(x.clone());
            }
            Slot::Replicated | Slot::ChannelsLast(_) => return Err(cache_order_error()),
        };
        let frames = x.dim(1)?;
        let last = previous.narrow(1, previous.dim(1)? - 1, 1)?;
        *slot = Slot::Frames(x.narrow(1, frames - 1, 1)?);
        self.time_conv()?
            .forward(&Tensor::cat(&[&last, x], 1)?, None)
    }

    /// The temporal convolution to `2C` channels read as two frames each. The first chunk
    /// passes through unchanged, and the second is convolved with zero history rather than the
    /// first chunk's frames (upstream's `'Rep'` marker): frame 0 never enters this context.
    fn upsample_time(&self, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        if cache.is_whole_sequence() {
            // Sequence form: [x0] ++ interleave(causal conv of x[1..] with zero history).
            let frames = x.dim(1)?;
            if frames == 1 {
                return Ok(x.clone());
            }
            let rest = self.upsample_frames(&x.narrow(1, 1, frames - 1)?, None)?;
            return Ok(Tensor::cat(&[&x.narrow(1, 0, 1)?, &rest], 1)?);
        }
        let slot = cache.next_slot();
        let (history, remembered) = match slot {
            Slot::Empty => {
                *slot = Slot::Replicated;
                return Ok(x.clone());
            }
            Slot::Replicated => {
                let tail = frames_to_remember(x, None)?;
                let missing = super::cache::CACHE_FRAMES - tail.dim(1)?;
                (None, tail.pad_with_zeros(1, missing, 0)?)
            }
            Slot::Frames(previous) => {
                let previous = previous.clone();
                let remembered = frames_to_remember(x, Some(&previous))?;
                (Some(previous), remembered)
            }
            Slot::ChannelsLast(_) => return Err(cache_order_error()),
        };
        *slot = Slot::Frames(remembered);
        self.upsample_frames(x, history.as_ref())
    }

    /// The temporal convolution to `2C` channels, each output frame read as two frames.
    fn upsample_frames(&self, x: &Tensor, history: Option<&Tensor>) -> Result<Tensor> {
        let doubled = self.time_conv()?.forward(x, history)?;
        let (batch, frames, channels2, height, width) = doubled.dims5()?;
        Ok(doubled.reshape((batch, 2 * frames, channels2 / 2, height, width))?)
    }

    fn time_conv(&self) -> Result<&CausalConv3d> {
        self.time_conv.as_ref().ok_or_else(cache_order_error)
    }
}

/// Unreachable through the public API: every encode or decode starts a fresh cache and visits
/// its slots in the same order for every chunk.
fn cache_order_error() -> Error {
    Error::Shape {
        what: "VAE feature cache".into(),
        expected: "the slots of one chunk visited in the same order as the last".into(),
        got: vec![],
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// A per-frame layer applied in groups is the layer applied to the whole sequence, for
    /// group sizes that divide the frames, that leave a remainder and that exceed them.
    #[test]
    fn frame_groups_join_to_the_whole() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 7, 3, 4, 5), &Device::Cpu)?;
        let per_frame = |x: &Tensor| -> Result<Tensor> { Ok((x.sqr()? + x)?) };
        let whole = per_frame(&x)?;
        for per_pass in [0, 1, 2, 3, 7, 9] {
            let grouped = in_frame_groups(&x, per_pass, per_frame)?;
            let difference = (grouped - &whole)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(difference, 0.0, "{per_pass} frames a pass");
        }
        Ok(())
    }
}
