use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use turbo_attention::{Attention, AttentionKind, LoadAttention};
use turbo_core::parallel::{Communicator, SequenceParallel};
use turbo_core::{Denoiser, Error, Result, Timestep, PATCH_SIZE};

use super::attention::CrossContext;
use super::block::{modulate, LayerNorm, TimeRun, TimeRuns, WanBlock};
use super::embeddings::{PatchEmbedding, PatchLayout, TextEmbedding, TimeEmbedding, PATCH_VOLUME};
use super::image_embedding::ImageEmbedding;
use super::keys::BLOCK_LINEARS;
use super::rope::Rope3d;
use super::{linear, QuantPolicy, WanConfig};
use crate::lora::{LoraMode, LoraSummary, ScaledLora, Slot, Unadapted};

/// The largest model time (`1000 · s` at s = 1, pure noise).
const MAX_MODEL_TIME: f64 = 1000.0;

/// Where a block's self-attention backend keeps its weights (SLA's `proj_l`).
pub(crate) const ATTENTION_WEIGHTS: &str = "self_attn.attn_op.local_attn";

/// What the loader found in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointLayout {
    pub patch: PatchLayout,
    /// Per-block SLA `proj_l` weights are present (TurboDiffusion releases).
    pub has_proj_l: bool,
}

/// `head`: modulated LayerNorm and the projection to patches of `out_dim` channels, in f32.
#[derive(Debug, Clone)]
struct Head {
    /// `[1, 2, D]`: shift, scale.
    modulation: Tensor,
    norm: LayerNorm,
    proj: Linear,
}

impl Head {
    /// `vb` is `head`, in f32.
    fn load(vb: VarBuilder, cfg: &WanConfig) -> Result<Self> {
        Ok(Self {
            modulation: vb.get((1, 2, cfg.dim), "modulation")?,
            norm: LayerNorm::plain(cfg.eps),
            proj: linear(vb.pp("head"), cfg.dim, cfg.out_dim * PATCH_VOLUME)?,
        })
    }

    fn lora_slots(&mut self) -> Vec<(String, Slot<'_>)> {
        vec![
            ("head.modulation".into(), Slot::Tensor(&mut self.modulation)),
            ("head.head".into(), Slot::Plain(&mut self.proj)),
        ]
    }

    /// `x` `[1, L, D]` f32 and each run's raw time embedding `e` `[1, D]` (no SiLU) →
    /// `[1, L, 4·C]`.
    fn forward(&self, x: &Tensor, time: &TimeRuns) -> Result<Tensor> {
        let modulated = time.per_run(&[x], |i, rows| {
            let m = self
                .modulation
                .broadcast_add(&time.0[i].e.unsqueeze(1)?)?
                .chunk(2, 1)?;
            modulate(&self.norm, &rows[0], &m[0], &m[1], DType::F32)
        })?;
        Ok(self.proj.forward(&modulated)?)
    }
}

/// The Wan DiT (`WanModel`), generic over its self-attention backend.
///
/// `WanModel<Box<dyn Attention>>` (plain `WanModel`, the default) picks the backend at run
/// time from an [`turbo_attention::AttentionConfig`]; `WanModel<SlaAttention>` (or any other
/// [`LoadAttention`]) fixes it at compile time. Weights load from a `VarBuilder` whose dtype is
/// the compute dtype of the block linears and embeddings; the time embedding, modulation, norms,
/// residual stream and head stay f32, as upstream keeps them. The block linears are
/// [`turbo_quant::Linear`]s: float, or W8A8 int8 when the checkpoint stores them so or
/// [`WanModel::load_with_quant`] quantises them.
#[derive(Debug, Clone)]
pub struct WanModel<A = Box<dyn Attention>> {
    cfg: WanConfig,
    layout: CheckpointLayout,
    patch_embedding: PatchEmbedding,
    time_embedding: TimeEmbedding,
    text_embedding: TextEmbedding,
    /// `img_emb` of the Wan2.1 I2V / FLF2V models.
    image_embedding: Option<ImageEmbedding>,
    blocks: Vec<WanBlock<A>>,
    head: Head,
    /// The base values of the modules [`WanModel::set_loras`] has changed.
    unadapted: Unadapted,
}

impl<A: LoadAttention> WanModel<A> {
    /// Loads a DiT of shape `cfg` from `vb` (keys as in the official or TurboDiffusion layout,
    /// detected from `patch_embedding.weight`), each block's self-attention built from
    /// `attention`.
    ///
    /// `original` attention on a checkpoint with `proj_l` ignores those weights (logged once);
    /// `sla` / `sagesla` on a checkpoint without them (the official Wan releases) run with a
    /// zero `proj_l`: the linear branch is zero and each layer is SLA's sparse branch alone.
    ///
    /// Block linears stored in float stay in float; those stored as W8A8 int8 (`-quant` files)
    /// run in int8. [`WanModel::load_with_quant`] can also quantise float ones.
    pub fn load(vb: VarBuilder, cfg: &WanConfig, attention: &A::Config) -> Result<Self> {
        Self::load_with_quant(vb, cfg, attention, QuantPolicy::KeepFloat)
    }

    /// [`WanModel::load`], with TurboDiffusion's `--quant_linear` as `quant_linear`: with
    /// [`QuantPolicy::Quantize`], the block linears (q, k, v, o of both attentions, `ffn.0`,
    /// `ffn.2`; never `proj_l`, embeddings, head, modulation or norms) stored in float are
    /// quantised to W8A8 int8 at load. Block linears stored as int8 (`int8_weight` + `scale`,
    /// the `-quant` releases) are loaded as int8 whatever `quant_linear` says: unlike upstream,
    /// a mismatch between the setting and the file is not an error. One line through `tracing`
    /// says what was done.
    pub fn load_with_quant(
        vb: VarBuilder,
        cfg: &WanConfig,
        attention: &A::Config,
        quant_linear: QuantPolicy,
    ) -> Result<Self> {
        cfg.validate()?;
        let f32_vb = vb.to_dtype(DType::F32);
        let (patch_embedding, patch) = PatchEmbedding::load(vb.pp("patch_embedding"), cfg)?;
        let layout = CheckpointLayout {
            patch,
            has_proj_l: vb.contains_tensor(&format!("blocks.0.{ATTENTION_WEIGHTS}.proj_l.weight")),
        };
        let zero_linear_branch = A::weights(cfg.head_dim(), attention)
            .into_iter()
            .map(|(name, _)| format!("blocks.0.{ATTENTION_WEIGHTS}.{name}"))
            .any(|key| !vb.contains_tensor(&key));
        if zero_linear_branch {
            tracing::info!(
                "checkpoint has no SLA proj_l weights: the linear branch is zero (sparse branch only)"
            );
        }
        let blocks = (0..cfg.num_layers)
            .map(|i| WanBlock::load(vb.pp("blocks").pp(i), cfg, attention, quant_linear))
            .collect::<Result<Vec<_>>>()?;
        let model = Self {
            cfg: cfg.clone(),
            layout,
            patch_embedding,
            time_embedding: TimeEmbedding::load(f32_vb.clone(), cfg)?,
            text_embedding: TextEmbedding::load(vb.pp("text_embedding"), cfg)?,
            image_embedding: cfg
                .model_type
                .uses_clip()
                .then(|| ImageEmbedding::load(vb.pp("img_emb"), cfg))
                .transpose()?,
            blocks,
            head: Head::load(f32_vb.pp("head"), cfg)?,
            unadapted: Unadapted::default(),
        };
        let stored_int8 = (0..cfg.num_layers)
            .flat_map(|i| BLOCK_LINEARS.map(|linear| format!("blocks.{i}.{linear}.int8_weight")))
            .filter(|key| vb.contains_tensor(key))
            .count();
        model.log_linear_precision(stored_int8, quant_linear);
        if layout.has_proj_l && model.attention_kind() == Some(AttentionKind::Original) {
            tracing::info!(
                "checkpoint has SLA proj_l weights; `original` attention does not use them"
            );
        }
        Ok(model)
    }
}

impl<A> WanModel<A> {
    /// How many block linears run in W8A8 int8 (stored so, or quantised at load).
    pub fn int8_linears(&self) -> usize {
        self.block_linears().filter(|l| l.is_int8()).count()
    }

    fn block_linears(&self) -> impl Iterator<Item = &turbo_quant::Linear> {
        self.blocks.iter().flat_map(WanBlock::linears)
    }

    /// Quantises every float block linear to W8A8 int8 (as [`QuantPolicy::Quantize`] does at
    /// load): after [`WanModel::apply_loras`] in [`LoraMode::Merge`], this merges adapters into
    /// a float checkpoint *before* quantising it.
    pub fn quantize_block_linears(&mut self) -> Result<()> {
        for linear in self.blocks.iter_mut().flat_map(WanBlock::linears_mut) {
            *linear = linear.quantized()?;
        }
        Ok(())
    }

    /// Applies `loras` (each at its strength) in place: float tensors merged, int8 block
    /// linears given a run-time low-rank term (see [`crate::lora`]). Every adapter is checked
    /// against the model before anything changes: a target the model does not have (for a
    /// strict adapter) or a shape that does not fit is an [`Error::Lora`] naming the file and
    /// the keys, and leaves the model as it was.
    pub fn apply_loras(&mut self, loras: &[ScaledLora], mode: LoraMode) -> Result<LoraSummary> {
        let summary = crate::lora::apply_loras(self.lora_slots(), loras, mode)?;
        tracing::info!(
            "{} LoRA(s): {} modules merged, {} linears with a run-time low-rank term",
            loras.len(),
            summary.merged,
            summary.low_rank
        );
        Ok(summary)
    }

    /// Sets the adapters of a resident model, replacing those set before: the model starts from
    /// its unadapted values (kept since the first call), so switching adapters or strengths
    /// reads nothing from disk and gives exactly what a fresh load with `loras` applied gives.
    /// An empty `loras` puts the base model back and frees the kept values. Errors as
    /// [`WanModel::apply_loras`]; after one, the model is left without adapters.
    pub fn set_loras(&mut self, loras: &[ScaledLora], mode: LoraMode) -> Result<LoraSummary> {
        let mut unadapted = std::mem::take(&mut self.unadapted);
        unadapted.restore(self.lora_slots());
        unadapted.save_targets(self.lora_slots(), loras);
        self.unadapted = unadapted;
        self.apply_loras(loras, mode)
    }

    /// Whether adapters set by [`WanModel::set_loras`] are active.
    pub fn has_loras(&self) -> bool {
        !self.unadapted.is_empty()
    }

    /// Every tensor a LoRA can change, by checkpoint key (without `.weight` / `.bias`).
    fn lora_slots(&mut self) -> Vec<(String, Slot<'_>)> {
        let mut slots = self.text_embedding.lora_slots();
        slots.extend(self.time_embedding.lora_slots());
        slots.extend(self.head.lora_slots());
        if let Some(image_embedding) = &mut self.image_embedding {
            slots.extend(image_embedding.lora_slots());
        }
        for (i, block) in self.blocks.iter_mut().enumerate() {
            slots.extend(block.lora_slots(&format!("blocks.{i}")));
        }
        slots
    }

    /// One summary line for all block linears (`turbo_quant::Linear` logs each at debug level).
    fn log_linear_precision(&self, stored_int8: usize, quant_linear: QuantPolicy) {
        let total = self.block_linears().count();
        let int8 = self.int8_linears();
        if int8 == 0 {
            tracing::debug!("all {total} block linears in float");
        } else {
            tracing::info!(
                "{int8} of {total} block linears run in W8A8 int8: {stored_int8} stored as int8 \
                 in the checkpoint, {} quantised at load (quant_linear: {quant_linear:?})",
                int8 - stored_int8
            );
        }
    }
}

impl<A: Attention> WanModel<A> {
    pub fn config(&self) -> &WanConfig {
        &self.cfg
    }

    pub fn layout(&self) -> CheckpointLayout {
        self.layout
    }

    /// The self-attention backend of the blocks (`None` for a model without blocks).
    pub fn attention_kind(&self) -> Option<AttentionKind> {
        self.blocks.first().map(|b| b.attention_kind())
    }

    /// Sets the SLA / SageSLA top-k fraction of every block's self-attention for the forwards
    /// that follow (a top-k schedule changes it between denoising steps). Fails with
    /// [`Error::InvalidTopk`] outside (0, 1], before any block is changed. Dense attention
    /// has no top-k and is left as it is.
    pub fn set_attention_topk(&mut self, topk: f64) -> Result<()> {
        AttentionKind::sla(topk)?;
        self.blocks
            .iter_mut()
            .try_for_each(|block| block.set_attention_topk(topk))
    }

    /// The flow-matching velocity for latent `x` `[C, F, H, W]` (C = `out_dim`) at model time `t`
    /// (0..1000) for every token, conditioned on `context` `[L_text ≤ text_len, text_dim]` and,
    /// for the I2V models, on `condition` `[in_dim − C, F, H, W]` (mask and image latent).
    /// Returns f32 `[C, F, H, W]`. The Wan2.1 I2V / FLF2V models also need CLIP tokens: see
    /// [`WanModel::forward_with`].
    ///
    /// A batched `x` (rank 5), `H` or `W` not even, `t` outside `[0, 1000]` (or not finite), or
    /// a context of another width or longer than `text_len` is a typed error naming the input
    /// ([`Error::Shape`], [`Error::OutOfRange`]).
    pub fn forward(
        &self,
        x: &Tensor,
        t: f64,
        context: &Tensor,
        condition: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_with(x, &TokenTimesteps::Uniform(t), context, condition, None)
    }

    /// [`WanModel::forward`] with a timestep per token and the CLIP tokens of the Wan2.1 I2V /
    /// FLF2V models: `clip` is `[1, N, 1280]` (I2V: 257 tokens of the image) or `[2, N, 1280]`
    /// (FLF2V: the first and the last frame's), as [`crate::ClipVisionEncoder`] returns them.
    /// Upstream's per-token timesteps (Wan2.2, `spec/wan-model.md` §2.6) are `timesteps`:
    /// TI2V's image mode is [`TokenTimesteps::HeldFrames`].
    ///
    /// CLIP tokens for a model without `img_emb`, none for one with it, or per-token timesteps
    /// that do not cover the tokens are typed errors, as are the inputs
    /// [`WanModel::forward`] rejects.
    pub fn forward_with(
        &self,
        x: &Tensor,
        timesteps: &TokenTimesteps,
        context: &Tensor,
        condition: Option<&Tensor>,
        clip: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_sharded(x, timesteps, context, condition, clip, None)
    }

    /// [`WanModel::forward_with`] on the ranks of `comm`, Ulysses sequence parallel: every
    /// rank is given the same inputs and returns the same whole velocity, computing the blocks
    /// for its shard of the tokens only (see [`turbo_core::parallel::SequenceParallel`]). The
    /// result equals the one-device forward up to float rounding; SLA and SageSLA stay exact
    /// because each rank attends over all tokens of its heads.
    ///
    /// Shards start at multiples of 128 tokens for a model with W8A8 linears (the activation
    /// tiles are then those of one device), anywhere otherwise. A video with fewer token
    /// shards than ranks is an [`Error::InvalidConfig`]. On a communicator of one rank this is
    /// exactly [`WanModel::forward_with`].
    pub fn forward_sequence_parallel(
        &self,
        x: &Tensor,
        timesteps: &TokenTimesteps,
        condition: &DitCondition,
        comm: &dyn Communicator,
    ) -> Result<Tensor> {
        self.forward_sharded(
            x,
            timesteps,
            &condition.context,
            condition.image.as_ref(),
            condition.clip.as_ref(),
            (comm.world_size() > 1).then_some(comm),
        )
    }

    /// Token shards of an int8 model start on W8A8's 128-row activation tiles.
    fn token_alignment(&self) -> usize {
        if self.int8_linears() > 0 {
            turbo_quant::TILE
        } else {
            1
        }
    }

    /// The sequence-parallel plan of `tokens` tokens over `comm`, every rank given some.
    fn sequence_plan<'c>(
        &self,
        comm: &'c dyn Communicator,
        tokens: usize,
    ) -> Result<SequenceParallel<'c>> {
        let sp = SequenceParallel::new(comm, tokens, self.token_alignment())?;
        if (0..comm.world_size()).any(|rank| sp.tokens().is_empty(rank)) {
            return Err(Error::InvalidConfig {
                field: "sequence parallel world size".into(),
                reason: format!(
                    "{tokens} DiT tokens in shards of {} leave some of the {} ranks none: \
                     use fewer GPUs for this video size",
                    self.token_alignment(),
                    comm.world_size()
                ),
            });
        }
        Ok(sp)
    }

    fn forward_sharded(
        &self,
        x: &Tensor,
        timesteps: &TokenTimesteps,
        context: &Tensor,
        condition: Option<&Tensor>,
        clip: Option<&Tensor>,
        comm: Option<&dyn Communicator>,
    ) -> Result<Tensor> {
        self.check_forward_inputs(x, context)?;
        let (_, frames, height, width) = x.dims4()?;
        let (pt, ph, pw) = PATCH_SIZE;
        let grid = (frames / pt, height / ph, width / pw);
        let runs = timesteps.runs(grid)?;
        let input = self.model_input(x, condition)?;
        let tokens = self.patch_embedding.forward(&input)?.to_dtype(DType::F32)?;
        let time = TimeRuns(
            runs.into_iter()
                .map(|(tokens, t)| {
                    let (e, e0) = self.time_embedding.forward(t, x.device())?;
                    Ok(TimeRun { tokens, e, e0 })
                })
                .collect::<Result<Vec<_>>>()?,
        );
        let text = self.text_embedding.forward(context)?;
        let image = match (&self.image_embedding, clip) {
            (Some(embedding), Some(clip)) => Some(embedding.forward(clip, text.dtype())?),
            (None, None) => None,
            (Some(_), None) => {
                return Err(Error::Shape {
                    what: "CLIP image tokens of a Wan2.1 I2V / FLF2V model (`clip`)".into(),
                    expected: format!("[1 or 2, N, {}]", super::CLIP_DIM),
                    got: vec![],
                })
            }
            (None, Some(clip)) => {
                return Err(Error::Shape {
                    what: "CLIP image tokens given to a model without `img_emb`".into(),
                    expected: "no CLIP tokens".into(),
                    got: clip.dims().to_vec(),
                })
            }
        };
        let context = CrossContext { text, image };
        let rope = Rope3d::new(grid, self.cfg.head_dim(), x.device())?;
        let sp = comm
            .map(|comm| self.sequence_plan(comm, tokens.dim(1)?))
            .transpose()?;
        let (tokens, time, rope) = match &sp {
            None => (tokens, time, rope),
            Some(sp) => (
                sp.shard_tokens(&tokens, 1)?,
                time.shard(sp.local_tokens()),
                rope.rows(sp.local_tokens())?,
            ),
        };
        let hidden = self.blocks.iter().try_fold(tokens, |h, block| {
            block.forward(&h, &time, &context, &rope, sp.as_ref())
        })?;
        let patches = self.head.forward(&hidden, &time)?;
        let patches = match &sp {
            None => patches,
            Some(sp) => sp.gather_tokens(&patches, 1)?,
        };
        self.unpatchify(&patches, grid)
    }

    /// The contract of [`WanModel::forward_with`] on `x` and `context`, checked before any
    /// work.
    fn check_forward_inputs(&self, x: &Tensor, context: &Tensor) -> Result<()> {
        let (_, ph, pw) = PATCH_SIZE;
        let unbatched = match x.dims() {
            &[_, _, h, w] => h % ph == 0 && w % pw == 0 && h > 0 && w > 0,
            _ => false,
        };
        if !unbatched {
            return Err(Error::Shape {
                what: "DiT input latent `x` (one unbatched latent; H and W even)".into(),
                expected: format!("[{}, F, H, W]", self.cfg.out_dim),
                got: x.dims().to_vec(),
            });
        }
        match context.dims() {
            &[len, dim] if (1..=self.cfg.text_len).contains(&len) && dim == self.cfg.text_dim => {
                Ok(())
            }
            got => Err(Error::Shape {
                what: "DiT text context".into(),
                expected: format!("[1..={}, {}]", self.cfg.text_len, self.cfg.text_dim),
                got: got.to_vec(),
            }),
        }
    }

    /// `x` alone for T2V, `cat[x, condition]` on channels for I2V.
    fn model_input(&self, x: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let (c, f, h, w) = x.dims4()?;
        if c != self.cfg.out_dim {
            return Err(Error::Shape {
                what: "DiT input latent `x`".into(),
                expected: format!("[{}, F, H, W]", self.cfg.out_dim),
                got: x.dims().to_vec(),
            });
        }
        let image_channels = self.cfg.model_type.has_image_channels();
        match (image_channels, condition) {
            (false, None) => Ok(x.clone()),
            (true, Some(y)) if y.dims() == [self.cfg.condition_channels(), f, h, w] => {
                Ok(Tensor::cat(&[x, &y.to_dtype(x.dtype())?], 0)?)
            }
            (false, Some(y)) => Err(Error::Shape {
                what: "I2V condition `y` given to a T2V / TI2V model (no mask or image channels)"
                    .into(),
                expected: "no condition".into(),
                got: y.dims().to_vec(),
            }),
            (true, y) => Err(Error::Shape {
                what: "I2V condition `y` (mask and image latent)".into(),
                expected: format!("[{}, {f}, {h}, {w}]", self.cfg.condition_channels()),
                got: y.map(|y| y.dims().to_vec()).unwrap_or_default(),
            }),
        }
    }

    /// `[1, L, (kt, kh, kw, c)]` → `[c, F, H, W]`.
    fn unpatchify(&self, patches: &Tensor, grid: (usize, usize, usize)) -> Result<Tensor> {
        let (f, h, w) = grid;
        let (pt, ph, pw) = PATCH_SIZE;
        let c = self.cfg.out_dim;
        Ok(patches
            .reshape(&[f, h, w, pt, ph, pw, c][..])?
            .permute(&[6, 0, 3, 1, 4, 2, 5][..])?
            .reshape((c, f * pt, h * ph, w * pw))?)
    }
}

/// The model time of each token of a forward (`spec/wan-model.md` §2.6), every value in
/// `[0, 1000]`.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenTimesteps {
    /// Every token at one model time (Wan2.1, the A14B experts, TI2V text mode).
    Uniform(f64),
    /// TI2V image mode: the tokens of the first `frames` latent frames (the image's) at 0,
    /// every other token at `t`: upstream's token mask, frame 0 held at t = 0.
    HeldFrames { frames: usize, t: f64 },
    /// One model time per token, in token order (f, h, w) of the patch grid
    /// (`F · H/2 · W/2` values).
    PerToken(Vec<f64>),
}

impl TokenTimesteps {
    /// Per-token times from a tensor of `L` values (`[L]` or `[1, L]`, as upstream's `t`).
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let values = t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        Ok(Self::PerToken(values))
    }

    /// Runs of consecutive tokens sharing a time, `(tokens, t)`, over the patch grid `grid`.
    fn runs(&self, grid: (usize, usize, usize)) -> Result<Vec<(usize, f64)>> {
        let (frames, h, w) = grid;
        let tokens = frames * h * w;
        let mut runs: Vec<(usize, f64)> = match self {
            Self::Uniform(t) => vec![(tokens, *t)],
            Self::HeldFrames { frames: held, t } => {
                let held = (*held).min(frames) * h * w;
                vec![(held, 0.0), (tokens - held, *t)]
            }
            Self::PerToken(values) => {
                if values.len() != tokens {
                    return Err(Error::Shape {
                        what: "per-token DiT timesteps".into(),
                        expected: format!("[{tokens}] (one per patch token, grid {grid:?})"),
                        got: vec![values.len()],
                    });
                }
                values.iter().map(|&t| (1, t)).collect()
            }
        };
        if let Some(&(_, t)) = runs
            .iter()
            .find(|(_, t)| !(0.0..=MAX_MODEL_TIME).contains(t))
        {
            return Err(Error::OutOfRange {
                what: "DiT timestep `t`".into(),
                value: t.to_string(),
                expected: format!("model time in [0, {MAX_MODEL_TIME}] (1000 · s)"),
            });
        }
        runs.retain(|&(n, _)| n > 0);
        runs.dedup_by(|next, run| {
            let same = next.1 == run.1;
            if same {
                run.0 += next.0;
            }
            same
        });
        Ok(runs)
    }
}

/// What a Wan DiT is conditioned on: the text encoder's output, for the I2V models the mask and
/// image latent, for the Wan2.1 I2V / FLF2V models the CLIP tokens, and for TI2V's image mode
/// the latent frames held at t = 0.
#[derive(Debug, Clone)]
pub struct DitCondition {
    /// `[L_text ≤ text_len, text_dim]`, trimmed to the real tokens.
    pub context: Tensor,
    /// `[in_dim − out_dim, F, H, W]` for the I2V models (mask(4) and image latent(16)).
    pub image: Option<Tensor>,
    /// CLIP tokens `[1, N, 1280]` (Wan2.1 I2V) or `[2, N, 1280]` (FLF2V: first and last frame).
    pub clip: Option<Tensor>,
    /// Leading latent frames whose tokens run at t = 0 (TI2V image mode: 1; else 0). The
    /// sampler re-imposes those frames' latent after every step.
    pub held_frames: usize,
}

impl DitCondition {
    /// A text-only condition.
    pub fn text(context: Tensor) -> Self {
        Self {
            context,
            image: None,
            clip: None,
            held_frames: 0,
        }
    }

    /// The timesteps of the tokens at model time `t`.
    pub fn timesteps(&self, t: f64) -> TokenTimesteps {
        match self.held_frames {
            0 => TokenTimesteps::Uniform(t),
            frames => TokenTimesteps::HeldFrames { frames, t },
        }
    }
}

impl<A: Attention> Denoiser for WanModel<A> {
    type Condition = DitCondition;

    /// Feeds the network `t.model_time` (the sampler decides its rounding).
    fn velocity(&self, x: &Tensor, t: Timestep, cond: &DitCondition) -> Result<Tensor> {
        self.forward_with(
            x,
            &cond.timesteps(t.model_time),
            &cond.context,
            cond.image.as_ref(),
            cond.clip.as_ref(),
        )
    }
}

/// A DiT run sequence parallel over the ranks of a communicator, as a [`Denoiser`]: every rank
/// drives the same sampler with the same inputs, and each velocity is computed by all ranks
/// together ([`WanModel::forward_sequence_parallel`]), so every rank's sample stays the same.
pub struct SequenceParallelDit<'a, A = Box<dyn Attention>> {
    pub model: &'a WanModel<A>,
    pub comm: &'a dyn Communicator,
}

impl<A: Attention> Denoiser for SequenceParallelDit<'_, A> {
    type Condition = DitCondition;

    fn velocity(&self, x: &Tensor, t: Timestep, cond: &DitCondition) -> Result<Tensor> {
        self.model
            .forward_sequence_parallel(x, &cond.timesteps(t.model_time), cond, self.comm)
    }
}
