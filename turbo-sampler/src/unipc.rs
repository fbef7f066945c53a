//! UniPC (bh2, order 2, predicting x₀) for flow matching, as Wan's
//! `FlowUniPCMultistepScheduler` runs it (`spec/sampling.md` §3.5).
//!
//! The scalar coefficients are computed in f32 in the same order as upstream, which computes
//! them on f32 tensors: the second-order weights lose digits to cancellation, and matching that
//! arithmetic keeps the samples within f32 rounding of upstream's.

use candle_core::Tensor;
use turbo_core::Result;

use crate::solver::{alpha, lambda, SolverStep};

/// UniPC state carried between steps.
#[derive(Debug, Default)]
pub(crate) struct UniPc {
    /// The last two x₀ predictions, oldest first.
    x0_history: Vec<Tensor>,
    /// The corrected sample the last predictor started from.
    last_sample: Option<Tensor>,
    /// The order the last predictor used (the corrector reuses it).
    last_order: usize,
}

impl SolverStep for UniPc {
    fn step(&mut self, sigmas: &[f32], i: usize, x: &Tensor, v: &Tensor) -> Result<Tensor> {
        let steps = sigmas.len() - 1;
        // The x₀ prediction is taken on the uncorrected sample.
        let x0 = (x - v.affine(sigmas[i].into(), 0.0)?)?;
        let x = match &self.last_sample {
            Some(last_sample) => self.correct(sigmas, i, last_sample, &x0)?,
            None => x.clone(),
        };
        // Order 1 on the first step (warm-up) and the last (lower_order_final), else 2.
        let order = 2.min(steps - i).min(self.x0_history.len() + 1);
        if self.x0_history.len() == 2 {
            self.x0_history.remove(0);
        }
        self.x0_history.push(x0);
        self.last_order = order;
        self.last_sample = Some(x.clone());
        self.predict(sigmas, i, &x, order)
    }
}

impl UniPc {
    /// UniP: from the corrected sample at σ_i to σ_{i+1}.
    fn predict(&self, sigmas: &[f32], i: usize, x: &Tensor, order: usize) -> Result<Tensor> {
        let m0 = &self.x0_history[self.x0_history.len() - 1];
        let (sigma_t, sigma_s0) = (sigmas[i + 1], sigmas[i]);
        if sigma_t == 0.0 {
            // λ = +∞ at σ = 0: the update is exactly the x₀ prediction.
            return Ok(m0.clone());
        }
        let (alpha_t, lambda_s0) = (alpha(sigma_t), lambda(sigma_s0));
        let h = lambda(sigma_t) - lambda_s0;
        let h_phi_1 = (-h).exp_m1();
        let b_h = h_phi_1;
        let x_t = (x.affine((sigma_t / sigma_s0).into(), 0.0)?
            - m0.affine((alpha_t * h_phi_1).into(), 0.0)?)?;
        if order == 1 {
            return Ok(x_t);
        }
        let m1 = &self.x0_history[0];
        let rk = (lambda(sigmas[i - 1]) - lambda_s0) / h;
        let d1 = divide(&(m1 - m0)?, rk)?;
        // UniP-2 uses the fixed weight ρ = 0.5.
        let pred_res = d1.affine(0.5, 0.0)?;
        Ok((x_t - pred_res.affine((alpha_t * b_h).into(), 0.0)?)?)
    }

    /// UniC: recomputes the sample at σ_i from the one at σ_{i−1} with the new x₀ prediction.
    fn correct(
        &self,
        sigmas: &[f32],
        i: usize,
        last_sample: &Tensor,
        model_t: &Tensor,
    ) -> Result<Tensor> {
        let m0 = &self.x0_history[self.x0_history.len() - 1];
        let (sigma_t, sigma_s0) = (sigmas[i], sigmas[i - 1]);
        let (alpha_t, lambda_s0) = (alpha(sigma_t), lambda(sigma_s0));
        let h = lambda(sigma_t) - lambda_s0;
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        let b_h = h_phi_1;
        let x_t = (last_sample.affine((sigma_t / sigma_s0).into(), 0.0)?
            - m0.affine((alpha_t * h_phi_1).into(), 0.0)?)?;
        let d1_t = (model_t - m0)?;
        let correction = if self.last_order == 1 {
            d1_t.affine(0.5, 0.0)?
        } else {
            let m1 = &self.x0_history[0];
            let rk = (lambda(sigmas[i - 2]) - lambda_s0) / h;
            let d1 = divide(&(m1 - m0)?, rk)?;
            let (rho_0, rho_1) = corrector_weights(hh, h_phi_1, rk);
            (d1.affine(rho_0.into(), 0.0)? + d1_t.affine(rho_1.into(), 0.0)?)?
        };
        Ok((x_t - correction.affine((alpha_t * b_h).into(), 0.0)?)?)
    }
}

/// The UniC-2 weights ρ solving [[1, 1], [r, 1]]·ρ = b, with b_k = g_k·k!/B(h),
/// g_1 = φ₁/hh − 1, g_2 = g_1/hh − 1/2 and, for bh2, B(h) = φ₁ = e^hh − 1.
fn corrector_weights(hh: f32, h_phi_1: f32, rk: f32) -> (f32, f32) {
    let b_h = h_phi_1;
    let g_1 = h_phi_1 / hh - 1.0;
    let g_2 = g_1 / hh - 0.5;
    let b_0 = g_1 / b_h;
    let b_1 = g_2 * 2.0 / b_h;
    let rho_0 = (b_0 - b_1) / (1.0 - rk);
    (rho_0, b_0 - rho_0)
}

/// `x / divisor` with an f32 divisor, as upstream divides a tensor by an f32 scalar.
fn divide(x: &Tensor, divisor: f32) -> Result<Tensor> {
    Ok(x.affine(f64::from(1.0 / divisor), 0.0)?)
}
