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
            prefix,
        })
    }
}

impl<A: LoadAttention> WanModel<A> {
    /// Loads a DiT from `path` (a `.pth`, a `.safetensors` file, a sharded folder or its
    /// `*.index.json`), with weights in `dtype` on `device`.
    ///
    /// The configuration is `cfg` when given, else the `config.json` beside the weights. The
    /// layout is detected from the keys. Before anything is allocated, the file's tensor list
    /// is checked against what `cfg` and `attention` need: every missing key, unexpected key and
    /// wrong shape is reported at once, with the file name.
    ///
    /// A `-quant` file (block linears stored as `int8_weight` + `scale`) loads as is, its block
    /// linears running in W8A8 int8; float files keep float linears. See
    /// [`WanModel::from_checkpoint_with_quant`] to quantise float files at load.
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
        let checkpoint = Checkpoint::open(path.as_ref())?;
        let info = DitCheckpointInfo::inspect(&checkpoint)?;
        let cfg = match cfg {
            Some(cfg) => cfg.clone(),
            None => WanConfig::from_json_file(&config_beside(path.as_ref()).ok_or_else(|| {
                checkpoint_error(
                    &checkpoint,
                    "no model config given and no config.json beside the weights",
                )
            })?)?,
        };
        checkpoint.expect_keys(&expected_keys::<A>(&cfg, &info, attention))?;
        let vb = adapt(checkpoint.var_builder(dtype, device)?);
        let vb = if info.prefix.is_empty() {
            vb
        } else {
            vb.pp(info.prefix.trim_end_matches('.'))
        };
        Self::load_with_quant(vb, &cfg, attention, quant_linear)
    }
}

/// The keys (with the file's prefix) a checkpoint of this layout must hold for `cfg`. A file's
/// `proj_l` weights are expected whenever present: a dense backend loads and ignores them. A
/// file with any int8 block linear must store all of them as int8.
fn expected_keys<A: LoadAttention>(
    cfg: &WanConfig,
    info: &DitCheckpointInfo,
    attention: &A::Config,
) -> Vec<(String, Vec<usize>)> {
    let mut specs = expected_tensors::<A>(cfg, info.patch, attention, DType::F32);
    let proj_l = |spec: &super::TensorSpec| spec.name.contains(".proj_l.");
    if info.has_proj_l && !specs.iter().any(proj_l) {
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
