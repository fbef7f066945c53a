//! Helpers shared by the test crates of turbo-attention.

use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// A `[B, L, H, D]` tensor of standard normal values drawn from `seed`, so that every case is
/// reproducible from its printed inputs.
pub fn gaussian(dims: (usize, usize, usize, usize), seed: u64) -> Tensor {
    let count = dims.0 * dims.1 * dims.2 * dims.3;
    let values: Vec<f32> = StandardNormal
        .sample_iter(StdRng::seed_from_u64(seed))
        .take(count)
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}
