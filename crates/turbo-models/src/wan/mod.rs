//! The Wan DiT (`WanModel`): Wan2.1 T2V 1.3B / 14B and the Wan2.2 I2V A14B experts
//! (`spec/wan-model.md` §2, `spec/turbodiffusion.md` §4 and §9).

mod attention;
mod block;
mod checkpoint;
mod config;
mod embeddings;
mod keys;
mod model;
mod rope;

use candle_nn::{Linear, VarBuilder};
use turbo_core::Result;

pub use checkpoint::DitCheckpointInfo;
pub use config::{ModelType, WanConfig};
pub use embeddings::PatchLayout;
pub use keys::{expected_tensors, TensorSpec};
pub use model::{CheckpointLayout, DitCondition, WanModel};

/// A Linear with bias, `[out, in]` weight, read from `vb` in `vb`'s dtype.
fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    Ok(candle_nn::linear(in_dim, out_dim, vb)?)
}
