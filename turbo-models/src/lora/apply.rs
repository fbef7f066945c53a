//! Applying adapters to the tensors of a loaded model, addressed by their checkpoint keys.
//!
//! Every adapter is checked against the model first (targets that exist, shapes that fit), so
//! that a bad file leaves the model untouched; then each targeted module is changed once, with
//! the contributions of all adapters summed in f32 (one rounding to the weight's dtype, whatever
//! the number of adapters).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use turbo_core::Result;
use turbo_quant::LowRank;

use super::{lora_error, LoraAdapter, LoraMode, LoraTarget, ScaledLora};

/// A tensor (or pair) of the model an adapter can change, borrowed from the model.
pub(crate) enum Slot<'a> {
    /// A block linear: float (merged into) or W8A8 int8 (given a run-time low-rank term).
    Block(&'a mut turbo_quant::Linear),
    /// An f32 or compute-dtype linear outside the blocks (embeddings, head).
    Plain(&'a mut candle_nn::Linear),
    /// A plain tensor (`modulation`, RMSNorm weights): full differences only.
    Tensor(&'a mut Tensor),
    /// An affine LayerNorm (`norm3`): `diff` changes the weight, `diff_b` the bias.
    Affine {
        weight: &'a mut Tensor,
        bias: &'a mut Tensor,
    },
}

impl Slot<'_> {
    /// The dims `up·down` and `diff` must have.
    fn weight_dims(&self) -> Vec<usize> {
        match self {
            Self::Block(linear) => {
                let (in_dim, out_dim) = linear.dims();
                vec![out_dim, in_dim]
            }
            Self::Plain(linear) => linear.weight().dims().to_vec(),
            Self::Tensor(tensor) => tensor.dims().to_vec(),
            Self::Affine { weight, .. } => weight.dims().to_vec(),
        }
    }

    /// What an adapter's tensors must fit.
    fn shape(&self) -> SlotShape {
        let weight = self.weight_dims();
        SlotShape {
            bias_len: match self {
                Self::Tensor(_) => None,
                _ => weight.first().copied(),
            },
            weight,
            int8: matches!(self, Self::Block(linear) if linear.is_int8()),
        }
    }

    fn device(&self) -> Device {
        match self {
            Self::Block(linear) => linear.device().clone(),
            Self::Plain(linear) => linear.weight().device().clone(),
            Self::Tensor(tensor) => tensor.device().clone(),
            Self::Affine { weight, .. } => weight.device().clone(),
        }
    }

    /// Whether the low-rank factors run beside the weight instead of being merged.
    fn runs_low_rank(&self, mode: LoraMode) -> bool {
        match self {
            Self::Block(linear) => linear.is_int8() || mode == LoraMode::Branch,
            _ => false,
        }
    }
}

/// The shapes a module offers an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SlotShape {
    /// The dims `up·down` and `diff` must have.
    pub(crate) weight: Vec<usize>,
    /// The length `diff_b` must have, for a module with a bias.
    pub(crate) bias_len: Option<usize>,
    /// A W8A8 int8 weight (which takes no full difference).
    pub(crate) int8: bool,
}

/// What applying adapters did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoraSummary {
    /// Modules whose tensors were changed in place (merged).
    pub merged: usize,
    /// Linears given a run-time low-rank term.
    pub low_rank: usize,
    /// Targets of lenient adapters that match no tensor of the model, skipped.
    pub skipped: usize,
}

/// One adapter's part in one module.
struct Contribution<'a> {
    target: &'a LoraTarget,
    strength: f64,
    path: &'a Path,
}

/// Applies `loras` to the model's `slots` (key, tensor) with `mode`.
pub(crate) fn apply_loras(
    slots: Vec<(String, Slot<'_>)>,
    loras: &[ScaledLora],
    mode: LoraMode,
) -> Result<LoraSummary> {
    let keys: BTreeSet<&str> = slots.iter().map(|(key, _)| key.as_str()).collect();
    let skipped = check_targets_exist(loras, &keys)?;
    let planned: Vec<(Slot<'_>, Vec<Contribution<'_>>)> = slots
        .into_iter()
        .filter_map(|(key, slot)| {
            let contributions = contributions(loras, &key);
            (!contributions.is_empty()).then_some((slot, contributions))
        })
        .collect();
    for (slot, contributions) in &planned {
        contributions
            .iter()
            .try_for_each(|c| check_shapes(&slot.shape(), c.target, c.path))?;
    }
    let mut summary = LoraSummary {
        skipped,
        ..LoraSummary::default()
    };
    for (slot, contributions) in planned {
        if slot.runs_low_rank(mode) && contributions.iter().any(|c| c.target.rank() > 0) {
            summary.low_rank += 1;
        } else {
            summary.merged += 1;
        }
        apply_to_slot(slot, &contributions, mode)?;
    }
    Ok(summary)
}

/// The adapters (at a non-zero strength) that target `key`.
fn contributions<'a>(loras: &'a [ScaledLora], key: &str) -> Vec<Contribution<'a>> {
    loras
        .iter()
        .filter(|lora| lora.strength != 0.0)
        .filter_map(|lora| {
            Some(Contribution {
                target: lora.adapter.targets().get(key)?,
                strength: lora.strength,
                path: lora.adapter.path(),
            })
        })
        .collect()
}

/// Fails on the first strict adapter with targets the model lacks (listing them all); returns
/// how many targets lenient adapters skip.
fn check_targets_exist(loras: &[ScaledLora], keys: &BTreeSet<&str>) -> Result<usize> {
    let mut skipped = 0;
    for lora in loras {
        let missing: Vec<String> = lora
            .adapter
            .targets()
            .iter()
            .filter(|(key, _)| !keys.contains(key.as_str()))
            .map(|(_, target)| target.source_key.clone())
            .collect();
        skipped += missing_targets(&lora.adapter, missing)?;
    }
    Ok(skipped)
}

/// For a strict adapter, an error listing `missing` targets (if any); for a lenient one, a
/// warning counting them, and their number.
pub(crate) fn missing_targets(adapter: &LoraAdapter, missing: Vec<String>) -> Result<usize> {
    if missing.is_empty() {
        return Ok(0);
    }
    let path = adapter.path();
    if !adapter.is_lenient() {
        return Err(lora_error(path, "targets no tensor of the model", missing));
    }
    tracing::warn!(
        "LoRA {}: {} targets match no tensor of the model and are ignored",
        path.display(),
        missing.len()
    );
    Ok(missing.len())
}

/// Checks that one adapter's tensors for a module (from the file `path`) fit its `shape`.
pub(crate) fn check_shapes(shape: &SlotShape, target: &LoraTarget, path: &Path) -> Result<()> {
    let dims = &shape.weight;
    let key = &target.source_key;
    let mismatch = |what: &str, got: &[usize], expected: String| {
        lora_error(
            path,
            &format!("{what} has shape {got:?}, the model needs {expected}"),
            vec![key.clone()],
        )
    };
    if let (Some(down), Some(up)) = (&target.down, &target.up) {
        let (up, down) = (up.dims(), down.dims());
        match dims[..] {
            [out_dim, in_dim] if up[0] == out_dim && down[1] == in_dim => {}
            [out_dim, in_dim] => {
                let expected = format!("up [{out_dim}, r] and down [r, {in_dim}]");
                return Err(mismatch("up, down", &[up, down].concat(), expected));
            }
            _ => {
                let expected = format!("no factors: the tensor is {dims:?}, not a matrix");
                return Err(mismatch("up, down", &[up, down].concat(), expected));
            }
        }
    }
    if let Some(diff) = &target.diff {
        if diff.dims() != dims.as_slice() {
            return Err(mismatch("diff", diff.dims(), format!("{dims:?}")));
        }
        if shape.int8 {
            return Err(lora_error(
                path,
                "a full weight difference cannot be added to a W8A8 int8 weight; load a float \
                 checkpoint to merge it",
                vec![key.clone()],
            ));
        }
    }
    if let Some(diff_bias) = &target.diff_bias {
        match shape.bias_len {
            Some(len) if diff_bias.dims() == [len] => {}
            Some(len) => return Err(mismatch("diff_b", diff_bias.dims(), format!("[{len}]"))),
            None => {
                return Err(lora_error(
                    path,
                    "a bias difference for a tensor without bias",
                    vec![key.clone()],
                ))
            }
        }
    }
    Ok(())
}

/// The summed changes of one module, in f32 on its device.
#[derive(Default)]
struct Delta {
    /// Added to the weight: the full differences, and the factors' `up·down` when merged.
    weight: Option<Tensor>,
    /// Run beside the weight: `down` `[R, K]` and `up` `[N, R]` (scaled), concatenated.
    low_rank: Option<(Tensor, Tensor)>,
    bias: Option<Tensor>,
}

impl Delta {
    fn of(
        contributions: &[Contribution<'_>],
        device: &Device,
        merge_factors: bool,
    ) -> Result<Self> {
        let mut delta = Self::default();
        for c in contributions {
            let f32_on =
                |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?.to_dtype(DType::F32)?) };
            if let (Some(down), Some(up)) = (&c.target.down, &c.target.up) {
                let up = (f32_on(up)? * (c.strength * c.target.scale()))?;
                let down = f32_on(down)?;
                if merge_factors {
                    delta.weight = add(delta.weight, up.matmul(&down)?)?;
                } else {
                    delta.low_rank = Some(match delta.low_rank {
                        Some((d, u)) => (Tensor::cat(&[d, down], 0)?, Tensor::cat(&[u, up], 1)?),
                        None => (down, up),
                    });
                }
            }
            if let Some(diff) = &c.target.diff {
                delta.weight = add(delta.weight, (f32_on(diff)? * c.strength)?)?;
            }
            if let Some(diff_bias) = &c.target.diff_bias {
                delta.bias = add(delta.bias, (f32_on(diff_bias)? * c.strength)?)?;
            }
        }
        Ok(delta)
    }
}

fn add(sum: Option<Tensor>, term: Tensor) -> Result<Option<Tensor>> {
    Ok(Some(match sum {
        Some(sum) => (sum + term)?,
        None => term,
    }))
}

/// `tensor + delta`, the sum in f32, stored in `tensor`'s dtype.
fn plus(tensor: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let sum = (tensor.to_dtype(DType::F32)? + delta.reshape(tensor.dims())?)?;
    Ok(sum.to_dtype(tensor.dtype())?)
}

fn apply_to_slot(slot: Slot<'_>, contributions: &[Contribution<'_>], mode: LoraMode) -> Result<()> {
    let delta = Delta::of(contributions, &slot.device(), !slot.runs_low_rank(mode))?;
    match slot {
        Slot::Block(linear) => *linear = adapted_linear(linear, delta)?,
        Slot::Plain(linear) => {
            let weight = match &delta.weight {
                Some(d) => plus(linear.weight(), d)?,
                None => linear.weight().clone(),
            };
            let bias = match (linear.bias(), &delta.bias) {
                (Some(bias), Some(d)) => Some(plus(bias, d)?),
                (None, Some(d)) => Some(d.to_dtype(weight.dtype())?),
                (bias, None) => bias.cloned(),
            };
            *linear = candle_nn::Linear::new(weight, bias);
        }
        Slot::Tensor(tensor) => {
            if let Some(d) = &delta.weight {
                *tensor = plus(tensor, d)?;
            }
        }
        Slot::Affine { weight, bias } => {
            if let Some(d) = &delta.weight {
                *weight = plus(weight, d)?;
            }
            if let Some(d) = &delta.bias {
                *bias = plus(bias, d)?;
            }
        }
    }
    Ok(())
}

fn adapted_linear(linear: &turbo_quant::Linear, delta: Delta) -> Result<turbo_quant::Linear> {
    let mut adapted = linear.clone();
    if let Some((down, up)) = delta.low_rank {
        // The term computes in the layer's compute dtype: the float weight's, or the bias's
        // for int8 layers (the activations' dtype), f32 when neither says.
        let dtype = linear
            .float_weight()
            .or(linear.bias())
            .map_or(DType::F32, Tensor::dtype);
        adapted =
            adapted.with_low_rank(LowRank::new(down.to_dtype(dtype)?, up.to_dtype(dtype)?)?)?;
    }
    if let Some(d) = &delta.weight {
        adapted = adapted.with_weight_delta(d)?;
    }
    if let Some(d) = &delta.bias {
        adapted = adapted.with_bias_delta(d)?;
    }
    Ok(adapted)
}

/// The value a [`Slot`] holds, kept to put back (tensors are shared, not copied).
#[derive(Debug, Clone)]
enum SlotValue {
    Block(turbo_quant::Linear),
    Plain(candle_nn::Linear),
    Tensor(Tensor),
    Affine(Tensor, Tensor),
}

impl Slot<'_> {
    fn value(&self) -> SlotValue {
        match self {
            Self::Block(linear) => SlotValue::Block((*linear).clone()),
            Self::Plain(linear) => SlotValue::Plain((*linear).clone()),
            Self::Tensor(tensor) => SlotValue::Tensor((*tensor).clone()),
            Self::Affine { weight, bias } => SlotValue::Affine((*weight).clone(), (*bias).clone()),
        }
    }

    fn set(self, value: SlotValue) {
        match (self, value) {
            (Self::Block(slot), SlotValue::Block(v)) => *slot = v,
            (Self::Plain(slot), SlotValue::Plain(v)) => *slot = v,
            (Self::Tensor(slot), SlotValue::Tensor(v)) => *slot = v,
            (Self::Affine { weight, bias }, SlotValue::Affine(w, b)) => (*weight, *bias) = (w, b),
            _ => unreachable!("a slot gets back the kind of value it gave"),
        }
    }
}

/// The unadapted values of the modules adapters have changed, so that switching adapters
/// starts again from the base weights (no drift from subtracting a merged delta, no rereading
/// of the checkpoint). Holds only what adapters touch, shared with nothing once replaced.
#[derive(Debug, Clone, Default)]
pub(crate) struct Unadapted(BTreeMap<String, SlotValue>);

impl Unadapted {
    /// Puts every saved value back into `slots` and forgets it.
    pub(crate) fn restore(&mut self, slots: Vec<(String, Slot<'_>)>) {
        for (key, slot) in slots {
            if let Some(value) = self.0.remove(&key) {
                slot.set(value);
            }
        }
    }

    /// Saves the current value of every slot `loras` target (at a non-zero strength).
    pub(crate) fn save_targets(&mut self, slots: Vec<(String, Slot<'_>)>, loras: &[ScaledLora]) {
        for (key, slot) in slots {
            if !contributions(loras, &key).is_empty() {
                self.0.entry(key).or_insert_with(|| slot.value());
            }
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}
