#![doc = include_str!("../README.md")]

pub mod pipeline;

pub use pipeline::{Pipeline, T2vRequest};

/// The attention backends: dense, SLA and SageSLA.
pub use turbo_attention as attention;
/// Errors, attention kinds, the `Attention` trait and video geometry.
pub use turbo_core as core;
pub use turbo_core::{Attention, AttentionKind, Error, Result};
/// The Wan DiT, umT5, the VAE and checkpoint loading.
pub use turbo_models as models;
/// W8A8 int8 linears.
pub use turbo_quant as quant;
/// rCM and the flow-matching teachers.
pub use turbo_sampler as sampler;
/// Frames, MP4 / PNG / GIF output, image input.
pub use turbo_video as video;
