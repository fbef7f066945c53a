//! Text (and image) to video with Wan2.2 TI2V-5B and the Wan2.2 VAE.
//!
//! ```text
//! # the built-in demo (a tiny TI2V model and Wan2.2 VAE, random weights):
//! cargo run --release --example ti2v
//! cargo run --release --example ti2v -- --image cat.jpg
//! # the official Wan-AI/Wan2.2-TI2V-5B folder (UniPC, 50 steps, shift 5, guidance 5,
//! # 1280x704, 121 frames at 24 fps):
//! cargo run --release --features cuda --example ti2v -- --checkpoint-dir Wan2.2-TI2V-5B \
//!     --prompt "a cat surfing" --device cuda
//! # text + image: the image is the first frame, held through the run; portrait 704x1280:
//! cargo run --release --features cuda --example ti2v -- --checkpoint-dir Wan2.2-TI2V-5B \
//!     --image cat.jpg --size 704x1280 --device cuda
//! ```

use std::path::PathBuf;

mod common;

use anyhow::Result;
use clap::Parser;
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::pipeline::{I2vRequest, Launched, ModelKind, DEMO_NOTICE};
use turbodiffusion::video::{ImageFit, InputImage, Mp4Options};
use turbodiffusion::{Pipeline, T2vRequest};

const MODEL: ModelKind = ModelKind::Wan22Ti2v5B;

#[derive(Parser, Debug)]
#[command(
    about = "Generate a video from a prompt, and optionally a first frame, with Wan2.2 TI2V-5B"
)]
struct Args {
    #[arg(
        long,
        default_value = "a red fox running through fresh snow, cinematic lighting"
    )]
    prompt: String,
    /// The first frame (PNG, JPEG or WebP); without it the video comes from the text alone.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Folder with the DiT shards and index, `Wan2.2_VAE.pth`, umT5 and its tokenizer; without
    /// it the built-in demo runs (random weights).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// original, sla or sagesla (SLA without trained `proj_l`: the sparse branch alone).
    #[arg(long, default_value = "original")]
    attention_type: common::AttentionName,
    #[arg(long, default_value_t = 0.1)]
    sla_topk: f64,
    /// Quantise the DiT's block linears to W8A8 at load.
    #[arg(long)]
    quant_linear: bool,
    #[command(flatten)]
    sampler: common::SamplerArgs,
    #[command(flatten)]
    lora: common::LoraArgs,
    /// 4n + 1 frames (default 121; 17 in the demo).
    #[arg(long)]
    num_frames: Option<usize>,
    /// WIDTHxHEIGHT, sides multiples of 32 (default 1280x704; 704x1280 for portrait).
    #[arg(long, value_parser = parse_size)]
    size: Option<(usize, usize)>,
    /// Centre-crop the image to the frame's aspect instead of stretching it.
    #[arg(long)]
    center_crop: bool,
    #[command(flatten)]
    run: common::RunArgs,
}

fn main() -> Result<()> {
    let args = Args::parse();
    common::show_warnings();
    let interrupt = common::Interrupt::install()?;
    let demo = args.checkpoint_dir.is_none();
    if demo {
        common::reject_demo_flags(&[
            ("--size", args.size.is_some()),
            ("--dtype", args.run.dtype.is_some()),
            ("--quant-linear", args.quant_linear),
        ])?;
    }
    let attention = AttentionConfig::new(args.attention_type.kind(args.sla_topk)?);
    // Under scripts/multi-gpu.sh (WORLD_SIZE > 1): join the other ranks, on cuda:LOCAL_RANK.
    let launch = Launched::from_env()?;
    let rank = launch.as_ref().map_or(0, Launched::rank);
    let device = common::run_device(&args.run, launch.as_ref())?;
    let pipeline = match &args.checkpoint_dir {
        None => {
            println!("{DEMO_NOTICE}");
            Pipeline::demo_of(MODEL, args.run.seed, attention, device)?
        }
        Some(dir) => Pipeline::builder(MODEL)
            .checkpoint_dir(dir)
            .attention(attention.kind)
            .quant_linear(args.quant_linear)
            .device(device)
            .dtype(args.run.dtype())
            .build()?,
    };
    let pipeline = common::on_ranks(pipeline.with_loras(args.lora.loras()?)?, launch.as_ref());
    let mut video = T2vRequest::for_model(MODEL, &args.prompt);
    args.sampler.apply(&mut video)?;
    video.seed = args.run.seed;
    video.fps = args.run.fps.unwrap_or(video.fps);
    video.size = if demo {
        Some((128, 128))
    } else {
        args.size.or(video.size)
    };
    video.frames = args
        .num_frames
        .unwrap_or(if demo { 17 } else { video.frames });
    let model = if demo { "demo" } else { MODEL.short_name() };
    let output = args.run.output("ti2v", model, video.fps)?;
    let mut progress = common::Console::for_rank(interrupt.clone(), rank);
    let geometry = video.geometry()?;
    let fps = video.fps;
    let written = match &args.image {
        None => pipeline.text_to_video_file(&video, &output, Mp4Options::default(), &mut progress),
        Some(path) => {
            let request = I2vRequest {
                video,
                fit: if args.center_crop {
                    ImageFit::CenterCrop
                } else {
                    ImageFit::Stretch
                },
                ..I2vRequest::new(InputImage::open(path)?, String::new())
            };
            pipeline.image_to_video_file(&request, &output, Mp4Options::default(), &mut progress)
        }
    };
    let written = common::exit_if_cancelled(written)?;
    if rank == 0 {
        common::report_written(&written, geometry, fps, progress.elapsed());
    }
    Ok(())
}

/// `WIDTHxHEIGHT`.
fn parse_size(text: &str) -> Result<(usize, usize), String> {
    let parse = |part: &str| {
        part.trim()
            .parse::<usize>()
            .map_err(|e| format!("`{part}`: {e}"))
    };
    match text.split_once('x') {
        Some((width, height)) => Ok((parse(width)?, parse(height)?)),
        None => Err("expected WIDTHxHEIGHT, for example 1280x704".into()),
    }
}
