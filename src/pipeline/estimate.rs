//! The peak device memory of each stage, estimated from the configurations and the request
//! before any model is loaded, and the check against the memory budget.
//!
//! Every estimate is `weights + activations`. Weights are exact: the bytes of the tensors the
//! stage's model reads, from its key list, in the dtype they are read in. Activations follow a
//! formula per stage in the request's geometry; where the code's allocation pattern cannot be
//! counted term by term (the DiT's residual stream and FFN temporaries, the VAE's chunk of
//! feature maps), one coefficient is calibrated on an H200 measurement (`examples/bench`,
//! sections `t2v` and `i2v`; bf16, W8A8, SageSLA top-k 0.1, 81 frames; `docs/performance.md`):
//!
//! | run | stage | measured peak | estimate |
//! |---|---|---|---|
//! | Wan2.1 14B, 1280×720 | denoising | 20.12 GiB | calibration |
//! | Wan2.1 I2V-14B with CFG, 1280×720 (H100) | denoising | 22.53 GiB | calibration |
//! | Wan2.1 1.3B, 832×480 | VAE decode | 6.048 GiB | calibration |
//! | Wan2.1 1.3B, 832×480 | denoising | 2.668 GiB | 2.94 GiB |
//! | Wan2.2 A14B I2V, 1280×720 | denoising | 20.18 GiB | 20.12 GiB |
//! | Wan2.1 14B, 1280×720 | VAE decode | 13.65 GiB | 13.65 GiB |
//! | Wan2.2 A14B I2V, 1280×720 | image encode | 13.39 GiB | 14.48 GiB |
//!
//! The coefficients are derived from the calibration numbers by the same formulas that the
//! estimates use ([`dit_coefficient`], [`vae_coefficient`]), so the estimate of a calibration
//! run equals its measurement (the DiT's takes the larger of its two runs' coefficients, so it
//! is at or above both). The other rows were measured before the I2V-14B calibration was added,
//! which raised the DiT's estimates by about 2 %. The text stage needs no coefficient: its formula is a term-by-term
//! count, and for the whole model it gives 10.58 GiB of weights plus at most 0.28 GiB of
//! activations at 512 tokens, which brackets the measured 10.74 GiB.
//!
//! Models kept loaded between requests ([`super::Residency`]) are on the device through every
//! stage, so each stage's weights add those of the resident models other than its own (both
//! experts of A14B count in the denoising stage when the DiT is resident). The estimate is of
//! a request after the first, when every resident model is loaded; the first request holds
//! fewer.

use candle_core::DType;
use turbo_attention::{Attention, AttentionConfig};
use turbo_core::{
    Error, FrameCount, FrameSize, LatentShape, Result, Stage, VideoGeometry, VAE_STRIDE,
};
use turbo_models::wan::ModelType;
use turbo_models::wan::{
    expected_tensors, int8_block_linears, PatchLayout, QuantPolicy, WanConfig, FFN_TOKENS_PER_PASS,
};
use turbo_models::{
    ClipConfig, ClipVisionEncoder, Umt5Config, Umt5Encoder, Vae22Config, VaeConfig, VaeTiling,
    Wan22Vae, WanVae,
};

use super::parallel::DitSplit;
use super::{Pipeline, Plan, Residency, TextEncoderDevice, VaeSpec};

/// The estimated peak device memory of one stage.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageEstimate {
    /// The stage, as its [`turbo_core::StageReport`] names it.
    pub stage: Stage,
    /// Bytes of the weights resident at once, `resident_weights` included.
    pub weights: u64,
    /// Of `weights`, the bytes of the models kept loaded between requests besides the stage's
    /// own ([`super::Residency`]); 0 by default.
    pub resident_weights: u64,
    /// Bytes of everything else at the stage's peak.
    pub activations: u64,
}

impl StageEstimate {
    /// The estimated peak: weights and activations.
    pub fn peak(&self) -> u64 {
        self.weights.saturating_add(self.activations)
    }
}

/// The estimated peak device memory of every stage of a request, in the order they run.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    pub stages: Vec<StageEstimate>,
    /// The tiling the VAE decode will use: the one the pipeline was given, or the coarsest
    /// grid whose estimate fits the budget when the untiled decode does not; `None`: untiled.
    pub vae_tiling: Option<VaeTiling>,
}

impl MemoryEstimate {
    /// The largest stage peak: the run's peak, since each stage frees its model (or keeps it
    /// resident, counted in every stage).
    pub fn peak(&self) -> u64 {
        self.stages
            .iter()
            .map(StageEstimate::peak)
            .max()
            .unwrap_or(0)
    }

    /// The estimate of `stage` (compared as [`turbo_core::StageReport::stage`] names it).
    pub fn stage(&self, stage: &Stage) -> Option<&StageEstimate> {
        self.stages.iter().find(|estimate| estimate.stage == *stage)
    }
}

/// What the estimate of a request depends on besides the pipeline.
struct EstimateInput {
    geometry: VideoGeometry,
    /// The DiT's attention (the weights of SLA's `proj_l` count).
    attention: AttentionConfig,
    /// Tokens of the longest prompt encoded.
    text_tokens: usize,
    /// Guided sampling encodes a second prompt.
    guided: bool,
    /// Image to video: the VAE encodes the image first.
    image: bool,
    steps: usize,
    /// How the ranks of a multi-GPU run share the DiT.
    split: DitSplit,
}

impl Pipeline {
    /// The estimate of a planned run whose prompt is `prompt` (`image`: image to video), and
    /// the budget it is checked against.
    pub(super) fn plan_memory(
        &self,
        plan: &Plan,
        prompt: &str,
        image: bool,
    ) -> Result<(MemoryEstimate, Option<u64>)> {
        let negative = plan.denoise.sampler.negative_prompt();
        let mut text_tokens = self.tokenizer.encode(prompt)?.ids.len();
        if let Some(negative) = negative {
            text_tokens = text_tokens.max(self.tokenizer.encode(negative)?.ids.len());
        }
        let input = EstimateInput {
            geometry: plan.geometry,
            attention: plan.denoise.dits.first_attention(),
            text_tokens,
            guided: negative.is_some(),
            image,
            steps: plan.denoise.sampler.timesteps().len(),
            split: plan.denoise.split,
        };
        let budget = self.memory_budget()?;
        Ok((self.estimate(&input, budget)?, budget))
    }

    /// [`Pipeline::plan_memory`], failing with [`Error::MemoryBudgetExceeded`] if a stage does
    /// not fit.
    pub(super) fn checked_memory(
        &self,
        plan: &Plan,
        prompt: &str,
        image: bool,
    ) -> Result<MemoryEstimate> {
        let (estimate, budget) = self.plan_memory(plan, prompt, image)?;
        self.check_memory(&estimate, budget)?;
        Ok(estimate)
    }

    /// The memory budget of a stage: the one given to the builder, else what the device has
    /// available now plus what this pipeline's resident models hold (the estimate counts them,
    /// and the free memory measured does not include them); `None` where nothing can be read.
    fn memory_budget(&self) -> Result<Option<u64>> {
        if let Some(budget) = self.memory_budget {
            return Ok(Some(budget));
        }
        let text_encoder_on_device =
            self.text_encoder_device == TextEncoderDevice::Pipeline || self.device.is_cpu();
        let resident = self.residents.bytes_on_device(text_encoder_on_device);
        Ok(turbo_core::available_memory(&self.device)?
            .map(|available| available.saturating_add(resident)))
    }

    /// Per-stage estimates for `input`, with the VAE tiling chosen for `budget`.
    fn estimate(&self, input: &EstimateInput, budget: Option<u64>) -> Result<MemoryEstimate> {
        let models = &self.models;
        let dtype = self.dtype;
        let text = text_estimate(
            &models.text_encoder,
            self.text_encoder_placement(),
            dtype,
            input.text_tokens,
            input.guided,
        );
        let mut stages = vec![(StageModel::TextEncoder, text.of(Stage::EncodingText))];
        if input.image {
            let (model, image) = self.image_estimate(input.geometry);
            stages.push((model, image.of(Stage::EncodingImage)));
        }
        let latent = models.vae.latent_shape(input.geometry);
        let run = DitRun {
            cfg: &models.dit,
            attention: &input.attention,
            quant: self.quant_linear,
            dtype,
            latent,
            tokens: input.split.tokens_per_rank(
                latent.token_count(),
                self.ranks.world_size(),
                self.token_alignment(),
            ),
            guided: input.guided,
        };
        let dit = dit_estimate(&run).of(Stage::Denoising { steps: input.steps });
        stages.push((StageModel::Dit, dit));
        let frames = input.geometry.frames.get();
        let (decode, vae_tiling) = self.plan_decode(input.geometry, budget)?;
        let decode = decode.of(Stage::Decoding {
            done: frames,
            total: frames,
        });
        stages.push((StageModel::Vae, decode));
        let resident = self.resident_weights(&run);
        let stages = stages
            .into_iter()
            .map(|(model, stage)| resident.add_to(stage, model))
            .collect();
        Ok(MemoryEstimate { stages, vae_tiling })
    }

    /// Where the text encoder runs and whether it stays loaded.
    fn text_encoder_placement(&self) -> TextPlacement {
        match (self.text_encoder_device, self.residency.text_encoder) {
            (TextEncoderDevice::Cpu, _) => TextPlacement::Cpu,
            (TextEncoderDevice::Pipeline, true) => TextPlacement::Whole,
            (TextEncoderDevice::Pipeline, false) => TextPlacement::Streamed,
        }
    }

    /// The device bytes of the models kept loaded between requests, `run` being the DiT's.
    fn resident_weights(&self, run: &DitRun) -> ResidentWeights {
        let Residency {
            text_encoder,
            dit,
            vae,
            clip,
        } = self.residency;
        let on_device = |resident: bool, bytes: u64| if resident { bytes } else { 0 };
        let text_on_device =
            text_encoder && self.text_encoder_device == TextEncoderDevice::Pipeline;
        let experts = 1 + u64::from(self.models.dit_low_noise_weights.is_some());
        ResidentWeights {
            text_encoder: on_device(
                text_on_device,
                umt5_bytes(&self.models.text_encoder, self.dtype),
            ),
            dit: on_device(dit, dit_weights(run).0),
            experts,
            vae: on_device(vae, key_bytes(&self.models.vae.expected_keys(), self.dtype)),
            clip: on_device(clip, self.clip_weights()),
        }
    }

    /// The bytes of the CLIP encoder's weights, for a model that runs one (else 0).
    fn clip_weights(&self) -> u64 {
        match &self.models.clip {
            Some(clip) if self.models.dit.model_type.uses_clip() => {
                key_bytes(&ClipVisionEncoder::expected_keys(&clip.config), self.dtype)
            }
            _ => 0,
        }
    }

    /// The decode's estimate and tiling: the pipeline's tiling if it has one; else untiled if
    /// that fits `budget`; else the coarsest `n × n` grid that fits, or if none does the
    /// lowest estimate (untiled when tiles do not help, as on frames not much larger than the
    /// halo).
    fn plan_decode(
        &self,
        geometry: VideoGeometry,
        budget: Option<u64>,
    ) -> Result<(Footprint, Option<VaeTiling>)> {
        let dtype = self.dtype;
        let band = self.decode_band(geometry)?;
        let cfg = match &self.models.vae {
            VaeSpec::Wan21(cfg) => cfg,
            VaeSpec::Wan22(cfg) => {
                return Ok((vae22_decode_estimate(cfg, dtype, geometry, band), None))
            }
        };
        if let Some(rows) = band {
            let band = VaeTiling::new(rows, geometry.latent_shape().width)?;
            return Ok((vae_decode_estimate(cfg, dtype, geometry, Some(band)), None));
        }
        if let Some(tiling) = self.vae_tiling {
            return Ok((
                vae_decode_estimate(cfg, dtype, geometry, Some(tiling)),
                Some(tiling),
            ));
        }
        let untiled = vae_decode_estimate(cfg, dtype, geometry, None);
        let Some(budget) = budget.filter(|&budget| untiled.peak() > budget) else {
            return Ok((untiled, None));
        };
        let latent = geometry.latent_shape();
        let mut planned = (untiled, None);
        for n in 2..=latent.height.max(latent.width) {
            let tiling = VaeTiling::grid(
                n.min(latent.height),
                n.min(latent.width),
                latent.height,
                latent.width,
            )?;
            let estimate = vae_decode_estimate(cfg, dtype, geometry, Some(tiling));
            if estimate.peak() < planned.0.peak() {
                planned = (estimate, Some(tiling));
            }
            if planned.0.peak() <= budget {
                break;
            }
        }
        Ok(planned)
    }

    /// The latent rows of the tallest band of a parallel decode (`WanVae::decode_parallel`,
    /// `Wan22Vae::decode_parallel`), whose estimate is a tile of those rows and the whole width
    /// with its halo (the gathered video whole on every rank); `None` on one device.
    fn decode_band(&self, geometry: VideoGeometry) -> Result<Option<usize>> {
        if self.ranks.several().is_none() {
            return Ok(None);
        }
        let rows = self.models.vae.latent_shape(geometry).height;
        let bands = turbo_core::parallel::Partition::balanced(rows, self.ranks.world_size())?;
        Ok(Some(bands.len(0).max(1)))
    }

    /// Fails with [`Error::MemoryBudgetExceeded`] naming the first stage whose estimate
    /// exceeds `budget` (see [`Pipeline::memory_budget`]); without one nothing is checked.
    fn check_memory(&self, estimate: &MemoryEstimate, budget: Option<u64>) -> Result<()> {
        let Some(budget) = budget else {
            return Ok(());
        };
        match estimate.stages.iter().find(|s| s.peak() > budget) {
            Some(over) => Err(Error::MemoryBudgetExceeded {
                stage: stage_name(&over.stage).to_owned(),
                needed: over.peak(),
                available: budget,
                help: self.memory_help(over),
            }),
            None => {
                tracing::debug!(peak = estimate.peak(), budget, "memory estimate fits");
                Ok(())
            }
        }
    }

    /// The image stage: the CLIP encoder (Wan2.1 I2V / FLF2V) and the VAE run one after the
    /// other, so its peak is the larger of theirs; with the model whose it is.
    fn image_estimate(&self, geometry: VideoGeometry) -> (StageModel, Footprint) {
        let models = &self.models;
        let vae = match &models.vae {
            VaeSpec::Wan21(cfg) => vae_encode_estimate(cfg, self.dtype, geometry),
            VaeSpec::Wan22(cfg) => vae22_encode_estimate(cfg, self.dtype, geometry),
        };
        let images = 1 + usize::from(models.dit.model_type == ModelType::Flf2v);
        match models
            .clip
            .as_ref()
            .filter(|_| models.dit.model_type.uses_clip())
        {
            Some(clip) => {
                let clip = clip_estimate(&clip.config, self.dtype, images);
                // A resident VAE stays beside CLIP while it runs, and a resident CLIP beside
                // the VAE.
                let beside = |resident: bool, weights: u64| if resident { weights } else { 0 };
                let vae_beside = beside(self.residency.vae, vae.weights);
                let clip_beside = beside(self.residency.clip, clip.weights);
                if clip.peak() + vae_beside > vae.peak() + clip_beside {
                    (StageModel::Clip, clip)
                } else {
                    (StageModel::Vae, vae)
                }
            }
            None => (StageModel::Vae, vae),
        }
    }

    /// What would lower the memory of `over` (finer VAE tiles are chosen automatically).
    fn memory_help(&self, over: &StageEstimate) -> Vec<String> {
        let mut help = self.stage_help(&over.stage);
        if over.resident_weights > 0 {
            help.insert(
                0,
                format!(
                    "fewer models kept loaded between requests (`Residency`; {:.2} GiB of this \
                     stage's estimate are the other stages' resident models)",
                    over.resident_weights as f64 / GIB
                ),
            );
        }
        help
    }

    /// What would lower the memory of `stage` itself.
    fn stage_help(&self, stage: &Stage) -> Vec<String> {
        let smaller = "a lower resolution or fewer frames".to_owned();
        match stage {
            Stage::EncodingText if self.text_encoder_device == TextEncoderDevice::Pipeline => {
                vec!["text encoding on the CPU (`text_encoder_on_cpu(true)`)".to_owned()]
            }
            Stage::EncodingText => vec!["a device with more free memory".to_owned()],
            Stage::Denoising { .. } if self.quant_linear == QuantPolicy::KeepFloat => vec![
                "W8A8 block linears (`quant_linear(true)`)".to_owned(),
                smaller,
            ],
            Stage::Decoding { .. } if self.vae_tiling.is_some() => {
                vec!["smaller VAE tiles (`vae_tiling`)".to_owned(), smaller]
            }
            _ => vec![smaller],
        }
    }
}

/// The name of a stage in messages.
pub(super) fn stage_name(stage: &Stage) -> &'static str {
    match stage {
        Stage::EncodingText => "text encoding",
        Stage::EncodingImage => "image encoding",
        Stage::Decoding { .. } => "VAE decode",
        _ => "denoising",
    }
}

/// Bytes of `elements` values of `dtype`, saturating: a model configuration from a file can
/// be arbitrarily large, and an estimate that wrapped around would pass any budget.
fn bytes(elements: usize, dtype: DType) -> u64 {
    (elements as u64).saturating_mul(dtype.size_in_bytes() as u64)
}

/// The element count of a shape, saturating.
fn elements(shape: &[usize]) -> usize {
    shape
        .iter()
        .fold(1usize, |count, &side| count.saturating_mul(side))
}

/// Bytes of the tensors of a key list read in `dtype`.
fn key_bytes<'k>(keys: impl IntoIterator<Item = &'k (String, Vec<usize>)>, dtype: DType) -> u64 {
    keys.into_iter()
        .map(|(_, shape)| bytes(elements(shape), dtype))
        .fold(0, u64::saturating_add)
}

/// The bytes of a stage's weights and activations.
struct Footprint {
    weights: u64,
    activations: u64,
}

impl Footprint {
    fn new(weights: u64, activations: u64) -> Self {
        Self {
            weights,
            activations,
        }
    }

    fn peak(&self) -> u64 {
        self.weights.saturating_add(self.activations)
    }

    fn of(self, stage: Stage) -> StageEstimate {
        StageEstimate {
            stage,
            weights: self.weights,
            resident_weights: 0,
            activations: self.activations,
        }
    }
}

/// The model a stage's estimate holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StageModel {
    TextEncoder,
    Clip,
    Dit,
    Vae,
}

/// The device bytes of each model kept loaded between requests (0: not kept).
struct ResidentWeights {
    text_encoder: u64,
    /// One DiT or expert.
    dit: u64,
    /// DiTs kept: 2 for the experts of A14B.
    experts: u64,
    vae: u64,
    clip: u64,
}

impl ResidentWeights {
    /// `stage`, of `model`, with the resident models besides that one added to its weights.
    fn add_to(&self, mut stage: StageEstimate, model: StageModel) -> StageEstimate {
        let unless = |own: StageModel, bytes: u64| if model == own { 0 } else { bytes };
        // The denoising stage's own footprint counts one expert; the other stays loaded.
        let dits = self.dit * (self.experts - u64::from(model == StageModel::Dit));
        let besides = unless(StageModel::TextEncoder, self.text_encoder)
            .saturating_add(dits)
            .saturating_add(unless(StageModel::Vae, self.vae))
            .saturating_add(unless(StageModel::Clip, self.clip));
        stage.weights = stage.weights.saturating_add(besides);
        stage.resident_weights = besides;
        stage
    }
}

/// Where the text encoder's weights are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextPlacement {
    /// Read on the device one block at a time.
    Streamed,
    /// Whole on the device, kept between requests.
    Whole,
    /// On the CPU (streamed or kept): none on the device.
    Cpu,
}

/// The streamed umT5 encoder on the device: the largest weight group read at once (a block;
/// the embedding table stays on the CPU) plus, for the longest prompt's `L` tokens (at most
/// 512, the tokenizer's limit) and `H` heads, the attention scores in f32 (scores, biased scores,
/// softmax: `3·4·H·L²`, and their copy in the compute dtype `H·L²·b`), the gated FFN
/// (`3·L·dim_ffn·b`) and the f32 norm copies of the residual stream (`4·4·L·dim`); each
/// context is kept in f32 (`4·L·dim`, two with guidance). On the CPU the device holds only
/// the contexts.
fn text_estimate(
    cfg: &Umt5Config,
    placement: TextPlacement,
    dtype: DType,
    len: usize,
    guided: bool,
) -> Footprint {
    let contexts = (1 + usize::from(guided)) as u64 * bytes(len * cfg.dim, DType::F32);
    let keys = Umt5Encoder::expected_keys(cfg);
    let held = match placement {
        TextPlacement::Cpu => return Footprint::new(0, contexts),
        TextPlacement::Whole => umt5_bytes(cfg, dtype),
        TextPlacement::Streamed => key_bytes(
            keys.iter().filter(|(k, _)| k.starts_with("blocks.0.")),
            dtype,
        ),
    };
    let rows = bytes(len * cfg.dim, dtype);
    let size = dtype.size_in_bytes();
    let scores = cfg.num_heads * len * len * (3 * 4 + size);
    let ffn = 3 * len * cfg.dim_ffn * size;
    let norms = 4 * 4 * len * cfg.dim;
    Footprint::new(held + rows, (scores + ffn + norms) as u64 + contexts)
}

/// Bytes of the whole umT5 encoder's weights in `dtype`.
fn umt5_bytes(cfg: &Umt5Config, dtype: DType) -> u64 {
    key_bytes(Umt5Encoder::expected_keys(cfg).iter(), dtype)
}

/// One denoising run, as the estimate sees it.
struct DitRun<'a> {
    cfg: &'a WanConfig,
    attention: &'a AttentionConfig,
    quant: QuantPolicy,
    dtype: DType,
    /// The sampled latent (its channels and the token grid depend on the VAE).
    latent: LatentShape,
    /// The tokens this rank's blocks hold: all of the latent's, or under sequence parallelism
    /// the largest shard (the activations shrink with it; the weights, the latents of the
    /// sampler and the gathered velocity do not).
    tokens: usize,
    guided: bool,
}

/// The DiT's weights (its key list, int8 block linears under W8A8, plus one float FFN weight
/// in flight while a float checkpoint is quantised at load) plus
/// `K_dit · (N·4·dim + min(N, P)·b·ffn_dim)` for `N` tokens: the bytes of one f32 residual
/// stream and of one FFN pass's hidden state (`P` = [`FFN_TOKENS_PER_PASS`] tokens) in the
/// compute dtype `b`, times `K_dit`, calibrated
/// ([`dit_coefficient`]) to cover every temporary of a block (q, k, v, attention, modulated
/// copies, W8A8's int8 activations) at the step's peak. Plus the sampler's latents
/// (`6 · 4·16·T·h·w`: state, noise, velocity and their temporaries) and the text contexts.
fn dit_estimate(run: &DitRun) -> Footprint {
    let (fixed, unit) = dit_terms(run);
    let activations = fixed.1 + (dit_coefficient() * unit as f64) as u64;
    Footprint::new(fixed.0, activations)
}

/// `(the DiT's weights as held, the float FFN weight in flight while quantising at load)`.
fn dit_weights(run: &DitRun) -> (u64, u64) {
    let cfg = run.cfg;
    let specs =
        expected_tensors::<Box<dyn Attention>>(cfg, PatchLayout::Linear, run.attention, run.dtype);
    let quantising = run.quant == QuantPolicy::Quantize;
    let in_flight = if quantising {
        bytes(cfg.ffn_dim * cfg.dim, run.dtype)
    } else {
        0
    };
    let specs = if quantising {
        int8_block_linears(specs)
    } else {
        specs
    };
    let weights: u64 = specs
        .iter()
        .map(|spec| bytes(elements(&spec.shape), spec.dtype))
        .fold(0, u64::saturating_add);
    (weights, in_flight)
}

/// `((weights, activations outside the calibrated term), the calibrated term's unit)`.
fn dit_terms(run: &DitRun) -> ((u64, u64), u64) {
    let cfg = run.cfg;
    let (weights, in_flight) = dit_weights(run);
    let latent = run.latent;
    let latent_elements = latent.channels * latent.frames * latent.height * latent.width;
    let contexts = (1 + usize::from(run.guided)) * cfg.text_len * cfg.dim;
    let fixed = bytes(6 * latent_elements + contexts, DType::F32);
    let tokens = run.tokens;
    let ffn_tokens = tokens.min(FFN_TOKENS_PER_PASS);
    let unit = tokens * 4 * cfg.dim + ffn_tokens * run.dtype.size_in_bytes() * cfg.ffn_dim;
    ((weights + in_flight, fixed), unit as u64)
}

/// `K_dit`: the larger of two calibrations, each a measured denoising peak less its weights
/// and fixed activations, over its unit `N·4·dim + min(N, P)·b·ffn_dim` (N = 75 600 tokens at
/// 1280×720, 81 frames, W8A8, SageSLA 0.1, bf16): Wan2.1 14B text to video, unguided (H200,
/// 20.12 GiB), and Wan2.1 I2V-14B with its CLIP context and CFG (H100, 22.53 GiB,
/// `docs/bench/v11_h100_bench_i2v_14b.json`), whose guided step holds more than the unguided
/// one. Calibrated at 720p, where the estimate decides whether a run fits a 24 GB card; the
/// same coefficient overestimates the 1.3B at 480p by 10 % or more, the safe side.
fn dit_coefficient() -> f64 {
    let t2v = calibrated_dit_coefficient(21_601_071_712.0, &WanConfig::wan21_t2v_14b(), false);
    let i2v = calibrated_dit_coefficient(24_190_451_456.0, &WanConfig::wan21_i2v_14b(), true);
    t2v.max(i2v)
}

/// The `K_dit` that makes the estimate of a 1280×720, 81-frame, W8A8 SageSLA 0.1 run of `cfg`
/// equal its `measured` denoising peak in bytes.
fn calibrated_dit_coefficient(measured: f64, cfg: &WanConfig, guided: bool) -> f64 {
    let attention = AttentionConfig::new(
        turbo_core::AttentionKind::sagesla(turbo_core::DEFAULT_SLA_TOPK).expect("a valid top-k"),
    );
    let geometry = VideoGeometry::new(
        FrameSize::new(1280, 720).expect("a valid size"),
        FrameCount::new(81).expect("a valid frame count"),
    );
    let ((weights, fixed), unit) = dit_terms(&DitRun {
        cfg,
        attention: &attention,
        quant: QuantPolicy::Quantize,
        dtype: DType::BF16,
        latent: geometry.latent_shape(),
        tokens: geometry.latent_shape().token_count(),
        guided,
    });
    (measured - (weights + fixed) as f64) / unit as f64
}

const GIB: f64 = (1u64 << 30) as f64;

/// 832×480, 81 frames: the geometry of the VAE's H200 calibration run.
fn calibration_geometry() -> VideoGeometry {
    VideoGeometry::new(
        FrameSize::new(832, 480).expect("a valid size"),
        FrameCount::new(81).expect("a valid frame count"),
    )
}

/// The VAE's weights (encoder and decoder, both loaded) plus `K_vae · U`, where
/// `U = 4·H·W·dim·b` is one chunk of four frames of the full-resolution feature map at the
/// base width in the compute dtype `b` and `K_vae` is calibrated ([`vae_coefficient`]), plus
/// the decoded video: its chunks (or tiles) and their concatenation in the compute dtype and
/// the f32 copy (`3·F·H·W·(2b + 4)`). The decode streams over time, so only the output grows
/// with `F`. Tiled, `U` is that of one tile with its halo (the feature maps and the temporal
/// cache are the tile's), and the middle blocks' output for every latent frame is held
/// (`T·dim·mult_last·h·w·b`).
fn vae_decode_estimate(
    cfg: &VaeConfig,
    dtype: DType,
    geometry: VideoGeometry,
    tiling: Option<VaeTiling>,
) -> Footprint {
    let ((weights, output), unit) = vae_decode_terms(cfg, dtype, geometry);
    let Some(tiling) = tiling else {
        let chunk = (vae_coefficient() * unit as f64) as u64;
        return Footprint::new(weights, output + chunk);
    };
    let latent = geometry.latent_shape();
    let halo = cfg.decode_halo();
    let decoded = |tile: usize, side: usize| (tile + 2 * halo).min(side);
    let tile_area = decoded(tiling.height(), latent.height) * decoded(tiling.width(), latent.width);
    let fraction = tile_area as f64 / (latent.height * latent.width) as f64;
    let chunk = (vae_coefficient() * unit as f64 * fraction) as u64;
    let middle_channels = cfg.dim * cfg.dim_mult.last().copied().unwrap_or(1);
    let middle = bytes(
        latent.frames * middle_channels * latent.height * latent.width,
        dtype,
    );
    Footprint::new(weights, output + chunk + middle)
}

/// `((weights, output video), U)` of a decode.
fn vae_decode_terms(cfg: &VaeConfig, dtype: DType, geometry: VideoGeometry) -> ((u64, u64), u64) {
    let weights = key_bytes(&WanVae::expected_keys(cfg), dtype);
    let (height, width) = (geometry.size.height(), geometry.size.width());
    let pixels = geometry.frames.get() * height * width;
    let output = (3 * pixels * (2 * dtype.size_in_bytes() + 4)) as u64;
    ((weights, output), vae_chunk_unit(cfg, dtype, height, width))
}

/// `U = 4·H·W·dim·b`: one chunk of four frames of the full-resolution feature map.
fn vae_chunk_unit(cfg: &VaeConfig, dtype: DType, height: usize, width: usize) -> u64 {
    bytes(VAE_STRIDE.0 * height * width * cfg.dim, dtype)
}

/// `K_vae`: the H200 calibration run's decode peak (6.048 GiB, bf16) less the VAE's weights and
/// the output video, over its `U`.
fn vae_coefficient() -> f64 {
    const MEASURED: f64 = 6.048 * GIB;
    let ((weights, output), unit) =
        vae_decode_terms(&VaeConfig::wan21(), DType::BF16, calibration_geometry());
    (MEASURED - (weights + output) as f64) / unit as f64
}

/// The image condition of I2V and FLF2V: the VAE's weights, `3·F·H·W·(4 + 4 + 2b)` bytes (the
/// input video of a whole-video encode, in f32 and in the model's dtype; kept as a margin) and
/// the encoder's working set, taken as the decoder's `K_vae · U` (not calibrated separately).
/// `WanVae::encode_image` and `encode_first_last` hold more at once than a streaming chunk,
/// and stay under that term: their held form keeps up to 12 full-resolution frames of the base
/// width a layer (2 given, 2 more after `conv1`, 4 after each of level 0's residual blocks), a
/// few such tensors live at once, and the first-last encode then keeps two frames per cached
/// convolution for its last chunk, where `K_vae · U` is about 71 of those frames. Measured at
/// 720p, 81 frames, bf16, on an H100 (`docs/bench/v14_h100_callB_bench.log`): 9.71 GiB for
/// `encode_image`, 8.24 for the streaming `encode`.
fn vae_encode_estimate(cfg: &VaeConfig, dtype: DType, geometry: VideoGeometry) -> Footprint {
    let weights = key_bytes(&WanVae::expected_keys(cfg), dtype);
    let (height, width) = (geometry.size.height(), geometry.size.width());
    let pixels = geometry.frames.get() * height * width;
    let input = (3 * pixels * (8 + 2 * dtype.size_in_bytes())) as u64;
    let chunk = vae_coefficient() * vae_chunk_unit(cfg, dtype, height, width) as f64;
    Footprint::new(weights, input + chunk as u64)
}

/// The Wan2.2 VAE's decode, derived from the Wan2.1 calibration rather than measured: its
/// weights, the output video as for Wan2.1, and `K_vae · U₂₂` with `U₂₂ = 4·(H/2)·(W/2)·dec_dim·b`,
/// the chunk of four frames of its last decoder level (full width `dec_dim` at half the
/// resolution, before the 2×2 unpatchify). A rank of a parallel decode decodes a `band` of
/// latent rows widened by the halo, so its chunk is that many rows tall.
fn vae22_decode_estimate(
    cfg: &Vae22Config,
    dtype: DType,
    geometry: VideoGeometry,
    band: Option<usize>,
) -> Footprint {
    let weights = key_bytes(&Wan22Vae::expected_keys(cfg), dtype);
    let (height, width) = (geometry.size.height(), geometry.size.width());
    let pixels = geometry.frames.get() * height * width;
    let output = (3 * pixels * (2 * dtype.size_in_bytes() + 4)) as u64;
    let stride = cfg.spatial_stride();
    let decoded = band.map_or(height, |rows| {
        ((rows + 2 * cfg.decode_halo()) * stride).min(height)
    });
    let chunk = vae_coefficient() * vae22_chunk_unit(cfg, dtype, decoded, width) as f64;
    Footprint::new(weights, output + chunk as u64)
}

/// `U₂₂` of [`vae22_decode_estimate`].
fn vae22_chunk_unit(cfg: &Vae22Config, dtype: DType, height: usize, width: usize) -> u64 {
    bytes(
        VAE_STRIDE.0 * (height / 2) * (width / 2) * cfg.dec_dim,
        dtype,
    )
}

/// TI2V's image encode: one frame through the Wan2.2 encoder, its weights plus a quarter of
/// the decoder's chunk term (one frame, not four; the encoder is narrower than the decoder).
fn vae22_encode_estimate(cfg: &Vae22Config, dtype: DType, geometry: VideoGeometry) -> Footprint {
    let weights = key_bytes(&Wan22Vae::expected_keys(cfg), dtype);
    let (height, width) = (geometry.size.height(), geometry.size.width());
    let chunk = vae_coefficient() * vae22_chunk_unit(cfg, dtype, height, width) as f64 / 4.0;
    Footprint::new(weights, chunk as u64)
}

/// The CLIP encoder on `images` images: its `visual.*` weights, and per image the f32 residual
/// stream, the MLP hidden state and the attention scores of one block
/// (`4·N·(dim·(2 + mlp_ratio)) + 4·heads·N²` bytes for `N` tokens), a small fraction of a
/// 14B run's memory.
fn clip_estimate(cfg: &ClipConfig, dtype: DType, images: usize) -> Footprint {
    let weights = key_bytes(&ClipVisionEncoder::expected_keys(cfg), dtype);
    let tokens = cfg.num_tokens();
    let per_image = tokens * cfg.dim * (2 + cfg.mlp_ratio) + cfg.num_heads * tokens * tokens;
    Footprint::new(weights, bytes(images * per_image, DType::F32))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calibration leaves a positive, plausible multiple of each unit: a handful of
    /// residual-stream-sized temporaries in a DiT block, a few dozen base-width feature maps
    /// (padded inputs, the temporal cache, im2col) in a VAE chunk.
    #[test]
    fn calibrated_coefficients_are_plausible() {
        let (dit, vae) = (dit_coefficient(), vae_coefficient());
        println!("K_dit = {dit:.3}, K_vae = {vae:.3}");
        assert!((1.0..10.0).contains(&dit), "K_dit {dit}");
        assert!((4.0..40.0).contains(&vae), "K_vae {vae}");
    }
}
