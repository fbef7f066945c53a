//! One reader for every checkpoint container the models ship in:
//! - a single `.safetensors` file;
//! - a sharded safetensors checkpoint, given as its `*.safetensors.index.json` or as the folder
//!   holding it (or, without an index, holding the `*.safetensors` shards);
//! - a PyTorch `.pth` / `.pt` / `.bin` state dict (a `torch.save` zip archive, read by
//!   [`crate::pth`]).
//!
//! Int8 tensors (the `-quant` releases) are listed with dtype `I8` and read through the
//! `VarBuilder` as `U8` tensors holding their raw bytes, in both containers: candle has no int8
//! dtype, and `turbo_quant::Linear` takes int8 weights in that form.
//!
//! [`Checkpoint::open`] reads only the headers: names, shapes and dtypes, without allocating a
//! single tensor, so a model can check a file with [`Checkpoint::expect_keys`] before loading
//! gigabytes of weights from it through [`Checkpoint::var_builder`].

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use turbo_core::{Error, KeyProblem, Result};

use crate::pth::{convert_stored, PthArchive, StoredDType};

/// The name, shape and stored dtype of one tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMeta {
    pub name: String,
    pub shape: Vec<usize>,
    /// The stored dtype as the container names it (`F32`, `BF16`, `I8`, …).
    pub dtype: String,
}

#[derive(Debug, Clone)]
enum Container {
    /// One or more safetensors files (the shards of one checkpoint).
    Safetensors(Vec<PathBuf>),
    /// A PyTorch zip archive holding a state dict.
    Pth(PthArchive),
}

/// A checkpoint on disk, with its tensor list read from the headers.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    path: PathBuf,
    container: Container,
    tensors: BTreeMap<String, TensorMeta>,
}

/// The largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100_000_000;

impl Checkpoint {
    /// Opens a checkpoint and reads its tensor list, choosing the container by the path: a
    /// folder, a `.json` index, a `.safetensors` file, or a `.pth` / `.pt` / `.bin` / `.ckpt`
    /// archive.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if !path.exists() {
            return Err(Error::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        }
        if path.is_dir() {
            return Self::open_folder(path);
        }
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("json") => Self::open_index(path),
            Some("safetensors") => Self::open_safetensors(path.clone(), vec![path]),
            Some("pth" | "pt" | "bin" | "ckpt") => Self::open_pth(path),
            _ => Err(checkpoint_error(
                &path,
                "unknown checkpoint container: expected .safetensors, a safetensors index \
                 (.json), a folder of shards, or a PyTorch .pth/.pt/.bin",
            )),
        }
    }

    /// The path the checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorMeta> {
        self.tensors.values()
    }

    /// The tensor called `name`, if the checkpoint holds one.
    pub fn get(&self, name: &str) -> Option<&TensorMeta> {
        self.tensors.get(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Rows `ids` of the 2-D tensor `name`, `[ids.len(), D]` in `dtype` on the CPU, read from
    /// the mapped file alone: an embedding lookup that does not read the whole table (umT5's
    /// is 2.1 GB in bf16 for a prompt's few hundred rows). An id past the table, a tensor of
    /// another rank or an int8 tensor is an error naming the key.
    pub fn rows(&self, name: &str, ids: &[u32], dtype: DType) -> Result<Tensor> {
        let error =
            |reason: String| checkpoint_error(&self.path, &format!("tensor `{name}`: {reason}"));
        // `None` for int8, whose bytes have no dtype candle converts.
        let gather = |bytes: &[u8], shape: &[usize], stored: Option<DType>| {
            let stored = stored.ok_or_else(|| error("int8 tables have no row lookup".into()))?;
            gather_rows(bytes, shape, stored, ids).map_err(error)
        };
        let rows = match &self.container {
            Container::Pth(archive) => {
                let (tensor, bytes) = archive.tensor_bytes(name)?;
                let stored = (tensor.stored != StoredDType::I8).then(|| tensor.stored.read_as());
                gather(bytes, &tensor.shape, stored)?
            }
            Container::Safetensors(files) => {
                // SAFETY: as in `var_builder`: mapped read-only, not rewritten while read.
                let mapped = unsafe { MmapedSafetensors::multi(files) }
                    .map_err(|e| checkpoint_error(&self.path, &e.to_string()))?;
                let view = mapped.get(name).map_err(|e| error(e.to_string()))?;
                let stored = match view.dtype() {
                    safetensors::Dtype::I8 => None,
                    other => Some(DType::try_from(other).map_err(|e| error(e.to_string()))?),
                };
                gather(view.data(), view.shape(), stored)?
            }
        };
        Ok(rows.to_dtype(dtype)?)
    }

    /// Checks that the checkpoint holds exactly the `expected` tensors with the expected
    /// shapes. Otherwise returns [`Error::CheckpointKeys`] listing every missing key, every
    /// unexpected key and every shape mismatch (with both shapes).
    pub fn expect_keys(&self, expected: &[(String, Vec<usize>)]) -> Result<()> {
        self.no_key_problems(key_problems(self.tensors(), expected))
    }

    /// `Ok` when `problems` is empty, else [`Error::CheckpointKeys`] naming the file.
    fn no_key_problems(&self, problems: Vec<KeyProblem>) -> Result<()> {
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::CheckpointKeys {
                path: self.path.clone(),
                problems: problems.into(),
            })
        }
    }

    /// [`Checkpoint::expect_keys`] for the part of a checkpoint under `prefix` (such as
    /// `visual.` of the released CLIP file, which also holds the text encoder Wan does not
    /// use): every `expected` key must be present with its shape, and every stored key under
    /// `prefix` must be expected; keys outside `prefix` are ignored.
    pub fn expect_keys_under(&self, prefix: &str, expected: &[(String, Vec<usize>)]) -> Result<()> {
        self.no_key_problems(key_problems_under(self.tensors(), prefix, expected))
    }

    /// A `VarBuilder` over the checkpoint's tensors, converting them to `dtype` on `device` as
    /// they are read. Both containers are memory-mapped (a `.pth` archive stores its entries
    /// uncompressed, so a tensor is one slice of the file). Int8 tensors can only be read as `U8` (their raw bytes); asking for
    /// them in another dtype is an error naming the key.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        let backend: Box<dyn SimpleBackend> = match &self.container {
            // SAFETY: the files are mapped read-only; like every mmap-based loader, this
            // relies on nobody truncating or rewriting them while the model is loaded.
            Container::Safetensors(files) => Box::new(SafetensorsBackend(unsafe {
                MmapedSafetensors::multi(files)
                    .map_err(|e| checkpoint_error(&self.path, &e.to_string()))?
            })),
            Container::Pth(archive) => Box::new(archive.clone()),
        };
        Ok(VarBuilder::from_backend(backend, dtype, device.clone()))
    }

    /// [`Checkpoint::expect_keys`], then [`Checkpoint::var_builder`].
    pub fn checked_var_builder(
        &self,
        expected: &[(String, Vec<usize>)],
        dtype: DType,
        device: &Device,
    ) -> Result<VarBuilder<'static>> {
        self.expect_keys(expected)?;
        self.var_builder(dtype, device)
    }

    fn open_folder(folder: PathBuf) -> Result<Self> {
        let mut indexes = Vec::new();
        let mut shards = Vec::new();
        let entries = std::fs::read_dir(&folder).map_err(|source| Error::Io {
            path: folder.clone(),
            source,
        })?;
        for entry in entries {
            let path = entry
                .map_err(|source| Error::Io {
                    path: folder.clone(),
                    source,
                })?
                .path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".safetensors.index.json") {
                indexes.push(path);
            } else if name.ends_with(".safetensors") {
                shards.push(path);
            }
        }
        match (indexes.len(), shards.is_empty()) {
            (1, _) => Self::open_index(indexes.remove(0)),
            (0, false) => {
                shards.sort();
                Self::open_safetensors(folder, shards)
            }
            (0, true) => Err(checkpoint_error(
                &folder,
                "the folder holds no .safetensors file and no .safetensors.index.json",
            )),
            _ => Err(checkpoint_error(
                &folder,
                "the folder holds several .safetensors.index.json files: open one of them",
            )),
        }
    }

    fn open_index(index: PathBuf) -> Result<Self> {
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| checkpoint_error(&index, &format!("the index is not JSON: {e}")))?;
        let weight_map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| checkpoint_error(&index, "the index has no `weight_map` object"))?;
        let folder = index.parent().unwrap_or(Path::new("."));
        let mut files = BTreeSet::new();
        for (name, file) in weight_map {
            let file = file.as_str().ok_or_else(|| {
                checkpoint_error(&index, &format!("`weight_map.{name}` is not a file name"))
            })?;
            files.insert(folder.join(file));
        }
        let checkpoint = Self::open_safetensors(index.clone(), files.into_iter().collect())?;
        let listed: BTreeSet<&str> = weight_map.keys().map(String::as_str).collect();
        let stored: BTreeSet<&str> = checkpoint.tensors.keys().map(String::as_str).collect();
        if let Some(name) = listed.symmetric_difference(&stored).next() {
            return Err(checkpoint_error(
                &index,
                &format!("`{name}` is in the index or in the shards, but not in both"),
            ));
        }
        Ok(checkpoint)
    }

    fn open_safetensors(path: PathBuf, files: Vec<PathBuf>) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for file in &files {
            for meta in read_safetensors_header(file)? {
                if tensors.contains_key(&meta.name) {
                    return Err(checkpoint_error(
                        file,
                        &format!("`{}` is stored in more than one shard", meta.name),
                    ));
                }
                tensors.insert(meta.name.clone(), meta);
            }
        }
        Ok(Self {
            path,
            container: Container::Safetensors(files),
            tensors,
        })
    }

    fn open_pth(path: PathBuf) -> Result<Self> {
        let archive = PthArchive::open(&path)?;
        let tensors = archive
            .tensors()
            .map(|tensor| {
                let meta = TensorMeta {
                    name: tensor.name.clone(),
                    shape: tensor.shape.clone(),
                    dtype: tensor.stored.name().to_owned(),
                };
                (meta.name.clone(), meta)
            })
            .collect();
        Ok(Self {
            path,
            container: Container::Pth(archive),
            tensors,
        })
    }
}

/// Checks a tensor read through a `VarBuilder` against the shape asked for: what every
/// `SimpleBackend::get` of this workspace does after `get_unchecked`.
pub fn check_shape(tensor: Tensor, name: &str, shape: Shape) -> candle_core::Result<Tensor> {
    if tensor.shape() != &shape {
        return Err(candle_core::Error::UnexpectedShape {
            msg: format!("shape mismatch for {name}"),
            expected: shape,
            got: tensor.shape().clone(),
        });
    }
    Ok(tensor)
}

/// Memory-mapped safetensors whose `I8` tensors (which candle cannot represent) are read as
/// their `U8` bytes.
struct SafetensorsBackend(MmapedSafetensors);

impl SimpleBackend for SafetensorsBackend {
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
        let view = self.0.get(name)?;
        let stored_int8 = view.dtype() == safetensors::Dtype::I8;
        let tensor = match read_as(view.dtype()) {
            Some(stored) => {
                turbo_core::upload::tensor_from_bytes(view.data(), stored, view.shape(), device)
                    .map_err(|e| candle_core::Error::Msg(format!("`{name}`: {e}")))?
            }
            None => self.0.load(name, device)?,
        };
        convert_stored(tensor, stored_int8, name, dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

/// The dtype a safetensors tensor of `stored` type is read into through
/// [`turbo_core::upload::tensor_from_bytes`] (int8 as its `U8` bytes); `None` for the types
/// left to candle's own reader.
fn read_as(stored: safetensors::Dtype) -> Option<DType> {
    match stored {
        safetensors::Dtype::I8 | safetensors::Dtype::U8 => Some(DType::U8),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::F32 => Some(DType::F32),
        _ => None,
    }
}

/// Reads the JSON header of a safetensors file (8-byte length, then the header) and nothing
/// else.
fn read_safetensors_header(path: &Path) -> Result<Vec<TensorMeta>> {
    let io_error = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io_error)?;
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(io_error)?;
    let length = u64::from_le_bytes(length);
    if length > MAX_HEADER_BYTES {
        return Err(checkpoint_error(
            path,
            &format!("header of {length} bytes: not a safetensors file"),
        ));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact(&mut header).map_err(io_error)?;
    let metadata: safetensors::tensor::Metadata = serde_json::from_slice(&header)
        .map_err(|e| checkpoint_error(path, &format!("bad safetensors header: {e}")))?;
    let file_length = file.metadata().map_err(io_error)?.len();
    let data_length = file_length.saturating_sub(8 + length);
    let tensors = metadata.tensors();
    for (name, info) in &tensors {
        check_safetensors_extent(name, info, data_length)
            .map_err(|reason| checkpoint_error(path, &reason))?;
    }
    // As the loader requires: the tensors fill the data exactly (no unread tail).
    let used = tensors
        .values()
        .map(|info| info.data_offsets.1 as u64)
        .max()
        .unwrap_or(0);
    if used != data_length {
        return Err(checkpoint_error(
            path,
            &format!("the tensors end at byte {used} of the data, which holds {data_length}"),
        ));
    }
    Ok(tensors
        .into_iter()
        .map(|(name, info)| TensorMeta {
            name,
            shape: info.shape.clone(),
            dtype: format!("{:?}", info.dtype),
        })
        .collect())
}

/// Checks that a tensor's byte range holds exactly its shape's bytes and lies inside the
/// `data_length` bytes after the header: a truncated file, or a header whose sizes overflow,
/// is refused when the checkpoint is opened instead of failing (or reading garbage) at load.
fn check_safetensors_extent(
    name: &str,
    info: &safetensors::tensor::TensorInfo,
    data_length: u64,
) -> std::result::Result<(), String> {
    let (start, end) = info.data_offsets;
    let bits = element_count(&info.shape)
        .and_then(|count| count.checked_mul(info.dtype.bitsize()))
        .ok_or_else(|| {
            format!(
                "`{name}`: the byte size of shape {:?} overflows",
                info.shape
            )
        })?;
    let needed = bits.div_ceil(8);
    if end < start || end - start != needed {
        return Err(format!(
            "`{name}`: offsets {start}..{end} do not hold the {needed} bytes of {:?} {:?}",
            info.dtype, info.shape
        ));
    }
    if end as u64 > data_length {
        return Err(format!(
            "`{name}` ends at byte {end} of the data but the file holds {data_length}: \
             the file is truncated"
        ));
    }
    Ok(())
}

/// The product of a shape's sides, `None` when it overflows.
pub(crate) fn element_count(shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(1usize, |count, &side| count.checked_mul(side))
}

/// The differences between the tensors of a file and the `expected` list, sorted by key.
pub fn key_problems<'a>(
    stored: impl IntoIterator<Item = &'a TensorMeta>,
    expected: &[(String, Vec<usize>)],
) -> Vec<KeyProblem> {
    let stored: BTreeMap<&str, &TensorMeta> = stored
        .into_iter()
        .map(|meta| (meta.name.as_str(), meta))
        .collect();
    let wanted: BTreeMap<&str, &Vec<usize>> = expected
        .iter()
        .map(|(name, shape)| (name.as_str(), shape))
        .collect();
    let mut problems = Vec::new();
    for (&key, &shape) in &wanted {
        match stored.get(key) {
            None => problems.push(KeyProblem::Missing {
                key: key.to_owned(),
                expected: shape.clone(),
            }),
            Some(meta) if &meta.shape != shape => problems.push(KeyProblem::WrongShape {
                key: key.to_owned(),
                expected: shape.clone(),
                got: meta.shape.clone(),
            }),
            Some(_) => {}
        }
    }
    for (&key, meta) in &stored {
        if !wanted.contains_key(key) {
            problems.push(KeyProblem::Unexpected {
                key: key.to_owned(),
                shape: meta.shape.clone(),
            });
        }
    }
    problems
}

/// [`key_problems`] restricted to the stored keys under `prefix`: a stored key outside it is
/// never a problem.
pub fn key_problems_under<'a>(
    stored: impl IntoIterator<Item = &'a TensorMeta>,
    prefix: &str,
    expected: &[(String, Vec<usize>)],
) -> Vec<KeyProblem> {
    key_problems(
        stored
            .into_iter()
            .filter(|meta| meta.name.starts_with(prefix)),
        expected,
    )
}

/// Rows `ids` of a row-major `[R, D]` tensor of `stored` elements held in `bytes`, as a CPU
/// tensor `[ids.len(), D]`.
fn gather_rows(
    bytes: &[u8],
    shape: &[usize],
    stored: DType,
    ids: &[u32],
) -> std::result::Result<Tensor, String> {
    let &[rows, width] = shape else {
        return Err(format!(
            "a row lookup needs a 2-D table, not shape {shape:?}"
        ));
    };
    let row_bytes = width * stored.size_in_bytes();
    if bytes.len() != rows * row_bytes {
        return Err(format!("{} bytes for shape {shape:?}", bytes.len()));
    }
    let mut gathered = Vec::with_capacity(ids.len() * row_bytes);
    for &id in ids {
        let id = id as usize;
        if id >= rows {
            return Err(format!("row {id} asked of a table of {rows} rows"));
        }
        gathered.extend_from_slice(&bytes[id * row_bytes..(id + 1) * row_bytes]);
    }
    Tensor::from_raw_buffer(&gathered, stored, &[ids.len(), width], &Device::Cpu)
        .map_err(|e| e.to_string())
}

fn checkpoint_error(path: &Path, reason: &str) -> Error {
    Error::Checkpoint {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    }
}
