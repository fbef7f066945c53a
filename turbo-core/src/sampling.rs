//! The contracts between the samplers and what they drive: the network ([`Denoiser`]), the
//! randomness ([`NoiseSource`]) and the caller watching the steps ([`Progress`]).
//!
//! The samplers themselves live in `turbo-sampler`; the Wan DiT implements [`Denoiser`] in
//! `turbo-models`. Keeping the contracts here lets both crates build without knowing each other.

use std::ops::ControlFlow;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

use crate::{Error, MemoryUsage, Result};

/// Times handed to a denoiser for one evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timestep {
    /// Rectified-flow time s in [0, 1] (the update uses this, unrounded).
    pub s: f64,
    /// What the network is fed, in model units (0..1000): bf16(f32(s)·1000) for rCM, the integer
    /// timestep for the teachers.
    pub model_time: f64,
}

/// A flow-matching model: predicts the velocity v = dx/ds = ε − x₀ of the rectified-flow path
/// x_s = (1 − s)·x₀ + s·ε.
///
/// The samplers hand `x` in f32 (the rCM state is f64 and is cast down for the call); an
/// implementation casts it to its own compute dtype and may return any float dtype, which the
/// sampler casts back.
pub trait Denoiser {
    /// What the model is conditioned on (text context, I2V image latent, ...).
    type Condition: ?Sized;
    /// Flow-matching velocity v at `t` for the latent `x` ([C, F, H, W], no batch).
    fn velocity(&self, x: &Tensor, t: Timestep, cond: &Self::Condition) -> Result<Tensor>;
}

impl<D: Denoiser + ?Sized> Denoiser for &D {
    type Condition = D::Condition;

    fn velocity(&self, x: &Tensor, t: Timestep, cond: &Self::Condition) -> Result<Tensor> {
        (**self).velocity(x, t, cond)
    }
}

/// Where a sampler gets every random tensor it needs (the initial noise and, for the stochastic
/// rCM sampler, one re-noising draw per step), in the order it needs them.
pub trait NoiseSource {
    /// A tensor of independent standard-normal f32 values with `shape`, on `device`.
    fn standard_normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor>;
}

/// Noise from a seeded generator: rand's `StdRng` seeded with [`SeedableRng::seed_from_u64`],
/// sampled with rand_distr's `StandardNormal` in f32, element by element in row-major order.
///
/// The values are drawn on the CPU and then moved to the device, so a seed gives the same
/// tensors on every device and every run (for a given version of rand; `StdRng` does not
/// promise the same stream across its releases). They do not reproduce PyTorch's noise for
/// the same seed: for parity with a PyTorch run, replay its tensors with [`ReplayNoise`].
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: StdRng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
        }
    }
}

impl NoiseSource for SeededNoise {
    fn standard_normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let count = shape.iter().product();
        let values: Vec<f32> = (0..count)
            .map(|_| self.rng.sample(StandardNormal))
            .collect();
        Ok(Tensor::from_vec(values, shape, &Device::Cpu)?.to_device(device)?)
    }
}

/// Noise given in advance, handed out in order: for golden tests that inject the exact tensors
/// an upstream run drew.
///
/// Asking for more tensors than were given fails with [`Error::NoiseExhausted`]; asking for a
/// shape other than the next tensor's fails with [`Error::Shape`].
#[derive(Debug, Clone)]
pub struct ReplayNoise {
    tensors: Vec<Tensor>,
    next: usize,
}

impl ReplayNoise {
    pub fn new(tensors: Vec<Tensor>) -> Self {
        Self { tensors, next: 0 }
    }

    /// How many tensors have not been handed out yet.
    pub fn remaining(&self) -> usize {
        self.tensors.len() - self.next
    }
}

impl NoiseSource for ReplayNoise {
    fn standard_normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let tensor = self.tensors.get(self.next).ok_or(Error::NoiseExhausted {
            draw: self.next,
            available: self.tensors.len(),
        })?;
        if tensor.dims() != shape {
            return Err(Error::Shape {
                what: format!("replayed noise tensor {}", self.next),
                expected: format!("{shape:?} (the shape the sampler asked for)"),
                got: tensor.dims().to_vec(),
            });
        }
        self.next += 1;
        Ok(tensor.to_dtype(DType::F32)?.to_device(device)?)
    }
}

/// One finished sampling step, as reported to [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Index of the step just finished, from 0.
    pub index: usize,
    /// Number of steps of the whole run.
    pub total: usize,
    /// Rectified-flow time the step started from.
    pub s: f64,
    /// Time since sampling started.
    pub elapsed: Duration,
}

/// Watches a sampler's steps. The library never prints: report progress through this.
///
/// Returning [`ControlFlow::Break`] stops sampling, which then fails with [`Error::Cancelled`].
/// Any `FnMut(&StepReport) -> ControlFlow<()>` closure is a `Progress`.
pub trait Progress {
    /// Called after every step.
    fn step_done(&mut self, report: &StepReport) -> ControlFlow<()>;

    /// Called when a pipeline stage starts (or, for decoding, advances). Ignored by default;
    /// cancelling is done at the steps.
    fn stage(&mut self, _stage: &Stage) {}

    /// Called when a stage that holds a model ends, with what it held in memory. Ignored by
    /// default.
    fn stage_done(&mut self, _report: &StageReport) {}

    /// Asked between pieces of work that are not sampling steps (each decoded chunk of
    /// frames): [`ControlFlow::Break`] stops the run there, which then fails with
    /// [`Error::Cancelled`]. Never stops by default.
    fn poll_cancel(&mut self) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// A stage of a generation, as reported to [`Progress::stage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stage {
    /// Loading the text encoder and encoding the prompt(s).
    EncodingText,
    /// Encoding the input image with the VAE (image to video).
    EncodingImage,
    /// Loading a DiT (`expert` names the Wan2.2 expert, if any).
    LoadingDit { expert: Option<&'static str> },
    /// Denoising: `steps` network evaluations follow, reported by [`Progress::step_done`].
    Denoising { steps: usize },
    /// Decoding: `done` of `total` frames decoded so far.
    Decoding { done: usize, total: usize },
    /// Writing the video file, from its first frame (while the later ones are still being
    /// decoded) until the file is in place; reported by [`Progress::stage_done`] only.
    WritingVideo,
}

/// The memory and time of a finished stage, as reported to [`Progress::stage_done`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageReport {
    /// The stage, as announced when it began ([`Stage::Denoising`] for the whole denoising
    /// stage, DiT loading included; [`Stage::Decoding`] with every frame done).
    pub stage: Stage,
    /// Time the stage took, loading its model included.
    pub elapsed: Duration,
    /// Bytes of the weights the stage's model held at once on the device it ran on: the
    /// sizes of the tensors it read, in the dtype it read them in. With two experts only one
    /// is resident at a time; this is the larger. The text encoder, which reads one block at
    /// a time, counts the largest block (its embedding table is read on the CPU). A float DiT
    /// quantised to W8A8 at load is counted as read (in float), which is more than the int8
    /// copies it keeps. A model kept loaded by an earlier request (the pipeline's residency)
    /// reads nothing: 0.
    pub resident_bytes: u64,
    /// Device memory held by tensors at the end of the stage, and the most held at once
    /// during it (see [`crate::memory`]); `None` on the CPU, which has no such counter.
    pub device_memory: Option<MemoryUsage>,
}

/// A [`Progress`] that ignores every report and never cancels.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn step_done(&mut self, _report: &StepReport) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

impl<F: FnMut(&StepReport) -> ControlFlow<()>> Progress for F {
    fn step_done(&mut self, report: &StepReport) -> ControlFlow<()> {
        self(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_repeats_for_a_seed_and_differs_across_seeds() {
        let draw = |seed| {
            let mut noise = SeededNoise::new(seed);
            let a = noise.standard_normal(&[2, 3, 4], &Device::Cpu).unwrap();
            let b = noise.standard_normal(&[2, 3, 4], &Device::Cpu).unwrap();
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b)
        };
        let (first, second) = draw(7);
        assert_eq!(first, draw(7).0);
        assert_ne!(first, draw(8).0);
        assert_ne!(
            first,
            second.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(second.dims(), &[2, 3, 4]);
        assert_eq!(second.dtype(), DType::F32);
    }

    #[test]
    fn seeded_noise_is_roughly_standard_normal() {
        let values = SeededNoise::new(0)
            .standard_normal(&[20_000], &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let n = values.len() as f64;
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|&v| (v as f64 - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }

    #[test]
    fn replay_noise_hands_out_in_order_then_fails() {
        let a = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
        let mut noise = ReplayNoise::new(vec![a, b]);
        let first = noise.standard_normal(&[2], &Device::Cpu).unwrap();
        assert_eq!(first.to_vec1::<f32>().unwrap(), [1.0, 2.0]);
        assert_eq!(noise.remaining(), 1);
        let second = noise.standard_normal(&[2], &Device::Cpu).unwrap();
        assert_eq!(second.to_vec1::<f32>().unwrap(), [3.0, 4.0]);
        assert!(matches!(
            noise.standard_normal(&[2], &Device::Cpu),
            Err(Error::NoiseExhausted {
                draw: 2,
                available: 2
            })
        ));
    }

    #[test]
    fn replay_noise_rejects_a_wrong_shape_without_consuming() {
        let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let mut noise = ReplayNoise::new(vec![a]);
        assert!(matches!(
            noise.standard_normal(&[3, 2], &Device::Cpu),
            Err(Error::Shape { .. })
        ));
        assert_eq!(noise.remaining(), 1);
    }

    #[test]
    fn closures_are_progress_observers() {
        let mut seen = Vec::new();
        let mut observer = |report: &StepReport| {
            seen.push(report.index);
            ControlFlow::Continue(())
        };
        let report = StepReport {
            index: 3,
            total: 4,
            s: 0.5,
            elapsed: Duration::ZERO,
        };
        assert_eq!(observer.step_done(&report), ControlFlow::Continue(()));
        assert_eq!(seen, [3]);
        assert_eq!(NoProgress.step_done(&report), ControlFlow::Continue(()));
    }
}
