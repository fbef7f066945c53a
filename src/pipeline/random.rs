//! Seeded random weights with the exact names and shapes of a checkpoint: for the built-in demo
//! and for tests that write tiny models in the real formats.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use turbo_core::{Error, Result};
use turbo_models::pth::StoredDType;
use turbo_models::pth_writer::{write_pth, PthEntry};

/// Every tensor of a checkpoint, drawn on demand from `seed` and the tensor's name, so a tensor
/// has the same values whichever order it is read in.
///
/// Values are scaled so that a network built from them keeps its activations in a sane range:
/// norm gains near 1, biases and modulations near 0, other weights N(0, 1/fan_in).
#[derive(Debug, Clone)]
pub struct RandomCheckpoint {
    seed: u64,
    shapes: BTreeMap<String, Vec<usize>>,
}

/// Values per independently seeded chunk of a CPU draw.
const DRAW_CHUNK: usize = 1 << 20;

/// The first chunk keeps the tensor's seed (small tensors are unchanged by chunking).
fn chunk_seed(seed: u64, index: usize) -> u64 {
    seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Fills `values` with `mean + std · N(0, 1)` from a generator seeded with `seed`.
fn fill_normal(values: &mut [f32], seed: u64, mean: f32, std: f32) {
    let mut rng = StdRng::seed_from_u64(seed);
    for value in values {
        *value =
            mean + std * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng);
    }
}

impl RandomCheckpoint {
    pub fn new(seed: u64, shapes: impl IntoIterator<Item = (String, Vec<usize>)>) -> Self {
        Self {
            seed,
            shapes: shapes.into_iter().collect(),
        }
    }

    /// The tensor called `name`, in f32 on the CPU. Drawn in chunks of [`DRAW_CHUNK`] values,
    /// each from its own generator, on all the host's cores: umT5-XXL's 1.05 G-value token
    /// embedding takes about a second instead of fourteen.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let shape = self.shape(name)?;
        let seed = self.seed ^ fnv1a(name.as_bytes());
        let (mean, std) = value_scale(name, shape);
        let mut values = vec![0f32; shape.iter().product()];
        values
            .par_chunks_mut(DRAW_CHUNK)
            .enumerate()
            .for_each(|(index, chunk)| fill_normal(chunk, chunk_seed(seed, index), mean, std));
        Ok(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?)
    }

    /// The tensor called `name` in `dtype` on `device`. On the CPU it is [`Self::tensor`]; on
    /// a GPU it is drawn there from the same (mean, std) with the device's generator seeded
    /// from the seed and the name (so still independent of reading order, but not equal to
    /// the CPU values): drawing billions of values on the host would dominate a benchmark.
    /// Drawing on a GPU reseeds that device's generator (`Device::set_seed`).
    pub fn tensor_on(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        if device.is_cpu() {
            return Ok(self.tensor(name)?.to_dtype(dtype)?);
        }
        let shape = self.shape(name)?;
        let (mean, std) = value_scale(name, shape);
        // The device's generator is shared by every thread using the device: seeding and
        // drawing must not interleave with another thread's, or the draw is not this seed's.
        static DRAW: Mutex<()> = Mutex::new(());
        let _drawing = DRAW.lock().unwrap_or_else(PoisonError::into_inner);
        device.set_seed(self.seed ^ fnv1a(name.as_bytes()))?;
        Ok(Tensor::randn(mean, std, shape.as_slice(), device)?.to_dtype(dtype)?)
    }

    fn shape(&self, name: &str) -> Result<&Vec<usize>> {
        self.shapes.get(name).ok_or_else(|| Error::Checkpoint {
            path: "<random weights>".into(),
            reason: format!("no tensor `{name}`"),
        })
    }

    /// Bytes of all the tensors in `dtype`.
    pub fn bytes(&self, dtype: DType) -> u64 {
        let elements: usize = self
            .shapes
            .values()
            .map(|shape| shape.iter().product::<usize>())
            .sum();
        (elements * dtype.size_in_bytes()) as u64
    }

    /// A `VarBuilder` serving these tensors in `dtype` on `device`.
    pub fn var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// Writes every tensor as a `.pth` state dict (what `torch.save` writes; the released Wan
    /// files' format) in `dtype`, each drawn on `device` as [`Self::tensor_on`] draws it, one
    /// tensor in memory at a time.
    pub fn save_pth(&self, path: &Path, dtype: DType, device: &Device) -> Result<()> {
        let stored = stored_dtype(dtype)?;
        let entries: Vec<PthEntry> = self
            .shapes
            .iter()
            .map(|(name, shape)| PthEntry {
                name: name.clone(),
                stored,
                shape: shape.clone(),
            })
            .collect();
        write_pth(path, &entries, |entry| {
            le_bytes(&self.tensor_on(&entry.name, dtype, device)?)
        })
    }

    /// Writes a Wan DiT as a TurboDiffusion `-quant` release does: each block linear's weight
    /// as `<layer>.int8_weight` (int8) and `<layer>.scale` (f32, one per 128×128 tile),
    /// quantised as at load; every other tensor in `dtype`. Drawn on `device`.
    pub fn save_quant_dit_pth(&self, path: &Path, dtype: DType, device: &Device) -> Result<()> {
        let stored = stored_dtype(dtype)?;
        let mut entries = Vec::new();
        for (name, shape) in &self.shapes {
            let entry = |name: String, stored, shape: Vec<usize>| PthEntry {
                name,
                stored,
                shape,
            };
            match (turbo_models::wan::block_linear_of(name), shape.as_slice()) {
                (Some(layer), &[rows, cols]) => {
                    let scales = turbo_quant::tile_grid(rows, cols).to_vec();
                    entries.push(entry(
                        format!("{layer}.int8_weight"),
                        StoredDType::I8,
                        shape.clone(),
                    ));
                    entries.push(entry(format!("{layer}.scale"), StoredDType::F32, scales));
                }
                _ => entries.push(entry(name.clone(), stored, shape.clone())),
            }
        }
        // Each weight is quantised once: its scales wait here for the entry after it.
        let mut scales = None;
        write_pth(path, &entries, |entry| {
            if let Some(layer) = entry.name.strip_suffix(".int8_weight") {
                let weight = self.tensor_on(&format!("{layer}.weight"), DType::F32, device)?;
                let int8 = turbo_quant::Int8Weight::quantize(&weight)?;
                scales = Some(le_bytes(int8.scale())?);
                return le_bytes(int8.int8_weight());
            }
            match entry.name.ends_with(".scale") {
                true => scales.take().ok_or_else(|| Error::Checkpoint {
                    path: path.to_owned(),
                    reason: format!("{} was not preceded by its weight", entry.name),
                }),
                false => le_bytes(&self.tensor_on(&entry.name, dtype, device)?),
            }
        })
    }

    /// Writes every tensor to a `.safetensors` file in `dtype`.
    pub fn save_safetensors(&self, path: &Path, dtype: DType) -> Result<()> {
        let tensors = self
            .shapes
            .keys()
            .map(|name| Ok((name.clone(), self.tensor(name)?.to_dtype(dtype)?)))
            .collect::<Result<std::collections::HashMap<_, _>>>()?;
        Ok(candle_core::safetensors::save(&tensors, path)?)
    }
}

/// The `.pth` storage type of `dtype`.
fn stored_dtype(dtype: DType) -> Result<StoredDType> {
    match dtype {
        DType::F32 => Ok(StoredDType::F32),
        DType::BF16 => Ok(StoredDType::BF16),
        DType::F16 => Ok(StoredDType::F16),
        other => Err(Error::UnsupportedDType {
            what: "random checkpoint written as .pth".into(),
            dtype: other,
            expected: "f32, bf16 or f16",
        }),
    }
}

/// The little-endian bytes of a tensor (any device) of a float or `U8` dtype, in row-major
/// order.
fn le_bytes(tensor: &Tensor) -> Result<Vec<u8>> {
    let flat = tensor.flatten_all()?.to_device(&Device::Cpu)?;
    Ok(match flat.dtype() {
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::F32 => flat
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => {
            return Err(Error::UnsupportedDType {
                what: "tensor written as .pth".into(),
                dtype: other,
                expected: "f32, bf16, f16 or u8",
            })
        }
    })
}

/// FNV-1a: a name hash that, unlike std's `DefaultHasher`, is the same in every Rust release.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// (mean, std) of the values of a tensor, from its role as its name tells it.
fn value_scale(name: &str, shape: &[usize]) -> (f32, f32) {
    let leaf = name.rsplit('.').next().unwrap_or(name);
    let is_norm = name.contains("norm") || leaf == "gamma";
    match leaf {
        "bias" | "beta" => (0.0, 0.02),
        _ if is_norm => (1.0, 0.05),
        "modulation" => (0.0, 0.05),
        _ => {
            let fan_in = shape.iter().skip(1).product::<usize>().max(1);
            (0.0, 1.0 / (fan_in as f32).sqrt())
        }
    }
}

impl SimpleBackend for RandomCheckpoint {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        turbo_models::checkpoint::check_shape(self.get_unchecked(name, dtype, dev)?, name, shape)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor_on(name, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_depend_on_seed_and_name_not_on_order() {
        let shapes = [
            ("a.weight".to_owned(), vec![4, 8]),
            ("b.bias".to_owned(), vec![4]),
        ];
        let first = RandomCheckpoint::new(7, shapes.clone());
        let again = RandomCheckpoint::new(7, shapes.clone().into_iter().rev());
        let other = RandomCheckpoint::new(8, shapes);
        let values = |c: &RandomCheckpoint| {
            c.tensor("a.weight")
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(values(&first), values(&again));
        assert_ne!(values(&first), values(&other));
        let bias_max = first
            .tensor("b.bias")
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(bias_max < 0.2);
    }
}
