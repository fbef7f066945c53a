//! The Wan DiT (`WanModel`): Wan2.1 T2V 1.3B / 14B, Wan2.1 I2V-14B and FLF2V-14B (with CLIP
//! image tokens), the Wan2.2 T2V / I2V A14B experts and Wan2.2 TI2V-5B (per-token timesteps)
//! (`spec/wan-model.md` §2, `spec/turbodiffusion.md` §4 and §9).

mod attention;
mod block;
mod checkpoint;
mod config;
mod embeddings;
pub mod fused;
mod image_embedding;
mod keys;
mod model;
mod rope;

use candle_nn::{Linear, VarBuilder};
use turbo_core::Result;
pub use turbo_quant::QuantPolicy;

pub use block::FFN_TOKENS_PER_PASS;
pub use checkpoint::DitCheckpointInfo;
pub use config::{ModelType, WanConfig, CLIP_DIM, MASK_CHANNELS};
pub use embeddings::PatchLayout;
pub use keys::{
    block_linear_of, expected_tensors, int8_block_linears, TensorSpec, FLF2V_CLIP_TOKENS,
};
pub use model::{CheckpointLayout, DitCondition, SequenceParallelDit, TokenTimesteps, WanModel};

/// A Linear with bias, `[out, in]` weight, read from `vb` in `vb`'s dtype.
fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    Ok(candle_nn::linear(in_dim, out_dim, vb)?)
}

/// A block linear (q, k, v, o of both attentions, `ffn.0`, `ffn.2`): float or W8A8 int8, as
/// stored under `vb` (`weight` or `int8_weight` + `scale`), float layers quantised at load when
/// `quant_linear` says so.
fn block_linear(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
    quant_linear: QuantPolicy,
) -> Result<turbo_quant::Linear> {
    turbo_quant::Linear::load(vb, in_dim, out_dim, quant_linear)
}
