//! The GPU benchmark: attention, linears, one DiT forward, VAE decode and a whole 4-step
//! text-to-video, timed with CUDA events (warm-up, then the median of `--iters` runs) on fresh
//! random inputs and seeded random weights, with peak device memory.
//!
//! ```text
//! cargo build --release --features cuda --example bench
//! bench --sections attention,linear,dit,vae,t2v --json bench.json --markdown bench.md
//! bench --sections t2v --t2v-model 14b --t2v-size 1280x720
//! bench --sections i2v --i2v-size 1280x720
//! bench --sections lora --dit-model 14b --dit-attention sagesla:0.1 --lora-rank 32
//! bench --sections e2e --e2e-model 1.3b --e2e-dir /tmp/turbo-e2e
//! bench --sections multi-gpu --json bench_1gpu.json     # then, built with --features nccl:
//! scripts/multi-gpu.sh 4 bench --sections multi-gpu --multi-gpu-baseline bench_1gpu.json
//! ```
//!
//! Under a multi-GPU launch (`WORLD_SIZE` > 1) every rank runs the sections on its own GPU,
//! `cuda:LOCAL_RANK`, and rank 0 alone prints the table and writes the files; the
//! `multi-gpu` section runs its videos on all ranks together (`multi_gpu.rs`).
//!
//! The `t2v` and `i2v` rows give each stage's measured peak device memory beside the
//! pipeline's estimate for it (`Pipeline::estimate_memory`).
//!
//! Every row says what ran, at which shape and settings; the header says on which device.
//! "TFLOPS" counts the work actually done: for attention 4·B·H·L·(keys attended)·D (the
//! sparse branch's keys for sla / sagesla; the linear branch is not counted), for linears
//! 2·M·N·K.

mod e2e;
mod multi_gpu;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, ValueEnum};
use serde_json::json;
use turbodiffusion::attention::{
    Attention, AttentionConfig, AttentionKernel, BlockSizes, DenseAttention, DenseConfig, ProjL,
    SageSlaAttention, SlaAttention, SlaConfig,
};
use turbodiffusion::core::{
    memory_usage, reset_peak_memory, DeviceSpec, FrameCount, MemoryUsage, Stage, StageReport,
};
use turbodiffusion::models::lora::{LoraAdapter, LoraMode, ScaledLora};
use turbodiffusion::models::wan::{
    expected_tensors, PatchLayout, QuantPolicy, WanConfig, WanModel,
};
use turbodiffusion::models::{Vae22Config, VaeConfig, Wan22Vae, WanVae};
use turbodiffusion::pipeline::{
    I2vRequest, Launched, MemoryEstimate, ModelKind, RandomCheckpoint, Residency, SamplerChoice,
};
use turbodiffusion::quant::{
    gemm_kernel, int8_matmul_with, set_gemm_kernel, GemmKernel, Int8Weight, Linear, Module,
};
use turbodiffusion::video::{InputImage, Video};
use turbodiffusion::{AttentionKind, Pipeline, T2vRequest};

#[derive(Parser, Debug)]
#[command(about = "Time attention, linears, the DiT, the VAE and a whole video on a GPU")]
struct Args {
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "attention,linear,dit,vae,t2v"
    )]
    sections: Vec<Section>,
    /// The model of the `t2v` section.
    #[arg(long, default_value = "1.3b")]
    t2v_model: ModelShape,
    /// Frame size of the `t2v` section, WIDTHxHEIGHT.
    #[arg(long, default_value = "832x480", value_parser = parse_size)]
    t2v_size: (usize, usize),
    /// Frame size of the `i2v` section, WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720", value_parser = parse_size)]
    i2v_size: (usize, usize),
    /// Model of the `i2v` section.
    #[arg(long, default_value = "a14b")]
    i2v_model: I2vModel,
    /// Frames of the `t2v` and `i2v` videos (4n + 1).
    #[arg(long, default_value_t = 81)]
    video_frames: usize,
    /// Skip the untimed first run of the `t2v` and `i2v` sections (for the large models,
    /// where it doubles the time).
    #[arg(long)]
    skip_cold_run: bool,
    /// Memory budget of the `t2v` and `i2v` pipelines in GiB, instead of the device's free
    /// memory: a stage over it fails before loading, and a decode over it is tiled.
    #[arg(long)]
    memory_budget_gib: Option<f64>,
    /// Model shapes for the attention and linear rows.
    #[arg(long, value_delimiter = ',', default_value = "1.3b,14b")]
    shapes: Vec<ModelShape>,
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1,0.15")]
    topk: Vec<f64>,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Runs of the slow rows (DiT forward, VAE decode) after one warm-up.
    #[arg(long, default_value_t = 3)]
    slow_iters: usize,
    #[arg(long, default_value = "cuda")]
    device: DeviceSpec,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Attention kinds of the DiT rows.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "original,sla:0.1,sagesla:0.1"
    )]
    dit_attention: Vec<AttentionKind>,
    /// Linears of the DiT rows: bf16, w8a8.
    #[arg(long, value_delimiter = ',', default_value = "bf16,w8a8")]
    dit_linears: Vec<Linears>,
    /// Model of the DiT rows: 1.3b (480p) or 14b (720p), 81 frames.
    #[arg(long, default_value = "1.3b")]
    dit_model: ModelShape,
    /// Denoising steps of the teachers (the `ti2v` section, and the `i2v` section's Wan2.1
    /// models; published: 40–50), whose rows then give the denoise stage for those steps.
    #[arg(long, default_value_t = 4)]
    teacher_steps: usize,
    /// Model of the `e2e` section: 1.3b or 14b (text to video at `--t2v-size`) or a14b-i2v
    /// (image to video at `--i2v-size`), `--video-frames` frames.
    #[arg(long, default_value = "1.3b")]
    e2e_model: e2e::E2eModel,
    /// Where the `e2e` section writes its random weights in the released formats (kept, and
    /// reused by a later run with the same model and seed) and its videos.
    #[arg(long, default_value = "/tmp/turbo-e2e")]
    e2e_dir: PathBuf,
    /// New processes the `e2e` section starts, one after the other.
    #[arg(long, default_value_t = 2)]
    e2e_processes: usize,
    /// Videos each `e2e` process makes on its one pipeline.
    #[arg(long, default_value_t = 2)]
    e2e_requests: usize,
    /// What the `e2e` pipeline keeps loaded between requests: none, text-encoder (umT5 on
    /// the device), all (umT5, the DiT and the VAE).
    #[arg(long, default_value = "none")]
    e2e_residency: e2e::E2eResidency,
    /// The DiT's linears of the `e2e` section: w8a8 (TurboDiffusion's `-quant.pth` files) or
    /// bf16 (its float `.pth` files).
    #[arg(long, default_value = "w8a8")]
    e2e_linears: e2e::E2eLinears,
    /// Run as the `e2e` section's child process.
    #[arg(long, hide = true)]
    e2e_child: bool,
    /// Rows of the `vae` section: all, decode (the three decodes) or encode (the I2V image
    /// encode on a held video and of the whole video, and the FLF2V encode of two images),
    /// e.g. to profile one of them alone.
    #[arg(long, default_value = "all")]
    vae_rows: VaeRows,
    /// Rank of the random LoRA of the `lora` section (on every block linear of `--dit-model`,
    /// with the first of `--dit-attention`).
    #[arg(long, default_value_t = 32)]
    lora_rank: usize,
    /// Frame size of the `multi-gpu` section's videos (Wan2.1 14B T2V, Wan2.2 A14B I2V),
    /// WIDTHxHEIGHT.
    #[arg(long, default_value = "1280x720", value_parser = parse_size)]
    multi_gpu_size: (usize, usize),
    /// The `--json` of a 1-GPU `multi-gpu` run: the rows then give the speedup over it and
    /// the scaling efficiency.
    #[arg(long)]
    multi_gpu_baseline: Option<PathBuf>,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// The W8A8 GEMM kernel of every W8A8 product in the run's models (`dit`, `e2e` and the
    /// video sections): one of the `linear` section's kernels, e.g. `wgmma`, `wgmma-cvt`. The
    /// `linear` section times each of them regardless.
    #[arg(long)]
    w8a8_gemm: Option<GemmKernel>,
    /// The library's log messages shown on stderr, from this level up: error, warn, info,
    /// debug (e.g. each cuBLASLt algorithm timing), trace.
    #[arg(long, default_value = "warn")]
    log: tracing::Level,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    Attention,
    Linear,
    Dit,
    Vae,
    T2v,
    I2v,
    Ti2v,
    Lora,
    E2e,
    MultiGpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Linears {
    Bf16,
    W8a8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ModelShape {
    #[value(name = "1.3b")]
    Wan1_3B,
    #[value(name = "14b")]
    Wan14B,
}

impl ModelShape {
    /// Tokens (81 frames at 480p for 1.3B, 720p for 14B) and heads.
    fn attention(self) -> (usize, usize) {
        match self {
            Self::Wan1_3B => (32_760, 12),
            Self::Wan14B => (75_600, 40),
        }
    }

    /// The DiT's configuration, a name for tables, its latent [C, F, H, W] (81 frames at 480p
    /// for 1.3B, 720p for 14B) and a description of it.
    fn dit(self) -> (WanConfig, &'static str, [usize; 4], &'static str) {
        match self {
            Self::Wan1_3B => (
                WanConfig::wan21_t2v_1_3b(),
                "Wan2.1-1.3B",
                [16, 21, 60, 104],
                "480p, 81 frames (32 760 tokens)",
            ),
            Self::Wan14B => (
                WanConfig::wan21_t2v_14b(),
                "Wan2.1-14B",
                [16, 21, 90, 160],
                "720p, 81 frames (75 600 tokens)",
            ),
        }
    }

    /// (M, [(K, N)]) of the block linears: q/k/v/o, ffn.0, ffn.2.
    fn linears(self) -> (usize, [(usize, usize); 3]) {
        match self {
            Self::Wan1_3B => (32_760, [(1536, 1536), (1536, 8960), (8960, 1536)]),
            Self::Wan14B => (75_600, [(5120, 5120), (5120, 13824), (13824, 5120)]),
        }
    }
}

/// `WIDTHxHEIGHT`.
fn parse_size(text: &str) -> std::result::Result<(usize, usize), String> {
    let parse = |side: &str| side.trim().parse::<usize>().map_err(|e| e.to_string());
    match text.split_once(['x', 'X']) {
        Some((width, height)) => Ok((parse(width)?, parse(height)?)),
        None => Err(format!("`{text}`: expected WIDTHxHEIGHT, as 1280x720")),
    }
}

/// One measured row.
struct Row {
    section: &'static str,
    what: String,
    shape: String,
    ms: f64,
    note: String,
    peak: Option<u64>,
    /// The pipeline's estimate of the peak, for the stages of a video.
    estimate: Option<u64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let _ = tracing_subscriber::fmt()
        .with_max_level(args.log)
        .with_writer(std::io::stderr)
        .try_init();
    let launch = Launched::from_env()?;
    // Only rank 0 of a multi-GPU launch prints and writes files.
    let reporting = launch.as_ref().is_none_or(|launch| launch.rank() == 0);
    let device = match &launch {
        Some(launch) => launch.device.clone(),
        None => args.device.open()?,
    };
    if let Some(kernel) = args.w8a8_gemm {
        set_gemm_kernel(kernel);
    }
    if args.e2e_child {
        return e2e::e2e_child(&device, &args);
    }
    let bench = Bench {
        device: device.clone(),
        warmup: args.warmup,
        iters: args.iters,
    };
    let header = device_header(&device)?;
    if reporting {
        println!("{header}");
        println!(
            "timing: CUDA events, {} warm-up + median of {} runs ({} for DiT/VAE); bf16; seed {}; \
             W8A8 GEMM in the models: {}",
            args.warmup,
            args.iters,
            args.slow_iters,
            args.seed,
            gemm_kernel().name()
        );
    }
    let mut rows = Vec::new();
    for section in &args.sections {
        let start = rows.len();
        match section {
            Section::Attention => {
                for &shape in &args.shapes {
                    attention_rows(&bench, shape, &args.topk, &mut rows)?;
                }
            }
            Section::Linear => {
                for &shape in &args.shapes {
                    linear_rows(&bench, shape, &mut rows)?;
                }
            }
            Section::Dit => dit_rows(&bench.slow(args.slow_iters), &args, &mut rows)?,
            Section::Vae => vae_rows(
                &bench.slow(args.slow_iters),
                args.seed,
                args.vae_rows,
                &mut rows,
            )?,
            Section::T2v => t2v_rows(&device, &args, &mut rows)?,
            Section::I2v => i2v_rows(&device, &args, &mut rows)?,
            Section::Ti2v => ti2v_rows(&device, &args, &mut rows)?,
            Section::Lora => lora_rows(&bench.slow(args.slow_iters), &args, &mut rows)?,
            Section::E2e => e2e::e2e_rows(&device, &args, &mut rows)?,
            Section::MultiGpu => {
                multi_gpu::multi_gpu_rows(&device, launch.as_ref(), &args, &mut rows)?
            }
        }
        for row in rows[start..].iter().filter(|_| reporting) {
            println!("{}", markdown_row(row));
        }
    }
    if !reporting {
        return Ok(());
    }
    let table = markdown_table(&header, &rows);
    println!("\n{table}");
    if let Some(path) = &args.markdown {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json {
        write_json(path, &header, &rows)?;
    }
    Ok(())
}

/// Times closures on one device.
struct Bench {
    device: Device,
    warmup: usize,
    iters: usize,
}

impl Bench {
    fn slow(&self, iters: usize) -> Self {
        Self {
            device: self.device.clone(),
            warmup: 1,
            iters,
        }
    }

    /// Median milliseconds of `run` after the warm-up; CUDA events on a GPU.
    fn median_ms(&self, mut run: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..self.warmup {
            run()?;
        }
        let mut times = (0..self.iters.max(1))
            .map(|_| self.time_once(&mut run))
            .collect::<Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    fn time_once(&self, run: &mut impl FnMut() -> Result<()>) -> Result<f64> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = &self.device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let stream = cuda.cuda_stream();
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            run()?;
            let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            end.synchronize()?;
            return Ok(f64::from(start.elapsed_ms(&end)?));
        }
        let start = Instant::now();
        run()?;
        self.device.synchronize()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    }

    /// Runs `run` once from a fresh peak and returns its peak device memory.
    fn peak_of(&self, run: impl FnOnce() -> Result<()>) -> Result<Option<u64>> {
        reset_peak_memory(&self.device)?;
        run()?;
        Ok(memory_usage(&self.device)?.map(|m| m.peak))
    }
}

fn device_header(device: &Device) -> Result<String> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        let context = cuda.cuda_stream().context().clone();
        let (free, total) = context.mem_get_info()?;
        use candle_core::cuda_backend::cudarc::driver::sys;
        let mut version = 0i32;
        // SAFETY: a plain query writing one integer.
        let driver = match unsafe { sys::cuDriverGetVersion(&mut version) } {
            sys::CUresult::CUDA_SUCCESS => format!("{}.{}", version / 1000, (version % 1000) / 10),
            _ => "unknown".to_owned(),
        };
        return Ok(format!(
            "device: {} (CUDA driver API {driver}, {:.1} GiB, {:.1} GiB free at start)",
            context.name()?,
            MemoryUsage::gib(total as u64),
            MemoryUsage::gib(free as u64)
        ));
    }
    Ok(format!("device: {device:?}"))
}

fn randn(dims: &[usize], offset: f64, device: &Device) -> Result<Tensor> {
    Ok((Tensor::randn(0f32, 1.0, dims, device)? + offset)?.to_dtype(DType::BF16)?)
}

fn attention_rows(
    bench: &Bench,
    shape: ModelShape,
    topks: &[f64],
    rows: &mut Vec<Row>,
) -> Result<()> {
    let (tokens, heads) = shape.attention();
    let dims = [1, tokens, heads, 128];
    let device = &bench.device;
    // Keys share an offset, as real (post-RoPE) keys do.
    let (q, k, v) = (
        randn(&dims, 0.0, device)?,
        randn(&dims, 1.0, device)?,
        randn(&dims, 0.0, device)?,
    );
    let proj_weight = (Tensor::randn(0f32, 0.05, (128, 128), device)?).to_dtype(DType::F32)?;
    let proj_l = ProjL::new(&proj_weight, &Tensor::zeros(128, DType::F32, device)?)?;
    let key_blocks = tokens.div_ceil(BlockSizes::default().key);
    let mut ops: Vec<(String, Box<dyn Attention>, usize)> = Vec::new();
    for kernel in AttentionKernel::ALL {
        let dense = DenseConfig {
            kernel,
            ..DenseConfig::default()
        };
        ops.push((
            format!("original ({})", kernel.name()),
            Box::new(DenseAttention::new(dense)),
            tokens,
        ));
    }
    for &topk in topks {
        let cfg = SlaConfig::new(topk)?;
        let keys = cfg.selected_blocks(key_blocks) * BlockSizes::default().key;
        for kernel in AttentionKernel::ALL {
            let cfg = cfg.with_kernel(kernel);
            ops.push((
                format!("sla {topk} ({})", kernel.name()),
                Box::new(SlaAttention::new(cfg, proj_l.clone())),
                keys,
            ));
            ops.push((
                format!("sagesla {topk} ({})", kernel.name()),
                Box::new(SageSlaAttention::new(cfg, proj_l.clone())),
                keys,
            ));
        }
    }
    for (name, op, keys_attended) in ops {
        let ms = bench.median_ms(|| {
            op.forward(&q, &k, &v)?;
            Ok(())
        })?;
        let flops = 4.0 * (heads * tokens * keys_attended * 128) as f64;
        rows.push(Row {
            section: "attention",
            what: name,
            shape: format!("[1, {tokens}, {heads}, 128]"),
            ms,
            note: format!("{:.0} TFLOPS", flops / ms / 1e9),
            peak: None,
            estimate: None,
        });
    }
    Ok(())
}

fn linear_rows(bench: &Bench, shape: ModelShape, rows: &mut Vec<Row>) -> Result<()> {
    let (m, sizes) = shape.linears();
    let device = &bench.device;
    let x = randn(
        &[m, sizes.iter().map(|s| s.0).max().unwrap_or(0)],
        0.0,
        device,
    )?;
    for (k, n) in sizes {
        let x = x.narrow(1, 0, k)?.contiguous()?;
        let w = (randn(&[n, k], 0.0, device)? * 0.02)?;
        let weight = Int8Weight::quantize(&w)?;
        let bias = randn(&[n], 0.0, device)?;
        let flops = 2.0 * (m * n * k) as f64;
        let shape = format!("M {m}, K {k}, N {n}");
        let w_t = w.t()?;
        let candle_ms = bench.median_ms(|| {
            x.matmul(&w_t)?.broadcast_add(&bias)?;
            Ok(())
        })?;
        let layer = Linear::from_float(w.clone(), Some(bias.clone()))?;
        let bf16_ms = bench.median_ms(|| {
            layer.forward(&x)?;
            Ok(())
        })?;
        for (what, ms, note) in [
            (
                "bf16 x.matmul(wᵀ) + bias (candle, cuBLAS)",
                candle_ms,
                String::new(),
            ),
            (
                "bf16 Linear (cuBLASLt, bias in the epilogue)",
                bf16_ms,
                format!(", {:.2}× candle", candle_ms / bf16_ms),
            ),
        ] {
            rows.push(Row {
                section: "linear",
                what: what.into(),
                shape: shape.clone(),
                ms,
                note: format!("{:.0} TFLOPS{note}", flops / ms / 1e9),
                peak: None,
                estimate: None,
            });
        }
        for kernel in GemmKernel::ALL {
            let int8_ms = bench.median_ms(|| {
                int8_matmul_with(&x, weight.int8_weight(), weight.scale(), kernel)?;
                Ok(())
            })?;
            rows.push(Row {
                section: "linear",
                what: format!("W8A8 {} (quantise + int8 GEMM + epilogue)", kernel.name()),
                shape: shape.clone(),
                ms: int8_ms,
                note: format!(
                    "{:.0} TOPS, {:.2}× the bf16 Linear",
                    flops / int8_ms / 1e9,
                    bf16_ms / int8_ms
                ),
                peak: None,
                estimate: None,
            });
        }
    }
    Ok(())
}

/// Wan2.1-1.3B at 480p, 81 frames: latent [16, 21, 60, 104], 32 760 tokens.
fn dit_rows(bench: &Bench, args: &Args, rows: &mut Vec<Row>) -> Result<()> {
    let device = &bench.device;
    let (cfg, model_name, latent, shape) = args.dit_model.dit();
    let keys: Vec<(String, Vec<usize>)> = expected_tensors::<Box<dyn Attention>>(
        &cfg,
        PatchLayout::Linear,
        &AttentionConfig::new(AttentionKind::sla(0.1)?),
        DType::BF16,
    )
    .into_iter()
    .map(|spec| (spec.name, spec.shape))
    .collect();
    let x = Tensor::randn(0f32, 1.0, latent.as_slice(), device)?;
    let context = Tensor::randn(0f32, 1.0, (512, cfg.text_dim), device)?.to_dtype(DType::BF16)?;
    for &linears in &args.dit_linears {
        let quant = match linears {
            Linears::Bf16 => QuantPolicy::KeepFloat,
            Linears::W8a8 => QuantPolicy::Quantize,
        };
        for &kind in &args.dit_attention {
            let vb =
                RandomCheckpoint::new(args.seed, keys.clone()).var_builder(DType::BF16, device);
            let model = WanModel::<Box<dyn Attention>>::load_with_quant(
                vb,
                &cfg,
                &AttentionConfig::new(kind),
                quant,
            )?;
            let forward = || -> Result<()> {
                model.forward(&x, 500.0, &context, None)?;
                Ok(())
            };
            let ms = bench.median_ms(forward)?;
            let peak = bench.peak_of(forward)?;
            let quant_name = if quant == QuantPolicy::Quantize {
                "W8A8"
            } else {
                "bf16"
            };
            rows.push(Row {
                section: "dit",
                what: format!("{model_name} forward, {kind}, {quant_name} linears"),
                shape: shape.into(),
                ms,
                note: String::new(),
                peak,
                estimate: None,
            });
        }
    }
    Ok(())
}

/// A LoRA of `--lora-rank` on every block linear of `--dit-model`: the time to merge it into the
/// bf16 weights (a switch on a resident model: put the base back, merge), and one DiT forward
/// with it merged, run beside the bf16 weights, and run beside the W8A8 int8 GEMM (a `-quant`
/// file's only option), each with the forward without LoRA for comparison.
fn lora_rows(bench: &Bench, args: &Args, rows: &mut Vec<Row>) -> Result<()> {
    let device = &bench.device;
    let (cfg, model_name, latent, shape) = args.dit_model.dit();
    let kind = *args
        .dit_attention
        .first()
        .context("--dit-attention is empty")?;
    let attention = AttentionConfig::new(kind);
    let keys: Vec<(String, Vec<usize>)> =
        expected_tensors::<Box<dyn Attention>>(&cfg, PatchLayout::Linear, &attention, DType::BF16)
            .into_iter()
            .map(|spec| (spec.name, spec.shape))
            .collect();
    let lora = [random_lora(&cfg, args.lora_rank, device)?];
    let x = Tensor::randn(0f32, 1.0, latent.as_slice(), device)?;
    let context = Tensor::randn(0f32, 1.0, (512, cfg.text_dim), device)?.to_dtype(DType::BF16)?;
    let r = args.lora_rank;
    let mut row = |what: String, ms: f64, peak: Option<u64>| {
        rows.push(Row {
            section: "lora",
            what: format!("{model_name}, {kind}: {what}"),
            shape: shape.into(),
            ms,
            note: format!("rank {r} on all {} block linears", 10 * cfg.num_layers),
            peak,
            estimate: None,
        })
    };
    for quant in [QuantPolicy::KeepFloat, QuantPolicy::Quantize] {
        let linears = if quant == QuantPolicy::Quantize {
            "W8A8"
        } else {
            "bf16"
        };
        let vb = RandomCheckpoint::new(args.seed, keys.clone()).var_builder(DType::BF16, device);
        let mut model =
            WanModel::<Box<dyn Attention>>::load_with_quant(vb, &cfg, &attention, quant)?;
        let forward = |model: &WanModel<Box<dyn Attention>>| -> Result<()> {
            model.forward(&x, 500.0, &context, None)?;
            Ok(())
        };
        row(
            format!("forward, {linears} linears, no LoRA"),
            bench.median_ms(|| forward(&model))?,
            bench.peak_of(|| forward(&model))?,
        );
        let modes: &[LoraMode] = match quant {
            QuantPolicy::KeepFloat => &[LoraMode::Merge, LoraMode::Branch],
            QuantPolicy::Quantize => &[LoraMode::Merge],
        };
        for &mode in modes {
            let how = match (quant, mode) {
                (QuantPolicy::KeepFloat, LoraMode::Merge) => "merged",
                _ => "run-time low-rank branch",
            };
            let set_ms = bench.median_ms(|| {
                model.set_loras(&lora, mode)?;
                Ok(())
            })?;
            row(
                format!("set_loras ({how}) on {linears} linears"),
                set_ms,
                None,
            );
            let ms = bench.median_ms(|| forward(&model))?;
            row(
                format!("forward, {linears} linears, LoRA {how}"),
                ms,
                bench.peak_of(|| forward(&model))?,
            );
        }
    }
    Ok(())
}

/// A random ComfyUI-layout LoRA of `rank` on every block linear of `cfg` (α = rank), in bf16 on
/// `device`.
fn random_lora(cfg: &WanConfig, rank: usize, device: &Device) -> Result<ScaledLora> {
    let (d, f) = (cfg.dim, cfg.ffn_dim);
    let linears = [
        ("self_attn.q", d, d),
        ("self_attn.k", d, d),
        ("self_attn.v", d, d),
        ("self_attn.o", d, d),
        ("cross_attn.q", d, d),
        ("cross_attn.k", d, d),
        ("cross_attn.v", d, d),
        ("cross_attn.o", d, d),
        ("ffn.0", f, d),
        ("ffn.2", d, f),
    ];
    let mut tensors = Vec::new();
    for block in 0..cfg.num_layers {
        for (name, out_dim, in_dim) in linears {
            let key = format!("diffusion_model.blocks.{block}.{name}");
            let factor = |dims: (usize, usize)| -> Result<Tensor> {
                Ok(Tensor::randn(0f32, 0.01, dims, device)?.to_dtype(DType::BF16)?)
            };
            tensors.push((format!("{key}.lora_down.weight"), factor((rank, in_dim))?));
            tensors.push((format!("{key}.lora_up.weight"), factor((out_dim, rank))?));
            tensors.push((format!("{key}.alpha"), Tensor::new(rank as f32, device)?));
        }
    }
    Ok(LoraAdapter::from_tensors("random-lora.safetensors", tensors, false)?.at(1.0))
}

/// Which rows the `vae` section runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum VaeRows {
    All,
    Decode,
    Encode,
}

impl VaeRows {
    fn decodes(self) -> bool {
        self != Self::Encode
    }

    fn encodes(self) -> bool {
        self != Self::Decode
    }
}

/// The Wan VAE in bf16: the streaming decode of 81 frames at 480p and 720p (and the Wan2.2
/// VAE's), the I2V image encode (an image and 80 zero frames) at 720p, through `encode_image`
/// and, for comparison, through `encode` of the whole video, and FLF2V's encode of two images
/// with 79 zero frames between them (`encode_first_last`).
fn vae_rows(bench: &Bench, seed: u64, which: VaeRows, rows: &mut Vec<Row>) -> Result<()> {
    let device = &bench.device;
    let cfg = VaeConfig::wan21();
    let vb =
        RandomCheckpoint::new(seed, WanVae::expected_keys(&cfg)).var_builder(DType::BF16, device);
    let vae = WanVae::load(vb, &cfg)?;
    let mut push = |what: &str, shape: String, ms: f64, peak| {
        rows.push(Row {
            section: "vae",
            what: what.into(),
            shape,
            ms,
            note: String::new(),
            peak,
            estimate: None,
        })
    };
    let sizes = [("480p", (480, 832)), ("720p", (720, 1280))];
    for (name, (height, width)) in sizes.into_iter().filter(|_| which.decodes()) {
        let (h, w) = (height / 8, width / 8);
        let latent = Tensor::randn(0f32, 1.0, (1, 16, 21, h, w), device)?.to_dtype(DType::BF16)?;
        let decode = || -> Result<()> {
            vae.decode_streaming(&latent, |_| Ok(()))?;
            Ok(())
        };
        let shape = format!("{name}, 81 frames (latent [1, 16, 21, {h}, {w}])");
        push(
            "Wan VAE decode (streaming, bf16)",
            shape,
            bench.median_ms(decode)?,
            bench.peak_of(decode)?,
        );
    }
    if which.decodes() {
        vae22_decode_row(bench, seed, &mut push)?;
    }
    if !which.encodes() {
        return Ok(());
    }
    let frames = FrameCount::new(81)?;
    let random_image = || -> Result<Tensor> {
        Ok(Tensor::rand(-1f32, 1.0, (1, 3, 1, 720, 1280), device)?.to_dtype(DType::BF16)?)
    };
    let (image, last) = (random_image()?, random_image()?);
    let video = image.pad_with_zeros(2, 0, frames.get() - 1)?;
    type Encode<'a> = Box<dyn Fn() -> turbodiffusion::Result<Tensor> + 'a>;
    let encodes: [(&str, &str, Encode); 3] = [
        (
            "Wan VAE I2V image encode (encode_image, bf16)",
            "720p, image + 80 zero frames",
            Box::new(|| vae.encode_image(&image, frames)),
        ),
        (
            "Wan VAE encode of the same video (encode, bf16)",
            "720p, image + 80 zero frames",
            Box::new(|| vae.encode(&video)),
        ),
        (
            "Wan VAE FLF2V encode (encode_first_last, bf16)",
            "720p, image + 79 zero frames + image",
            Box::new(|| vae.encode_first_last(&image, &last, frames)),
        ),
    ];
    for (what, shape, encode) in encodes {
        let run = || -> Result<()> {
            encode()?;
            Ok(())
        };
        let (ms, peak) = (bench.median_ms(run)?, bench.peak_of(run)?);
        push(what, shape.to_owned(), ms, peak);
    }
    Ok(())
}

/// The Wan2.2 VAE (TI2V-5B's) decoding 121 frames at 1280×704 with random weights.
fn vae22_decode_row(
    bench: &Bench,
    seed: u64,
    push: &mut impl FnMut(&str, String, f64, Option<u64>),
) -> Result<()> {
    let cfg = Vae22Config::wan22();
    let vb = RandomCheckpoint::new(seed, Wan22Vae::expected_keys(&cfg))
        .var_builder(DType::BF16, &bench.device);
    let vae = Wan22Vae::load(vb, &cfg)?;
    let (h, w) = (704 / cfg.spatial_stride(), 1280 / cfg.spatial_stride());
    let latent =
        Tensor::randn(0f32, 1.0, (1, cfg.z_dim, 31, h, w), &bench.device)?.to_dtype(DType::BF16)?;
    let decode = || -> Result<()> {
        vae.decode_streaming(&latent, |_| Ok(()))?;
        Ok(())
    };
    let shape = format!(
        "1280x704, 121 frames (latent [1, {}, 31, {h}, {w}])",
        cfg.z_dim
    );
    let (ms, peak) = (bench.median_ms(decode)?, bench.peak_of(decode)?);
    push("Wan2.2 VAE decode (streaming, bf16)", shape, ms, peak);
    Ok(())
}

/// TI2V-5B text-to-video at 1280×704, 121 frames, with random weights, in bf16 and W8A8: the
/// published UniPC teacher with guidance, cut to `--teacher-steps` steps (the rows give the
/// denoise stage's time for those steps), per stage, with each stage's estimate.
fn ti2v_rows(device: &Device, args: &Args, rows: &mut Vec<Row>) -> Result<()> {
    for quant in [false, true] {
        let pipeline =
            random_pipeline(ModelKind::Wan22Ti2v5B, device, args)?.with_quant_linear(quant);
        let mut request = T2vRequest::for_model(
            ModelKind::Wan22Ti2v5B,
            "a red fox runs through fresh snow at dawn",
        );
        cut_teacher(&mut request.sampler, args);
        let estimate = pipeline.estimate_memory(&request)?;
        let linears = if quant { "W8A8" } else { "bf16 linears" };
        let video = VideoRun {
            section: "ti2v",
            shape: format!(
                "Wan2.2-TI2V-5B, 1280x704, 121 frames, UniPC {} steps with CFG, {linears}",
                args.teacher_steps
            ),
            estimate,
            cold_run: !args.skip_cold_run,
            linears,
        };
        video.rows(device, rows, |progress| {
            Ok(pipeline.text_to_video_with_progress(&request, progress)?)
        })?;
    }
    Ok(())
}

/// A whole 4-step text-to-video with random weights (the model and size of the arguments),
/// per stage, with each stage's estimate.
fn t2v_rows(device: &Device, args: &Args, rows: &mut Vec<Row>) -> Result<()> {
    let (kind, name) = match args.t2v_model {
        ModelShape::Wan1_3B => (ModelKind::Wan21T2V1_3B, "Wan2.1-1.3B"),
        ModelShape::Wan14B => (ModelKind::Wan21T2V14B, "Wan2.1-14B"),
    };
    let pipeline = random_pipeline(kind, device, args)?;
    let request = T2vRequest {
        size: Some(args.t2v_size),
        frames: args.video_frames,
        ..T2vRequest::new("a red fox runs through fresh snow at dawn")
    };
    let estimate = pipeline.estimate_memory(&request)?;
    let video = VideoRun {
        section: "t2v",
        shape: video_shape(name, args.t2v_size, args.video_frames),
        estimate,
        cold_run: !args.skip_cold_run,
        linears: "W8A8",
    };
    video.rows(device, rows, |progress| {
        Ok(pipeline.text_to_video_with_progress(&request, progress)?)
    })
}

/// The models of the `i2v` section.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum I2vModel {
    /// Wan2.2 I2V A14B: two experts, one resident at a time, rCM 4 steps.
    #[value(name = "a14b")]
    A14b,
    /// Wan2.1 I2V-14B 720P: CLIP on the image, the UniPC teacher with CFG.
    #[value(name = "wan21-i2v-14b")]
    Wan21I2v14b,
    /// Wan2.1 FLF2V-14B: CLIP on the first and last frames, the UniPC teacher with CFG.
    #[value(name = "flf2v-14b")]
    Flf2v14b,
}

impl I2vModel {
    fn kind_and_name(self) -> (ModelKind, &'static str) {
        match self {
            Self::A14b => (ModelKind::Wan22I2VA14B, "Wan2.2-A14B"),
            Self::Wan21I2v14b => (ModelKind::Wan21I2V14B720P, "Wan2.1-I2V-14B"),
            Self::Flf2v14b => (ModelKind::Wan21Flf2v14B, "Wan2.1-FLF2V-14B"),
        }
    }
}

/// A teacher sampler cut to `--teacher-steps` steps; other samplers as they are.
fn cut_teacher(sampler: &mut SamplerChoice, args: &Args) {
    if let SamplerChoice::Teacher { steps, .. } = sampler {
        *steps = args.teacher_steps;
    }
}

/// A whole image-to-video of `--i2v-model` (the A14B: two experts, one resident at a time;
/// the Wan2.1 models with their CLIP encoder and a teacher cut to `--teacher-steps`) with
/// random weights and random input images, per stage, with each stage's estimate.
fn i2v_rows(device: &Device, args: &Args, rows: &mut Vec<Row>) -> Result<()> {
    let (kind, name) = args.i2v_model.kind_and_name();
    let pipeline = random_pipeline(kind, device, args)?;
    let (width, height) = args.i2v_size;
    let image = random_image(width, height, args.seed)?;
    let mut request = I2vRequest::for_model(kind, image, "a paper boat drifts down a rainy street");
    if args.i2v_model == I2vModel::Flf2v14b {
        request.end_image = Some(random_image(width, height, args.seed + 1)?);
    }
    request.video.size = Some(args.i2v_size);
    request.video.frames = args.video_frames;
    cut_teacher(&mut request.video.sampler, args);
    let estimate = pipeline.estimate_memory_i2v(&request)?;
    let steps = match &request.video.sampler {
        SamplerChoice::Teacher { solver, steps, .. } => {
            format!("{solver} {steps} steps with CFG")
        }
        _ => "4 steps".to_owned(),
    };
    let video = VideoRun {
        section: "i2v",
        shape: format!(
            "{name}, {width}x{height}, {} frames, {steps}",
            args.video_frames
        ),
        estimate,
        cold_run: !args.skip_cold_run,
        linears: "W8A8",
    };
    video.rows(device, rows, |progress| {
        Ok(pipeline.image_to_video_with_progress(&request, progress)?)
    })
}

/// A released model at full size with seeded random weights: bf16, SageSLA top-k 0.1, W8A8,
/// and the memory budget of the arguments.
fn random_pipeline(kind: ModelKind, device: &Device, args: &Args) -> Result<Pipeline> {
    let attention = AttentionConfig::new(AttentionKind::sagesla(0.1)?);
    let pipeline =
        Pipeline::random_weights(kind, args.seed, attention, device.clone(), DType::BF16)?
            .with_quant_linear(true);
    Ok(match args.memory_budget_gib {
        Some(gib) => pipeline.with_memory_budget((gib * (1u64 << 30) as f64) as u64),
        None => pipeline,
    })
}

/// An image of uniform random pixels drawn from `seed` (xorshift64).
fn random_image(width: usize, height: usize, seed: u64) -> Result<InputImage> {
    let mut state = seed | 1;
    let rgb = (0..width * height * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 56) as u8
        })
        .collect();
    Ok(InputImage::from_rgb(width as u32, height as u32, rgb)?)
}

fn video_shape(model: &str, (width, height): (usize, usize), frames: usize) -> String {
    format!("{model}, {width}x{height}, {frames} frames, 4 steps")
}

/// The rows of one generated video.
struct VideoRun {
    section: &'static str,
    shape: String,
    estimate: MemoryEstimate,
    /// Run once untimed first.
    cold_run: bool,
    /// How the DiT's linears run (`W8A8`, `bf16 linears`).
    linears: &'static str,
}

impl VideoRun {
    fn rows(
        &self,
        device: &Device,
        rows: &mut Vec<Row>,
        generate: impl Fn(&mut StageClock) -> Result<Video>,
    ) -> Result<()> {
        let row = |what: String, ms: f64, note: &str| Row {
            section: self.section,
            what,
            shape: self.shape.clone(),
            ms,
            note: note.to_owned(),
            peak: None,
            estimate: None,
        };
        // The first run pays the driver's one-time JIT compilation of every PTX module it
        // touches (seconds on a fresh machine): it is reported on its own row, and the stages
        // are those of the second run.
        if self.cold_run {
            let cold_start = Instant::now();
            generate(&mut StageClock::default())?;
            device.synchronize()?;
            let what = "first run (cold: PTX JIT, allocator warm-up), generation only";
            let ms = cold_start.elapsed().as_secs_f64() * 1e3;
            rows.push(row(what.into(), ms, "wall clock; not counted below"));
        }
        let mut stages = StageClock::default();
        let start = Instant::now();
        let video = generate(&mut stages)?;
        device.synchronize()?;
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        let path = std::env::temp_dir().join(format!("bench_{}.mp4", self.section));
        let write_start = Instant::now();
        video.write_mp4(&path, Default::default())?;
        let write_ms = write_start.elapsed().as_secs_f64() * 1e3;
        let tiling = match self.estimate.vae_tiling {
            Some(tiling) => format!("VAE tiles {}x{}", tiling.width(), tiling.height()),
            None => "VAE untiled".to_owned(),
        };
        for (stage, what, ms, peak) in stages.stages {
            rows.push(Row {
                peak,
                estimate: self.estimate.stage(&stage).map(|e| e.peak()),
                ..row(
                    what,
                    ms,
                    &format!("random weights, sagesla 0.1, {}, {tiling}", self.linears),
                )
            });
        }
        rows.push(Row {
            shape: format!("{} frames", video.len()),
            ..row("MP4 encode + write".into(), write_ms, "")
        });
        rows.push(Row {
            peak: (stages.overall_peak > 0).then_some(stages.overall_peak),
            estimate: Some(self.estimate.peak()),
            ..row(
                "whole video (generation + MP4)".into(),
                total_ms + write_ms,
                "wall clock",
            )
        });
        Ok(())
    }
}

/// Collects the pipeline's stage reports: time (the device synchronised at the stage's end)
/// and peak device memory, which the pipeline measures per stage.
#[derive(Default)]
struct StageClock {
    /// (stage, row name, ms, peak bytes).
    stages: Vec<(Stage, String, f64, Option<u64>)>,
    overall_peak: u64,
    /// The weights come from files, not drawn at random (the rows say which).
    from_files: bool,
    /// The models already on the device when the request starts (the rows say which).
    resident: Residency,
    /// The models the pipeline keeps on the device after the request (a text encoder it keeps
    /// is loaded whole, not streamed by block).
    kept: Residency,
}

impl StageClock {
    /// Weights read from files, except those of the models in `resident`; the pipeline keeps
    /// those in `kept`.
    fn reading_files(resident: Residency, kept: Residency) -> Self {
        Self {
            from_files: true,
            resident,
            kept,
            ..Self::default()
        }
    }
}

impl turbodiffusion::core::Progress for StageClock {
    fn step_done(
        &mut self,
        _report: &turbodiffusion::core::StepReport,
    ) -> std::ops::ControlFlow<()> {
        std::ops::ControlFlow::Continue(())
    }

    fn stage_done(&mut self, report: &StageReport) {
        let name = match report.stage {
            Stage::EncodingText if self.resident.text_encoder => {
                "text encode (umT5-XXL resident)".to_owned()
            }
            Stage::EncodingText if self.from_files && self.kept.text_encoder => {
                "text encode (umT5-XXL loaded whole from its .pth, then kept)".to_owned()
            }
            Stage::EncodingText if self.from_files => {
                "text encode (umT5-XXL streamed by block from its .pth)".to_owned()
            }
            Stage::EncodingText => {
                "text encode (umT5-XXL streamed by block, incl. drawing its weights)".to_owned()
            }
            Stage::EncodingImage => "image encode (VAE, bf16)".to_owned(),
            Stage::Denoising { steps } if self.resident.dit => {
                format!("denoise, {steps} DiT steps (the DiT resident)")
            }
            Stage::Denoising { steps } if self.from_files => {
                format!("denoise, {steps} DiT steps (incl. reading the DiT file)")
            }
            Stage::Denoising { steps } => {
                format!("denoise, {steps} DiT steps (incl. drawing and quantising the weights)")
            }
            Stage::Decoding { .. } => "VAE decode (bf16, as TurboDiffusion)".to_owned(),
            Stage::WritingVideo => {
                "MP4 written as decoded (first frame → file in place)".to_owned()
            }
            other => format!("{other:?}"),
        };
        let peak = report.device_memory.map(|m| m.peak);
        self.overall_peak = self.overall_peak.max(peak.unwrap_or(0));
        let ms = report.elapsed.as_secs_f64() * 1e3;
        self.stages.push((report.stage, name, ms, peak));
    }
}

fn markdown_row(row: &Row) -> String {
    let gib = |bytes: Option<u64>| {
        bytes
            .map(|b| format!("{:.2}", MemoryUsage::gib(b)))
            .unwrap_or_else(|| "–".into())
    };
    format!(
        "| {} | {} | {} | {:.3} | {} | {} | {} |",
        row.section,
        row.what,
        row.shape,
        row.ms,
        gib(row.peak),
        gib(row.estimate),
        row.note
    )
}

fn markdown_table(header: &str, rows: &[Row]) -> String {
    let mut table = format!(
        "{header}\n\n| section | what | shape | ms (median) | peak GiB | estimate GiB | notes |\n|---|---|---|---:|---:|---:|---|\n"
    );
    for row in rows {
        table.push_str(&markdown_row(row));
        table.push('\n');
    }
    table
}

fn write_json(path: &std::path::Path, header: &str, rows: &[Row]) -> Result<()> {
    let rows: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "section": r.section, "what": r.what, "shape": r.shape, "ms": r.ms,
                "peak_bytes": r.peak, "estimate_bytes": r.estimate, "note": r.note,
            })
        })
        .collect();
    let text = serde_json::to_string_pretty(&json!({ "device": header, "rows": rows }))?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
