//! What a caller asks for: every upstream option with the upstream default.

use turbo_core::{AspectRatio, Error, FrameCount, FrameSize, Resolution, Result, VideoGeometry};
use turbo_sampler::{FlowSolver, GuidanceScale, RcmConfig, RcmMode, WAN_NEGATIVE_PROMPT};

use super::ModelKind;

/// Sampler settings selectable by name with [`SamplerChoice::preset`]: `(name, what it is)`.
pub const SAMPLER_PRESETS: [(&str, &str); 3] = [
    (
        "rcm",
        "TurboDiffusion's distilled rCM students: 4 steps, SDE, no guidance (the default)",
    ),
    (
        "teacher",
        "the undistilled Wan2.1 checkpoints: UniPC, 50 steps, shift 5, guidance 5",
    ),
    (
        "distill-4step",
        "a base checkpoint with a step- and CFG-distillation LoRA (lightx2v-style): Euler, \
         4 steps, shift 5, guidance 1 (no CFG: one DiT pass per step)",
    ),
];

/// How the latent is sampled.
#[derive(Debug, Clone, PartialEq)]
pub enum SamplerChoice {
    /// The distilled rCM students (TurboDiffusion): 1–4 steps, no guidance.
    Rcm {
        steps: usize,
        /// σ of the first step; `None` takes the task's default (80 for T2V, 200 for I2V).
        sigma_max: Option<f64>,
        mode: RcmMode,
    },
    /// A flow-matching teacher solver for the undistilled Wan checkpoints, with classifier-free
    /// guidance against `negative_prompt`.
    Teacher {
        solver: FlowSolver,
        steps: usize,
        shift: f64,
        guidance: f64,
        negative_prompt: String,
    },
}

impl Default for SamplerChoice {
    /// TurboDiffusion's default: 4 rCM steps, SDE.
    fn default() -> Self {
        Self::Rcm {
            steps: 4,
            sigma_max: None,
            mode: RcmMode::Sde,
        }
    }
}

impl SamplerChoice {
    /// The Wan2.1 T2V teacher defaults: UniPC, 50 steps, shift 5, guidance 5, the upstream
    /// negative prompt.
    pub fn wan_teacher() -> Self {
        Self::Teacher {
            solver: FlowSolver::UniPc,
            steps: 50,
            shift: 5.0,
            guidance: 5.0,
            negative_prompt: turbo_sampler::WAN_NEGATIVE_PROMPT.to_owned(),
        }
    }

    /// The sampler settings called `name` in [`SAMPLER_PRESETS`].
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "rcm" => Ok(Self::default()),
            "teacher" => Ok(Self::wan_teacher()),
            "distill-4step" => Ok(Self::Teacher {
                solver: FlowSolver::Euler,
                steps: 4,
                shift: 5.0,
                guidance: 1.0,
                negative_prompt: String::new(),
            }),
            _ => Err(Error::InvalidSamplerSetting {
                setting: "sampler preset",
                value: name.to_owned(),
                expected: "one of rcm, teacher, distill-4step",
            }),
        }
    }

    /// The rCM settings for a task whose default σ_max is `default_sigma_max`.
    pub(crate) fn rcm_config(&self, default_sigma_max: f64) -> Option<RcmConfig> {
        match *self {
            Self::Rcm {
                steps,
                sigma_max,
                mode,
            } => Some(RcmConfig {
                sigma_max: sigma_max.unwrap_or(default_sigma_max),
                mode,
                ..RcmConfig::t2v(steps)
            }),
            Self::Teacher { .. } => None,
        }
    }
}

/// A text-to-video request. `Default` gives TurboDiffusion's T2V defaults (an empty prompt
/// must be filled in).
#[derive(Debug, Clone, PartialEq)]
pub struct T2vRequest {
    pub prompt: String,
    pub sampler: SamplerChoice,
    /// Frames, 4n + 1 (81: five seconds at 16 fps).
    pub frames: usize,
    pub resolution: Resolution,
    pub aspect_ratio: AspectRatio,
    /// An explicit frame size (multiples of 16) instead of the resolution table.
    pub size: Option<(usize, usize)>,
    pub seed: u64,
    /// SLA / SageSLA top-k fraction for this request, instead of the pipeline's.
    pub sla_topk: Option<f64>,
    /// SLA / SageSLA top-k fraction of each denoising step (as many values as steps, each in
    /// (0, 1]), overriding `sla_topk` step by step; for example `[0.05, 0.1, 0.1, 0.15]`.
    /// Dense attention has no top-k and ignores it.
    pub sla_topk_schedule: Option<Vec<f64>>,
    pub fps: f64,
    /// Teachers on the two-expert models (Wan2.2 A14B): the guidance scale while the
    /// high-noise expert runs, then while the low-noise one does (T2V-A14B publishes
    /// `[4, 3]`), instead of the sampler's one scale.
    pub expert_guidance: Option<[f64; 2]>,
}

impl Default for T2vRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            sampler: SamplerChoice::default(),
            frames: FrameCount::DEFAULT.get(),
            resolution: Resolution::P480,
            aspect_ratio: AspectRatio::Wide16x9,
            size: None,
            seed: 0,
            sla_topk: None,
            sla_topk_schedule: None,
            fps: 16.0,
            expert_guidance: None,
        }
    }
}

impl T2vRequest {
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            ..Self::default()
        }
    }

    /// The published settings of `kind` for `prompt`. The models TurboDiffusion distils keep
    /// its rCM defaults ([`T2vRequest::new`]; 720p for Wan2.2 I2V-A14B). The others run the Wan
    /// teacher (UniPC) with their task's steps, shift, guidance (per expert for A14B), negative
    /// prompt, frames and fps ([`turbo_sampler::WanTask::teacher`]), at 720p (Wan2.1
    /// I2V-14B-480P: 480p; TI2V-5B: 1280×704).
    pub fn for_model(kind: ModelKind, prompt: impl Into<String>) -> Self {
        let mut request = Self {
            resolution: match kind {
                ModelKind::Wan21T2V1_3B | ModelKind::Wan21T2V14B => Resolution::P480,
                ModelKind::Wan21I2V14B480P => Resolution::P480,
                _ => Resolution::P720,
            },
            size: (kind == ModelKind::Wan22Ti2v5B).then_some((1280, 704)),
            ..Self::new(prompt)
        };
        if kind.has_rcm_students() {
            return request;
        }
        let size = match request.size {
            Some(size) => size,
            None => {
                let size = request.resolution.frame_size(request.aspect_ratio);
                (size.width(), size.height())
            }
        };
        let teacher = kind.task().teacher(size.0, size.1);
        let (guidance, expert_guidance) = match teacher.guidance {
            GuidanceScale::Constant(scale) => (scale, None),
            GuidanceScale::PerExpert { high, low, .. } => (high, Some([high, low])),
        };
        request.sampler = SamplerChoice::Teacher {
            solver: FlowSolver::UniPc,
            steps: teacher.steps,
            shift: teacher.shift,
            guidance,
            negative_prompt: format!("{}{WAN_NEGATIVE_PROMPT}", teacher.negative_prefix),
        };
        request.expert_guidance = expert_guidance;
        request.frames = teacher.frames;
        request.fps = f64::from(teacher.fps);
        request
    }

    /// The video geometry, checked (4n + 1 frames, sizes multiples of 16).
    pub fn geometry(&self) -> Result<VideoGeometry> {
        let size = match self.size {
            Some((width, height)) => FrameSize::new(width, height)?,
            None => self.resolution.frame_size(self.aspect_ratio),
        };
        Ok(VideoGeometry::new(size, FrameCount::new(self.frames)?))
    }
}
