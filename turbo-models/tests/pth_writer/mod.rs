//! Writes `.pth` files as `torch.save` does (the layout `scripts/make_pth_fixture.py` writes,
//! without Python): a stored zip archive with `archive/data.pkl` (a pickle-protocol-2 state
//! dict of `torch._utils._rebuild_tensor_v2` calls over persistent storage ids) and one
//! `archive/data/<key>` entry per tensor. Tests use it to build a fixture from the golden file
//! in use, so that they hold under any `TURBO_GOLDEN_DIR`.

#![allow(dead_code)] // each test crate uses its own subset

use std::path::Path;

use turbo_models::pth::StoredDType;
use turbo_models::pth_writer::PthEntry;

/// One tensor to write: its stored type, shape and little-endian bytes.
pub struct PthTensor {
    pub entry: PthEntry,
    pub bytes: Vec<u8>,
}

impl PthTensor {
    pub fn f32(name: &str, shape: &[usize], values: &[f32]) -> Self {
        Self::new(
            name,
            StoredDType::F32,
            shape,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// An int8 tensor from its raw two's-complement bytes.
    pub fn int8(name: &str, shape: &[usize], bytes: Vec<u8>) -> Self {
        Self::new(name, StoredDType::I8, shape, bytes)
    }

    fn new(name: &str, stored: StoredDType, shape: &[usize], bytes: Vec<u8>) -> Self {
        let entry = PthEntry {
            name: name.to_owned(),
            stored,
            shape: shape.to_vec(),
        };
        Self { entry, bytes }
    }
}

/// Writes `tensors` as a `torch.save` state dict at `path` (the library's writer).
pub fn write_pth(path: &Path, tensors: &[PthTensor]) {
    let entries: Vec<PthEntry> = tensors.iter().map(|t| t.entry.clone()).collect();
    let mut bytes = tensors.iter().map(|t| t.bytes.clone());
    turbo_models::pth_writer::write_pth(path, &entries, |_| {
        Ok(bytes.next().expect("one byte buffer per entry"))
    })
    .unwrap();
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
