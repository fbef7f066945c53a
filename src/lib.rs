//! turbodiffusion-rs: Wan2.1 / Wan2.2 video generation with sparse-linear attention, W8A8
//! linears and few-step rCM sampling, on candle.
//!
//! This facade re-exports the workspace crates; the end-to-end `Pipeline` will live here.
//! What exists today:
//! - [`core`]: errors, [`AttentionKind`], the [`Attention`] trait, video geometry;
//! - [`attention`]: the `original`, `sla` and `sagesla` attention backends.

pub use turbo_attention as attention;
pub use turbo_core as core;
pub use turbo_core::{Attention, AttentionKind, Error, Result};
