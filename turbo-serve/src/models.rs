//! The models the server offers and the pipelines built for them.
//!
//! The library loads each model's weights when its stage starts and drops them when it ends, so
//! what stays resident between jobs is the built [`Pipeline`]: the checked file set, the
//! tokenizer and the LoRA adapters. The [`ModelCache`] keeps the pipelines of recent settings
//! and evicts the least recently used one when the memory estimate of the next model says it
//! would not fit beside them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::Device;
use serde::{Deserialize, Serialize};
use turbodiffusion::attention::AttentionConfig;
use turbodiffusion::core::Resolution;
use turbodiffusion::pipeline::{open_lora, DitLoras, ModelFiles, ModelKind};
use turbodiffusion::{AttentionKind, Pipeline};

/// What a model generates from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Text to video.
    T2v,
    /// Image (and text) to video.
    I2v,
    /// Text or image to video with one model (Wan2.2 TI2V-5B), which the library does not run.
    Ti2v,
}

/// Where a model's weights come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ModelSource {
    /// The library's tiny random-weight demo ([`Pipeline::demo`] / [`Pipeline::demo_i2v`]).
    Demo,
    /// A released model family, read from the checkpoint folder.
    Release(ModelKind),
}

/// The settings a request gets for what it leaves out.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModelDefaults {
    /// An explicit frame size; `None`: the resolution table with the aspect ratio.
    pub size: Option<(usize, usize)>,
    #[serde(serialize_with = "serialize_display")]
    pub resolution: Resolution,
    pub num_frames: usize,
}

fn serialize_display<S: serde::Serializer>(
    value: &impl std::fmt::Display,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// A model `GET /v1/models` lists and requests name.
#[derive(Debug, Clone, Serialize)]
pub struct ModelEntry {
    pub id: String,
    pub task: Task,
    pub description: String,
    pub defaults: ModelDefaults,
    #[serde(skip)]
    pub source: ModelSource,
}

/// The released families a checkpoint folder may hold, by the id requests use.
const RELEASES: [(&str, ModelKind, Task); 3] = [
    ("wan2.1-t2v-1.3b", ModelKind::Wan21T2V1_3B, Task::T2v),
    ("wan2.1-t2v-14b", ModelKind::Wan21T2V14B, Task::T2v),
    ("wan2.2-i2v-a14b", ModelKind::Wan22I2VA14B, Task::I2v),
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
    #[error("--lora-dir {}: {source}", path.display())]
    LoraDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Everything that selects one built pipeline. The top-k, steps and size are per request and
/// need no pipeline of their own.
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
    device: Device,
}

impl ModelCatalog {
    /// The built-in demo models: `demo` (text to video) and `demo-i2v`.
    pub fn demo(device: Device) -> Self {
        let demo_defaults = ModelDefaults {
            size: Some((128, 128)),
            resolution: Resolution::P480,
            num_frames: 17,
        };
        let entry = |id: &str, task, description: &str| ModelEntry {
            id: id.to_owned(),
            task,
            description: description.to_owned(),
            defaults: demo_defaults,
            source: ModelSource::Demo,
        };
        Self {
            entries: vec![
                entry("demo", Task::T2v, "tiny random-weight text-to-video demo"),
                entry(
                    "demo-i2v",
                    Task::I2v,
                    "tiny random-weight image-to-video demo",
                ),
            ],
            checkpoint_dir: None,
            loras: BTreeMap::new(),
            device,
        }
    }

    /// The released models whose files are in `dir`: those of `only` (`wan2.1-t2v-1.3b`,
    /// `wan2.1-t2v-14b`, `wan2.2-i2v-a14b`),
    /// or every one found when `only` is empty.
    pub fn from_checkpoint_dir(
        dir: &Path,
        only: &[String],
        device: Device,
    ) -> Result<Self, CatalogError> {
        for id in only {
            if !RELEASES.iter().any(|(known, ..)| known == id) {
                let known = RELEASES.map(|(id, ..)| id).join(", ");
                return Err(CatalogError::UnknownModel {
                    id: id.clone(),
                    known,
                });
            }
        }
        let mut entries = Vec::new();
        for (id, kind, task) in RELEASES {
            let wanted = only.is_empty() || only.iter().any(|o| o == id);
            match ModelFiles::find(dir, kind, false) {
                Ok(_) if wanted => entries.push(release_entry(id, kind, task)),
                Err(e) if !only.is_empty() && wanted => {
                    return Err(CatalogError::MissingFiles {
                        id: id.to_owned(),
                        reason: e.to_string(),
                    })
                }
                _ => {}
            }
        }
        if entries.is_empty() {
            return Err(CatalogError::EmptyCheckpointDir(dir.to_owned()));
        }
        Ok(Self {
            entries,
            checkpoint_dir: Some(dir.to_owned()),
            loras: BTreeMap::new(),
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

    /// The names of the LoRA adapters on offer.
    pub fn lora_names(&self) -> impl Iterator<Item = &str> {
        self.loras.keys().map(String::as_str)
    }

    /// Builds the pipeline `key` selects (the model must be in the catalog).
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
                let demo = match entry.task {
                    Task::I2v => Pipeline::demo_i2v(0, attention, self.device.clone())?,
                    _ => Pipeline::demo(0, attention, self.device.clone())?,
                };
                demo.with_quant_linear(key.quant).with_loras(loras)
            }
            (ModelSource::Release(model), Some(dir)) => Pipeline::builder(model)
                .checkpoint_dir(dir)
                .attention(kind)
                .quant_linear(key.quant)
                .device(self.device.clone())
                .loras(loras)
                .build(),
            (ModelSource::Release(_), None) => Err(unknown()),
        }
    }

    fn loras(&self, chosen: &[(String, f64)]) -> turbodiffusion::Result<DitLoras> {
        let all = chosen
            .iter()
            .map(|(name, strength)| {
                let path =
                    self.loras
                        .get(name)
                        .ok_or_else(|| turbodiffusion::Error::InvalidConfig {
                            field: "lora".into(),
                            reason: format!("no adapter named `{name}`"),
                        })?;
                open_lora(path, *strength)
            })
            .collect::<turbodiffusion::Result<_>>()?;
        Ok(DitLoras {
            all,
            ..DitLoras::default()
        })
    }
}

fn release_entry(id: &str, kind: ModelKind, task: Task) -> ModelEntry {
    let resolution = match task {
        Task::I2v => Resolution::P720,
        _ => Resolution::P480,
    };
    ModelEntry {
        id: id.to_owned(),
        task,
        description: format!("TurboDiffusion {}", kind.short_name()),
        defaults: ModelDefaults {
            size: None,
            resolution,
            num_frames: 81,
        },
        source: ModelSource::Release(kind),
    }
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

    /// The pipeline of `key`: the resident one, or a new one whose cost `weight_bytes` says
    /// (evicting others when it would not fit).
    pub fn pipeline(
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
