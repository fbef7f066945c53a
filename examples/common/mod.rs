//! What the `t2v` and `i2v` examples share: progress bars, the sampler flags and output names.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use turbodiffusion::core::{Progress, Stage, StageReport, StepReport};
use turbodiffusion::models::lora::LoraAdapter;
use turbodiffusion::pipeline::{open_lora, parse_lora_arg, DitLoras, SamplerChoice};
use turbodiffusion::sampler::{FlowSolver, RcmMode, WAN_NEGATIVE_PROMPT};
use turbodiffusion::AttentionKind;

/// Draws the stages with `indicatif`: a spinner while a model loads or encodes, a bar over the
/// denoising steps and one over the decoded frames, each with its elapsed time; prints what
/// each stage held in memory when it ends.
pub struct Console {
    started: Instant,
    /// The bar or spinner of the stage in progress.
    bar: Option<ProgressBar>,
}

impl Console {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            bar: None,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn spinner(&mut self, message: String) {
        self.finish_bar();
        let spinner = ProgressBar::new_spinner()
            .with_style(style("{spinner} [{elapsed_precise}] {msg}"))
            .with_message(message);
        spinner.enable_steady_tick(Duration::from_millis(100));
        self.bar = Some(spinner);
    }

    fn counter(&mut self, total: usize, template: &str) {
        self.finish_bar();
        let bar = ProgressBar::new(total as u64).with_style(style(template));
        bar.enable_steady_tick(Duration::from_millis(250));
        self.bar = Some(bar);
    }

    fn finish_bar(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }

    /// A line above the bar in progress (or on its own when there is none).
    fn println(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("a valid progress template")
        .progress_chars("=> ")
}

impl Progress for Console {
    fn step_done(&mut self, report: &StepReport) -> ControlFlow<()> {
        if let Some(bar) = &self.bar {
            bar.set_position(report.index as u64 + 1);
            bar.set_message(format!("s = {:.4}", report.s));
        }
        ControlFlow::Continue(())
    }

    fn stage(&mut self, stage: &Stage) {
        match *stage {
            Stage::EncodingText => self.spinner("encoding the prompt".into()),
            Stage::EncodingImage => self.spinner("encoding the image".into()),
            Stage::LoadingDit { expert } => {
                let what = expert.map_or("the DiT".to_owned(), |e| format!("the {e} expert"));
                match &self.bar {
                    // An expert switch in the middle of denoising: keep the step bar.
                    Some(bar) if bar.length().is_some() => {
                        bar.set_message(format!("loading {what}"));
                    }
                    _ => self.spinner(format!("loading {what}")),
                }
            }
            Stage::Denoising { steps } => self.counter(
                steps,
                "denoising [{elapsed_precise}] [{bar:30}] {pos}/{len} steps, eta {eta} {msg}",
            ),
            Stage::Decoding { done: 0, total } => self.counter(
                total,
                "decoding  [{elapsed_precise}] [{bar:30}] {pos}/{len} frames {msg}",
            ),
            Stage::Decoding { done, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(done as u64);
                }
            }
            other => self.println(format!("{other:?}")),
        }
    }

    fn stage_done(&mut self, report: &StageReport) {
        self.finish_bar();
        let what = match report.stage {
            Stage::EncodingText => "text encoder",
            Stage::EncodingImage => "image encoder (VAE)",
            Stage::Denoising { .. } => "DiT",
            Stage::Decoding { .. } => "decoder (VAE)",
            _ => "stage",
        };
        let device = report.device_memory.map_or_else(
            || "no device counter on the CPU".to_owned(),
            |usage| {
                format!(
                    "device peak {}, {} in use at the end",
                    HumanBytes(usage.peak),
                    HumanBytes(usage.in_use)
                )
            },
        );
        println!(
            "  {what}: {} of weights resident; {device}; took {:.2?}",
            HumanBytes(report.resident_bytes),
            report.elapsed
        );
    }
}

/// The run flags both examples take: seed, frame rate, output file, device and dtype.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 16.0)]
    pub fps: f64,
    /// Output file (default `{t2v|i2v}_{seed}_{model}_{timestamp}.mp4`).
    #[arg(long)]
    pub output: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    pub device: turbodiffusion::core::DeviceSpec,
    #[arg(long, default_value = "bf16", value_parser = turbodiffusion::core::parse_dtype)]
    pub dtype: candle_core::DType,
}

impl RunArgs {
    /// The output path: `--output`, or upstream's naming pattern for `task`.
    pub fn output_path(&self, task: &str, model: &str) -> PathBuf {
        self.output
            .clone()
            .unwrap_or_else(|| default_output(task, self.seed, model))
    }
}

/// The sampler flags both examples take, upstream's names where sensible.
#[derive(clap::Args, Debug)]
pub struct SamplerArgs {
    /// rcm (the distilled 1–4 step sampler), or a teacher: unipc, dpm++, euler.
    #[arg(long, default_value = "rcm")]
    pub solver: String,
    #[arg(long, default_value_t = 4)]
    pub num_steps: usize,
    /// rCM: σ of the first step (default 80 for T2V, 200 for I2V).
    #[arg(long)]
    pub sigma_max: Option<f64>,
    /// rCM: deterministic ODE steps instead of the SDE.
    #[arg(long)]
    pub ode: bool,
    /// Teachers: timestep shift.
    #[arg(long, default_value_t = 5.0)]
    pub shift: f64,
    /// Teachers: classifier-free guidance scale.
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f64,
    /// Teachers: the prompt guidance steers away from.
    #[arg(long, default_value = WAN_NEGATIVE_PROMPT)]
    pub negative_prompt: String,
    /// SLA / SageSLA top-k of each step, comma separated, one per step (for example
    /// `0.05,0.1,0.1,0.15`); overrides `--sla-topk` step by step.
    #[arg(long, value_delimiter = ',')]
    pub sla_topk_schedule: Option<Vec<f64>>,
    /// Named sampler settings, instead of the flags above: rcm, teacher, or distill-4step
    /// (step- and CFG-distillation LoRAs: Euler, 4 steps, shift 5, no CFG).
    #[arg(long)]
    pub sampler_preset: Option<String>,
}

/// The LoRA flags both examples take.
#[derive(clap::Args, Debug)]
pub struct LoraArgs {
    /// A LoRA for the DiT (both experts of A14B), as FILE or FILE:STRENGTH (default 1);
    /// repeatable. ComfyUI, PEFT and diffusers layouts.
    #[arg(long = "lora", value_name = "FILE[:STRENGTH]")]
    pub all: Vec<String>,
    /// A LoRA for the high-noise expert of Wan2.2 A14B only; repeatable.
    #[arg(long = "lora-high", value_name = "FILE[:STRENGTH]")]
    pub high_noise: Vec<String>,
    /// A LoRA for the low-noise expert of Wan2.2 A14B only; repeatable.
    #[arg(long = "lora-low", value_name = "FILE[:STRENGTH]")]
    pub low_noise: Vec<String>,
    /// Skip tensor names no LoRA layout knows and targets the model lacks, with a warning
    /// that counts them, instead of failing.
    #[arg(long)]
    pub lora_lenient: bool,
}

impl LoraArgs {
    /// Every LoRA file read, at its strength.
    pub fn loras(&self) -> turbodiffusion::Result<DitLoras> {
        let open = |args: &[String]| {
            args.iter()
                .map(|arg| {
                    let (file, strength) = parse_lora_arg(arg)?;
                    match self.lora_lenient {
                        true => Ok(LoraAdapter::open_lenient(file)?.at(strength)),
                        false => open_lora(file, strength),
                    }
                })
                .collect::<turbodiffusion::Result<Vec<_>>>()
        };
        Ok(DitLoras {
            all: open(&self.all)?,
            high_noise: open(&self.high_noise)?,
            low_noise: open(&self.low_noise)?,
        })
    }
}

impl SamplerArgs {
    pub fn sampler(&self) -> turbodiffusion::Result<SamplerChoice> {
        if let Some(preset) = &self.sampler_preset {
            return SamplerChoice::preset(preset);
        }
        if self.solver == "rcm" {
            let mode = if self.ode { RcmMode::Ode } else { RcmMode::Sde };
            return Ok(SamplerChoice::Rcm {
                steps: self.num_steps,
                sigma_max: self.sigma_max,
                mode,
            });
        }
        Ok(SamplerChoice::Teacher {
            solver: self.solver.parse::<FlowSolver>()?,
            steps: self.num_steps,
            shift: self.shift,
            guidance: self.guidance,
            negative_prompt: self.negative_prompt.clone(),
        })
    }
}

/// `{task}_{seed}_{model}_{timestamp}.mp4`, as upstream names its outputs.
pub fn default_output(task: &str, seed: u64, model: &str) -> PathBuf {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from(format!("{task}_{seed}_{model}_{timestamp}.mp4"))
}

/// `--attention-type`, upstream's names.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AttentionName {
    Original,
    Sla,
    Sagesla,
}

impl AttentionName {
    /// The backend with `--sla-topk` (ignored by `original`).
    pub fn kind(self, topk: f64) -> turbodiffusion::Result<AttentionKind> {
        match self {
            Self::Original => Ok(AttentionKind::Original),
            Self::Sla => AttentionKind::sla(topk),
            Self::Sagesla => AttentionKind::sagesla(topk),
        }
    }
}
