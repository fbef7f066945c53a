//! Image to video: the two Wan2.2 I2V-A14B experts (one resident at a time), Wan2.1 I2V-14B and
//! FLF2V-14B (CLIP tokens of the start, and end, image), Wan2.2 TI2V-5B (the image's latent
//! frame held at t = 0).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use turbo_attention::AttentionConfig;
use turbo_core::{Error, FrameCount, Progress, Result, Stage, VideoGeometry};
use turbo_models::wan::{DitCondition, ModelType, MASK_CHANNELS};
use turbo_models::{ClipVisionEncoder, WanVae};
use turbo_sampler::{ExpertBoundary, I2V_A14B_BOUNDARY, I2V_SIGMA_MAX};
use turbo_video::{ImageFit, InputImage, Mp4Options, OutputFile, Video};

use super::denoise::DitPlan;
use super::frames::FrameSink;
use super::memory::{StageMeter, WeightBytes};
use super::resident::resident_or_load;
use super::{ClipModel, MemoryEstimate, ModelKind, Pipeline, Plan, T2vRequest};

/// An image-to-video request: the text-to-video settings (whose defaults differ: 720p,
/// σ_max 200) plus the image and the expert boundary.
#[derive(Debug, Clone)]
pub struct I2vRequest {
    /// The first frame.
    pub image: InputImage,
    /// The last frame (FLF2V only; the other models refuse one).
    pub end_image: Option<InputImage>,
    /// Prompt, sampler (rCM, or a teacher with guidance), frames, size, seed, top-k (one, or
    /// a schedule per step) and fps, as for text to video.
    pub video: T2vRequest,
    /// Size the frame from the image's aspect ratio (`--adaptive_resolution`) instead of the
    /// resolution table.
    pub adaptive_resolution: bool,
    /// How the image is brought to the frame size (upstream stretches).
    pub fit: ImageFit,
    /// RF time at which the low-noise expert takes over (0.9; two-expert models only).
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
            end_image: None,
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

    /// The published settings of `kind` ([`T2vRequest::for_model`]) starting from `image`.
    pub fn for_model(kind: ModelKind, image: InputImage, prompt: impl Into<String>) -> Self {
        Self {
            video: T2vRequest::for_model(kind, prompt),
            ..Self::new(image, String::new())
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
        if !self.ranks.writes_output() {
            let mut discarded = super::frames::DiscardedFrames;
            self.generate_i2v(&plan, request, &mut discarded, progress)?;
            return Ok(output.path().to_path_buf());
        }
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
        let memory = self.preflight(plan, &request.video.prompt, true)?;
        let (context, negative) =
            self.encode_prompts(&request.video.prompt, &plan.denoise, progress)?;
        let image = self.image_condition(request, plan.geometry, progress)?;
        let condition = |context| image.condition(context);
        let latent = self.denoise(
            &plan.denoise,
            &condition(context),
            negative.map(condition).as_ref(),
            image.held_latent.as_ref(),
            request.video.seed,
            progress,
        )?;
        self.latent_to_frames(plan, &latent, memory.vae_tiling, frames, progress)
    }

    /// Everything an image-to-video request needs, validated against the model: the A14B I2V
    /// experts, or one DiT (Wan2.1 I2V / FLF2V with their CLIP encoder, TI2V); an end image
    /// for FLF2V and only there.
    fn plan_i2v(&self, request: &I2vRequest) -> Result<Plan> {
        self.check_image_inputs(request)?;
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
        let dits = match (&self.models.dit_low_noise_weights, request.expert_topk) {
            (Some(_), topk) => {
                let expert_attention = |topk: Option<f64>| -> Result<AttentionConfig> {
                    Ok(match topk {
                        Some(topk) => AttentionConfig {
                            kind: super::with_topk(attention.kind, topk)?,
                            ..attention
                        },
                        None => attention,
                    })
                };
                let [high, low] = topk.map_or([None, None], |[h, l]| [Some(h), Some(l)]);
                DitPlan::Experts {
                    boundary: ExpertBoundary::new(request.boundary)?,
                    attention: [expert_attention(high)?, expert_attention(low)?],
                }
            }
            (None, Some(_)) => {
                return Err(Error::InvalidSamplerSetting {
                    setting: "SLA top-k per expert",
                    value: "given for a model with one DiT".into(),
                    expected: "a two-expert model (Wan2.2 A14B)",
                })
            }
            (None, None) => DitPlan::Single(attention),
        };
        self.plan_video(&request.video, request.geometry()?, dits, I2V_SIGMA_MAX)
    }

    /// The model takes images, has what it needs to encode them, and `request` gives the
    /// images it takes.
    fn check_image_inputs(&self, request: &I2vRequest) -> Result<()> {
        let model_type = self.models.dit.model_type;
        let refuse = |reason: &str| {
            Err(Error::InvalidConfig {
                field: "model".into(),
                reason: reason.into(),
            })
        };
        match model_type {
            ModelType::T2v => return refuse("image_to_video needs an I2V, FLF2V or TI2V model"),
            ModelType::I2v if self.models.dit_low_noise_weights.is_none() => {
                return refuse("image_to_video needs the two Wan2.2 I2V experts")
            }
            _ if model_type.uses_clip() && self.models.clip.is_none() => {
                return refuse("this model needs the CLIP image encoder (ModelSet::clip)")
            }
            _ => {}
        }
        match (model_type == ModelType::Flf2v, request.end_image.is_some()) {
            (true, false) => Err(Error::InvalidConfig {
                field: "end_image".into(),
                reason: "FLF2V generates from a first and a last frame: give end_image".into(),
            }),
            (false, true) => Err(Error::InvalidConfig {
                field: "end_image".into(),
                reason: "only FLF2V takes an end image".into(),
            }),
            _ => Ok(()),
        }
    }

    /// The image inputs of the DiT, each encoder loaded and dropped in turn: the CLIP tokens of
    /// the images as given (Wan2.1 I2V / FLF2V), then with the VAE either the mask and image
    /// latent channels (`[20, T, h, w]`, the I2V models) or TI2V's image latent `[48, 1, h, w]`.
    fn image_condition(
        &self,
        request: &I2vRequest,
        geometry: VideoGeometry,
        progress: &mut dyn Progress,
    ) -> Result<ImageCondition> {
        let meter = StageMeter::start(&self.device)?;
        progress.stage(&Stage::EncodingImage);
        let images: Vec<&InputImage> = std::iter::once(&request.image)
            .chain(request.end_image.as_ref())
            .collect();
        let (clip, clip_bytes) = match &self.models.clip {
            Some(clip) if self.models.dit.model_type.uses_clip() => {
                let (tokens, bytes) = self.clip_tokens(clip, &images)?;
                (Some(tokens), bytes)
            }
            _ => (None, 0),
        };
        let frames = images
            .iter()
            .map(|image| self.frame_tensor(image, geometry, request.fit))
            .collect::<Result<Vec<_>>>()?;
        let (vae, vae_bytes) = self.load_vae()?;
        let condition = if self.models.dit.model_type == ModelType::Ti2v {
            let latent = vae.wan22()?.encode(&frames[0].unsqueeze(2)?)?;
            ImageCondition {
                channels: None,
                clip,
                held_latent: Some(latent.squeeze(0)?.to_dtype(DType::F32)?),
            }
        } else {
            let latent = mask_and_latent(vae.wan21()?, &frames, geometry.frames)?;
            ImageCondition {
                channels: Some(latent),
                clip,
                held_latent: None,
            }
        };
        drop(vae);
        for tensor in [&condition.channels, &condition.held_latent, &condition.clip]
            .into_iter()
            .flatten()
        {
            super::checks::ensure_finite(tensor, &Stage::EncodingImage, "the image condition")?;
        }
        let resident = clip_bytes.max(vae_bytes);
        meter.finish(Stage::EncodingImage, resident, &self.device, progress)?;
        Ok(condition)
    }

    /// `image` fitted to the frame, `[1, 3, H, W]` in [-1, 1] in the pipeline's dtype.
    fn frame_tensor(
        &self,
        image: &InputImage,
        geometry: VideoGeometry,
        fit: ImageFit,
    ) -> Result<Tensor> {
        let tensor = image.resize(geometry.size, fit)?.to_tensor(&self.device)?;
        Ok(tensor.unsqueeze(0)?.to_dtype(self.dtype)?)
    }

    /// The CLIP tokens of `images` as given (upstream encodes the image it was handed, not the
    /// frame-sized one), `[images, N, 1280]` in f32, and the bytes of the encoder's weights.
    fn clip_tokens(&self, clip: &ClipModel, images: &[&InputImage]) -> Result<(Tensor, u64)> {
        let load = || {
            let bytes = WeightBytes::default();
            let vb = self.var_builder(&clip.weights, self.dtype)?;
            let encoder = ClipVisionEncoder::load(bytes.counting(vb), &clip.config)?;
            Ok((encoder, bytes.get()))
        };
        let (encoder, bytes) = resident_or_load(
            "the CLIP image encoder",
            self.residency.clip,
            &self.residents.clip,
            load,
        )?;
        let tokens = images
            .iter()
            .map(|image| encoder.encode_image(&image.to_tensor(&self.device)?))
            .collect::<Result<Vec<_>>>()?;
        Ok((Tensor::cat(&tokens, 0)?.to_dtype(DType::F32)?, bytes))
    }
}

/// The image inputs of the DiT besides the text.
struct ImageCondition {
    /// Mask and image latent `[4 + 16, T, h, w]` (the I2V models).
    channels: Option<Tensor>,
    /// CLIP tokens `[1 or 2, N, 1280]` (Wan2.1 I2V / FLF2V).
    clip: Option<Tensor>,
    /// The image's latent frame `[48, 1, h, w]` (TI2V), held at t = 0.
    held_latent: Option<Tensor>,
}

impl ImageCondition {
    /// The DiT's condition with `context`.
    fn condition(&self, context: Tensor) -> DitCondition {
        DitCondition {
            context,
            image: self.channels.clone(),
            clip: self.clip.clone(),
            held_frames: self.held_latent.as_ref().map_or(0, |_| 1),
        }
    }
}

/// `cat[mask(4), VAE(video)(16)]` `[20, T, h, w]` in f32: the video is the first frame then zeros
/// (upstream's `cat[image, zeros]`), or for FLF2V (two `frames`) the first frame, zeros and the
/// last frame; the mask marks the given frames.
fn mask_and_latent(vae: &WanVae, frames: &[Tensor], count: FrameCount) -> Result<Tensor> {
    let first = frames[0].unsqueeze(2)?;
    let latent = match frames.get(1) {
        None => vae.encode_image(&first, count)?,
        Some(last) => vae.encode_first_last(&first, &last.unsqueeze(2)?, count)?,
    };
    let latent = latent.squeeze(0)?.to_dtype(DType::F32)?;
    let (_, latent_frames, h, w) = latent.dims4()?;
    let mask = frame_mask(latent_frames, h, w, frames.len() == 2, latent.device())?;
    Ok(Tensor::cat(&[&mask, &latent], 0)?)
}

/// Upstream's mask `[4, T, h, w]` of the given frames: video frame 0 fills the four channels of
/// latent frame 0 (it is repeated four times before the frames are grouped in fours); the last
/// video frame (`end_frame`) is channel 3 of the last latent frame.
fn frame_mask(
    latent_frames: usize,
    height: usize,
    width: usize,
    end_frame: bool,
    device: &Device,
) -> Result<Tensor> {
    let mut values = vec![0f32; MASK_CHANNELS * latent_frames];
    for channel in 0..MASK_CHANNELS {
        values[channel * latent_frames] = 1.0;
    }
    if end_frame {
        values[MASK_CHANNELS * latent_frames - 1] = 1.0;
    }
    let shape = (MASK_CHANNELS, latent_frames, height, width);
    let mask = Tensor::from_vec(values, (MASK_CHANNELS, latent_frames, 1, 1), device)?;
    Ok(mask.broadcast_as(shape)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask upstream builds (`msk[:, 1:-1] = 0`, the first frame repeated four times, the
    /// frames grouped in fours) for 9 frames: 3 latent frames.
    #[test]
    fn frame_masks_follow_upstream() {
        let values = |end| {
            frame_mask(3, 1, 1, end, &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        // Channel-major: [channel][latent frame].
        let first_only = [1., 0., 0., 1., 0., 0., 1., 0., 0., 1., 0., 0.];
        let first_and_last = [1., 0., 0., 1., 0., 0., 1., 0., 0., 1., 0., 1.];
        assert_eq!(values(false), first_only);
        assert_eq!(values(true), first_and_last);
    }
}
