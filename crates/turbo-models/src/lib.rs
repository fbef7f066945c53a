//! The models of turbodiffusion-rs, loaded from the released checkpoints:
//!
//! - [`wan`]: the Wan DiT (Wan2.1 T2V 1.3B / 14B, the Wan2.2 I2V A14B experts), in the official
//!   and the TurboDiffusion key layouts, with any attention backend of `turbo-attention`;
//! - [`vae`]: the Wan2.1 video VAE, streaming encode and decode;
//! - [`umt5`]: the umT5-XXL text encoder; [`tokenizer`]: its prompt cleaning and tokenizer;
//! - [`checkpoint`]: one reader for `.safetensors` files, sharded safetensors folders and
//!   PyTorch `.pth` state dicts, and the check that a file holds exactly the tensors a model
//!   expects; [`pth`]: the `.pth` reader behind it, which also reads int8 storages.

pub mod checkpoint;
pub mod pth;
pub mod tokenizer;
pub mod umt5;
pub mod vae;
pub mod wan;

pub use checkpoint::{Checkpoint, TensorMeta};
pub use umt5::{Umt5Config, Umt5Encoder};
pub use vae::{DecodedFrames, VaeConfig, WanVae};
