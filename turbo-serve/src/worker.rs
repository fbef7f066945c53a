//! The generation thread: takes one job at a time from the queue, runs the pipeline with a
//! [`Progress`] that records and publishes every stage and step and stops when asked, and
//! writes the video atomically.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;
use turbodiffusion::core::{Progress, Stage, StageReport, StepReport};
use turbodiffusion::video::{Existing, Mp4Options, OutputFile, Video};
use turbodiffusion::{Error, Pipeline};

use crate::job::{now_ms, JobId, JobProgress, JobStatus, JobView, Timings};
use crate::models::Models;
use crate::queue::{JobQueue, StopFlag, StopReason};
use crate::request::{Generation, RequestLimits, VideoRequest, Work};
use crate::store::JobStore;

/// Overall progress when denoising starts and ends, and when decoding ends (writing the MP4
/// takes the rest).
const DENOISE_START: f64 = 0.1;
const DENOISE_END: f64 = 0.8;
const DECODE_END: f64 = 0.95;

/// Every change of a job, for the event streams.
pub type Events = broadcast::Sender<JobView>;

/// What the generation thread needs.
pub struct Worker {
    pub store: Arc<JobStore>,
    pub queue: Arc<JobQueue>,
    pub models: Arc<Models>,
    pub events: Events,
    pub outputs: PathBuf,
    pub limits: RequestLimits,
}

/// How a run ended, short of success.
enum Stopped {
    Canceled,
    Shutdown,
    Failed(String),
}

impl From<Error> for Stopped {
    fn from(error: Error) -> Self {
        Self::Failed(error.to_string())
    }
}

impl From<rusqlite::Error> for Stopped {
    fn from(error: rusqlite::Error) -> Self {
        Self::Failed(format!("job store: {error}"))
    }
}

impl Worker {
    /// Starts the thread; it ends when the queue is closed and the running job has stopped.
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("turbo-serve-generation".into())
            .spawn(move || {
                while let Some((id, stop)) = self.queue.next() {
                    self.run(&id, &stop);
                    // Off the queue before the end is announced: a cancel that follows the
                    // announcement finds the job over.
                    self.queue.finish_running();
                    self.publish(&id);
                }
            })
    }

    /// Runs one job to its end and records the outcome (not yet announced); a panic in the
    /// pipeline fails the job instead of the server.
    fn run(&self, id: &JobId, stop: &StopFlag) {
        let mut timings = Timings::default();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.generate(id, stop, &mut timings)
        }))
        .unwrap_or_else(|panic| Err(Stopped::Failed(panic_message(&panic))));
        let recorded = match outcome {
            Ok(()) => self.finish(id, JobStatus::Succeeded, "done", &timings, None),
            Err(Stopped::Canceled) => {
                self.finish(id, JobStatus::Canceled, "canceled", &timings, None)
            }
            Err(Stopped::Failed(reason)) => {
                tracing::warn!(job = %id, "failed: {reason}");
                self.finish(id, JobStatus::Failed, "failed", &timings, Some(&reason))
            }
            Err(Stopped::Shutdown) => self.store.requeue(id),
        };
        if let Err(e) = recorded {
            tracing::error!(job = %id, "cannot record the job's end: {e}");
        }
    }

    fn generate(&self, id: &JobId, stop: &StopFlag, timings: &mut Timings) -> Result<(), Stopped> {
        let started = Instant::now();
        let generation = self.start(id, timings)?;
        let load = Instant::now();
        let pipeline = self
            .models
            .pipeline(&generation.key, |p| weight_bytes(p, &generation.work))?;
        timings.load_ms = Some(millis(load.elapsed()));
        let (video, (step, steps)) = {
            let mut reporter = Reporter {
                worker: self,
                id,
                stop,
                timings: &mut *timings,
                denoised: (0, 0),
            };
            let video = run_pipeline(&pipeline, &generation.work, &mut reporter);
            (video, reporter.denoised)
        };
        let video = match (video, stop.requested()) {
            (_, Some(StopReason::Canceled)) => return Err(Stopped::Canceled),
            (_, Some(StopReason::Shutdown)) => return Err(Stopped::Shutdown),
            (result, None) => result?,
        };
        let writing = JobProgress {
            step,
            steps,
            ..JobProgress::at("writing", DECODE_END)
        };
        self.update(id, writing);
        let write = Instant::now();
        write_video(&video, &self.outputs.join(id.video_file_name()))?;
        timings.write_ms = Some(millis(write.elapsed()));
        timings.run_ms = Some(millis(started.elapsed()));
        Ok(())
    }

    /// Marks the job running and returns its stored request, validated again (the same
    /// checks as at submission).
    fn start(&self, id: &JobId, timings: &mut Timings) -> Result<Generation, Stopped> {
        let view = self
            .store
            .get(id)?
            .ok_or_else(|| Stopped::Failed("the job is not in the store".into()))?;
        timings.queued_ms = Some(u64::try_from(now_ms() - view.created_at).unwrap_or(0));
        self.store.mark_running(id, timings)?;
        self.update(id, JobProgress::at("loading_model", 0.0));
        let request: VideoRequest = serde_json::from_value(view.request)
            .map_err(|e| Stopped::Failed(format!("stored request: {e}")))?;
        let images = self.store.images(id)?;
        request
            .validate(&self.models.catalog, &self.limits, &images)
            .map_err(|e| Stopped::Failed(e.to_string()))
    }

    fn finish(
        &self,
        id: &JobId,
        status: JobStatus,
        stage: &str,
        timings: &Timings,
        error: Option<&str>,
    ) -> rusqlite::Result<()> {
        let mut progress = self
            .store
            .get(id)?
            .map_or_else(JobProgress::queued, |view| view.progress);
        progress.stage = stage.to_owned();
        if status == JobStatus::Succeeded {
            progress.fraction = 1.0;
        }
        self.store.finish(id, status, &progress, timings, error)
    }

    fn update(&self, id: &JobId, progress: JobProgress) {
        if let Err(e) = self.store.set_progress(id, &progress) {
            tracing::warn!(job = %id, "cannot record progress: {e}");
        }
        self.publish(id);
    }

    /// Sends the job as stored to every event stream watching it.
    fn publish(&self, id: &JobId) {
        if let Ok(Some(view)) = self.store.get(id) {
            // No subscriber is not an error.
            let _ = self.events.send(view);
        }
    }
}

fn run_pipeline(
    pipeline: &Pipeline,
    work: &Work,
    progress: &mut dyn Progress,
) -> turbodiffusion::Result<Video> {
    match work {
        Work::TextToVideo(request) => pipeline.text_to_video_with_progress(request, progress),
        Work::ImageToVideo(request) => pipeline.image_to_video_with_progress(request, progress),
    }
}

/// The weights the largest stage of `work` holds: the memory cost of keeping its model.
fn weight_bytes(pipeline: &Pipeline, work: &Work) -> turbodiffusion::Result<u64> {
    let estimate = match work {
        Work::TextToVideo(request) => pipeline.estimate_memory(request)?,
        Work::ImageToVideo(request) => pipeline.estimate_memory_i2v(request)?,
    };
    Ok(estimate.stages.iter().map(|s| s.weights).max().unwrap_or(0))
}

/// Writes the MP4 through a temporary file renamed into place, readable by all (0644)
/// whatever the umask.
fn write_video(video: &Video, path: &Path) -> Result<(), Stopped> {
    OutputFile::new(path, Existing::Replace)?.write(video, Mp4Options::default())?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644))
            .map_err(|e| Stopped::Failed(format!("{}: {e}", path.display())))?;
    }
    Ok(())
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    format!("internal error in the pipeline: {text}")
}

/// The pipeline's [`Progress`] for one job: records and publishes each stage and step, keeps
/// the stage timings, and stops sampling once the job is asked to stop.
struct Reporter<'a> {
    worker: &'a Worker,
    id: &'a JobId,
    stop: &'a StopFlag,
    timings: &'a mut Timings,
    /// Denoising steps done, of how many.
    denoised: (usize, usize),
}

impl Progress for Reporter<'_> {
    fn step_done(&mut self, report: &StepReport) -> ControlFlow<()> {
        let done = report.index + 1;
        self.denoised = (done, report.total);
        let share = done as f64 / report.total.max(1) as f64;
        self.worker.update(
            self.id,
            JobProgress {
                stage: "denoising".into(),
                step: done,
                steps: report.total,
                fraction: DENOISE_START + (DENOISE_END - DENOISE_START) * share,
            },
        );
        match self.stop.requested() {
            Some(_) => ControlFlow::Break(()),
            None => ControlFlow::Continue(()),
        }
    }

    fn stage(&mut self, stage: &Stage) {
        let progress = match *stage {
            Stage::EncodingText => JobProgress::at("encoding_text", 0.02),
            Stage::EncodingImage => JobProgress::at("encoding_image", 0.05),
            Stage::LoadingDit { .. } => JobProgress::at("loading_model", 0.08),
            Stage::Denoising { steps } => JobProgress {
                steps,
                ..JobProgress::at("denoising", DENOISE_START)
            },
            Stage::Decoding { done, total } => JobProgress {
                // The steps stay on show while the frames are decoded.
                step: self.denoised.0,
                steps: self.denoised.1,
                ..JobProgress::at(
                    "decoding",
                    DENOISE_END + (DECODE_END - DENOISE_END) * done as f64 / total.max(1) as f64,
                )
            },
            _ => return,
        };
        self.worker.update(self.id, progress);
    }

    fn stage_done(&mut self, report: &StageReport) {
        let ms = Some(millis(report.elapsed));
        match report.stage {
            Stage::EncodingText => self.timings.encode_text_ms = ms,
            Stage::EncodingImage => self.timings.encode_image_ms = ms,
            Stage::Denoising { .. } => self.timings.denoise_ms = ms,
            Stage::Decoding { .. } => self.timings.decode_ms = ms,
            _ => {}
        }
    }
}
