//! The models a pipeline keeps loaded between requests ([`Residency`]), shared by its clones.
//!
//! By default every stage loads its model and drops it when it ends, so one model at a time
//! is on the device. A resident model is loaded by the first request that needs it and kept
//! for the next ones, which then read nothing from disk; the memory estimate counts it in
//! every stage. A resident DiT remembers what it was loaded with ([`DitLoadSettings`]): a
//! request of the same pipeline (or a clone) with another attention backend, quantisation or
//! dtype drops it and loads it again, and other LoRA adapters are switched in place
//! ([`WanModel::set_loras`](turbo_models::wan::WanModel::set_loras)), the base weights kept.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::DType;
use turbo_attention::AttentionConfig;
use turbo_core::Result;
use turbo_models::lora::{LoraMode, ScaledLora};
use turbo_models::wan::QuantPolicy;
use turbo_models::{ClipVisionEncoder, Umt5Encoder};
use turbo_sampler::Expert;

use super::denoise::Dit;
use super::vae::LoadedVae;

/// Which models a [`Pipeline`](super::Pipeline) keeps loaded between requests
/// (`PipelineBuilder::residency`, `Pipeline::with_residency`). The default keeps none: each
/// stage reads its model from its file and drops it, which is what lets the 14B run at 720p
/// in about 20 GiB. A server that runs one model again and again keeps them instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Residency {
    /// The whole umT5 text encoder (11 GB of umT5-XXL in bf16), where it runs (the pipeline's
    /// device, or the CPU with `text_encoder_on_cpu`), instead of streaming its blocks from
    /// the file at every request.
    pub text_encoder: bool,
    /// The DiT, or both experts of Wan2.2 A14B. LoRA adapters set on the pipeline are switched
    /// in the resident weights; other load settings (attention backend, W8A8, dtype) reload it.
    pub dit: bool,
    /// The VAE, for the image encode and the decode.
    pub vae: bool,
    /// The CLIP image encoder of Wan2.1 I2V / FLF2V; other models have none.
    pub clip: bool,
}

impl Residency {
    /// Nothing kept: every stage loads its model and drops it (the default).
    pub const NONE: Self = Self {
        text_encoder: false,
        dit: false,
        vae: false,
        clip: false,
    };
    /// Every model kept: the text encoder, the DiT (both experts), the VAE and CLIP.
    pub const ALL: Self = Self {
        text_encoder: true,
        dit: true,
        vae: true,
        clip: true,
    };
    /// Every model but the text encoder, which is streamed: what a card that cannot also hold
    /// the 11 GB text encoder keeps.
    pub const ALL_BUT_TEXT_ENCODER: Self = Self {
        text_encoder: false,
        ..Self::ALL
    };

    /// Whether any model is kept.
    pub fn any(self) -> bool {
        self.text_encoder || self.dit || self.vae || self.clip
    }
}

/// A model loaded by an earlier request, with the bytes of the weights it read.
pub(super) struct Loaded<T> {
    pub(super) model: Arc<T>,
    pub(super) bytes: u64,
}

/// What a DiT's weights depend on besides its file: a resident DiT loaded with other settings
/// is stale and is loaded again. The top-k is not among them (it is set before every step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct DitLoadSettings {
    /// The backend and its block sizes (the top-k normalised away).
    attention: AttentionConfig,
    quant: QuantPolicy,
    dtype: DType,
}

impl DitLoadSettings {
    pub(super) fn new(attention: AttentionConfig, quant: QuantPolicy, dtype: DType) -> Self {
        let kind = match attention.kind {
            turbo_core::AttentionKind::Original => turbo_core::AttentionKind::Original,
            turbo_core::AttentionKind::Sla { .. } => turbo_core::AttentionKind::Sla { topk: 1.0 },
            turbo_core::AttentionKind::SageSla { .. } => {
                turbo_core::AttentionKind::SageSla { topk: 1.0 }
            }
        };
        Self {
            attention: AttentionConfig { kind, ..attention },
            quant,
            dtype,
        }
    }
}

/// An adapter as the resident DiT has it: the same opened file (its allocation) at the same
/// strength. A file opened again counts as another adapter, so a changed file is never missed.
#[derive(Debug, Clone, PartialEq)]
struct AppliedLora {
    adapter: usize,
    strength: f64,
}

fn applied(loras: &[ScaledLora]) -> Vec<AppliedLora> {
    loras
        .iter()
        .map(|lora| AppliedLora {
            adapter: Arc::as_ptr(&lora.adapter) as usize,
            strength: lora.strength,
        })
        .collect()
}

/// A DiT (or one expert) kept between requests.
pub(super) struct ResidentDit {
    settings: DitLoadSettings,
    /// The adapters in its weights; `None` after a failed switch, when the model holds none
    /// but the next request must set its own anyway.
    loras: Option<Vec<AppliedLora>>,
    pub(super) model: Dit,
    bytes: u64,
}

impl ResidentDit {
    /// A freshly loaded DiT without adapters, of `bytes` of weights.
    pub(super) fn new(model: Dit, settings: DitLoadSettings, bytes: u64) -> Self {
        Self {
            settings,
            loras: Some(Vec::new()),
            model,
            bytes,
        }
    }

    /// Gives the model exactly `loras` (starting from its unadapted weights), unless it has
    /// them already.
    pub(super) fn switch_loras(&mut self, loras: &[ScaledLora]) -> Result<()> {
        let wanted = applied(loras);
        if self.loras.as_ref() == Some(&wanted) {
            return Ok(());
        }
        self.loras = None;
        self.model.set_loras(loras, LoraMode::Merge)?;
        self.loras = Some(wanted);
        Ok(())
    }
}

/// The resident DiTs: slot 0 holds the DiT or the high-noise expert, slot 1 the low-noise one.
pub(super) type DitSlots = [Option<ResidentDit>; 2];

/// The slot of `expert` (`None`: a one-model family).
pub(super) fn dit_slot(expert: Option<Expert>) -> usize {
    usize::from(expert == Some(Expert::LowNoise))
}

/// The models a pipeline and its clones keep between requests.
#[derive(Default)]
pub(super) struct Residents {
    pub(super) text_encoder: Mutex<Option<Loaded<Umt5Encoder>>>,
    dits: Mutex<DitSlots>,
    /// The bytes the DiT slots hold, readable while a run holds `dits` for its whole stage.
    dit_bytes: AtomicU64,
    pub(super) vae: Mutex<Option<Loaded<LoadedVae>>>,
    pub(super) clip: Mutex<Option<Loaded<ClipVisionEncoder>>>,
}

impl std::fmt::Debug for Residents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Residents")
            .field("text_encoder_bytes", &loaded_bytes(&self.text_encoder))
            .field("dit_bytes", &self.dit_bytes.load(Ordering::Relaxed))
            .field("vae_bytes", &loaded_bytes(&self.vae))
            .field("clip_bytes", &loaded_bytes(&self.clip))
            .finish()
    }
}

/// Locks `mutex`, whose data stays consistent even if a holder panicked (each slot is
/// replaced whole).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn loaded_bytes<T>(slot: &Mutex<Option<Loaded<T>>>) -> u64 {
    lock(slot).as_ref().map_or(0, |loaded| loaded.bytes)
}

impl Residents {
    /// The DiT slots, held by a denoising run for its whole stage (a run needs its DiT
    /// mutably, to set the top-k of each step). Slots loaded with other settings than
    /// `settings` are emptied first, so a stale model is never used nor held beside its
    /// replacement.
    pub(super) fn dits(&self, settings: DitLoadSettings) -> ResidentDits<'_> {
        let mut slots = lock(&self.dits);
        for slot in slots.iter_mut() {
            if slot.as_ref().is_some_and(|dit| dit.settings != settings) {
                tracing::info!("the resident DiT was loaded with other settings: reloading");
                *slot = None;
            }
        }
        let dits = ResidentDits {
            slots,
            bytes: &self.dit_bytes,
        };
        dits.count_bytes();
        dits
    }

    /// Whether the DiT slot of `expert` holds a model loaded with `settings`, so that a run
    /// reads no file for it. While another run holds the slots this is not known, and taken
    /// as true: a run of this pipeline is using its resident DiTs, and they are likely the
    /// ones this run needs (at worst, the load that follows reads from the disk).
    pub(super) fn holds_dit(&self, expert: Option<Expert>, settings: DitLoadSettings) -> bool {
        match self.dits.try_lock() {
            Ok(slots) => slot_holds(&slots, expert, settings),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                slot_holds(&poisoned.into_inner(), expert, settings)
            }
            Err(std::sync::TryLockError::WouldBlock) => true,
        }
    }

    /// Bytes of the weights held now: the text encoder (when `text_encoder_on_device`), the
    /// DiTs, the VAE and CLIP.
    pub(super) fn bytes_on_device(&self, text_encoder_on_device: bool) -> u64 {
        let text = match text_encoder_on_device {
            true => loaded_bytes(&self.text_encoder),
            false => 0,
        };
        text + self.dit_bytes.load(Ordering::Relaxed)
            + loaded_bytes(&self.vae)
            + loaded_bytes(&self.clip)
    }
}

fn slot_holds(slots: &DitSlots, expert: Option<Expert>, settings: DitLoadSettings) -> bool {
    slots[dit_slot(expert)]
        .as_ref()
        .is_some_and(|dit| dit.settings == settings)
}

/// The resident DiT slots, locked for a run.
pub(super) struct ResidentDits<'r> {
    slots: MutexGuard<'r, DitSlots>,
    bytes: &'r AtomicU64,
}

impl ResidentDits<'_> {
    /// The slot of `expert`.
    pub(super) fn slot(&mut self, expert: Option<Expert>) -> &mut Option<ResidentDit> {
        &mut self.slots[dit_slot(expert)]
    }

    /// Records the bytes the slots hold (after a load).
    pub(super) fn count_bytes(&self) {
        let held = self.slots.iter().flatten().map(|dit| dit.bytes).sum();
        self.bytes.store(held, Ordering::Relaxed);
    }
}

/// The model `load` gives, with the bytes it read; when `keep`, the one resident in `slot`
/// (0 bytes read) or, the first time, the loaded one, kept there.
pub(super) fn resident_or_load<T>(
    what: &str,
    keep: bool,
    slot: &Mutex<Option<Loaded<T>>>,
    load: impl FnOnce() -> Result<(T, u64)>,
) -> Result<(Arc<T>, u64)> {
    if !keep {
        return timed_load(what, load).map(|(model, bytes)| (Arc::new(model), bytes));
    }
    let mut slot = lock(slot);
    if let Some(loaded) = slot.as_ref() {
        return Ok((Arc::clone(&loaded.model), 0));
    }
    let (model, bytes) = timed_load(what, load)?;
    let model = Arc::new(model);
    *slot = Some(Loaded {
        model: Arc::clone(&model),
        bytes,
    });
    Ok((model, bytes))
}

/// Runs `load`, logging (at info) how long loading `what` took and the bytes it read, so that
/// a stage's time splits into its load and its work.
pub(super) fn timed_load<T>(
    what: &str,
    load: impl FnOnce() -> Result<(T, u64)>,
) -> Result<(T, u64)> {
    let start = std::time::Instant::now();
    let loaded = load()?;
    tracing::info!(
        ms = start.elapsed().as_secs_f64() * 1e3,
        bytes = loaded.1,
        "loaded {what}"
    );
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_settings_ignore_the_topk_but_not_the_backend() {
        let settings = |kind: &str| {
            let attention = AttentionConfig::new(kind.parse().unwrap());
            DitLoadSettings::new(attention, QuantPolicy::KeepFloat, DType::F32)
        };
        assert_eq!(settings("sla:0.1"), settings("sla:0.3"));
        assert_ne!(settings("sla:0.1"), settings("sagesla:0.1"));
        assert_ne!(settings("original"), settings("sla"));
        let quantised = DitLoadSettings::new(
            AttentionConfig::new("sla".parse().unwrap()),
            QuantPolicy::Quantize,
            DType::F32,
        );
        assert_ne!(settings("sla"), quantised);
    }

    #[test]
    fn a_resident_model_is_loaded_once() {
        let slot = Mutex::new(None);
        let (first, read) =
            resident_or_load("a test model", true, &slot, || Ok((7u32, 28))).unwrap();
        assert_eq!((*first, read), (7, 28));
        let (again, read) =
            resident_or_load("a test model", true, &slot, || panic!("loaded twice")).unwrap();
        assert_eq!((*again, read), (7, 0));
        assert_eq!(loaded_bytes(&slot), 28);
    }
}
