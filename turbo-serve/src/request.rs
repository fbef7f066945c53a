//! The body of `POST /v1/videos` and its validation into what the pipeline runs. Every refusal
//! names the field at fault.

use base64::Engine;
use serde::{Deserialize, Serialize};
use turbodiffusion::core::{AspectRatio, FrameCount, FrameSize, Resolution};
use turbodiffusion::pipeline::{I2vRequest, SamplerChoice};
use turbodiffusion::video::InputImage;
use turbodiffusion::{AttentionKind, T2vRequest};

use crate::error::ApiError;
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
    /// `rcm` (default), `teacher` or `distill-4step`.
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

    /// Takes the image out of the request, decoded from base64 (the request is then stored
    /// without it, and the bytes beside it).
    pub fn take_image(&mut self, limits: &RequestLimits) -> Result<Option<Vec<u8>>, ApiError> {
        let Some(text) = self.image.take() else {
            return Ok(None);
        };
        let base64 = match text.split_once(";base64,") {
            Some((prefix, data)) if prefix.starts_with("data:") => data,
            _ => &text,
        };
        // Base64 takes four characters per three bytes: refuse before decoding.
        if base64.len() / 4 * 3 > limits.max_image_bytes + 3 {
            return Err(image_too_large(limits));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(base64.trim())
            .map_err(|e| ApiError::field("image", format!("not valid base64: {e}")))?;
        if bytes.len() > limits.max_image_bytes {
            return Err(image_too_large(limits));
        }
        Ok(Some(bytes))
    }

    /// Fills in the seed, so that the recorded request repeats the video.
    pub fn with_seed(mut self) -> Self {
        self.seed = Some(self.seed.unwrap_or_else(rand::random));
        self
    }

    /// Checks every field against the models and the limits; `image` is the uploaded image.
    pub fn validate(
        &self,
        catalog: &ModelCatalog,
        limits: &RequestLimits,
        image: Option<&[u8]>,
    ) -> Result<Generation, ApiError> {
        check_text("prompt", &self.prompt, limits)?;
        if self.prompt.trim().is_empty() {
            return Err(ApiError::field("prompt", "must not be empty"));
        }
        let model = self.model(catalog, image.is_some())?;
        let attention = self.attention()?;
        let key = PipelineKey {
            model: model.id.clone(),
            attention: attention.name(),
            quant: self.quant.unwrap_or(false),
            loras: self.loras(catalog)?,
        };
        let video = T2vRequest {
            sla_topk: attention.topk(),
            sampler: self.sampler()?,
            seed: self.seed.unwrap_or(0),
            ..self.geometry(model, limits)?
        };
        let work = match (model.task, image) {
            (Task::I2v, Some(bytes)) => {
                let image = InputImage::decode(bytes, limits.max_image_side)
                    .map_err(|e| ApiError::field("image", e.to_string()))?;
                Work::ImageToVideo(Box::new(I2vRequest {
                    video,
                    ..I2vRequest::new(image, self.prompt.clone())
                }))
            }
            (Task::I2v, None) => {
                return Err(ApiError::field("image", "image to video needs an image"))
            }
            (_, Some(_)) => {
                return Err(ApiError::field(
                    "image",
                    format!("model `{}` makes video from text only", model.id),
                ))
            }
            (_, None) => Work::TextToVideo(video),
        };
        Ok(Generation { key, work })
    }

    /// The model named, or the first for the task.
    fn model<'c>(
        &self,
        catalog: &'c ModelCatalog,
        has_image: bool,
    ) -> Result<&'c ModelEntry, ApiError> {
        let task = self
            .task
            .unwrap_or(if has_image { Task::I2v } else { Task::T2v });
        if task == Task::Ti2v {
            return Err(ApiError::field(
                "task",
                "ti2v (the Wan2.2 TI2V-5B model) is not supported; use t2v or i2v",
            ));
        }
        let model = match &self.model {
            Some(id) => catalog.find(id).ok_or_else(|| {
                let known: Vec<_> = catalog.entries().iter().map(|e| e.id.as_str()).collect();
                ApiError::field(
                    "model",
                    format!("unknown model `{id}` (known: {})", known.join(", ")),
                )
            })?,
            None => catalog
                .default_for(task)
                .ok_or_else(|| ApiError::field("task", format!("no model here does {task:?}")))?,
        };
        if self.task.is_some_and(|task| task != model.task) {
            return Err(ApiError::field(
                "task",
                format!("model `{}` does {:?}, not {task:?}", model.id, model.task),
            ));
        }
        Ok(model)
    }

    fn attention(&self) -> Result<AttentionKind, ApiError> {
        let text = self.attention.as_deref().unwrap_or("sagesla:0.1");
        text.parse()
            .map_err(|e: turbodiffusion::Error| ApiError::field("attention", e.to_string()))
    }

    fn sampler(&self) -> Result<SamplerChoice, ApiError> {
        let preset = self.sampler.as_deref().unwrap_or("rcm");
        let mut sampler =
            SamplerChoice::preset(preset).map_err(|e| ApiError::field("sampler", e.to_string()))?;
        match &mut sampler {
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

    /// The size and length, checked against the limits, with the model's defaults.
    fn geometry(&self, model: &ModelEntry, limits: &RequestLimits) -> Result<T2vRequest, ApiError> {
        if let Some(negative) = &self.negative_prompt {
            check_text("negative_prompt", negative, limits)?;
        }
        let defaults = model.defaults;
        let resolution = match &self.resolution {
            Some(text) => text
                .parse::<Resolution>()
                .map_err(|e| ApiError::field("resolution", e.to_string()))?,
            None => defaults.resolution,
        };
        let aspect_ratio = match &self.aspect_ratio {
            Some(text) => text
                .parse::<AspectRatio>()
                .map_err(|e| ApiError::field("aspect_ratio", e.to_string()))?,
            None => AspectRatio::default(),
        };
        let size = match (self.width, self.height) {
            (Some(width), Some(height)) => Some(checked_size(width, height, limits)?),
            (None, None) if self.resolution.is_some() || self.aspect_ratio.is_some() => None,
            (None, None) => defaults.size,
            (Some(_), None) => return Err(ApiError::field("height", "give it with width")),
            (None, Some(_)) => return Err(ApiError::field("width", "give it with height")),
        };
        let frames = checked_frames(self.num_frames.unwrap_or(defaults.num_frames), limits)?;
        let request = T2vRequest {
            frames,
            resolution,
            aspect_ratio,
            size,
            ..T2vRequest::new(self.prompt.clone())
        };
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
        Ok(request)
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

fn image_too_large(limits: &RequestLimits) -> ApiError {
    ApiError::field(
        "image",
        format!("larger than {} bytes", limits.max_image_bytes),
    )
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
    use super::*;

    fn catalog() -> ModelCatalog {
        ModelCatalog::demo(candle_core::Device::Cpu)
    }

    fn field_of(body: &str) -> String {
        let limits = RequestLimits::default();
        let error = VideoRequest::parse(body.as_bytes())
            .and_then(|mut request| {
                let image = request.take_image(&limits)?;
                request.validate(&catalog(), &limits, image.as_deref())
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
            (r#"{"prompt": "a", "task": "ti2v"}"#, "task"),
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

    #[test]
    fn a_minimal_request_gets_the_demo_defaults() {
        let request = VideoRequest::parse(br#"{"prompt": "a fox", "seed": 3}"#).unwrap();
        let generation = request
            .validate(&catalog(), &RequestLimits::default(), None)
            .unwrap();
        assert_eq!(generation.key.model, "demo");
        assert_eq!(generation.key.attention, "sagesla");
        let Work::TextToVideo(video) = generation.work else {
            panic!("text to video expected");
        };
        assert_eq!(
            (video.size, video.frames, video.seed),
            (Some((128, 128)), 17, 3)
        );
        assert_eq!(video.sla_topk, Some(0.1));
    }

    #[test]
    fn a_data_url_image_is_taken_out_of_the_request() {
        let mut request = VideoRequest {
            image: Some("data:image/png;base64,aGVsbG8=".into()),
            ..VideoRequest::default()
        };
        let bytes = request.take_image(&RequestLimits::default()).unwrap();
        assert_eq!(bytes.as_deref(), Some(&b"hello"[..]));
        assert!(request.image.is_none());
        let limits = RequestLimits {
            max_image_bytes: 2,
            ..RequestLimits::default()
        };
        let mut request = VideoRequest {
            image: Some("aGVsbG8=".into()),
            ..VideoRequest::default()
        };
        assert!(request.take_image(&limits).is_err());
    }
}
