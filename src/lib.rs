#![doc = include_str!("../README.md")]

/// The attention backends: dense, SLA and SageSLA.
pub use turbo_attention as attention;
/// Errors, attention kinds, the `Attention` trait and video geometry.
pub use turbo_core as core;
pub use turbo_core::{Attention, AttentionKind, Error, Result};
