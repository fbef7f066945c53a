//! Writes `.pth` files as `torch.save` does (the layout `scripts/make_pth_fixture.py` writes,
//! without Python): a stored zip archive with `archive/data.pkl` (a pickle-protocol-2 state
//! dict of `torch._utils._rebuild_tensor_v2` calls over persistent storage ids) and one
//! `archive/data/<key>` entry per tensor. Tests use it to build a fixture from the golden file
//! in use, so that they hold under any `TURBO_GOLDEN_DIR`.

#![allow(dead_code)] // each test crate uses its own subset

use std::io::Write;
use std::path::Path;

/// One tensor to write: its storage class (`FloatStorage`, `CharStorage`, …), shape and
/// little-endian bytes.
pub struct PthTensor {
    pub name: String,
    pub storage_class: &'static str,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl PthTensor {
    pub fn f32(name: &str, shape: &[usize], values: &[f32]) -> Self {
        Self {
            name: name.to_owned(),
            storage_class: "FloatStorage",
            shape: shape.to_vec(),
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    /// An int8 tensor from its raw two's-complement bytes.
    pub fn int8(name: &str, shape: &[usize], bytes: Vec<u8>) -> Self {
        Self {
            name: name.to_owned(),
            storage_class: "CharStorage",
            shape: shape.to_vec(),
            bytes,
        }
    }

    fn element_size(&self) -> usize {
        match self.storage_class {
            "CharStorage" | "ByteStorage" => 1,
            "HalfStorage" | "BFloat16Storage" => 2,
            "DoubleStorage" | "LongStorage" => 8,
            _ => 4,
        }
    }
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
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const NEWFALSE: u8 = 0x89;
    pub const STOP: u8 = b'.';
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

    fn int(&mut self, value: usize) -> &mut Self {
        self.op(op::BININT);
        let value = i32::try_from(value).expect("fixture sizes fit in an i32");
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }

    fn int_tuple(&mut self, values: &[usize]) -> &mut Self {
        self.op(op::MARK);
        values.iter().for_each(|&v| {
            self.int(v);
        });
        self.op(op::TUPLE)
    }

    /// `_rebuild_tensor_v2(storage, 0, shape, stride, False, {})`.
    fn tensor(&mut self, tensor: &PthTensor, key: &str) -> &mut Self {
        let numel = tensor.bytes.len() / tensor.element_size();
        self.global("torch._utils", "_rebuild_tensor_v2")
            .op(op::MARK);
        self.op(op::MARK)
            .text("storage")
            .global("torch", tensor.storage_class)
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

/// Writes `tensors` as a `torch.save` state dict at `path`.
pub fn write_pth(path: &Path, tensors: &[PthTensor]) {
    let mut pickle = Pickle::default();
    pickle.op(op::PROTO).op(2).op(op::EMPTY_DICT).op(op::MARK);
    for (index, tensor) in tensors.iter().enumerate() {
        pickle.text(&tensor.name).tensor(tensor, &index.to_string());
    }
    pickle.op(op::SETITEMS).op(op::STOP);

    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let options =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut entry = |name: &str, bytes: &[u8]| {
        zip.start_file(format!("archive/{name}"), options).unwrap();
        zip.write_all(bytes).unwrap();
    };
    entry("data.pkl", &pickle.0);
    entry("byteorder", b"little");
    for (index, tensor) in tensors.iter().enumerate() {
        entry(&format!("data/{index}"), &tensor.bytes);
    }
    entry("version", b"3\n");
    zip.finish().unwrap();
}

/// The committed `-quant` `.pth` fixture (written by `scripts/make_pth_fixture.py` from the
/// shipped `dit_t2v_sla` golden file) when the golden `weights` in use are the ones it was
/// written from; otherwise the same layout written from `weights` to `scratch`: block linears
/// as `int8_weight` (int8) + `scale` (f32 per 128×128 tile), everything else f32. Tests that
/// compare the fixture with the golden file then hold for any file of the schema.
pub fn quant_dit_fixture(
    weights: &std::collections::HashMap<String, candle_core::Tensor>,
    scratch: &Path,
) -> std::path::PathBuf {
    let committed = committed_quant_fixture();
    if written_from(&committed, weights) {
        return committed;
    }
    write_quant_dit(weights, scratch);
    scratch.to_owned()
}

/// The path of the committed `-quant` fixture.
pub fn committed_quant_fixture() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/pth/dit_t2v_sla-quant.pth")
}

/// Writes `weights` at `path` in the layout of a TurboDiffusion `-quant` release.
pub fn write_quant_dit(
    weights: &std::collections::HashMap<String, candle_core::Tensor>,
    path: &Path,
) {
    let mut tensors = Vec::new();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    for name in names {
        let tensor = &weights[name];
        let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        match turbo_models::wan::block_linear_of(name) {
            Some(layer) => {
                let int8 = turbo_quant::Int8Weight::quantize(tensor).unwrap();
                tensors.push(PthTensor::int8(
                    &format!("{layer}.int8_weight"),
                    tensor.dims(),
                    int8_bytes(&int8),
                ));
                let scale = int8.scale();
                tensors.push(PthTensor::f32(
                    &format!("{layer}.scale"),
                    scale.dims(),
                    &values(scale),
                ));
            }
            None => tensors.push(PthTensor::f32(name, tensor.dims(), &values(tensor))),
        }
    }
    write_pth(path, &tensors);
}

/// The raw two's-complement bytes of a quantised weight.
pub fn int8_bytes(int8: &turbo_quant::Int8Weight) -> Vec<u8> {
    int8.int8_weight()
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
}

/// Whether every float tensor of the `.pth` at `path` other than the int8 scales equals the
/// tensor of that name in `weights`, and every tensor of `weights` that stays float is there.
pub fn written_from(
    path: &Path,
    weights: &std::collections::HashMap<String, candle_core::Tensor>,
) -> bool {
    use turbo_models::pth::{PthArchive, StoredDType};
    let Ok(archive) = PthArchive::open(path) else {
        return false;
    };
    let float_keys = weights
        .keys()
        .filter(|name| turbo_models::wan::block_linear_of(name).is_none());
    let same = |name: &String| {
        let (Some(stored), Some(want)) = (archive.get(name), weights.get(name)) else {
            return false;
        };
        let Ok(got) = archive.read(name, &candle_core::Device::Cpu) else {
            return false;
        };
        let values = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        stored.stored == StoredDType::F32
            && got.dims() == want.dims()
            && values(&got) == values(want)
    };
    let no_extra = archive
        .tensors()
        .filter(|t| t.stored == StoredDType::F32 && !t.name.ends_with(".scale"))
        .all(|t| weights.contains_key(&t.name));
    no_extra && float_keys.into_iter().all(same)
}
