//! Image to video with the two Wan2.2 A14B experts, one resident at a time.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use turbo_attention::AttentionConfig;
use turbo_core::{Error, Progress, Result, Stage, VideoGeometry};
use turbo_models::wan::{DitCondition, ModelType};
use turbo_sampler::{ExpertBoundary, I2V_A14B_BOUNDARY, I2V_SIGMA_MAX};
use turbo_video::{Fps, ImageFit, InputImage, Mp4Options, OutputFile, Video};

use super::denoise::{DenoisePlan, DitPlan, PlannedSampler};
use super::frames::FrameSink;
use super::memory::StageMeter;
use super::{MemoryEstimate, Pipeline, Plan, T2vRequest};

/// An image-to-video request: the text-to-video settings (whose defaults differ: 720p,
/// σ_max 200) plus the image and the expert boundary.
#[derive(Debug, Clone)]
pub struct I2vRequest {
    pub image: InputImage,
    /// Prompt, sampler (rCM, or a teacher with guidance), frames, size, seed, top-k (one, or
    /// a schedule per step) and fps, as for text to video.
    pub video: T2vRequest,
    /// Size the frame from the image's aspect ratio (`--adaptive_resolution`) instead of the
    /// resolution table.
    pub adaptive_resolution: bool,
    /// How the image is brought to the frame size (upstream stretches).
    pub fit: ImageFit,
    /// RF time at which the low-noise expert takes over (0.9).
    pub boundary: f64,
    /// SLA / SageSLA top-k per expert, `[high-noise, low-noise]` (for example `[0.05, 0.15]`),
    /// instead of one top-k for both (`video.sla_topk` or the pipeline's). Giving this and
    /// `video.sla_topk_schedule` together is an error.
    pub expert_topk: Option<[f64; 2]>,
}

impl I2vRequest {
    /// TurboDiffusion's I2V defaults: 720p, 16:9, 81 frames, 4 rCM steps with σ_max 200.
    pub fn new(image: InputImage, prompt: impl Into<String>) -> Self {
        Self {
            image,
            video: T2vRequest {
                resolution: turbo_core::Resolution::P720,
                ..T2vRequest::new(prompt)
            },
            adaptive_resolution: false,
            fit: ImageFit::Stretch,
            boundary: I2V_A14B_BOUNDARY,
            expert_topk: None,
        }
    }

    /// The size and length of the video: the request's size, or one the image's aspect
    /// ratio gives at the request's resolution.
    pub fn geometry(&self) -> Result<VideoGeometry> {
        let v = &self.video;
        let size = match v.size {
            Some(_) => v.geometry()?.size,
            None => {
                self.image
                    .frame_size(v.resolution, v.aspect_ratio, self.adaptive_resolution)?
            }
        };
        Ok(VideoGeometry::new(size, v.geometry()?.frames))
    }
}

impl Pipeline {
    /// Generates a video that starts from `request.image`.
    pub fn image_to_video(&self, request: &I2vRequest) -> Result<Video> {
        self.image_to_video_with_progress(request, &mut turbo_core::NoProgress)
    }

    /// [`Pipeline::estimate_memory`] for image to video (the image encoding included).
    pub fn estimate_memory_i2v(&self, request: &I2vRequest) -> Result<MemoryEstimate> {
        let plan = self.plan_i2v(request)?;
        Ok(self.plan_memory(&plan, &request.video.prompt, true)?.0)
    }

    /// [`Pipeline::image_to_video`], reporting every stage and sampling step to `progress`.
    /// Every setting, and the memory estimate against the budget, is checked before any model
    /// is loaded.
    pub fn image_to_video_with_progress(
        &self,
        request: &I2vRequest,
        progress: &mut dyn Progress,
    ) -> Result<Video> {
        let plan = self.plan_i2v(request)?;
        let mut frames = plan.memory_frames();
        self.generate_i2v(&plan, request, &mut frames, progress)?;
        frames.into_video()
    }

    /// [`Pipeline::image_to_video_with_progress`], writing the video to `output` as it is
    /// decoded (see [`Pipeline::text_to_video_file`]); returns the path written.
    pub fn image_to_video_file(
        &self,
        request: &I2vRequest,
        output: &OutputFile,
        options: Mp4Options,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        let plan = self.plan_i2v(request)?;
        output.check_fps(plan.fps)?;
        let mut frames = plan.file_frames(output, options);
        self.generate_i2v(&plan, request, &mut frames, progress)?;
        frames.finish(progress)
    }

    /// Runs a planned image-to-video, handing the frames to `frames` as they are decoded.
    fn generate_i2v(
        &self,
        plan: &Plan,
        request: &I2vRequest,
        frames: &mut dyn FrameSink,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let memory = self.checked_memory(plan, &request.video.prompt, true)?;
        self.check_weight_files(&plan.denoise.dits)?;
        let (context, negative) = self.encode_prompts(
            &request.video.prompt,
            plan.denoise.sampler.negative_prompt(),
            progress,
        )?;
        let image = self.image_condition(request, plan.geometry, progress)?;
        let condition = |context| DitCondition {
            image: Some(image.clone()),
            ..DitCondition::text(context)
        };
        let latent = self.denoise(
            &plan.denoise,
            &condition(context),
            negative.map(condition).as_ref(),
            request.video.seed,
            progress,
        )?;
        self.latent_to_frames(plan, &latent, memory.vae_tiling, frames, progress)
    }

    fn plan_i2v(&self, request: &I2vRequest) -> Result<Plan> {
        if self.models.dit.model_type != ModelType::I2v
            || self.models.dit_low_noise_weights.is_none()
        {
            return Err(Error::InvalidConfig {
                field: "model".into(),
                reason: "image_to_video needs the two Wan2.2 I2V experts".into(),
            });
        }
        if request.video.prompt.trim().is_empty() {
            return Err(Error::EmptyPrompt);
        }
        if request.expert_topk.is_some() && request.video.sla_topk_schedule.is_some() {
            return Err(Error::InvalidSamplerSetting {
                setting: "SLA top-k",
                value: "a schedule per step and a top-k per expert".into(),
                expected: "one of a top-k schedule per step or a top-k per expert",
            });
        }
        let attention = self.request_attention(&request.video)?;
        let expert_attention = |topk: Option<f64>| -> Result<AttentionConfig> {
            Ok(match topk {
                Some(topk) => AttentionConfig {
                    kind: super::with_topk(attention.kind, topk)?,
                    ..attention
                },
                None => attention,
            })
        };
        let [high, low] = request
            .expert_topk
            .map_or([None, None], |[h, l]| [Some(h), Some(l)]);
        let dits = DitPlan::Experts {
            boundary: ExpertBoundary::new(request.boundary)?,
            attention: [expert_attention(high)?, expert_attention(low)?],
        };
        let geometry = request.geometry()?;
        Ok(Plan {
            geometry,
            denoise: DenoisePlan::new(
                PlannedSampler::new(&request.video.sampler, I2V_SIGMA_MAX)?,
                dits,
                request.video.sla_topk_schedule.as_deref(),
                geometry.latent_shape().dims().to_vec(),
            )?,
            fps: Fps::new(request.video.fps)?,
        })
    }

    /// The image resized to the frame and encoded with the VAE (dropped after):
    /// `cat[mask(4), VAE(image, zeros…)(16)]` `[20, T, h, w]`, the mask 1 on latent frame 0.
    fn image_condition(
        &self,
        request: &I2vRequest,
        geometry: VideoGeometry,
        progress: &mut dyn Progress,
    ) -> Result<Tensor> {
        let meter = StageMeter::start(&self.device)?;
        progress.stage(&Stage::EncodingImage);
        let image = request
            .image
            .resize(geometry.size, request.fit)?
            .to_tensor(&self.device)?;
        let image = image.unsqueeze(0)?.unsqueeze(2)?.to_dtype(self.dtype)?;
        let (latent, bytes) = {
            let (vae, bytes) = self.load_vae()?;
            let latent = vae.encode_image(&image, geometry.frames)?;
            (latent.squeeze(0)?.to_dtype(DType::F32)?, bytes)
        };
        let (_, latent_frames, h, w) = latent.dims4()?;
        let first = Tensor::ones((4, 1, h, w), DType::F32, latent.device())?;
        let mask = first.pad_with_zeros(1, 0, latent_frames - 1)?;
        super::checks::ensure_finite(&latent, &Stage::EncodingImage, "the image latent")?;
        let condition = Tensor::cat(&[&mask, &latent], 0)?;
        meter.finish(Stage::EncodingImage, bytes, &self.device, progress)?;
        Ok(condition)
    }
}
