//! A lazy reader for PyTorch `.pth` state dicts (`torch.save` zip archives), built on candle's
//! pickle parser.
//!
//! candle's own `.pth` reader skips (and prints about) every tensor whose storage class it does
//! not know, int8 `CharStorage` among them, so the `-quant` TurboDiffusion releases would lose
//! their int8 weights. This reader knows the storage classes real checkpoints use, reads only
//! `data.pkl` when opened, and maps the archive into memory: `torch.save` stores every entry
//! uncompressed, so a tensor's bytes are one slice of the file, copied once, to its device,
//! when asked for (no per-tensor archive parsing, checksum or intermediate buffer).
//!
//! Int8 tensors are returned as `U8` tensors holding the raw two's-complement bytes (candle has
//! no int8 dtype); [`PthTensor::stored`] says they are int8.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::Init;
use turbo_core::{Error, Result};

use crate::checkpoint::check_shape;

/// The element type of a tensor as the archive stores it (its PyTorch storage class).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDType {
    F32,
    F64,
    F16,
    BF16,
    U8,
    /// `torch.int8` (`CharStorage`): read as `U8` bytes.
    I8,
    I32,
    I64,
}

/// Each stored type with its PyTorch storage class.
const STORAGE_CLASSES: [(StoredDType, &str); 8] = [
    (StoredDType::F32, "FloatStorage"),
    (StoredDType::F64, "DoubleStorage"),
    (StoredDType::F16, "HalfStorage"),
    (StoredDType::BF16, "BFloat16Storage"),
    (StoredDType::U8, "ByteStorage"),
    (StoredDType::I8, "CharStorage"),
    (StoredDType::I32, "IntStorage"),
    (StoredDType::I64, "LongStorage"),
];

impl StoredDType {
    /// The type of a storage class named in the pickle (`FloatStorage`, `CharStorage`, …).
    fn from_storage_class(class: &str) -> Option<Self> {
        STORAGE_CLASSES
            .iter()
            .find(|(_, name)| *name == class)
            .map(|(stored, _)| *stored)
    }

    /// Its PyTorch storage class (`FloatStorage`, `CharStorage`, …).
    pub fn storage_class(self) -> &'static str {
        STORAGE_CLASSES
            .iter()
            .find(|(stored, _)| *stored == self)
            .map_or("FloatStorage", |(_, name)| name)
    }

    /// The candle dtype the tensor is read into: the same type, except int8, which arrives as
    /// its `U8` bytes.
    pub fn read_as(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::U8 | Self::I8 => DType::U8,
            Self::I32 => DType::I32,
            Self::I64 => DType::I64,
        }
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        self.read_as().size_in_bytes()
    }

    /// The name safetensors uses for the same type (`F32`, `BF16`, `I8`, …).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F64 => "F64",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::I32 => "I32",
            Self::I64 => "I64",
        }
    }
}

/// One tensor of a `.pth` state dict: where its bytes are and how to read them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PthTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub stored: StoredDType,
    /// The archive entry holding the tensor's storage (`archive/data/0`).
    entry: String,
    /// Offset of the first element into the storage, in elements.
    offset: usize,
    /// Where the tensor's bytes start in the file, once the archive has placed its entry.
    file_start: u64,
}

/// A `.pth` archive whose state dict has been read: tensor names, shapes and storage types,
/// without any tensor data.
#[derive(Debug, Clone)]
pub struct PthArchive {
    path: PathBuf,
    tensors: BTreeMap<String, PthTensor>,
    mapped: Arc<memmap2::Mmap>,
}

impl PthArchive {
    /// Opens a `torch.save` zip archive and reads its `data.pkl`. Values of the state dict that
    /// are not tensors (`_metadata`, version numbers) are skipped; a tensor this reader cannot
    /// read (unknown storage class, non-contiguous layout) is an error naming its key.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut archive = open_zip(&path)?;
        let pickle_entry = archive
            .file_names()
            .filter_map(|name| name.ok())
            .find(|name| name.ends_with("data.pkl"))
            .map(|name| name.into_owned())
            .ok_or_else(|| pth_error(&path, "the archive holds no `data.pkl`"))?;
        let data_dir = pickle_entry.trim_end_matches(".pkl").to_owned();
        let file_length = std::fs::metadata(&path)
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?
            .len();
        let state_dict = {
            let pickle = read_entry(&mut archive, &pickle_entry, file_length)
                .map_err(|e| pth_error(&path, &format!("cannot read `{pickle_entry}`: {e}")))?;
            crate::pickle_guard::check_pickle(&pickle)
                .map_err(|e| pth_error(&path, &format!("`{pickle_entry}`: {e}")))?;
            let mut stack = Stack::empty();
            stack
                .read_loop(&mut std::io::Cursor::new(pickle))
                .and_then(|()| stack.finalize())
                .map_err(|e| pth_error(&path, &format!("`{pickle_entry}` is not a pickle: {e}")))?
        };
        let entries = match state_dict {
            Object::Dict(entries) => entries,
            _ => return Err(pth_error(&path, "the pickled object is not a state dict")),
        };
        let mut tensors = BTreeMap::new();
        for (key, value) in entries {
            let Object::Unicode(name) = key else { continue };
            if let Some(tensor) = parse_tensor(&name, value, &data_dir)
                .and_then(|tensor| locate(tensor, &mut archive, file_length))
                .map_err(|reason| pth_error(&path, &format!("tensor `{name}`: {reason}")))?
            {
                tensors.insert(name, tensor);
            }
        }
        let file = archive.into_inner().into_inner();
        // SAFETY: the file is mapped read-only; like every mmap-based loader (the safetensors
        // path of `Checkpoint` too), this relies on nobody truncating or rewriting it while
        // the archive is open.
        let mapped = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Self {
            path,
            tensors,
            mapped: Arc::new(mapped),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &PthTensor> {
        self.tensors.values()
    }

    pub fn get(&self, name: &str) -> Option<&PthTensor> {
        self.tensors.get(name)
    }

    /// Reads tensor `name` from the archive onto `device`, in its stored dtype (int8 as `U8`
    /// bytes, see [`StoredDType::read_as`]).
    pub fn read(&self, name: &str, device: &Device) -> Result<Tensor> {
        let (tensor, bytes) = self.tensor_bytes(name)?;
        let dtype = tensor.stored.read_as();
        turbo_core::upload::tensor_from_bytes(bytes, dtype, &tensor.shape, device)
    }

    /// Tensor `name` and its bytes in the mapped file.
    pub(crate) fn tensor_bytes(&self, name: &str) -> Result<(&PthTensor, &[u8])> {
        let tensor = self
            .get(name)
            .ok_or_else(|| pth_error(&self.path, &format!("no tensor `{name}`")))?;
        let bytes = self
            .bytes(tensor)
            .map_err(|e| pth_error(&self.path, &format!("tensor `{name}`: {e}")))?;
        Ok((tensor, bytes))
    }

    /// The tensor's bytes in the mapped file (whose extent `open` checked: an error here means
    /// the file shrank since).
    fn bytes(&self, tensor: &PthTensor) -> std::result::Result<&[u8], String> {
        let (_, length) = tensor.byte_range()?;
        usize::try_from(tensor.file_start)
            .ok()
            .and_then(|start| Some(start..start.checked_add(usize::try_from(length).ok()?)?))
            .and_then(|range| self.mapped.get(range))
            .ok_or_else(|| "its bytes lie past the end of the mapped file".to_owned())
    }
}

impl PthTensor {
    /// `(first byte, byte length)` of the tensor in its storage, `Err` when a size overflows.
    fn byte_range(&self) -> std::result::Result<(u64, u64), String> {
        let element = self.stored.size_in_bytes() as u64;
        let overflow = || format!("the byte size of shape {:?} overflows", self.shape);
        let count = crate::checkpoint::element_count(&self.shape).ok_or_else(overflow)?;
        let length = (count as u64).checked_mul(element).ok_or_else(overflow)?;
        let start = (self.offset as u64)
            .checked_mul(element)
            .ok_or_else(|| format!("the storage offset {} overflows", self.offset))?;
        Ok((start, length))
    }
}

/// The tensor with its place in the file, if its bytes lie inside its storage entry of the
/// archive, stored uncompressed: a file whose sizes or offsets overflow, that claims more bytes
/// than it stores, or whose storage is compressed (`torch.save` never compresses) is refused
/// when opened.
fn locate(
    tensor: Option<PthTensor>,
    archive: &mut zip::ZipArchive<BufReader<File>>,
    file_length: u64,
) -> std::result::Result<Option<PthTensor>, String> {
    let Some(mut tensor) = tensor else {
        return Ok(None);
    };
    let (start, length) = tensor.byte_range()?;
    let entry = archive
        .by_name(&tensor.entry)
        .map_err(|e| format!("storage `{}`: {e}", tensor.entry))?;
    if entry.compression() != zip::CompressionMethod::Stored {
        return Err(format!(
            "storage `{}` is compressed ({}); torch.save stores entries uncompressed",
            tensor.entry,
            entry.compression()
        ));
    }
    let stored = entry.size();
    let entry_start = entry
        .data_start()
        .ok_or_else(|| format!("storage `{}` has no data offset", tensor.entry))?;
    // The zip entry's size is itself a claim: `torch.save` stores entries uncompressed, so
    // no storage can be larger than the archive.
    if stored > file_length {
        return Err(format!(
            "storage `{}` claims {stored} bytes but the archive holds {file_length}",
            tensor.entry
        ));
    }
    let end = start.checked_add(length);
    let file_start = entry_start.checked_add(start);
    match (end, file_start) {
        (Some(end), Some(file_start))
            if end <= stored && file_start.checked_add(length) <= Some(file_length) =>
        {
            tensor.file_start = file_start;
            Ok(Some(tensor))
        }
        _ => Err(format!(
            "shape {:?} at element offset {} needs {length} bytes from byte {start}, but \
             storage `{}` holds {stored}",
            tensor.shape, tensor.offset, tensor.entry
        )),
    }
}

/// The bytes of archive entry `name`, refused when the entry claims more than the archive's
/// `file_length` bytes (a zip header is a claim too).
fn read_entry(
    archive: &mut zip::ZipArchive<BufReader<File>>,
    name: &str,
    file_length: u64,
) -> std::result::Result<Vec<u8>, String> {
    let mut entry = archive.by_name(name).map_err(|e| e.to_string())?;
    if entry.size() > file_length {
        return Err(format!(
            "it claims {} bytes but the archive holds {file_length}",
            entry.size()
        ));
    }
    let mut bytes = Vec::with_capacity(entry.size() as usize);
    entry.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok(bytes)
}

/// A state-dict value as a tensor: `Ok(None)` for values that are not tensors, an error for
/// tensors this reader cannot read.
fn parse_tensor(
    name: &str,
    value: Object,
    data_dir: &str,
) -> std::result::Result<Option<PthTensor>, String> {
    let Some(args) = rebuild_tensor_args(value)? else {
        return Ok(None);
    };
    // _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, ...)
    let mut args = args.into_iter();
    let (Some(storage), Some(offset), Some(size), Some(stride)) =
        (args.next(), args.next(), args.next(), args.next())
    else {
        return Err("`_rebuild_tensor_v2` with fewer than 4 arguments".into());
    };
    let (stored, key) = parse_storage(storage)?;
    let shape = usize_list(size).ok_or("the size is not a tuple of integers")?;
    let stride = usize_list(stride).ok_or("the stride is not a tuple of integers")?;
    let offset = match offset {
        Object::Int(v) if v >= 0 => v as usize,
        Object::Long(v) if v >= 0 => v as usize,
        _ => return Err("the storage offset is not a non-negative integer".into()),
    };
    if !is_row_major(&shape, &stride) {
        return Err(format!(
            "non-contiguous layout (shape {shape:?}, stride {stride:?}): save it after \
             `.contiguous()`"
        ));
    }
    Ok(Some(PthTensor {
        name: name.to_owned(),
        shape,
        stored,
        entry: format!("{data_dir}/{key}"),
        offset,
        // Placed by `locate`, which reads the archive's entry.
        file_start: 0,
    }))
}

/// The argument tuple of `torch._utils._rebuild_tensor_v2`, unwrapping `_rebuild_parameter`
/// (an `nn.Parameter` pickles the tensor as its first argument) and `_rebuild_from_type_v2`
/// (tensor subclasses: `(rebuild function, type, its arguments, state)`).
fn rebuild_tensor_args(value: Object) -> std::result::Result<Option<Vec<Object>>, String> {
    let Object::Reduce { callable, args } = value else {
        return Ok(None);
    };
    let Object::Class {
        module_name,
        class_name,
    } = *callable
    else {
        return Ok(None);
    };
    if !matches!(module_name.as_str(), "torch._utils" | "torch._tensor") {
        return Ok(None);
    }
    let constructor = format!("{module_name}.{class_name}");
    let Object::Tuple(args) = *args else {
        return Err(format!("`{constructor}` arguments are not a tuple"));
    };
    match constructor.as_str() {
        "torch._utils._rebuild_tensor_v2" => Ok(Some(args)),
        "torch._utils._rebuild_parameter" | "torch._utils._rebuild_parameter_with_state" => {
            match args.into_iter().next() {
                Some(tensor) => rebuild_tensor_args(tensor),
                None => Err(format!("`{constructor}` without a tensor")),
            }
        }
        "torch._tensor._rebuild_from_type_v2" => {
            let mut args = args.into_iter();
            match (args.next(), args.nth(1)) {
                (Some(function), Some(function_args)) => rebuild_tensor_args(Object::Reduce {
                    callable: Box::new(function),
                    args: Box::new(function_args),
                }),
                _ => Err(format!("`{constructor}` with fewer than 3 arguments")),
            }
        }
        _ => Err(format!("unsupported tensor constructor `{constructor}`")),
    }
}

/// `('storage', torch.XStorage, key, location, numel)` → the storage type and its key.
fn parse_storage(storage: Object) -> std::result::Result<(StoredDType, String), String> {
    let Object::PersistentLoad(id) = storage else {
        return Err("the storage is not a persistent id".into());
    };
    let Object::Tuple(fields) = *id else {
        return Err("the storage id is not a tuple".into());
    };
    match fields.as_slice() {
        [Object::Unicode(kind), Object::Class { class_name, .. }, Object::Unicode(key), ..]
            if kind == "storage" =>
        {
            let stored = StoredDType::from_storage_class(class_name)
                .ok_or_else(|| format!("unsupported storage class `{class_name}`"))?;
            Ok((stored, key.clone()))
        }
        _ => Err("the storage id is not ('storage', class, key, location, size)".into()),
    }
}

fn usize_list(object: Object) -> Option<Vec<usize>> {
    let (Object::Tuple(items) | Object::List(items)) = object else {
        return None;
    };
    items
        .into_iter()
        .map(|item| match item {
            Object::Int(v) => usize::try_from(v).ok(),
            Object::Long(v) => usize::try_from(v).ok(),
            _ => None,
        })
        .collect()
}

/// Whether `stride` is the row-major stride of `shape` (dimensions of size 1 may have any
/// stride).
fn is_row_major(shape: &[usize], stride: &[usize]) -> bool {
    if shape.len() != stride.len() {
        return false;
    }
    let mut expected = 1;
    for (&size, &step) in shape.iter().zip(stride).rev() {
        if size != 1 && step != expected {
            return false;
        }
        // An overflowing shape is refused later by its byte size; any stride then fails.
        expected = expected.saturating_mul(size);
    }
    true
}

fn open_zip(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>> {
    let file = File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| pth_error(path, &format!("not a PyTorch zip archive: {e}")))
}

fn pth_error(path: &Path, reason: &str) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    }
}

/// Reads a stored tensor as `dtype`. Int8 tensors can only be read as `U8`, their raw bytes:
/// converting them to another dtype would silently turn −1 into 255.
pub(crate) fn convert_stored(
    tensor: Tensor,
    stored_int8: bool,
    name: &str,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    if stored_int8 && dtype != DType::U8 {
        candle_core::bail!(
            "`{name}` is stored as int8 and can only be read as U8 (its raw bytes), not {dtype:?}"
        );
    }
    tensor.to_dtype(dtype)
}

impl SimpleBackend for PthArchive {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        check_shape(self.get_unchecked(name, dtype, device)?, name, shape)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self
            .read(name, device)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let stored_int8 = self.get(name).map(|t| t.stored) == Some(StoredDType::I8);
        convert_stored(tensor, stored_int8, name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::is_row_major;

    #[test]
    fn row_major_layouts() {
        assert!(is_row_major(&[2, 3, 4], &[12, 4, 1]));
        assert!(is_row_major(&[], &[]));
        // Dimensions of size 1 may carry any stride (torch gives views such strides).
        assert!(is_row_major(&[1, 5], &[7, 1]));
        assert!(is_row_major(&[4, 1], &[1, 1]));
        assert!(!is_row_major(&[3, 2], &[1, 3]));
        assert!(!is_row_major(&[2, 3], &[3]));
        assert!(!is_row_major(&[2, 2], &[4, 2]));
    }
}
