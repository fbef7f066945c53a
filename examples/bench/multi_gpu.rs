//! The `multi-gpu` section: Wan2.1 14B text-to-video and Wan2.2 A14B image-to-video (4 rCM
//! steps, random weights, bf16, W8A8, SageSLA 0.1) at `--multi-gpu-size`, on the ranks of a
//! multi-GPU launch, or on one GPU without one:
//!
//! ```text
//! bench --sections multi-gpu --json bench_1gpu.json                        # the 1-GPU rows
//! scripts/multi-gpu.sh 4 bench --sections multi-gpu \
//!     --multi-gpu-baseline bench_1gpu.json --json bench_4gpu.json          # 4 GPUs
//! ```
//!
//! Rows per model: the DiT step (the median over the steps, each timed from the previous step's
//! end with the device synchronised; steps after an expert's load are left out) and the whole
//! video (generation, wall clock), each with the peak device memory of the most loaded GPU
//! (every rank's in the note). The 1-GPU numbers come from a separate invocation rather than
//! from rank 0 before the others start: a 14B run takes minutes, which the other ranks would
//! spend waiting in NCCL, and one run per world size keeps every number measured the same way.
//! Given its JSON (`--multi-gpu-baseline`), each row adds the speedup over the 1-GPU row of the
//! same model and shape and the scaling efficiency, speedup / GPUs.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use turbodiffusion::core::{Progress, Stage, StageReport, StepReport};
use turbodiffusion::pipeline::{I2vRequest, Launched, ModelKind};
use turbodiffusion::video::Video;
use turbodiffusion::{Pipeline, T2vRequest};

use super::{random_image, random_pipeline, Args, Row};

const SECTION: &str = "multi-gpu";
const STEP_ROW: &str = "DiT step (median)";
const VIDEO_ROW: &str = "whole video (generation)";

/// The rows of both models on this launch's ranks (`None`: one GPU).
pub fn multi_gpu_rows(
    device: &Device,
    launch: Option<&Launched>,
    args: &Args,
    rows: &mut Vec<Row>,
) -> Result<()> {
    let baseline = match &args.multi_gpu_baseline {
        Some(path) => read_baseline(path)?,
        None => Vec::new(),
    };
    for kind in [ModelKind::Wan21T2V14B, ModelKind::Wan22I2VA14B] {
        let pipeline = random_pipeline(kind, device, args)?;
        let pipeline = match launch {
            Some(launch) => pipeline.with_communicator(launch.comm.clone()),
            None => pipeline,
        };
        let model = ModelRun::new(kind, args)?;
        let measured = model.measure(&pipeline, device, !args.skip_cold_run)?;
        let peaks = peaks_per_rank(launch, device, measured.peak)?;
        let world_size = pipeline.world_size();
        for (what, ms) in [(STEP_ROW, measured.step_ms), (VIDEO_ROW, measured.video_ms)] {
            let scaling = scaling_note(&baseline, what, &model.shape, ms, world_size);
            rows.push(Row {
                section: SECTION,
                what: what.to_owned(),
                shape: model.shape.clone(),
                ms,
                note: format!("{}; {scaling}", ranks_note(world_size, &peaks)),
                peak: peaks.iter().copied().max(),
                estimate: Some(measured.estimate),
            });
        }
    }
    Ok(())
}

/// One model's request at the section's size.
struct ModelRun {
    shape: String,
    request: Request,
}

enum Request {
    Text(T2vRequest),
    Image(Box<I2vRequest>),
}

/// What one video measured on this rank.
struct Measured {
    step_ms: f64,
    video_ms: f64,
    /// This rank's peak device memory over the stages.
    peak: u64,
    /// The pipeline's estimate of this rank's peak.
    estimate: u64,
}

impl ModelRun {
    fn new(kind: ModelKind, args: &Args) -> Result<Self> {
        let (width, height) = args.multi_gpu_size;
        let frames = args.video_frames;
        let prompt = "a red fox runs through fresh snow at dawn";
        let (name, request) = match kind {
            ModelKind::Wan22I2VA14B => {
                let image = random_image(width, height, args.seed)?;
                let mut request = I2vRequest::new(image, prompt);
                request.video.size = Some((width, height));
                request.video.frames = frames;
                ("Wan2.2-A14B I2V", Request::Image(Box::new(request)))
            }
            _ => {
                let request = T2vRequest {
                    size: Some((width, height)),
                    frames,
                    ..T2vRequest::new(prompt)
                };
                ("Wan2.1-14B T2V", Request::Text(request))
            }
        };
        let shape = format!("{name}, {width}x{height}, {frames} frames, 4 rCM steps");
        Ok(Self { shape, request })
    }

    fn generate(&self, pipeline: &Pipeline, progress: &mut dyn Progress) -> Result<Video> {
        Ok(match &self.request {
            Request::Text(request) => pipeline.text_to_video_with_progress(request, progress)?,
            Request::Image(request) => pipeline.image_to_video_with_progress(request, progress)?,
        })
    }

    fn estimate(&self, pipeline: &Pipeline) -> Result<u64> {
        let estimate = match &self.request {
            Request::Text(request) => pipeline.estimate_memory(request)?,
            Request::Image(request) => pipeline.estimate_memory_i2v(request)?,
        };
        Ok(estimate.peak())
    }

    /// The timed video, after an untimed one that pays the driver's PTX compilation
    /// (`cold_run`).
    fn measure(&self, pipeline: &Pipeline, device: &Device, cold_run: bool) -> Result<Measured> {
        if cold_run {
            self.generate(pipeline, &mut StepClock::new(device))?;
        }
        let mut clock = StepClock::new(device);
        let start = Instant::now();
        self.generate(pipeline, &mut clock)?;
        device.synchronize()?;
        Ok(Measured {
            step_ms: median(&mut clock.steps_ms)
                .context("the run reported no DiT step that followed another")?,
            video_ms: start.elapsed().as_secs_f64() * 1e3,
            peak: clock.peak,
            estimate: self.estimate(pipeline)?,
        })
    }
}

/// Times each DiT step from the end of the one before (or from the start of denoising), with
/// the device synchronised at both ends; a step that follows an expert's load is not timed.
struct StepClock {
    device: Device,
    since: Option<Instant>,
    steps_ms: Vec<f64>,
    peak: u64,
}

impl StepClock {
    fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            since: None,
            steps_ms: Vec::new(),
            peak: 0,
        }
    }

    /// Now, once the device has finished what was queued.
    fn synchronized_now(&self) -> Option<Instant> {
        self.device.synchronize().ok().map(|()| Instant::now())
    }
}

impl Progress for StepClock {
    fn step_done(&mut self, _report: &StepReport) -> ControlFlow<()> {
        let now = self.synchronized_now();
        if let (Some(since), Some(now)) = (self.since, now) {
            self.steps_ms.push((now - since).as_secs_f64() * 1e3);
        }
        self.since = now;
        ControlFlow::Continue(())
    }

    fn stage(&mut self, stage: &Stage) {
        match stage {
            // An expert's load comes between two steps: the next step is not timed.
            Stage::LoadingDit { .. } => self.since = None,
            // Reported after the first DiT's load, before the first step.
            Stage::Denoising { .. } => self.since = self.synchronized_now(),
            _ => {}
        }
    }

    fn stage_done(&mut self, report: &StageReport) {
        let peak = report.device_memory.map_or(0, |memory| memory.peak);
        self.peak = self.peak.max(peak);
    }
}

fn median(values: &mut [f64]) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied()
}

const MIB: f64 = (1u64 << 20) as f64;

/// Every rank's `peak`, in rank order (in MiB through an `f32`: exact to the MiB far beyond any
/// GPU's memory).
fn peaks_per_rank(launch: Option<&Launched>, device: &Device, peak: u64) -> Result<Vec<u64>> {
    let Some(launch) = launch else {
        return Ok(vec![peak]);
    };
    let local = Tensor::new(&[(peak as f64 / MIB).ceil() as f32], device)?;
    let shapes = vec![local.shape().clone(); launch.world_size()];
    launch
        .comm
        .all_gather(&local, &shapes)?
        .iter()
        .map(|mib| Ok((f64::from(mib.to_vec1::<f32>()?[0]) * MIB) as u64))
        .collect()
}

/// `1 GPU`, or `N GPUs, sequence parallel; peak per GPU a, b, … GiB`.
fn ranks_note(world_size: usize, peaks: &[u64]) -> String {
    if world_size == 1 {
        return ONE_GPU.to_owned();
    }
    let gib: Vec<String> = peaks
        .iter()
        .map(|&bytes| format!("{:.2}", bytes as f64 / (MIB * 1024.0)))
        .collect();
    format!(
        "{world_size} GPUs, sequence parallel; peak per GPU {} GiB",
        gib.join(", ")
    )
}

const ONE_GPU: &str = "1 GPU";

/// The speedup over the baseline's row of the same `what` and `shape`, and speedup / GPUs.
fn scaling_note(
    baseline: &[BaselineRow],
    what: &str,
    shape: &str,
    ms: f64,
    world_size: usize,
) -> String {
    match baseline.iter().find(|b| b.what == what && b.shape == shape) {
        Some(one_gpu) => {
            let speedup = one_gpu.ms / ms;
            format!(
                "{speedup:.2}x the 1-GPU {:.1} ms, scaling efficiency {:.0} %",
                one_gpu.ms,
                100.0 * speedup / world_size as f64
            )
        }
        None => "no 1-GPU row to compare (--multi-gpu-baseline)".to_owned(),
    }
}

/// A 1-GPU row of an earlier `multi-gpu` run's JSON.
struct BaselineRow {
    what: String,
    shape: String,
    ms: f64,
}

/// The `multi-gpu` rows of the 1-GPU run that wrote `path` (`--json`).
fn read_baseline(path: &Path) -> Result<Vec<BaselineRow>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let field = |row: &serde_json::Value, key: &str| row[key].as_str().unwrap_or("").to_owned();
    let rows: Vec<BaselineRow> = json["rows"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|row| row["section"] == SECTION)
        .map(|row| {
            let note = field(row, "note");
            if !note.starts_with(ONE_GPU) {
                bail!("{}: a row of {note:?}, not of one GPU", path.display());
            }
            Ok(BaselineRow {
                what: field(row, "what"),
                shape: field(row, "shape"),
                ms: row["ms"].as_f64().context("a row without `ms`")?,
            })
        })
        .collect::<Result<_>>()?;
    if rows.is_empty() {
        bail!("{} holds no `{SECTION}` rows", path.display());
    }
    Ok(rows)
}
