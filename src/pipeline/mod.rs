//! The end-to-end pipeline: prompt → umT5 → rCM (or a teacher) with the Wan DiT → VAE → video.
//!
//! By default each stage's model is loaded when the stage starts and dropped when it ends, so
//! only one of the text encoder, the DiT and the VAE is resident at a time; a [`Residency`]
//! keeps some of them loaded between requests instead.

mod checks;
mod demo;
mod denoise;
mod estimate;
mod files;
mod frames;
mod i2v;
mod lora;
mod memory;
mod parallel;
mod random;
mod request;
mod resident;
mod vae;

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use turbo_attention::{AttentionConfig, AttentionKind, BlockSizes};
use turbo_core::{Error, NoProgress, Progress, Result, Stage};
use turbo_models::tokenizer::PromptTokenizer;
use turbo_models::wan::{DitCondition, ModelType, QuantPolicy, WanConfig};
use turbo_models::{
    ClipConfig, StreamingUmt5Encoder, Umt5Config, Umt5Encoder, Vae22Config, VaeConfig, VaeTiling,
    TOKEN_EMBEDDING_KEY,
};
use turbo_sampler::{ExpertBoundary, T2V_A14B_BOUNDARY, T2V_SIGMA_MAX};
use turbo_video::{rgb_frames, Fps, Mp4Options, OutputFile, Video};

use denoise::{DenoisePlan, DitPlan, PlannedSampler};
use frames::{DiscardedFrames, FileFrames, FrameSink, MemoryFrames};
use memory::{StageMeter, WeightBytes};
use parallel::Ranks;
use resident::{resident_or_load, Residents};

pub use demo::{demo_request, DEMO_NOTICE};
pub use estimate::{MemoryEstimate, StageEstimate};
use files::OpenedWeights;
pub use files::{
    ModelFiles, ModelKind, WeightSource, CLIP_FILE, TEXT_ENCODER_FILE, TOKENIZER_FILES, VAE22_FILE,
    VAE_FILE,
};
pub use i2v::I2vRequest;
pub use lora::{open_lora, parse_lora_arg, DitLoras};
pub use parallel::{DitSplit, Launched, SharedCommunicator};
pub use random::RandomCheckpoint;
pub use request::{SamplerChoice, T2vRequest, SAMPLER_PRESETS};
pub use resident::Residency;
pub use vae::VaeSpec;

/// The shapes of the three models and where their weights come from.
#[derive(Debug, Clone)]
pub struct ModelSet {
    pub dit: WanConfig,
    /// The DiT, or for Wan2.2 A14B its high-noise expert.
    pub dit_weights: WeightSource,
    /// The low-noise expert of Wan2.2 A14B (`None` for one-model families).
    pub dit_low_noise_weights: Option<WeightSource>,
    pub text_encoder: Umt5Config,
    pub text_encoder_weights: WeightSource,
    pub vae: VaeSpec,
    pub vae_weights: WeightSource,
    /// The CLIP image encoder of Wan2.1 I2V and FLF2V (`None` for the other models).
    pub clip: Option<ClipModel>,
}

/// The CLIP image encoder's shape and weights.
#[derive(Debug, Clone)]
pub struct ClipModel {
    pub config: ClipConfig,
    pub weights: WeightSource,
}

impl ModelSet {
    /// The VAE of `kind`'s release.
    pub fn released_vae(kind: ModelKind) -> VaeSpec {
        if kind.uses_wan22_vae() {
            VaeSpec::Wan22(Vae22Config::wan22())
        } else {
            VaeSpec::Wan21(VaeConfig::wan21())
        }
    }
}

/// Text-to-video generation with a Wan model.
#[derive(Debug, Clone)]
pub struct Pipeline {
    models: ModelSet,
    tokenizer: PromptTokenizer,
    attention: AttentionConfig,
    /// Whether the DiT's block linears run in W8A8 (a `-quant` checkpoint always does).
    quant_linear: QuantPolicy,
    /// Where the text encoder runs.
    text_encoder_device: TextEncoderDevice,
    /// Device bytes a stage may use; `None`: what the device has free when a run starts.
    memory_budget: Option<u64>,
    /// Decode in these tiles; `None`: untiled unless the budget asks for tiles.
    vae_tiling: Option<VaeTiling>,
    device: Device,
    dtype: DType,
    /// LoRA adapters merged into the DiT when it loads.
    loras: DitLoras,
    /// Which models stay loaded between requests.
    residency: Residency,
    /// The models kept loaded, shared by the pipeline's clones (a clone with other settings
    /// reloads a DiT that no longer fits them).
    residents: Arc<Residents>,
    /// The ranks of a multi-GPU run (one device by default).
    ranks: Ranks,
}

/// Where the umT5 text encoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum TextEncoderDevice {
    /// On the pipeline's device: reading one block of weights at a time (about 0.4 GB of
    /// umT5-XXL in bf16 resident, not 11 GB), or whole and kept there with
    /// [`Residency::text_encoder`] (11 GB, counted in every stage's memory estimate).
    #[default]
    Pipeline,
    /// On the CPU: the device holds no text-encoder weight; the context is moved to the device
    /// after. Slower (seconds to a minute per prompt), for cards where even a block is too much.
    Cpu,
}

/// Builds a [`Pipeline`] over the released files.
#[derive(Debug, Clone)]
pub struct PipelineBuilder {
    kind: ModelKind,
    checkpoint_dir: Option<PathBuf>,
    files: Option<ModelFiles>,
    attention: AttentionConfig,
    quant_linear: bool,
    text_encoder_device: TextEncoderDevice,
    residency: Residency,
    memory_budget: Option<u64>,
    vae_tiling: Option<VaeTiling>,
    device: Device,
    dtype: DType,
    loras: DitLoras,
    ranks: Ranks,
}

impl PipelineBuilder {
    /// LoRA adapters for the DiT (per expert for Wan2.2 A14B); see [`Pipeline::set_loras`].
    pub fn loras(mut self, loras: DitLoras) -> Self {
        self.loras = loras;
        self
    }

    /// A folder holding the upstream file names (see [`ModelFiles::find`]).
    pub fn checkpoint_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.checkpoint_dir = Some(dir.into());
        self
    }

    /// Explicit file paths, instead of a folder.
    pub fn files(mut self, files: ModelFiles) -> Self {
        self.files = Some(files);
        self
    }

    /// The self-attention backend (default `sagesla:0.1`, as TurboDiffusion).
    pub fn attention(mut self, kind: AttentionKind) -> Self {
        self.attention.kind = kind;
        self
    }

    pub fn attention_blocks(mut self, blocks: BlockSizes) -> Self {
        self.attention.blocks = blocks;
        self
    }

    /// Run the DiT's block linears in W8A8: prefer the `-quant` release when looking in a
    /// folder, and quantise a bf16 checkpoint at load.
    pub fn quant_linear(mut self, quant: bool) -> Self {
        self.quant_linear = quant;
        self
    }

    /// Runs the text encoder on the CPU (`true`) rather than on the pipeline's device (the
    /// default, streaming its blocks).
    pub fn text_encoder_on_cpu(mut self, on_cpu: bool) -> Self {
        self.text_encoder_device = text_encoder_device(on_cpu);
        self
    }

    /// Keeps the models `residency` names loaded from the first request that needs them on
    /// (default [`Residency::NONE`]): later requests read none of their weights, and every
    /// stage's memory estimate counts them (see [`Pipeline::with_residency`]).
    pub fn residency(mut self, residency: Residency) -> Self {
        self.residency = residency;
        self
    }

    /// The device bytes any one stage may use (see [`Pipeline::estimate_memory`]). Without
    /// it, a CUDA pipeline takes what the device has available when a run starts; a CPU
    /// pipeline checks nothing.
    pub fn memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = Some(bytes);
        self
    }

    /// Decodes in spatial tiles of this size, whatever the budget (by default the decode is
    /// tiled only when the untiled estimate exceeds the budget). The video is the same up to
    /// float rounding.
    pub fn vae_tiling(mut self, tiling: VaeTiling) -> Self {
        self.vae_tiling = Some(tiling);
        self
    }

    /// The device the pipeline computes on (default the CPU). On CUDA, building the pipeline
    /// lets the device's memory pool keep freed memory for reuse
    /// ([`turbo_core::keep_freed_memory`]) and starts loading candle's kernels on another
    /// thread (`turbo_core::cuda::compile_candle_kernels_ahead`).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Runs on the ranks of `comm`, this process (or thread) being `comm.rank()`; see
    /// [`Pipeline::with_communicator`]. The device should be this rank's own GPU (`cuda:LOCAL_RANK`,
    /// `NcclCommunicator::device`).
    pub fn communicator(mut self, comm: SharedCommunicator) -> Self {
        self.ranks = Ranks::new(comm);
        self
    }

    /// Compute dtype of the DiT's linears and the text encoder (default bf16).
    pub fn dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn build(self) -> Result<Pipeline> {
        self.attention.kind.validate()?;
        let files = match (self.files, &self.checkpoint_dir) {
            (Some(files), _) => files,
            (None, Some(dir)) => ModelFiles::find(dir, self.kind, self.quant_linear)?,
            (None, None) => {
                return Err(Error::InvalidConfig {
                    field: "checkpoints".into(),
                    reason: "give a checkpoint folder or explicit files".into(),
                })
            }
        };
        let dit = self.kind.dit_config();
        prepare_device(&self.device)?;
        Pipeline {
            tokenizer: fit_tokenizer(PromptTokenizer::from_file(&files.tokenizer)?, &dit),
            models: ModelSet {
                dit,
                dit_weights: WeightSource::File(files.dit),
                dit_low_noise_weights: files.dit_low_noise.map(WeightSource::File),
                text_encoder: Umt5Config::umt5_xxl(),
                text_encoder_weights: WeightSource::File(files.text_encoder),
                vae: ModelSet::released_vae(self.kind),
                vae_weights: WeightSource::File(files.vae),
                clip: files.clip.map(|path| ClipModel {
                    config: ClipConfig::vit_h14(),
                    weights: WeightSource::File(path),
                }),
            },
            attention: self.attention,
            quant_linear: quant_policy(self.quant_linear),
            text_encoder_device: self.text_encoder_device,
            residency: self.residency,
            memory_budget: self.memory_budget,
            vae_tiling: self.vae_tiling,
            device: self.device,
            dtype: self.dtype,
            loras: DitLoras::default(),
            residents: Arc::default(),
            ranks: self.ranks,
        }
        .with_loras(self.loras)
    }
}

/// Readies a pipeline's device: its memory pool keeps freed memory, and on CUDA the driver
/// JIT-compiles candle's kernel modules on another thread while the first request reads its
/// weights, instead of in the first stage that needs each.
fn prepare_device(device: &Device) -> Result<()> {
    turbo_core::keep_freed_memory(device)?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        if let Err(error) = turbo_core::cuda::compile_candle_kernels_ahead(cuda) {
            tracing::warn!("could not start loading candle's kernels ahead: {error}");
        }
    }
    Ok(())
}

/// The tokenizer with its limit lowered to the DiT's text length when that is shorter (the
/// demo's 64 tokens): a longer prompt is then cut, with a warning, as upstream cuts at 512,
/// instead of failing in the DiT after the text encoder ran.
fn fit_tokenizer(tokenizer: PromptTokenizer, dit: &WanConfig) -> PromptTokenizer {
    let limit = tokenizer.max_tokens().min(dit.text_len);
    tokenizer.with_max_tokens(limit)
}

fn text_encoder_device(on_cpu: bool) -> TextEncoderDevice {
    if on_cpu {
        TextEncoderDevice::Cpu
    } else {
        TextEncoderDevice::Pipeline
    }
}

fn quant_policy(quant: bool) -> QuantPolicy {
    if quant {
        QuantPolicy::Quantize
    } else {
        QuantPolicy::KeepFloat
    }
}

impl Pipeline {
    /// Starts building a pipeline for the released `kind`.
    ///
    /// With the released files in a folder (their upstream names, see [`ModelFiles::find`],
    /// or the `.safetensors` files `examples/convert` writes), and an output checked before
    /// any work is done:
    ///
    /// ```no_run
    /// use turbodiffusion::pipeline::ModelKind;
    /// use turbodiffusion::video::{Existing, Mp4Options, OutputFile};
    /// use turbodiffusion::{Pipeline, T2vRequest};
    ///
    /// # fn main() -> turbodiffusion::Result<()> {
    /// let pipeline = Pipeline::builder(ModelKind::Wan21T2V1_3B)
    ///     .checkpoint_dir("ckpts")
    ///     .attention("sagesla:0.1".parse()?)
    ///     .quant_linear(true)
    ///     .build()?;
    /// let output = OutputFile::new("fox.mp4", Existing::Refuse)?;
    /// // Every weight file is opened and key-checked, and every setting validated, before the
    /// // text encoder runs.
    /// let video = pipeline.text_to_video(&T2vRequest::new("a red fox running through snow"))?;
    /// output.write(&video, Mp4Options::default())?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(kind: ModelKind) -> PipelineBuilder {
        PipelineBuilder {
            kind,
            checkpoint_dir: None,
            files: None,
            attention: AttentionConfig::new(AttentionKind::SageSla {
                topk: turbo_core::DEFAULT_SLA_TOPK,
            }),
            quant_linear: false,
            text_encoder_device: TextEncoderDevice::Pipeline,
            residency: Residency::NONE,
            memory_budget: None,
            vae_tiling: None,
            device: Device::Cpu,
            dtype: DType::BF16,
            loras: DitLoras::default(),
            ranks: Ranks::default(),
        }
    }

    /// A pipeline over any model set (tiny custom models, random weights).
    pub fn from_parts(
        models: ModelSet,
        tokenizer: PromptTokenizer,
        attention: AttentionConfig,
        device: Device,
        dtype: DType,
    ) -> Result<Self> {
        attention.kind.validate()?;
        prepare_device(&device)?;
        Ok(Self {
            tokenizer: fit_tokenizer(tokenizer, &models.dit),
            models,
            attention,
            quant_linear: QuantPolicy::KeepFloat,
            text_encoder_device: TextEncoderDevice::Pipeline,
            residency: Residency::NONE,
            memory_budget: None,
            vae_tiling: None,
            device,
            dtype,
            loras: DitLoras::default(),
            residents: Arc::default(),
            ranks: Ranks::default(),
        })
    }

    /// Limits every stage to `bytes` of device memory (see [`PipelineBuilder::memory_budget`]).
    pub fn with_memory_budget(mut self, bytes: u64) -> Self {
        self.memory_budget = Some(bytes);
        self
    }

    /// Decodes in spatial tiles of this size (see [`PipelineBuilder::vae_tiling`]).
    pub fn with_vae_tiling(mut self, tiling: VaeTiling) -> Self {
        self.vae_tiling = Some(tiling);
        self
    }

    /// Runs the text encoder on the CPU (`true`) or on the pipeline's device (`false`).
    pub fn with_text_encoder_on_cpu(mut self, on_cpu: bool) -> Self {
        self.text_encoder_device = text_encoder_device(on_cpu);
        self
    }

    /// Keeps the models `residency` names loaded between requests, from the first request
    /// that needs each on. The pipeline's clones share them: a clone whose DiT settings differ
    /// (another attention backend, W8A8, dtype) drops the resident DiT and loads its own in
    /// its place, and one with other LoRA adapters switches them in the resident weights.
    ///
    /// Every stage's memory estimate counts the resident models besides the stage's own, and
    /// a run whose stage would not fit the budget with them fails before any work with
    /// [`Error::MemoryBudgetExceeded`] (its help names the residency); residents are never
    /// dropped to make room. Dropping the pipeline and its clones frees them.
    ///
    /// With W8A8 on a float checkpoint, a resident DiT is quantised once without adapters and
    /// runs LoRAs as a low-rank term beside the int8 GEMM (as a `-quant` checkpoint does),
    /// where a streamed load merges them before quantising: the videos differ within W8A8's
    /// error, and a full weight difference (`diff`) cannot apply to it.
    pub fn with_residency(mut self, residency: Residency) -> Self {
        self.residency = residency;
        self
    }

    /// Runs every request on the ranks of `comm` together, this pipeline being rank
    /// `comm.rank()` (every rank builds its pipeline on its own device and calls the same
    /// methods with the same request, in the same order):
    ///
    /// - each rank encodes the prompts (and the image) itself: the text encoder streams its
    ///   blocks, so this costs each GPU about 0.4 GB, and it needs no exchange;
    /// - the DiT runs split as [`DitSplit`] says: a guided teacher on an even number of ranks
    ///   CFG-parallel (conditional pass on the first half of the ranks, unconditional on the
    ///   second, each half sequence parallel from four ranks on), everything else sequence
    ///   parallel (each rank holds a shard of the tokens; its activation memory shrinks with the
    ///   shard, its weights do not);
    /// - the VAE (Wan2.1's, and Wan2.2's of TI2V-5B) decodes one band of latent rows per rank
    ///   and gathers the frames on every rank;
    /// - every rank returns the same [`Video`]; the `*_to_video_file` methods write the file on
    ///   rank 0 only, and on the other ranks write nothing and return the path asked for.
    ///
    /// The result equals the one-device run up to float rounding. A world size that leaves a
    /// rank without DiT tokens or latent rows fails with [`Error::TooManyRanks`] before any
    /// stage, and a check that fails on one rank only (its device's free memory) fails every
    /// rank before any work instead of leaving them waiting. [`Pipeline::estimate_memory`]
    /// gives one rank's peaks. A cancel from any rank's `Progress` after a step cancels all
    /// of them. A communicator of one rank is the one-device run.
    pub fn with_communicator(mut self, comm: SharedCommunicator) -> Self {
        self.ranks = Ranks::new(comm);
        self
    }

    /// This pipeline's rank (0 on one device).
    pub fn rank(&self) -> usize {
        self.ranks.rank()
    }

    /// The number of ranks the pipeline runs on (1 on one device).
    pub fn world_size(&self) -> usize {
        self.ranks.world_size()
    }

    /// The models kept loaded between requests.
    pub fn residency(&self) -> Residency {
        self.residency
    }

    /// The self-attention backend of the DiT (a resident DiT loaded with another backend is
    /// loaded again by the next run).
    pub fn with_attention(mut self, kind: AttentionKind) -> Result<Self> {
        kind.validate()?;
        self.attention.kind = kind;
        Ok(self)
    }

    /// Runs the DiT's block linears in W8A8 (quantising float checkpoints at load) or not.
    pub fn with_quant_linear(mut self, quant: bool) -> Self {
        self.quant_linear = quant_policy(quant);
        self
    }

    pub fn models(&self) -> &ModelSet {
        &self.models
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// Generates a video for `request`.
    pub fn text_to_video(&self, request: &T2vRequest) -> Result<Video> {
        self.text_to_video_with_progress(request, &mut NoProgress)
    }

    /// The peak device memory each stage of `request` is expected to need, from the model
    /// configurations, the request's size and length, the dtype, W8A8 and the attention
    /// backend. A run checks it against the memory budget before loading anything and fails
    /// with [`Error::MemoryBudgetExceeded`] if a stage does not fit.
    pub fn estimate_memory(&self, request: &T2vRequest) -> Result<MemoryEstimate> {
        let plan = self.plan(request)?;
        Ok(self.plan_memory(&plan, &request.prompt, false)?.0)
    }

    /// [`Pipeline::text_to_video`], reporting every stage and sampling step to `progress`.
    /// Every setting, and the memory estimate against the budget, is checked before any model
    /// is loaded.
    pub fn text_to_video_with_progress(
        &self,
        request: &T2vRequest,
        progress: &mut dyn Progress,
    ) -> Result<Video> {
        let plan = self.plan(request)?;
        let mut frames = plan.memory_frames();
        self.generate(&plan, request, &mut frames, progress)?;
        frames.into_video()
    }

    /// [`Pipeline::text_to_video_with_progress`], writing the video to `output` as it is
    /// decoded: an MP4 encodes each finished keyframe interval on other threads while the VAE
    /// decodes the next frames, so little of the encoding is left when the decode ends (the
    /// [`Stage::WritingVideo`] report times it). Returns the path written (another one for
    /// [`turbo_video::Existing::NextFree`]). Nothing is at the path unless the run succeeds.
    pub fn text_to_video_file(
        &self,
        request: &T2vRequest,
        output: &OutputFile,
        options: Mp4Options,
        progress: &mut dyn Progress,
    ) -> Result<PathBuf> {
        let plan = self.plan(request)?;
        output.check_fps(plan.fps)?;
        if !self.ranks.writes_output() {
            self.generate(&plan, request, &mut DiscardedFrames, progress)?;
            return Ok(output.path().to_path_buf());
        }
        let mut frames = plan.file_frames(output, options);
        self.generate(&plan, request, &mut frames, progress)?;
        frames.finish(progress)
    }

    /// Runs a planned text-to-video, handing the frames to `frames` as they are decoded.
    fn generate(
        &self,
        plan: &Plan,
        request: &T2vRequest,
        frames: &mut dyn FrameSink,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let memory = self.preflight(plan, &request.prompt, false)?;
        let (context, negative) = self.encode_prompts(&request.prompt, &plan.denoise, progress)?;
        let latent = self.denoise(
            &plan.denoise,
            &DitCondition::text(context),
            negative.map(DitCondition::text).as_ref(),
            None,
            request.seed,
            progress,
        )?;
        self.latent_to_frames(plan, &latent, memory.vae_tiling, frames, progress)
    }

    /// The checks before any work: the memory estimate against the budget and every weight
    /// file's tensor list, on every rank (see [`Ranks::agree`]).
    fn preflight(&self, plan: &Plan, prompt: &str, image: bool) -> Result<MemoryEstimate> {
        let local = self.checked_memory(plan, prompt, image).and_then(|memory| {
            self.check_weight_files(&plan.denoise.dits)?;
            Ok(memory)
        });
        self.ranks.agree(&self.device, local)
    }

    /// Checks the sampled latent and decodes it into `frames`.
    fn latent_to_frames(
        &self,
        plan: &Plan,
        latent: &Tensor,
        tiling: Option<VaeTiling>,
        frames: &mut dyn FrameSink,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let steps = plan.denoise.sampler.timesteps().len();
        checks::ensure_finite(latent, &Stage::Denoising { steps }, "the sampled latent")?;
        self.decode(latent, tiling, steps, frames, progress)
    }

    /// Everything a text-to-video request needs, validated: one DiT, or the two Wan2.2
    /// T2V-A14B experts switched at their boundary.
    fn plan(&self, request: &T2vRequest) -> Result<Plan> {
        if !matches!(self.models.dit.model_type, ModelType::T2v | ModelType::Ti2v) {
            return Err(Error::InvalidConfig {
                field: "model".into(),
                reason: "this pipeline holds an image-to-video model; text_to_video needs a T2V \
                         or TI2V model"
                    .into(),
            });
        }
        if request.prompt.trim().is_empty() {
            return Err(Error::EmptyPrompt);
        }
        let attention = self.request_attention(request)?;
        let dits = match self.models.dit_low_noise_weights {
            Some(_) => DitPlan::Experts {
                boundary: ExpertBoundary::new(T2V_A14B_BOUNDARY)?,
                attention: [attention; 2],
            },
            None => DitPlan::Single(attention),
        };
        self.plan_video(request, request.geometry()?, dits, T2V_SIGMA_MAX)
    }

    /// The plan of `video`'s sampler and size over `dits` (rCM's σ_max defaulting to
    /// `sigma_max`), with the size checked against the VAE.
    fn plan_video(
        &self,
        video: &T2vRequest,
        geometry: turbo_core::VideoGeometry,
        dits: DitPlan,
        sigma_max: f64,
    ) -> Result<Plan> {
        let vae = &self.models.vae;
        vae.check_frame_size(geometry.size)?;
        if matches!(vae, VaeSpec::Wan22(_)) && self.vae_tiling.is_some() {
            return Err(vae::tiling_unsupported());
        }
        let sampler = PlannedSampler::new(&video.sampler, sigma_max, &dits, video.expert_guidance)?;
        let split = DitSplit::choose(self.ranks.world_size(), sampler.negative_prompt().is_some());
        self.check_split(split, geometry)?;
        Ok(Plan {
            geometry,
            denoise: DenoisePlan::new(
                sampler,
                dits,
                video.sla_topk_schedule.as_deref(),
                vae.latent_shape(geometry).dims().to_vec(),
                split,
            )?,
            fps: Fps::new(video.fps)?,
        })
    }

    /// The pipeline's attention with the request's top-k, if it gives one.
    fn request_attention(&self, request: &T2vRequest) -> Result<AttentionConfig> {
        let mut attention = self.attention;
        if let Some(topk) = request.sla_topk {
            attention.kind = with_topk(attention.kind, topk)?;
        }
        Ok(attention)
    }

    /// The text contexts of the prompt and, for the guided sampling of `plan`, of its negative
    /// prompt, on the pipeline's device. The encoder reads one block of weights at a time (on
    /// the device the pipeline says), runs both prompts through it, and holds none after.
    /// Meanwhile another thread reads the first DiT's file into the page cache, so that the
    /// load that follows the encoder copies from memory, not from the disk (unless the DiT is
    /// resident: then nothing is read).
    fn encode_prompts(
        &self,
        prompt: &str,
        plan: &DenoisePlan,
        progress: &mut dyn Progress,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let meter = StageMeter::start(&self.device)?;
        progress.stage(&Stage::EncodingText);
        let dit_read = self.prefetch_dit(plan.dits, plan.first_expert());
        let bytes = WeightBytes::default();
        let texts = std::iter::once(prompt).chain(plan.sampler.negative_prompt());
        let contexts = self.encode_texts(texts, &bytes)?;
        for context in &contexts {
            checks::ensure_finite(context, &Stage::EncodingText, "the text context")?;
        }
        let mut contexts = contexts.into_iter();
        let contexts = (
            contexts.next().expect("one context per text"),
            contexts.next(),
        );
        meter.finish(Stage::EncodingText, bytes.get(), &self.device, progress)?;
        denoise::finish_prefetch(dit_read, "the DiT");
        Ok(contexts)
    }

    /// The f32 context `[L, dim]` of each text on the pipeline's device: from one pass of the
    /// streamed encoder over its weights (counted into `bytes`), or from the resident encoder.
    fn encode_texts<'t>(
        &self,
        texts: impl Iterator<Item = &'t str>,
        bytes: &WeightBytes,
    ) -> Result<Vec<Tensor>> {
        let device = match self.text_encoder_device {
            TextEncoderDevice::Pipeline => &self.device,
            TextEncoderDevice::Cpu => &Device::Cpu,
        };
        let ids = texts
            .map(|text| {
                let ids = self.tokenizer.encode(text)?.ids;
                Ok(Tensor::from_slice(&ids, (1, ids.len()), device)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let contexts = match self.residency.text_encoder {
            true => {
                let encoder = self.resident_text_encoder(device, bytes)?;
                ids.iter()
                    .map(|ids| encoder.forward(ids, None))
                    .collect::<Result<Vec<_>>>()?
            }
            false => {
                let weights = self.models.text_encoder_weights.open()?;
                let vb = weights.var_builder(self.dtype, device)?;
                let encoder =
                    StreamingUmt5Encoder::new(bytes.counting(vb), &self.models.text_encoder)?;
                // From a file, only the prompts' rows of the 2.1 GB embedding table are read.
                let encoder = match weights {
                    OpenedWeights::File(checkpoint) => {
                        let dtype = self.dtype;
                        encoder.with_embedding_rows(move |ids| {
                            checkpoint.rows(TOKEN_EMBEDDING_KEY, ids, dtype)
                        })
                    }
                    OpenedWeights::Random(_) => encoder,
                };
                let batches: Vec<_> = ids.iter().map(|ids| (ids, None)).collect();
                encoder.forward_many_observed(&batches, &mut || bytes.release())?
            }
        };
        contexts
            .into_iter()
            .map(|context| {
                Ok(context
                    .squeeze(0)?
                    .to_dtype(DType::F32)?
                    .to_device(&self.device)?)
            })
            .collect()
    }

    /// The resident text encoder on `device`, loaded whole by the first call (its weights
    /// counted into `bytes` then; a later call reads nothing).
    fn resident_text_encoder(
        &self,
        device: &Device,
        bytes: &WeightBytes,
    ) -> Result<Arc<Umt5Encoder>> {
        let load = || {
            let vb = self
                .models
                .text_encoder_weights
                .open()?
                .var_builder(self.dtype, device)?;
            let encoder = Umt5Encoder::load(bytes.counting(vb), &self.models.text_encoder)?;
            Ok((encoder, bytes.get()))
        };
        Ok(resident_or_load("the text encoder", true, &self.residents.text_encoder, load)?.0)
    }

    /// Decodes a latent `[C, T, h, w]` (sampled in `steps` steps) into `frames` a chunk at a
    /// time as the VAE makes them (tiled: all at the end), each chunk checked for values that
    /// are not numbers and reported to `progress`, which may cancel between chunks. The VAE is
    /// dropped after, unless it is resident.
    fn decode(
        &self,
        latent: &Tensor,
        tiling: Option<VaeTiling>,
        steps: usize,
        frames: &mut dyn FrameSink,
        progress: &mut dyn Progress,
    ) -> Result<()> {
        let meter = StageMeter::start(&self.device)?;
        let total = (latent.dim(1)? - 1) * turbo_core::VAE_STRIDE.0 + 1;
        progress.stage(&Stage::Decoding { done: 0, total });
        let (vae, bytes) = self.load_vae()?;
        let latent = latent.to_dtype(self.dtype)?.unsqueeze(0)?;
        let mut hand_over = |decoded: &Tensor, done: usize| -> Result<()> {
            let stage = Stage::Decoding { done, total };
            checks::ensure_finite(decoded, &stage, "the decoded frames")?;
            frames.push(rgb_frames(&decoded.squeeze(0)?)?)?;
            progress.stage(&stage);
            match progress.poll_cancel() {
                ControlFlow::Continue(()) => Ok(()),
                ControlFlow::Break(()) => Err(Error::Cancelled {
                    completed: steps,
                    total: steps,
                }),
            }
        };
        match (self.ranks.several(), tiling) {
            (Some(comm), _) => hand_over(&vae.decode_parallel(&latent, comm)?, total)?,
            (None, Some(tiling)) => {
                tracing::info!(?tiling, "decoding in tiles");
                hand_over(&vae.decode_tiled(&latent, tiling)?, total)?;
            }
            (None, None) => vae.decode_streaming(&latent, |decoded| {
                let done = decoded.first_frame + decoded.frames.dim(2)?;
                hand_over(&decoded.frames, done)
            })?,
        }
        drop(vae);
        let stage = Stage::Decoding { done: total, total };
        meter.finish(stage, bytes, &self.device, progress)
    }

    /// The VAE and the bytes of the weights read for it (0 when it was resident), in the
    /// pipeline's dtype: TurboDiffusion runs the VAE in bf16 (the official Wan code in f32;
    /// an f32 pipeline does that).
    fn load_vae(&self) -> Result<(Arc<vae::LoadedVae>, u64)> {
        let load = || {
            let bytes = WeightBytes::default();
            let vb = self.var_builder(&self.models.vae_weights, self.dtype)?;
            let vae = self.models.vae.load(bytes.counting(vb))?;
            Ok((vae, bytes.get()))
        };
        resident_or_load("the VAE", self.residency.vae, &self.residents.vae, load)
    }

    fn var_builder(
        &self,
        source: &WeightSource,
        dtype: DType,
    ) -> Result<candle_nn::VarBuilder<'static>> {
        source.open()?.var_builder(dtype, &self.device)
    }
}

/// `kind` with its top-k fraction replaced (dense attention has none).
fn with_topk(kind: AttentionKind, topk: f64) -> Result<AttentionKind> {
    match kind {
        AttentionKind::Original => Ok(AttentionKind::Original),
        AttentionKind::Sla { .. } => AttentionKind::sla(topk),
        AttentionKind::SageSla { .. } => AttentionKind::sagesla(topk),
    }
}

/// A validated request.
struct Plan {
    geometry: turbo_core::VideoGeometry,
    denoise: DenoisePlan,
    fps: Fps,
}

impl Plan {
    /// A sink that keeps the run's frames for a [`Video`].
    fn memory_frames(&self) -> MemoryFrames {
        let size = self.geometry.size;
        MemoryFrames::new(size.width(), size.height(), self.fps)
    }

    /// A sink that writes the run's frames to `output` as they are decoded.
    fn file_frames<'o>(&self, output: &'o OutputFile, options: Mp4Options) -> FileFrames<'o> {
        let size = self.geometry.size;
        FileFrames::new(size.width(), size.height(), self.fps, output, options)
    }
}
