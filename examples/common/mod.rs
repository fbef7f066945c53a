//! What the `t2v` and `i2v` examples share: progress bars, the sampler flags, the output file,
//! Ctrl-C and the library's warnings.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use turbodiffusion::core::{Progress, Stage, StageReport, StepReport, VideoGeometry};
use turbodiffusion::models::lora::LoraAdapter;
use turbodiffusion::pipeline::{open_lora, parse_lora_arg, DitLoras, Launched, SamplerChoice};
use turbodiffusion::sampler::{FlowSolver, RcmMode, WAN_NEGATIVE_PROMPT};
use turbodiffusion::video::{Existing, Fps, OutputFile};
use turbodiffusion::{AttentionKind, Error, Pipeline, T2vRequest};

/// Shows the library's warnings (a prompt cut to the text encoder's limit, a failed prefetch)
/// on stderr; `RUST_LOG`-style detail is not needed by these examples, warnings are.
pub fn show_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Ctrl-C and SIGTERM, wired to the pipeline's cancellation: the first asks the run to stop
/// after the step or decoded chunk in progress (the pipeline then returns `Error::Cancelled`
/// and nothing is written); a second one stops the program at once, unless the output file is
/// open (from the first decoded frames on), whose temporary file the cancelled run removes
/// within a chunk's time, so that no partial or temporary file is left.
#[derive(Clone)]
pub struct Interrupt {
    requested: Arc<AtomicUsize>,
    file_open: Arc<AtomicBool>,
}

/// The exit status of a program stopped by SIGINT, as shells report it.
pub const INTERRUPTED_STATUS: i32 = 130;

impl Interrupt {
    pub fn install() -> anyhow::Result<Self> {
        let interrupt = Self {
            requested: Arc::new(AtomicUsize::new(0)),
            file_open: Arc::new(AtomicBool::new(false)),
        };
        let handler = interrupt.clone();
        ctrlc::set_handler(move || {
            let count = handler.requested.fetch_add(1, Ordering::SeqCst) + 1;
            if count > 1 && !handler.file_open.load(Ordering::SeqCst) {
                eprintln!("interrupted");
                std::process::exit(INTERRUPTED_STATUS);
            }
            eprintln!("stopping after the current step or chunk (Ctrl-C again to stop at once)");
        })?;
        Ok(interrupt)
    }

    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst) > 0
    }
}

/// Ends the program with [`INTERRUPTED_STATUS`] when the run was cancelled by Ctrl-C.
pub fn exit_if_cancelled<T>(result: turbodiffusion::Result<T>) -> anyhow::Result<T> {
    match result {
        Err(Error::Cancelled { completed, total }) => {
            eprintln!("cancelled after step {completed} of {total}; nothing was written");
            std::process::exit(INTERRUPTED_STATUS)
        }
        other => Ok(other?),
    }
}

/// Draws the stages with `indicatif`: a spinner while a model loads or encodes, a bar over the
/// denoising steps and one over the decoded frames, each with its elapsed time; prints what
/// each stage held in memory when it ends.
pub struct Console {
    started: Instant,
    /// A rank other than 0 of a multi-GPU run: draws nothing (rank 0 does), only cancels.
    quiet: bool,
    /// The bar or spinner of the stage in progress.
    bar: Option<ProgressBar>,
    /// Ctrl-C: cancels the run at the next step.
    interrupt: Interrupt,
}

impl Console {
    pub fn new(interrupt: Interrupt) -> Self {
        Self {
            started: Instant::now(),
            quiet: false,
            bar: None,
            interrupt,
        }
    }

    /// The console of `rank`: rank 0 draws, the others only cancel on Ctrl-C (the pipeline
    /// cancels every rank when one does).
    pub fn for_rank(interrupt: Interrupt, rank: usize) -> Self {
        Self {
            quiet: rank != 0,
            ..Self::new(interrupt)
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
        self.poll_cancel()
    }

    fn poll_cancel(&mut self) -> ControlFlow<()> {
        if self.interrupt.requested() {
            self.finish_bar();
            return ControlFlow::Break(());
        }
        ControlFlow::Continue(())
    }

    fn stage(&mut self, stage: &Stage) {
        if self.quiet {
            return;
        }
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
            Stage::Decoding { done: 0, total } => {
                // The output file opens with the first decoded frames.
                self.interrupt.file_open.store(true, Ordering::SeqCst);
                self.counter(
                    total,
                    "decoding  [{elapsed_precise}] [{bar:30}] {pos}/{len} frames {msg}",
                )
            }
            Stage::Decoding { done, .. } => {
                if let Some(bar) = &self.bar {
                    bar.set_position(done as u64);
                }
            }
            other => self.println(format!("{other:?}")),
        }
    }

    fn stage_done(&mut self, report: &StageReport) {
        if self.quiet {
            return;
        }
        self.finish_bar();
        let what = match report.stage {
            Stage::EncodingText => "text encoder",
            Stage::EncodingImage => "image encoder (VAE)",
            Stage::Denoising { .. } => "DiT",
            Stage::Decoding { .. } => "decoder (VAE)",
            Stage::WritingVideo => {
                println!(
                    "  video file: written from the first decoded frames on, in place \
                     {:.2?} after them",
                    report.elapsed
                );
                return;
            }
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
    /// Frames per second (default: the model's, 16; TI2V-5B 24).
    #[arg(long)]
    pub fps: Option<f64>,
    /// Output file, `.mp4` or `.gif` (default `{t2v|i2v}_{seed}_{model}_{timestamp}.mp4`, with
    /// `_2`, `_3`, … when that name is taken).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Replace the `--output` file if it exists (never a read-only one).
    #[arg(long)]
    pub overwrite: bool,
    #[arg(long, default_value = "cpu")]
    pub device: turbodiffusion::core::DeviceSpec,
    /// Compute dtype of a checkpoint run: f32, bf16 (default) or f16 (the demo computes in f32).
    #[arg(long, value_parser = turbodiffusion::core::parse_dtype)]
    pub dtype: Option<candle_core::DType>,
}

impl RunArgs {
    /// The output, checked before any work (format, folder, a file in the way, the frame rate
    /// the format can store): `--output`, or upstream's naming pattern for `task`, numbered
    /// (`_2`, `_3`, …) when a file, or a run beside this one, takes that name first.
    pub fn output(&self, task: &str, model: &str, fps: f64) -> anyhow::Result<OutputFile> {
        let fps = Fps::new(fps)?;
        let output = match &self.output {
            Some(path) => {
                let existing = if self.overwrite {
                    Existing::Replace
                } else {
                    Existing::Refuse
                };
                match OutputFile::new(path, existing) {
                    Err(error @ Error::OutputExists { .. }) => {
                        anyhow::bail!("{error} (pass --overwrite to replace it)")
                    }
                    other => other?,
                }
            }
            None => {
                let name = format!("{task}_{}_{model}_{}.mp4", self.seed, timestamp());
                OutputFile::new(name, Existing::NextFree)?
            }
        };
        output.check_fps(fps)?;
        Ok(output)
    }

    /// `--dtype`, bf16 when not given.
    pub fn dtype(&self) -> candle_core::DType {
        self.dtype.unwrap_or(candle_core::DType::BF16)
    }
}

/// The device of the run: this rank's GPU under a multi-GPU launch (`--device` is then not
/// used), else `--device`.
pub fn run_device(run: &RunArgs, launch: Option<&Launched>) -> anyhow::Result<candle_core::Device> {
    match launch {
        Some(launch) => Ok(launch.device.clone()),
        None => run
            .device
            .open()
            .with_context(|| format!("opening {}", run.device)),
    }
}

/// `pipeline` on the ranks of `launch`, if there is one.
pub fn on_ranks(pipeline: Pipeline, launch: Option<&Launched>) -> Pipeline {
    match launch {
        Some(launch) => pipeline.with_communicator(launch.comm.clone()),
        None => pipeline,
    }
}

/// The last line of the examples: what was written, and the whole run's time.
pub fn report_written(path: &Path, geometry: VideoGeometry, fps: f64, elapsed: Duration) {
    println!(
        "wrote {} ({} frames, {}x{}, {fps} fps) in {elapsed:.2?}",
        path.display(),
        geometry.frames.get(),
        geometry.size.width(),
        geometry.size.height(),
    );
}

/// Seconds since the Unix epoch.
fn timestamp() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Fails naming every flag in `given` (set on the command line) that the demo does not use.
pub fn reject_demo_flags(given: &[(&str, bool)]) -> anyhow::Result<()> {
    let ignored: Vec<&str> = given
        .iter()
        .filter(|(_, set)| *set)
        .map(|(flag, _)| *flag)
        .collect();
    anyhow::ensure!(
        ignored.is_empty(),
        "the built-in demo (no --checkpoint-dir) has a fixed tiny model, size and dtype and \
         would ignore {}: give --checkpoint-dir to use them, or leave them out",
        ignored.join(", ")
    );
    Ok(())
}

/// The sampler flags the examples take, upstream's names where sensible. Each flag left out
/// keeps the model's published setting (`T2vRequest::for_model`).
#[derive(clap::Args, Debug)]
pub struct SamplerArgs {
    /// rcm (the distilled 1–4 step sampler), or a teacher: unipc, dpm++, euler (default: rcm
    /// for the TurboDiffusion models, unipc for the others).
    #[arg(long)]
    pub solver: Option<String>,
    /// Steps (default: 4 for rCM, the model's published count for a teacher).
    #[arg(long)]
    pub num_steps: Option<usize>,
    /// rCM: σ of the first step (default 80 for T2V, 200 for I2V).
    #[arg(long)]
    pub sigma_max: Option<f64>,
    /// rCM: deterministic ODE steps instead of the SDE.
    #[arg(long)]
    pub ode: bool,
    /// Teachers: timestep shift (default: the model's, 5 for Wan2.1 T2V).
    #[arg(long)]
    pub shift: Option<f64>,
    /// Teachers: classifier-free guidance scale, for both experts of A14B (default: the
    /// model's, 5 for Wan2.1 T2V; A14B: one per expert).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Teachers: the prompt guidance steers away from (default: upstream's).
    #[arg(long)]
    pub negative_prompt: Option<String>,
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
    /// The sampler of the flags, each flag left out taken from `defaults` (the model's
    /// published request); sets `defaults.sampler` and, when `--guidance` is given, drops the
    /// per-expert guidance for that one scale.
    pub fn apply(&self, defaults: &mut T2vRequest) -> turbodiffusion::Result<()> {
        if self.guidance.is_some() {
            defaults.expert_guidance = None;
        }
        defaults.sla_topk_schedule = self.sla_topk_schedule.clone();
        defaults.sampler = self.sampler(&defaults.sampler)?;
        Ok(())
    }

    fn sampler(&self, default: &SamplerChoice) -> turbodiffusion::Result<SamplerChoice> {
        if let Some(preset) = &self.sampler_preset {
            return SamplerChoice::preset(preset);
        }
        // A teacher asked for over an rCM default keeps these flags' former defaults.
        let (default_solver, steps, shift, guidance, negative_prompt) = match default {
            SamplerChoice::Rcm { .. } => {
                ("rcm".to_owned(), 4, 5.0, 5.0, WAN_NEGATIVE_PROMPT.into())
            }
            SamplerChoice::Teacher {
                solver,
                steps,
                shift,
                guidance,
                negative_prompt,
            } => (
                solver.to_string(),
                *steps,
                *shift,
                *guidance,
                negative_prompt.clone(),
            ),
        };
        let solver = self.solver.clone().unwrap_or(default_solver);
        if solver == "rcm" {
            let mode = if self.ode { RcmMode::Ode } else { RcmMode::Sde };
            return Ok(SamplerChoice::Rcm {
                steps: self.num_steps.unwrap_or(4),
                sigma_max: self.sigma_max,
                mode,
            });
        }
        Ok(SamplerChoice::Teacher {
            solver: solver.parse::<FlowSolver>()?,
            steps: self.num_steps.unwrap_or(steps),
            shift: self.shift.unwrap_or(shift),
            guidance: self.guidance.unwrap_or(guidance),
            negative_prompt: self.negative_prompt.clone().unwrap_or(negative_prompt),
        })
    }
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
