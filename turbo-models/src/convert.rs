//! Writing a checkpoint as safetensors: every key and stored dtype kept (int8 included), and
//! optionally the DiT's float block linears quantised to W8A8 on the way.

use std::borrow::Cow;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, View};
use turbo_core::{Error, Result};
use turbo_quant::Int8Weight;

use crate::wan::block_linear_of;
use crate::Checkpoint;

/// A tensor to write: a candle tensor in its own dtype, or int8 values as their raw bytes.
enum Entry {
    Tensor(Tensor),
    Int8 { bytes: Vec<u8>, shape: Vec<usize> },
}

impl View for &Entry {
    fn dtype(&self) -> Dtype {
        match self {
            Entry::Tensor(t) => <Tensor as View>::dtype(t),
            Entry::Int8 { .. } => Dtype::I8,
        }
    }

    fn shape(&self) -> &[usize] {
        match self {
            Entry::Tensor(t) => t.dims(),
            Entry::Int8 { shape, .. } => shape,
        }
    }

    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Entry::Tensor(t) => <Tensor as View>::data(t),
            Entry::Int8 { bytes, .. } => Cow::Borrowed(bytes),
        }
    }

    fn data_len(&self) -> usize {
        match self {
            Entry::Tensor(t) => <Tensor as View>::data_len(t),
            Entry::Int8 { bytes, .. } => bytes.len(),
        }
    }
}

/// What [`to_safetensors`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Converted {
    pub tensors: usize,
    /// Block linears quantised to W8A8 on the way.
    pub quantized: usize,
}

/// The temporary file [`to_safetensors`] writes before renaming it to `output`: a program that
/// is stopped by a signal removes it (an error or a return removes it already).
pub fn temp_path(output: &Path) -> std::path::PathBuf {
    output.with_extension("safetensors.tmp")
}

/// Writes every tensor of `checkpoint` to `output` in its stored dtype; with `quantize`, each
/// float DiT block linear `weight` becomes `int8_weight` (I8) + `scale` (F32 per 128×128 tile),
/// the `-quant` layout. Every tensor is read into memory first (the header needs all sizes);
/// the file is written to a temporary name beside `output` and renamed at the end.
pub fn to_safetensors(checkpoint: &Checkpoint, output: &Path, quantize: bool) -> Result<Converted> {
    let vb = checkpoint.var_builder(DType::F32, &Device::Cpu)?;
    let mut entries: Vec<(String, Entry)> = Vec::with_capacity(checkpoint.len());
    let mut quantized = 0;
    for meta in checkpoint.tensors() {
        let tensor = vb.get_unchecked_dtype(
            &meta.name,
            stored_dtype(checkpoint, &meta.name, &meta.dtype)?,
        )?;
        let int8_bytes = |t: &Tensor| -> Result<Vec<u8>> { Ok(t.flatten_all()?.to_vec1::<u8>()?) };
        if meta.dtype == "I8" {
            let entry = Entry::Int8 {
                bytes: int8_bytes(&tensor)?,
                shape: meta.shape.clone(),
            };
            entries.push((meta.name.clone(), entry));
        } else if let Some(layer) = block_linear_of(&meta.name).filter(|_| quantize) {
            let int8 = Int8Weight::quantize(&tensor)?;
            let entry = Entry::Int8 {
                bytes: int8_bytes(int8.int8_weight())?,
                shape: meta.shape.clone(),
            };
            entries.push((format!("{layer}.int8_weight"), entry));
            entries.push((
                format!("{layer}.scale"),
                Entry::Tensor(int8.scale().clone()),
            ));
            quantized += 1;
        } else {
            entries.push((meta.name.clone(), Entry::Tensor(tensor)));
        }
    }
    let tmp = temp_path(output);
    let views = entries.iter().map(|(name, entry)| (name.as_str(), entry));
    let written = safetensors::serialize_to_file(views, None, &tmp)
        .map_err(|e| Error::Checkpoint {
            path: tmp.clone(),
            reason: e.to_string(),
        })
        .and_then(|()| {
            std::fs::rename(&tmp, output).map_err(|source| Error::Io {
                path: output.to_owned(),
                source,
            })
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map(|()| Converted {
        tensors: entries.len(),
        quantized,
    })
}

fn stored_dtype(checkpoint: &Checkpoint, name: &str, dtype: &str) -> Result<DType> {
    Ok(match dtype {
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "F64" => DType::F64,
        "I64" => DType::I64,
        "I32" => DType::I32,
        "U8" | "I8" => DType::U8,
        other => {
            return Err(Error::Checkpoint {
                path: checkpoint.path().to_owned(),
                reason: format!(
                    "`{name}` is stored as {other}, which the converter does not write"
                ),
            })
        }
    })
}
