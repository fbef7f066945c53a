//! The Wan DiT, the umT5 text encoder and tokenizer, the Wan VAE, and checkpoint loading.
//!
//! - [`vae`]: the Wan2.1 video VAE, streaming encode and decode;
//! - [`umt5`]: the umT5-XXL text encoder; [`tokenizer`]: its prompt cleaning and tokenizer;
//! - [`checkpoint`]: one reader for `.safetensors` files, sharded safetensors folders and
//!   PyTorch `.pth` state dicts, and the check that a file holds exactly the tensors a model
//!   expects.

pub mod checkpoint;
pub mod tokenizer;
pub mod umt5;
pub mod vae;

pub use checkpoint::{Checkpoint, TensorMeta};
pub use tokenizer::{clean_prompt, PromptTokenizer, TokenizedPrompt};
pub use umt5::{Umt5Config, Umt5Encoder};
pub use vae::{DecodedFrames, VaeConfig, WanVae};
