//! The `.pth` reader on fixtures written by `scripts/make_pth_fixture.py` (the `torch.save`
//! layout, without torch): every storage type reads back exactly, int8 arrives as its `U8`
//! bytes, and what cannot be read is an error naming the key.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use half::bf16;
use turbo_models::pth::{PthArchive, StoredDType};
use turbo_models::Checkpoint;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../fixtures/pth/{name}"))
}

fn read(archive: &PthArchive, name: &str) -> Tensor {
    archive.read(name, &Device::Cpu).unwrap()
}

#[test]
fn every_storage_type_reads_back_exactly() {
    let archive = PthArchive::open(fixture("tensors.pth")).unwrap();

    let float32 = read(&archive, "float32");
    assert_eq!(float32.dims(), &[2, 3]);
    let want: Vec<f32> = (0..6).map(|i| i as f32 * 0.25 - 1.0).collect();
    assert_eq!(
        float32.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        want
    );

    let bfloat16 = read(&archive, "bfloat16");
    assert_eq!(bfloat16.dtype(), DType::BF16);
    let want: Vec<bf16> = [1.0, -2.5, 0.15625, 3072.0].map(bf16::from_f32).to_vec();
    assert_eq!(bfloat16.to_vec1::<bf16>().unwrap(), want);

    let int8 = read(&archive, "int8");
    assert_eq!((int8.dtype(), int8.dims()), (DType::U8, &[3, 2][..]));
    let values: Vec<i8> = int8
        .flatten_all()
        .unwrap()
        .to_vec1::<u8>()
        .unwrap()
        .into_iter()
        .map(|b| b as i8)
        .collect();
    assert_eq!(values, [-128, -1, 0, 1, 127, 42]);

    assert_eq!(
        read(&archive, "float64").to_vec1::<f64>().unwrap(),
        [0.1, -0.2]
    );
    assert_eq!(
        read(&archive, "int64").to_vec1::<i64>().unwrap(),
        [-(1i64 << 40), 7]
    );
    assert_eq!(
        read(&archive, "param").to_vec2::<f32>().unwrap(),
        [[3.0, -4.0]]
    );
    assert_eq!(
        read(&archive, "subclass").to_vec1::<f32>().unwrap(),
        [5.0, 6.0]
    );
}

#[test]
fn views_into_one_storage_start_at_their_offset() {
    let archive = PthArchive::open(fixture("tensors.pth")).unwrap();
    let head = read(&archive, "view_head").to_vec2::<f32>().unwrap();
    let tail = read(&archive, "view_tail").to_vec2::<f32>().unwrap();
    assert_eq!(head, [[0.0, 0.5], [1.0, 1.5]]);
    assert_eq!(tail, [[2.0, 2.5], [3.0, 3.5], [4.0, 4.5]]);
}

#[test]
fn listing_reports_stored_dtypes_and_skips_non_tensors() {
    let archive = PthArchive::open(fixture("tensors.pth")).unwrap();
    let stored: Vec<(&str, StoredDType)> = archive
        .tensors()
        .map(|t| (t.name.as_str(), t.stored))
        .collect();
    assert_eq!(
        stored,
        [
            ("bfloat16", StoredDType::BF16),
            ("float32", StoredDType::F32),
            ("float64", StoredDType::F64),
            ("int64", StoredDType::I64),
            ("int8", StoredDType::I8),
            ("param", StoredDType::F32),
            ("subclass", StoredDType::F32),
            ("view_head", StoredDType::F32),
            ("view_tail", StoredDType::F32),
        ]
    );
    let checkpoint = Checkpoint::open(fixture("tensors.pth")).unwrap();
    let int8 = checkpoint.get("int8").unwrap();
    assert_eq!(
        (int8.dtype.as_str(), int8.shape.as_slice()),
        ("I8", &[3, 2][..])
    );
    assert_eq!(checkpoint.get("bfloat16").unwrap().dtype, "BF16");
    assert!(checkpoint.get("step").is_none() && checkpoint.get("_metadata").is_none());
}

#[test]
fn var_builder_gives_int8_as_bytes_and_floats_in_any_dtype() {
    let checkpoint = Checkpoint::open(fixture("tensors.pth")).unwrap();
    let vb = checkpoint.var_builder(DType::F32, &Device::Cpu).unwrap();
    let bytes = vb.get_with_hints_dtype((3, 2), "int8", Default::default(), DType::U8);
    assert_eq!(
        bytes
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap(),
        [128, 255, 0, 1, 127, 42]
    );
    let err = vb.get((3, 2), "int8").unwrap_err().to_string();
    assert!(err.contains("int8") && err.contains("U8"), "{err}");
    let upcast = vb.get(4, "bfloat16").unwrap();
    assert_eq!(
        upcast.to_vec1::<f32>().unwrap(),
        [1.0, -2.5, 0.15625, 3072.0]
    );
    let err = vb.get((3, 3), "float32").unwrap_err().to_string();
    assert!(err.contains("float32"), "{err}");
}

#[test]
fn non_contiguous_tensors_are_refused_by_name() {
    let err = Checkpoint::open(fixture("noncontiguous.pth"))
        .unwrap_err()
        .to_string();
    for needle in ["noncontiguous.pth", "`transposed`", "non-contiguous"] {
        assert!(err.contains(needle), "{needle} not in: {err}");
    }
}
