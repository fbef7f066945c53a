//! The rCM golden-file harness (feature `golden`): runs [`RcmSampler`] the way a golden file
//! such as `rcm_t2v_sla` describes, with that file's injected noise, so a model crate's parity
//! test is a few lines:
//!
//! ```ignore
//! let file = GoldenFile::open("rcm_t2v_sla")?;
//! let dit = /* the Wan DiT loaded from the file's weights */;
//! let context = file.tensor("in.context")?;
//! let outcome = RcmGolden::from_file(&file)?.run(&dit, &context)?;
//! assert!(outcome.relative_error <= 1e-4, "{}", outcome.relative_error);
//! ```
//!
//! Everything comes from the file: the step count and σ_max from `config`, the noise from
//! `in.noise.0`, `in.noise.1`, … (as many as the file holds: `steps + 1` means the SDE sampler,
//! which re-noises at every step; 1 means the ODE sampler), the latent shape from the noise, and
//! the expected latent from `out.latent`.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
pub use turbo_core::golden::relative_error;
use turbo_core::golden::GoldenFile;
use turbo_core::{Denoiser, Error, NoProgress, ReplayNoise, Result};

use crate::{RcmConfig, RcmMode, RcmSampler};

/// Prefix of the injected noise tensors, numbered from 0 in draw order.
pub const NOISE_PREFIX: &str = "in.noise.";
/// The expected final latent.
pub const EXPECTED_LATENT: &str = "out.latent";

/// One rCM golden case: the sampler its config describes, its noise and its expected latent.
#[derive(Debug, Clone)]
pub struct RcmGolden {
    /// The file the case was read from.
    pub path: PathBuf,
    pub sampler: RcmSampler,
    /// The injected noise tensors in draw order.
    pub noise: Vec<Tensor>,
    pub expected: Tensor,
}

/// What [`RcmGolden::run`] produced.
#[derive(Debug, Clone)]
pub struct RcmGoldenOutcome {
    pub latent: Tensor,
    pub expected: Tensor,
    /// ‖latent − expected‖ / ‖expected‖.
    pub relative_error: f64,
}

impl RcmGolden {
    /// Reads a case from `file` (config keys `steps` and `sigma_max`; tensors `in.noise.*` and
    /// `out.latent`).
    pub fn from_file(file: &GoldenFile) -> Result<Self> {
        let invalid = |reason: String| Error::Golden {
            path: file.path().to_owned(),
            reason,
        };
        let steps = file.config_f64(&["steps"])?;
        if steps.fract() != 0.0 {
            return Err(invalid(format!(
                "config `steps` is {steps}, not a whole number"
            )));
        }
        let sigma_max = file.config_f64(&["sigma_max"])?;
        let noise = noise_tensors(file)?;
        let mode = if noise.len() == 1 {
            RcmMode::Ode
        } else if noise.len() as f64 == steps + 1.0 {
            RcmMode::Sde
        } else {
            return Err(invalid(format!(
                "{} noise tensors for {steps} steps: expected steps + 1 (SDE) or 1 (ODE)",
                noise.len()
            )));
        };
        let sampler = RcmSampler::new(RcmConfig {
            steps: steps as usize,
            sigma_max,
            mode,
            ..RcmConfig::t2v(1)
        })?;
        Ok(Self {
            path: file.path().to_owned(),
            sampler,
            noise,
            expected: file.tensor(EXPECTED_LATENT)?,
        })
    }

    /// Samples with `denoiser` on the CPU, replaying the noise, and checks that every injected
    /// tensor was drawn (else [`Error::Golden`]).
    pub fn run<D: Denoiser + ?Sized>(
        self,
        denoiser: &D,
        cond: &D::Condition,
    ) -> Result<RcmGoldenOutcome> {
        self.run_on(&Device::Cpu, denoiser, cond)
    }

    /// [`RcmGolden::run`] with the sampler state on `device` (where the denoiser's weights are).
    pub fn run_on<D: Denoiser + ?Sized>(
        self,
        device: &Device,
        denoiser: &D,
        cond: &D::Condition,
    ) -> Result<RcmGoldenOutcome> {
        let shape = self.noise[0].dims().to_vec();
        let injected = self.noise.len();
        let mut noise = ReplayNoise::new(self.noise);
        let latent =
            self.sampler
                .sample(denoiser, cond, &mut noise, &shape, device, &mut NoProgress)?;
        if noise.remaining() != 0 {
            return Err(Error::Golden {
                path: self.path,
                reason: format!(
                    "the sampler drew {} of the {injected} injected noise tensors",
                    injected - noise.remaining()
                ),
            });
        }
        let relative_error = relative_error(&latent, &self.expected)?;
        Ok(RcmGoldenOutcome {
            latent,
            expected: self.expected,
            relative_error,
        })
    }
}

/// `in.noise.0`, `in.noise.1`, … in draw order, stopping at the first missing index.
fn noise_tensors(file: &GoldenFile) -> Result<Vec<Tensor>> {
    let names = file.names();
    let tensors: Vec<Tensor> = (0..)
        .map(|i| format!("{NOISE_PREFIX}{i}"))
        .take_while(|name| names.contains(name))
        .map(|name| file.tensor(&name))
        .collect::<Result<_>>()?;
    if tensors.is_empty() {
        return Err(Error::Golden {
            path: file.path().to_owned(),
            reason: format!("no `{NOISE_PREFIX}0` tensor"),
        });
    }
    Ok(tensors)
}
