//! The models the server offers and the pipelines built for them.
//!
//! A built [`Pipeline`] holds the checked file set and the tokenizer, and by default keeps its
//! DiT (both experts of A14B), VAE and CLIP image encoder on the device from its first job on
//! ([`Residency::ALL_BUT_TEXT_ENCODER`]; the text encoder too with `--resident-text-encoder`), so a job
//! of a kept pipeline reads none of those weights. The [`ModelCache`] keeps the pipelines of
//! recent settings (model, attention backend, W8A8; LoRAs are switched in a kept pipeline's
//! resident DiT, not built apart) and evicts the least recently used one when the memory
//! estimate of the next one, which counts the resident models, says it would not fit beside
//! them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use serde::{Deserialize, Serialize};
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::Resolution;
use turbodiffusion::models::lora::{LoraAdapter, ScaledLora};
use turbodiffusion::pipeline::{DitLoras, ModelFiles, ModelKind, Residency, SamplerChoice};
use turbodiffusion::{AttentionKind, Pipeline, T2vRequest};

use crate::images::{ImageField, ImageUse};

/// What a model generates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Text to video.
    T2v,
    /// Image (and text) to video.
    I2v,
    /// Text, or text and an image, to video with one model (Wan2.2 TI2V-5B).
    Ti2v,
    /// A first and a last frame (and text) to video (Wan2.1 FLF2V-14B).
    Flf2v,
}

impl Task {
    /// The task `kind` does.
    pub fn of(kind: ModelKind) -> Self {
        match kind {
            ModelKind::Wan21T2V1_3B | ModelKind::Wan21T2V14B | ModelKind::Wan22T2VA14B => Self::T2v,
            ModelKind::Wan22I2VA14B | ModelKind::Wan21I2V14B480P | ModelKind::Wan21I2V14B720P => {
                Self::I2v
            }
            ModelKind::Wan22Ti2v5B => Self::Ti2v,
            ModelKind::Wan21Flf2v14B => Self::Flf2v,
        }
    }

    /// The task a request without `task` or `model` asks for, by the images it carries.
    pub fn implied(has_image: bool, has_end_image: bool) -> Self {
        match (has_image, has_end_image) {
            (_, true) => Self::Flf2v,
            (true, false) => Self::I2v,
            (false, false) => Self::T2v,
        }
    }

    /// Whether this task takes `field`.
    pub fn image_use(self, field: ImageField) -> ImageUse {
        match (self, field) {
            (Self::I2v | Self::Flf2v, ImageField::Image) => ImageUse::Required,
            (Self::Flf2v, ImageField::EndImage) => ImageUse::Required,
            (Self::Ti2v, ImageField::Image) => ImageUse::Optional,
            _ => ImageUse::Refused,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::T2v => "t2v",
            Self::I2v => "i2v",
            Self::Ti2v => "ti2v",
            Self::Flf2v => "flf2v",
        }
    }
}

/// Where a model's weights come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelSource {
    /// The library's tiny random-weight demo of the model's structure ([`Pipeline::demo_of`]).
    Demo,
    /// The released files, read from the checkpoint folder.
    Checkpoint,
}

/// The frame size and length of the demo models' requests.
const DEMO_SIZE: (usize, usize) = (128, 128);
const DEMO_FRAMES: usize = 17;

/// The settings a request gets for what it leaves out: the model's published defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModelDefaults {
    /// An explicit frame size; `None`: the resolution table with the aspect ratio.
    pub size: Option<(usize, usize)>,
    #[serde(serialize_with = "serialize_display")]
    pub resolution: Resolution,
    pub num_frames: usize,
    pub fps: f64,
    /// `rcm` (the distilled students) or `teacher`.
    pub sampler: &'static str,
    pub steps: usize,
    /// The teacher's guidance scale and shift.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shift: Option<f64>,
    /// The teacher's guidance while the high-noise expert runs, then the low-noise one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_guidance: Option<[f64; 2]>,
}

impl ModelDefaults {
    fn of(request: &T2vRequest) -> Self {
        let (sampler, steps, guidance, shift) = match request.sampler {
            SamplerChoice::Rcm { steps, .. } => ("rcm", steps, None, None),
            SamplerChoice::Teacher {
                steps,
                guidance,
                shift,
                ..
            } => ("teacher", steps, Some(guidance), Some(shift)),
        };
        Self {
            size: request.size,
            resolution: request.resolution,
            num_frames: request.frames,
            fps: request.fps,
            sampler,
            steps,
            guidance,
            shift,
            expert_guidance: request.expert_guidance,
        }
    }
}

fn serialize_display<S: serde::Serializer>(
    value: &impl std::fmt::Display,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// Which image fields a model takes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModelInputs {
    pub image: ImageUse,
    pub end_image: ImageUse,
}

/// A model `GET /v1/models` lists and requests name.
#[derive(Debug, Clone, Serialize)]
pub struct ModelEntry {
    pub id: String,
    pub task: Task,
    pub description: String,
    pub inputs: ModelInputs,
    pub defaults: ModelDefaults,
    #[serde(skip)]
    pub kind: ModelKind,
    #[serde(skip)]
    pub source: ModelSource,
}

impl ModelEntry {
    fn new(id: String, kind: ModelKind, source: ModelSource, description: String) -> Self {
        let task = Task::of(kind);
        Self {
            id,
            task,
            description,
            inputs: ModelInputs {
                image: task.image_use(ImageField::Image),
                end_image: task.image_use(ImageField::EndImage),
            },
            defaults: ModelDefaults::of(&published_request(kind, source, String::new())),
            kind,
            source,
        }
    }

    /// The model's settings for `prompt`, before the request's own.
    pub fn base_request(&self, prompt: String) -> T2vRequest {
        published_request(self.kind, self.source, prompt)
    }
}

/// The published settings of `kind` for `prompt` ([`T2vRequest::for_model`]); the demos keep
/// them but make a small video.
fn published_request(kind: ModelKind, source: ModelSource, prompt: String) -> T2vRequest {
    let published = T2vRequest::for_model(kind, prompt);
    match source {
        ModelSource::Checkpoint => published,
        ModelSource::Demo => T2vRequest {
            size: Some(DEMO_SIZE),
            frames: DEMO_FRAMES,
            ..published
        },
    }
}

/// The id requests use for a released model: its short name in lower case
/// (`wan2.1-t2v-1.3b`, `wan2.2-ti2v-5b`, …).
pub fn release_id(kind: ModelKind) -> String {
    kind.short_name().to_ascii_lowercase()
}

/// The demo models: one per task family, by id.
const DEMOS: [(&str, ModelKind); 4] = [
    ("demo", ModelKind::Wan21T2V1_3B),
    ("demo-i2v", ModelKind::Wan22I2VA14B),
    ("demo-ti2v", ModelKind::Wan22Ti2v5B),
    ("demo-flf2v", ModelKind::Wan21Flf2v14B),
];

/// Why the models could not be set up at start.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("--model {id}: unknown model (known: {known})")]
    UnknownModel { id: String, known: String },
    #[error("--model {id}: {reason}")]
    MissingFiles { id: String, reason: String },
    #[error("{}: no released model's files are in this folder", .0.display())]
    EmptyCheckpointDir(PathBuf),
    #[error(
        "{}: its files fit several models ({}); choose with --model",
        dir.display(),
        ids.join(", ")
    )]
    AmbiguousCheckpointDir { dir: PathBuf, ids: Vec<String> },
    #[error("--lora-dir {}: {source}", path.display())]
    LoraDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Everything that selects one pipeline. The top-k, steps and size are per request and need no
/// pipeline of their own; the LoRAs are set on a clone of the kept pipeline of the rest.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineKey {
    pub model: String,
    /// `original`, `sla` or `sagesla`.
    pub attention: &'static str,
    pub quant: bool,
    /// LoRA adapters by name, with their strengths.
    pub loras: Vec<(String, f64)>,
}

/// The models on offer, the LoRA adapters of `--lora-dir`, and the device they run on.
pub struct ModelCatalog {
    entries: Vec<ModelEntry>,
    checkpoint_dir: Option<PathBuf>,
    loras: BTreeMap<String, PathBuf>,
    /// The adapters of `loras` read so far, each once: a kept DiT recognises an adapter it
    /// has merged by its allocation, so a job with the same LoRAs merges nothing again.
    opened_loras: Mutex<BTreeMap<String, Arc<LoraAdapter>>>,
    device: Device,
    /// The models pipelines keep on the device between jobs.
    residency: Residency,
}

impl ModelCatalog {
    /// The built-in demo models, one per task family: `demo` (text to video), `demo-i2v`,
    /// `demo-ti2v` and `demo-flf2v`.
    pub fn demo(device: Device) -> Self {
        let entries = DEMOS
            .into_iter()
            .map(|(id, kind)| {
                let description = format!(
                    "tiny random-weight {} demo ({} structure)",
                    Task::of(kind).name(),
                    kind.short_name()
                );
                ModelEntry::new(id.to_owned(), kind, ModelSource::Demo, description)
            })
            .collect();
        Self {
            entries,
            checkpoint_dir: None,
            loras: BTreeMap::new(),
            opened_loras: Mutex::default(),
            residency: Residency::ALL_BUT_TEXT_ENCODER,
            device,
        }
    }

    /// The released models whose files are in `dir`: those of `only` (ids as
    /// [`release_id`] gives them), or every one found when `only` is empty. Official Wan
    /// folders name their DiT alike whatever the model, so files that fit several models
    /// offer none of them unless `only` chooses.
    pub fn from_checkpoint_dir(
        dir: &Path,
        only: &[String],
        device: Device,
    ) -> Result<Self, CatalogError> {
        let wanted = wanted_kinds(only)?;
        let mut found = Vec::new();
        for kind in wanted {
            match ModelFiles::find(dir, kind, false) {
                Ok(files) => found.push((kind, files.dit)),
                Err(e) if !only.is_empty() => {
                    return Err(CatalogError::MissingFiles {
                        id: release_id(kind),
                        reason: e.to_string(),
                    })
                }
                Err(_) => {}
            }
        }
        let entries = unambiguous_entries(dir, &found)?;
        Ok(Self {
            entries,
            checkpoint_dir: Some(dir.to_owned()),
            loras: BTreeMap::new(),
            opened_loras: Mutex::default(),
            residency: Residency::ALL_BUT_TEXT_ENCODER,
            device,
        })
    }

    /// Offers the `.safetensors` files of `dir` as LoRA adapters, by file stem. Requests name
    /// adapters; they never give paths.
    pub fn with_lora_dir(mut self, dir: &Path) -> Result<Self, CatalogError> {
        let io_error = |source| CatalogError::LoraDir {
            path: dir.to_owned(),
            source,
        };
        for entry in std::fs::read_dir(dir).map_err(io_error)? {
            let path = entry.map_err(io_error)?.path();
            let is_adapter = path.extension().is_some_and(|e| e == "safetensors");
            if let (true, Some(stem)) = (is_adapter, path.file_stem().and_then(|s| s.to_str())) {
                self.loras.insert(stem.to_owned(), path.clone());
            }
        }
        Ok(self)
    }

    pub fn entries(&self) -> &[ModelEntry] {
        &self.entries
    }

    pub fn find(&self, id: &str) -> Option<&ModelEntry> {
        self.entries.iter().find(|entry| entry.id == id)
    }

    /// The first model that does `task`.
    pub fn default_for(&self, task: Task) -> Option<&ModelEntry> {
        self.entries.iter().find(|entry| entry.task == task)
    }

    /// The models pipelines built from now on keep on the device from their first job on
    /// (`Pipeline::with_residency`; default [`Residency::ALL_BUT_TEXT_ENCODER`]): a job then reads none
    /// of their weights, and the pipeline's memory estimate, which the cache's eviction reads,
    /// counts them. [`Residency::NONE`] loads every model per job and drops it after.
    pub fn with_residency(mut self, residency: Residency) -> Self {
        self.residency = residency;
        self
    }

    pub fn residency(&self) -> Residency {
        self.residency
    }

    /// The names of the LoRA adapters on offer.
    pub fn lora_names(&self) -> impl Iterator<Item = &str> {
        self.loras.keys().map(String::as_str)
    }

    /// Builds the pipeline `key` selects (the model must be in the catalog), its LoRAs
    /// included.
    pub fn build(&self, key: &PipelineKey) -> turbodiffusion::Result<Pipeline> {
        let unknown = || turbodiffusion::Error::InvalidConfig {
            field: "model".into(),
            reason: format!("`{}` is not offered", key.model),
        };
        let entry = self.find(&key.model).ok_or_else(unknown)?;
        let kind: AttentionKind = key.attention.parse()?;
        let loras = self.loras(&key.loras)?;
        match (entry.source, &self.checkpoint_dir) {
            (ModelSource::Demo, _) => {
                let attention = AttentionConfig::new(kind);
                Pipeline::demo_of(entry.kind, 0, attention, self.device.clone())?
                    .with_quant_linear(key.quant)
                    .with_residency(self.residency)
                    .with_loras(loras)
            }
            (ModelSource::Checkpoint, Some(dir)) => Pipeline::builder(entry.kind)
                .checkpoint_dir(dir)
                .attention(kind)
                .quant_linear(key.quant)
                .residency(self.residency)
                .device(self.device.clone())
                .loras(loras)
                .build(),
            (ModelSource::Checkpoint, None) => Err(unknown()),
        }
    }

    /// The adapters `chosen` names, at their strengths.
    pub fn loras(&self, chosen: &[(String, f64)]) -> turbodiffusion::Result<DitLoras> {
        let all = chosen
            .iter()
            .map(|(name, strength)| {
                Ok(ScaledLora {
                    adapter: self.opened_lora(name)?,
                    strength: *strength,
                })
            })
            .collect::<turbodiffusion::Result<_>>()?;
        Ok(DitLoras {
            all,
            ..DitLoras::default()
        })
    }

    /// The adapter `name`, read from its file the first time.
    fn opened_lora(&self, name: &str) -> turbodiffusion::Result<Arc<LoraAdapter>> {
        let path = self
            .loras
            .get(name)
            .ok_or_else(|| turbodiffusion::Error::InvalidConfig {
                field: "lora".into(),
                reason: format!("no adapter named `{name}`"),
            })?;
        let mut opened = self.opened_loras.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(adapter) = opened.get(name) {
            return Ok(Arc::clone(adapter));
        }
        let adapter = Arc::new(LoraAdapter::open(path)?);
        opened.insert(name.to_owned(), Arc::clone(&adapter));
        Ok(adapter)
    }
}

/// The kinds `only` names (every kind when empty).
fn wanted_kinds(only: &[String]) -> Result<Vec<ModelKind>, CatalogError> {
    if only.is_empty() {
        return Ok(ModelKind::ALL.to_vec());
    }
    only.iter()
        .map(|id| {
            ModelKind::ALL
                .into_iter()
                .find(|&kind| release_id(kind) == *id)
                .ok_or_else(|| CatalogError::UnknownModel {
                    id: id.clone(),
                    known: ModelKind::ALL.map(release_id).join(", "),
                })
        })
        .collect()
}

/// The entries of the models `found` (with their DiT files), leaving out those whose DiT
/// file another model found too.
fn unambiguous_entries(
    dir: &Path,
    found: &[(ModelKind, PathBuf)],
) -> Result<Vec<ModelEntry>, CatalogError> {
    let shared = |dit: &PathBuf| found.iter().filter(|(_, other)| other == dit).count() > 1;
    let (ambiguous, clear): (Vec<_>, Vec<_>) = found.iter().partition(|(_, dit)| shared(dit));
    let entries: Vec<_> = clear
        .into_iter()
        .map(|&(kind, _)| checkpoint_entry(kind))
        .collect();
    let ambiguous_ids: Vec<_> = ambiguous
        .iter()
        .map(|(kind, _)| release_id(*kind))
        .collect();
    if entries.is_empty() {
        return Err(match ambiguous_ids.is_empty() {
            true => CatalogError::EmptyCheckpointDir(dir.to_owned()),
            false => CatalogError::AmbiguousCheckpointDir {
                dir: dir.to_owned(),
                ids: ambiguous_ids,
            },
        });
    }
    if !ambiguous_ids.is_empty() {
        tracing::warn!(
            "{}: not offering {} (their files fit several models; choose with --model)",
            dir.display(),
            ambiguous_ids.join(", ")
        );
    }
    Ok(entries)
}

fn checkpoint_entry(kind: ModelKind) -> ModelEntry {
    let students = if kind.has_rcm_students() {
        "TurboDiffusion rCM students"
    } else {
        "Wan teacher"
    };
    ModelEntry::new(
        release_id(kind),
        kind,
        ModelSource::Checkpoint,
        format!("{} ({students})", kind.short_name()),
    )
}

/// Recently used values with their memory cost, least recently used first.
#[derive(Debug)]
pub struct ModelCache<K, V> {
    entries: Vec<(K, V, u64)>,
    max_entries: usize,
    /// Bytes the cached values may add up to, the next one included; `None`: no limit.
    memory_budget: Option<u64>,
}

impl<K: PartialEq, V: Clone> ModelCache<K, V> {
    pub fn new(max_entries: usize, memory_budget: Option<u64>) -> Self {
        Self {
            entries: Vec::new(),
            max_entries: max_entries.max(1),
            memory_budget,
        }
    }

    /// The value of `key`, now the most recently used.
    pub fn get(&mut self, key: &K) -> Option<V> {
        let position = self.entries.iter().position(|(k, ..)| k == key)?;
        let entry = self.entries.remove(position);
        let value = entry.1.clone();
        self.entries.push(entry);
        Some(value)
    }

    /// Evicts least recently used values until one costing `bytes` fits, then adds it (even
    /// alone over the budget: the run itself checks its memory); returns the evicted keys.
    pub fn insert(&mut self, key: K, value: V, bytes: u64) -> Vec<K> {
        self.entries.retain(|(k, ..)| *k != key);
        let mut evicted = Vec::new();
        while !self.entries.is_empty() && !self.fits(bytes) {
            evicted.push(self.entries.remove(0).0);
        }
        self.entries.push((key, value, bytes));
        evicted
    }

    fn fits(&self, bytes: u64) -> bool {
        let held: u64 = self.entries.iter().map(|(.., cost)| cost).sum();
        let within_budget = self
            .memory_budget
            .is_none_or(|budget| held.saturating_add(bytes) <= budget);
        self.entries.len() < self.max_entries && within_budget
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|(k, ..)| k)
    }
}

/// The catalog and the cache of built pipelines, shared by the worker and the handlers.
pub struct Models {
    pub catalog: ModelCatalog,
    cache: Mutex<ModelCache<PipelineKey, Arc<Pipeline>>>,
}

impl Models {
    pub fn new(catalog: ModelCatalog, max_resident: usize, memory_budget: Option<u64>) -> Self {
        Self {
            catalog,
            cache: Mutex::new(ModelCache::new(max_resident, memory_budget)),
        }
    }

    /// The pipeline of `key`: the kept pipeline of its model, attention and W8A8, or a clone
    /// of it (sharing its resident models) with `key`'s LoRAs set, which the resident DiT
    /// switches to without reading its base weights again. A pipeline not kept yet is built
    /// and kept at the cost `weight_bytes` says, evicting others when it would not fit.
    pub fn pipeline(
        &self,
        key: &PipelineKey,
        weight_bytes: impl FnOnce(&Pipeline) -> turbodiffusion::Result<u64>,
    ) -> turbodiffusion::Result<Arc<Pipeline>> {
        let base_key = PipelineKey {
            loras: Vec::new(),
            ..key.clone()
        };
        let base = self.kept_pipeline(&base_key, weight_bytes)?;
        if key.loras.is_empty() {
            return Ok(base);
        }
        let loras = self.catalog.loras(&key.loras)?;
        Ok(Arc::new(base.as_ref().clone().with_loras(loras)?))
    }

    /// The kept pipeline of `key`, built and kept if there is none.
    fn kept_pipeline(
        &self,
        key: &PipelineKey,
        weight_bytes: impl FnOnce(&Pipeline) -> turbodiffusion::Result<u64>,
    ) -> turbodiffusion::Result<Arc<Pipeline>> {
        if let Some(pipeline) = self.lock().get(key) {
            return Ok(pipeline);
        }
        let pipeline = Arc::new(self.catalog.build(key)?);
        let bytes = weight_bytes(&pipeline)?;
        for evicted in self.lock().insert(key.clone(), pipeline.clone(), bytes) {
            tracing::info!(model = %evicted.model, "evicted a resident pipeline");
        }
        Ok(pipeline)
    }

    /// The models with a resident pipeline.
    pub fn resident_models(&self) -> Vec<String> {
        self.lock().keys().map(|key| key.model.clone()).collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ModelCache<PipelineKey, Arc<Pipeline>>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_recently_used_value_is_evicted_when_the_next_does_not_fit() {
        let mut cache = ModelCache::new(3, Some(100));
        assert!(cache.insert("a", 1, 40).is_empty());
        assert!(cache.insert("b", 2, 40).is_empty());
        assert_eq!(cache.get(&"a"), Some(1)); // b is now the least recently used
        assert_eq!(cache.insert("c", 3, 40), vec!["b"]);
        assert_eq!(cache.keys().copied().collect::<Vec<_>>(), ["a", "c"]);
        // Larger than the whole budget: everything else goes, the value stays.
        assert_eq!(cache.insert("d", 4, 500), vec!["a", "c"]);
        assert_eq!(cache.get(&"d"), Some(4));
    }

    /// A built pipeline's estimate (what eviction reads) counts the models it keeps resident:
    /// the DiT and the VAE by default, the text encoder too when asked.
    #[test]
    fn the_resident_models_are_in_the_pipelines_estimate() {
        let key = PipelineKey {
            model: "demo".into(),
            attention: "original",
            quant: false,
            loras: Vec::new(),
        };
        let request = turbodiffusion::pipeline::demo_request("a heron");
        let denoise_weights = |residency: Residency| {
            let catalog = ModelCatalog::demo(Device::Cpu).with_residency(residency);
            let estimate = catalog
                .build(&key)
                .unwrap()
                .estimate_memory(&request)
                .unwrap();
            let denoise = turbodiffusion::core::Stage::Denoising { steps: 4 };
            estimate.stage(&denoise).unwrap().weights
        };
        let default = ModelCatalog::demo(Device::Cpu).residency();
        assert_eq!(default, Residency::ALL_BUT_TEXT_ENCODER);
        let with_text_encoder = Residency {
            text_encoder: true,
            ..default
        };
        assert!(denoise_weights(with_text_encoder) > denoise_weights(default));
        assert!(denoise_weights(default) > denoise_weights(Residency::NONE));
    }

    #[test]
    fn the_entry_count_is_bounded_without_a_budget() {
        let mut cache = ModelCache::new(2, None);
        cache.insert(1, (), 0);
        cache.insert(2, (), 0);
        assert_eq!(cache.insert(3, (), 0), vec![1]);
        assert_eq!(
            cache.insert(3, (), 0),
            Vec::<i32>::new(),
            "a key is held once"
        );
    }

    #[test]
    fn the_models_of_a_checkpoint_folder_are_those_whose_files_are_there() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "TurboWan2.1-T2V-1.3B-480P.pth",
            "models_t5_umt5-xxl-enc-bf16.pth",
            "Wan2.1_VAE.pth",
            "tokenizer.json",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let catalog = ModelCatalog::from_checkpoint_dir(dir.path(), &[], Device::Cpu).unwrap();
        let ids: Vec<_> = catalog.entries().iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["wan2.1-t2v-1.3b"]);
        assert_eq!(
            catalog.default_for(Task::T2v).unwrap().defaults.num_frames,
            81
        );
        let missing =
            ModelCatalog::from_checkpoint_dir(dir.path(), &["wan2.1-t2v-14b".into()], Device::Cpu);
        assert!(matches!(missing, Err(CatalogError::MissingFiles { .. })));
    }

    fn folder_of(names: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in names {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        dir
    }

    const OFFICIAL_DIT: &str = "diffusion_pytorch_model.safetensors";
    const TEXT_FILES: [&str; 2] = ["models_t5_umt5-xxl-enc-bf16.pth", "tokenizer.json"];

    #[test]
    fn an_official_ti2v_folder_offers_ti2v_with_its_published_defaults() {
        let dir = folder_of(&[OFFICIAL_DIT, TEXT_FILES[0], TEXT_FILES[1], "Wan2.2_VAE.pth"]);
        let catalog = ModelCatalog::from_checkpoint_dir(dir.path(), &[], Device::Cpu).unwrap();
        let [entry] = catalog.entries() else {
            panic!("one model expected: {:?}", catalog.entries());
        };
        assert_eq!(
            (entry.id.as_str(), entry.task),
            ("wan2.2-ti2v-5b", Task::Ti2v)
        );
        let published = T2vRequest::for_model(ModelKind::Wan22Ti2v5B, "");
        assert_eq!(entry.defaults, ModelDefaults::of(&published));
        assert_eq!(entry.defaults.sampler, "teacher");
        assert_eq!(entry.inputs.image, ImageUse::Optional);
    }

    #[test]
    fn files_that_fit_several_models_need_a_choice() {
        let clip = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth";
        let names = [
            OFFICIAL_DIT,
            TEXT_FILES[0],
            TEXT_FILES[1],
            "Wan2.1_VAE.pth",
            clip,
        ];
        let dir = folder_of(&names);
        let all = ModelCatalog::from_checkpoint_dir(dir.path(), &[], Device::Cpu);
        let Err(CatalogError::AmbiguousCheckpointDir { ids, .. }) = all else {
            panic!("ambiguous expected");
        };
        assert!(ids.contains(&"wan2.1-flf2v-14b".to_owned()), "{ids:?}");
        let chosen = ["wan2.1-flf2v-14b".to_owned()];
        let catalog = ModelCatalog::from_checkpoint_dir(dir.path(), &chosen, Device::Cpu).unwrap();
        let entry = &catalog.entries()[0];
        assert_eq!(
            (entry.task, entry.inputs.end_image),
            (Task::Flf2v, ImageUse::Required)
        );
    }

    #[test]
    fn the_demo_catalog_has_a_model_per_task() {
        let catalog = ModelCatalog::demo(Device::Cpu);
        for task in [Task::T2v, Task::I2v, Task::Ti2v, Task::Flf2v] {
            let entry = catalog.default_for(task).unwrap();
            assert_eq!(entry.defaults.size, Some(DEMO_SIZE), "{}", entry.id);
        }
    }

    #[test]
    fn a_checkpoint_folder_without_models_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let empty = ModelCatalog::from_checkpoint_dir(dir.path(), &[], Device::Cpu);
        assert!(matches!(empty, Err(CatalogError::EmptyCheckpointDir(_))));
        let unknown =
            ModelCatalog::from_checkpoint_dir(dir.path(), &["wan9".to_owned()], Device::Cpu);
        assert!(matches!(unknown, Err(CatalogError::UnknownModel { .. })));
    }
}
