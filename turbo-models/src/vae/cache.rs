//! The streaming feature cache of the Wan VAE (`feat_cache` upstream, `CACHE_T = 2`).
//!
//! Encoding and decoding run chunk by chunk. Every temporal convolution remembers the last two
//! frames of its input, so the next chunk sees the same context as a pass over the whole video
//! would. Slots are taken in the order the convolutions are visited, which is the same for every
//! chunk; [`FeatureCache::start_chunk`] rewinds to the first slot.
//!
//! [`FeatureCache::reusing_steady_frames`] adds an exact shortcut for inputs that stop changing
//! (an image followed by zero frames, as image-to-video encodes): once every frame a
//! convolution reads in a chunk is bitwise the same frame, every output frame is the same too,
//! so the convolution's output frame is remembered and repeated instead of recomputed while
//! that holds. Nothing is approximated: the remembered frame is the one the convolution
//! computed for the same input.
//!
//! [`FeatureCache::whole_sequence`] selects the reference form instead: the whole video in one
//! pass, with each quirk of the streaming form written as its sequence equivalent
//! (`spec/wan-model.md` §6.1). Its memory grows with the length; tests compare the two.

use candle_core::Tensor;
use turbo_core::Result;

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
}

/// The per-convolution memory of a streaming encode or decode.
#[derive(Debug, Default)]
pub struct FeatureCache {
    slots: Vec<Slot>,
    cursor: usize,
    whole_sequence: bool,
    /// The steady-input shortcut, when enabled.
    steady: Option<SteadyOutputs>,
}

/// The output frames of the convolutions whose input stopped changing, per slot.
#[derive(Debug, Default)]
struct SteadyOutputs {
    frames: Vec<Option<Tensor>>,
    /// Output frames repeated instead of computed, over the whole run.
    reused: usize,
}

impl FeatureCache {
    /// The reference mode: every layer sees the whole video at once, nothing is remembered.
    pub fn whole_sequence() -> Self {
        Self {
            whole_sequence: true,
            ..Self::default()
        }
    }

    /// The streaming form with the steady-input shortcut (module docs): for inputs whose last
    /// frames repeat one frame, such as an image followed by zero frames.
    pub fn reusing_steady_frames() -> Self {
        Self {
            steady: Some(SteadyOutputs::default()),
            ..Self::default()
        }
    }

    /// Output frames the steady-input shortcut repeated instead of computing.
    pub fn reused_frames(&self) -> usize {
        self.steady.as_ref().map_or(0, |steady| steady.reused)
    }

    /// Whether layers see the whole video rather than one chunk.
    pub fn is_whole_sequence(&self) -> bool {
        self.whole_sequence
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
    if cache.is_whole_sequence() {
        return conv.forward(x, None);
    }
    let index = cache.cursor;
    let history = match cache.next_slot() {
        Slot::Frames(frames) => Some(frames.clone()),
        Slot::Empty | Slot::Replicated => None,
    };
    let remembered = frames_to_remember(x, history.as_ref())?;
    let out = match cache.steady.as_mut() {
        Some(steady) => steady.forward(index, conv, x, history.as_ref())?,
        None => conv.forward(x, history.as_ref())?,
    };
    cache.slots[index] = Slot::Frames(remembered);
    Ok(out)
}

impl SteadyOutputs {
    /// `conv.forward(x, history)`, repeating the remembered output frame of slot `index` when
    /// every frame the convolution reads is the same frame.
    fn forward(
        &mut self,
        index: usize,
        conv: &CausalConv3d,
        x: &Tensor,
        history: Option<&Tensor>,
    ) -> Result<Tensor> {
        if self.frames.len() <= index {
            self.frames.resize(index + 1, None);
        }
        if !reads_one_repeated_frame(conv, x, history)? {
            self.frames[index] = None;
            return conv.forward(x, history);
        }
        let frames = x.dim(1)?;
        if let Some(frame) = &self.frames[index] {
            self.reused += frames;
            return Ok(frame.repeat((1, frames, 1, 1, 1))?);
        }
        let out = conv.forward(x, history)?;
        // Remember the frame only if the kernel did give every identical window the same
        // output, so that repeating it is exactly what computing it would give.
        let first = out.narrow(1, 0, 1)?;
        if all_frames_equal(&out, &first)? {
            self.frames[index] = Some(first);
        }
        Ok(out)
    }
}

/// Whether every frame `conv` reads for this chunk (the history frames its causal padding
/// takes, and `x`'s) is bitwise the first frame of `x`. The front zeros of a chunk without
/// history do not count as that frame.
fn reads_one_repeated_frame(
    conv: &CausalConv3d,
    x: &Tensor,
    history: Option<&Tensor>,
) -> Result<bool> {
    if conv.time_stride() != 1 {
        return Ok(false);
    }
    let first = x.narrow(1, 0, 1)?;
    if !all_frames_equal(x, &first)? {
        return Ok(false);
    }
    let read = conv.time_padding();
    if read == 0 {
        return Ok(true);
    }
    match history {
        Some(history) if history.dim(1)? >= read => {
            let tail = history.narrow(1, history.dim(1)? - read, read)?;
            all_frames_equal(&tail, &first)
        }
        _ => Ok(false),
    }
}

/// Whether every frame of `frames` `[B, n, C, H, W]` is bitwise `frame` `[B, 1, C, H, W]` (NaN
/// never equals itself, so a NaN frame is never taken as repeated).
fn all_frames_equal(frames: &Tensor, frame: &Tensor) -> Result<bool> {
    let (batch, count, channels, height, width) = frames.dims5()?;
    // Two reductions: candle reduces each output element with one thread block, so a single
    // reduction over the whole chunk would run on one block.
    let differing = frames
        .broadcast_ne(frame)?
        .reshape((batch * count * channels * height, width))?
        .max(1)?
        .max(0)?
        .to_scalar::<u8>()?;
    Ok(differing == 0)
}
