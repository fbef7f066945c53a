//! DPM-Solver++ (2M, midpoint) for flow matching, as Wan's `FlowDPMSolverMultistepScheduler`
//! runs it (`spec/sampling.md` §3.6). Scalars in f32 as upstream.
//!
//! At σ = 1 (the first step of Wan's grid) λ = −∞ and at σ = 0 (the end) λ = +∞; the IEEE
//! infinities give upstream's limits (x' = σ'·x + α'·x₀ first, x' = x₀ last) without special
//! cases, as they do in upstream's float arithmetic.

use candle_core::Tensor;
use turbo_core::Result;

use crate::solver::{alpha, lambda, SolverStep};

/// DPM-Solver++ state carried between steps.
#[derive(Debug, Default)]
pub(crate) struct DpmSolverPp {
    /// The last two x₀ predictions, oldest first.
    x0_history: Vec<Tensor>,
}

impl SolverStep for DpmSolverPp {
    fn step(&mut self, sigmas: &[f32], i: usize, x: &Tensor, v: &Tensor) -> Result<Tensor> {
        let steps = sigmas.len() - 1;
        let x0 = (x - v.affine(sigmas[i].into(), 0.0)?)?;
        let warming_up = self.x0_history.is_empty();
        if self.x0_history.len() == 2 {
            self.x0_history.remove(0);
        }
        self.x0_history.push(x0);
        // The final sigma is zero, so the last step is always first order; second order needs
        // a previous prediction. (Upstream's "lower order second" rule for short grids only
        // limits third order, which order 2 never reaches.)
        let first_order = warming_up || i + 1 == steps;
        if first_order {
            self.first_order(sigmas, i, x)
        } else {
            self.second_order(sigmas, i, x)
        }
    }
}

impl DpmSolverPp {
    fn first_order(&self, sigmas: &[f32], i: usize, x: &Tensor) -> Result<Tensor> {
        let m0 = &self.x0_history[self.x0_history.len() - 1];
        let (sigma_t, sigma_s) = (sigmas[i + 1], sigmas[i]);
        let h = lambda(sigma_t) - lambda(sigma_s);
        let x0_coefficient = alpha(sigma_t) * ((-h).exp() - 1.0);
        Ok(
            (x.affine((sigma_t / sigma_s).into(), 0.0)?
                - m0.affine(x0_coefficient.into(), 0.0)?)?,
        )
    }

    fn second_order(&self, sigmas: &[f32], i: usize, x: &Tensor) -> Result<Tensor> {
        let (m1, m0) = (&self.x0_history[0], &self.x0_history[1]);
        let (sigma_t, sigma_s0, sigma_s1) = (sigmas[i + 1], sigmas[i], sigmas[i - 1]);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - lambda_s0;
        let r0 = (lambda_s0 - lambda(sigma_s1)) / h;
        let d1 = (m0 - m1)?.affine((1.0 / r0).into(), 0.0)?;
        let x0_coefficient = alpha(sigma_t) * ((-h).exp() - 1.0);
        Ok((x.affine((sigma_t / sigma_s0).into(), 0.0)?
            - m0.affine(x0_coefficient.into(), 0.0)?
            - d1.affine((0.5 * x0_coefficient).into(), 0.0)?)?)
    }
}
