//! What the `t2v` and `i2v` examples share: drawing progress on the terminal and naming outputs.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use turbodiffusion::core::{Progress, Stage, StepReport};
use turbodiffusion::AttentionKind;

/// Prints each stage and step with the time since the start.
pub struct Console {
    started: Instant,
}

impl Console {
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
        }
    }

    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }
}

impl Progress for Console {
    fn step_done(&mut self, report: &StepReport) -> ControlFlow<()> {
        println!(
            "[{:>7.2?}] step {}/{} done (s = {:.4})",
            self.started.elapsed(),
            report.index + 1,
            report.total,
            report.s
        );
        ControlFlow::Continue(())
    }

    fn stage(&mut self, stage: &Stage) {
        let what = match stage {
            Stage::EncodingText => "encoding the prompt".to_owned(),
            Stage::EncodingImage => "encoding the image".to_owned(),
            Stage::LoadingDit {
                expert: Some(expert),
            } => format!("loading the {expert} expert"),
            Stage::LoadingDit { expert: None } => "loading the DiT".to_owned(),
            Stage::Denoising { steps } => format!("denoising, {steps} steps"),
            Stage::Decoding { done, total } => format!("decoding frames: {done}/{total}"),
            other => format!("{other:?}"),
        };
        println!("[{:>7.2?}] {what}", self.started.elapsed());
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
