//! The models of turbodiffusion-rs, loaded from the released checkpoints:
//!
//! - [`wan`]: the Wan DiT (Wan2.1 T2V 1.3B / 14B, I2V-14B and FLF2V-14B with CLIP tokens, the
//!   Wan2.2 T2V / I2V A14B experts, Wan2.2 TI2V-5B), in the official
//!   and the TurboDiffusion key layouts, with any attention backend of `turbo-attention`;
//! - [`vae`]: the Wan2.1 video VAE and the Wan2.2 VAE of TI2V-5B, streaming encode and decode;
//! - [`umt5`]: the umT5-XXL text encoder; [`tokenizer`]: its prompt cleaning and tokenizer;
//! - [`clip`]: the CLIP ViT-H/14 image encoder of Wan2.1 I2V / FLF2V, with its bicubic
//!   preprocessing;
//! - [`lora`]: LoRA adapters (ComfyUI, PEFT and diffusers layouts), merged or run beside the
//!   weights, switched on a resident model;
//! - [`convert`]: any checkpoint to safetensors, optionally quantising the DiT to W8A8;
//! - [`checkpoint`]: one reader for `.safetensors` files, sharded safetensors folders and
//!   PyTorch `.pth` state dicts, and the check that a file holds exactly the tensors a model
//!   expects; [`pth`]: the `.pth` reader behind it, which also reads int8 storages.
//!
//! Each model loads from the files users download with Wan, by their real key names, and
//! checks the file's tensor list before reading a weight:
//!
//! ```no_run
//! use candle_core::{DType, Device, Tensor};
//! use turbo_models::{PromptTokenizer, Umt5Config, Umt5Encoder, VaeConfig, WanVae};
//!
//! # fn main() -> turbo_core::Result<()> {
//! let device = Device::Cpu;
//! let folder = std::path::Path::new("Wan2.1-T2V-1.3B");
//!
//! // Text context for the DiT: `[L, 4096]`, trimmed to the real tokens (`</s>` included).
//! let tokenizer = PromptTokenizer::from_file(folder.join("google/umt5-xxl/tokenizer.json"))?;
//! let t5 = Umt5Encoder::from_checkpoint(
//!     folder.join("models_t5_umt5-xxl-enc-bf16.pth"),
//!     &Umt5Config::umt5_xxl(),
//!     DType::BF16,
//!     &device,
//! )?;
//! let context = t5.encode_prompt(&tokenizer.encode("a corgi surfing a wave at sunset")?)?;
//!
//! // Frames out of a latent, handed over as soon as each chunk is decoded.
//! let vae = WanVae::from_checkpoint(
//!     folder.join("Wan2.1_VAE.pth"),
//!     &VaeConfig::wan21(),
//!     DType::F32,
//!     &device,
//! )?;
//! let latent = Tensor::randn(0f32, 1.0, (1, 16, 21, 60, 104), &device)?;
//! vae.decode_streaming(&latent, |chunk| {
//!     // `chunk.frames` is `[1, 3, n, 480, 832]` in [-1, 1], from frame `chunk.first_frame`.
//!     Ok(())
//! })?;
//! # let _ = context;
//! # Ok(())
//! # }
//! ```
//!
//! The same calls run anywhere on tiny models: here a two-layer umT5 and a narrow VAE with
//! random weights, written to `.safetensors` files first (any file [`Checkpoint::open`] reads
//! works: `.pth`, `.safetensors`, a sharded folder). The DiT's example is on
//! [`wan::WanModel::from_checkpoint`].
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use turbo_models::{Umt5Config, Umt5Encoder, VaeConfig, WanVae};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # fn write_random(keys: Vec<(String, Vec<usize>)>, path: &std::path::Path) -> candle_core::Result<()> {
//! #     let tensors = keys
//! #         .into_iter()
//! #         .map(|(name, shape)| Ok((name, (Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * 0.1)?)))
//! #         .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()?;
//! #     candle_core::safetensors::save(&tensors, path)
//! # }
//! let dir = std::env::temp_dir().join(format!("turbo-models-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let device = Device::Cpu;
//!
//! let t5_config = Umt5Config {
//!     vocab: 100, dim: 32, dim_attn: 32, dim_ffn: 64, num_heads: 2, num_layers: 2,
//!     ..Umt5Config::umt5_xxl()
//! };
//! let t5_file = dir.join("umt5.safetensors");
//! write_random(Umt5Encoder::expected_keys(&t5_config), &t5_file)?;
//! let t5 = Umt5Encoder::from_checkpoint(&t5_file, &t5_config, DType::F32, &device)?;
//! let ids = Tensor::new(&[[5u32, 17, 42, 1]], &device)?; // `[batch, tokens]`
//! assert_eq!(t5.forward(&ids, None)?.dims(), [1, 4, 32]);
//!
//! let vae_config = VaeConfig { dim: 8, num_res_blocks: 1, ..VaeConfig::wan21() };
//! let vae_file = dir.join("vae.safetensors");
//! write_random(WanVae::expected_keys(&vae_config), &vae_file)?;
//! let vae = WanVae::from_checkpoint(&vae_file, &vae_config, DType::F32, &device)?;
//! // `[batch, 16, T, h, w]` → `[batch, 3, 4(T − 1) + 1, 8h, 8w]` in [-1, 1].
//! let latent = Tensor::randn(0f32, 1.0, (1, 16, 2, 4, 4), &device)?;
//! assert_eq!(vae.decode(&latent)?.dims(), [1, 3, 5, 32, 32]);
//!
//! // A file that does not fit the model is refused before a weight is read, naming the file
//! // and every key that differs.
//! let wider = Umt5Config { dim_ffn: 128, ..t5_config };
//! assert!(Umt5Encoder::from_checkpoint(&t5_file, &wider, DType::F32, &device).is_err());
//! std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod clip;
mod config_fields;
pub mod convert;
pub mod lora;
mod pickle_guard;
pub mod pth;
pub mod pth_writer;
pub mod tokenizer;
pub mod umt5;
pub mod vae;
pub mod wan;

pub use checkpoint::{Checkpoint, TensorMeta};
pub use clip::{ClipConfig, ClipVisionEncoder};
pub use lora::{LoraAdapter, LoraLayout, LoraMode, LoraSummary, LoraTarget, ScaledLora};
pub use tokenizer::{clean_prompt, PromptTokenizer, TokenizedPrompt};
pub use umt5::{StreamingUmt5Encoder, Umt5Config, Umt5Encoder, TOKEN_EMBEDDING_KEY};
pub use vae::{DecodedFrames, Vae22Config, VaeConfig, VaeTiling, Wan22Vae, WanVae};
