//! Pipelines, inputs and progress recorders shared by the pipeline tests. Each test binary uses a part of
//! this module, so the rest is dead code there.
#![allow(dead_code)]

use std::ops::ControlFlow;

use candle_core::Device;
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::{Progress, Stage, StageReport, StepReport};
use turbodiffusion::pipeline::demo_request;
use turbodiffusion::video::InputImage;
use turbodiffusion::{AttentionKind, Pipeline, T2vRequest};

/// The built-in demo pipeline (seed 3) with `kind` attention, on the CPU.
pub fn demo(kind: AttentionKind) -> Pipeline {
    Pipeline::demo(3, AttentionConfig::new(kind), Device::Cpu).unwrap()
}

/// A short demo request (9 frames keep the suite fast).
pub fn short(prompt: &str, seed: u64) -> T2vRequest {
    T2vRequest {
        frames: 9,
        seed,
        ..demo_request(prompt)
    }
}

/// A `width × height` image whose red rises left to right and green top to bottom: every
/// pixel differs from its neighbours, so a misplaced row or column changes the video.
pub fn gradient_image(width: u32, height: u32) -> InputImage {
    let rgb = (0..height)
        .flat_map(|y| {
            (0..width).flat_map(move |x| [(x * 255 / width) as u8, (y * 255 / height) as u8, 128])
        })
        .collect();
    InputImage::from_rgb(width, height, rgb).unwrap()
}

/// Records what a run reports: the stages as they start, the steps, each finished stage's
/// report. It never cancels.
#[derive(Default)]
pub struct Recorder {
    pub stages: Vec<Stage>,
    pub steps: usize,
    pub reports: Vec<StageReport>,
}

impl Recorder {
    /// The weight bytes `stage` read (its report's `resident_bytes`); panics when the stage
    /// did not finish.
    pub fn resident_bytes(&self, stage: Stage) -> u64 {
        let report = self.reports.iter().find(|r| r.stage == stage);
        report
            .unwrap_or_else(|| panic!("{stage:?} not reported"))
            .resident_bytes
    }
}

impl Progress for Recorder {
    fn step_done(&mut self, _: &StepReport) -> ControlFlow<()> {
        self.steps += 1;
        ControlFlow::Continue(())
    }

    fn stage(&mut self, stage: &Stage) {
        self.stages.push(*stage);
    }

    fn stage_done(&mut self, report: &StageReport) {
        self.reports.push(*report);
    }
}
