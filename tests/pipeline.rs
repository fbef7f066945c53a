//! The pipeline end to end on the CPU, through the public API only, as a downstream app uses it.

mod common;

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::{Error, Progress, Resolution, Stage, StageReport, StepReport};
use turbodiffusion::models::tokenizer::PromptTokenizer;
use turbodiffusion::models::{Umt5Config, Umt5Encoder};
use turbodiffusion::pipeline::{
    I2vRequest, ModelSet, RandomCheckpoint, Residency, SamplerChoice, WeightSource,
};
use turbodiffusion::sampler::{FlowSolver, RcmMode};
use turbodiffusion::video::{Existing, Mp4Options, OutputFile, Video};
use turbodiffusion::{AttentionKind, Pipeline, T2vRequest};

use common::{demo, gradient_image, short, Recorder};

#[test]
fn every_attention_kind_makes_a_video_of_the_requested_size() {
    for kind in [
        AttentionKind::Original,
        AttentionKind::sla(0.5).unwrap(),
        AttentionKind::sagesla(0.5).unwrap(),
    ] {
        let video = demo(kind).text_to_video(&short("a cat", 1)).unwrap();
        assert_eq!(
            (video.len(), video.width(), video.height()),
            (9, 128, 128),
            "{kind}"
        );
        let first = &video.frames()[0];
        assert!(
            first.iter().any(|&v| v != first[0]),
            "{kind}: a constant frame"
        );
    }
}

#[test]
fn w8a8_linears_run_and_stay_close_to_float() {
    let float = demo(AttentionKind::Original);
    let quant = demo(AttentionKind::Original).with_quant_linear(true);
    let request = short("a fox", 2);
    let (a, b) = (
        float.text_to_video(&request).unwrap(),
        quant.text_to_video(&request).unwrap(),
    );
    assert_eq!(a.len(), b.len());
    let (fa, fb) = (&a.frames()[4], &b.frames()[4]);
    let differing = fa.iter().zip(fb).filter(|(x, y)| x != y).count();
    let mean_abs_diff = fa
        .iter()
        .zip(fb)
        .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
        .sum::<f64>()
        / fa.len() as f64;
    println!(
        "frame 4: {differing} of {} bytes differ, mean |float − w8a8| {mean_abs_diff:.3} levels",
        fa.len()
    );
    assert!(
        differing > 0,
        "quant_linear changed nothing: the linears were not quantised"
    );
    // Measured on the demo model: 1.12 levels of 255.
    assert!(mean_abs_diff < 8.0, "mean |float − w8a8| = {mean_abs_diff}");
}

#[test]
fn the_seed_decides_the_video() {
    let pipeline = demo(AttentionKind::sla(0.5).unwrap());
    let frames = |seed| {
        pipeline
            .text_to_video(&short("a dog", seed))
            .unwrap()
            .frames()
            .to_vec()
    };
    assert_eq!(frames(5), frames(5));
    assert_ne!(frames(5), frames(6));
}

#[test]
fn ode_and_teacher_samplers_run() {
    let pipeline = demo(AttentionKind::Original);
    for sampler in [
        SamplerChoice::Rcm {
            steps: 2,
            sigma_max: Some(200.0),
            mode: RcmMode::Ode,
        },
        SamplerChoice::Teacher {
            solver: FlowSolver::Euler,
            steps: 2,
            shift: 5.0,
            guidance: 5.0,
            negative_prompt: "blurry".into(),
        },
    ] {
        let request = T2vRequest {
            sampler: sampler.clone(),
            ..short("a bird", 0)
        };
        assert_eq!(
            pipeline.text_to_video(&request).unwrap().len(),
            9,
            "{sampler:?}"
        );
    }
}

#[test]
fn bad_requests_fail_before_any_work() {
    let pipeline = demo(AttentionKind::sla(0.1).unwrap());
    let fails = |request: T2vRequest| pipeline.text_to_video(&request).unwrap_err();
    let five_steps = SamplerChoice::Rcm {
        steps: 5,
        sigma_max: None,
        mode: RcmMode::Sde,
    };
    let cases = [
        (
            T2vRequest {
                frames: 80,
                ..short("x", 0)
            },
            "InvalidFrameCount",
        ),
        (
            T2vRequest {
                sla_topk: Some(0.0),
                ..short("x", 0)
            },
            "InvalidTopk",
        ),
        (
            T2vRequest {
                sampler: five_steps,
                ..short("x", 0)
            },
            "InvalidSamplerSetting",
        ),
        (
            T2vRequest {
                size: Some((100, 128)),
                ..short("x", 0)
            },
            "InvalidFrameSize",
        ),
        (short("   ", 0), "EmptyPrompt"),
        (
            T2vRequest {
                sla_topk_schedule: Some(vec![0.1, 0.2, 0.3]),
                ..short("x", 0)
            },
            "InvalidSamplerSetting",
        ),
        (
            T2vRequest {
                sla_topk_schedule: Some(vec![0.1, 0.2, 1.5, 0.3]),
                ..short("x", 0)
            },
            "InvalidTopk",
        ),
    ];
    for (request, variant) in cases {
        let err = fails(request);
        assert!(
            format!("{err:?}").starts_with(variant),
            "expected {variant}, got {err:?}"
        );
    }
    assert!(matches!(
        fails(T2vRequest {
            fps: 0.0,
            ..short("x", 0)
        }),
        Error::Media { .. }
    ));
    assert!(matches!(
        "1080p".parse::<Resolution>(),
        Err(Error::UnknownResolution { .. })
    ));
}

/// The demo's models written to files in `dir` by `write` (given the weights, the model's role
/// and the path without extension; it returns the path written), as a pipeline reading them.
fn demo_from_files(
    reference: &Pipeline,
    dir: &Path,
    write: impl Fn(&RandomCheckpoint, &str, PathBuf) -> PathBuf,
) -> Pipeline {
    let mut models: ModelSet = reference.models().clone();
    for (role, source) in [
        ("dit", &mut models.dit_weights),
        ("umt5", &mut models.text_encoder_weights),
        ("vae", &mut models.vae_weights),
    ] {
        let WeightSource::Random(random) = &*source else {
            panic!("the demo has random weights")
        };
        *source = WeightSource::File(write(random, role, dir.join(role)));
    }
    let tokenizer_file = dir.join("tokenizer.json");
    reference.tokenizer().save(&tokenizer_file).unwrap();
    Pipeline::from_parts(
        models,
        PromptTokenizer::from_file(&tokenizer_file).unwrap(),
        AttentionConfig::new(AttentionKind::Original),
        Device::Cpu,
        DType::F32,
    )
    .unwrap()
}

#[test]
fn tiny_models_written_as_safetensors_files_give_the_same_video() {
    let dir = tempfile::tempdir().unwrap();
    let reference = demo(AttentionKind::Original);
    let from_files = demo_from_files(&reference, dir.path(), |random, _, path| {
        let path = path.with_extension("safetensors");
        random.save_safetensors(&path, DType::F32).unwrap();
        path
    });
    let request = short("a fish", 9);
    let video = |p: &Pipeline| -> Video { p.text_to_video(&request).unwrap() };
    assert_eq!(video(&from_files).frames(), video(&reference).frames());
}

/// The released formats: `.pth` state dicts, the DiT as a TurboDiffusion `-quant` file (int8
/// block linears with their tile scales), give the video of the same weights quantised at load.
#[test]
fn tiny_models_written_as_released_pth_files_give_the_same_video() {
    let dir = tempfile::tempdir().unwrap();
    let reference = demo(AttentionKind::Original).with_quant_linear(true);
    let from_files = demo_from_files(&reference, dir.path(), |random, role, path| {
        let path = path.with_extension("pth");
        match role {
            "dit" => random.save_quant_dit_pth(&path, DType::F32, &Device::Cpu),
            _ => random.save_pth(&path, DType::F32, &Device::Cpu),
        }
        .unwrap();
        path
    });
    let request = short("a fish", 9);
    let video = |p: &Pipeline| -> Video { p.text_to_video(&request).unwrap() };
    assert_eq!(video(&from_files).frames(), video(&reference).frames());
}

#[test]
fn image_to_video_runs_both_experts_in_turn() {
    let pipeline = Pipeline::demo_i2v(
        4,
        AttentionConfig::new(AttentionKind::sagesla(0.5).unwrap()),
        Device::Cpu,
    )
    .unwrap();
    let mut request = I2vRequest::new(gradient_image(96, 64), "a moving gradient");
    request.video.size = Some((128, 96));
    request.video.frames = 9;
    let mut reported = Vec::new();
    let mut progress = |report: &StepReport| {
        reported.push(report.s);
        ControlFlow::Continue(())
    };
    let video = pipeline
        .image_to_video_with_progress(&request, &mut progress)
        .unwrap();
    assert_eq!((video.len(), video.width(), video.height()), (9, 128, 96));
    // The default 4-step schedule at σ_max 200: two high-noise steps, then two low-noise ones.
    assert_eq!(reported.len(), 4);
    assert_eq!(
        reported.iter().filter(|&&s| s >= request.boundary).count(),
        2
    );

    let t2v = demo(AttentionKind::Original);
    assert!(matches!(
        t2v.image_to_video(&request),
        Err(Error::InvalidConfig { .. })
    ));
    assert!(matches!(
        pipeline.text_to_video(&short("x", 0)),
        Err(Error::InvalidConfig { .. })
    ));
}

#[test]
fn stages_are_reported_in_order_with_decoded_frames() {
    let mut recorder = Recorder::default();
    let request = short("a whale", 1);
    demo(AttentionKind::Original)
        .text_to_video_with_progress(&request, &mut recorder)
        .unwrap();
    assert_eq!(recorder.steps, 4);
    assert_eq!(
        &recorder.stages[..3],
        &[
            Stage::EncodingText,
            Stage::LoadingDit { expert: None },
            Stage::Denoising { steps: 4 }
        ]
    );
    let decoded: Vec<usize> = recorder.stages[3..]
        .iter()
        .map(|s| match s {
            Stage::Decoding { done, total: 9 } => *done,
            other => panic!("unexpected stage {other:?}"),
        })
        .collect();
    // 9 frames = 1 + 4 + 4: the first latent frame decodes to one frame, each later one to four.
    assert_eq!(decoded, vec![0, 1, 5, 9]);
}

#[test]
fn each_expert_can_have_its_own_topk() {
    let pipeline = Pipeline::demo_i2v(
        4,
        AttentionConfig::new(AttentionKind::sla(0.5).unwrap()),
        Device::Cpu,
    )
    .unwrap();
    let mut request = I2vRequest::new(gradient_image(64, 64), "a slow zoom");
    request.video.size = Some((128, 128));
    request.video.frames = 5;
    let shared = pipeline.image_to_video(&request).unwrap();
    // 128 tokens are two key blocks: 0.5 selects one, 1.0 both (a visible change).
    request.expert_topk = Some([0.5, 1.0]);
    let per_expert = pipeline.image_to_video(&request).unwrap();
    assert!(
        shared.frames() != per_expert.frames(),
        "the low-noise expert's top-k had no effect"
    );
    request.expert_topk = Some([0.1, 0.0]);
    assert!(matches!(
        pipeline.image_to_video(&request),
        Err(Error::InvalidTopk { .. })
    ));
}

#[test]
fn a_topk_schedule_sets_each_steps_topk() {
    let pipeline = demo(AttentionKind::sla(0.5).unwrap());
    // 128×128 at 9 frames is 3 × 8 × 8 = 192 tokens, three key blocks of 64: a top-k of 0.5
    // keeps one block, 1.0 all three.
    let constant = short("a lighthouse", 5);
    let scheduled = T2vRequest {
        sla_topk_schedule: Some(vec![0.5, 0.5, 1.0, 1.0]),
        ..constant.clone()
    };
    let all_half = T2vRequest {
        sla_topk_schedule: Some(vec![0.5; 4]),
        ..constant.clone()
    };
    let constant_video = pipeline.text_to_video(&constant).unwrap();
    assert_eq!(
        pipeline.text_to_video(&all_half).unwrap().frames(),
        constant_video.frames(),
        "a schedule of the constant top-k changed the video"
    );
    assert!(
        pipeline.text_to_video(&scheduled).unwrap().frames() != constant_video.frames(),
        "the later steps' top-k had no effect"
    );
}

#[test]
fn invalid_topk_schedules_fail_before_any_stage() {
    let t2v = demo(AttentionKind::sagesla(0.1).unwrap());
    let i2v = Pipeline::demo_i2v(
        4,
        AttentionConfig::new(AttentionKind::sla(0.1).unwrap()),
        Device::Cpu,
    )
    .unwrap();
    let mut recorder = Recorder::default();
    let teacher = SamplerChoice::Teacher {
        solver: FlowSolver::UniPc,
        steps: 3,
        shift: 5.0,
        guidance: 5.0,
        negative_prompt: "blurry".into(),
    };
    for (schedule, sampler) in [
        (vec![0.1; 5], SamplerChoice::default()),
        (vec![], SamplerChoice::default()),
        (vec![0.1; 4], teacher.clone()),
    ] {
        let request = T2vRequest {
            sla_topk_schedule: Some(schedule),
            sampler,
            ..short("x", 0)
        };
        let err = t2v
            .text_to_video_with_progress(&request, &mut recorder)
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidSamplerSetting { .. }),
            "{err:?}"
        );
    }
    for bad in [0.0, -0.5, 1.01, f64::NAN] {
        let request = T2vRequest {
            sla_topk_schedule: Some(vec![0.1, bad, 0.1]),
            sampler: teacher.clone(),
            ..short("x", 0)
        };
        let err = t2v
            .text_to_video_with_progress(&request, &mut recorder)
            .unwrap_err();
        assert!(matches!(err, Error::InvalidTopk { .. }), "{err:?}");
    }
    let mut request = I2vRequest::new(gradient_image(64, 64), "x");
    request.video.sla_topk_schedule = Some(vec![0.1; 3]);
    assert!(matches!(
        i2v.image_to_video_with_progress(&request, &mut recorder),
        Err(Error::InvalidSamplerSetting { .. })
    ));
    request.video.sla_topk_schedule = Some(vec![0.1; 4]);
    request.expert_topk = Some([0.1, 0.2]);
    assert!(matches!(
        i2v.image_to_video_with_progress(&request, &mut recorder),
        Err(Error::InvalidSamplerSetting { .. })
    ));
    assert!(recorder.stages.is_empty(), "{:?}", recorder.stages);
    assert!(recorder.reports.is_empty());
}

#[test]
fn image_to_video_runs_the_teacher_solvers_across_both_experts() {
    let pipeline = Pipeline::demo_i2v(
        6,
        AttentionConfig::new(AttentionKind::sla(0.5).unwrap()),
        Device::Cpu,
    )
    .unwrap();
    let request_with = |solver, guidance| {
        let mut request = I2vRequest::new(gradient_image(64, 64), "a drifting cloud");
        request.video.size = Some((64, 64));
        request.video.frames = 5;
        request.video.sampler = SamplerChoice::Teacher {
            solver,
            steps: 2,
            shift: 5.0,
            guidance,
            negative_prompt: "static".into(),
        };
        request
    };
    for solver in [
        FlowSolver::UniPc,
        FlowSolver::DpmSolverPp,
        FlowSolver::Euler,
    ] {
        let mut recorder = Recorder::default();
        let video = pipeline
            .image_to_video_with_progress(&request_with(solver, 5.0), &mut recorder)
            .unwrap();
        assert_eq!((video.len(), video.width(), video.height()), (5, 64, 64));
        assert_eq!(recorder.steps, 2, "{solver}");
        // Shift 5 puts step 0 at σ 1 and step 1 at σ 0.83: one step on each side of 0.9.
        let loads: Vec<&Stage> = recorder
            .stages
            .iter()
            .filter(|s| matches!(s, Stage::LoadingDit { .. }))
            .collect();
        assert_eq!(
            loads,
            [
                &Stage::LoadingDit {
                    expert: Some("high-noise")
                },
                &Stage::LoadingDit {
                    expert: Some("low-noise")
                }
            ],
            "{solver}"
        );
        let reported: Vec<Stage> = recorder.reports.iter().map(|r| r.stage).collect();
        assert_eq!(
            reported,
            [
                Stage::EncodingText,
                Stage::EncodingImage,
                Stage::Denoising { steps: 2 },
                Stage::Decoding { done: 5, total: 5 }
            ]
        );
    }
    let frames = |guidance| {
        pipeline
            .image_to_video(&request_with(FlowSolver::Euler, guidance))
            .unwrap()
            .frames()
            .to_vec()
    };
    let guided = frames(5.0);
    assert_eq!(guided, frames(5.0), "the same request gave another video");
    assert!(guided != frames(1.0), "the guidance scale had no effect");
}

/// The bytes of the largest of the umT5 weight groups the streamed encoder reads at once
/// (`token_embedding`, each `blocks.{i}`, `norm`), from the model's key shapes.
fn largest_umt5_group_bytes(cfg: &Umt5Config, dtype: DType) -> u64 {
    let mut groups = std::collections::BTreeMap::<String, usize>::new();
    for (key, shape) in Umt5Encoder::expected_keys(cfg) {
        let parts: Vec<&str> = key.split('.').collect();
        let group = match parts.as_slice() {
            ["blocks", i, ..] => format!("blocks.{i}"),
            [first, ..] => first.to_string(),
            [] => unreachable!("keys are not empty"),
        };
        *groups.entry(group).or_default() += shape.iter().product::<usize>();
    }
    let largest = groups.values().max().expect("the encoder has weights");
    (largest * dtype.size_in_bytes()) as u64
}

#[test]
fn text_encoding_on_the_cpu_gives_the_same_video() {
    let request = short("a heron", 4);
    let on_device = demo(AttentionKind::Original)
        .text_to_video(&request)
        .unwrap();
    let on_cpu = demo(AttentionKind::Original)
        .with_text_encoder_on_cpu(true)
        .text_to_video(&request)
        .unwrap();
    assert_eq!(on_device.frames(), on_cpu.frames());
}

#[test]
fn each_stage_reports_the_bytes_its_model_holds() {
    let pipeline = demo(AttentionKind::sla(0.5).unwrap());
    let mut recorder = Recorder::default();
    pipeline
        .text_to_video_with_progress(&short("a kite", 2), &mut recorder)
        .unwrap();
    let models = pipeline.models();
    let f32_bytes = |source: &WeightSource| match source {
        WeightSource::Random(random) => random.bytes(DType::F32),
        WeightSource::File(path) => panic!("the demo has no files: {path:?}"),
    };
    // The text encoder holds one group of weights at a time: the embedding table, a block, or
    // the final norm.
    let text_bytes = largest_umt5_group_bytes(&models.text_encoder, DType::F32);
    assert!(text_bytes < f32_bytes(&models.text_encoder_weights) / 2);
    let expected = [
        (Stage::EncodingText, text_bytes),
        (
            Stage::Denoising { steps: 4 },
            f32_bytes(&models.dit_weights),
        ),
        (
            Stage::Decoding { done: 9, total: 9 },
            f32_bytes(&models.vae_weights),
        ),
    ];
    let reported: Vec<(Stage, u64)> = recorder
        .reports
        .iter()
        .map(|r| (r.stage, r.resident_bytes))
        .collect();
    assert_eq!(reported, expected);
    for report in &recorder.reports {
        println!(
            "{:?}: {} bytes resident, {:?}",
            report.stage, report.resident_bytes, report.elapsed
        );
        assert!(report.resident_bytes > 0);
        assert_eq!(report.device_memory, None, "the CPU has no device counter");
    }
}

/// Stops the run at its `n`-th poll between decoded chunks.
struct CancelAtChunk {
    polls: usize,
    n: usize,
}

impl Progress for CancelAtChunk {
    fn step_done(&mut self, _report: &StepReport) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    fn poll_cancel(&mut self) -> ControlFlow<()> {
        self.polls += 1;
        match self.polls >= self.n {
            true => ControlFlow::Break(()),
            false => ControlFlow::Continue(()),
        }
    }
}

/// Writing while decoding gives the file that writing the finished video gives, reports the
/// write as a stage after the decode, and a run cancelled between decoded chunks leaves no file
/// (not even the temporary one the first chunks went to).
#[test]
fn a_video_streamed_to_its_file_equals_the_video_written_after() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = demo(AttentionKind::Original);
    let request = short("a heron", 4);
    let options = Mp4Options::default();
    let in_memory = dir.path().join("in_memory.mp4");
    pipeline
        .text_to_video(&request)
        .unwrap()
        .write_mp4(&in_memory, options)
        .unwrap();
    let output = OutputFile::new(dir.path().join("streamed.mp4"), Existing::Refuse).unwrap();
    let mut recorder = Recorder::default();
    let written = pipeline
        .text_to_video_file(&request, &output, options, &mut recorder)
        .unwrap();
    assert_eq!(written, output.path());
    let finished: Vec<Stage> = recorder.reports.iter().map(|r| r.stage).collect();
    assert_eq!(
        &finished[finished.len() - 2..],
        &[Stage::Decoding { done: 9, total: 9 }, Stage::WritingVideo]
    );
    let (streamed, reference) = (
        Video::read_mp4(&written).unwrap(),
        Video::read_mp4(&in_memory).unwrap(),
    );
    assert_eq!(streamed.len(), 9);
    assert_eq!(streamed.frames(), reference.frames());

    let cancelled = OutputFile::new(dir.path().join("cancelled.mp4"), Existing::Refuse).unwrap();
    let mut cancel = CancelAtChunk { polls: 0, n: 2 };
    let result = pipeline.text_to_video_file(&request, &cancelled, options, &mut cancel);
    assert!(
        matches!(
            result,
            Err(Error::Cancelled {
                completed: 4,
                total: 4
            })
        ),
        "{result:?}"
    );
    assert_eq!(cancel.polls, 2);
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["in_memory.mp4", "streamed.mp4"]);
}

/// Counts the weight bytes each stage reports having read.
#[derive(Default)]
struct ReadBytes(Vec<(Stage, u64)>);

impl Progress for ReadBytes {
    fn step_done(&mut self, _report: &StepReport) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }

    fn stage_done(&mut self, report: &StageReport) {
        self.0.push((report.stage, report.resident_bytes));
    }
}

/// A resident text encoder gives the video the streamed one gives; it reads its weights for
/// the first request only, and every later stage's estimate counts it.
#[test]
fn a_resident_text_encoder_gives_the_same_video_and_loads_once() {
    let streamed = demo(AttentionKind::Original);
    let resident = demo(AttentionKind::Original).with_residency(Residency {
        text_encoder: true,
        ..Residency::NONE
    });
    let request = short("a lynx", 5);
    let reference = streamed.text_to_video(&request).unwrap();
    let text_bytes = |pipeline: &Pipeline| {
        let mut reads = ReadBytes::default();
        let video = pipeline
            .text_to_video_with_progress(&request, &mut reads)
            .unwrap();
        assert_eq!(video.frames(), reference.frames());
        reads
            .0
            .iter()
            .find(|(s, _)| *s == Stage::EncodingText)
            .unwrap()
            .1
    };
    let first = text_bytes(&resident);
    assert!(first > 0, "the first request loads the encoder");
    assert_eq!(text_bytes(&resident), 0, "a later request reads nothing");
    let denoise_weights = |pipeline: &Pipeline| {
        let estimate = pipeline.estimate_memory(&request).unwrap();
        estimate
            .stage(&Stage::Denoising { steps: 4 })
            .unwrap()
            .weights
    };
    assert_eq!(
        denoise_weights(&resident) - denoise_weights(&streamed),
        first,
        "the denoise stage's estimate counts the resident encoder"
    );
}
