//! Loading a DiT from the files users have: TurboDiffusion releases (`.pth`, or `.safetensors`
//! converted from them) and official Wan checkpoints (one `.safetensors` file or a sharded folder
//! with `diffusion_pytorch_model.safetensors.index.json`), float or `-quant` (W8A8 int8 block
//! linears).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use turbo_attention::LoadAttention;
use turbo_core::{Error, Result};

use super::embeddings::PatchLayout;
use super::keys::{expected_tensors, int8_block_linears};
use super::model::ATTENTION_WEIGHTS;
use super::{QuantPolicy, WanConfig, WanModel};
use crate::checkpoint::Checkpoint;

/// Prefix some single-file repacks (ComfyUI) put before every DiT key.
const REPACK_PREFIX: &str = "model.diffusion_model.";

/// What a DiT checkpoint holds, read from its tensor list alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DitCheckpointInfo {
    pub patch: PatchLayout,
    /// Per-block SLA `proj_l` weights (TurboDiffusion releases).
    pub has_proj_l: bool,
    /// Block linears stored as W8A8 int8 (`int8_weight` + `scale`; the `-quant` releases).
    pub quantized_linears: usize,
    /// Prefix before every key (`model.diffusion_model.` in ComfyUI repacks), or empty.
    pub prefix: String,
    /// The CLIP image projection `img_emb` is present (Wan2.1 I2V / FLF2V).
    pub has_img_emb: bool,
}

impl DitCheckpointInfo {
    /// Reads the layout of a DiT checkpoint from its tensor names and shapes.
    pub fn inspect(checkpoint: &Checkpoint) -> Result<Self> {
        let prefix = if checkpoint
            .get(&format!("{REPACK_PREFIX}patch_embedding.weight"))
            .is_some()
        {
            REPACK_PREFIX.to_owned()
        } else {
            String::new()
        };
        let patch_weight = checkpoint
            .get(&format!("{prefix}patch_embedding.weight"))
            .ok_or_else(|| {
                checkpoint_error(
                    checkpoint,
                    "no `patch_embedding.weight`: not a Wan DiT checkpoint",
                )
            })?;
        let patch = match patch_weight.shape.len() {
            5 => PatchLayout::Conv3d,
            2 => PatchLayout::Linear,
            _ => {
                return Err(checkpoint_error(
                    checkpoint,
                    &format!(
                        "`patch_embedding.weight` has shape {:?}: expected 5-D or 2-D",
                        patch_weight.shape
                    ),
                ))
            }
        };
        Ok(Self {
            patch,
            has_proj_l: checkpoint
                .get(&format!(
                    "{prefix}blocks.0.{ATTENTION_WEIGHTS}.proj_l.weight"
                ))
                .is_some(),
            quantized_linears: checkpoint
                .tensors()
                .filter(|t| t.name.ends_with(".int8_weight"))
                .count(),
            has_img_emb: checkpoint
                .get(&format!("{prefix}img_emb.proj.0.weight"))
                .is_some(),
            prefix,
        })
    }
}

impl<A: LoadAttention> WanModel<A> {
    /// Loads a DiT from `path` (a `.pth`, a `.safetensors` file, a sharded folder or its
    /// `*.index.json`), with weights in `dtype` on `device`.
    ///
    /// The configuration is `cfg` when given, else the `config.json` beside the weights (whose
    /// `"i2v"` is Wan2.1's CLIP model when the file holds `img_emb`, see
    /// [`WanConfig::with_image_embedding`]). The layout is detected from the keys. Before anything is allocated, the file's tensor list
    /// is checked against what `cfg` and `attention` need: every missing key, unexpected key and
    /// wrong shape is reported at once, with the file name.
    ///
    /// A `-quant` file (block linears stored as `int8_weight` + `scale`) loads as is, its block
    /// linears running in W8A8 int8; float files keep float linears. See
    /// [`WanModel::from_checkpoint_with_quant`] to quantise float files at load.
    ///
    /// A tiny DiT with random weights, written as a TurboDiffusion file (with SLA's `proj_l`),
    /// loaded with the attention chosen at run time and at compile time, and run:
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use turbo_attention::{AttentionConfig, SlaAttention, SlaConfig};
    /// use turbo_models::wan::{expected_tensors, PatchLayout, WanConfig, WanModel};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # fn write_random(keys: Vec<(String, Vec<usize>)>, path: &std::path::Path) -> candle_core::Result<()> {
    /// #     let tensors = keys
    /// #         .into_iter()
    /// #         .map(|(name, shape)| Ok((name, (Tensor::randn(0f32, 1.0, shape, &Device::Cpu)? * 0.05)?)))
    /// #         .collect::<candle_core::Result<std::collections::HashMap<_, _>>>()?;
    /// #     candle_core::safetensors::save(&tensors, path)
    /// # }
    /// let cfg = WanConfig {
    ///     dim: 64, ffn_dim: 128, freq_dim: 64, text_dim: 32, text_len: 16, num_heads: 2,
    ///     num_layers: 1, ..WanConfig::wan21_t2v_1_3b()
    /// };
    /// // "original", "sla", "sagesla", with a top-k and block sizes: "sla:0.5:128x64".
    /// let attention: AttentionConfig = "sla:0.5".parse()?;
    /// let path = std::env::temp_dir().join(format!("tiny-dit-{}.safetensors", std::process::id()));
    /// let keys = expected_tensors::<SlaAttention>(&cfg, PatchLayout::Linear, &SlaConfig::new(0.5)?, DType::F32);
    /// write_random(keys.into_iter().map(|spec| (spec.name, spec.shape)).collect(), &path)?;
    ///
    /// // Run time: `WanModel` is `WanModel<Box<dyn Attention>>`, built from an AttentionConfig.
    /// let dit: WanModel = WanModel::from_checkpoint(&path, Some(&cfg), &attention, DType::F32, &Device::Cpu)?;
    /// // `forward` takes ONE latent `[16, F, H, W]` (no batch dimension), the model time
    /// // t ∈ [0, 1000] and the text context `[L ≤ text_len, text_dim]`.
    /// let x = Tensor::randn(0f32, 1.0, (16, 1, 4, 4), &Device::Cpu)?;
    /// let context = Tensor::randn(0f32, 1.0, (7, 32), &Device::Cpu)?;
    /// let velocity = dit.forward(&x, 500.0, &context, None)?;
    /// assert_eq!(velocity.dims(), x.dims());
    /// assert!(dit.forward(&x.unsqueeze(0)?, 500.0, &context, None).is_err()); // batched
    /// assert!(dit.forward(&x, 1500.0, &context, None).is_err()); // t out of range
    ///
    /// // Compile time: a concrete backend and its own config type.
    /// let sla = WanModel::<SlaAttention>::from_checkpoint(&path, Some(&cfg), &SlaConfig::new(0.5)?, DType::F32, &Device::Cpu)?;
    /// assert_eq!(sla.forward(&x, 500.0, &context, None)?.dims(), x.dims());
    /// std::fs::remove_file(&path)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn from_checkpoint(
        path: impl AsRef<Path>,
        cfg: Option<&WanConfig>,
        attention: &A::Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_checkpoint_with_quant(
            path,
            cfg,
            attention,
            QuantPolicy::KeepFloat,
            dtype,
            device,
        )
    }

    /// [`WanModel::from_checkpoint`] with TurboDiffusion's `--quant_linear` as `quant_linear`
    /// (see [`WanModel::load_with_quant`]): [`QuantPolicy::Quantize`] quantises the block
    /// linears of a float file at load; a `-quant` file loads as is whatever the setting.
    /// `dtype` is the compute dtype of the float layers and of the int8 layers' biases.
    pub fn from_checkpoint_with_quant(
        path: impl AsRef<Path>,
        cfg: Option<&WanConfig>,
        attention: &A::Config,
        quant_linear: QuantPolicy,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_checkpoint_through(path, cfg, attention, quant_linear, dtype, device, |vb| vb)
    }

    /// [`WanModel::from_checkpoint_with_quant`], reading the weights through `adapt(vb)`, where
    /// `vb` serves the file's tensors: a caller can wrap it to count or trace what the model
    /// reads.
    pub fn from_checkpoint_through(
        path: impl AsRef<Path>,
        cfg: Option<&WanConfig>,
        attention: &A::Config,
        quant_linear: QuantPolicy,
        dtype: DType,
        device: &Device,
        adapt: impl FnOnce(VarBuilder<'static>) -> VarBuilder<'static>,
    ) -> Result<Self> {
        let (checkpoint, info, cfg) = Self::open_checked(path.as_ref(), cfg, attention)?;
        let vb = adapt(checkpoint.var_builder(dtype, device)?);
        let vb = if info.prefix.is_empty() {
            vb
        } else {
            vb.pp(info.prefix.trim_end_matches('.'))
        };
        Self::load_with_quant(vb, &cfg, attention, quant_linear)
    }
}

impl<A: LoadAttention> WanModel<A> {
    /// Checks, reading only the file's tensor list, that `path` holds a DiT that
    /// [`WanModel::from_checkpoint`] can load with `cfg` and `attention`: the same errors
    /// (every missing key, unexpected key and wrong shape, with the file name; a truncated
    /// file), without allocating a weight. A pipeline calls it for every DiT before its first
    /// stage.
    pub fn check_checkpoint(
        path: impl AsRef<Path>,
        cfg: Option<&WanConfig>,
        attention: &A::Config,
    ) -> Result<()> {
        Self::open_checked(path.as_ref(), cfg, attention).map(drop)
    }

    /// The checkpoint, its layout and the configuration, with the tensor list checked.
    fn open_checked(
        path: &Path,
        cfg: Option<&WanConfig>,
        attention: &A::Config,
    ) -> Result<(Checkpoint, DitCheckpointInfo, WanConfig)> {
        let checkpoint = Checkpoint::open(path)?;
        let info = DitCheckpointInfo::inspect(&checkpoint)?;
        let cfg = match cfg {
            Some(cfg) => cfg.clone(),
            None => WanConfig::from_json_file(&config_beside(path).ok_or_else(|| {
                checkpoint_error(
                    &checkpoint,
                    "no model config given and no config.json beside the weights",
                )
            })?)?
            .with_image_embedding(info.has_img_emb),
        };
        checkpoint.expect_keys(&expected_keys::<A>(&cfg, &info, attention))?;
        Ok((checkpoint, info, cfg))
    }
}

/// The keys (with the file's prefix) a checkpoint of this layout must hold for `cfg`. A file's
/// `proj_l` weights are expected whenever present: a dense backend loads and ignores them; a
/// file without any is loaded with a zero linear branch by SLA. A
/// file with any int8 block linear must store all of them as int8.
fn expected_keys<A: LoadAttention>(
    cfg: &WanConfig,
    info: &DitCheckpointInfo,
    attention: &A::Config,
) -> Vec<(String, Vec<usize>)> {
    let mut specs = expected_tensors::<A>(cfg, info.patch, attention, DType::F32);
    let proj_l = |spec: &super::TensorSpec| spec.name.contains(".proj_l.");
    if !info.has_proj_l {
        // SLA on a file without `proj_l` runs with a zero linear branch.
        specs.retain(|spec| !proj_l(spec));
    } else if !specs.iter().any(proj_l) {
        let with_sla = expected_tensors::<turbo_attention::SlaAttention>(
            cfg,
            info.patch,
            &turbo_attention::SlaConfig::new(turbo_core::DEFAULT_SLA_TOPK)
                .expect("default top-k is valid"),
            DType::F32,
        );
        specs.extend(with_sla.into_iter().filter(|s| proj_l(s)));
    }
    if info.quantized_linears > 0 {
        specs = int8_block_linears(specs);
    }
    specs
        .into_iter()
        .map(|s| (format!("{}{}", info.prefix, s.name), s.shape))
        .collect()
}

/// `config.json` in the checkpoint's folder (or in the folder itself).
fn config_beside(path: &Path) -> Option<PathBuf> {
    let folder = if path.is_dir() { path } else { path.parent()? };
    Some(folder.join("config.json")).filter(|p| p.is_file())
}

fn checkpoint_error(checkpoint: &Checkpoint, reason: &str) -> Error {
    Error::Checkpoint {
        path: checkpoint.path().to_owned(),
        reason: reason.to_owned(),
    }
}
