//! Shared contracts of turbodiffusion-rs.
//!
//! Every other crate of the workspace builds on what is defined here:
//! - [`Error`] and [`Result`], the one error type of the library;
//! - [`AttentionKind`] and the [`Attention`] trait, the seam between the Wan DiT and the
//!   attention backends (`original`, `sla`, `sagesla`);
//! - video geometry ([`Resolution`], [`AspectRatio`], [`FrameCount`], [`VideoGeometry`]): the
//!   sizes the Wan models accept and the latent and token shapes they imply;
//! - small device and dtype helpers ([`DeviceSpec`], [`parse_dtype`]);
//! - the sampling contracts: the [`Denoiser`] a sampler drives (fed a [`Timestep`]), the
//!   [`NoiseSource`] it draws from ([`SeededNoise`], [`ReplayNoise`]) and the [`Progress`]
//!   observer it reports each [`StepReport`] to;
//! - multi-GPU work sharing ([`parallel`]): the [`parallel::Communicator`] and the sharding
//!   plans of the DiT, the VAE decode and the guided samplers.

mod attention;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod error;
mod geometry;
#[cfg(feature = "golden")]
pub mod golden;
pub mod memory;
pub mod parallel;
mod sampling;
pub mod upload;

pub use attention::{Attention, AttentionKind, QkvShape, DEFAULT_SLA_TOPK};
pub use device::{parse_dtype, DeviceSpec};
pub use error::{Error, KeyProblem, KeyProblems, Result};
pub use geometry::{
    AspectRatio, FrameCount, FrameSize, LatentShape, Resolution, VideoGeometry, LATENT_CHANNELS,
    MAX_FRAMES, MAX_FRAME_SIDE, PATCH_SIZE, VAE_STRIDE,
};
pub use memory::{
    available_memory, keep_freed_memory, memory_usage, reset_peak_memory, MemoryUsage,
};
pub use sampling::{
    Denoiser, NoProgress, NoiseSource, Progress, ReplayNoise, SeededNoise, Stage, StageReport,
    StepReport, Timestep,
};
