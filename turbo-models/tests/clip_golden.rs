//! Parity of the CLIP vision encoder, preprocessing included, with the `clip` golden file
//! (upstream `VisionTransformer(use_31_block=True)` after `CLIPModel.visual`'s resize, in f32);
//! and its key list against the golden file and the released checkpoint's
//! (`fixtures/keys/clip.tsv`). Every dimension is read from the file's `config` and tensors.

mod common;
mod pth_writer;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{key_list, KeyShapes};
use pth_writer::{write_pth, PthTensor};
use turbo_core::golden::GoldenFile;
use turbo_core::Error;
use turbo_models::clip::{ClipConfig, ClipVisionEncoder};

fn golden_config(file: &GoldenFile) -> ClipConfig {
    ClipConfig::from_value(file.config()).unwrap()
}

fn load() -> (GoldenFile, ClipVisionEncoder) {
    let file = GoldenFile::open("clip").unwrap();
    let cfg = golden_config(&file);
    let vb = VarBuilder::from_tensors(file.weights().unwrap(), DType::F32, &Device::Cpu);
    let encoder = ClipVisionEncoder::load(vb, &cfg).unwrap();
    (file, encoder)
}

fn as_map(keys: Vec<(String, Vec<usize>)>) -> KeyShapes {
    keys.into_iter().collect()
}

#[test]
fn features_match_golden() {
    let (file, encoder) = load();
    let image = file.tensor("in.image").unwrap();
    let expected = file.tensor("out.features").unwrap();
    let out = encoder.encode_image(&image).unwrap();
    assert_eq!(out.dims(), expected.dims());
    let err = turbo_core::golden::relative_error(&out, &expected).unwrap();
    println!("clip relative error: {err:.3e}");
    assert!(err <= 1e-4, "clip relative error {err}");
}

#[test]
fn expected_keys_are_the_golden_weights() {
    let file = GoldenFile::open("clip").unwrap();
    let cfg = golden_config(&file);
    let weights: KeyShapes = file
        .weights()
        .unwrap()
        .into_iter()
        .filter(|(name, _)| name.starts_with("visual."))
        .map(|(name, tensor)| (name, tensor.dims().to_vec()))
        .collect();
    let expected = ClipVisionEncoder::expected_keys(&cfg);
    assert_eq!(expected.len(), weights.len(), "duplicate expected keys");
    assert_eq!(as_map(expected), weights);
}

#[test]
fn released_keys_match_the_checkpoint_list() {
    let visual: KeyShapes = key_list("clip")
        .into_iter()
        .filter(|(name, _)| name.starts_with("visual."))
        .collect();
    let expected = ClipVisionEncoder::expected_keys(&ClipConfig::vit_h14());
    assert_eq!(expected.len(), visual.len(), "duplicate expected keys");
    assert_eq!(as_map(expected), visual);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (_, encoder) = load();
    let size = encoder.config().image_size;
    let four_channels = Tensor::zeros((4, 20, 20), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        encoder.encode_image(&four_channels),
        Err(Error::Shape { .. })
    ));
    let batched = Tensor::zeros((1, 3, 20, 20), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        encoder.encode_image(&batched),
        Err(Error::Shape { .. })
    ));
    let empty = Tensor::zeros((3, 0, 20), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        encoder.encode_image(&empty),
        Err(Error::Shape { .. })
    ));
    let wrong_size = Tensor::zeros((1, 3, size + 1, size), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        encoder.forward_preprocessed(&wrong_size),
        Err(Error::Shape { .. })
    ));
}

#[test]
fn any_image_size_gives_the_model_tokens() {
    let (file, encoder) = load();
    let cfg = encoder.config();
    let tall = Tensor::rand(-1f32, 1.0, (3, 3 * cfg.image_size, 5), &Device::Cpu).unwrap();
    let out = encoder.encode_image(&tall).unwrap();
    assert_eq!(out.dims(), file.tensor("out.features").unwrap().dims());
    assert_eq!(out.dims(), [1, cfg.num_tokens(), cfg.dim]);
}

/// The released CLIP file holds the text encoder too (`textual.*`, `log_scale`): the check
/// takes every `visual.*` key of `fixtures/keys/clip.tsv`, ignores the rest, and still names a
/// missing, misshapen or unexpected visual key.
#[test]
fn released_file_passes_the_visual_key_check() {
    let meta = |keys: &KeyShapes| -> Vec<turbo_models::TensorMeta> {
        keys.iter()
            .map(|(name, shape)| turbo_models::TensorMeta {
                name: name.clone(),
                shape: shape.clone(),
                dtype: "F32".into(),
            })
            .collect()
    };
    let released = key_list("clip");
    assert!(released.keys().any(|k| !k.starts_with("visual.")));
    let expected = ClipVisionEncoder::expected_keys(&ClipConfig::vit_h14());
    let problems = |keys: &KeyShapes| {
        turbo_models::checkpoint::key_problems_under(&meta(keys), "visual.", &expected)
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(problems(&released), Vec::<String>::new());

    let mut damaged = released.clone();
    damaged.remove("visual.transformer.3.attn.proj.weight");
    damaged.insert("visual.transformer.0.mlp.0.bias".into(), vec![7]);
    damaged.insert("visual.extra".into(), vec![1]);
    let found = problems(&damaged);
    assert_eq!(found.len(), 3, "{found:?}");
    for key in [
        "visual.transformer.3.attn.proj.weight",
        "visual.transformer.0.mlp.0.bias",
        "visual.extra",
    ] {
        assert!(found.iter().any(|p| p.contains(key)), "{key}: {found:?}");
    }
}

/// A `.pth` laid out as the release (the golden file's visual weights beside text-encoder
/// tensors) loads through `from_checkpoint` and gives the golden features; a missing visual
/// key is an error naming the file and the key.
#[test]
fn from_checkpoint_reads_the_visual_half_of_a_full_clip_file() {
    let (file, encoder) = load();
    let cfg = golden_config(&file);
    let weights = file.weights().unwrap();
    let mut tensors: Vec<PthTensor> = weights
        .iter()
        .filter(|(name, _)| name.starts_with("visual."))
        .map(|(name, t)| {
            let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            PthTensor::f32(name, t.dims(), &values)
        })
        .collect();
    tensors.push(PthTensor::f32("log_scale", &[], &[4.6]));
    tensors.push(PthTensor::f32(
        "textual.token_embedding.weight",
        &[3, 2],
        &[0.0; 6],
    ));
    let dir = std::env::temp_dir().join(format!("clip-pth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth");
    write_pth(&path, &tensors);
    let loaded = ClipVisionEncoder::from_checkpoint(&path, &cfg, DType::F32, &Device::Cpu).unwrap();
    let image = file.tensor("in.image").unwrap();
    let (a, b) = (
        loaded.encode_image(&image).unwrap(),
        encoder.encode_image(&image).unwrap(),
    );
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);

    let missing = "visual.pre_norm.weight";
    tensors.retain(|t| t.entry.name != missing);
    write_pth(&path, &tensors);
    let err = ClipVisionEncoder::from_checkpoint(&path, &cfg, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(missing) && err.contains("vit-huge-14.pth"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
