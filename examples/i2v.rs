//! Image to video with the Wan2.2 I2V A14B experts, Wan2.1 I2V-14B (480P / 720P) or Wan2.1
//! FLF2V-14B (first and last frame).
//!
//! ```text
//! # the built-in demo (tiny random experts, a generated image):
//! cargo run --release --example i2v
//! # the released experts:
//! cargo run --release --features cuda --example i2v -- --checkpoint-dir ckpts \
//!     --image cat.jpg --prompt "the cat turns its head" --adaptive-resolution --device cuda
//! # a top-k per expert, or per step; a teacher solver with guidance:
//! cargo run --release --example i2v -- --sla-topk-experts 0.05,0.15
//! cargo run --release --example i2v -- --solver euler --num-steps 4 --guidance 3.5
//! # Wan2.1 I2V-14B and FLF2V-14B (official folders with the CLIP file; the teacher with their
//! # published steps, shift and guidance; without --checkpoint-dir, their tiny demos):
//! cargo run --release --features cuda --example i2v -- --checkpoint-dir Wan2.1-I2V-14B-480P \
//!     --model wan21-14b-480p --image cat.jpg --quant-linear --device cuda
//! cargo run --release --features cuda --example i2v -- --checkpoint-dir Wan2.1-FLF2V-14B-720P \
//!     --model flf2v --image first.png --end-image last.png --quant-linear --device cuda
//! # LoRAs per expert (FILE[:STRENGTH], repeatable; --lora for both):
//! cargo run --release --example i2v -- --checkpoint-dir ckpts --image cat.jpg \
//!     --lora-high high_noise.safetensors:1.0 --lora-low low_noise.safetensors:0.8
//! ```

use std::path::PathBuf;

mod common;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::{AspectRatio, Resolution};
use turbodiffusion::pipeline::{I2vRequest, Launched, ModelKind, DEMO_NOTICE};
use turbodiffusion::sampler::I2V_A14B_BOUNDARY;
use turbodiffusion::video::{ImageFit, InputImage, Mp4Options};
use turbodiffusion::Pipeline;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Model {
    /// Wan2.2 I2V-A14B, two experts (TurboDiffusion's rCM students).
    #[value(name = "a14b")]
    WanA14B,
    #[value(name = "wan21-14b-480p")]
    Wan21_480P,
    #[value(name = "wan21-14b-720p")]
    Wan21_720P,
    /// Wan2.1 FLF2V-14B: give --end-image.
    #[value(name = "flf2v")]
    Flf2v,
}

impl Model {
    fn kind(self) -> ModelKind {
        match self {
            Self::WanA14B => ModelKind::Wan22I2VA14B,
            Self::Wan21_480P => ModelKind::Wan21I2V14B480P,
            Self::Wan21_720P => ModelKind::Wan21I2V14B720P,
            Self::Flf2v => ModelKind::Wan21Flf2v14B,
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Generate a video from an image and a prompt with Wan I2V / FLF2V")]
struct Args {
    #[arg(long, default_value = "the scene slowly comes to life")]
    prompt: String,
    /// PNG, JPEG or WebP; the demo generates one when absent.
    #[arg(long)]
    image: Option<PathBuf>,
    /// a14b (default), wan21-14b-480p, wan21-14b-720p or flf2v.
    #[arg(long, value_enum, default_value = "a14b")]
    model: Model,
    /// The last frame (flf2v only); the demo generates one when absent.
    #[arg(long)]
    end_image: Option<PathBuf>,
    /// Folder with the DiT (or the two experts), the VAE, umT5 and its tokenizer (and the CLIP
    /// file for Wan2.1); without it the built-in demo runs (random weights).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    #[arg(long, default_value = "sagesla")]
    attention_type: common::AttentionName,
    #[arg(long, default_value_t = 0.1)]
    sla_topk: f64,
    #[arg(long)]
    quant_linear: bool,
    #[command(flatten)]
    sampler: common::SamplerArgs,
    #[command(flatten)]
    lora: common::LoraArgs,
    /// SLA / SageSLA top-k of the high-noise and the low-noise expert, comma separated (for
    /// example `0.05,0.15`).
    #[arg(long, value_parser = parse_topk_pair)]
    sla_topk_experts: Option<[f64; 2]>,
    /// RF time at which the low-noise expert takes over (a14b).
    #[arg(long, default_value_t = I2V_A14B_BOUNDARY)]
    boundary: f64,
    #[arg(long)]
    num_frames: Option<usize>,
    /// 720p or 480p (default: the model's, 480p for wan21-14b-480p, else 720p).
    #[arg(long)]
    resolution: Option<Resolution>,
    /// 16:9 (default), 9:16, 1:1, 4:3 or 3:4.
    #[arg(long)]
    aspect_ratio: Option<AspectRatio>,
    /// Frame size from the image's aspect ratio instead of the table.
    #[arg(long)]
    adaptive_resolution: bool,
    /// Centre-crop the image to the frame's aspect instead of stretching it (upstream stretches).
    #[arg(long)]
    center_crop: bool,
    #[command(flatten)]
    run: common::RunArgs,
}

fn main() -> Result<()> {
    let args = Args::parse();
    common::show_warnings();
    let interrupt = common::Interrupt::install()?;
    if args.checkpoint_dir.is_none() {
        common::reject_demo_flags(&[
            ("--resolution", args.resolution.is_some()),
            ("--aspect-ratio", args.aspect_ratio.is_some()),
            ("--adaptive-resolution", args.adaptive_resolution),
            ("--dtype", args.run.dtype.is_some()),
            ("--quant-linear", args.quant_linear),
        ])?;
    }
    let kind = args.attention_type.kind(args.sla_topk)?;
    // Under scripts/multi-gpu.sh (WORLD_SIZE > 1): join the other ranks, on cuda:LOCAL_RANK.
    let launch = Launched::from_env()?;
    let rank = launch.as_ref().map_or(0, Launched::rank);
    let device = common::run_device(&args.run, launch.as_ref())?;
    let demo = args.checkpoint_dir.is_none();
    let model = args.model.kind();
    let pipeline = match &args.checkpoint_dir {
        None => {
            println!("{DEMO_NOTICE}");
            Pipeline::demo_of(model, args.run.seed, AttentionConfig::new(kind), device)?
        }
        Some(dir) => Pipeline::builder(model)
            .checkpoint_dir(dir)
            .attention(kind)
            .quant_linear(args.quant_linear)
            .device(device)
            .dtype(args.run.dtype())
            .build()?,
    };
    let pipeline = common::on_ranks(pipeline.with_loras(args.lora.loras()?)?, launch.as_ref());
    let image = match &args.image {
        Some(path) => InputImage::open(path)?,
        None => generated_image(96)?,
    };
    let mut request = I2vRequest::for_model(model, image, &args.prompt);
    request.end_image = match (&args.end_image, model) {
        (Some(path), _) => Some(InputImage::open(path)?),
        (None, ModelKind::Wan21Flf2v14B) if demo => Some(generated_image(224)?),
        (None, _) => None,
    };
    args.sampler.apply(&mut request.video)?;
    request.expert_topk = args.sla_topk_experts;
    if let Some(resolution) = args.resolution {
        request.video.resolution = resolution;
    }
    if let Some(aspect_ratio) = args.aspect_ratio {
        request.video.aspect_ratio = aspect_ratio;
    }
    request.video.seed = args.run.seed;
    request.video.fps = args.run.fps.unwrap_or(request.video.fps);
    request.adaptive_resolution = args.adaptive_resolution;
    request.fit = if args.center_crop {
        ImageFit::CenterCrop
    } else {
        ImageFit::Stretch
    };
    request.boundary = args.boundary;
    if demo {
        request.video.size = Some((128, 128));
        request.video.frames = 17;
    }
    if let Some(frames) = args.num_frames {
        request.video.frames = frames;
    }
    let model = if demo { "demo" } else { model.short_name() };
    let output = args.run.output("i2v", model, request.video.fps)?;
    let mut progress = common::Console::for_rank(interrupt.clone(), rank);
    let written = common::exit_if_cancelled(pipeline.image_to_video_file(
        &request,
        &output,
        Mp4Options::default(),
        &mut progress,
    ))?;
    let fps = request.video.fps;
    if rank == 0 {
        common::report_written(&written, request.geometry()?, fps, progress.elapsed());
    }
    Ok(())
}

/// `high,low`: two numbers separated by a comma.
fn parse_topk_pair(text: &str) -> Result<[f64; 2], String> {
    let parse = |part: &str| {
        part.trim()
            .parse::<f64>()
            .map_err(|e| format!("`{part}`: {e}"))
    };
    match text.split_once(',') {
        Some((high, low)) => Ok([parse(high)?, parse(low)?]),
        None => Err("expected two top-k values, high-noise then low-noise: `0.05,0.15`".into()),
    }
}

/// A colour gradient to start (or, FLF2V, end) the demo from; `blue` sets its third channel.
fn generated_image(blue: u8) -> Result<InputImage> {
    let (width, height) = (160u32, 90u32);
    let rgb = (0..height)
        .flat_map(|y| {
            (0..width).flat_map(move |x| [(x * 255 / width) as u8, (y * 255 / height) as u8, blue])
        })
        .collect();
    Ok(InputImage::from_rgb(width, height, rgb)?)
}
