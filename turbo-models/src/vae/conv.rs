//! The causal 3-D convolution of the Wan VAE, expressed through candle's `conv2d`.
//!
//! Activations inside the VAE are time-major, `[B, T, C, H, W]`. A kernel of `kt` frames then
//! sees `kt` consecutive frames as one contiguous block of `kt·C` channels, so a conv3d is a
//! single conv2d over all time windows at once: the windows are stacked into the batch and the
//! weight `[O, C, kt, kh, kw]` is laid out as `[O, kt·C, kh, kw]` to match.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use turbo_core::{Error, Result};

use super::held::TimeReach;

/// A `Conv3d` with causal time padding: `pad_t` zero frames in front (none behind), and
/// symmetric spatial padding. Frames remembered from the previous chunk replace front zeros.
#[derive(Debug, Clone)]
pub struct CausalConv3d {
    /// `[O, kt·C, kh, kw]`, time-major over the input channels.
    weight: Tensor,
    bias: Tensor,
    time_kernel: usize,
    time_stride: usize,
    /// Zero frames in front of the first frame (`2·p_t` upstream).
    time_padding: usize,
    spatial_padding: usize,
    /// The weight as `conv_wgmma_bf16` reads it, made on the first call that runs that kernel
    /// (only then are the device and its compute capability known) and kept: re-laying it out
    /// at every chunk would cost a few kernels per convolution per latent frame.
    #[cfg(feature = "cuda")]
    wgmma_weight: std::sync::OnceLock<cuda::WgmmaWeight>,
}

/// The shape of a [`CausalConv3d`], as its upstream constructor takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv3dSpec {
    /// Input channels `C`.
    pub in_channels: usize,
    /// Output channels `O`.
    pub out_channels: usize,
    /// `(kt, kh, kw)`; `kh == kw`.
    pub kernel: (usize, usize, usize),
    /// Upstream `padding=(p_t, p_hw, p_hw)`: the time padding becomes `2·p_t` frames in front.
    pub padding: (usize, usize),
    /// Stride in time (2 in the temporal downsamplers); the spatial stride is 1.
    pub time_stride: usize,
}

impl Conv3dSpec {
    /// A cubic kernel `k` with padding `p` in every axis and stride 1.
    pub fn cube(in_channels: usize, out_channels: usize, k: usize, p: usize) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel: (k, k, k),
            padding: (p, p),
            time_stride: 1,
        }
    }

    /// The checkpoint tensors under `prefix`: `weight [O, C, kt, kh, kw]` and `bias [O]`.
    pub fn keys(&self, prefix: &str) -> Vec<(String, Vec<usize>)> {
        let (kt, kh, kw) = self.kernel;
        vec![
            (
                format!("{prefix}.weight"),
                vec![self.out_channels, self.in_channels, kt, kh, kw],
            ),
            (format!("{prefix}.bias"), vec![self.out_channels]),
        ]
    }
}

impl CausalConv3d {
    /// Reads `weight` and `bias` under `vb`.
    pub fn load(vb: VarBuilder, spec: Conv3dSpec) -> Result<Self> {
        let (kt, kh, kw) = spec.kernel;
        let weight = vb.get((spec.out_channels, spec.in_channels, kt, kh, kw), "weight")?;
        let bias = vb.get(spec.out_channels, "bias")?;
        Self::new(&weight, &bias, spec)
    }

    /// From an upstream weight `[O, C, kt, kh, kw]` and bias `[O]`.
    pub fn new(weight: &Tensor, bias: &Tensor, spec: Conv3dSpec) -> Result<Self> {
        let (out_channels, in_channels, kt, kh, kw) = weight.dims5()?;
        if kh != kw {
            return Err(Error::Shape {
                what: "causal conv3d weight".into(),
                expected: "a square spatial kernel".into(),
                got: weight.dims().to_vec(),
            });
        }
        let weight = weight
            .permute((0, 2, 1, 3, 4))?
            .reshape((out_channels, kt * in_channels, kh, kw))?
            .contiguous()?;
        Ok(Self {
            weight,
            bias: bias.clone(),
            time_kernel: kt,
            time_stride: spec.time_stride,
            time_padding: 2 * spec.padding.0,
            spatial_padding: spec.padding.1,
            #[cfg(feature = "cuda")]
            wgmma_weight: std::sync::OnceLock::new(),
        })
    }

    /// Convolves `x` `[B, T, C, H, W]`, with `history` (`[B, n, C, H, W]`, the last frames of
    /// the previous chunk) standing in for the last `n` of the front zero frames.
    pub fn forward(&self, x: &Tensor, history: Option<&Tensor>) -> Result<Tensor> {
        self.forward_plus(x, history, None)
    }

    /// [`CausalConv3d::forward`] plus `residual` where given (shaped as the output): on CUDA's
    /// `wgmma` path the sum is formed in the kernel's epilogue, before the output is rounded,
    /// instead of in another pass over both.
    pub fn forward_plus(
        &self,
        x: &Tensor,
        history: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        {
            let (remembered, front_zeros) = self.time_context(history)?;
            if let Some(out) = cuda::causal_conv(
                x,
                remembered.as_ref(),
                front_zeros,
                (&self.weight, &self.bias, &self.wgmma_weight),
                (self.spatial_padding, self.time_stride),
                residual,
            )? {
                return frames_per_image(&out, x.dim(0)?);
            }
        }
        let out = self.convolve_unfused(x, history)?;
        Ok(match residual {
            Some(residual) => (out + residual)?,
            None => out,
        })
    }

    /// The convolution where `conv_wgmma_bf16` does not run it.
    fn convolve_unfused(&self, x: &Tensor, history: Option<&Tensor>) -> Result<Tensor> {
        let padded = self.pad_time(x, history)?;
        let (batch, frames, channels, height, width) = padded.dims5()?;
        if frames < self.time_kernel {
            return Err(Error::Shape {
                what: "causal conv3d input".into(),
                expected: format!("at least {} frames after padding", self.time_kernel),
                got: padded.dims().to_vec(),
            });
        }
        let out_frames = (frames - self.time_kernel) / self.time_stride + 1;
        #[cfg(feature = "cuda")]
        if let Some(out) = cuda::conv_time_windows(
            &padded,
            &self.weight,
            &self.bias,
            self.spatial_padding,
            self.time_stride,
        )? {
            return frames_per_image(&out, batch);
        }
        let windows = if self.time_kernel == 1 && self.time_stride == 1 {
            padded.reshape((batch * frames, channels, height, width))?
        } else {
            let windows = (0..out_frames)
                .map(|t| {
                    padded
                        .narrow(1, t * self.time_stride, self.time_kernel)?
                        .reshape((batch, self.time_kernel * channels, height, width))
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::stack(&windows, 1)?.reshape((
                batch * out_frames,
                self.time_kernel * channels,
                height,
                width,
            ))?
        };
        let out = conv2d_biased(&windows, &self.weight, &self.bias, self.spatial_padding)?;
        frames_per_image(&out, batch)
    }

    /// How the layer reads time: output frame `k` from input frames `k·stride − (kt − 1)`
    /// to `k·stride` (the causal padding puts the window's end on the output frame).
    pub(super) fn time_reach(&self) -> TimeReach {
        TimeReach {
            lookback: self.time_kernel - 1,
            stride: self.time_stride,
        }
    }

    /// Whether [`CausalConv3d::forward_normalised`] takes `x`: on CUDA, where the layer runs
    /// on the `wgmma` kernel.
    #[cfg(feature = "cuda")]
    pub(super) fn takes_normalised_input(&self, x: &Tensor) -> Result<bool> {
        cuda::takes_normalised_input(x, &self.weight, self.time_stride)
    }

    /// [`CausalConv3d::forward_plus`] of `silu(x / ‖x‖ · scale)` (the channel RMS norm, f32
    /// `scale` `[C]`), with `history` the normalised last frames of the previous chunk
    /// channels last, `[B, n, H, W, C]`. The norm writes the kernel's channels-last input
    /// itself; returns the output and that input, `[B, n' + T, H, W, C]` (the history frames
    /// the padding took, then the chunk's), for the caller to remember its last frames.
    #[cfg(feature = "cuda")]
    pub(super) fn forward_normalised(
        &self,
        x: &Tensor,
        scale: &Tensor,
        history: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let (remembered, front_zeros) = self.time_context(history)?;
        let (out, input) = cuda::normalised_causal_conv(
            x,
            scale,
            (remembered.as_ref(), front_zeros),
            (&self.weight, &self.bias, &self.wgmma_weight),
            self.spatial_padding,
            residual,
        )?;
        Ok((frames_per_image(&out, x.dim(0)?)?, input))
    }

    /// The history frames the causal padding takes (the last `time_padding` at most) and the
    /// zero frames still needed in front of them.
    fn time_context(&self, history: Option<&Tensor>) -> Result<(Option<Tensor>, usize)> {
        match history {
            Some(history) if self.time_padding > 0 => {
                let remembered = history.dim(1)?.min(self.time_padding);
                let start = history.dim(1)? - remembered;
                let kept = history.narrow(1, start, remembered)?;
                Ok((Some(kept), self.time_padding - remembered))
            }
            _ => Ok((None, self.time_padding)),
        }
    }

    /// Prepends the history frames and as many zero frames as the causal padding still needs.
    fn pad_time(&self, x: &Tensor, history: Option<&Tensor>) -> Result<Tensor> {
        let (remembered, front_zeros) = self.time_context(history)?;
        let x = match remembered {
            Some(kept) => Tensor::cat(&[&kept, x], 1)?,
            None => x.clone(),
        };
        Ok(x.pad_with_zeros(1, front_zeros, 0)?)
    }
}

/// The output frames `[B·T, O, H, W]` of `batch` images as `[B, T, O, H, W]`.
fn frames_per_image(out: &Tensor, batch: usize) -> Result<Tensor> {
    let (frames, out_channels, height, width) = out.dims4()?;
    Ok(out.reshape((batch, frames / batch, out_channels, height, width))?)
}

/// A stride-1 2-D convolution of `x` `[N, C, H, W]` with a square `weight` `[O, C, k, k]`, plus
/// `bias` `[O]`. On CUDA: in bf16 with a 1×1 or 3×3 kernel, our implicit-GEMM kernel (tensor
/// cores, the input gathered tile by tile, no column buffer); otherwise our im2col kernel in
/// a GEMM-friendly layout and one GEMM per image, in slices of output positions so that the
/// column buffer stays bounded. Elsewhere [`conv2d_biased_reference`].
pub fn conv2d_biased(x: &Tensor, weight: &Tensor, bias: &Tensor, padding: usize) -> Result<Tensor> {
    conv2d_biased_scaled(x, weight, bias, padding, 1)
}

/// [`conv2d_biased`] of `x` upsampled ×2 by repeating each pixel (the VAE upsamplers'
/// 'nearest-exact', which at factor 2 is 'nearest'). On CUDA's `wgmma` path the upsampling is
/// part of the pass that lays the input out for the kernel, so the upsampled copy never exists.
pub fn upsampled_conv2d_biased(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
) -> Result<Tensor> {
    conv2d_biased_scaled(x, weight, bias, padding, 2)
}

/// The convolution of `x` upsampled `scale` times by repetition.
fn conv2d_biased_scaled(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
    scale: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && weight.dims().get(2) == weight.dims().get(3)
    {
        return cuda::conv2d_biased(x, weight, bias, padding, scale);
    }
    conv2d_biased_reference(&upsampled(x, scale)?, weight, bias, padding)
}

/// `x` `[N, C, H, W]` with each pixel repeated `scale × scale` times.
pub(super) fn upsampled(x: &Tensor, scale: usize) -> Result<Tensor> {
    if scale == 1 {
        return Ok(x.clone());
    }
    let (_, _, height, width) = x.dims4()?;
    Ok(x.upsample_nearest2d(scale * height, scale * width)?)
}

/// [`conv2d_biased`] as candle's `conv2d` and a broadcast add.
pub fn conv2d_biased_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    padding: usize,
) -> Result<Tensor> {
    let channels = bias.elem_count();
    Ok(x.conv2d(weight, padding, 1, 1, 1)?
        .broadcast_add(&bias.reshape((1, channels, 1, 1))?)?)
}

#[cfg(feature = "cuda")]
pub(super) use cuda::{channel_rms_norm, NORM_MAX_CHANNELS};

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::sys::{self, CUfunction_attribute};
    use candle_core::cuda_backend::cudarc::driver::{
        DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use std::sync::OnceLock;

    use candle_core::{DType, Tensor};
    use half::bf16;
    use turbo_core::cuda::{cuda_view, tensor_from_cuda, Swizzle, TensorMap};
    use turbo_core::{Error, Result};

    /// Elements of one column buffer: 2^27 (256 MiB in bf16, 512 MiB in f32).
    const COLUMN_BUDGET: usize = 1 << 27;

    /// The convolution of `x` upsampled `scale` times by repetition (see the caller).
    pub(super) fn conv2d_biased(
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        padding: usize,
        scale: usize,
    ) -> Result<Tensor> {
        let (_, channels, _, _) = x.dims4()?;
        let (out_channels, weight_channels, ksize, _) = weight.dims4()?;
        if weight_channels != channels {
            return Err(Error::Shape {
                what: format!("conv2d weight {:?} for the input", weight.dims()),
                expected: format!("[O, {channels}, k, k]"),
                got: x.dims().to_vec(),
            });
        }
        if x.dtype() == DType::BF16 && wgmma_applies(x, ksize, channels, out_channels)? {
            let input = ChannelsLast::concat(&[&x.unsqueeze(0)?], scale)?;
            let prepared = WgmmaWeight::new(weight, bias, 1, channels)?;
            let windows = Windows::single_frames(input.frames);
            // `[images, O, H', W']`: one single-frame window per image.
            return wgmma_conv(&input, &windows, &prepared, padding, None);
        }
        let x = super::upsampled(&x.contiguous()?, scale)?;
        let (batch, _, height, width) = x.dims4()?;
        let shape = ConvShape::new(channels, height, width, padding, ksize, out_channels)?;
        let (positions, out_w) = (shape.positions, shape.out_w);
        let out_h = positions / out_w;
        let taps = channels * ksize * ksize;
        if x.dtype() == DType::BF16 && matches!(ksize, 1 | 3) {
            let images = Images {
                first: 0,
                count: batch,
                stride: channels * height * width,
            };
            let out = implicit_gemm(&x, images, weight, bias, ksize, &shape)?;
            return Ok(out.reshape((batch, out_channels, out_h, out_w))?);
        }
        // The bias is the GEMM's column after the taps, against the column buffer's row of
        // ones; zero columns pad K to a multiple of 8 (aligned leading dimensions).
        let rows = (taps + 1).next_multiple_of(8);
        let gemm_weight = Tensor::cat(
            &[
                weight.reshape((out_channels, taps))?,
                bias.reshape((out_channels, 1))?,
                Tensor::zeros(
                    (out_channels, rows - taps - 1),
                    weight.dtype(),
                    weight.device(),
                )?,
            ],
            1,
        )?
        .to_dtype(x.dtype())?;
        // Slices of a multiple of 8 positions keep the GEMM's leading dimensions aligned
        // (cuBLAS falls back to slow unaligned kernels otherwise).
        let slice = (COLUMN_BUDGET / (batch * rows) / 8 * 8).clamp(8, positions.max(8));
        let outputs = (0..positions)
            .step_by(slice)
            .map(|first| {
                let count = slice.min(positions - first);
                let columns = im2col(&x, ksize, padding, out_w, first, count, rows)?;
                Ok(gemm_weight.broadcast_matmul(&columns)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = if outputs.len() == 1 {
            outputs.into_iter().next().expect("one slice")
        } else {
            Tensor::cat(&outputs, 2)?
        };
        Ok(out.reshape((batch, out_channels, out_h, out_w))?)
    }

    /// The causal conv3d of a time-major `padded` `[B, F, C, H, W]` (history and front zeros
    /// in place) with its `[O, kt·C, k, k]` weight, as the implicit-GEMM kernel reading each
    /// time window where it lies: window `t` is the `kt·C` channels from frame `t·time_stride`
    /// on, so the windows overlap and are never copied out. `[B·T_out, O, H', W']`, or `None`
    /// where the kernel does not apply (not bf16, not a 1×1 or 3×3 kernel).
    pub(super) fn conv_time_windows(
        padded: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        padding: usize,
        time_stride: usize,
    ) -> Result<Option<Tensor>> {
        let (out_channels, window_channels, ksize, _) = weight.dims4()?;
        if !padded.device().is_cuda() || padded.dtype() != DType::BF16 || !matches!(ksize, 1 | 3) {
            return Ok(None);
        }
        let padded = padded.contiguous()?;
        let (batch, frames, channels, height, width) = padded.dims5()?;
        let frame = channels * height * width;
        let window_frames = window_channels / channels.max(1);
        if window_channels % channels.max(1) != 0 || window_frames > frames || time_stride == 0 {
            return Err(Error::Shape {
                what: format!("conv3d weight {:?} for the input", weight.dims()),
                expected: format!("[O, kt·{channels}, k, k] with kt ≤ {frames} frames"),
                got: padded.dims().to_vec(),
            });
        }
        let windows = (frames - window_frames) / time_stride + 1;
        let shape = ConvShape::new(window_channels, height, width, padding, ksize, out_channels)?;
        let outputs = (0..batch)
            .map(|b| {
                let images = Images {
                    first: b * frames * frame,
                    count: windows,
                    stride: time_stride * frame,
                };
                implicit_gemm(&padded, images, weight, bias, ksize, &shape)
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Tensor::cat(&outputs, 0)?;
        let (out_h, out_w) = (shape.positions / shape.out_w, shape.out_w);
        Ok(Some(out.reshape((
            batch * windows,
            out_channels,
            out_h,
            out_w,
        ))?))
    }

    /// Output channels per CTA of `conv_wgmma_bf16`: the kernel needs a multiple.
    const WGMMA_TILE_O: usize = 96;
    /// Output positions per CTA of `conv_wgmma_bf16`: 4 rows of 64 columns.
    const WGMMA_BOX: (usize, usize) = (64, 4);
    /// Input channels per k step of the `wgmma` convolution, which picks its kernel: 64 in the
    /// 128-byte swizzle (`conv_wgmma_bf16`) where the layer's channels are a multiple of 64,
    /// else 32 in the 64-byte swizzle (`conv_wgmma_c32_bf16`), so that a 96-channel layer takes
    /// three steps instead of two with 32 zero channels. The weight's channels are padded to a
    /// multiple of the step.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    struct WgmmaStep {
        channels: usize,
        swizzle: Swizzle,
        kernel: &'static str,
        /// Dynamic shared memory (`Step64::SMEM_BYTES`, `Step32::SMEM_BYTES` in conv_sm90a.cu).
        smem_bytes: u32,
    }

    impl WgmmaStep {
        const CHANNELS_64: Self = Self {
            channels: 64,
            swizzle: Swizzle::Bytes128,
            kernel: "conv_wgmma_bf16",
            smem_bytes: 208 * 1024 + 128,
        };
        const CHANNELS_32: Self = Self {
            channels: 32,
            swizzle: Swizzle::Bytes64,
            kernel: "conv_wgmma_c32_bf16",
            smem_bytes: 176 * 1024 + 128,
        };

        fn for_channels(channels: usize) -> Self {
            if channels % Self::CHANNELS_64.channels == 0 {
                Self::CHANNELS_64
            } else {
                Self::CHANNELS_32
            }
        }
    }

    /// Whether `conv_wgmma_bf16` runs this convolution: on a compute capability 9.0 device,
    /// a 1×1 or 3×3 kernel, input channels a multiple of 8 (channels-last rows of whole
    /// 16-byte units, as TMA needs).
    fn wgmma_applies(
        x: &Tensor,
        ksize: usize,
        channels: usize,
        out_channels: usize,
    ) -> Result<bool> {
        // Output channels short of a multiple of 96 are computed on zero weights and not
        // written: for the decoders' 3- and 12-channel heads most of the tensor cores'
        // products are wasted, but the implicit GEMM's 16-channel tile is bound by its
        // gather instead (5.1 ms a 480p chunk for the 3-channel head under ncu, v12).
        let shape_fits = matches!(ksize, 1 | 3) && channels % 8 == 0 && out_channels > 0;
        if !shape_fits {
            return Ok(false);
        }
        let dev = x.device().as_cuda_device()?;
        Ok(dev.cuda_stream().context().compute_capability().w()? == (9, 0))
    }

    /// The layer's `[O, kt·C, k, k]` weight, its bias, and the lazily made [`WgmmaWeight`].
    pub(super) type LayerWeights<'a> = (&'a Tensor, &'a Tensor, &'a OnceLock<WgmmaWeight>);

    /// The causal conv3d of `x` `[B, T, C, H, W]` after `front_zeros` zero frames and the
    /// `remembered` frames `[B, n, C, H, W]`, with the layer's weights, on `conv_wgmma_bf16`:
    /// `[B·T_out, O, H', W']`, or `None` where that kernel does not apply. The zero frames are
    /// TMA's zero fill and the windows are read in place: nothing is concatenated or padded.
    pub(super) fn causal_conv(
        x: &Tensor,
        remembered: Option<&Tensor>,
        front_zeros: usize,
        (weight, bias, prepared): LayerWeights,
        (padding, time_stride): (usize, usize),
        residual: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        if !wgmma_runs_causal(x, weight)? {
            return Ok(None);
        }
        let parts: Vec<&Tensor> = remembered.into_iter().chain([x]).collect();
        let input = ChannelsLast::concat(&parts, 1)?;
        let weights = (weight, bias, prepared);
        let out = layer_conv(
            &input,
            weights,
            (front_zeros, time_stride),
            padding,
            residual,
        )?;
        Ok(Some(out))
    }

    /// The causal conv3d of the frames of `input` after `front_zeros` zero frames, at
    /// `time_stride`, with the layer's weights (laid out for `conv_wgmma_bf16` on the first
    /// call), plus `residual` where given: `[images·windows, O, H', W']`.
    fn layer_conv(
        input: &ChannelsLast,
        (weight, bias, prepared): LayerWeights,
        (front_zeros, time_stride): (usize, usize),
        padding: usize,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let channels = input.channels;
        let window_frames = weight.dim(1)? / channels;
        let padded_frames = front_zeros + input.frames;
        if window_frames > padded_frames || time_stride == 0 {
            return Err(Error::Shape {
                what: format!("conv3d weight {:?} for the input", weight.dims()),
                expected: format!("[O, kt·{channels}, k, k] with kt ≤ {padded_frames} frames"),
                got: vec![
                    input.images,
                    input.frames,
                    channels,
                    input.height,
                    input.width,
                ],
            });
        }
        let windows = Windows {
            per_image: (padded_frames - window_frames) / time_stride + 1,
            time_stride,
            window_frames,
            front_zeros,
        };
        let prepared = match prepared.get() {
            Some(prepared) => prepared,
            None => {
                let made = WgmmaWeight::new(weight, bias, window_frames, channels)?;
                // Laid out on this thread's stream; another thread sharing the layer reads it
                // on its own (candle enqueues per thread), so it must be complete first.
                weight.device().synchronize()?;
                prepared.get_or_init(|| made)
            }
        };
        wgmma_conv(input, &windows, prepared, padding, residual)
    }

    /// Pixels per CTA of `channel_rms_norm_*` and the row pitch of its shared tile, in
    /// elements (`NORM_PIXELS`, `NORM_PITCH` in conv.cu).
    const NORM_PIXELS: usize = 32;
    const NORM_PITCH: usize = 34;
    /// Pixels per CTA of `channel_rms_norm_x8_bf16` (`NORM8_PIXELS` in conv.cu).
    const NORM8_PIXELS: usize = 64;
    /// The most channels `channel_rms_norm_*` holds in shared memory (209 KiB in f32).
    pub(crate) const NORM_MAX_CHANNELS: usize = 1536;

    /// The channel RMS norm (and SiLU) of `x` `[…, C, H, W]` with f32 `scale` `[C]`, in `x`'s
    /// layout; `C` at most [`NORM_MAX_CHANNELS`].
    pub(crate) fn channel_rms_norm(x: &Tensor, scale: &Tensor, silu: bool) -> Result<Tensor> {
        let x = x.contiguous()?;
        let rank = x.rank();
        let channels = x.dim(rank - 3)?;
        let inner = x.dim(rank - 2)? * x.dim(rank - 1)?;
        let frames = x.elem_count() / (channels * inner).max(1);
        let dev = x.device().as_cuda_device()?;
        let stream = dev.cuda_stream();
        let (xs, xl) = x.storage_and_layout();
        macro_rules! launch {
            ($t:ty) => {{
                let x_view = cuda_view::<$t>(&xs, xl.start_offset(), "norm input")?;
                let mut out = unsafe { dev.alloc::<$t>(x.elem_count()) }?;
                {
                    let (x_ptr, _x_read) = x_view.device_ptr(&stream);
                    let (out_ptr, _out_write) = out.device_ptr_mut(&stream);
                    let norm = NormLaunch {
                        dtype: x.dtype(),
                        frames,
                        channels,
                        inner,
                        silu,
                        channels_last: false,
                    };
                    norm.launch(dev, x_ptr, scale, out_ptr)?;
                }
                tensor_from_cuda(out, dev, x.shape().clone())
            }};
        }
        Ok(match x.dtype() {
            DType::BF16 => launch!(bf16),
            _ => launch!(f32),
        })
    }

    /// One launch of `channel_rms_norm_{bf16,f32}`: `frames` frames of `channels` ×
    /// `inner` pixels, written in the input's layout or channels last.
    struct NormLaunch {
        /// bf16 or f32, the input's and the output's.
        dtype: DType,
        frames: usize,
        channels: usize,
        inner: usize,
        silu: bool,
        channels_last: bool,
    }

    impl NormLaunch {
        /// Reads `x` and writes `out` (raw addresses: the caller holds their guards).
        fn launch(&self, dev: &CudaDevice, x: u64, scale: &Tensor, out: u64) -> Result<()> {
            if self.channels > NORM_MAX_CHANNELS {
                return Err(Error::Shape {
                    what: "channel RMS norm input".into(),
                    expected: format!("at most {NORM_MAX_CHANNELS} channels"),
                    got: vec![self.frames, self.channels, self.inner],
                });
            }
            let kernel = NormKernel::for_launch(self, x, out);
            let func = turbo_core::cuda::kernel(
                dev,
                kernel.name(self.dtype),
                "turbo_conv",
                turbo_kernels::CONV,
            )?;
            // Above 48 KiB of dynamic shared memory a kernel must opt in. Always to the most
            // any launch takes: threads sharing the function (one per simulated rank, say)
            // would otherwise lower it between another thread's opt-in and its launch.
            func.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                kernel.shared_bytes(NORM_MAX_CHANNELS, DType::F32) as i32,
            )
            .w()?;
            let (ss, sl) = scale.storage_and_layout();
            let scale_view = cuda_view::<f32>(&ss, sl.start_offset(), "norm scale")?;
            let flags = [self.silu, self.channels_last].map(i32::from);
            let dims = [self.channels, self.inner].map(|d| d as i32);
            let mut launch = func.builder();
            launch.arg(&x).arg(&scale_view).arg(&out);
            for arg in dims.iter().chain(&flags) {
                launch.arg(arg);
            }
            let cfg = LaunchConfig {
                grid_dim: (
                    self.inner.div_ceil(kernel.pixels()) as u32,
                    self.frames as u32,
                    1,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: kernel.shared_bytes(self.channels, self.dtype) as u32,
            };
            unsafe { launch.launch(cfg) }.w()?;
            Ok(())
        }
    }

    /// The channel RMS norm's kernels: `channel_rms_norm_{bf16,f32}` for any shape, and
    /// `channel_rms_norm_x8_bf16`, which moves 16 bytes a thread, for bf16 frames of a
    /// multiple of 8 channels and pixels at 16-byte aligned addresses (the VAE's).
    #[derive(Clone, Copy)]
    enum NormKernel {
        Any,
        Runs8,
    }

    impl NormKernel {
        fn for_launch(norm: &NormLaunch, x: u64, out: u64) -> Self {
            let runs_of_8 = norm.dtype == DType::BF16
                && norm.channels % 8 == 0
                && norm.inner % 8 == 0
                && x % 16 == 0
                && out % 16 == 0;
            if runs_of_8 {
                Self::Runs8
            } else {
                Self::Any
            }
        }

        fn name(self, dtype: DType) -> &'static str {
            match (self, dtype) {
                (Self::Runs8, _) => "channel_rms_norm_x8_bf16",
                (Self::Any, DType::BF16) => "channel_rms_norm_bf16",
                (Self::Any, _) => "channel_rms_norm_f32",
            }
        }

        /// Pixels per CTA (`NORM_PIXELS`, `NORM8_PIXELS` in conv.cu).
        fn pixels(self) -> usize {
            match self {
                Self::Any => NORM_PIXELS,
                Self::Runs8 => NORM8_PIXELS,
            }
        }

        /// Dynamic shared memory of a launch over `channels` channels of `dtype`.
        fn shared_bytes(self, channels: usize, dtype: DType) -> usize {
            match self {
                Self::Any => channels * NORM_PITCH * dtype.size_in_bytes(),
                Self::Runs8 => self.pixels() * (channels + 2) * DType::BF16.size_in_bytes(),
            }
        }
    }

    /// Whether [`normalised_causal_conv`] runs this layer on `x`: where [`causal_conv`] runs
    /// it on `conv_wgmma_bf16`, at stride 1, with few enough channels for the norm.
    pub(super) fn takes_normalised_input(
        x: &Tensor,
        weight: &Tensor,
        time_stride: usize,
    ) -> Result<bool> {
        Ok(time_stride == 1 && x.dim(2)? <= NORM_MAX_CHANNELS && wgmma_runs_causal(x, weight)?)
    }

    /// Whether `conv_wgmma_bf16` runs the causal conv3d of `x` `[B, T, C, H, W]` with its
    /// `[O, kt·C, k, k]` weight: bf16 on CUDA, where [`wgmma_applies`].
    fn wgmma_runs_causal(x: &Tensor, weight: &Tensor) -> Result<bool> {
        let (out_channels, window_channels, ksize, _) = weight.dims4()?;
        let channels = x.dim(2)?;
        Ok(x.device().is_cuda()
            && x.dtype() == DType::BF16
            && window_channels % channels.max(1) == 0
            && wgmma_applies(x, ksize, channels, out_channels)?)
    }

    /// The causal conv3d of `silu(norm(x))` for `x` `[B, T, C, H, W]` (norm scale `scale`,
    /// f32 `[C]`) after `front_zeros` zero frames and `history` (`[B, n, H, W, C]`, frames
    /// normalised before, channels last), plus `residual` where given. The norm writes the
    /// chunk channels-last straight into the kernel's input buffer, behind a copy of the
    /// history, so no transpose runs. Returns the output `[B·T, O, H, W]` and that input
    /// buffer, `[B, n + T, H, W, C]`, whose last frames the caller remembers.
    pub(super) fn normalised_causal_conv(
        x: &Tensor,
        scale: &Tensor,
        (history, front_zeros): (Option<&Tensor>, usize),
        weights: LayerWeights,
        padding: usize,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let x = x.contiguous()?;
        let (images, chunk, channels, height, width) = x.dims5()?;
        let remembered = match history {
            Some(history) => history.dim(1)?,
            None => 0,
        };
        let frames = remembered + chunk;
        let frame = channels * height * width;
        let device = x.device().as_cuda_device()?.clone();
        let stream = device.cuda_stream();
        let mut input = ChannelsLast::uninit(&device, images, frames, (channels, height, width))?;
        let (xs, xl) = x.storage_and_layout();
        for image in 0..images {
            let image_frames = image * frames * frame..(image + 1) * frames * frame;
            let mut into = input.buffer.slice_mut(image_frames);
            if let Some(history) = history {
                let part = history.get(image)?.contiguous()?;
                if part.dims() != [remembered, height, width, channels] {
                    return Err(Error::Shape {
                        what: "remembered channels-last frames of a causal conv3d".into(),
                        expected: format!("[{remembered}, {height}, {width}, {channels}]"),
                        got: part.dims().to_vec(),
                    });
                }
                let (ps, pl) = part.storage_and_layout();
                let view = cuda_view::<bf16>(&ps, pl.start_offset(), "remembered frames")?
                    .slice(..remembered * frame);
                stream
                    .memcpy_dtod(&view, &mut into.slice_mut(..remembered * frame))
                    .w()?;
            }
            let x_view =
                cuda_view::<bf16>(&xs, xl.start_offset() + image * chunk * frame, "norm input")?;
            let (x_ptr, _x_read) = x_view.device_ptr(&stream);
            let mut chunk_out = into.slice_mut(remembered * frame..);
            let (out_ptr, _out_write) = chunk_out.device_ptr_mut(&stream);
            let norm = NormLaunch {
                dtype: DType::BF16,
                frames: chunk,
                channels,
                inner: height * width,
                silu: true,
                channels_last: true,
            };
            norm.launch(&device, x_ptr, scale, out_ptr)?;
        }
        let out = layer_conv(&input, weights, (front_zeros, 1), padding, residual)?;
        Ok((out, input.into_tensor()))
    }

    /// Frames in the channels-last layout `conv_wgmma_bf16` reads, `[images, frames, H, W,
    /// C]` bf16.
    struct ChannelsLast {
        buffer: candle_core::cuda_backend::cudarc::driver::CudaSlice<bf16>,
        device: candle_core::cuda_backend::CudaDevice,
        images: usize,
        frames: usize,
        height: usize,
        width: usize,
        channels: usize,
    }

    impl ChannelsLast {
        /// The frames of each of `parts` (`[images, n_i, C, H, W]` bf16, all alike but in
        /// `n_i`), one part after the other within each image, each pixel repeated `scale ×
        /// scale` times, with `channels_last_bf16`.
        fn concat(parts: &[&Tensor], scale: usize) -> Result<Self> {
            let (images, _, channels, part_height, part_width) = parts[0].dims5()?;
            let (height, width) = (part_height * scale, part_width * scale);
            let frames = parts
                .iter()
                .map(|p| p.dim(1))
                .sum::<candle_core::Result<usize>>()?;
            let device = parts[0].device().as_cuda_device()?;
            let frame = channels * height * width;
            let part_frame = channels * part_height * part_width;
            let mut input = Self::uninit(device, images, frames, (channels, height, width))?;
            let func = turbo_core::cuda::kernel(
                device,
                "channels_last_bf16",
                "turbo_conv",
                turbo_kernels::CONV,
            )?;
            let mut first = 0;
            for part in parts {
                let part = part.contiguous()?;
                let count = part.dim(1)?;
                if part.dims() != [images, count, channels, part_height, part_width] {
                    return Err(Error::Shape {
                        what: "remembered frames of a causal conv3d".into(),
                        expected: format!("[{images}, n, {channels}, {part_height}, {part_width}]"),
                        got: part.dims().to_vec(),
                    });
                }
                let (storage, layout) = part.storage_and_layout();
                for image in 0..images {
                    let from = layout.start_offset() + image * count * part_frame;
                    let view = cuda_view::<bf16>(&storage, from, "conv input")?;
                    let mut into = input.buffer.slice_mut((image * frames + first) * frame..);
                    let dims = [channels, part_height, part_width, scale].map(|d| d as i32);
                    let mut launch = func.builder();
                    launch.arg(&view).arg(&mut into);
                    for dim in &dims {
                        launch.arg(dim);
                    }
                    let cfg = LaunchConfig {
                        grid_dim: (
                            (part_height * part_width).div_ceil(32) as u32,
                            channels.div_ceil(32) as u32,
                            count as u32,
                        ),
                        block_dim: (32, 8, 1),
                        shared_mem_bytes: 0,
                    };
                    unsafe { launch.launch(cfg) }.w()?;
                }
                first += count;
            }
            Ok(input)
        }

        /// Room for `frames` frames of `images` images, not yet written.
        fn uninit(
            device: &candle_core::cuda_backend::CudaDevice,
            images: usize,
            frames: usize,
            (channels, height, width): (usize, usize, usize),
        ) -> Result<Self> {
            // SAFETY: every caller writes all of it before a kernel reads it.
            let buffer =
                unsafe { device.alloc::<bf16>(images * frames * channels * height * width) }?;
            Ok(Self {
                buffer,
                device: device.clone(),
                images,
                frames,
                height,
                width,
                channels,
            })
        }

        /// The frames as a tensor, `[images, frames, H, W, C]`.
        fn into_tensor(self) -> Tensor {
            let shape = (
                self.images,
                self.frames,
                self.height,
                self.width,
                self.channels,
            );
            tensor_from_cuda(self.buffer, &self.device, shape)
        }

        /// Its 5-D TMA map in boxes of the step's channels × `64 + ksize − 1` columns ×
        /// `WGMMA_BOX.1` rows (one frame of one image): a row of taps' input, which each of its
        /// `ksize` taps reads from its own column on.
        fn tensor_map(
            &self,
            ptr: sys::CUdeviceptr,
            ksize: usize,
            step: WgmmaStep,
        ) -> Result<TensorMap> {
            let row = (self.channels * 2) as u64;
            let frame = row * (self.width * self.height) as u64;
            TensorMap::swizzled(
                ptr,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                &[
                    self.channels,
                    self.width,
                    self.height,
                    self.frames,
                    self.images,
                ]
                .map(|d| d as u64),
                &[
                    row,
                    row * self.width as u64,
                    frame,
                    frame * self.frames as u64,
                ],
                &[step.channels, WGMMA_BOX.0 + ksize - 1, WGMMA_BOX.1, 1, 1].map(|d| d as u32),
                step.swizzle,
            )
        }
    }

    /// The windows of each image that a `conv_wgmma_bf16` launch convolves: window `t` is
    /// `window_frames` frames from frame `t·time_stride − front_zeros` on (zeros before the
    /// first), their channels one after the other.
    struct Windows {
        per_image: usize,
        time_stride: usize,
        window_frames: usize,
        front_zeros: usize,
    }

    impl Windows {
        /// A plain 2-D convolution of `count` images, taken as the frames of one image with a
        /// single-frame window on each.
        fn single_frames(count: usize) -> Self {
            Self {
                per_image: count,
                time_stride: 1,
                window_frames: 1,
                front_zeros: 0,
            }
        }
    }

    /// The convolution of each window of `input` with `weight`, plus `residual` (any shape of
    /// as many elements as the output) on `conv_wgmma_bf16`: `[images·windows, O, H', W']`.
    fn wgmma_conv(
        input: &ChannelsLast,
        windows: &Windows,
        weight: &WgmmaWeight,
        padding: usize,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (out_channels, ksize, step) = (weight.out_channels, weight.ksize, weight.step);
        let shape = ConvShape::new(
            input.channels,
            input.height,
            input.width,
            padding,
            ksize,
            out_channels,
        )?;
        let (out_w, out_h) = (shape.out_w, shape.positions / shape.out_w);
        let (taps, bias) = (&weight.taps, &weight.bias);
        let dev = &input.device;
        let count = input.images * windows.per_image;
        let out_len = count * out_channels * shape.positions;
        let residual = residual
            .map(|r| {
                if r.elem_count() != out_len || r.dtype() != DType::BF16 {
                    return Err(Error::Shape {
                        what: format!("residual ({:?}) of a convolution", r.dtype()),
                        expected: format!(
                            "{out_len} bf16 values: [{count}, {out_channels}, {out_h}, {out_w}]"
                        ),
                        got: r.dims().to_vec(),
                    });
                }
                Ok(r.contiguous()?)
            })
            .transpose()?;
        let out = unsafe { dev.alloc::<bf16>(out_len) }?;
        let stream = dev.cuda_stream();
        let (ws, wl) = taps.storage_and_layout();
        let (bs, bl) = bias.storage_and_layout();
        let w_view = cuda_view::<bf16>(&ws, wl.start_offset(), "conv weight (tap major)")?;
        let b_view = cuda_view::<f32>(&bs, bl.start_offset(), "conv bias")?;
        // The maps hold raw addresses: the read guards live until the launch is queued.
        let (x_ptr, _x_read) = input.buffer.device_ptr(&stream);
        let (w_ptr, _w_read) = w_view.device_ptr(&stream);
        let x_map = input.tensor_map(x_ptr, ksize, step)?;
        let k_total = taps.dim(1)?;
        let w_map = TensorMap::swizzled(
            w_ptr,
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            &[k_total as u64, taps.dim(0)? as u64],
            &[(k_total * 2) as u64],
            &[step.channels as u32, WGMMA_TILE_O as u32],
            step.swizzle,
        )?;
        let func = turbo_core::cuda::kernel(
            dev,
            step.kernel,
            "turbo_conv_sm90a",
            turbo_kernels::CONV_SM90A,
        )?;
        // Above 48 KiB of dynamic shared memory a kernel must opt in.
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            step.smem_bytes as i32,
        )
        .w()?;
        let tiles_x = out_w.div_ceil(WGMMA_BOX.0);
        let args = [
            windows.front_zeros,
            windows.per_image,
            windows.time_stride,
            windows.window_frames,
            ksize,
            padding,
            input.channels.div_ceil(step.channels),
            out_h,
            out_w,
            out_channels,
            tiles_x,
        ]
        .map(|v| v as i32);
        let residual_storage = residual.as_ref().map(|r| r.storage_and_layout());
        let residual_view = match &residual_storage {
            Some((rs, rl)) => Some(cuda_view::<bf16>(rs, rl.start_offset(), "conv residual")?),
            None => None,
        };
        let residual_ptr = residual_view.as_ref().map(|r| r.device_ptr(&stream));
        // A null pointer tells the kernel there is no residual.
        let residual_arg = residual_ptr.as_ref().map_or(0, |(ptr, _)| *ptr);
        let mut launch = func.builder();
        launch
            .arg(&x_map)
            .arg(&w_map)
            .arg(&b_view)
            .arg(&residual_arg)
            .arg(&out);
        for arg in &args {
            launch.arg(arg);
        }
        let cfg = LaunchConfig {
            grid_dim: (
                (tiles_x * out_h.div_ceil(WGMMA_BOX.1)) as u32,
                (taps.dim(0)? / WGMMA_TILE_O) as u32,
                count as u32,
            ),
            block_dim: (384, 1, 1),
            shared_mem_bytes: step.smem_bytes,
        };
        unsafe { launch.launch(cfg) }.w()?;
        Ok(tensor_from_cuda(
            out,
            dev,
            (count, out_channels, out_h, out_w),
        ))
    }

    /// A convolution's weight and bias as `conv_wgmma_bf16` reads them.
    #[derive(Debug, Clone)]
    pub(super) struct WgmmaWeight {
        /// `[O_pad, window_frames·k·k·C_pad]` bf16: for each tap (frame of the window, ky, kx)
        /// its channels, zero-padded to a multiple of the step's, in the order of the kernel's
        /// k steps; zero rows pad the output channels to a multiple of 96 (the kernel's tile).
        taps: Tensor,
        /// `[O_pad]` f32.
        bias: Tensor,
        /// The layer's output channels `O`, the ones written.
        out_channels: usize,
        ksize: usize,
        /// The k step, which `taps`' channel padding follows.
        step: WgmmaStep,
    }

    impl WgmmaWeight {
        /// From a `[O, window_frames·C, k, k]` weight and its bias.
        fn new(
            weight: &Tensor,
            bias: &Tensor,
            window_frames: usize,
            channels: usize,
        ) -> Result<Self> {
            let (out_channels, _, ksize, _) = weight.dims4()?;
            let step = WgmmaStep::for_channels(channels);
            let padded_channels = channels.next_multiple_of(step.channels);
            let padded_outputs = out_channels.next_multiple_of(WGMMA_TILE_O) - out_channels;
            let taps = weight
                .reshape((out_channels, window_frames, channels, ksize, ksize))?
                .permute((0, 1, 3, 4, 2))?
                .pad_with_zeros(4, 0, padded_channels - channels)?
                .reshape((
                    out_channels,
                    window_frames * ksize * ksize * padded_channels,
                ))?
                .pad_with_zeros(0, 0, padded_outputs)?;
            Ok(Self {
                taps: taps.to_dtype(DType::BF16)?.contiguous()?,
                bias: bias
                    .to_dtype(DType::F32)?
                    .pad_with_zeros(0, 0, padded_outputs)?
                    .contiguous()?,
                out_channels,
                ksize,
                step,
            })
        }
    }

    /// The images an implicit-GEMM launch convolves: `count` images of `ConvShape::channels`
    /// channels, the first at element `first` of the input and each `stride` elements after
    /// the one before (less than an image's size when they overlap).
    struct Images {
        first: usize,
        count: usize,
        stride: usize,
    }

    /// What the implicit-GEMM kernel needs to know of a convolution.
    struct ConvShape {
        channels: usize,
        height: usize,
        width: usize,
        padding: usize,
        out_w: usize,
        positions: usize,
        out_channels: usize,
    }

    /// Taps per step of the implicit-GEMM kernel: its weight rows are padded to a multiple.
    const IMPLICIT_STEP: usize = 32;
    /// Output positions per CTA of the implicit-GEMM kernel.
    const IMPLICIT_POSITIONS: usize = 128;

    /// The implicit-GEMM kernel's output-channel tile: 128, or 16 for layers with at most 16
    /// output channels (the decoders' heads), which a 128 tile would leave mostly zeros.
    #[derive(Clone, Copy)]
    enum ImplicitTile {
        Wide,
        Narrow,
    }

    impl ImplicitTile {
        fn for_outputs(out_channels: usize) -> Self {
            if out_channels <= 16 {
                Self::Narrow
            } else {
                Self::Wide
            }
        }

        fn out_channels(self) -> usize {
            match self {
                Self::Wide => 128,
                Self::Narrow => 16,
            }
        }

        fn kernel(self, ksize: usize) -> &'static str {
            match (self, ksize) {
                (Self::Wide, 1) => "conv2d_implicit_k1_bf16",
                (Self::Wide, _) => "conv2d_implicit_k3_bf16",
                (Self::Narrow, 1) => "conv2d_implicit_k1_o16_bf16",
                (Self::Narrow, _) => "conv2d_implicit_k3_o16_bf16",
            }
        }
    }

    impl ConvShape {
        /// A stride-1 `ksize`×`ksize` convolution with `padding` on every side.
        fn new(
            channels: usize,
            height: usize,
            width: usize,
            padding: usize,
            ksize: usize,
            out_channels: usize,
        ) -> Result<Self> {
            if height + 2 * padding < ksize || width + 2 * padding < ksize {
                return Err(Error::Shape {
                    what: format!("a {ksize}×{ksize} convolution with padding {padding}"),
                    expected: format!("frames of at least {ksize} pixels once padded"),
                    got: vec![height, width],
                });
            }
            let out_w = width + 2 * padding - ksize + 1;
            Ok(Self {
                channels,
                height,
                width,
                padding,
                out_w,
                positions: (height + 2 * padding - ksize + 1) * out_w,
                out_channels,
            })
        }
    }

    /// The bf16 convolution of `images` of `x` as one implicit-GEMM kernel (no column buffer):
    /// `[images.count, O, positions]`.
    fn implicit_gemm(
        x: &Tensor,
        images: Images,
        weight: &Tensor,
        bias: &Tensor,
        ksize: usize,
        shape: &ConvShape,
    ) -> Result<Tensor> {
        let batch = images.count;
        let taps = shape.channels * ksize * ksize;
        let k_pad = taps.next_multiple_of(IMPLICIT_STEP);
        let gemm_weight = Tensor::cat(
            &[
                weight.reshape((shape.out_channels, taps))?,
                Tensor::zeros(
                    (shape.out_channels, k_pad - taps),
                    weight.dtype(),
                    weight.device(),
                )?,
            ],
            1,
        )?
        .to_dtype(DType::BF16)?
        .contiguous()?;
        let bias = bias.to_dtype(DType::F32)?.contiguous()?;
        let dev = x.device().as_cuda_device()?;
        let out = unsafe { dev.alloc::<bf16>(batch * shape.out_channels * shape.positions) }?;
        {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = gemm_weight.storage_and_layout();
            let (bs, bl) = bias.storage_and_layout();
            let x_view = cuda_view::<bf16>(&xs, xl.start_offset() + images.first, "conv2d input")?;
            let w_view = cuda_view::<bf16>(&ws, wl.start_offset(), "conv2d weight")?;
            let b_view = cuda_view::<f32>(&bs, bl.start_offset(), "conv2d bias")?;
            let tile = ImplicitTile::for_outputs(shape.out_channels);
            let kernel = tile.kernel(ksize);
            let func = turbo_core::cuda::kernel(dev, kernel, "turbo_conv", turbo_kernels::CONV)?;
            let mut launch = func.builder();
            let image_stride = images.stride as i64;
            launch
                .arg(&x_view)
                .arg(&image_stride)
                .arg(&w_view)
                .arg(&b_view)
                .arg(&out);
            let args = [
                shape.channels,
                shape.height,
                shape.width,
                shape.padding,
                shape.out_w,
                shape.positions,
                shape.out_channels,
                k_pad,
            ]
            .map(|v| v as i32);
            for arg in &args {
                launch.arg(arg);
            }
            let cfg = LaunchConfig {
                grid_dim: (
                    shape.positions.div_ceil(IMPLICIT_POSITIONS) as u32,
                    shape.out_channels.div_ceil(tile.out_channels()) as u32,
                    batch as u32,
                ),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { launch.launch(cfg) }.w()?;
        }
        Ok(tensor_from_cuda(
            out,
            dev,
            (batch, shape.out_channels, shape.positions),
        ))
    }

    /// `[N, rows, count]` columns for output positions `first..first + count`: the taps, a row
    /// of ones, zero rows up to `rows`.
    fn im2col(
        x: &Tensor,
        ksize: usize,
        padding: usize,
        out_w: usize,
        first: usize,
        count: usize,
        rows: usize,
    ) -> Result<Tensor> {
        let (batch, channels, height, width) = x.dims4()?;
        let total = batch * rows * count;
        let dev = x.device().as_cuda_device()?;
        let (storage, layout) = x.storage_and_layout();
        let int = |v: usize| v as i32;
        let dims = [
            int(channels),
            int(height),
            int(width),
            int(ksize),
            int(padding),
            int(out_w),
        ];
        let (first, count_arg) = (first as i64, int(count));
        let rows_arg = int(rows);
        let cfg = LaunchConfig {
            grid_dim: (count.div_ceil(256) as u32, rows as u32, batch as u32),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($t:ty, $kernel:literal) => {{
                let view = cuda_view::<$t>(&storage, layout.start_offset(), "conv2d input")?;
                let col = unsafe { dev.alloc::<$t>(total) }?;
                let func =
                    turbo_core::cuda::kernel(dev, $kernel, "turbo_conv", turbo_kernels::CONV)?;
                let mut launch = func.builder();
                launch.arg(&view).arg(&col);
                for d in &dims {
                    launch.arg(d);
                }
                launch.arg(&first).arg(&count_arg).arg(&rows_arg);
                unsafe { launch.launch(cfg) }.w()?;
                tensor_from_cuda(col, dev, (batch, rows, count))
            }};
        }
        Ok(match x.dtype() {
            DType::BF16 => launch!(bf16, "im2col_rows_bf16"),
            _ => launch!(f32, "im2col_rows_f32"),
        })
    }
}

/// The plain-loop twin of [`CausalConv3d::forward`] (without history), on `[B, T, C, H, W]`
/// f32 data and an upstream `[O, C, kt, kh, kw]` weight: the definition of a conv3d, written
/// out index by index. Slow; for tests.
pub fn causal_conv3d_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    spec: Conv3dSpec,
) -> Result<Tensor> {
    let (batch, frames, channels, height, width) = x.dims5()?;
    let (out_channels, _, kt, kh, kw) = weight.dims5()?;
    let x = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let w = weight
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let b = bias.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let pad_t = 2 * spec.padding.0;
    let pad_s = spec.padding.1;
    let out_frames = (frames + pad_t - kt) / spec.time_stride + 1;
    let out_height = height + 2 * pad_s - kh + 1;
    let out_width = width + 2 * pad_s - kw + 1;
    let input = |bi: usize, t: isize, c: usize, y: isize, xx: isize| -> f32 {
        let inside = (0..frames as isize).contains(&t)
            && (0..height as isize).contains(&y)
            && (0..width as isize).contains(&xx);
        if !inside {
            return 0.0;
        }
        let (t, y, xx) = (t as usize, y as usize, xx as usize);
        x[(((bi * frames + t) * channels + c) * height + y) * width + xx]
    };
    // One output value: the bias plus the kernel's dot product with the window it covers.
    let output = |bi: usize, to: usize, o: usize, yo: usize, xo: usize| -> f32 {
        let mut acc = b[o];
        for c in 0..channels {
            for i in 0..kt {
                for j in 0..kh {
                    for k in 0..kw {
                        let t = (to * spec.time_stride + i) as isize - pad_t as isize;
                        let y = (yo + j) as isize - pad_s as isize;
                        let xx = (xo + k) as isize - pad_s as isize;
                        let wi = (((o * channels + c) * kt + i) * kh + j) * kw + k;
                        acc += w[wi] * input(bi, t, c, y, xx);
                    }
                }
            }
        }
        acc
    };
    let mut out = Vec::with_capacity(batch * out_frames * out_channels * out_height * out_width);
    for bi in 0..batch {
        for to in 0..out_frames {
            for o in 0..out_channels {
                for yo in 0..out_height {
                    for xo in 0..out_width {
                        out.push(output(bi, to, o, yo, xo));
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(
        out,
        (batch, out_frames, out_channels, out_height, out_width),
        &candle_core::Device::Cpu,
    )?)
}
