//! Models kept loaded between requests (`Residency`), through the public API: the same videos
//! as the streamed stages, no weight read twice, a reload when the DiT's load settings change,
//! LoRAs switched in the resident base, and an estimate that counts the resident weights.

mod common;

use candle_core::{Device, Tensor};
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::{Error, Stage};
use turbodiffusion::models::lora::{LoraAdapter, ScaledLora};
use turbodiffusion::pipeline::{DitLoras, I2vRequest, ModelKind, Residency};
use turbodiffusion::{AttentionKind, Pipeline, T2vRequest};

use common::{demo, gradient_image, short, Recorder};

const DENOISING: Stage = Stage::Denoising { steps: 4 };
const DECODING: Stage = Stage::Decoding { done: 9, total: 9 };

/// The video's frames and the bytes each stage read.
fn run(pipeline: &Pipeline, request: &T2vRequest) -> (Vec<Vec<u8>>, Recorder) {
    let mut reads = Recorder::default();
    let video = pipeline
        .text_to_video_with_progress(request, &mut reads)
        .unwrap();
    (video.frames().iter().map(|f| f.to_vec()).collect(), reads)
}

fn frames(pipeline: &Pipeline, request: &T2vRequest) -> Vec<Vec<u8>> {
    run(pipeline, request).0
}

#[test]
fn resident_models_give_the_same_video_and_are_read_once() {
    let request = short("a lynx", 5);
    let reference = frames(&demo(AttentionKind::Original), &request);
    let resident = demo(AttentionKind::Original).with_residency(Residency::ALL);
    let (first, first_reads) = run(&resident, &request);
    assert_eq!(first, reference);
    for stage in [Stage::EncodingText, DENOISING, DECODING] {
        assert!(
            first_reads.resident_bytes(stage) > 0,
            "{stage:?}: the first run loads"
        );
    }
    let (second, second_reads) = run(&resident, &request);
    assert_eq!(second, reference);
    for stage in [Stage::EncodingText, DENOISING, DECODING] {
        assert_eq!(
            second_reads.resident_bytes(stage),
            0,
            "{stage:?} read its weights again"
        );
    }
    // Clones share the resident models.
    assert_eq!(
        run(&resident.clone(), &request).1.resident_bytes(DENOISING),
        0
    );
}

/// A request with another top-k (or a schedule) reuses the resident DiT, which then runs with
/// the top-k of the request, not the one the previous request left.
#[test]
fn a_resident_dit_takes_each_requests_topk() {
    let sla = AttentionKind::sla(0.5).unwrap();
    let resident = demo(sla).with_residency(Residency::ALL_BUT_TEXT_ENCODER);
    let scheduled = T2vRequest {
        sla_topk_schedule: Some(vec![0.25, 0.5, 0.75, 1.0]),
        ..short("a kite", 2)
    };
    let plain = short("a kite", 2);
    assert_eq!(
        frames(&resident, &scheduled),
        frames(&demo(sla), &scheduled)
    );
    let (video, reads) = run(&resident, &plain);
    assert_eq!(
        reads.resident_bytes(DENOISING),
        0,
        "the top-k needs no reload"
    );
    assert_eq!(video, frames(&demo(sla), &plain));
}

/// The resident DiT is shared by the pipeline's clones; a clone with another attention
/// backend or W8A8 loads its own in its place (never the stale one), and the original then
/// loads its own again.
#[test]
fn a_change_of_load_settings_reloads_the_resident_dit() {
    let request = short("a heron", 4);
    let sla = AttentionKind::sla(0.5).unwrap();
    let resident = demo(sla).with_residency(Residency::ALL_BUT_TEXT_ENCODER);
    let reference = frames(&demo(sla), &request);
    assert_eq!(frames(&resident, &request), reference);

    let dense = resident
        .clone()
        .with_attention(AttentionKind::Original)
        .unwrap();
    let (video, reads) = run(&dense, &request);
    assert!(
        reads.resident_bytes(DENOISING) > 0,
        "another backend reloads"
    );
    assert_eq!(video, frames(&demo(AttentionKind::Original), &request));
    assert_eq!(
        reads.resident_bytes(DECODING),
        0,
        "the VAE does not depend on it"
    );

    let quantised = resident.clone().with_quant_linear(true);
    let (video, reads) = run(&quantised, &request);
    assert!(reads.resident_bytes(DENOISING) > 0, "W8A8 reloads");
    assert_eq!(video, frames(&demo(sla).with_quant_linear(true), &request));

    let (video, reads) = run(&resident, &request);
    assert!(
        reads.resident_bytes(DENOISING) > 0,
        "the float DiT was replaced"
    );
    assert_eq!(video, reference);
}

/// A ComfyUI-layout adapter of rank 4 on block 0's self-attention q, with random factors.
fn random_lora(pipeline: &Pipeline, strength: f64) -> ScaledLora {
    let dim = pipeline.models().dit.dim;
    let name = "diffusion_model.blocks.0.self_attn.q";
    let randn = |shape: (usize, usize)| Tensor::randn(0f32, 0.5, shape, &Device::Cpu).unwrap();
    let tensors = [
        (format!("{name}.lora_down.weight"), randn((4, dim))),
        (format!("{name}.lora_up.weight"), randn((dim, 4))),
        (
            format!("{name}.alpha"),
            Tensor::new(4f32, &Device::Cpu).unwrap(),
        ),
    ];
    LoraAdapter::from_tensors("random.safetensors", tensors, false)
        .unwrap()
        .at(strength)
}

fn all(lora: ScaledLora) -> DitLoras {
    DitLoras {
        all: vec![lora],
        ..DitLoras::default()
    }
}

/// Adapters and strengths switch in the resident DiT without reading the base again, and give
/// the video a fresh load with them gives; removing them gives the base model's video.
#[test]
fn loras_switch_in_the_resident_dit_without_reloading_it() {
    let request = short("a lighthouse", 6);
    let mut resident =
        demo(AttentionKind::Original).with_residency(Residency::ALL_BUT_TEXT_ENCODER);
    let base = frames(&resident, &request);
    let lora = random_lora(&resident, 1.0);
    for strength in [1.0, 0.5] {
        let loras = all(lora.with_strength(strength));
        resident.set_loras(loras.clone()).unwrap();
        let (video, reads) = run(&resident, &request);
        assert_eq!(
            reads.resident_bytes(DENOISING),
            0,
            "strength {strength}: the base was read again"
        );
        let streamed = demo(AttentionKind::Original).with_loras(loras).unwrap();
        assert_eq!(video, frames(&streamed, &request), "strength {strength}");
        assert_ne!(
            video, base,
            "strength {strength}: the adapter changed nothing"
        );
    }
    resident.set_loras(DitLoras::default()).unwrap();
    let (video, reads) = run(&resident, &request);
    assert_eq!((video, reads.resident_bytes(DENOISING)), (base, 0));
}

/// Both A14B experts stay loaded: a second image-to-video reads no DiT and no VAE, with a top-k
/// per expert in one request and the pipeline's in the next.
#[test]
fn both_resident_experts_serve_the_next_request() {
    let demo_i2v = || {
        let attention = AttentionConfig::new(AttentionKind::sagesla(0.5).unwrap());
        Pipeline::demo_i2v(4, attention, Device::Cpu).unwrap()
    };
    let resident = demo_i2v().with_residency(Residency::ALL_BUT_TEXT_ENCODER);
    let mut request = I2vRequest::new(gradient_image(96, 64), "a moving gradient");
    request.video.size = Some((128, 96));
    request.video.frames = 9;
    let per_expert = I2vRequest {
        expert_topk: Some([0.25, 1.0]),
        ..request.clone()
    };
    let run_i2v = |pipeline: &Pipeline, request: &I2vRequest| {
        let mut reads = Recorder::default();
        let video = pipeline
            .image_to_video_with_progress(request, &mut reads)
            .unwrap();
        (
            video
                .frames()
                .iter()
                .map(|f| f.to_vec())
                .collect::<Vec<_>>(),
            reads,
        )
    };
    let (video, reads) = run_i2v(&resident, &per_expert);
    assert_eq!(video, run_i2v(&demo_i2v(), &per_expert).0);
    assert!(reads.resident_bytes(DENOISING) > 0 && reads.resident_bytes(Stage::EncodingImage) > 0);
    let (video, reads) = run_i2v(&resident, &request);
    assert_eq!(video, run_i2v(&demo_i2v(), &request).0);
    for stage in [Stage::EncodingImage, DENOISING, DECODING] {
        assert_eq!(
            reads.resident_bytes(stage),
            0,
            "{stage:?} read its weights again"
        );
    }
}

/// Wan2.1 I2V's CLIP encoder is kept with `clip` (a second request's image stage reads
/// nothing, the video unchanged) and read again at every request without it.
#[test]
fn a_resident_clip_encoder_is_read_once() {
    let demo_clip = || {
        let attention = AttentionConfig::new(AttentionKind::Original);
        Pipeline::demo_of(ModelKind::Wan21I2V14B480P, 3, attention, Device::Cpu).unwrap()
    };
    let mut request = I2vRequest::new(gradient_image(96, 64), "a moving gradient");
    request.video.size = Some((128, 96));
    request.video.frames = 9;
    let image_reads = |pipeline: &Pipeline| {
        let mut reads = Recorder::default();
        let video = pipeline
            .image_to_video_with_progress(&request, &mut reads)
            .unwrap();
        let frames: Vec<Vec<u8>> = video.frames().iter().map(|f| f.to_vec()).collect();
        (frames, reads.resident_bytes(Stage::EncodingImage))
    };
    let reference = image_reads(&demo_clip()).0;
    let kept = demo_clip().with_residency(Residency::ALL_BUT_TEXT_ENCODER);
    assert!(image_reads(&kept).1 > 0, "the first request loads");
    assert_eq!(image_reads(&kept), (reference.clone(), 0));
    let without_clip = demo_clip().with_residency(Residency {
        clip: false,
        ..Residency::ALL_BUT_TEXT_ENCODER
    });
    image_reads(&without_clip);
    let (video, read) = image_reads(&without_clip);
    assert_eq!(video, reference);
    assert!(read > 0, "CLIP is read again when it is not kept");
}

/// Every stage's estimate grows by the weights of the resident models other than its own,
/// which are the bytes the first run reads for them.
#[test]
fn the_estimate_counts_the_resident_weights_in_every_stage() {
    let request = short("a lynx", 5);
    let streamed = demo(AttentionKind::Original);
    let resident = demo(AttentionKind::Original).with_residency(Residency::ALL);
    let reads = run(&resident, &request).1;
    let (text, dit, vae) = (
        reads.resident_bytes(Stage::EncodingText),
        reads.resident_bytes(DENOISING),
        reads.resident_bytes(DECODING),
    );
    let weights = |pipeline: &Pipeline, stage: Stage| {
        let estimate = pipeline.estimate_memory(&request).unwrap();
        *estimate.stage(&stage).unwrap()
    };
    let besides = [
        (Stage::EncodingText, dit + vae),
        (DENOISING, text + vae),
        (DECODING, text + dit),
    ];
    for (stage, others) in besides {
        let (alone, kept) = (weights(&streamed, stage), weights(&resident, stage));
        assert_eq!(kept.resident_weights, others, "{stage:?}");
        assert_eq!(alone.resident_weights, 0, "{stage:?}");
        // The text stage also holds its whole encoder instead of one block at a time.
        let own = kept.weights - kept.resident_weights;
        assert!(own >= alone.weights, "{stage:?}");
        assert_eq!(kept.activations, alone.activations, "{stage:?}");
    }
    let text_stage = weights(&resident, Stage::EncodingText);
    let whole_encoder = text_stage.weights - text_stage.resident_weights;
    assert!(whole_encoder >= text, "{whole_encoder} < {text}");
}

/// A budget the streamed stages fit but the resident models do not is refused before any
/// work, the help naming the residency.
#[test]
fn residents_that_do_not_fit_beside_a_stage_fail_before_any_work() {
    let request = short("a lynx", 5);
    let resident = demo(AttentionKind::Original).with_residency(Residency::ALL);
    let peak = |pipeline: &Pipeline| pipeline.estimate_memory(&request).unwrap().peak();
    let streamed_peak = peak(&demo(AttentionKind::Original));
    assert!(peak(&resident) > streamed_peak);
    let budget = streamed_peak;
    assert!(demo(AttentionKind::Original)
        .with_memory_budget(budget)
        .text_to_video(&request)
        .is_ok());
    let mut reads = Recorder::default();
    let result = resident
        .with_memory_budget(budget)
        .text_to_video_with_progress(&request, &mut reads);
    match result {
        Err(Error::MemoryBudgetExceeded { help, .. }) => {
            assert!(help[0].contains("Residency"), "{help:?}")
        }
        other => panic!("expected MemoryBudgetExceeded, got {other:?}"),
    }
    assert!(reads.reports.is_empty(), "a stage ran: {:?}", reads.stages);
}
