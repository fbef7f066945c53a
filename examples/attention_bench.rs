//! Times the attention modes and measures their error against dense attention.
//!
//! ```text
//! cargo run --release --example attention_bench -- --seq-len 1024,4096 --json bench.json
//! ```
//!
//! For every sequence length it draws Gaussian q, k, v `[B, L, H, D]` (keys share an offset, as
//! real keys do), computes dense attention once as the reference, then times every requested
//! mode (median of `--iters` runs after `--warmup`) and prints one row per (mode, topk, L):
//! time, relative L2 error against dense, and the fraction of key blocks computed exactly.
//! SLA's `proj_l` is zero here, so the error measures the sparse approximation alone.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::json;
use turbodiffusion::attention::{
    Attention, BlockSizes, DenseAttention, ProjL, SageSlaAttention, SlaAttention, SlaConfig,
};
use turbodiffusion::core::{parse_dtype, DeviceSpec};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the original, sla and sagesla attention modes")]
struct Args {
    /// Modes to time: original, sla, sagesla.
    #[arg(long, value_delimiter = ',', default_value = "original,sla,sagesla")]
    modes: Vec<String>,
    /// Top-k fractions for sla and sagesla.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.15")]
    topk: Vec<f64>,
    /// Sequence lengths (tokens).
    #[arg(long, value_delimiter = ',', default_value = "1024,4096")]
    seq_len: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    #[arg(long, default_value_t = 12)]
    heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    #[arg(long, default_value_t = 128)]
    block_q: usize,
    #[arg(long, default_value_t = 64)]
    block_k: usize,
    /// Offset shared by all keys (real post-RoPE keys have a large common component).
    #[arg(long, default_value_t = 1.0)]
    key_offset: f64,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32", value_parser = parse_dtype)]
    dtype: DType,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    iters: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Row {
    mode: &'static str,
    topk: Option<f64>,
    seq_len: usize,
    median_ms: f64,
    min_ms: f64,
    relative_error: f64,
    density: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.iters > 0, "--iters must be at least 1");
    let device = args
        .device
        .open()
        .with_context(|| format!("opening device {}", args.device))?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let blocks = BlockSizes::new(args.block_q, args.block_k)?;
    println!(
        "attention_bench: device {}, dtype {:?}, B {} H {} D {}, blocks q{}/k{}, median of {} runs after {} warm-up",
        args.device, args.dtype, args.batch, args.heads, args.head_dim, blocks.query, blocks.key, args.iters, args.warmup
    );
    println!(
        "{:<8} {:>6} {:>7} {:>11} {:>11} {:>12} {:>8}",
        "mode", "topk", "L", "median ms", "min ms", "rel err", "density"
    );
    let mut rows = Vec::new();
    for &seq_len in &args.seq_len {
        for row in bench_length(&args, &device, blocks, seq_len, &mut rng)? {
            println!(
                "{:<8} {:>6} {:>7} {:>11.3} {:>11.3} {:>12.3e} {:>8.4}",
                row.mode,
                row.topk.map_or("-".to_owned(), |t| t.to_string()),
                row.seq_len,
                row.median_ms,
                row.min_ms,
                row.relative_error,
                row.density
            );
            rows.push(row);
        }
    }
    if let Some(path) = &args.json {
        write_json(path, &args, &rows)?;
    }
    Ok(())
}

fn bench_length(
    args: &Args,
    device: &Device,
    blocks: BlockSizes,
    seq_len: usize,
    rng: &mut StdRng,
) -> Result<Vec<Row>> {
    let dims = (args.batch, seq_len, args.heads, args.head_dim);
    let mut gaussian = || -> Result<Tensor> {
        let values: Vec<f32> = StandardNormal
            .sample_iter(&mut *rng)
            .take(dims.0 * dims.1 * dims.2 * dims.3)
            .collect();
        Ok(Tensor::from_vec(values, dims, device)?.to_dtype(args.dtype)?)
    };
    let (q, v) = (gaussian()?, gaussian()?);
    let k = (gaussian()? + args.key_offset)?;
    let dense = DenseAttention::default();
    let reference = dense.forward(&q, &k, &v)?;
    let mut rows = Vec::new();
    for mode in &args.modes {
        let candidates: Vec<(Box<dyn Attention>, f64)> = match mode.as_str() {
            "original" => vec![(Box::new(dense.clone()), 1.0)],
            "sla" | "sagesla" => args
                .topk
                .iter()
                .map(|&topk| sparse_mode(mode, topk, blocks, args.head_dim, device, seq_len))
                .collect::<Result<_>>()?,
            other => anyhow::bail!("unknown mode `{other}`: expected original, sla or sagesla"),
        };
        for (attention, density) in candidates {
            let (median_ms, min_ms, output) =
                time(args, device, || Ok(attention.forward(&q, &k, &v)?))?;
            rows.push(Row {
                mode: attention.kind().name(),
                topk: attention.kind().topk(),
                seq_len,
                median_ms,
                min_ms,
                relative_error: relative_error(&output, &reference)?,
                density,
            });
        }
    }
    Ok(rows)
}

fn sparse_mode(
    mode: &str,
    topk: f64,
    blocks: BlockSizes,
    head_dim: usize,
    device: &Device,
    seq_len: usize,
) -> Result<(Box<dyn Attention>, f64)> {
    let cfg = SlaConfig::with_blocks(topk, blocks)?;
    let proj_l = ProjL::zeros(head_dim, device)?;
    let attention: Box<dyn Attention> = match mode {
        "sla" => Box::new(SlaAttention::new(cfg, proj_l)),
        _ => Box::new(SageSlaAttention::new(cfg, proj_l)),
    };
    Ok((attention, cfg.density(seq_len)))
}

/// Median and minimum wall time in milliseconds, and the last output.
fn time(
    args: &Args,
    device: &Device,
    mut run: impl FnMut() -> Result<Tensor>,
) -> Result<(f64, f64, Tensor)> {
    for _ in 0..args.warmup {
        run()?;
    }
    device.synchronize()?;
    let mut times = Vec::with_capacity(args.iters);
    let mut output = None;
    for _ in 0..args.iters {
        let start = Instant::now();
        let out = run()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
        output = Some(out);
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0], output.expect("iters > 0")))
}

fn relative_error(got: &Tensor, want: &Tensor) -> Result<f64> {
    let (got, want) = (got.to_dtype(DType::F64)?, want.to_dtype(DType::F64)?);
    let diff = (&got - &want)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let norm = want.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((diff / norm).sqrt())
}

/// Writes the rows next to the settings, through a temporary file so that a failure leaves no
/// partial JSON behind.
fn write_json(path: &PathBuf, args: &Args, rows: &[Row]) -> Result<()> {
    let rows: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "mode": r.mode, "topk": r.topk, "seq_len": r.seq_len, "median_ms": r.median_ms,
                "min_ms": r.min_ms, "relative_error": r.relative_error, "density": r.density,
            })
        })
        .collect();
    let report = json!({
        "device": args.device.to_string(), "dtype": format!("{:?}", args.dtype),
        "batch": args.batch, "heads": args.heads, "head_dim": args.head_dim,
        "block_q": args.block_q, "block_k": args.block_k, "key_offset": args.key_offset,
        "warmup": args.warmup, "iters": args.iters, "rows": rows,
    });
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}
