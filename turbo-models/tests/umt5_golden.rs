//! Parity of the umT5 encoder with the `umt5` golden file (upstream `T5Encoder` in f32). Every
//! dimension is read from the file's `config` and tensors.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use turbo_core::golden::GoldenFile;
use turbo_models::umt5::{StreamingUmt5Encoder, Umt5Config, Umt5Encoder};

fn relative_error(out: &Tensor, reference: &Tensor) -> f64 {
    turbo_core::golden::relative_error(out, reference).unwrap()
}

fn load() -> (GoldenFile, Umt5Encoder) {
    let file = GoldenFile::open("umt5").unwrap();
    let cfg = golden_config(&file);
    let encoder = Umt5Encoder::load(golden_weights(&file), &cfg).unwrap();
    (file, encoder)
}

/// The values of an integer tensor of the file, flattened.
fn golden_i64s(file: &GoldenFile, name: &str) -> Vec<i64> {
    let tensor = file.tensor(name).unwrap();
    tensor.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

fn golden_weights(file: &GoldenFile) -> VarBuilder<'static> {
    VarBuilder::from_tensors(file.weights().unwrap(), DType::F32, &Device::Cpu)
}

fn golden_config(file: &GoldenFile) -> Umt5Config {
    let number = |key: &str| file.config_f64(&[key]).unwrap() as usize;
    assert_eq!(file.config()["shared_pos"], serde_json::Value::Bool(false));
    let defaults = Umt5Config::umt5_xxl();
    Umt5Config {
        vocab: number("vocab"),
        dim: number("dim"),
        dim_attn: number("dim_attn"),
        dim_ffn: number("dim_ffn"),
        num_heads: number("num_heads"),
        num_layers: number("num_layers"),
        num_buckets: number("num_buckets"),
        // Upstream's constructor default; the file records it only if it differs.
        max_distance: file
            .config_f64(&["max_distance"])
            .map_or(defaults.max_distance, |v| v as usize),
        eps: defaults.eps,
    }
}

#[test]
fn masked_hidden_states_match_golden() {
    let (file, encoder) = load();
    let ids = file.tensor("in.ids").unwrap();
    let mask = file.tensor("in.mask").unwrap();
    let out = encoder.forward(&ids, Some(&mask)).unwrap();
    let expected = file.tensor("out.hidden").unwrap();
    assert_eq!(out.dims(), expected.dims());
    // Padded rows are computed upstream too; the pipeline drops them, so compare the real ones.
    let real = mask
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as usize;
    let err = relative_error(
        &out.narrow(1, 0, real).unwrap(),
        &expected.narrow(1, 0, real).unwrap(),
    );
    println!("umt5 relative error over {real} real tokens: {err:.3e}");
    assert!(err <= 1e-4, "umt5 relative error {err}");
    let err_all = relative_error(&out, &expected);
    println!("umt5 relative error over all rows: {err_all:.3e}");
    assert!(err_all <= 1e-4, "umt5 relative error (all rows) {err_all}");
}

#[test]
fn unpadded_ids_give_the_trimmed_rows() {
    let (file, encoder) = load();
    let mask = golden_i64s(&file, "in.mask");
    let real: Vec<u32> = golden_i64s(&file, "in.ids")
        .iter()
        .zip(&mask)
        .filter(|(_, &m)| m != 0)
        .map(|(&id, _)| id as u32)
        .collect();
    let trimmed = encoder.encode_ids(&real).unwrap();
    let expected = file
        .tensor("out.hidden")
        .unwrap()
        .squeeze(0)
        .unwrap()
        .narrow(0, 0, real.len())
        .unwrap();
    let err = relative_error(&trimmed, &expected);
    assert!(err <= 1e-4, "trimmed relative error {err}");
}

#[test]
fn loader_keys_are_the_golden_weights() {
    let (file, encoder) = load();
    common::assert_golden_holds_exactly(&file, &Umt5Encoder::expected_keys(encoder.config()));
}

/// The whole file path: the golden weights written as a checkpoint of their own, opened,
/// checked against the configuration's key list and loaded by `from_checkpoint`.
#[test]
fn from_checkpoint_loads_a_weights_file() {
    let (file, encoder) = load();
    let weights = file.weights().unwrap();
    let dir = std::env::temp_dir().join(format!("turbo-models-umt5-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("umt5.safetensors");
    candle_core::safetensors::save(&weights, &path).unwrap();
    let loaded =
        Umt5Encoder::from_checkpoint(&path, encoder.config(), DType::F32, &Device::Cpu).unwrap();
    let ids = file.tensor("in.ids").unwrap();
    let mask = file.tensor("in.mask").unwrap();
    let err = relative_error(
        &loaded.forward(&ids, Some(&mask)).unwrap(),
        &file.tensor("out.hidden").unwrap(),
    );
    assert!(err <= 1e-4, "relative error {err}");

    // A configuration that does not fit the file is refused before any weight is read.
    let mut wider = encoder.config().clone();
    wider.dim_ffn *= 2;
    match Umt5Encoder::from_checkpoint(&path, &wider, DType::F32, &Device::Cpu) {
        Err(turbo_core::Error::CheckpointKeys {
            path: reported,
            problems,
        }) => {
            assert_eq!(reported, path);
            assert_eq!(problems.len(), 3 * wider.num_layers);
        }
        other => panic!("expected a key mismatch, got {:?}", other.map(|_| ())),
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The encoder that reads one block at a time computes what the whole model does, on the
/// padded, masked batch and on the trimmed prompt, and drops its weights after the embedding,
/// after every block and after the final norm.
#[test]
fn streamed_encoder_equals_the_whole_model() {
    let (file, encoder) = load();
    let streamed = StreamingUmt5Encoder::new(golden_weights(&file), encoder.config()).unwrap();
    let ids = file.tensor("in.ids").unwrap();
    let mask = file.tensor("in.mask").unwrap();
    let mut drops = 0;
    let out = streamed
        .forward_observed(&ids, Some(&mask), &mut || drops += 1)
        .unwrap();
    let whole = encoder.forward(&ids, Some(&mask)).unwrap();
    let err = relative_error(&out, &whole);
    println!("streamed vs whole umt5 relative error: {err:.3e}");
    assert!(err <= 1e-6, "streamed relative error {err}");
    assert_eq!(drops, encoder.config().num_layers + 2);

    let real: Vec<u32> = golden_i64s(&file, "in.ids")
        .iter()
        .take(3)
        .map(|&id| id as u32)
        .collect();
    let err = relative_error(
        &streamed.encode_ids(&real).unwrap(),
        &encoder.encode_ids(&real).unwrap(),
    );
    assert!(err <= 1e-6, "streamed trimmed relative error {err}");

    // Two batches through one read of the weights: each as its own forward.
    let short = Tensor::from_slice(&real, (1, real.len()), &Device::Cpu).unwrap();
    let mut drops = 0;
    let both = streamed
        .forward_many_observed(&[(&ids, Some(&mask)), (&short, None)], &mut || drops += 1)
        .unwrap();
    assert_eq!(drops, encoder.config().num_layers + 2);
    assert!(relative_error(&both[0], &whole) <= 1e-6);
    let alone = encoder.forward(&short, None).unwrap();
    assert!(relative_error(&both[1], &alone) <= 1e-6);
}

/// With its embedding rows read from a checkpoint file (the pipeline's path for a file), the
/// streamed encoder still computes what the whole model does.
#[test]
fn streamed_encoder_with_row_lookups_equals_the_whole_model() {
    let (file, encoder) = load();
    let dir = std::env::temp_dir().join(format!("turbo-models-umt5-rows-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("umt5.safetensors");
    candle_core::safetensors::save(&file.weights().unwrap(), &path).unwrap();
    let checkpoint = turbo_models::Checkpoint::open(&path).unwrap();
    let streamed = StreamingUmt5Encoder::new(golden_weights(&file), encoder.config())
        .unwrap()
        .with_embedding_rows(move |ids| {
            checkpoint.rows(turbo_models::TOKEN_EMBEDDING_KEY, ids, DType::F32)
        });
    let ids = file.tensor("in.ids").unwrap();
    let mask = file.tensor("in.mask").unwrap();
    let out = streamed.forward(&ids, Some(&mask)).unwrap();
    let whole = encoder.forward(&ids, Some(&mask)).unwrap();
    let err = relative_error(&out, &whole);
    assert!(
        err <= 1e-6,
        "streamed with row lookups: relative error {err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
