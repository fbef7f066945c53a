//! What the flow-matching solvers share: the step interface and the noise-schedule functions
//! α(σ) = 1 − σ and λ(σ) = ln α − ln σ, evaluated in f32 as upstream does.

use candle_core::Tensor;
use turbo_core::Result;

/// One solver's update rule, with whatever history it keeps between steps.
pub(crate) trait SolverStep: Send {
    /// Advances `x` (f32, at `sigmas[i]`) to `sigmas[i + 1]` given the model velocity `v` at `x`.
    fn step(&mut self, sigmas: &[f32], i: usize, x: &Tensor, v: &Tensor) -> Result<Tensor>;
}

/// The signal coefficient α = 1 − σ of x_σ = α·x₀ + σ·ε.
pub(crate) fn alpha(sigma: f32) -> f32 {
    1.0 - sigma
}

/// The half log-SNR λ = ln α − ln σ: −∞ at σ = 1, +∞ at σ = 0.
pub(crate) fn lambda(sigma: f32) -> f32 {
    alpha(sigma).ln() - sigma.ln()
}
