//! Parity of the Wan2.2 VAE with the `vae22` golden file (the upstream `WanVAE_` of
//! `vae2_2.py` run in f32), and its key list against the golden file and the released
//! checkpoint's (`fixtures/keys/wan22_vae.tsv`). Every dimension, and the latent mean and std,
//! is read from the file's `config` and tensors.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{key_list, max_abs_diff, relative_error, vae22_config, KeyShapes};
use turbo_core::golden::GoldenFile;
use turbo_models::vae::{Vae22Config, Wan22Vae};

fn load() -> (GoldenFile, Wan22Vae) {
    let file = GoldenFile::open("vae22").unwrap();
    let cfg = vae22_config(&file);
    let vb = VarBuilder::from_tensors(file.weights().unwrap(), DType::F32, &Device::Cpu);
    let vae = Wan22Vae::load(vb, &cfg).unwrap();
    (file, vae)
}

#[test]
fn decode_matches_golden() {
    let (file, vae) = load();
    let want = file.tensor("out.video").unwrap();
    let out = vae
        .decode_unclamped(&file.tensor("in.latent").unwrap())
        .unwrap();
    assert_eq!(out.dims(), want.dims());
    let err = relative_error(&out, &want);
    println!("vae22 decode relative error: {err:.3e}");
    assert!(err <= 1e-4, "vae22 decode relative error {err}");
    // The whole-sequence form is the same computation.
    let reference = vae
        .decode_reference(&file.tensor("in.latent").unwrap())
        .unwrap();
    assert!(relative_error(&reference, &out) <= 1e-5);
    // `decode` is the same video clamped to [-1, 1].
    let clamped = vae.decode(&file.tensor("in.latent").unwrap()).unwrap();
    assert_eq!(
        max_abs_diff(&clamped, &out.clamp(-1f32, 1f32).unwrap()),
        0.0
    );
}

#[test]
fn encode_matches_golden() {
    let (file, vae) = load();
    let video = file.tensor("in.video").unwrap();
    let want = file.tensor("out.latent").unwrap();
    let out = vae.encode(&video).unwrap();
    assert_eq!(out.dims(), want.dims());
    let err = relative_error(&out, &want);
    println!("vae22 encode relative error: {err:.3e}");
    assert!(err <= 1e-4, "vae22 encode relative error {err}");
    let reference = vae.encode_reference(&video).unwrap();
    assert!(relative_error(&reference, &out) <= 1e-5);
}

/// Streaming equals the whole-sequence form on a longer video than the file's (three chunks
/// after the first), in both directions.
#[test]
fn streaming_matches_the_whole_sequence_form_on_longer_videos() {
    let (file, vae) = load();
    let (b, c, _, h, w) = file.tensor("in.video").unwrap().dims5().unwrap();
    let video = Tensor::randn(0f32, 0.5, (b, c, 13, h, w), &Device::Cpu)
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    let latent = vae.encode(&video).unwrap();
    assert_eq!(latent.dim(2).unwrap(), 4);
    assert!(relative_error(&vae.encode_reference(&video).unwrap(), &latent) <= 1e-5);
    let decoded = vae.decode_unclamped(&latent).unwrap();
    assert_eq!(decoded.dims(), video.dims());
    assert!(relative_error(&vae.decode_reference(&latent).unwrap(), &decoded) <= 1e-5);
    let mut firsts = Vec::new();
    vae.decode_streaming(&latent, |chunk| {
        firsts.push((chunk.first_frame, chunk.frames.dim(2)?));
        Ok(())
    })
    .unwrap();
    assert_eq!(firsts, [(0, 1), (1, 4), (5, 4), (9, 4)]);
}

#[test]
fn loader_keys_are_the_golden_weights() {
    let (file, _) = load();
    let weights: KeyShapes = file
        .weights()
        .unwrap()
        .into_iter()
        .map(|(name, tensor)| (name, tensor.dims().to_vec()))
        .collect();
    let expected = Wan22Vae::expected_keys(&vae22_config(&file));
    assert_eq!(expected.len(), weights.len(), "duplicate expected keys");
    assert_eq!(expected.into_iter().collect::<KeyShapes>(), weights);
}

#[test]
fn released_keys_match_the_checkpoint_list() {
    let released = key_list("wan22_vae");
    let expected = Wan22Vae::expected_keys(&Vae22Config::wan22());
    assert_eq!(expected.len(), released.len(), "duplicate expected keys");
    assert_eq!(expected.into_iter().collect::<KeyShapes>(), released);
    assert_eq!(Vae22Config::wan22().spatial_stride(), 16);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (file, vae) = load();
    let stride = vae.config().spatial_stride();
    let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let shape_error = |result: turbo_core::Result<Tensor>| {
        assert!(
            matches!(result, Err(turbo_core::Error::Shape { .. })),
            "{result:?}"
        )
    };
    shape_error(vae.encode(&zeros(&[1, 3, 5, stride + 2, stride])));
    shape_error(vae.encode(&zeros(&[1, 4, 5, stride, stride])));
    assert!(vae.encode(&zeros(&[1, 3, 4, stride, stride])).is_err());
    let (b, z, t, h, w) = file.tensor("in.latent").unwrap().dims5().unwrap();
    shape_error(vae.decode(&zeros(&[b, z + 1, t, h, w])));
    shape_error(vae.decode(&zeros(&[z, t, h, w])));
}
