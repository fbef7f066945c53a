//! Videos that end held on one frame, and causal layers run over only the frames that differ.
//!
//! Image-to-video encodes the image followed by zero frames: from its second frame on, the
//! input is one frame repeated. Every layer of the encoder is causal and the same at every
//! time step: an output frame is a fixed function of a window of input frames that ends at it.
//! Once that window lies wholly in the repeated tail, the output frame is that function of the
//! same frames as the next one's, so it equals them: the output too ends held on one frame, a
//! little later (by the window's length). A layer therefore needs to compute its output only up
//! to its first settled frame; the rest repeats it. This is exact, not an approximation: each
//! computed frame sees the very window it would see in a pass over the whole video.

use candle_core::Tensor;
use turbo_core::{Error, Result};

/// How a layer reads time: output frame `k` (for `k ≥ 1` where `stride` is 2, whose first
/// output is its first input) depends on the input frames `k·stride − lookback ..= k·stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeReach {
    /// Input frames before `k·stride` that output frame `k` reads.
    pub lookback: usize,
    /// Input frames per output frame: 1, or 2 for a temporal downsampler.
    pub stride: usize,
}

impl TimeReach {
    /// A layer that works on each frame alone.
    pub const PER_FRAME: Self = Self {
        lookback: 0,
        stride: 1,
    };

    /// `self`, then `next` on its output.
    pub fn then(self, next: Self) -> Self {
        Self {
            lookback: next.lookback * self.stride + self.lookback,
            stride: self.stride * next.stride,
        }
    }

    /// Output frames of `input` input frames.
    fn output_frames(self, input: usize) -> usize {
        (input - 1) / self.stride + 1
    }

    /// Input frames to compute so that the last output frame is settled, when the input is
    /// held from frame `given − 1` on: the window of that output starts at or after it. Whole
    /// strides, so that the last input frame ends an output's window.
    fn input_to_settle(self, given: usize) -> usize {
        let last_read = given - 1 + self.lookback;
        last_read.div_ceil(self.stride) * self.stride + 1
    }
}

/// A video `[B, frames, C, H, W]` of which only the first frames are kept, `given`
/// `[B, n, C, H, W]`: every later frame equals the last of them.
#[derive(Debug, Clone)]
pub struct Held {
    given: Tensor,
    frames: usize,
}

impl Held {
    /// `given` `[B, n, …]` (n ≥ 1) held on its last frame to `frames ≥ n` frames in all.
    pub fn new(given: Tensor, frames: usize) -> Result<Self> {
        let kept = given.dims().get(1).copied().unwrap_or(0);
        if given.rank() < 2 || kept == 0 || kept > frames {
            return Err(Error::Shape {
                what: format!("the given frames of a video held to {frames} frames"),
                expected: format!("[B, n, …] with 1 ≤ n ≤ {frames}"),
                got: given.dims().to_vec(),
            });
        }
        Ok(Self { given, frames })
    }

    /// A layer that reads time as `reach` does, applied to the whole video: `layer` runs on
    /// the given frames extended (by repeating the last) up to its first settled output, or
    /// on the whole video where that is shorter. `layer` takes and returns `[B, T, …]`.
    pub fn through(
        &self,
        reach: TimeReach,
        layer: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        let input = reach.input_to_settle(self.given.dim(1)?).min(self.frames);
        let out = layer(&self.extended(input)?)?;
        let expected = reach.output_frames(input);
        if out.dims().get(1) != Some(&expected) {
            return Err(Error::Shape {
                what: "a layer's output on a held video".into(),
                expected: format!("[B, {expected}, …] from {input} input frames"),
                got: out.dims().to_vec(),
            });
        }
        Self::new(out, reach.output_frames(self.frames))
    }

    /// The whole video, `[B, frames, …]`.
    pub fn into_full(self) -> Result<Tensor> {
        self.extended(self.frames)
    }

    /// The given frames followed by copies of the last, `count ≥ n` frames in all.
    fn extended(&self, count: usize) -> Result<Tensor> {
        let kept = self.given.dim(1)?;
        if count == kept {
            return Ok(self.given.clone());
        }
        let mut held_shape = self.given.dims().to_vec();
        held_shape[1] = count - kept;
        let last = self.given.narrow(1, kept - 1, 1)?;
        let held = last.broadcast_as(held_shape)?;
        Ok(Tensor::cat(&[&self.given, &held], 1)?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, IndexOp, Tensor};

    use super::*;

    /// A causal layer reading time as `reach`: output `k` is a weighted sum of its window
    /// (missing frames before the first read as zeros), and where `stride` is 2 the first
    /// output is the first input.
    fn window_sum(x: &Tensor, reach: TimeReach) -> Result<Tensor> {
        let frames = x.dim(1)?;
        let padded = x.pad_with_zeros(1, reach.lookback, 0)?;
        let window = |k: usize| -> Result<Tensor> {
            let mut sum = padded.i((.., k * reach.stride))?.zeros_like()?;
            for (tap, offset) in (0..=reach.lookback).enumerate() {
                let frame = padded.i((.., k * reach.stride + offset))?;
                sum = (sum + (frame * (tap as f64 + 1.5))?)?;
            }
            Ok(sum)
        };
        let outputs = (0..reach.output_frames(frames))
            .map(|k| match (k, reach.stride) {
                (0, 2) => Ok(x.i((.., 0))?),
                _ => window(k),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&outputs, 1)?)
    }

    /// Layers of several reaches in a row, on held videos of several lengths: the held form
    /// equals the layers run on the whole video, and computes fewer frames where it can.
    #[test]
    fn held_form_equals_the_whole_video() -> Result<()> {
        let cpu = Device::Cpu;
        let per_frame = TimeReach::PER_FRAME;
        let conv = TimeReach {
            lookback: 2,
            stride: 1,
        };
        let downsample = TimeReach {
            lookback: 2,
            stride: 2,
        };
        let layers = [
            conv,
            conv.then(conv),
            downsample,
            per_frame,
            conv,
            downsample,
            conv,
        ];
        for (given, frames) in [(1, 1), (2, 5), (2, 41), (3, 81), (5, 9), (6, 21)] {
            let kept = Tensor::randn(0f32, 1.0, (2, given, 3), &cpu)?;
            let mut held = Held::new(kept, frames)?;
            let mut whole = held.clone().into_full()?;
            for reach in layers {
                held = held.through(reach, |x| window_sum(x, reach))?;
                whole = window_sum(&whole, reach)?;
            }
            assert!(held.given.dim(1)? <= whole.dim(1)?);
            let difference = (held.into_full()? - &whole)?.abs()?.max_all()?;
            assert_eq!(difference.to_scalar::<f32>()?, 0.0, "{given} of {frames}");
        }
        let long = Held::new(Tensor::zeros((1, 2, 1), DType::F32, &cpu)?, 81)?;
        let settled = long.through(conv.then(conv), |x| window_sum(x, conv.then(conv)))?;
        assert_eq!(
            settled.given.dim(1)?,
            2 + 4,
            "computed only to the settled frame"
        );
        Ok(())
    }

    #[test]
    fn more_given_frames_than_frames_is_an_error() {
        let given = Tensor::zeros((1, 3, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(Held::new(given, 2), Err(Error::Shape { .. })));
    }
}
