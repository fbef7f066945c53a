//! A run fails before its first stage for every bad input that can be seen up front: a broken
//! weight file of any model (the VAE and the low-noise expert, which run last, included),
//! settings out of range, sizes past the bounds. What can only be seen during the run (a NaN
//! weight) fails at the stage that meets it, naming it, instead of writing a black video.

mod common;

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::{Error, KeyProblem, Progress, Stage, StageReport, StepReport};
use turbodiffusion::pipeline::{demo_request, I2vRequest, ModelSet, SamplerChoice, WeightSource};
use turbodiffusion::sampler::FlowSolver;
use turbodiffusion::video::InputImage;
use turbodiffusion::{AttentionKind, Pipeline, T2vRequest};

use common::Recorder;

/// Fails the test on any stage or step: the run must stop before the first.
struct NoStage;

impl Progress for NoStage {
    fn step_done(&mut self, report: &StepReport) -> ControlFlow<()> {
        panic!("step {} ran", report.index)
    }

    fn stage(&mut self, stage: &Stage) {
        panic!("stage {stage:?} started")
    }

    fn stage_done(&mut self, report: &StageReport) {
        panic!("stage {:?} finished", report.stage)
    }
}

fn attention() -> AttentionConfig {
    AttentionConfig::new(AttentionKind::Original)
}

fn short(prompt: &str) -> T2vRequest {
    T2vRequest {
        frames: 5,
        ..demo_request(prompt)
    }
}

/// The demo's models written to `.safetensors` files in `dir`, and a pipeline over them.
fn pipeline_over_files(demo: &Pipeline, dir: &Path) -> (Pipeline, ModelSet) {
    let mut models = demo.models().clone();
    let sources = [
        ("dit", &mut models.dit_weights),
        ("umt5", &mut models.text_encoder_weights),
        ("vae", &mut models.vae_weights),
    ];
    let low_noise = models.dit_low_noise_weights.as_mut().map(|s| ("low", s));
    for (name, source) in sources.into_iter().chain(low_noise) {
        let WeightSource::Random(random) = &*source else {
            panic!("the demo has random weights")
        };
        let path = dir.join(format!("{name}.safetensors"));
        random.save_safetensors(&path, DType::F32).unwrap();
        *source = WeightSource::File(path);
    }
    let pipeline = from_models(demo, models.clone());
    (pipeline, models)
}

fn from_models(demo: &Pipeline, models: ModelSet) -> Pipeline {
    Pipeline::from_parts(
        models,
        demo.tokenizer().clone(),
        attention(),
        Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

fn file_of(source: &WeightSource) -> PathBuf {
    match source {
        WeightSource::File(path) => path.clone(),
        WeightSource::Random(_) => panic!("not a file"),
    }
}

/// Rewrites a safetensors file through `edit`.
fn edit_safetensors(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

/// Any key of `path` whose name contains `part`.
fn key_with(path: &Path, part: &str) -> String {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let mut keys: Vec<&String> = tensors.keys().filter(|k| k.contains(part)).collect();
    keys.sort();
    keys.first().map(|k| k.to_string()).expect("a matching key")
}

#[test]
fn a_vae_missing_a_key_fails_before_the_text_encoder_runs() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Pipeline::demo(1, attention(), Device::Cpu).unwrap();
    let (_, models) = pipeline_over_files(&demo, dir.path());
    let vae = file_of(&models.vae_weights);
    let removed = key_with(&vae, "decoder");
    edit_safetensors(&vae, |tensors| {
        tensors.remove(&removed);
    });
    let pipeline = from_models(&demo, models);
    match pipeline.text_to_video_with_progress(&short("a cat"), &mut NoStage) {
        Err(Error::CheckpointKeys { path, problems }) => {
            assert_eq!(path, vae);
            assert!(
                matches!(&problems[..], [KeyProblem::Missing { key, .. }] if *key == removed),
                "{problems:?}"
            );
        }
        other => panic!("expected a key error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_truncated_weight_file_fails_before_any_stage_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Pipeline::demo(1, attention(), Device::Cpu).unwrap();
    for which in ["umt5", "vae", "dit"] {
        let (_, models) = pipeline_over_files(&demo, dir.path());
        let path = match which {
            "umt5" => file_of(&models.text_encoder_weights),
            "vae" => file_of(&models.vae_weights),
            _ => file_of(&models.dit_weights),
        };
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        let pipeline = from_models(&demo, models);
        match pipeline.text_to_video_with_progress(&short("a cat"), &mut NoStage) {
            Err(Error::Checkpoint {
                path: reported,
                reason,
            }) => {
                assert_eq!(reported, path);
                assert!(reason.contains("truncated"), "{reason}");
            }
            other => panic!(
                "{which}: expected a checkpoint error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}

#[test]
fn a_broken_low_noise_expert_fails_before_the_high_noise_one_runs() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Pipeline::demo_i2v(1, attention(), Device::Cpu).unwrap();
    let (_, models) = pipeline_over_files(&demo, dir.path());
    let low = file_of(models.dit_low_noise_weights.as_ref().unwrap());
    let head = key_with(&low, "head.head.weight");
    edit_safetensors(&low, |tensors| {
        let wrong = Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap();
        tensors.insert(head.clone(), wrong);
    });
    let pipeline = from_models(&demo, models);
    let image = InputImage::from_rgb(32, 32, vec![100; 32 * 32 * 3]).unwrap();
    let mut request = I2vRequest::new(image, "a cat");
    request.video.size = Some((64, 64));
    request.video.frames = 5;
    match pipeline.image_to_video_with_progress(&request, &mut NoStage) {
        Err(Error::CheckpointKeys { path, problems }) => {
            assert_eq!(path, low);
            assert!(
                matches!(&problems[..], [KeyProblem::WrongShape { key, got, .. }]
                    if *key == head && got == &[3, 3]),
                "{problems:?}"
            );
        }
        other => panic!("expected a key error, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn bad_guidance_fails_before_the_text_encoder_runs() {
    let demo = Pipeline::demo(1, attention(), Device::Cpu).unwrap();
    for guidance in [f64::NAN, f64::INFINITY, -f64::INFINITY, 1e30] {
        let request = T2vRequest {
            sampler: SamplerChoice::Teacher {
                solver: FlowSolver::Euler,
                steps: 2,
                shift: 5.0,
                guidance,
                negative_prompt: "blurry".into(),
            },
            ..short("a cat")
        };
        match demo.text_to_video_with_progress(&request, &mut NoStage) {
            Err(Error::InvalidSamplerSetting { setting, value, .. }) => {
                assert_eq!(setting, "guidance scale");
                assert_eq!(value, guidance.to_string());
            }
            other => panic!("{guidance}: {:?}", other.map(|_| ())),
        }
    }
}

/// Sizes whose arithmetic used to overflow (2^34 × 2^34 passed an 8 GiB budget as 27.5 MB),
/// sizes that abort on allocation and lengths that run for hours are refused up front.
#[test]
fn sizes_and_lengths_past_the_bounds_fail_before_any_stage() {
    let demo = Pipeline::demo(1, attention(), Device::Cpu)
        .unwrap()
        .with_memory_budget(8 << 30);
    let side = 1usize << 34;
    for (size, frames) in [
        ((side, side), 5),
        ((100_000, 100_000), 5),
        ((128, 128), 100_001),
    ] {
        let request = T2vRequest {
            size: Some(size),
            frames,
            ..demo_request("a cat")
        };
        let expected = if frames > 5 {
            "frame count"
        } else {
            "frame size"
        };
        match demo.text_to_video_with_progress(&request, &mut NoStage) {
            Err(Error::OutOfRange { what, .. }) => assert_eq!(what, expected),
            other => panic!("{size:?} × {frames}: {:?}", other.map(|_| ())),
        }
        assert!(demo.estimate_memory(&request).is_err());
    }
}

/// The largest size accepted, on a CPU: the default budget (the host's available memory)
/// stops it before any stage instead of letting the allocator abort the process.
#[test]
fn the_cpu_has_a_default_budget() {
    if !Path::new("/proc/meminfo").exists() {
        return;
    }
    let real_size = Pipeline::random_weights(
        turbodiffusion::pipeline::ModelKind::Wan21T2V14B,
        0,
        attention(),
        Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let request = T2vRequest {
        size: Some((4096, 4096)),
        frames: 1025,
        ..T2vRequest::new("a cat")
    };
    match real_size.text_to_video_with_progress(&request, &mut NoStage) {
        Err(Error::MemoryBudgetExceeded {
            needed, available, ..
        }) => {
            assert!(needed > available, "{needed} <= {available}");
        }
        other => panic!(
            "expected the budget to stop it, got {:?}",
            other.map(|_| ())
        ),
    }
}

/// The demo's DiT takes 64 tokens of text: a longer prompt is cut to that (with a warning)
/// instead of failing in the DiT after the text encoder ran.
#[test]
fn a_prompt_longer_than_the_dit_text_length_is_cut_not_fatal() {
    let demo = Pipeline::demo(1, attention(), Device::Cpu).unwrap();
    let text_len = demo.models().dit.text_len;
    let prompt = "a red fox running through fresh snow at dawn, cinematic lighting, ".repeat(4);
    let tokens = demo.tokenizer().encode(&prompt).unwrap();
    assert!(tokens.truncated);
    assert_eq!(tokens.ids.len(), text_len);
    let mut stages = Recorder::default();
    let video = demo
        .text_to_video_with_progress(&short(&prompt), &mut stages)
        .unwrap();
    assert_eq!(video.len(), 5);
}

/// NaN weights would give an all-black video: the stage that meets them fails, by name.
#[test]
fn non_finite_weights_fail_at_the_stage_that_meets_them() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Pipeline::demo(1, attention(), Device::Cpu).unwrap();
    let cases = [
        ("umt5", "text encoding"),
        ("dit", "denoising"),
        ("vae", "VAE decode"),
    ];
    for (which, stage_name) in cases {
        let (_, models) = pipeline_over_files(&demo, dir.path());
        let (path, part) = match which {
            "umt5" => (file_of(&models.text_encoder_weights), "token_embedding"),
            "dit" => (file_of(&models.dit_weights), "head.head.bias"),
            _ => (file_of(&models.vae_weights), "decoder.head"),
        };
        let key = key_with(&path, part);
        edit_safetensors(&path, |tensors| {
            let shape = tensors[&key].shape().clone();
            let nan = Tensor::full(f32::NAN, shape, &Device::Cpu).unwrap();
            tensors.insert(key.clone(), nan);
        });
        let pipeline = from_models(&demo, models);
        match pipeline.text_to_video(&short("a cat")) {
            Err(Error::NonFinite { stage, .. }) => assert_eq!(stage, stage_name, "{which}"),
            other => panic!(
                "{which}: expected a non-finite error, got {:?}",
                other.map(|_| ())
            ),
        }
    }
}
