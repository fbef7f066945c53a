//! Text to video with a Wan model.
//!
//! ```text
//! # the built-in demo (tiny model, random weights, seconds on a CPU):
//! cargo run --release --example t2v
//! # a real model:
//! cargo run --release --features cuda --example t2v -- --checkpoint-dir ckpts \
//!     --model 1.3b --prompt "a cat surfing" --attention-type sagesla --sla-topk 0.1 --device cuda
//! # a top-k per step, and a teacher solver for the undistilled checkpoints:
//! cargo run --release --example t2v -- --sla-topk-schedule 0.05,0.1,0.1,0.15
//! cargo run --release --example t2v -- --solver unipc --num-steps 8 --guidance 5
//! # Wan2.2 T2V-A14B (official `Wan-AI/Wan2.2-T2V-A14B` folder; the teacher with its published
//! # 40 steps, shift 12, guidance 4 / 3 per expert; `--model a14b` alone runs its tiny demo):
//! cargo run --release --features cuda --example t2v -- --checkpoint-dir Wan2.2-T2V-A14B \
//!     --model a14b --prompt "a cat surfing" --quant-linear --device cuda
//! # a base checkpoint with LoRAs (FILE[:STRENGTH], repeatable) and a distilled-LoRA preset:
//! cargo run --release --example t2v -- --checkpoint-dir ckpts --model 14b \
//!     --lora style.safetensors:0.8 --lora lightx2v_4step.safetensors --sampler-preset distill-4step
//! ```

use std::path::PathBuf;

mod common;

use anyhow::Result;
use clap::{Parser, ValueEnum};
use turbodiffusion::attention::{AttentionConfig, BlockSizes};
use turbodiffusion::core::{AspectRatio, Resolution};
use turbodiffusion::pipeline::{Launched, ModelKind, DEMO_NOTICE};
use turbodiffusion::video::Mp4Options;
use turbodiffusion::{Pipeline, T2vRequest};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Model {
    #[value(name = "1.3b")]
    Wan1_3B,
    #[value(name = "14b")]
    Wan14B,
    /// Wan2.2 T2V-A14B, two experts.
    #[value(name = "a14b")]
    WanA14B,
}

impl Model {
    fn kind(self) -> ModelKind {
        match self {
            Self::Wan1_3B => ModelKind::Wan21T2V1_3B,
            Self::Wan14B => ModelKind::Wan21T2V14B,
            Self::WanA14B => ModelKind::Wan22T2VA14B,
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Generate a video from a prompt with Wan + TurboDiffusion")]
struct Args {
    #[arg(
        long,
        default_value = "a red fox running through fresh snow, cinematic lighting"
    )]
    prompt: String,
    /// Folder with the checkpoint files; without it, the built-in demo runs (random weights).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// 1.3b (default), 14b or a14b (Wan2.2 T2V-A14B).
    #[arg(long, value_enum)]
    model: Option<Model>,
    /// original, sla or sagesla.
    #[arg(long, default_value = "sagesla")]
    attention_type: common::AttentionName,
    #[arg(long, default_value_t = 0.1)]
    sla_topk: f64,
    /// Prefer the W8A8 `-quant` checkpoint.
    #[arg(long)]
    quant_linear: bool,
    #[command(flatten)]
    sampler: common::SamplerArgs,
    #[command(flatten)]
    lora: common::LoraArgs,
    /// 4n + 1 frames (default: the model's, 81; 17 in the demo).
    #[arg(long)]
    num_frames: Option<usize>,
    /// 480p or 720p (default: the model's, 480p for Wan2.1, 720p for A14B).
    #[arg(long)]
    resolution: Option<Resolution>,
    /// 16:9 (default), 9:16, 1:1, 4:3 or 3:4.
    #[arg(long)]
    aspect_ratio: Option<AspectRatio>,
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
            ("--dtype", args.run.dtype.is_some()),
            ("--quant-linear", args.quant_linear),
        ])?;
    }
    let attention = AttentionConfig {
        kind: args.attention_type.kind(args.sla_topk)?,
        blocks: BlockSizes::default(),
    };
    // Under scripts/multi-gpu.sh (WORLD_SIZE > 1): join the other ranks, on cuda:LOCAL_RANK.
    let launch = Launched::from_env()?;
    let rank = launch.as_ref().map_or(0, Launched::rank);
    let device = common::run_device(&args.run, launch.as_ref())?;
    let kind = args.model.unwrap_or(Model::Wan1_3B).kind();
    let (pipeline, mut request, model_name) = match &args.checkpoint_dir {
        None => {
            println!("{DEMO_NOTICE}");
            let request = T2vRequest {
                size: Some((128, 128)),
                frames: 17,
                ..T2vRequest::for_model(kind, &args.prompt)
            };
            let pipeline = Pipeline::demo_of(kind, args.run.seed, attention, device)?;
            (pipeline, request, "demo")
        }
        Some(dir) => {
            let pipeline = Pipeline::builder(kind)
                .checkpoint_dir(dir)
                .attention(attention.kind)
                .quant_linear(args.quant_linear)
                .device(device)
                .dtype(args.run.dtype())
                .build()?;
            let defaults = T2vRequest::for_model(kind, &args.prompt);
            let request = T2vRequest {
                resolution: args.resolution.unwrap_or(defaults.resolution),
                aspect_ratio: args.aspect_ratio.unwrap_or(defaults.aspect_ratio),
                ..defaults
            };
            (pipeline, request, kind.short_name())
        }
    };
    let pipeline = common::on_ranks(pipeline.with_loras(args.lora.loras()?)?, launch.as_ref());
    args.sampler.apply(&mut request)?;
    request.seed = args.run.seed;
    request.fps = args.run.fps.unwrap_or(request.fps);
    if let Some(frames) = args.num_frames {
        request.frames = frames;
    }
    let output = args.run.output("t2v", model_name, request.fps)?;
    let mut progress = common::Console::for_rank(interrupt.clone(), rank);
    let written = common::exit_if_cancelled(pipeline.text_to_video_file(
        &request,
        &output,
        Mp4Options::default(),
        &mut progress,
    ))?;
    if rank == 0 {
        common::report_written(
            &written,
            request.geometry()?,
            request.fps,
            progress.elapsed(),
        );
    }
    Ok(())
}
