//! LoRA adapters on a resident Wan DiT, runnable anywhere: the base DiT and the adapters are the
//! small golden files in `fixtures/golden/` (computed by the upstream model with the merge rule
//! in the base file's config). Each adapter is switched in with `WanModel::set_loras` (the base
//! weights stay resident) and the velocity compared with the reference output.
//!
//! ```text
//! cargo run --release --example lora
//! cargo run --release --example lora -- --lora fixtures/golden/lora_peft.safetensors:0.5 --mode branch
//! # the cost on this machine of a rank-32 adapter on one linear of the 14B's shapes:
//! cargo run --release --example lora -- --cost --tokens 256
//! ```

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use clap::Parser;
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::golden::{golden_dir, relative_error, GoldenFile};
use turbodiffusion::models::lora::{LoraAdapter, LoraMode};
use turbodiffusion::models::wan::{WanConfig, WanModel};
use turbodiffusion::pipeline::parse_lora_arg;
use turbodiffusion::quant::{Linear, LowRank, Module};
use turbodiffusion::{Attention, AttentionKind};

#[derive(Parser, Debug)]
#[command(about = "Switch LoRA adapters on a resident Wan DiT (the golden base model)")]
struct Args {
    /// The base DiT: a golden file (weights, `in.*` inputs, `out.*` references, config).
    #[arg(long, default_value_os_t = golden_dir().join("lora.safetensors"))]
    base: PathBuf,
    /// FILE[:STRENGTH], repeatable; default: every adapter the base file's config lists, at its
    /// `lora_strength`.
    #[arg(long)]
    lora: Vec<String>,
    /// merge (into the weights) or branch (a low-rank term beside them).
    #[arg(long, default_value = "merge")]
    mode: String,
    /// Instead: time merging a rank-`--rank` adapter into one linear of each of the 14B's
    /// shapes, and its forward on `--tokens` rows with and without the run-time branch, float
    /// and W8A8, on the CPU.
    #[arg(long)]
    cost: bool,
    #[arg(long, default_value_t = 32)]
    rank: usize,
    #[arg(long, default_value_t = 256)]
    tokens: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.cost {
        return print_costs(args.rank, args.tokens);
    }
    let mode = match args.mode.as_str() {
        "merge" => LoraMode::Merge,
        "branch" => LoraMode::Branch,
        other => anyhow::bail!("--mode {other}: expected merge or branch"),
    };
    let base = GoldenFile::from_path(&args.base)?;
    let cfg = WanConfig::from_value(base.config())?;
    let vb = VarBuilder::from_tensors(base.weights()?, DType::F32, &Device::Cpu);
    let attention = AttentionConfig::new(AttentionKind::Original);
    let mut model = WanModel::<Box<dyn Attention>>::load(vb, &cfg, &attention)?;
    let (x, context) = (base.tensor("in.x")?, base.tensor("in.context")?);
    let t = f64::from(base.tensor("in.t")?.to_vec1::<f32>()?[0]);
    let velocity = |model: &WanModel<Box<dyn Attention>>| model.forward(&x, t, &context, None);
    let without = velocity(&model)?;
    for (file, strength) in adapters(&args, &base)? {
        let adapter = LoraAdapter::open(&file).with_context(|| format!("{}", file.display()))?;
        let (layout, targets) = (adapter.layout(), adapter.targets().len());
        let started = Instant::now();
        let summary = model.set_loras(&[adapter.at(strength)], mode)?;
        let switch = started.elapsed();
        let with = velocity(&model)?;
        println!(
            "{} ({layout:?}, {targets} targets) at {strength}: {summary:?} in {switch:.2?}; \
             output moved by {:.3e} (relative)",
            file.display(),
            relative_error(&with, &without)?
        );
        for reference in ["out.velocity_lora", "out.velocity_lora_no_diff"] {
            if let Ok(want) = base.tensor(reference) {
                println!(
                    "  against {reference}: {:.3e}",
                    relative_error(&with, &want)?
                );
            }
        }
    }
    model.set_loras(&[], mode)?;
    println!(
        "adapters cleared: {:.1e} from the base output",
        relative_error(&velocity(&model)?, &without)?
    );
    Ok(())
}

/// `--lora`, or every adapter file listed in the base file's config at its `lora_strength`.
fn adapters(args: &Args, base: &GoldenFile) -> Result<Vec<(PathBuf, f64)>> {
    if !args.lora.is_empty() {
        return Ok(args
            .lora
            .iter()
            .map(|a| parse_lora_arg(a))
            .collect::<Result<_, _>>()?);
    }
    let strength = base.config_f64(&["lora_strength"])?;
    let folder = args.base.parent().context("the base file has no folder")?;
    let files = base
        .config_value(&["files"])?
        .as_object()
        .context("config `files`")?;
    Ok(files
        .keys()
        .map(|file| (folder.join(file), strength))
        .collect())
}

/// Median milliseconds of five runs of `run` after one.
fn median_ms(mut run: impl FnMut() -> Result<()>) -> Result<f64> {
    run()?;
    let mut times = (0..5)
        .map(|_| {
            let started = Instant::now();
            run().map(|()| started.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[2])
}

/// The CPU cost of a rank-`rank` adapter on one linear of each of the 14B's shapes (q/k/v/o,
/// `ffn.0`, `ffn.2`): merging it (`up·down` added in f32), and the forward of `tokens` rows
/// with the weight alone and with the run-time low-rank term, float and W8A8.
fn print_costs(rank: usize, tokens: usize) -> Result<()> {
    let device = Device::Cpu;
    println!("rank {rank}, {tokens} rows, f32 on the CPU, median of 5 (ms)");
    println!("| K × N | merge | float | float + branch | W8A8 | W8A8 + branch |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (k, n) in [(5120, 5120), (5120, 13824), (13824, 5120)] {
        let weight = (Tensor::randn(0f32, 1.0, (n, k), &device)? * 0.02)?;
        let down = (Tensor::randn(0f32, 1.0, (rank, k), &device)? * 0.01)?;
        let up = (Tensor::randn(0f32, 1.0, (n, rank), &device)? * 0.01)?;
        let x = Tensor::randn(0f32, 1.0, (tokens, k), &device)?;
        let float = Linear::from_float(weight.clone(), None)?;
        let int8 = Linear::quantize(&weight, None)?;
        let branch = LowRank::new(down.clone(), up.clone())?;
        let merge = median_ms(|| {
            float.with_weight_delta(&up.matmul(&down)?)?;
            Ok(())
        })?;
        let forward = |layer: &Linear| median_ms(|| Ok(layer.forward(&x).map(drop)?));
        println!(
            "| {k} × {n} | {merge:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
            forward(&float)?,
            forward(&float.with_low_rank(branch.clone())?)?,
            forward(&int8)?,
            forward(&int8.with_low_rank(branch)?)?,
        );
    }
    Ok(())
}
