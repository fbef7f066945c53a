//! Image to video with the two Wan2.2 A14B experts, one resident at a time.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};
use turbo_attention::{Attention, AttentionConfig};
use turbo_core::{Error, Progress, Result, SeededNoise, Stage, VideoGeometry};
use turbo_models::wan::{DitCondition, ModelType, WanModel};
use turbo_models::WanVae;
use turbo_sampler::{Expert, ExpertBoundary, RcmSampler, I2V_A14B_BOUNDARY, I2V_SIGMA_MAX};
use turbo_video::{Fps, ImageFit, InputImage, Video};

use super::{Pipeline, T2vRequest};

/// An image-to-video request: the text-to-video settings (whose defaults differ: 720p,
/// σ_max 200) plus the image and the expert boundary.
#[derive(Debug, Clone)]
pub struct I2vRequest {
    pub image: InputImage,
    /// Prompt, sampler, frames, size, seed, top-k and fps, as for text to video.
    pub video: T2vRequest,
    /// Size the frame from the image's aspect ratio (`--adaptive_resolution`) instead of the
    /// resolution table.
    pub adaptive_resolution: bool,
    /// How the image is brought to the frame size (upstream stretches).
    pub fit: ImageFit,
    /// RF time at which the low-noise expert takes over (0.9).
    pub boundary: f64,
    /// SLA / SageSLA top-k per expert, `[high-noise, low-noise]` (for example `[0.05, 0.15]`),
    /// instead of one top-k for both (`video.sla_topk` or the pipeline's).
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

    fn geometry(&self) -> Result<VideoGeometry> {
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

    /// [`Pipeline::image_to_video`], reporting every sampling step to `progress`. Every setting
    /// is checked before any model is loaded.
    pub fn image_to_video_with_progress(
        &self,
        request: &I2vRequest,
        progress: &mut dyn Progress,
    ) -> Result<Video> {
        let plan = self.plan_i2v(request)?;
        progress.stage(&Stage::EncodingText);
        let (context, _) = self.encode_prompts(&request.video.prompt, None)?;
        progress.stage(&Stage::EncodingImage);
        let image = request
            .image
            .resize(plan.geometry.size, request.fit)?
            .to_tensor(&self.device)?;
        let condition = DitCondition {
            context,
            image: Some(self.image_condition(&image, plan.geometry)?),
        };
        let latent = self.sample_with_experts(&plan, &condition, request.video.seed, progress)?;
        Video::from_tensor(&self.decode(&latent, progress)?, plan.fps)
    }

    fn plan_i2v(&self, request: &I2vRequest) -> Result<I2vPlan> {
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
        let sampler = match request.video.sampler.rcm_config(I2V_SIGMA_MAX) {
            Some(cfg) => RcmSampler::new(cfg)?,
            None => {
                return Err(Error::InvalidConfig {
                    field: "sampler".into(),
                    reason: "image to video runs the rCM students; teacher solvers are text-to-video only for now"
                        .into(),
                })
            }
        };
        let mut attention = self.attention;
        if let Some(topk) = request.video.sla_topk {
            attention.kind = super::with_topk(attention.kind, topk)?;
        }
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
        let attention = [expert_attention(high)?, expert_attention(low)?];
        Ok(I2vPlan {
            geometry: request.geometry()?,
            sampler,
            boundary: ExpertBoundary::new(request.boundary)?,
            attention,
            fps: Fps::new(request.video.fps)?,
        })
    }

    /// `cat[mask(4), VAE(image, zeros…)(16)]` `[20, T, h, w]`: the mask is 1 on latent frame 0.
    fn image_condition(&self, image: &Tensor, geometry: VideoGeometry) -> Result<Tensor> {
        let frames = geometry.frames.get();
        let (channels, height, width) = image.dims3()?;
        let rest = Tensor::zeros(
            (channels, frames - 1, height, width),
            DType::F32,
            image.device(),
        )?;
        let video = Tensor::cat(&[&image.unsqueeze(1)?, &rest], 1)?.unsqueeze(0)?;
        let latent = {
            let vae = WanVae::load(
                self.var_builder(&self.models.vae_weights, DType::F32)?,
                &self.models.vae,
            )?;
            vae.encode(&video)?.squeeze(0)?
        };
        let (_, latent_frames, h, w) = latent.dims4()?;
        let first = Tensor::ones((4, 1, h, w), DType::F32, latent.device())?;
        let mask = first.pad_with_zeros(1, 0, latent_frames - 1)?;
        Ok(Tensor::cat(&[&mask, &latent], 0)?)
    }

    /// rCM over the two experts, loading each when its first step comes and dropping the
    /// high-noise one before the low-noise one is loaded.
    fn sample_with_experts(
        &self,
        plan: &I2vPlan,
        condition: &DitCondition,
        seed: u64,
        progress: &mut dyn Progress,
    ) -> Result<Tensor> {
        let mut noise = SeededNoise::new(seed);
        let shape = plan.geometry.latent_shape().dims();
        let mut run = plan.sampler.start(&mut noise, &shape, &self.device)?;
        progress.stage(&Stage::Denoising {
            steps: plan.sampler.timesteps().len(),
        });
        let mut resident: Option<(Expert, WanModel<Box<dyn Attention>>)> = None;
        while let Some(step) = run.next_step() {
            let expert = plan.boundary.expert_at(plan.sampler.timesteps()[step]);
            if resident.as_ref().map(|(e, _)| *e) != Some(expert) {
                // Free the resident expert before the next one is read.
                drop(resident.take());
                progress.stage(&Stage::LoadingDit {
                    expert: Some(expert.name()),
                });
                let attention = match expert {
                    Expert::HighNoise => &plan.attention[0],
                    Expert::LowNoise => &plan.attention[1],
                };
                resident = Some((expert, self.load_expert(expert, attention)?));
            }
            let (_, model) = resident.as_ref().expect("loaded above");
            let report = run
                .step(model, condition, &mut noise)?
                .expect("a step was pending");
            if let ControlFlow::Break(()) = progress.step_done(&report) {
                return Err(Error::Cancelled {
                    completed: report.index + 1,
                    total: report.total,
                });
            }
        }
        drop(resident);
        run.finish()
    }

    fn load_expert(
        &self,
        expert: Expert,
        attention: &AttentionConfig,
    ) -> Result<WanModel<Box<dyn Attention>>> {
        let source = match expert {
            Expert::HighNoise => &self.models.dit_weights,
            Expert::LowNoise => self
                .models
                .dit_low_noise_weights
                .as_ref()
                .expect("checked in plan_i2v"),
        };
        tracing::info!("loading the {} expert", expert.name());
        self.load_dit(source, attention)
    }
}

struct I2vPlan {
    geometry: VideoGeometry,
    sampler: RcmSampler,
    boundary: ExpertBoundary,
    /// The attention of the high-noise and of the low-noise expert.
    attention: [AttentionConfig; 2],
    fps: Fps,
}
