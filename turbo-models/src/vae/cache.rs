//! The streaming feature cache of the Wan VAE (`feat_cache` upstream, `CACHE_T = 2`).
//!
//! Encoding and decoding run chunk by chunk. Every temporal convolution remembers the last two
//! frames of its input, so the next chunk sees the same context as a pass over the whole video
//! would. Slots are taken in the order the convolutions are visited, which is the same for every
//! chunk; [`FeatureCache::start_chunk`] rewinds to the first slot.
//!
//! [`FeatureCache::whole_sequence`] selects the reference form instead: the whole video in one
//! pass, with each quirk of the streaming form written as its sequence equivalent
//! (`spec/wan-model.md` §6.1). Its memory grows with the length; tests compare the two.
//! [`FeatureCache::whole_sequence_then_stream`] is that form leaving each slot as a streaming
//! pass over the same frames would, so that chunks can follow it.

use candle_core::Tensor;
use turbo_core::Result;

use super::blocks::ChannelRmsNorm;
use super::conv::CausalConv3d;

/// Frames a temporal convolution remembers between chunks.
pub const CACHE_FRAMES: usize = 2;

/// What one temporal convolution remembers.
#[derive(Debug, Clone, Default)]
pub enum Slot {
    /// Not visited yet (the first chunk).
    #[default]
    Empty,
    /// A temporal upsampler that skipped its first chunk (upstream's `'Rep'` marker): the next
    /// chunk is convolved with zero padding, not with the first chunk's frames.
    Replicated,
    /// The last frames (at most [`CACHE_FRAMES`]) of the previous chunk, `[B, n, C, H, W]`.
    Frames(Tensor),
    /// The same channels last, `[B, n, H, W, C]`: what a layer whose norm writes its input
    /// channels last ([`cached_norm_conv`] on CUDA) remembers.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    ChannelsLast(Tensor),
}

impl Slot {
    /// The remembered frames as `[B, n, C, H, W]`, whichever layout they were kept in; `None`
    /// for no frames.
    fn frames(&self) -> Result<Option<Tensor>> {
        Ok(match self {
            Slot::Frames(frames) => Some(frames.clone()),
            Slot::ChannelsLast(frames) => Some(frames.permute((0, 1, 4, 2, 3))?),
            Slot::Empty | Slot::Replicated => None,
        })
    }

    /// The remembered frames channels last, `[B, n, H, W, C]`.
    #[cfg(feature = "cuda")]
    fn frames_channels_last(&self) -> Result<Option<Tensor>> {
        Ok(match self {
            Slot::ChannelsLast(frames) => Some(frames.clone()),
            Slot::Frames(frames) => Some(frames.permute((0, 1, 3, 4, 2))?),
            Slot::Empty | Slot::Replicated => None,
        })
    }
}

/// The per-convolution memory of a streaming encode or decode.
#[derive(Debug, Default)]
pub struct FeatureCache {
    slots: Vec<Slot>,
    cursor: usize,
    form: Form,
}

/// How layers see the video through a [`FeatureCache`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// One chunk at a time, each temporal layer remembering its last frames.
    #[default]
    Streaming,
    /// The whole video at once, nothing remembered.
    WholeSequence,
    /// The whole video at once, each temporal layer leaving its last input frames in its slot
    /// for chunks that follow.
    WholeSequenceThenStream,
}

impl FeatureCache {
    /// The reference mode: every layer sees the whole video at once, nothing is remembered.
    pub fn whole_sequence() -> Self {
        Self {
            form: Form::WholeSequence,
            ..Self::default()
        }
    }

    /// The whole-sequence form, after which the cache holds what a streaming pass over the
    /// same video would: the encoder can go on chunk by chunk (the decoder's temporal upsampler
    /// has no such form).
    pub fn whole_sequence_then_stream() -> Self {
        Self {
            form: Form::WholeSequenceThenStream,
            ..Self::default()
        }
    }

    /// Goes on chunk by chunk after a [`FeatureCache::whole_sequence_then_stream`] pass.
    pub fn start_streaming(&mut self) {
        self.form = Form::Streaming;
        self.cursor = 0;
    }

    /// Whether layers see the whole video rather than one chunk.
    pub fn is_whole_sequence(&self) -> bool {
        self.form != Form::Streaming
    }

    /// In the whole-sequence form, leaves `frames` in the next slot where chunks will follow.
    pub fn remember_after_sequence(&mut self, frames: impl FnOnce() -> Result<Slot>) -> Result<()> {
        if self.form == Form::WholeSequenceThenStream {
            let slot = frames()?;
            *self.next_slot() = slot;
        }
        Ok(())
    }

    /// Rewinds to the first slot before a chunk is processed.
    pub fn start_chunk(&mut self) {
        self.cursor = 0;
    }

    /// The slot of the next temporal convolution visited in this chunk.
    pub fn next_slot(&mut self) -> &mut Slot {
        if self.cursor == self.slots.len() {
            self.slots.push(Slot::Empty);
        }
        self.cursor += 1;
        &mut self.slots[self.cursor - 1]
    }
}

/// The frames to remember after a chunk `x` `[B, T, C, H, W]`: its last two, completed with the
/// last remembered frame when the chunk has a single frame.
pub fn frames_to_remember(x: &Tensor, previous: Option<&Tensor>) -> Result<Tensor> {
    let frames = x.dim(1)?;
    let kept = frames.min(CACHE_FRAMES);
    let tail = x.narrow(1, frames - kept, kept)?;
    match previous {
        Some(previous) if kept < CACHE_FRAMES => {
            let last = previous.narrow(1, previous.dim(1)? - 1, 1)?;
            Ok(Tensor::cat(&[&last, &tail], 1)?)
        }
        _ => Ok(tail),
    }
}

/// Applies a causal convolution to one chunk, with the previous chunk's frames as its history,
/// and remembers this chunk's last frames for the next one.
pub fn cached_conv(conv: &CausalConv3d, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
    cached_conv_plus(conv, x, cache, None)
}

/// [`cached_conv`] plus `residual` where given, shaped as the output
/// ([`CausalConv3d::forward_plus`]).
pub fn cached_conv_plus(
    conv: &CausalConv3d,
    x: &Tensor,
    cache: &mut FeatureCache,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    if cache.is_whole_sequence() {
        // A copy: a view would keep the whole sequence alive.
        let tail = || {
            Ok(Slot::Frames(
                frames_to_remember(x, None)?.force_contiguous()?,
            ))
        };
        cache.remember_after_sequence(tail)?;
        return conv.forward_plus(x, None, residual);
    }
    let index = cache.cursor;
    let history = cache.next_slot().frames()?;
    let remembered = frames_to_remember(x, history.as_ref())?;
    let out = conv.forward_plus(x, history.as_ref(), residual)?;
    cache.slots[index] = Slot::Frames(remembered);
    Ok(out)
}

/// [`cached_conv_plus`] of `silu(norm(x))`. On CUDA, where the layer runs on the `wgmma`
/// kernel, the norm writes that kernel's channels-last input itself (no normalised copy in
/// `x`'s layout, no transpose) and the slot remembers the frames channels last; the
/// whole-sequence form takes the same kernels.
pub fn cached_norm_conv(
    norm: &ChannelRmsNorm,
    conv: &CausalConv3d,
    x: &Tensor,
    cache: &mut FeatureCache,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if conv.takes_normalised_input(x)? {
        if cache.is_whole_sequence() {
            let (out, input) = conv.forward_normalised(x, norm.scale(), None, residual)?;
            cache.remember_after_sequence(|| remembered_channels_last(&input))?;
            return Ok(out);
        }
        let index = cache.cursor;
        let history = cache.next_slot().frames_channels_last()?;
        let (out, input) = conv.forward_normalised(x, norm.scale(), history.as_ref(), residual)?;
        cache.slots[index] = remembered_channels_last(&input)?;
        return Ok(out);
    }
    let h = norm.forward_silu(x)?;
    cached_conv_plus(conv, &h, cache, residual)
}

/// What a layer whose norm wrote its channels-last `input` remembers. The input already holds
/// the history frames the padding took, so its last frames are the ones to remember. A copy: a
/// view would keep the whole input buffer alive.
#[cfg(feature = "cuda")]
fn remembered_channels_last(input: &Tensor) -> Result<Slot> {
    Ok(Slot::ChannelsLast(
        frames_to_remember(input, None)?.force_contiguous()?,
    ))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::vae::conv::Conv3dSpec;

    fn max_difference(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
            .expect("tensors of one shape")
    }

    /// The convolution of one chunk after `slot`, plus `residual`: its output and what the
    /// slot remembers then.
    fn convolve_after(
        conv: &CausalConv3d,
        x: &Tensor,
        slot: Slot,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let mut cache = FeatureCache::default();
        cache.slots.push(slot);
        let out = cached_conv_plus(conv, x, &mut cache, residual)?;
        match &cache.slots[0] {
            Slot::Frames(remembered) => Ok((out, remembered.clone())),
            other => panic!("the CPU path remembers frames in their own layout, got {other:?}"),
        }
    }

    /// A 3×3×3 causal convolution of 3 channels to `out_channels`, random weights.
    fn random_conv(out_channels: usize) -> Result<CausalConv3d> {
        let cpu = Device::Cpu;
        CausalConv3d::new(
            &Tensor::randn(0f32, 1.0, (out_channels, 3, 3, 3, 3), &cpu)?,
            &Tensor::randn(0f32, 1.0, out_channels, &cpu)?,
            Conv3dSpec::cube(3, out_channels, 3, 1),
        )
    }

    #[test]
    fn channels_last_history_is_the_same_history() -> Result<()> {
        let cpu = Device::Cpu;
        let conv = random_conv(2)?;
        let history = Tensor::randn(0f32, 1.0, (1, 2, 3, 4, 5), &cpu)?;
        let x = Tensor::randn(0f32, 1.0, (1, 1, 3, 4, 5), &cpu)?;
        let (out, remembered) = convolve_after(&conv, &x, Slot::Frames(history.clone()), None)?;
        let channels_last = history.permute((0, 1, 3, 4, 2))?.contiguous()?;
        let (out_cl, remembered_cl) =
            convolve_after(&conv, &x, Slot::ChannelsLast(channels_last), None)?;
        assert_eq!(max_difference(&out, &out_cl), 0.0);
        // One new frame: the last remembered frame and the chunk's.
        assert_eq!(remembered.dims(), [1, 2, 3, 4, 5]);
        assert_eq!(max_difference(&remembered, &remembered_cl), 0.0);
        assert_eq!(
            max_difference(&remembered.narrow(1, 0, 1)?, &history.narrow(1, 1, 1)?),
            0.0
        );
        Ok(())
    }

    #[test]
    fn a_residual_is_added_to_the_output() -> Result<()> {
        let cpu = Device::Cpu;
        let conv = random_conv(4)?;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 3, 5, 6), &cpu)?;
        let residual = Tensor::randn(0f32, 1.0, (1, 4, 4, 5, 6), &cpu)?;
        let (plain, _) = convolve_after(&conv, &x, Slot::Empty, None)?;
        let (plus, _) = convolve_after(&conv, &x, Slot::Empty, Some(&residual))?;
        assert!(max_difference(&(plain + &residual)?, &plus) < 1e-6);
        Ok(())
    }
}
