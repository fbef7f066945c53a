//! Samplers for the Wan flow-matching models.
//!
//! - [`RcmSampler`]: the rCM few-step sampler of the TurboDiffusion / NVlabs rcm students —
//!   1 to 4 network evaluations on a fixed TrigFlow schedule ([`DEFAULT_MID_T`], σ_max
//!   [`T2V_SIGMA_MAX`] or [`I2V_SIGMA_MAX`]), stochastic ([`RcmMode::Sde`], the default) or
//!   deterministic ([`RcmMode::Ode`]) for text-to-video and image-to-video alike. No guidance:
//!   the students are guidance-distilled.
//! - [`FlowSampler`]: the undistilled teachers as official Wan samples them — UniPC (bh2,
//!   order 2, Wan's default), DPM-Solver++ 2M and Euler ([`FlowSolver`]) over a shifted sigma
//!   grid ([`FlowSchedule`]) with integer model timesteps. Classifier-free guidance with a
//!   negative prompt ([`WAN_NEGATIVE_PROMPT`]) wraps the model: [`Guided`].
//! - [`TwoExperts`]: Wan2.2 A14B's high-noise / low-noise pair as one [`Denoiser`], switching at
//!   an [`ExpertBoundary`] ([`I2V_A14B_BOUNDARY`], [`T2V_A14B_BOUNDARY`]). The switch step is
//!   known from the schedule before sampling, so a caller can hold only the expert it needs.
//!
//! Every sampler drives a [`Denoiser`] (the Wan DiT, or anything predicting the flow velocity
//! v = ε − x₀), draws all randomness from a [`NoiseSource`] ([`SeededNoise`], or
//! [`ReplayNoise`] to inject the exact tensors of an upstream run) and reports each step to a
//! [`Progress`], which may cancel ([`turbo_core::Error::Cancelled`]). `sample` runs a whole
//! schedule; `start` and `step` run it one evaluation at a time.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use turbo_core::{Denoiser, NoProgress, Result, SeededNoise, Timestep};
//! use turbo_sampler::{RcmConfig, RcmSampler};
//!
//! /// A stand-in for the DiT: the exact velocity when the clean latent is zero.
//! struct ZeroData;
//! impl Denoiser for ZeroData {
//!     type Condition = ();
//!     fn velocity(&self, x: &Tensor, t: Timestep, _: &()) -> Result<Tensor> {
//!         Ok(x.affine(1.0 / t.s, 0.0)?)
//!     }
//! }
//!
//! let sampler = RcmSampler::new(RcmConfig::t2v(4))?;
//! let latent = sampler.sample(
//!     &ZeroData, &(), &mut SeededNoise::new(0), &[16, 5, 8, 8], &Device::Cpu, &mut NoProgress,
//! )?;
//! assert!(latent.abs()?.max_all()?.to_scalar::<f32>()? < 1e-5);
//! # Ok::<(), turbo_core::Error>(())
//! ```

mod dpm_solver;
mod euler;
mod experts;
mod flow;
#[cfg(feature = "golden")]
pub mod golden;
mod guidance;
mod rcm;
mod schedule;
mod solver;
mod tasks;
mod unipc;

pub use experts::{Expert, ExpertBoundary, TwoExperts, I2V_A14B_BOUNDARY, T2V_A14B_BOUNDARY};
pub use flow::{FlowRun, FlowSampler, FlowSolver};
pub use guidance::{
    cfg_pass_group, CfgParallel, GuidanceScale, Guided, MAX_GUIDANCE, WAN_GUIDANCE,
    WAN_NEGATIVE_PROMPT,
};
pub use rcm::{
    rcm_model_time, trigflow_to_rf, RcmConfig, RcmMode, RcmRun, RcmSampler, DEFAULT_MID_T,
    I2V_SIGMA_MAX, RCM_STEPS, T2V_SIGMA_MAX,
};
pub use schedule::{FlowSchedule, NUM_TRAIN_TIMESTEPS, WAN_TRAIN_SIGMA_MAX};
pub use tasks::{TeacherDefaults, WanTask};
pub use turbo_core::{
    Denoiser, NoProgress, NoiseSource, Progress, ReplayNoise, SeededNoise, StepReport, Timestep,
};

use std::ops::ControlFlow;

/// Hands a finished step to `progress`; a cancel becomes [`turbo_core::Error::Cancelled`].
fn report_step(progress: &mut dyn Progress, report: &StepReport) -> turbo_core::Result<()> {
    match progress.step_done(report) {
        ControlFlow::Continue(()) => Ok(()),
        ControlFlow::Break(()) => Err(turbo_core::Error::Cancelled {
            completed: report.index + 1,
            total: report.total,
        }),
    }
}
