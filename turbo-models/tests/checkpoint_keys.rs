//! The loaders expect exactly the tensors of the real checkpoints (`spec/keys/*.tsv`, copied to
//! `tests/keys/`), checked without allocating a weight; and the checkpoint reader lists and
//! checks the keys of every container it opens.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use turbo_core::{Error, KeyProblem};
use turbo_models::checkpoint::{key_problems, Checkpoint, TensorMeta};
use turbo_models::umt5::{Umt5Config, Umt5Encoder};
use turbo_models::vae::{VaeConfig, WanVae};

/// Parses `name<TAB>[d0, d1, …]` lines.
fn read_key_list(name: &str) -> Vec<TensorMeta> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/keys")
        .join(name);
    std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (name, shape) = line.split_once('\t').unwrap();
            let shape = shape
                .trim()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse().unwrap())
                .collect();
            TensorMeta {
                name: name.to_owned(),
                shape,
                dtype: String::new(),
            }
        })
        .collect()
}

fn assert_same_keys(list: &str, expected: &[(String, Vec<usize>)]) {
    let stored = read_key_list(list);
    let problems = key_problems(&stored, expected);
    assert!(problems.is_empty(), "{list}: {problems:#?}");
    assert_eq!(stored.len(), expected.len(), "{list}: duplicate keys");
}

#[test]
fn umt5_loader_expects_the_released_keys() {
    assert_same_keys(
        "umt5.tsv",
        &Umt5Encoder::expected_keys(&Umt5Config::umt5_xxl()),
    );
}

#[test]
fn vae_loader_expects_the_released_keys() {
    assert_same_keys("wan21_vae.tsv", &WanVae::expected_keys(&VaeConfig::wan21()));
}

/// A fresh folder under the system temp dir for one test.
fn scratch_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turbo-models-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn save(path: &Path, tensors: &[(&str, &[usize])]) {
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(name, shape)| {
            let t = Tensor::zeros(*shape, DType::F32, &Device::Cpu).unwrap();
            (name.to_string(), t)
        })
        .collect();
    candle_core::safetensors::save(&map, path).unwrap();
}

fn expected(keys: &[(&str, &[usize])]) -> Vec<(String, Vec<usize>)> {
    keys.iter()
        .map(|(name, shape)| (name.to_string(), shape.to_vec()))
        .collect()
}

#[test]
fn single_file_lists_keys_and_reports_every_problem() {
    let dir = scratch_dir("single");
    let file = dir.join("model.safetensors");
    save(
        &file,
        &[("a.weight", &[2, 3]), ("b.bias", &[4]), ("extra", &[1])],
    );
    let checkpoint = Checkpoint::open(&file).unwrap();
    assert_eq!(checkpoint.len(), 3);
    assert_eq!(checkpoint.get("a.weight").unwrap().shape, vec![2, 3]);
    assert_eq!(checkpoint.get("a.weight").unwrap().dtype, "F32");

    let err = checkpoint
        .expect_keys(&expected(&[
            ("a.weight", &[3, 2]),
            ("b.bias", &[4]),
            ("c", &[5]),
        ]))
        .unwrap_err();
    let message = err.to_string();
    match err {
        Error::CheckpointKeys { path, problems } => {
            assert_eq!(path, file);
            assert_eq!(
                problems,
                vec![
                    KeyProblem::WrongShape {
                        key: "a.weight".into(),
                        expected: vec![3, 2],
                        got: vec![2, 3]
                    },
                    KeyProblem::Missing {
                        key: "c".into(),
                        expected: vec![5]
                    },
                    KeyProblem::Unexpected {
                        key: "extra".into(),
                        shape: vec![1]
                    },
                ]
            );
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(
        message.contains("model.safetensors") && message.contains("a.weight"),
        "{message}"
    );

    checkpoint
        .expect_keys(&expected(&[
            ("a.weight", &[2, 3]),
            ("b.bias", &[4]),
            ("extra", &[1]),
        ]))
        .unwrap();
    let vb = checkpoint.var_builder(DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vb.get((2, 3), "a.weight").unwrap().dims(), &[2, 3]);
}

#[test]
fn sharded_checkpoint_opens_from_index_or_folder() {
    let dir = scratch_dir("sharded");
    save(
        &dir.join("model-00001-of-00002.safetensors"),
        &[("a", &[2])],
    );
    save(
        &dir.join("model-00002-of-00002.safetensors"),
        &[("b", &[3, 1])],
    );
    let index = dir.join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let keys = expected(&[("a", &[2]), ("b", &[3, 1])]);
    for path in [&index, &dir] {
        let checkpoint = Checkpoint::open(path).unwrap();
        checkpoint.expect_keys(&keys).unwrap();
        let vb = checkpoint.var_builder(DType::F32, &Device::Cpu).unwrap();
        assert_eq!(vb.get((3, 1), "b").unwrap().dims(), &[3, 1]);
    }
}

#[test]
fn unreadable_checkpoints_are_typed_errors() {
    let dir = scratch_dir("bad");
    assert!(matches!(
        Checkpoint::open(dir.join("missing.safetensors")),
        Err(Error::Io { .. })
    ));
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"\x05\x00\x00\x00\x00\x00\x00\x00{oops").unwrap();
    assert!(matches!(
        Checkpoint::open(&garbage),
        Err(Error::Checkpoint { .. })
    ));
    let pth = dir.join("garbage.pth");
    std::fs::write(&pth, b"not a zip archive").unwrap();
    assert!(matches!(
        Checkpoint::open(&pth),
        Err(Error::Checkpoint { .. })
    ));
    let unknown = dir.join("weights.onnx");
    std::fs::write(&unknown, b"").unwrap();
    assert!(matches!(
        Checkpoint::open(&unknown),
        Err(Error::Checkpoint { .. })
    ));
    assert!(matches!(
        Checkpoint::open(&dir),
        Err(Error::Checkpoint { .. })
    ));
}

/// `tests/fixtures/tiny.pth` is written by `make_tiny_pth.py` in the same folder (in PyTorch's
/// zip format, without torch).
#[test]
fn pth_state_dicts_list_keys_and_load() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.pth");
    let checkpoint = Checkpoint::open(&path).unwrap();
    let metas: Vec<(&str, &[usize], &str)> = checkpoint
        .tensors()
        .map(|m| (m.name.as_str(), m.shape.as_slice(), m.dtype.as_str()))
        .collect();
    assert_eq!(
        metas,
        vec![
            ("a.weight", &[2usize, 3][..], "F32"),
            ("b.bias", &[4][..], "BF16"),
            ("c.view", &[2][..], "F32"),
            ("d.int8", &[2, 2][..], "I8"),
        ]
    );
    let keys = [
        ("a.weight", &[2usize, 3][..]),
        ("b.bias", &[4]),
        ("c.view", &[2]),
        ("d.int8", &[2, 2]),
    ];
    checkpoint.expect_keys(&expected(&keys)).unwrap();
    let mut wrong = keys;
    wrong[0].1 = &[3, 2];
    let err = checkpoint
        .expect_keys(&expected(&wrong))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tiny.pth") && err.contains("a.weight") && err.contains("[3, 2]"),
        "{err}"
    );

    let vb = checkpoint.var_builder(DType::F32, &Device::Cpu).unwrap();
    let values = |name: &str, dims: &[usize]| {
        vb.get(dims, name)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(values("a.weight", &[2, 3]), vec![0., 1., 2., 3., 4., 5.]);
    assert_eq!(values("b.bias", &[4]), vec![1.0, -2.0, 0.5, 3.0]);
    assert_eq!(values("c.view", &[2]), vec![2., 3.]);

    // Int8 comes out as its raw bytes; read as a float tensor, it is a clear error.
    let bytes_vb = checkpoint.var_builder(DType::U8, &Device::Cpu).unwrap();
    let int8 = bytes_vb.get((2, 2), "d.int8").unwrap();
    assert_eq!(
        int8.to_vec2::<u8>().unwrap(),
        vec![vec![128, 255], vec![0, 127]]
    );
    let err = vb.get((2, 2), "d.int8").unwrap_err().to_string();
    assert!(err.contains("d.int8") && err.contains("int8"), "{err}");
}

#[test]
fn int8_safetensors_are_read_as_bytes() {
    use safetensors::tensor::{Dtype, TensorView};
    let dir = scratch_dir("int8");
    let file = dir.join("quant.safetensors");
    let int8: Vec<u8> = [-3i8, 7, -128, 127, 0, 1]
        .iter()
        .map(|&v| v as u8)
        .collect();
    let scale: Vec<u8> = [0.5f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = [
        (
            "w.int8_weight",
            TensorView::new(Dtype::I8, vec![2, 3], &int8).unwrap(),
        ),
        (
            "w.scale",
            TensorView::new(Dtype::F32, vec![1, 2], &scale).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let checkpoint = Checkpoint::open(&file).unwrap();
    assert_eq!(checkpoint.get("w.int8_weight").unwrap().dtype, "I8");
    let bytes = checkpoint
        .var_builder(DType::U8, &Device::Cpu)
        .unwrap()
        .get((2, 3), "w.int8_weight")
        .unwrap();
    assert_eq!(bytes.flatten_all().unwrap().to_vec1::<u8>().unwrap(), int8);
    let scales = checkpoint
        .var_builder(DType::F32, &Device::Cpu)
        .unwrap()
        .get((1, 2), "w.scale")
        .unwrap();
    assert_eq!(
        scales.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.5, 2.0]
    );
}

/// A row lookup returns the table's rows in order (repeats included) from a `.pth` and from a
/// safetensors file, and names the key in its errors.
#[test]
fn row_lookups_read_only_the_asked_rows() {
    use turbo_models::pth::StoredDType;
    use turbo_models::pth_writer::{write_pth, PthEntry};

    let dir = scratch_dir("rows");
    let (vocab, dim) = (37, 6);
    let table = Tensor::randn(0f32, 1.0, (vocab, dim), &Device::Cpu).unwrap();
    let values = table.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let pth = dir.join("table.pth");
    let entries = [
        PthEntry {
            name: "token_embedding.weight".into(),
            stored: StoredDType::F32,
            shape: vec![vocab, dim],
        },
        PthEntry {
            name: "flat".into(),
            stored: StoredDType::F32,
            shape: vec![4],
        },
    ];
    write_pth(&pth, &entries, |entry| {
        Ok(match entry.name.as_str() {
            "flat" => vec![0u8; 16],
            _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        })
    })
    .unwrap();
    let safetensors = dir.join("table.safetensors");
    let map =
        std::collections::HashMap::from([("token_embedding.weight".to_owned(), table.clone())]);
    candle_core::safetensors::save(&map, &safetensors).unwrap();

    let ids = [5u32, 0, 36, 5, 17];
    let expected = table
        .index_select(&Tensor::new(&ids[..], &Device::Cpu).unwrap(), 0)
        .unwrap();
    for path in [&pth, &safetensors] {
        let checkpoint = Checkpoint::open(path).unwrap();
        let rows = checkpoint
            .rows("token_embedding.weight", &ids, DType::F32)
            .unwrap();
        assert_eq!(rows.dims(), &[ids.len(), dim]);
        let difference = common::max_abs_diff(&rows, &expected);
        assert_eq!(difference, 0.0, "{}", path.display());
        let err = checkpoint
            .rows("token_embedding.weight", &[3, 37], DType::F32)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("token_embedding.weight") && err.contains("37"),
            "{err}"
        );
    }
    let tiny = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny.pth");
    for (path, name, reason) in [(&pth, "flat", "2-D"), (&tiny, "d.int8", "int8")] {
        let err = Checkpoint::open(path)
            .unwrap()
            .rows(name, &[0], DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains(name) && err.contains(reason), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
