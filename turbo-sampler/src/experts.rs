//! Wan2.2 A14B's two experts: a high-noise model for the early steps and a low-noise model for
//! the rest (`spec/sampling.md` §2.7 and §3.8).

use candle_core::Tensor;
use turbo_core::{Denoiser, Error, Result, Timestep};

/// Where Wan2.2 T2V-A14B switches experts, in RF time.
pub const T2V_A14B_BOUNDARY: f64 = 0.875;
/// Where Wan2.2 I2V-A14B (and its rCM students) switch experts, in RF time.
pub const I2V_A14B_BOUNDARY: f64 = 0.9;

/// One of the two experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Expert {
    /// The model for s ≥ boundary.
    HighNoise,
    /// The model for s < boundary.
    LowNoise,
}

impl Expert {
    pub fn name(self) -> &'static str {
        match self {
            Self::HighNoise => "high-noise",
            Self::LowNoise => "low-noise",
        }
    }
}

/// The RF time at which a two-expert model hands over from the high-noise expert to the
/// low-noise one: the high-noise expert runs while s ≥ boundary.
///
/// Upstream's rCM scripts switch the first time s < boundary and Wan2.2's teachers use the
/// high-noise expert while the integer timestep t ≥ 1000·boundary; on a decreasing schedule
/// both are this rule (they could differ only for a σ within f32 rounding of the boundary).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertBoundary(f64);

impl ExpertBoundary {
    /// Fails unless `boundary` lies in [0, 1].
    pub fn new(boundary: f64) -> Result<Self> {
        if (0.0..=1.0).contains(&boundary) {
            Ok(Self(boundary))
        } else {
            Err(Error::InvalidSamplerSetting {
                setting: "expert boundary",
                value: boundary.to_string(),
                expected: "an RF time in [0, 1]",
            })
        }
    }

    pub fn value(self) -> f64 {
        self.0
    }

    /// The expert that evaluates time `t`.
    pub fn expert_at(self, t: Timestep) -> Expert {
        if t.s < self.0 {
            Expert::LowNoise
        } else {
            Expert::HighNoise
        }
    }

    /// The index of the first step run by the low-noise expert, or `None` when the high-noise
    /// expert runs every step (rCM with 1 or 2 steps, for example). Known before sampling, so
    /// the caller can load only the experts it will need, and each only when it is needed.
    pub fn switch_step(self, schedule: &[Timestep]) -> Option<usize> {
        schedule
            .iter()
            .position(|&t| self.expert_at(t) == Expert::LowNoise)
    }

    /// Whether `expert` evaluates at least one step of `schedule`.
    pub fn is_needed(self, expert: Expert, schedule: &[Timestep]) -> bool {
        schedule.iter().any(|&t| self.expert_at(t) == expert)
    }
}

/// A [`Denoiser`] over Wan2.2's two experts that evaluates each time with the expert
/// [`ExpertBoundary::expert_at`] names.
///
/// Either expert may be absent, so that only the one in use needs to be in memory: ask the
/// boundary for the [`switch_step`](ExpertBoundary::switch_step) of the sampler's schedule,
/// run the sampler step by step (`start` / `step`) and [`unload`](Self::unload) the high-noise
/// expert and [`load`](Self::load) the low-noise one at that step. Evaluating a time whose
/// expert is absent fails with [`Error::ExpertNotLoaded`].
#[derive(Debug, Clone)]
pub struct TwoExperts<D> {
    boundary: ExpertBoundary,
    high_noise: Option<D>,
    low_noise: Option<D>,
}

impl<D> TwoExperts<D> {
    /// No expert loaded yet.
    pub fn empty(boundary: ExpertBoundary) -> Self {
        Self {
            boundary,
            high_noise: None,
            low_noise: None,
        }
    }

    /// Both experts loaded.
    pub fn new(boundary: ExpertBoundary, high_noise: D, low_noise: D) -> Self {
        Self {
            boundary,
            high_noise: Some(high_noise),
            low_noise: Some(low_noise),
        }
    }

    pub fn boundary(&self) -> ExpertBoundary {
        self.boundary
    }

    /// Puts `model` in the `expert` slot, returning the model it replaces.
    pub fn load(&mut self, expert: Expert, model: D) -> Option<D> {
        self.slot(expert).replace(model)
    }

    /// Takes the `expert` model out (to drop it or move it elsewhere).
    pub fn unload(&mut self, expert: Expert) -> Option<D> {
        self.slot(expert).take()
    }

    pub fn is_loaded(&self, expert: Expert) -> bool {
        self.get(expert).is_some()
    }

    pub fn get(&self, expert: Expert) -> Option<&D> {
        match expert {
            Expert::HighNoise => self.high_noise.as_ref(),
            Expert::LowNoise => self.low_noise.as_ref(),
        }
    }

    fn slot(&mut self, expert: Expert) -> &mut Option<D> {
        match expert {
            Expert::HighNoise => &mut self.high_noise,
            Expert::LowNoise => &mut self.low_noise,
        }
    }
}

impl<D: Denoiser> Denoiser for TwoExperts<D> {
    type Condition = D::Condition;

    fn velocity(&self, x: &Tensor, t: Timestep, cond: &Self::Condition) -> Result<Tensor> {
        let expert = self.boundary.expert_at(t);
        let model = self.get(expert).ok_or(Error::ExpertNotLoaded {
            expert: expert.name(),
            s: t.s,
        })?;
        tracing::trace!(expert = expert.name(), s = t.s, "expert velocity");
        model.velocity(x, t, cond)
    }
}
