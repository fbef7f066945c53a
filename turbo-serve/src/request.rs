//! The body of `POST /v1/videos` and its validation into what the pipeline runs. Every refusal
//! names the field at fault.

use serde::{Deserialize, Serialize};
use turbodiffusion::core::{AspectRatio, FrameCount, FrameSize, Resolution};
use turbodiffusion::pipeline::{I2vRequest, SamplerChoice};
use turbodiffusion::video::InputImage;
use turbodiffusion::{AttentionKind, T2vRequest};

use crate::error::ApiError;
use crate::images::{decode_base64_image, ImageField, ImageUse, InputImages};
use crate::models::{ModelCatalog, ModelEntry, PipelineKey, Task};

/// Limits on what one request may ask for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RequestLimits {
    /// Characters of the prompt and of the negative prompt.
    pub max_prompt_chars: usize,
    /// Pixels of a frame side.
    pub max_side: usize,
    pub max_frames: usize,
    /// Bytes of the encoded image.
    pub max_image_bytes: usize,
    /// Pixels of a side of the uploaded image.
    pub max_image_side: u32,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_prompt_chars: 2000,
            max_side: 1280,
            max_frames: 161,
            max_image_bytes: 10 << 20,
            max_image_side: 4096,
        }
    }
}

/// Steps the distilled rCM students take at most; teachers may take more.
const MAX_RCM_STEPS: usize = 4;
const MAX_TEACHER_STEPS: usize = 100;
/// How strongly a LoRA adapter may be applied, either way.
const MAX_LORA_STRENGTH: f64 = 4.0;

/// A LoRA adapter the server offers (see `GET /v1/models`), by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraChoice {
    pub name: String,
    #[serde(default = "full_strength")]
    pub strength: f64,
}

fn full_strength() -> f64 {
    1.0
}

/// `POST /v1/videos`, as sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VideoRequest {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative_prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// A PNG, JPEG or WebP image in base64, bare or as a `data:` URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The last frame (FLF2V), as `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    /// `480p` or `720p` (with `aspect_ratio`, when no width and height are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<String>,
    /// `16:9`, `9:16`, `1:1`, `4:3` or `3:4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect_ratio: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_frames: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// `rcm`, `teacher` or `distill-4step` (default: the model's, `rcm` or its teacher).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sampler: Option<String>,
    /// `original`, `sla[:topk]` or `sagesla[:topk]` (default `sagesla:0.1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention: Option<String>,
    /// W8A8 block linears.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quant: Option<bool>,
    /// Random when absent; the job records the seed it used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<Vec<LoraChoice>>,
}

/// A validated request: the pipeline to use and what to ask it.
#[derive(Debug, Clone)]
pub struct Generation {
    pub key: PipelineKey,
    pub work: Work,
}

/// Text to video, or image to video.
#[derive(Debug, Clone)]
pub enum Work {
    TextToVideo(T2vRequest),
    ImageToVideo(Box<I2vRequest>),
}

impl VideoRequest {
    /// Parses a JSON body; an error names the field that does not fit.
    pub fn parse(body: &[u8]) -> Result<Self, ApiError> {
        let deserializer = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let message = e.inner().to_string();
            let missing = message
                .strip_prefix("missing field `")
                .and_then(|rest| rest.split_once('`'))
                .map(|(name, _)| name.to_owned());
            let field = match (e.path().to_string(), missing) {
                (path, Some(name)) if path == "." => name,
                (path, None) if path == "." => "body".to_owned(),
                (path, _) => path,
            };
            ApiError::field(field, message)
        })
    }

    /// Takes the images out of the request, decoded from base64 (the request is then stored
    /// without them, and the bytes beside it).
    pub fn take_images(&mut self, limits: &RequestLimits) -> Result<InputImages, ApiError> {
        let mut images = InputImages::default();
        for field in ImageField::ALL {
            if let Some(text) = self.image_text_mut(field).take() {
                images.set_once(field, decode_base64_image(field, &text, limits)?)?;
            }
        }
        Ok(images)
    }

    fn image_text_mut(&mut self, field: ImageField) -> &mut Option<String> {
        match field {
            ImageField::Image => &mut self.image,
            ImageField::EndImage => &mut self.end_image,
        }
    }

    /// Fills in the seed, so that the recorded request repeats the video.
    pub fn with_seed(mut self) -> Self {
        self.seed = Some(self.seed.unwrap_or_else(rand::random));
        self
    }

    /// Checks every field against the models and the limits; `images` are those uploaded.
    pub fn validate(
        &self,
        catalog: &ModelCatalog,
        limits: &RequestLimits,
        images: &InputImages,
    ) -> Result<Generation, ApiError> {
        check_text("prompt", &self.prompt, limits)?;
        if self.prompt.trim().is_empty() {
            return Err(ApiError::field("prompt", "must not be empty"));
        }
        let model = self.model(catalog, images)?;
        check_image_fields(model, images)?;
        let attention = self.attention()?;
        let key = PipelineKey {
            model: model.id.clone(),
            attention: attention.name(),
            quant: self.quant.unwrap_or(false),
            loras: self.loras(catalog)?,
        };
        let video = T2vRequest {
            sla_topk: attention.topk(),
            seed: self.seed.unwrap_or(0),
            ..self.video_settings(model, limits)?
        };
        let work = match decode_image(ImageField::Image, images, limits)? {
            Some(image) => Work::ImageToVideo(Box::new(I2vRequest {
                video,
                end_image: decode_image(ImageField::EndImage, images, limits)?,
                ..I2vRequest::for_model(model.kind, image, String::new())
            })),
            None => Work::TextToVideo(video),
        };
        Ok(Generation { key, work })
    }

    /// The model named, or the first for the task (given, or implied by the images).
    fn model<'c>(
        &self,
        catalog: &'c ModelCatalog,
        images: &InputImages,
    ) -> Result<&'c ModelEntry, ApiError> {
        let task = self
            .task
            .unwrap_or_else(|| Task::implied(images.image.is_some(), images.end_image.is_some()));
        let model = match &self.model {
            Some(id) => catalog.find(id).ok_or_else(|| {
                let known: Vec<_> = catalog.entries().iter().map(|e| e.id.as_str()).collect();
                ApiError::field(
                    "model",
                    format!("unknown model `{id}` (known: {})", known.join(", ")),
                )
            })?,
            None => catalog.default_for(task).ok_or_else(|| {
                ApiError::field("task", format!("no model here does {}", task.name()))
            })?,
        };
        if self.task.is_some_and(|task| task != model.task) {
            return Err(ApiError::field(
                "task",
                format!(
                    "model `{}` does {}, not {}",
                    model.id,
                    model.task.name(),
                    task.name()
                ),
            ));
        }
        Ok(model)
    }

    fn attention(&self) -> Result<AttentionKind, ApiError> {
        let text = self.attention.as_deref().unwrap_or("sagesla:0.1");
        text.parse()
            .map_err(|e: turbodiffusion::Error| ApiError::field("attention", e.to_string()))
    }

    /// The sampler asked for, or the model's; `teacher` on a model that defaults to its
    /// teacher is that teacher (its steps, shift and guidance).
    fn sampler(
        &self,
        model: &ModelEntry,
        default: &SamplerChoice,
    ) -> Result<SamplerChoice, ApiError> {
        let mut sampler = match self.sampler.as_deref() {
            _ if self.takes_model_sampler(default) => default.clone(),
            preset => SamplerChoice::preset(preset.unwrap_or("rcm"))
                .map_err(|e| ApiError::field("sampler", e.to_string()))?,
        };
        match &mut sampler {
            SamplerChoice::Rcm { .. } if !model.kind.has_rcm_students() => {
                return Err(ApiError::field(
                    "sampler",
                    format!(
                        "model `{}` has no rCM students; use `teacher` (its default)",
                        model.id
                    ),
                ))
            }
            SamplerChoice::Rcm { steps, .. } => {
                *steps = checked_steps(self.steps, *steps, MAX_RCM_STEPS)?;
                if self.negative_prompt.is_some() {
                    return Err(ApiError::field(
                        "negative_prompt",
                        "rCM sampling uses no guidance; a negative prompt needs sampler `teacher`",
                    ));
                }
            }
            SamplerChoice::Teacher {
                steps,
                negative_prompt,
                ..
            } => {
                *steps = checked_steps(self.steps, *steps, MAX_TEACHER_STEPS)?;
                if let Some(negative) = &self.negative_prompt {
                    negative_prompt.clone_from(negative);
                }
            }
        }
        Ok(sampler)
    }

    /// Whether the request keeps the model's own sampler: it names none, or names the
    /// teacher of a model that samples with its teacher.
    fn takes_model_sampler(&self, default: &SamplerChoice) -> bool {
        match self.sampler.as_deref() {
            None => true,
            Some("teacher") => matches!(default, SamplerChoice::Teacher { .. }),
            Some(_) => false,
        }
    }

    /// The model's settings with the request's sampler, size and length, checked against the
    /// limits.
    fn video_settings(
        &self,
        model: &ModelEntry,
        limits: &RequestLimits,
    ) -> Result<T2vRequest, ApiError> {
        if let Some(negative) = &self.negative_prompt {
            check_text("negative_prompt", negative, limits)?;
        }
        let base = model.base_request(self.prompt.clone());
        let request = T2vRequest {
            sampler: self.sampler(model, &base.sampler)?,
            // The per-expert guidance belongs to the model's teacher.
            expert_guidance: base
                .expert_guidance
                .filter(|_| self.takes_model_sampler(&base.sampler)),
            frames: checked_frames(self.num_frames.unwrap_or(base.frames), limits)?,
            resolution: self.resolution(base.resolution)?,
            aspect_ratio: self.aspect_ratio(base.aspect_ratio)?,
            size: self.size(base.size, limits)?,
            ..base
        };
        check_geometry(&request, limits)?;
        Ok(request)
    }

    fn resolution(&self, default: Resolution) -> Result<Resolution, ApiError> {
        match &self.resolution {
            Some(text) => text
                .parse::<Resolution>()
                .map_err(|e| ApiError::field("resolution", e.to_string())),
            None => Ok(default),
        }
    }

    fn aspect_ratio(&self, default: AspectRatio) -> Result<AspectRatio, ApiError> {
        match &self.aspect_ratio {
            Some(text) => text
                .parse::<AspectRatio>()
                .map_err(|e| ApiError::field("aspect_ratio", e.to_string())),
            None => Ok(default),
        }
    }

    /// The explicit frame size: the request's, none when it asks for a resolution or an
    /// aspect ratio instead, else the model's.
    fn size(
        &self,
        default: Option<(usize, usize)>,
        limits: &RequestLimits,
    ) -> Result<Option<(usize, usize)>, ApiError> {
        match (self.width, self.height) {
            (Some(width), Some(height)) => Ok(Some(checked_size(width, height, limits)?)),
            (None, None) if self.resolution.is_some() || self.aspect_ratio.is_some() => Ok(None),
            (None, None) => Ok(default),
            (Some(_), None) => Err(ApiError::field("height", "give it with width")),
            (None, Some(_)) => Err(ApiError::field("width", "give it with height")),
        }
    }

    fn loras(&self, catalog: &ModelCatalog) -> Result<Vec<(String, f64)>, ApiError> {
        let choices = self.lora.as_deref().unwrap_or_default();
        choices
            .iter()
            .map(|choice| {
                if !catalog.lora_names().any(|name| name == choice.name) {
                    let known: Vec<_> = catalog.lora_names().collect();
                    return Err(ApiError::field(
                        "lora",
                        format!(
                            "no adapter `{}` (offered: {})",
                            choice.name,
                            known.join(", ")
                        ),
                    ));
                }
                let in_range = choice.strength.abs() <= MAX_LORA_STRENGTH;
                if !in_range {
                    return Err(ApiError::field(
                        "lora",
                        format!("strength must be within ±{MAX_LORA_STRENGTH}"),
                    ));
                }
                Ok((choice.name.clone(), choice.strength))
            })
            .collect()
    }
}

/// Refuses an image `model` does not take, and a missing one it needs, before any is decoded.
fn check_image_fields(model: &ModelEntry, images: &InputImages) -> Result<(), ApiError> {
    for field in ImageField::ALL {
        let given = images.get(field).is_some();
        let reason = match (model.task.image_use(field), given) {
            (ImageUse::Required, false) => "needs",
            (ImageUse::Refused, true) => "takes no",
            _ => continue,
        };
        return Err(ApiError::field(
            field.name(),
            format!(
                "model `{}` ({}) {reason} {}",
                model.id,
                model.task.name(),
                field.name()
            ),
        ));
    }
    Ok(())
}

/// The image of `field`, decoded, if the request has one.
fn decode_image(
    field: ImageField,
    images: &InputImages,
    limits: &RequestLimits,
) -> Result<Option<InputImage>, ApiError> {
    images
        .get(field)
        .map(|bytes| {
            InputImage::decode(bytes, limits.max_image_side)
                .map_err(|e| ApiError::field(field.name(), e.to_string()))
        })
        .transpose()
}

/// Checks the frame size `request` comes to against the limits.
fn check_geometry(request: &T2vRequest, limits: &RequestLimits) -> Result<(), ApiError> {
    let geometry = request
        .geometry()
        .map_err(|e| ApiError::field("width", e.to_string()))?;
    if geometry.size.width().max(geometry.size.height()) > limits.max_side {
        return Err(ApiError::field(
            "resolution",
            format!(
                "{} exceeds this server's {} pixels a side",
                geometry.size, limits.max_side
            ),
        ));
    }
    Ok(())
}

fn check_text(field: &str, text: &str, limits: &RequestLimits) -> Result<(), ApiError> {
    let chars = text.chars().count();
    if chars > limits.max_prompt_chars {
        return Err(ApiError::field(
            field,
            format!("{chars} characters; at most {}", limits.max_prompt_chars),
        ));
    }
    Ok(())
}

fn checked_steps(asked: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match asked {
        None => Ok(default),
        Some(steps) if (1..=max).contains(&steps) => Ok(steps),
        Some(steps) => Err(ApiError::field(
            "steps",
            format!("{steps}: this sampler takes 1 to {max} steps"),
        )),
    }
}

fn checked_size(
    width: usize,
    height: usize,
    limits: &RequestLimits,
) -> Result<(usize, usize), ApiError> {
    for (field, side) in [("width", width), ("height", height)] {
        if side == 0 || side > limits.max_side {
            return Err(ApiError::field(
                field,
                format!("{side}: must be 16 to {} pixels", limits.max_side),
            ));
        }
    }
    FrameSize::new(width, height).map_err(|e| {
        let field = if width % 16 != 0 { "width" } else { "height" };
        ApiError::field(field, e.to_string())
    })?;
    Ok((width, height))
}

fn checked_frames(frames: usize, limits: &RequestLimits) -> Result<usize, ApiError> {
    if frames > limits.max_frames {
        return Err(ApiError::field(
            "num_frames",
            format!("{frames}: at most {} frames here", limits.max_frames),
        ));
    }
    FrameCount::new(frames)
        .map(FrameCount::get)
        .map_err(|e| ApiError::field("num_frames", e.to_string()))
}

#[cfg(test)]
mod tests {
    use turbodiffusion::pipeline::ModelKind;

    use super::*;

    fn catalog() -> ModelCatalog {
        ModelCatalog::demo(candle_core::Device::Cpu)
    }

    fn field_of(body: &str) -> String {
        let limits = RequestLimits::default();
        let error = VideoRequest::parse(body.as_bytes())
            .and_then(|mut request| {
                let images = request.take_images(&limits)?;
                request.validate(&catalog(), &limits, &images)
            })
            .expect_err(body);
        match error {
            ApiError::InvalidField { field, .. } => field,
            other => panic!("{body}: {other}"),
        }
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (r#"{"prompt": "a", "num_frames": 6}"#, "num_frames"),
            (r#"{"prompt": "a", "num_frames": 1001}"#, "num_frames"),
            (r#"{"prompt": "a", "width": 100, "height": 64}"#, "width"),
            (r#"{"prompt": "a", "width": 4000, "height": 64}"#, "width"),
            (r#"{"prompt": "a", "width": 64}"#, "height"),
            (r#"{"prompt": "a", "model": "nope"}"#, "model"),
            (
                r#"{"prompt": "a", "task": "ti2v", "model": "demo"}"#,
                "task",
            ),
            (
                r#"{"prompt": "a", "task": "flf2v", "image": "aGVsbG8="}"#,
                "end_image",
            ),
            (r#"{"prompt": "a", "end_image": "aGVsbG8="}"#, "image"),
            (
                r#"{"prompt": "a", "model": "demo", "end_image": "aGVsbG8="}"#,
                "end_image",
            ),
            (
                r#"{"prompt": "a", "model": "demo-ti2v", "end_image": "aGVsbG8="}"#,
                "end_image",
            ),
            (
                r#"{"prompt": "a", "model": "demo-i2v", "end_image": "aGVsbG8="}"#,
                "image",
            ),
            (
                r#"{"prompt": "a", "model": "demo-ti2v", "sampler": "rcm"}"#,
                "sampler",
            ),
            (
                r#"{"prompt": "a", "task": "t2v", "end_image": "%%%"}"#,
                "end_image",
            ),
            (r#"{"prompt": "a", "task": "i2v"}"#, "image"),
            (r#"{"prompt": "a", "image": "%%%"}"#, "image"),
            (r#"{"prompt": "a", "image": "aGVsbG8="}"#, "image"),
            (r#"{"prompt": "a", "attention": "fast"}"#, "attention"),
            (r#"{"prompt": "a", "attention": "sla:1.5"}"#, "attention"),
            (r#"{"prompt": "a", "steps": 9}"#, "steps"),
            (r#"{"prompt": "a", "sampler": "magic"}"#, "sampler"),
            (
                r#"{"prompt": "a", "negative_prompt": "ugly"}"#,
                "negative_prompt",
            ),
            (r#"{"prompt": "a", "lora": [{"name": "x"}]}"#, "lora"),
            (r#"{"prompt": "a", "aspect_ratio": "2:1"}"#, "aspect_ratio"),
            (r#"{"prompt": "a", "resolution": "1080p"}"#, "resolution"),
            (r#"{"prompt": "  "}"#, "prompt"),
            (r#"{"prompt": 3}"#, "prompt"),
            (r#"{"prompt": "a", "seed": -1}"#, "seed"),
            (r#"{"prompt": "a", "colour": "red"}"#, "colour"),
            (r#"not json"#, "body"),
        ];
        for (body, field) in cases {
            assert_eq!(field_of(body), field, "{body}");
        }
        let long = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(2001));
        assert_eq!(field_of(&long), "prompt");
    }

    /// The pipeline and the text-to-video request a body without images validates to.
    fn text_to_video(body: &[u8]) -> (PipelineKey, T2vRequest) {
        let limits = RequestLimits::default();
        let generation = VideoRequest::parse(body)
            .and_then(|request| request.validate(&catalog(), &limits, &InputImages::default()))
            .unwrap();
        match generation.work {
            Work::TextToVideo(video) => (generation.key, video),
            Work::ImageToVideo(_) => panic!("text to video expected"),
        }
    }

    #[test]
    fn a_minimal_request_gets_the_demo_defaults() {
        let (key, video) = text_to_video(br#"{"prompt": "a fox", "seed": 3}"#);
        assert_eq!(key.model, "demo");
        assert_eq!(key.attention, "sagesla");
        assert_eq!(
            (video.size, video.frames, video.seed),
            (Some((128, 128)), 17, 3)
        );
        assert_eq!(video.sla_topk, Some(0.1));
    }

    #[test]
    fn a_text_only_ti2v_request_runs_the_models_teacher() {
        let (key, video) = text_to_video(br#"{"prompt": "a fox", "task": "ti2v", "steps": 3}"#);
        assert_eq!(key.model, "demo-ti2v");
        let published = T2vRequest::for_model(ModelKind::Wan22Ti2v5B, "a fox");
        assert_eq!(video.fps, published.fps);
        let SamplerChoice::Teacher {
            steps, guidance, ..
        } = video.sampler
        else {
            panic!("the teacher expected: {:?}", video.sampler);
        };
        let SamplerChoice::Teacher {
            guidance: published_guidance,
            ..
        } = published.sampler
        else {
            panic!("TI2V-5B publishes a teacher");
        };
        assert_eq!((steps, guidance), (3, published_guidance));
    }

    #[test]
    fn a_data_url_image_is_taken_out_of_the_request() {
        let mut request = VideoRequest {
            image: Some("data:image/png;base64,aGVsbG8=".into()),
            end_image: Some("aGk=".into()),
            ..VideoRequest::default()
        };
        let images = request.take_images(&RequestLimits::default()).unwrap();
        assert_eq!(images.image.as_deref(), Some(&b"hello"[..]));
        assert_eq!(images.end_image.as_deref(), Some(&b"hi"[..]));
        assert!(request.image.is_none() && request.end_image.is_none());
        let limits = RequestLimits {
            max_image_bytes: 2,
            ..RequestLimits::default()
        };
        let mut request = VideoRequest {
            end_image: Some("aGVsbG8=".into()),
            ..VideoRequest::default()
        };
        let error = request.take_images(&limits).unwrap_err();
        assert!(matches!(error, ApiError::InvalidField { field, .. } if field == "end_image"));
    }
}
