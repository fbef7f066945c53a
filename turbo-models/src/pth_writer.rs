//! Writes `.pth` state dicts as `torch.save` does: a stored (uncompressed) zip archive with
//! `archive/data.pkl`, a pickle-protocol-2 dict of `torch._utils._rebuild_tensor_v2` calls over
//! persistent storage ids, and one `archive/data/<id>` entry per tensor — the layout
//! [`crate::pth::PthArchive`] reads and the released Wan and TurboDiffusion files have.
//!
//! The tensors' bytes are asked for one at a time, so a checkpoint of any size is written with
//! one tensor in memory. The file appears at its path only once complete.

use std::io::Write;
use std::path::Path;

use turbo_core::{Error, Result};

use crate::pth::StoredDType;

/// What the pickle says of one tensor: its key, stored type and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PthEntry {
    pub name: String,
    pub stored: StoredDType,
    pub shape: Vec<usize>,
}

impl PthEntry {
    /// Bytes of its storage.
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.stored.size_in_bytes()
    }
}

/// Writes `entries` as a `torch.save` state dict at `path`, each tensor's little-endian bytes
/// from `bytes` (called once per entry, in order). A wrong byte count is an error naming the
/// tensor; on any error no file is left.
pub fn write_pth(
    path: &Path,
    entries: &[PthEntry],
    mut bytes: impl FnMut(&PthEntry) -> Result<Vec<u8>>,
) -> Result<()> {
    let io_error = |source: std::io::Error| Error::Io {
        path: path.to_owned(),
        source,
    };
    let zip_error = |e: zip::result::ZipError| io_error(std::io::Error::other(e));
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let temp = tempfile::NamedTempFile::new_in(folder).map_err(io_error)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(temp));
    let entry = |zip: &mut zip::ZipWriter<_>, name: &str, data: &[u8]| -> Result<()> {
        // Stored, as torch writes it; an entry over 4 GiB needs the zip64 extensions.
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(data.len() as u64 > u64::from(u32::MAX));
        zip.start_file(format!("archive/{name}"), options)
            .map_err(zip_error)?;
        zip.write_all(data).map_err(io_error)
    };
    entry(&mut zip, "data.pkl", &state_dict_pickle(entries)?)?;
    entry(&mut zip, "byteorder", b"little")?;
    for (index, tensor) in entries.iter().enumerate() {
        let data = bytes(tensor)?;
        if data.len() != tensor.byte_len() {
            return Err(Error::Shape {
                what: format!("bytes of tensor {} for {}", tensor.name, path.display()),
                expected: format!("{} bytes", tensor.byte_len()),
                got: vec![data.len()],
            });
        }
        entry(&mut zip, &format!("data/{index}"), &data)?;
    }
    entry(&mut zip, "version", b"3\n")?;
    let temp = zip
        .finish()
        .map_err(zip_error)?
        .into_inner()
        .map_err(|e| io_error(e.into_error()))?;
    temp.as_file().sync_all().map_err(io_error)?;
    temp.persist(path).map_err(|e| io_error(e.error))?;
    Ok(())
}

/// The pickle opcodes used (protocol 2).
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const EMPTY_DICT: u8 = b'}';
    pub const MARK: u8 = b'(';
    pub const SETITEMS: u8 = b'u';
    pub const TUPLE: u8 = b't';
    pub const BINUNICODE: u8 = b'X';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const NEWFALSE: u8 = 0x89;
    pub const STOP: u8 = b'.';
}

/// The state dict's pickle: `{name: _rebuild_tensor_v2(storage, 0, shape, stride, False, {})}`
/// with storage `i` the persistent id of entry `data/i`.
fn state_dict_pickle(entries: &[PthEntry]) -> Result<Vec<u8>> {
    let mut pickle = Pickle::default();
    pickle.op(op::PROTO).op(2).op(op::EMPTY_DICT).op(op::MARK);
    for (index, tensor) in entries.iter().enumerate() {
        pickle.text(&tensor.name);
        pickle.tensor(tensor, &index.to_string());
    }
    pickle.op(op::SETITEMS).op(op::STOP);
    Ok(pickle.0)
}

#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, op: u8) -> &mut Self {
        self.0.push(op);
        self
    }

    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(op::GLOBAL);
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
        self
    }

    fn text(&mut self, text: &str) -> &mut Self {
        self.op(op::BINUNICODE);
        self.0.extend_from_slice(&(text.len() as u32).to_le_bytes());
        self.0.extend_from_slice(text.as_bytes());
        self
    }

    /// An integer: `BININT` when it fits in an i32, else `LONG1` (as pickle writes big ints).
    fn int(&mut self, value: usize) -> &mut Self {
        match i32::try_from(value) {
            Ok(small) => {
                self.op(op::BININT);
                self.0.extend_from_slice(&small.to_le_bytes());
            }
            Err(_) => {
                self.op(op::LONG1).op(8);
                self.0.extend_from_slice(&(value as u64).to_le_bytes());
            }
        }
        self
    }

    fn int_tuple(&mut self, values: &[usize]) -> &mut Self {
        self.op(op::MARK);
        for &value in values {
            self.int(value);
        }
        self.op(op::TUPLE)
    }

    /// `_rebuild_tensor_v2(storage, 0, shape, stride, False, {})`.
    fn tensor(&mut self, tensor: &PthEntry, key: &str) -> &mut Self {
        let numel = tensor.shape.iter().product();
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(op::MARK);
        self.op(op::MARK)
            .text("storage")
            .global("torch", tensor.stored.storage_class())
            .text(key)
            .text("cpu")
            .int(numel)
            .op(op::TUPLE)
            .op(op::BINPERSID);
        self.int(0)
            .int_tuple(&tensor.shape)
            .int_tuple(&row_major_stride(&tensor.shape))
            .op(op::NEWFALSE)
            .op(op::EMPTY_DICT)
            .op(op::TUPLE)
            .op(op::REDUCE)
    }
}

fn row_major_stride(shape: &[usize]) -> Vec<usize> {
    let mut stride = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        stride[i] = stride[i + 1] * shape[i + 1];
    }
    stride
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::pth::PthArchive;

    fn entry(name: &str, stored: StoredDType, shape: &[usize]) -> PthEntry {
        PthEntry {
            name: name.to_owned(),
            stored,
            shape: shape.to_vec(),
        }
    }

    /// What is written reads back through the archive reader, type, shape and bytes.
    #[test]
    fn written_tensors_read_back() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.pth");
        let entries = [
            entry("blocks.0.weight", StoredDType::BF16, &[2, 3]),
            entry("blocks.0.int8_weight", StoredDType::I8, &[4]),
            entry("scale", StoredDType::F32, &[1]),
        ];
        let payload = |e: &PthEntry| -> Vec<u8> {
            let salt = e.name.len();
            (0..e.byte_len()).map(|i| (i * 7 + salt) as u8).collect()
        };
        write_pth(&path, &entries, |e| Ok(payload(e)))?;
        let archive = PthArchive::open(&path)?;
        for e in &entries {
            let stored = archive
                .get(&e.name)
                .expect("every tensor is in the archive");
            assert_eq!((stored.stored, &stored.shape), (e.stored, &e.shape));
            let read = archive.read(&e.name, &Device::Cpu)?;
            let bytes: Vec<u8> = match e.stored {
                StoredDType::BF16 => read
                    .flatten_all()?
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                StoredDType::F32 => read
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                _ => read.flatten_all()?.to_vec1::<u8>()?,
            };
            assert_eq!(bytes, payload(e), "{}", e.name);
        }
        Ok(())
    }

    /// A tensor given the wrong number of bytes fails naming it, and no file is left.
    #[test]
    fn a_wrong_byte_count_names_the_tensor_and_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.pth");
        let entries = [entry("head.weight", StoredDType::F32, &[3])];
        let error = write_pth(&path, &entries, |_| Ok(vec![0; 11])).unwrap_err();
        assert!(error.to_string().contains("head.weight"), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
