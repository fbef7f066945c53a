//! Attention backends for the Wan DiT's self-attention.
//!
//! Three operators implement [`turbo_core::Attention`] on `[B, L, H, D]` tensors:
//! - [`DenseAttention`]: exact softmax attention, processed in query blocks so that memory
//!   stays O(L · block);
//! - [`SlaAttention`]: Sparse-Linear Attention as in the released TurboDiffusion checkpoints —
//!   exact softmax over the top-k key blocks of each query block, plus linear attention over all
//!   keys projected by the layer's `proj_l`;
//! - [`SageSlaAttention`]: the same selection and linear branch, with the sparse branch
//!   computed the SageAttention way (INT8 Q·Kᵀ, FP8 E4M3 P·V), emulated exactly on the CPU.
//!
//! Choose at run time with [`load_attention`] (a `Box<dyn Attention>`), or at compile time with
//! a generic parameter bounded by [`LoadAttention`]; `Box<dyn Attention>` implements
//! `LoadAttention` too, so model code written once serves both.
//!
//! The implementations here are the CPU specification: they compute in f32 whatever the input
//! dtype (f32, bf16 or f16) and return the input dtype.

mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod dense;
mod layout;
mod linear;
pub mod quant;
mod sage;
mod selection;
mod sla;

pub use config::{
    load_attention, AttentionConfig, AttentionKernel, BlockSizes, DenseConfig, LoadAttention,
    SlaConfig,
};
pub use dense::{dense_attention_reference, DenseAttention};
pub use linear::{linear_attention, ProjL};
pub use sage::{sage_sparse_attention, SageSlaAttention};
pub use selection::{select_blocks, BlockSelection};
pub use sla::{sparse_attention, SlaAttention};
pub use turbo_core::{Attention, AttentionKind};
