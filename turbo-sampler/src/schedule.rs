//! The shifted flow-matching sigma grids of the official Wan teacher samplers
//! (`spec/sampling.md` §3.2).

use turbo_core::{Error, Result, Timestep};

/// The highest sigma of Wan's 1000-step training grid, `1 − 1/1000` rounded to f32 and widened
/// back: the UniPC scheduler starts its inference grid there.
pub const WAN_TRAIN_SIGMA_MAX: f64 = 0.999_f32 as f64;
/// Model time units per unit of sigma.
pub const NUM_TRAIN_TIMESTEPS: f64 = 1000.0;

/// A decreasing grid of flow-matching sigmas σ₀ > … > σ_N = 0 and the integer timesteps
/// `trunc(1000·σ_i)` the model is handed at σ₀ … σ_{N−1}.
///
/// As upstream, the grid is computed in f64, the timesteps are truncated from those f64 values,
/// and the sigmas the solvers use are then rounded to f32.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowSchedule {
    sigmas: Vec<f32>,
    model_timesteps: Vec<i64>,
}

impl FlowSchedule {
    /// Wan's UniPC grid (`FlowUniPCMultistepScheduler.set_timesteps(steps, shift)`): `steps`
    /// points of `linspace(f32(0.999), 0, steps + 1)`, shifted. With 50 steps and shift 5 the
    /// timesteps are 999, 995, 991, … 241, 172, 92.
    pub fn wan_unipc(steps: usize, shift: f64) -> Result<Self> {
        Self::shifted_linspace(WAN_TRAIN_SIGMA_MAX, steps, shift)
    }

    /// Wan's DPM-Solver++ grid (`get_sampling_sigmas(steps, shift)`): the same construction
    /// starting exactly at σ = 1, pure noise.
    pub fn wan_dpm_solver(steps: usize, shift: f64) -> Result<Self> {
        Self::shifted_linspace(1.0, steps, shift)
    }

    /// `steps` points of `linspace(start, 0, steps + 1)` (numpy's formula: start + i·step),
    /// mapped through the shift σ ↦ k·σ / (1 + (k − 1)·σ), then 0 appended.
    fn shifted_linspace(start: f64, steps: usize, shift: f64) -> Result<Self> {
        if steps == 0 {
            return Err(Error::InvalidSamplerSetting {
                setting: "flow-matching steps",
                value: steps.to_string(),
                expected: "at least 1 step",
            });
        }
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::InvalidSamplerSetting {
                setting: "flow-matching shift",
                value: shift.to_string(),
                expected: "a finite shift above 0",
            });
        }
        let step = -start / steps as f64;
        let shifted: Vec<f64> = (0..steps)
            .map(|i| i as f64 * step + start)
            .map(|sigma| shift * sigma / (1.0 + (shift - 1.0) * sigma))
            .collect();
        let model_timesteps = shifted
            .iter()
            .map(|sigma| (sigma * NUM_TRAIN_TIMESTEPS) as i64)
            .collect();
        let sigmas = shifted
            .iter()
            .map(|&sigma| sigma as f32)
            .chain(std::iter::once(0.0))
            .collect();
        Ok(Self {
            sigmas,
            model_timesteps,
        })
    }

    /// Number of model evaluations.
    pub fn steps(&self) -> usize {
        self.model_timesteps.len()
    }

    /// σ₀ … σ_N in f32, ending with 0 (`steps + 1` values): what the solvers use.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The integer timestep of each model evaluation (`steps` values).
    pub fn model_timesteps(&self) -> &[i64] {
        &self.model_timesteps
    }

    /// The [`Timestep`] of each model evaluation: s = σ_i, model time = the integer timestep.
    pub fn timesteps(&self) -> Vec<Timestep> {
        self.sigmas
            .iter()
            .zip(&self.model_timesteps)
            .map(|(&sigma, &t)| Timestep {
                s: f64::from(sigma),
                model_time: t as f64,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables of `spec/sampling.md` §3.2.
    #[test]
    fn wan_unipc_grids_match_the_spec_tables() {
        let cases: [(usize, f64, &[i64], &[i64]); 4] = [
            (50, 5.0, &[999, 995, 991, 987, 982], &[302, 241, 172, 92]),
            (40, 5.0, &[999, 994, 989, 983], &[356, 288, 208, 113]),
            (40, 3.0, &[999, 991, 982], &[249, 195, 136, 71]),
            (40, 12.0, &[999, 997, 995], &[571, 492, 386, 235]),
        ];
        for (steps, shift, first, last) in cases {
            let schedule = FlowSchedule::wan_unipc(steps, shift).unwrap();
            let t = schedule.model_timesteps();
            assert_eq!(t.len(), steps);
            assert_eq!(&t[..first.len()], first, "{steps} steps, shift {shift}");
            assert_eq!(
                &t[steps - last.len()..],
                last,
                "{steps} steps, shift {shift}"
            );
            assert_eq!(schedule.sigmas().len(), steps + 1);
            assert_eq!(schedule.sigmas()[steps], 0.0);
        }
    }

    #[test]
    fn dpm_solver_grid_starts_at_pure_noise() {
        let schedule = FlowSchedule::wan_dpm_solver(10, 5.0).unwrap();
        assert_eq!(schedule.sigmas()[0], 1.0);
        assert_eq!(schedule.model_timesteps()[0], 1000);
    }

    #[test]
    fn bad_grids_are_typed_errors() {
        for result in [
            FlowSchedule::wan_unipc(0, 5.0),
            FlowSchedule::wan_unipc(10, 0.0),
            FlowSchedule::wan_dpm_solver(10, f64::NAN),
        ] {
            assert!(matches!(result, Err(Error::InvalidSamplerSetting { .. })));
        }
    }
}
