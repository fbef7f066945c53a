//! PyTorch `torch.save` archives: a zip holding `<prefix>/data.pkl` (the pickled state dict)
//! and one `<prefix>/data/<key>` entry of raw little-endian bytes per storage.
//!
//! The pickle is parsed with candle's `pickle::Stack`; the tensor records are read here rather
//! than by `candle_core::pickle::read_pth_tensor_info`, which skips int8 (`CharStorage`)
//! tensors. Int8 tensors are listed with dtype `I8` and read as raw bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use turbo_core::{Error, Result};
use zip::ZipArchive;

use super::{checkpoint_error, TensorMeta};

/// Where one tensor's bytes lie in the archive.
#[derive(Debug, Clone)]
struct Entry {
    meta: TensorMeta,
    /// The zip entry of the tensor's storage.
    storage: String,
    /// Byte offset of the tensor inside its storage.
    offset: usize,
    element_size: usize,
}

/// An opened `.pth` archive with its tensor records.
#[derive(Debug)]
pub struct PthArchive {
    path: PathBuf,
    entries: BTreeMap<String, Entry>,
    zip: Mutex<ZipArchive<BufReader<File>>>,
}

impl PthArchive {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut zip = ZipArchive::new(BufReader::new(file))
            .map_err(|e| checkpoint_error(path, &format!("not a PyTorch zip archive: {e}")))?;
        let pickle_name = zip
            .file_names()
            .filter_map(|name| name.ok().map(|name| name.into_owned()))
            .find(|name| name.ends_with("data.pkl"))
            .ok_or_else(|| checkpoint_error(path, "the archive holds no data.pkl"))?;
        let prefix = pickle_name.trim_end_matches("data.pkl").to_owned();
        let state = {
            let reader = zip
                .by_name(&pickle_name)
                .map_err(|e| checkpoint_error(path, &e.to_string()))?;
            let mut stack = Stack::empty();
            stack
                .read_loop(&mut BufReader::new(reader))
                .and_then(|()| stack.finalize())
                .map_err(|e| checkpoint_error(path, &format!("unreadable data.pkl: {e}")))?
        };
        let Object::Dict(pairs) = state else {
            return Err(checkpoint_error(
                path,
                "data.pkl does not hold a flat state dict",
            ));
        };
        let mut entries = BTreeMap::new();
        for (name, value) in pairs {
            let Object::Unicode(name) = name else {
                continue;
            };
            let entry = tensor_record(name.clone(), value, &prefix)
                .map_err(|reason| checkpoint_error(path, &format!("tensor `{name}`: {reason}")))?;
            if let Some(entry) = entry {
                entries.insert(name, entry);
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            entries,
            zip: Mutex::new(zip),
        })
    }

    /// The tensors' names, shapes and dtypes.
    pub fn metas(&self) -> impl Iterator<Item = &TensorMeta> {
        self.entries.values().map(|entry| &entry.meta)
    }

    /// The raw little-endian bytes of tensor `name`.
    pub fn bytes(&self, name: &str) -> Result<Vec<u8>> {
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| checkpoint_error(&self.path, &format!("no tensor `{name}`")))?;
        let numel: usize = entry.meta.shape.iter().product();
        let mut bytes = vec![0u8; numel * entry.element_size];
        let mut zip = self
            .zip
            .lock()
            .map_err(|_| checkpoint_error(&self.path, "a reader panicked"))?;
        let read_error = |e: &dyn std::fmt::Display| {
            checkpoint_error(&self.path, &format!("reading `{name}`: {e}"))
        };
        let mut storage = zip.by_name(&entry.storage).map_err(|e| read_error(&e))?;
        std::io::copy(
            &mut storage.by_ref().take(entry.offset as u64),
            &mut std::io::sink(),
        )
        .map_err(|e| read_error(&e))?;
        storage.read_exact(&mut bytes).map_err(|e| read_error(&e))?;
        Ok(bytes)
    }

    /// Tensor `name` in its stored dtype, which must be one candle has (not int8).
    fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let meta = self
            .entries
            .get(name)
            .map(|entry| &entry.meta)
            .ok_or_else(|| checkpoint_error(&self.path, &format!("no tensor `{name}`")))?;
        let dtype = candle_dtype(&meta.dtype).ok_or_else(|| {
            checkpoint_error(
                &self.path,
                &format!(
                    "`{name}` is stored as {}, which cannot be loaded as a float tensor \
                     (a quantised checkpoint loaded as an unquantised model?)",
                    meta.dtype
                ),
            )
        })?;
        let bytes = self.bytes(name)?;
        Ok(Tensor::from_raw_buffer(&bytes, dtype, &meta.shape, device)?)
    }
}

/// A `VarBuilder` backend reading tensors from a [`PthArchive`].
pub struct PthBackend(pub std::sync::Arc<PthArchive>);

impl SimpleBackend for PthBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.get_unchecked(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            });
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .tensor(name, device)
            .and_then(|t| Ok(t.to_dtype(dtype)?))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.entries.contains_key(name)
    }
}

/// The candle dtype of a stored dtype name, where candle has one.
fn candle_dtype(name: &str) -> Option<DType> {
    Some(match name {
        "F32" => DType::F32,
        "F64" => DType::F64,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "U8" | "BOOL" => DType::U8,
        "I16" => DType::I16,
        "I32" => DType::I32,
        "I64" => DType::I64,
        _ => return None,
    })
}

/// The dtype name and element size of a pickled storage class.
fn storage_dtype(class_name: &str) -> Option<(&'static str, usize)> {
    Some(match class_name {
        "FloatStorage" => ("F32", 4),
        "DoubleStorage" => ("F64", 8),
        "HalfStorage" => ("F16", 2),
        "BFloat16Storage" => ("BF16", 2),
        "ByteStorage" => ("U8", 1),
        "BoolStorage" => ("BOOL", 1),
        "CharStorage" => ("I8", 1),
        "ShortStorage" => ("I16", 2),
        "IntStorage" => ("I32", 4),
        "LongStorage" => ("I64", 8),
        _ => return None,
    })
}

/// The record of one state-dict value, or `None` when it is not a tensor.
fn tensor_record(
    name: String,
    value: Object,
    prefix: &str,
) -> std::result::Result<Option<Entry>, String> {
    let Some(args) = rebuild_tensor_args(value) else {
        return Ok(None);
    };
    let Object::Tuple(args) = args else {
        return Err("malformed _rebuild_tensor_v2 arguments".into());
    };
    let mut args = args.into_iter();
    let (Some(storage), Some(offset), Some(size), Some(stride)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        return Err("too few _rebuild_tensor_v2 arguments".into());
    };
    let Object::PersistentLoad(storage) = storage else {
        return Err("the storage is not a persistent reference".into());
    };
    let Object::Tuple(storage) = *storage else {
        return Err("malformed storage reference".into());
    };
    let (class_name, key) = match storage.as_slice() {
        [_, Object::Class { class_name, .. }, Object::Unicode(key), ..] => (class_name, key),
        _ => return Err("malformed storage reference".into()),
    };
    let (dtype, element_size) =
        storage_dtype(class_name).ok_or_else(|| format!("unsupported storage {class_name}"))?;
    let shape = integers(size)?;
    let stride = integers(stride)?;
    if !is_contiguous(&shape, &stride) {
        return Err(format!(
            "strides {stride:?} for shape {shape:?}: only contiguous tensors are supported"
        ));
    }
    Ok(Some(Entry {
        meta: TensorMeta {
            name,
            shape,
            dtype: dtype.to_owned(),
        },
        storage: format!("{prefix}data/{key}"),
        offset: integer(offset)? * element_size,
        element_size,
    }))
}

/// The arguments of `torch._utils._rebuild_tensor_v2`, unwrapping parameters and tensor
/// subclasses.
fn rebuild_tensor_args(value: Object) -> Option<Object> {
    let Object::Reduce { callable, args } = value else {
        return None;
    };
    let Object::Class {
        module_name,
        class_name,
    } = *callable
    else {
        return None;
    };
    match (module_name.as_str(), class_name.as_str()) {
        ("torch._utils", "_rebuild_tensor_v2") => Some(*args),
        ("torch._utils", "_rebuild_parameter") | ("torch._tensor", "_rebuild_from_type_v2") => {
            let Object::Tuple(args) = *args else {
                return None;
            };
            // `_rebuild_parameter(data, …)`; `_rebuild_from_type_v2(func, type, args, state)`.
            let inner = if class_name == "_rebuild_parameter" {
                args.into_iter().next()?
            } else {
                let mut args = args.into_iter();
                let func = args.next()?;
                let func_args = args.nth(1)?;
                Object::Reduce {
                    callable: Box::new(func),
                    args: Box::new(func_args),
                }
            };
            rebuild_tensor_args(inner)
        }
        _ => None,
    }
}

fn integer(value: Object) -> std::result::Result<usize, String> {
    match value {
        Object::Int(v) if v >= 0 => Ok(v as usize),
        Object::Long(v) if v >= 0 => Ok(v as usize),
        other => Err(format!("expected a non-negative integer, got {other:?}")),
    }
}

fn integers(value: Object) -> std::result::Result<Vec<usize>, String> {
    match value {
        Object::Tuple(values) => values.into_iter().map(integer).collect(),
        other => Err(format!("expected a tuple of integers, got {other:?}")),
    }
}

/// Row-major without gaps; the strides of axes of length 1 do not matter.
fn is_contiguous(shape: &[usize], stride: &[usize]) -> bool {
    let mut expected = 1;
    for (&size, &step) in shape.iter().zip(stride).rev() {
        if size != 1 && step != expected {
            return false;
        }
        expected *= size;
    }
    shape.len() == stride.len()
}
