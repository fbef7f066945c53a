//! The rCM few-step sampler (score-regularised continuous-time consistency), as the NVlabs/rcm
//! and TurboDiffusion inference scripts run it (`spec/sampling.md` §2).

use std::f64::consts::FRAC_PI_2;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use turbo_core::{Denoiser, Error, NoiseSource, Progress, Result, StepReport, Timestep};

use crate::report_step;

/// The intermediate TrigFlow times of the current rCM schedule ("for better visual quality");
/// N steps use the first N − 1.
pub const DEFAULT_MID_T: [f64; 3] = [1.5, 1.4, 1.0];
/// σ_max of the text-to-video students.
pub const T2V_SIGMA_MAX: f64 = 80.0;
/// σ_max of the image-to-video students.
pub const I2V_SIGMA_MAX: f64 = 200.0;
/// The step counts the students were distilled for.
pub const RCM_STEPS: std::ops::RangeInclusive<usize> = 1..=4;

/// How a step moves from its x̂₀ prediction to the next noise level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RcmMode {
    /// Stochastic consistency sampling: re-noise x̂₀ with a fresh draw (upstream's default, and
    /// the only mode of its T2V scripts). Every step draws, the last one too (its draw is
    /// multiplied by zero), so the noise stream matches upstream's.
    #[default]
    Sde,
    /// One Euler step of the rectified-flow ODE (upstream's `--ode`, "sharper but less robust");
    /// no draw after the initial noise.
    Ode,
}

/// Settings of an [`RcmSampler`].
///
/// The students are guidance-distilled: they take one conditional pass per step, so there is no
/// guidance scale and no negative prompt here.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RcmConfig {
    /// Number of network evaluations, 1 to 4.
    pub steps: usize,
    /// EDM σ of the first step (s₀ = σ_max / (1 + σ_max)); any positive value.
    pub sigma_max: f64,
    /// TrigFlow times of the steps after the first, in (0, π/2]; the first `steps − 1` are used.
    pub mid_t: [f64; 3],
    pub mode: RcmMode,
}

impl RcmConfig {
    /// The text-to-video defaults: σ_max 80, SDE.
    pub fn t2v(steps: usize) -> Self {
        Self {
            steps,
            sigma_max: T2V_SIGMA_MAX,
            mid_t: DEFAULT_MID_T,
            mode: RcmMode::Sde,
        }
    }

    /// The image-to-video defaults: σ_max 200, SDE (upstream's I2V scripts also offer ODE).
    pub fn i2v(steps: usize) -> Self {
        Self {
            sigma_max: I2V_SIGMA_MAX,
            ..Self::t2v(steps)
        }
    }

    fn validate(&self) -> Result<()> {
        if !RCM_STEPS.contains(&self.steps) {
            return Err(Error::InvalidSamplerSetting {
                setting: "rCM steps",
                value: self.steps.to_string(),
                expected: "the rCM students sample in 1 to 4 steps",
            });
        }
        if !(self.sigma_max.is_finite() && self.sigma_max > 0.0) {
            return Err(Error::InvalidSamplerSetting {
                setting: "rCM sigma_max",
                value: self.sigma_max.to_string(),
                expected: "a finite EDM sigma above 0",
            });
        }
        if let Some(t) = self.mid_t.iter().find(|t| !(**t > 0.0 && **t <= FRAC_PI_2)) {
            return Err(Error::InvalidSamplerSetting {
                setting: "rCM mid_t",
                value: t.to_string(),
                expected: "TrigFlow times in (0, pi/2]",
            });
        }
        Ok(())
    }
}

/// The rectified-flow time s = sin t / (sin t + cos t) of a TrigFlow time t.
pub fn trigflow_to_rf(t: f64) -> f64 {
    let (sin, cos) = t.sin_cos();
    sin / (sin + cos)
}

/// What an rCM student is fed for time `s`: bf16(f32(s)·1000), rounded the way PyTorch casts
/// (to f32, then to bf16, each to nearest even). 0.933781 becomes 932, 0.987654 becomes 988.
pub fn rcm_model_time(s: f64) -> f64 {
    let scaled = f64::from(s as f32) * 1000.0;
    bf16::from_f32(scaled as f32).to_f64()
}

/// The rCM sampler: a fixed schedule of 1–4 steps from s₀ = σ_max / (1 + σ_max) to 0.
///
/// The state is kept in f64 (upstream does); the network is handed f32 and fed the bf16 time
/// [`rcm_model_time`], while the update uses the unrounded s.
#[derive(Debug, Clone)]
pub struct RcmSampler {
    config: RcmConfig,
    /// RF times s₀ > … > s_N = 0 (N + 1 values).
    s: Vec<f64>,
    timesteps: Vec<Timestep>,
}

impl RcmSampler {
    /// Fails with [`Error::InvalidSamplerSetting`] for a step count outside 1–4, a σ_max that is
    /// not positive, or a `mid_t` outside (0, π/2].
    pub fn new(config: RcmConfig) -> Result<Self> {
        config.validate()?;
        let trigflow = std::iter::once(config.sigma_max.atan())
            .chain(config.mid_t[..config.steps - 1].iter().copied())
            .chain(std::iter::once(0.0));
        let s: Vec<f64> = trigflow.map(trigflow_to_rf).collect();
        let timesteps = s[..config.steps]
            .iter()
            .map(|&s| Timestep {
                s,
                model_time: rcm_model_time(s),
            })
            .collect();
        Ok(Self {
            config,
            s,
            timesteps,
        })
    }

    pub fn config(&self) -> &RcmConfig {
        &self.config
    }

    /// The RF times s₀ … s_N of the schedule, ending with 0 (`steps + 1` values).
    pub fn s_values(&self) -> &[f64] {
        &self.s
    }

    /// The time of each network evaluation, in order (`steps` values).
    pub fn timesteps(&self) -> &[Timestep] {
        &self.timesteps
    }

    /// Runs every step and returns the clean latent in f32.
    ///
    /// Draws the initial noise of `shape` on `device` from `noise`, then (in SDE mode) one draw
    /// of the same shape per step. Reports each step to `progress`; a cancel there ends the run
    /// with [`Error::Cancelled`].
    pub fn sample<D: Denoiser + ?Sized>(
        &self,
        denoiser: &D,
        cond: &D::Condition,
        noise: &mut dyn NoiseSource,
        shape: &[usize],
        device: &Device,
        progress: &mut dyn Progress,
    ) -> Result<Tensor> {
        let mut run = self.start(noise, shape, device)?;
        while let Some(report) = run.step(denoiser, cond, noise)? {
            report_step(progress, &report)?;
        }
        run.finish()
    }

    /// Starts a run step by step (for callers that swap experts between steps): draws the
    /// initial noise and sets x = s₀·ε.
    pub fn start(
        &self,
        noise: &mut dyn NoiseSource,
        shape: &[usize],
        device: &Device,
    ) -> Result<RcmRun<'_>> {
        let initial = noise.standard_normal(shape, device)?.to_dtype(DType::F64)?;
        Ok(RcmRun {
            sampler: self,
            x: initial.affine(self.s[0], 0.0)?,
            next: 0,
            started: Instant::now(),
        })
    }
}

/// An rCM run in progress, advanced one network evaluation at a time.
#[derive(Debug)]
pub struct RcmRun<'a> {
    sampler: &'a RcmSampler,
    /// The f64 state x at time s[next].
    x: Tensor,
    next: usize,
    started: Instant,
}

impl RcmRun<'_> {
    /// The index of the step [`step`](Self::step) runs next, or `None` once all have run.
    pub fn next_step(&self) -> Option<usize> {
        (self.next < self.sampler.config.steps).then_some(self.next)
    }

    /// Runs the next step, or returns `None` when every step has run.
    pub fn step<D: Denoiser + ?Sized>(
        &mut self,
        denoiser: &D,
        cond: &D::Condition,
        noise: &mut dyn NoiseSource,
    ) -> Result<Option<StepReport>> {
        let Some(k) = self.next_step() else {
            return Ok(None);
        };
        let (s, s_next) = (self.sampler.s[k], self.sampler.s[k + 1]);
        let model_input = self.x.to_dtype(DType::F32)?;
        let v = denoiser
            .velocity(&model_input, self.sampler.timesteps[k], cond)?
            .to_dtype(DType::F64)?;
        self.x = match self.sampler.config.mode {
            RcmMode::Sde => {
                let x0 = (&self.x - v.affine(s, 0.0)?)?;
                let z = noise
                    .standard_normal(self.x.dims(), self.x.device())?
                    .to_dtype(DType::F64)?;
                (x0.affine(1.0 - s_next, 0.0)? + z.affine(s_next, 0.0)?)?
            }
            RcmMode::Ode => (&self.x - v.affine(s - s_next, 0.0)?)?,
        };
        self.next += 1;
        Ok(Some(StepReport {
            index: k,
            total: self.sampler.config.steps,
            s,
            elapsed: self.started.elapsed(),
        }))
    }

    /// The state (f64): the noisy latent at the next step's time.
    pub fn state(&self) -> &Tensor {
        &self.x
    }

    /// Replaces the state between steps (see [`crate::FlowRun::set_state`]); `x` must have the
    /// state's shape.
    pub fn set_state(&mut self, x: &Tensor) -> Result<()> {
        self.x = crate::flow::checked_state(&self.x, x)?.to_dtype(DType::F64)?;
        Ok(())
    }

    /// The state in f32: the clean latent once every step has run.
    pub fn finish(self) -> Result<Tensor> {
        Ok(self.x.to_dtype(DType::F32)?)
    }
}
