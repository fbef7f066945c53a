//! LoRA adapters and sampler presets on the pipeline, through the public API.

use candle_core::{Device, Tensor};
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::Error;
use turbodiffusion::models::lora::{LoraAdapter, ScaledLora};
use turbodiffusion::pipeline::{
    demo_request, DitLoras, I2vRequest, SamplerChoice, SAMPLER_PRESETS,
};
use turbodiffusion::video::InputImage;
use turbodiffusion::{AttentionKind, Pipeline, T2vRequest};

fn demo() -> Pipeline {
    Pipeline::demo(
        3,
        AttentionConfig::new(AttentionKind::Original),
        Device::Cpu,
    )
    .unwrap()
}

fn short(seed: u64) -> T2vRequest {
    T2vRequest {
        frames: 9,
        seed,
        ..demo_request("a lighthouse in a storm")
    }
}

/// A ComfyUI-layout adapter of rank 4 on block `block`'s self-attention q and first FFN linear
/// of `pipeline`'s DiT, with random factors.
fn random_lora(pipeline: &Pipeline, block: usize, strength: f64) -> ScaledLora {
    let cfg = &pipeline.models().dit;
    let rank = 4;
    let factors = |module: &str, out_dim: usize, in_dim: usize| {
        let name = format!("diffusion_model.blocks.{block}.{module}");
        let randn = |shape: (usize, usize)| Tensor::randn(0f32, 0.5, shape, &Device::Cpu).unwrap();
        [
            (format!("{name}.lora_down.weight"), randn((rank, in_dim))),
            (format!("{name}.lora_up.weight"), randn((out_dim, rank))),
            (
                format!("{name}.alpha"),
                Tensor::new(rank as f32, &Device::Cpu).unwrap(),
            ),
        ]
    };
    let tensors = factors("self_attn.q", cfg.dim, cfg.dim)
        .into_iter()
        .chain(factors("ffn.0", cfg.ffn_dim, cfg.dim));
    LoraAdapter::from_tensors("random.safetensors", tensors, false)
        .unwrap()
        .at(strength)
}

fn frames(pipeline: &Pipeline) -> Vec<Vec<u8>> {
    let video = pipeline.text_to_video(&short(4)).unwrap();
    video.frames().iter().map(|f| f.to_vec()).collect()
}

#[test]
fn a_lora_changes_the_video_strength_zero_does_not_and_switching_back_restores_it() {
    let mut pipeline = demo();
    let base = frames(&pipeline);
    let lora = random_lora(&pipeline, 0, 1.0);
    let all = |lora: ScaledLora| DitLoras {
        all: vec![lora],
        ..DitLoras::default()
    };
    pipeline.set_loras(all(lora.with_strength(0.0))).unwrap();
    assert_eq!(frames(&pipeline), base, "strength 0 changed the video");
    pipeline.set_loras(all(lora)).unwrap();
    assert_ne!(frames(&pipeline), base, "the LoRA changed nothing");
    pipeline.set_loras(DitLoras::default()).unwrap();
    assert_eq!(frames(&pipeline), base);
}

#[test]
fn a_lora_with_w8a8_merges_before_quantising() {
    let float = demo();
    let lora = DitLoras {
        all: vec![random_lora(&float, 0, 1.0)],
        ..DitLoras::default()
    };
    let quant = demo()
        .with_quant_linear(true)
        .with_loras(lora.clone())
        .unwrap();
    let adapted = demo().with_loras(lora).unwrap();
    let (a, b) = (frames(&adapted), frames(&quant));
    let mean_abs_diff = a[4]
        .iter()
        .zip(&b[4])
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .sum::<f64>()
        / a[4].len() as f64;
    println!("frame 4, LoRA merged, float vs W8A8: mean |diff| {mean_abs_diff:.3} levels");
    assert!(mean_abs_diff < 8.0, "mean |float − w8a8| = {mean_abs_diff}");
}

#[test]
fn a_lora_for_another_model_fails_naming_its_keys() {
    let pipeline = demo();
    let layers = pipeline.models().dit.num_layers;
    let lora = random_lora(&pipeline, layers, 1.0);
    // Found when the adapters are set, before any run.
    match pipeline.with_loras(DitLoras {
        all: vec![lora],
        ..DitLoras::default()
    }) {
        Err(Error::Lora { keys, .. }) => {
            assert!(
                keys.iter()
                    .all(|k| k.contains(&format!("blocks.{layers}."))),
                "{keys:?}"
            )
        }
        other => panic!("expected Error::Lora, got {other:?}"),
    }
}

#[test]
fn per_expert_loras_need_two_experts() {
    let pipeline = demo();
    let high = DitLoras {
        high_noise: vec![random_lora(&pipeline, 0, 1.0)],
        ..DitLoras::default()
    };
    let error = pipeline.with_loras(high.clone()).unwrap_err();
    assert!(matches!(error, Error::InvalidConfig { .. }), "{error}");
    let attention = AttentionConfig::new(AttentionKind::Original);
    let i2v = Pipeline::demo_i2v(3, attention, Device::Cpu).unwrap();
    let i2v = i2v.with_loras(high).unwrap();
    assert_eq!(i2v.loras().high_noise.len(), 1);
}

#[test]
fn sampler_presets_resolve_by_name_and_the_distill_preset_runs_unguided() {
    for (name, _) in SAMPLER_PRESETS {
        SamplerChoice::preset(name).unwrap();
    }
    assert!(matches!(
        SamplerChoice::preset("no-such-preset"),
        Err(Error::InvalidSamplerSetting { .. })
    ));
    let request = T2vRequest {
        sampler: SamplerChoice::preset("distill-4step").unwrap(),
        ..short(2)
    };
    let video = demo().text_to_video(&request).unwrap();
    assert_eq!(video.len(), 9);
}

/// Each expert of a two-expert model gets the shared adapters and its own only: an adapter on
/// the high-noise expert alone, on the low-noise one alone and on both give three different
/// videos, each different from the base one.
#[test]
fn per_expert_loras_reach_their_expert_only() {
    let attention = AttentionConfig::new(AttentionKind::Original);
    let base = Pipeline::demo_i2v(4, attention, Device::Cpu).unwrap();
    let lora = random_lora(&base, 0, 1.0);
    let (width, height) = (64u32, 64u32);
    let rgb = (0..width * height)
        .flat_map(|i| [(i % width * 4) as u8, (i / width * 4) as u8, 128])
        .collect();
    let mut request = I2vRequest::new(
        InputImage::from_rgb(width, height, rgb).unwrap(),
        "a slow pan",
    );
    request.video.size = Some((128, 128));
    request.video.frames = 5;
    let video = |loras: DitLoras| {
        let pipeline = base.clone().with_loras(loras).unwrap();
        let video = pipeline.image_to_video(&request).unwrap();
        video
            .frames()
            .iter()
            .map(|f| f.to_vec())
            .collect::<Vec<_>>()
    };
    let none = video(DitLoras::default());
    let high = video(DitLoras {
        high_noise: vec![lora.clone()],
        ..DitLoras::default()
    });
    let low = video(DitLoras {
        low_noise: vec![lora.clone()],
        ..DitLoras::default()
    });
    let all = video(DitLoras {
        all: vec![lora],
        ..DitLoras::default()
    });
    let videos = [&none, &high, &low, &all];
    for (i, a) in videos.iter().enumerate() {
        for b in &videos[i + 1..] {
            assert_ne!(a, b, "two adapter placements gave the same video");
        }
    }
}
