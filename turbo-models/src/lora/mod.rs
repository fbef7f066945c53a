//! LoRA adapters for the Wan DiT, as users download them: read from the ComfyUI / Kijai, PEFT,
//! diffusers and kohya / musubi-tuner layouts into one [`LoraAdapter`] (Wan key → down, up, α, full differences),
//! then applied to a loaded [`crate::wan::WanModel`] with a strength each:
//!
//! `W' = W + Σ strength · (α / rank) · up·down (+ strength · diff)`, `b' = b + strength · diff_b`.
//!
//! Float layers are merged into their weights ([`LoraMode::Merge`]); W8A8 int8 layers (a
//! `-quant` checkpoint) run the low-rank term beside the int8 GEMM, unquantised
//! ([`turbo_quant::LowRank`]). [`LoraMode::Branch`] runs every adapter that way, float layers
//! included.
//!
//! Two ways to apply them:
//! - [`crate::wan::WanModel::apply_loras`] merges for good: the base values are dropped, so
//!   merging at load costs no memory beyond the layer being merged;
//! - [`crate::wan::WanModel::set_loras`] switches adapters or strengths on a resident model: it
//!   keeps the unadapted value of every module it changes and starts from those at each call,
//!   so a switch reads nothing from disk and is exactly a fresh load at the new setting (no
//!   drift from subtracting a merged delta in bf16). The price: while adapters are set, the
//!   merged modules are held twice (base and merged); [`LoraMode::Branch`] keeps only the
//!   factors beside the shared base weights.

mod apply;
mod keys;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use turbo_core::{Error, Result};

pub use apply::LoraSummary;
pub(crate) use apply::{apply_loras, Slot, Unadapted};
use apply::{check_shapes, missing_targets, SlotShape};

use keys::{parse_key, NameStyle, Part};

/// The layout a LoRA file was written in (for messages; every layout reads into the same
/// [`LoraAdapter`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayout {
    /// `lora_down` / `lora_up` / `alpha`, with `diff` / `diff_b` (ComfyUI, Kijai).
    Comfy,
    /// `lora_A` / `lora_B`, alpha folded in (PEFT).
    Peft,
    /// diffusers module names under `transformer.`.
    Diffusers,
    /// `lora_unet_<key with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha` (kohya,
    /// musubi-tuner).
    Kohya,
}

/// What one adapter changes in one Wan module (`blocks.0.self_attn.q`, `blocks.0.norm3`, …).
#[derive(Debug, Clone, Default)]
pub struct LoraTarget {
    /// `[rank, in]`.
    pub down: Option<Tensor>,
    /// `[out, rank]`.
    pub up: Option<Tensor>,
    /// α; the low-rank term is scaled by α / rank. `None`: α is folded in (scale 1).
    pub alpha: Option<f64>,
    /// A full difference of the weight (or of a plain tensor).
    pub diff: Option<Tensor>,
    /// A full difference of the bias.
    pub diff_bias: Option<Tensor>,
    /// The file's own name of the module, for messages.
    pub source_key: String,
}

impl LoraTarget {
    /// `α / rank`, or 1 when α is folded into the factors.
    pub fn scale(&self) -> f64 {
        match (self.alpha, &self.down) {
            (Some(alpha), Some(down)) => alpha / down.dims()[0] as f64,
            _ => 1.0,
        }
    }

    /// The rank of the low-rank factors (0 without).
    pub fn rank(&self) -> usize {
        self.down.as_ref().map_or(0, |down| down.dims()[0])
    }
}

/// One LoRA file, read into Wan module keys. Cheap to clone (tensors are shared).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    path: PathBuf,
    layout: LoraLayout,
    targets: BTreeMap<String, LoraTarget>,
    /// Unknown keys and targets matching no weight are counted in a warning, not an error.
    lenient: bool,
    /// Keys no layout knows, skipped (lenient adapters only).
    skipped_keys: Vec<String>,
}

impl LoraAdapter {
    /// Reads a LoRA `.safetensors` file in any of the three layouts. Any tensor name no layout
    /// knows, a missing half of a down/up pair, or factors of different ranks give
    /// [`Error::Lora`] listing the keys; so do, when the adapter is applied, targets the model
    /// does not have.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::read(path.as_ref(), false)
    }

    /// [`LoraAdapter::open`], but keys no layout knows and targets the model does not have are
    /// skipped with a warning that counts them (for files with extras such as CLIP or text
    /// encoder adapters).
    pub fn open_lenient(path: impl AsRef<Path>) -> Result<Self> {
        Self::read(path.as_ref(), true)
    }

    /// From tensors already in memory (names as in a file); `path` names them in messages.
    pub fn from_tensors(
        path: impl Into<PathBuf>,
        tensors: impl IntoIterator<Item = (String, Tensor)>,
        lenient: bool,
    ) -> Result<Self> {
        let path = path.into();
        let mut builder = TargetsBuilder::default();
        for (name, tensor) in tensors {
            builder.add(&name, tensor, &path)?;
        }
        let (targets, layout, unknown) = builder.finish(&path)?;
        if !unknown.is_empty() && !lenient {
            return Err(lora_error(
                &path,
                "tensor names no LoRA layout knows",
                unknown,
            ));
        }
        if !unknown.is_empty() {
            tracing::warn!(
                "LoRA {}: {} tensors with names no LoRA layout knows are ignored",
                path.display(),
                unknown.len()
            );
        }
        Ok(Self {
            path,
            layout,
            targets,
            lenient,
            skipped_keys: unknown,
        })
    }

    fn read(path: &Path, lenient: bool) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::Io {
                path: path.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| lora_error(path, &format!("not a safetensors file: {e}"), vec![]))?;
        Self::from_tensors(path, tensors, lenient)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn layout(&self) -> LoraLayout {
        self.layout
    }

    /// Every target, by Wan module key.
    pub fn targets(&self) -> &BTreeMap<String, LoraTarget> {
        &self.targets
    }

    pub fn is_lenient(&self) -> bool {
        self.lenient
    }

    /// Tensor names skipped as unknown (lenient adapters).
    pub fn skipped_keys(&self) -> &[String] {
        &self.skipped_keys
    }

    /// Checks the adapter against a model's tensor list (`(key, shape)`, such as
    /// [`crate::wan::expected_tensors`] gives) without loading the model: every target must be a
    /// tensor of the list (`<key>.weight`, or `<key>` itself for a plain tensor) and every
    /// factor and difference must fit it. Errors as [`crate::wan::WanModel::apply_loras`] (a
    /// lenient adapter counts absent targets in a warning); W8A8 storage is not known here, so
    /// a full difference for an int8 linear is only found at load.
    pub fn check_fits(&self, tensors: &[(String, Vec<usize>)]) -> Result<()> {
        let shapes: BTreeMap<&str, &Vec<usize>> =
            tensors.iter().map(|(k, s)| (k.as_str(), s)).collect();
        let mut missing = Vec::new();
        for (key, target) in &self.targets {
            let weight = shapes.get(format!("{key}.weight").as_str());
            let shape = match (weight, shapes.get(key.as_str())) {
                (Some(weight), _) => SlotShape {
                    weight: weight.to_vec(),
                    bias_len: shapes
                        .contains_key(format!("{key}.bias").as_str())
                        .then(|| weight[0]),
                    int8: false,
                },
                (None, Some(tensor)) => SlotShape {
                    weight: tensor.to_vec(),
                    bias_len: None,
                    int8: false,
                },
                (None, None) => {
                    missing.push(target.source_key.clone());
                    continue;
                }
            };
            check_shapes(&shape, target, &self.path)?;
        }
        missing_targets(self, missing).map(drop)
    }

    /// This adapter at `strength`, ready to apply.
    pub fn at(self, strength: f64) -> ScaledLora {
        ScaledLora {
            adapter: Arc::new(self),
            strength,
        }
    }
}

/// An adapter and the strength it is applied with (1: as trained, 0: no effect).
#[derive(Debug, Clone)]
pub struct ScaledLora {
    pub adapter: Arc<LoraAdapter>,
    pub strength: f64,
}

impl ScaledLora {
    /// The same adapter at another strength (the tensors are shared).
    pub fn with_strength(&self, strength: f64) -> Self {
        Self {
            adapter: Arc::clone(&self.adapter),
            strength,
        }
    }
}

/// How the low-rank factors reach float layers (int8 layers always run them at run time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraMode {
    /// Add `up·down` into the weight: no cost per step.
    #[default]
    Merge,
    /// Keep the weight and add `(x·downᵀ)·upᵀ` at every call: no copy of the weight, two thin
    /// matmuls per call.
    Branch,
}

/// Gathers the tensors of a file into targets.
#[derive(Default)]
struct TargetsBuilder {
    targets: BTreeMap<String, LoraTarget>,
    unknown: Vec<String>,
    diffusers: bool,
    kohya: bool,
    peft_names: bool,
}

impl TargetsBuilder {
    fn add(&mut self, name: &str, tensor: Tensor, path: &Path) -> Result<()> {
        let Some(key) = parse_key(name) else {
            self.unknown.push(name.to_owned());
            return Ok(());
        };
        self.diffusers |= key.style == NameStyle::Diffusers;
        self.kohya |= key.style == NameStyle::Kohya;
        self.peft_names |= name.contains(".lora_A.") || name.contains(".lora_B.");
        let target = self.targets.entry(key.module).or_default();
        if target.source_key.is_empty() {
            target.source_key = source_key(name);
        }
        match key.part {
            Part::Down => target.down = Some(tensor),
            Part::Up => target.up = Some(tensor),
            Part::Alpha => target.alpha = Some(scalar(&tensor, name, path)?),
            Part::Diff => target.diff = Some(tensor),
            Part::DiffBias => target.diff_bias = Some(tensor),
        }
        Ok(())
    }

    /// The checked targets, the layout and the unknown names.
    fn finish(
        self,
        path: &Path,
    ) -> Result<(BTreeMap<String, LoraTarget>, LoraLayout, Vec<String>)> {
        self.check_every_target(
            path,
            "low-rank factors without their other half (down/A without up/B or the reverse)",
            |t| t.down.is_some() == t.up.is_some(),
        )?;
        self.check_every_target(
            path,
            "factors that are not down [rank, in] and up [out, rank] of one rank",
            factors_fit,
        )?;
        let layout = match (self.diffusers, self.kohya, self.peft_names) {
            (true, _, _) => LoraLayout::Diffusers,
            (false, true, _) => LoraLayout::Kohya,
            (false, false, true) => LoraLayout::Peft,
            (false, false, false) => LoraLayout::Comfy,
        };
        Ok((self.targets, layout, self.unknown))
    }
}

impl TargetsBuilder {
    /// An error listing every target for which `ok` fails, if any.
    fn check_every_target(
        &self,
        path: &Path,
        reason: &str,
        ok: impl Fn(&LoraTarget) -> bool,
    ) -> Result<()> {
        let failing: Vec<String> = self
            .targets
            .values()
            .filter(|t| !ok(t))
            .map(|t| t.source_key.clone())
            .collect();
        match failing.is_empty() {
            true => Ok(()),
            false => Err(lora_error(path, reason, failing)),
        }
    }
}

/// Whether down is `[r, in]` and up `[out, r]` (or there are no factors).
fn factors_fit(target: &LoraTarget) -> bool {
    match (&target.down, &target.up) {
        (Some(down), Some(up)) => match (down.dims(), up.dims()) {
            ([rank, _], [_, up_rank]) => rank == up_rank,
            _ => false,
        },
        _ => true,
    }
}

/// The module part of a file's tensor name (`….lora_up.weight` → `…`), for messages.
fn source_key(name: &str) -> String {
    [
        ".lora_down.weight",
        ".lora_up.weight",
        ".lora_A.weight",
        ".lora_B.weight",
        ".alpha",
    ]
    .iter()
    .find_map(|suffix| name.strip_suffix(suffix))
    .unwrap_or(name)
    .to_owned()
}

fn scalar(tensor: &Tensor, name: &str, path: &Path) -> Result<f64> {
    if tensor.elem_count() != 1 {
        return Err(lora_error(
            path,
            &format!("α must be a scalar, got shape {:?}", tensor.dims()),
            vec![name.to_owned()],
        ));
    }
    Ok(tensor
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?[0])
}

pub(crate) fn lora_error(path: &Path, reason: &str, keys: Vec<String>) -> Error {
    Error::Lora {
        path: path.to_owned(),
        reason: reason.to_owned(),
        keys,
    }
}
