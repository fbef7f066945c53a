//! The models of turbodiffusion-rs, loaded from the released checkpoints:
//! - [`wan`]: the Wan DiT (Wan2.1 T2V 1.3B / 14B, the Wan2.2 I2V A14B experts), in the official
//!   and the TurboDiffusion key layouts, with any attention backend of `turbo-attention`.

pub mod wan;
