//! Loads a DiT from a safetensors file and reports the process's resident memory growth against
//! the sum of the model's tensor sizes, so that what loading costs is a measured number.
//!
//! ```text
//! cargo run --release --example dit_memory -- --dim 512 --layers 8
//! ```
//!
//! The model has seeded random weights in the TurboDiffusion layout, written to a temporary
//! file first. Safetensors are memory-mapped while loading; the weights end up in the model's own
//! buffers (converted to `--dtype`), and the mapping is released once loading returns.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Parser;
use turbodiffusion::attention::{Attention, AttentionConfig};
use turbodiffusion::core::parse_dtype;
use turbodiffusion::models::wan::{expected_tensors, ModelType, PatchLayout, WanConfig, WanModel};
use turbodiffusion::pipeline::RandomCheckpoint;
use turbodiffusion::AttentionKind;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value_t = 512)]
    dim: usize,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    /// The dtype the model is loaded in.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
}

/// Resident set size of this process in bytes (Linux `/proc/self/statm`).
fn resident_bytes() -> Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("statm has no resident field")?
        .parse()?;
    Ok(pages * 4096)
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = WanConfig {
        model_type: ModelType::T2v,
        dim: args.dim,
        ffn_dim: 4 * args.dim,
        freq_dim: 256,
        text_dim: args.dim,
        text_len: 512,
        in_dim: 16,
        out_dim: 16,
        num_heads: args.dim / 128,
        num_layers: args.layers,
        eps: 1e-6,
    };
    let attention = AttentionConfig::new(AttentionKind::sla(0.1)?);
    let specs =
        expected_tensors::<Box<dyn Attention>>(&cfg, PatchLayout::Linear, &attention, args.dtype);
    let weight_bytes: usize = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>() * s.dtype.size_in_bytes())
        .sum();
    let path = std::env::temp_dir().join(format!("dit_memory_{}.safetensors", std::process::id()));
    // The weights file is as large as the model: Ctrl-C or SIGTERM removes it too.
    let on_signal = path.clone();
    ctrlc::set_handler(move || {
        let _ = std::fs::remove_file(&on_signal);
        std::process::exit(130);
    })?;
    let result = RandomCheckpoint::new(0, specs.into_iter().map(|s| (s.name, s.shape)))
        .save_safetensors(&path, DType::F32)
        .map_err(anyhow::Error::from)
        .and_then(|()| measure(&path, &cfg, &attention, args.dtype, weight_bytes));
    // Removed on every exit path, a failed write included.
    std::fs::remove_file(&path).ok();
    result
}

fn measure(
    path: &PathBuf,
    cfg: &WanConfig,
    attention: &AttentionConfig,
    dtype: DType,
    weight_bytes: usize,
) -> Result<()> {
    let file_bytes = std::fs::metadata(path)?.len();
    let before = resident_bytes()?;
    let model = WanModel::<Box<dyn Attention>>::from_checkpoint(
        path,
        Some(cfg),
        attention,
        dtype,
        &Device::Cpu,
    )?;
    let after = resident_bytes()?;
    let mb = |b: f64| b / 1e6;
    println!(
        "DiT dim {} × {} layers in {dtype:?}: file {:.1} MB, sum of tensor sizes {:.1} MB, resident growth {:.1} MB ({:.2}× the tensors)",
        cfg.dim,
        cfg.num_layers,
        mb(file_bytes as f64),
        mb(weight_bytes as f64),
        mb(after.saturating_sub(before) as f64),
        after.saturating_sub(before) as f64 / weight_bytes as f64
    );
    drop(model);
    Ok(())
}
