//! Parity of the CLIP vision encoder, preprocessing included, with the `clip` golden file
//! (upstream `VisionTransformer(use_31_block=True)` after `CLIPModel.visual`'s resize, in f32);
//! and its key list against the golden file and the released checkpoint's
//! (`fixtures/keys/clip.tsv`). Every dimension is read from the file's `config` and tensors.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{key_list, KeyShapes};
use turbo_core::golden::GoldenFile;
use turbo_core::Error;
use turbo_models::clip::{ClipActivation, ClipConfig, ClipVisionEncoder};

fn golden_config(file: &GoldenFile) -> ClipConfig {
    let number = |key: &str| file.config_f64(&[key]).unwrap();
    let text = |key: &str| file.config()[key].as_str().unwrap().to_owned();
    // The encoder implements the released tower: class token, pre-norm blocks.
    assert_eq!(text("pool_type"), "token");
    assert_eq!(file.config()["pre_norm"], serde_json::Value::Bool(true));
    assert_eq!(file.config()["post_norm"], serde_json::Value::Bool(false));
    let channels = |key: &str| -> [f64; 3] {
        let values: Vec<f64> = file.config()[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        values.try_into().unwrap()
    };
    ClipConfig {
        image_size: number("image_size") as usize,
        patch_size: number("patch_size") as usize,
        dim: number("dim") as usize,
        mlp_ratio: number("mlp_ratio") as usize,
        out_dim: number("out_dim") as usize,
        num_heads: number("num_heads") as usize,
        num_layers: number("num_layers") as usize,
        activation: match text("activation").as_str() {
            "gelu" => ClipActivation::Gelu,
            "quick_gelu" => ClipActivation::QuickGelu,
            other => panic!("activation {other} is not implemented"),
        },
        norm_eps: number("norm_eps"),
        mean: channels("mean"),
        std: channels("std"),
    }
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
