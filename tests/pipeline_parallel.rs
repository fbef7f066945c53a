//! The pipeline on several ranks (simulated: each rank a thread with its own pipeline, as each
//! GPU runs its own process) gives the video of one device: T2V, I2V across both experts, TI2V
//! with its image frame and the Wan2.2 VAE, a guided teacher (CFG-parallel on two ranks,
//! sequence parallel on three, both on four); only rank 0 writes the file; too many ranks fail
//! before any stage.

mod common;

use std::sync::Arc;

use candle_core::Device;
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::parallel::simulated_group;
use turbodiffusion::core::{Error, Stage};
use turbodiffusion::pipeline::{demo_request, I2vRequest, ModelKind, SamplerChoice};
use turbodiffusion::sampler::FlowSolver;
use turbodiffusion::video::{Existing, Mp4Options, OutputFile, Video};
use turbodiffusion::{AttentionKind, Pipeline, Result, T2vRequest};

use common::{gradient_image, Recorder};

/// `run` on `world_size` simulated ranks, each with a clone of `pipeline` holding its rank:
/// every rank's result, in rank order.
fn on_ranks<T: Send>(
    world_size: usize,
    pipeline: &Pipeline,
    run: impl Fn(&Pipeline) -> Result<T> + Sync,
) -> Vec<Result<T>> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = simulated_group(world_size)
            .into_iter()
            .map(|comm| {
                let ranked = pipeline.clone().with_communicator(Arc::new(comm));
                let run = &run;
                scope.spawn(move || run(&ranked))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("a rank panicked"))
            .collect()
    })
}

/// The same frames up to float rounding: reordered f32 sums (about 1e-6 of the values) move a
/// byte by at most one level, and only where a value sits on a rounding boundary.
fn assert_same_video(parallel: &Video, one_device: &Video, what: &str) {
    assert_eq!(
        (parallel.len(), parallel.width(), parallel.height()),
        (one_device.len(), one_device.width(), one_device.height()),
        "{what}"
    );
    let (mut largest, mut differing, mut total) = (0u8, 0usize, 0usize);
    for (a, b) in parallel.frames().iter().zip(one_device.frames()) {
        for (x, y) in a.iter().zip(b) {
            largest = largest.max(x.abs_diff(*y));
            differing += usize::from(x != y);
            total += 1;
        }
    }
    println!("{what}: {differing} of {total} bytes differ, by at most {largest}");
    assert!(largest <= 1, "{what}: a byte differs by {largest}");
    assert!(
        differing * 1000 <= total,
        "{what}: {differing} bytes differ"
    );
}

/// 64×64, 5 frames: 32 DiT tokens and 8 latent rows, enough for three ranks.
fn small(request: T2vRequest) -> T2vRequest {
    T2vRequest {
        size: Some((64, 64)),
        frames: 5,
        ..request
    }
}

fn t2v_demo() -> Pipeline {
    // SLA: its block selection and linear branch must see every token of a head.
    let attention = AttentionConfig::new(AttentionKind::sla(0.5).unwrap());
    Pipeline::demo(11, attention, Device::Cpu).unwrap()
}

/// Every rank's video equals the one-device video, on each of `world_sizes` ranks (the demo
/// has 2 heads: on 3 ranks one holds none).
fn check_every_rank(
    pipeline: &Pipeline,
    world_sizes: &[usize],
    generate: impl Fn(&Pipeline) -> Result<Video> + Sync,
) {
    let one_device = generate(pipeline).unwrap();
    for &world_size in world_sizes {
        for (rank, video) in on_ranks(world_size, pipeline, &generate)
            .into_iter()
            .enumerate()
        {
            let what = format!("rank {rank} of {world_size}");
            assert_same_video(&video.unwrap(), &one_device, &what);
        }
    }
}

#[test]
fn text_to_video_on_two_and_three_ranks_equals_one_device() {
    let request = small(demo_request("a fox in snow"));
    check_every_rank(&t2v_demo(), &[2, 3], |pipeline| {
        pipeline.text_to_video(&request)
    });
}

#[test]
fn image_to_video_across_both_experts_on_two_and_three_ranks_equals_one_device() {
    let attention = AttentionConfig::new(AttentionKind::sagesla(0.5).unwrap());
    let pipeline = Pipeline::demo_i2v(12, attention, Device::Cpu).unwrap();
    let mut request = I2vRequest::new(gradient_image(48, 32), "a moving gradient");
    request.video = small(request.video);
    check_every_rank(&pipeline, &[2, 3], |pipeline| {
        pipeline.image_to_video(&request)
    });
}

#[test]
fn ti2v_with_its_image_frame_on_two_and_three_ranks_equals_one_device() {
    // The Wan2.2 VAE decodes one band of latent rows per rank too (64×64: 4 latent rows).
    let attention = AttentionConfig::new(AttentionKind::sla(0.5).unwrap());
    let pipeline = Pipeline::demo_of(ModelKind::Wan22Ti2v5B, 13, attention, Device::Cpu).unwrap();
    let mut request = I2vRequest::new(gradient_image(48, 32), "a moving gradient");
    request.video = small(request.video);
    check_every_rank(&pipeline, &[2, 3], |pipeline| {
        pipeline.image_to_video(&request)
    });
}

#[test]
fn a_guided_teacher_on_two_three_and_four_ranks_equals_one_device() {
    // Two ranks split the guidance's two passes, three split the tokens of both passes, four
    // split the passes and each pass's tokens in two.
    let request = small(T2vRequest {
        sampler: SamplerChoice::Teacher {
            solver: FlowSolver::UniPc,
            steps: 2,
            shift: 5.0,
            guidance: 5.0,
            negative_prompt: "blurry".into(),
        },
        ..demo_request("a bird")
    });
    check_every_rank(&t2v_demo(), &[2, 3, 4], |pipeline| {
        pipeline.text_to_video(&request)
    });
}

#[test]
fn only_rank_zero_writes_the_file() {
    let dir = std::env::temp_dir().join(format!("turbo-parallel-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("fox.mp4");
    let request = small(demo_request("a fox"));
    let written = on_ranks(2, &t2v_demo(), |pipeline| {
        let output = OutputFile::new(&path, Existing::Refuse)?;
        let mut progress = turbodiffusion::core::NoProgress;
        pipeline.text_to_video_file(&request, &output, Mp4Options::default(), &mut progress)
    });
    for (rank, result) in written.into_iter().enumerate() {
        assert_eq!(result.unwrap(), path, "rank {rank}");
    }
    let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert_eq!(files.len(), 1, "one file, no temporary left: {files:?}");
    assert!(std::fs::metadata(&path).unwrap().len() > 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn too_many_ranks_fail_before_any_stage() {
    // 32×32, 5 frames: 8 DiT tokens and 4 latent rows.
    let request = T2vRequest {
        size: Some((32, 32)),
        ..small(demo_request("a cat"))
    };
    let pipeline = t2v_demo();
    let results = on_ranks(9, &pipeline, |pipeline| {
        let mut stages = Recorder::default();
        let result = pipeline.text_to_video_with_progress(&request, &mut stages);
        Ok((result.map(drop), stages.stages))
    });
    for (rank, result) in results.into_iter().enumerate() {
        let (result, stages) = result.unwrap();
        assert!(stages.is_empty(), "rank {rank} ran {stages:?}");
        match result {
            Err(Error::TooManyRanks {
                world_size: 9,
                parts: 8,
                ..
            }) => {}
            other => panic!("rank {rank}: {other:?}"),
        }
    }
    // W8A8 shards start at 128-token tiles: 32 tokens are one shard.
    let quant = small(demo_request("a cat"));
    let results = on_ranks(2, &pipeline.clone().with_quant_linear(true), |pipeline| {
        pipeline.text_to_video(&quant).map(drop)
    });
    for result in results {
        assert!(
            matches!(result, Err(Error::TooManyRanks { parts: 1, .. })),
            "{result:?}"
        );
    }
}

#[test]
fn each_rank_estimates_its_share_of_the_dit_activations() {
    let request = small(demo_request("a cat"));
    let pipeline = t2v_demo();
    let one_device = pipeline.estimate_memory(&request).unwrap();
    let rank = simulated_group(2).swap_remove(0);
    let ranked = pipeline.with_communicator(Arc::new(rank));
    let per_rank = ranked.estimate_memory(&request).unwrap();
    let denoising = Stage::Denoising { steps: 4 };
    let (one, shared) = (
        one_device.stage(&denoising).unwrap(),
        per_rank.stage(&denoising).unwrap(),
    );
    assert_eq!(
        shared.weights, one.weights,
        "every rank holds the whole DiT"
    );
    assert!(
        shared.activations < one.activations,
        "{} !< {}",
        shared.activations,
        one.activations
    );
}
