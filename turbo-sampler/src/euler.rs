//! The Euler step of the flow-matching ODE, x' = x + (σ' − σ)·v (`spec/sampling.md` §3.4).

use candle_core::Tensor;
use turbo_core::Result;

use crate::solver::SolverStep;

#[derive(Debug, Default)]
pub(crate) struct Euler;

impl SolverStep for Euler {
    fn step(&mut self, sigmas: &[f32], i: usize, x: &Tensor, v: &Tensor) -> Result<Tensor> {
        let dt = sigmas[i + 1] - sigmas[i];
        Ok((x + v.affine(dt.into(), 0.0)?)?)
    }
}
