//! Parity of the Wan2.1 VAE with the `vae` golden file (the upstream `WanVAE_` run in f32).
//! Every dimension is read from the file's `config` and tensors.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::vae_config;
use turbo_core::golden::GoldenFile;
use turbo_models::vae::{VaeTiling, WanVae};

fn relative_error(out: &Tensor, reference: &Tensor) -> f64 {
    turbo_core::golden::relative_error(out, reference).unwrap()
}

fn load() -> (GoldenFile, WanVae) {
    let file = GoldenFile::open("vae").unwrap();
    let cfg = vae_config(&file);
    let vb = VarBuilder::from_tensors(file.weights().unwrap(), DType::F32, &Device::Cpu);
    let vae = WanVae::load(vb, &cfg).unwrap();
    (file, vae)
}

#[test]
fn decode_matches_golden() {
    let (file, vae) = load();
    let out = vae
        .decode_unclamped(&file.tensor("in.latent").unwrap())
        .unwrap();
    let expected = file.tensor("out.video").unwrap();
    assert_eq!(out.dims(), expected.dims());
    let err = relative_error(&out, &expected);
    println!("vae decode relative error {err:.3e}");
    assert!(err <= 1e-4, "decode relative error {err}");
}

#[test]
fn encode_matches_golden() {
    let (file, vae) = load();
    let out = vae.encode(&file.tensor("in.video").unwrap()).unwrap();
    let expected = file.tensor("out.latent").unwrap();
    assert_eq!(out.dims(), expected.dims());
    let err = relative_error(&out, &expected);
    println!("vae encode relative error {err:.3e}");
    assert!(err <= 1e-4, "encode relative error {err}");
}

#[test]
fn decode_clamps_to_unit_range() {
    let (file, vae) = load();
    let out = vae.decode(&file.tensor("in.latent").unwrap()).unwrap();
    let expected = file
        .tensor("out.video")
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    let err = relative_error(&out, &expected);
    assert!(err <= 1e-4, "clamped decode relative error {err}");
}

#[test]
fn streaming_decode_hands_out_frames_in_order() {
    let (file, vae) = load();
    let latent = file.tensor("in.latent").unwrap();
    let expected = vae.decode(&latent).unwrap();
    let mut chunks = Vec::new();
    vae.decode_streaming(&latent, |decoded| {
        chunks.push((decoded.first_frame, decoded.frames));
        Ok(())
    })
    .unwrap();
    assert_eq!(chunks.len(), latent.dim(2).unwrap());
    let mut next = 0;
    for (first, frames) in &chunks {
        assert_eq!(*first, next);
        let count = frames.dim(2).unwrap();
        assert_eq!(count, if next == 0 { 1 } else { 4 });
        let reference = expected.narrow(2, next, count).unwrap();
        assert_eq!(relative_error(frames, &reference), 0.0);
        next += count;
    }
    assert_eq!(next, expected.dim(2).unwrap());
}

#[test]
fn loader_keys_are_the_golden_weights() {
    let file = GoldenFile::open("vae").unwrap();
    common::assert_golden_holds_exactly(&file, &WanVae::expected_keys(&vae_config(&file)));
}

#[test]
fn bad_inputs_are_typed_errors() {
    let (file, vae) = load();
    let video = file.tensor("in.video").unwrap();
    let (b, c, t, h, w) = video.dims5().unwrap();
    let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let shape_error =
        |result: turbo_core::Result<Tensor>| matches!(result, Err(turbo_core::Error::Shape { .. }));
    assert!(shape_error(vae.encode(&zeros(&[b, c + 1, t, h, w]))));
    assert!(shape_error(vae.encode(&zeros(&[b, c, t, h + 1, w]))));
    assert!(shape_error(vae.encode(&zeros(&[b, c, t, h, w - 2]))));
    assert!(shape_error(vae.encode(&zeros(&[c, t, h, w]))));
    assert!(matches!(
        vae.encode(&zeros(&[b, c, t + 1, h, w])),
        Err(turbo_core::Error::InvalidFrameCount { .. })
    ));
    let latent = file.tensor("in.latent").unwrap();
    let (b, z, t, h, w) = latent.dims5().unwrap();
    assert!(shape_error(vae.decode(&zeros(&[b, z + 1, t, h, w]))));
    assert!(shape_error(vae.decode(&zeros(&[b, z, 0, h, w]))));
}

#[test]
fn callback_errors_stop_the_decode() {
    let (file, vae) = load();
    let mut calls = 0;
    let result = vae.decode_streaming(&file.tensor("in.latent").unwrap(), |_| {
        calls += 1;
        Err(turbo_core::Error::EmptyPrompt)
    });
    assert!(matches!(result, Err(turbo_core::Error::EmptyPrompt)));
    assert_eq!(calls, 1);
}

/// Longer inputs than the golden file's (three chunks and more) reach the steady state of the
/// streaming cache; the whole-sequence reference form must agree with it.
#[test]
fn streaming_matches_the_whole_sequence_form_on_longer_videos() {
    let (file, vae) = load();
    let video = file.tensor("in.video").unwrap();
    let (b, c, t, h, w) = video.dims5().unwrap();
    // 4 more chunks of frames: the golden video followed by its reversal, repeated.
    let reversed = video.flip(&[2]).unwrap();
    let long = Tensor::cat(
        &[
            &video,
            &reversed.narrow(2, 1, t - 1).unwrap(),
            &video.narrow(2, 1, t - 1).unwrap(),
            &reversed.narrow(2, 1, t - 1).unwrap(),
            &video.narrow(2, 1, t - 1).unwrap(),
        ],
        2,
    )
    .unwrap();
    assert_eq!(long.dims(), &[b, c, 1 + 5 * (t - 1), h, w]);
    let streamed = vae.encode(&long).unwrap();
    let whole = vae.encode_reference(&long).unwrap();
    let err = relative_error(&streamed, &whole);
    assert!(
        err <= 1e-5,
        "encode: streaming vs whole-sequence relative error {err}"
    );

    let decoded = vae.decode_unclamped(&streamed).unwrap();
    let whole = vae.decode_reference(&streamed).unwrap();
    assert_eq!(decoded.dims(), long.dims());
    let err = relative_error(&decoded, &whole);
    assert!(
        err <= 1e-5,
        "decode: streaming vs whole-sequence relative error {err}"
    );
}

#[test]
fn whole_sequence_form_matches_golden() {
    let (file, vae) = load();
    let latent = vae
        .encode_reference(&file.tensor("in.video").unwrap())
        .unwrap();
    assert!(relative_error(&latent, &file.tensor("out.latent").unwrap()) <= 1e-4);
    let video = vae
        .decode_reference(&file.tensor("in.latent").unwrap())
        .unwrap();
    assert!(relative_error(&video, &file.tensor("out.video").unwrap()) <= 1e-4);
}

#[test]
fn batches_are_independent() {
    let (file, vae) = load();
    let video = file.tensor("in.video").unwrap();
    let batch = Tensor::cat(&[&video, &video.flip(&[2]).unwrap()], 0).unwrap();
    let latents = vae.encode(&batch).unwrap();
    let expected = file.tensor("out.latent").unwrap();
    assert!(relative_error(&latents.narrow(0, 0, 1).unwrap(), &expected) <= 1e-4);
    let alone = vae.encode(&video.flip(&[2]).unwrap()).unwrap();
    assert!(relative_error(&latents.narrow(0, 1, 1).unwrap(), &alone) <= 1e-5);

    let latent = file.tensor("in.latent").unwrap();
    let videos = vae
        .decode_unclamped(&Tensor::cat(&[&latent, &latent], 0).unwrap())
        .unwrap();
    let expected = file.tensor("out.video").unwrap();
    for b in 0..2 {
        assert!(relative_error(&videos.narrow(0, b, 1).unwrap(), &expected) <= 1e-4);
    }
}

/// The tiled decode equals the untiled one: a latent a little larger than twice the halo, cut
/// into a 2×2 grid, so that each tile decodes only part of the frame and its kept pixels next
/// to the cut need the whole halo. Two latent frames exercise each tile's temporal cache.
#[test]
fn tiled_decode_equals_the_untiled_decode() {
    let (_, vae) = load();
    let halo = vae.config().decode_halo();
    let z_dim = vae.config().z_dim;
    let (height, width) = (2 * halo + 4, 2 * halo + 2);
    let latent = Tensor::randn(0f32, 1.0, (1, z_dim, 2, height, width), &Device::Cpu).unwrap();
    let whole = vae.decode(&latent).unwrap();
    let tiling = VaeTiling::grid(2, 2, height, width).unwrap();
    let tiled = vae.decode_tiled(&latent, tiling).unwrap();
    assert_eq!(tiled.dims(), whole.dims());
    let err = relative_error(&tiled, &whole);
    println!("tiled ({tiling:?}, halo {halo}) vs untiled decode relative error: {err:.3e}");
    assert!(err <= 1e-5, "tiled relative error {err}");
}

#[test]
fn bad_tile_settings_are_typed_errors() {
    use turbo_core::Error;
    assert!(matches!(
        VaeTiling::new(0, 4),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        VaeTiling::grid(3, 0, 10, 10),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        VaeTiling::grid(11, 1, 10, 10),
        Err(Error::InvalidConfig { .. })
    ));
    assert_eq!(
        VaeTiling::grid(3, 2, 10, 9).unwrap(),
        VaeTiling::new(4, 5).unwrap()
    );
}
